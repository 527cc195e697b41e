"""Writes the seed corpus of the fuzz targets into fuzz/corpus/<target>/ (committed; rerun only to
regenerate it). Seeds come from real checkpoints: one written by torch `dcp.save` and one by
libdcp (through the C API), cut into their pieces.

    .venv/bin/python fuzz/make_seeds.py        (after `cargo build --release`)
"""
import hashlib
import io
import os
import pickle
import shutil
import struct
import sys
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))

import torch  # noqa: E402
import torch.distributed.checkpoint as tdcp  # noqa: E402

import libdcp as L  # noqa: E402

CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def put(target, data, prefix=b""):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    data = prefix + data
    with open(os.path.join(d, "seed-" + hashlib.sha1(data).hexdigest()[:16]), "wb") as f:
        f.write(data)


def items(ckpt):
    """Every stored item (a complete zip archive) of every data file: from each local header
    whose record name ends in data.pkl to the end of the next end-of-central-directory record."""
    out = []
    for name in sorted(os.listdir(ckpt)):
        if not name.endswith(".distcp"):
            continue
        data = open(os.path.join(ckpt, name), "rb").read()
        at = data.find(b"PK\x03\x04")
        while at >= 0:
            nlen = struct.unpack_from("<H", data, at + 26)[0]
            if data[at + 30:at + 30 + nlen].endswith(b"data.pkl"):
                e = data.find(b"PK\x05\x06", at)
                end = e + 22 + struct.unpack_from("<H", data, e + 20)[0]
                out.append(data[at:end])
                at = data.find(b"PK\x03\x04", end)
            else:
                at = data.find(b"PK\x03\x04", at + 4)
    return out


def state():
    g = torch.Generator().manual_seed(0)
    return {
        "model.w": torch.randn(6, 5, generator=g),
        "model.b": torch.randn(3, generator=g).to(torch.bfloat16),
        "model.t": torch.arange(12, dtype=torch.int64).reshape(3, 4).t(),
        "model.s": torch.tensor(7, dtype=torch.int32),
        "model.e": torch.zeros(0, 2),
        "model.flag": torch.tensor([True, False]),
        "optim.lr": 1e-3,
        "optim.step": 12,
        "optim.blob": b"\x00\x01bytes",
        "optim.betas": (0.9, 0.999),
        "optim.names": ["a", "b", {"c": None}],
    }


def main():
    if os.path.isdir(CORPUS):
        shutil.rmtree(CORPUS)
    tmp = tempfile.mkdtemp()
    try:
        torch_dir = os.path.join(tmp, "torch")
        tdcp.save(state(), checkpoint_id=torch_dir)
        lib_dir = os.path.join(tmp, "libdcp")
        ctx = L.Context()
        st = L.State()
        keep = []
        for k, v in state().items():
            if isinstance(v, torch.Tensor):
                v = v.contiguous()
                keep.append(v)
                st.add_tensor(k, v)
            elif isinstance(v, bytes):
                st.add_bytes(k, v)
            elif isinstance(v, int):
                st.add_int(k, v)
            elif isinstance(v, float):
                st.add_double(k, v)
            else:
                st.add_literal(k, repr(v))
        L.save(ctx, st, lib_dir)

        for d in (torch_dir, lib_dir):
            md = open(os.path.join(d, ".metadata"), "rb").read()
            put("metadata", md)
            put("pickle", md)
            for item in items(d):
                if len(item) > 4096 + 2048:
                    continue
                put("zipitem", item, prefix=b"\x00")
                with zipfile.ZipFile(io.BytesIO(item)) as z:
                    for n in z.namelist():
                        if n.endswith("data.pkl"):
                            put("pickle", z.read(n))
        put("sidecar", open(os.path.join(lib_dir, ".libdcp"), "rb").read())
        # A bigger sidecar: several files and blocks (one 9 MiB tensor over two writer threads).
        big = os.path.join(tmp, "big")
        st2 = L.State()
        w = torch.zeros(9 << 18)
        st2.add_tensor("w", w)
        st2.add_tensor("v", torch.ones(3))
        L.save(ctx, st2, big)
        put("sidecar", open(os.path.join(big, ".libdcp"), "rb").read())

        for proto in range(0, 6):
            for v in [None, True, -1, 2**70, 1.5, "str", b"bytes", (1, 2), [1, [2]], {"a": (1,)}, {1, 2}, frozenset([3])]:
                put("pickle", pickle.dumps(v, protocol=proto))
        # Plans: structured seeds (first byte even) and postcard-encoded ones (odd).
        for s in [b"\x00\x02\x03\x04\x01\x02\x02\x00\x00\x03\x04\x02\x00\x01\x01\x02\x03",
                  b"\x00\x01\x05\x01\x00\x01\x01\x01\x00\x02\x05\x00\x01\x02\x03",
                  b"\x00\x03\x02\x02\x02\x03\x01\x01\x01\x02\x01\x00\x02\x01\x02\x02\x01\x00\x00\x04\x00\x02\x00\x02"]:
            put("plan", s)
        put("plan", b"\x01\x01" + bytes([1, 1, 2, 1, 0, 1, 0, 1, 1, 0, 1, ord("w"), 1, 0, 1, ord("w"), 1, 1, 1, 1, 4, 0]))
    finally:
        shutil.rmtree(tmp)
    for t in sorted(os.listdir(CORPUS)):
        print(t, len(os.listdir(os.path.join(CORPUS, t))))


if __name__ == "__main__":
    main()
