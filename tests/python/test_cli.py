"""The `dcp` command-line tool against real PyTorch: checkpoints written by torch `dcp.save`
(a model + Adam state via get_state_dict, many dtypes, a 0-d tensor, objects) and a two-chunk
tensor written by libdcp over two processes.

Run:  /work/main/.venv/bin/python tests/python/test_cli.py [-v]
      (after `cargo build --release`; DCP_BIN overrides the binary, LIBDCP_SO the library)

Checks `inspect --json` against torch's own tensors, `verify` (and that a flipped payload byte,
which torch loads silently, is caught), `convert --to safetensors` read back by
safetensors.torch (values equal, `--dtype bf16` equal to `t.to(torch.bfloat16)`,
`--max-shard-size` shards plus an index a transformers-style loader follows into a fresh
model), `convert --from safetensors` read back by torch `dcp.load`, and `diff`.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
import torch.nn as nn  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch.distributed.checkpoint._nested_dict import flatten_state_dict  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict  # noqa: E402

from libdcp import find_in_files, raw_bytes, xor_byte  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DCP = os.environ.get("DCP_BIN") or os.path.join(ROOT, "target", "release", "dcp")
FLOATS = {torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2}


def run(*args):
    return subprocess.run([DCP, *[str(a) for a in args]], capture_output=True, text=True, timeout=300)


def ok(*args):
    r = run(*args)
    if r.returncode != 0:
        raise AssertionError(f"dcp {' '.join(map(str, args))} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def same(a, b):
    """Same dtype, shape and bytes (NaN payloads and -0.0 included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(raw_bytes(a), raw_bytes(b))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.net = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.net(self.embed(x)))


def extra_tensors():
    g = torch.Generator().manual_seed(1)

    def rn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    return {
        "f64": rn(3, 4).double(),
        # Just above a bf16 / f16 tie in float64, a tie after rounding to float32: torch rounds
        # through float32 (to 1.0), direct rounding would give the next value up.
        "f64_ties": torch.tensor([1 + 2**-8 + 2**-30, 1 + 2**-11 + 2**-40, -(1 + 2**-8 + 2**-30), 3e38, 1e-300],
                                 dtype=torch.float64),
        "f16": rn(5, 3).half(),
        "bf16": rn(4, 4).bfloat16(),
        "f8e4m3": rn(6, scale=8.0).to(torch.float8_e4m3fn),
        "f8e5m2": rn(6, scale=8.0).to(torch.float8_e5m2),
        "i64": torch.randint(-2**40, 2**40, (7,), generator=g),
        "i32": torch.randint(-2**31, 2**31 - 1, (2, 3), generator=g, dtype=torch.int32),
        "i16": torch.randint(-2**15, 2**15 - 1, (4,), generator=g, dtype=torch.int16),
        "i8": torch.randint(-128, 127, (9,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 256, (3, 3), generator=g, dtype=torch.uint8),
        "u16": torch.randint(0, 2**15, (4,), generator=g, dtype=torch.int16).view(torch.uint16),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "cplx": torch.randn(3, generator=g, dtype=torch.complex64),
    }


def save_two_chunks(rank, world, port, path):
    """libdcp over two processes: rows 0..3 of `sharded` on rank 0, rows 3..5 on rank 1."""
    import libdcp as L

    ctx = L.Context.tcp(rank, world, port)
    full = torch.arange(5 * 4, dtype=torch.float32).reshape(5, 4) * 0.25
    rows = (0, 3) if rank == 0 else (3, 5)
    st = L.State()
    st.add_tensor("sharded", full[rows[0]:rows[1]].clone(), global_shape=[5, 4], offsets=[rows[0], 0])
    if rank == 0:
        st.add_tensor("other", torch.tensor([1, 2, 3], dtype=torch.int64))
    L.save(ctx, st, path)
    return True


class Cli(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        warnings.filterwarnings("ignore")
        if not os.path.exists(DCP):
            raise unittest.SkipTest(f"{DCP} is missing: run cargo build --release first")
        cls.root = tempfile.mkdtemp(prefix="libdcp-cli-")
        torch.manual_seed(0)
        model = Model()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(2):
            model(torch.randint(0, 32, (4, 3))).sum().backward()
            opt.step()
            opt.zero_grad()
        msd, osd = get_state_dict(model, opt)
        cls.model_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        sd = {"model": msd, "optim": osd, "extra": extra_tensors(), "step": 2, "note": "torch wrote this"}
        cls.path = os.path.join(cls.root, "torch")
        dcp.save(sd, checkpoint_id=cls.path)
        flat, _ = flatten_state_dict(sd)
        cls.tensors = {k: v.detach().clone() for k, v in flat.items() if isinstance(v, torch.Tensor)}
        cls.objects = {k: v for k, v in flat.items() if not isinstance(v, torch.Tensor)}

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.root, ignore_errors=True)

    def sub(self, name):
        p = os.path.join(self.root, name)
        shutil.rmtree(p, ignore_errors=True)
        return p

    # --- inspect ------------------------------------------------------------------------------

    def test_inspect_json_matches_torch(self):
        doc = json.loads(ok("inspect", self.path, "--json").stdout)
        self.assertEqual(doc["writer"], "torch")
        self.assertFalse(doc["sidecar"])
        self.assertEqual(doc["metadata_version"], "1.0.0")
        keys = {k["key"]: k for k in doc["keys"]}
        self.assertEqual(set(keys), set(self.tensors) | set(self.objects))
        for name, t in self.tensors.items():
            k = keys[name]
            self.assertEqual(k["kind"], "tensor", name)
            self.assertEqual(k["dtype"], str(t.dtype).removeprefix("torch."), name)
            self.assertEqual(k["shape"], list(t.shape), name)
            self.assertEqual(k["chunks"], 1, name)
            self.assertEqual(k["bytes"], t.numel() * t.element_size(), name)
        self.assertEqual(keys["extra.scalar"]["shape"], [])
        for name in self.objects:
            self.assertEqual(keys[name]["kind"], "object", name)
        files = doc["files"]
        self.assertEqual([f["name"] for f in files], ["__0_0.distcp"])
        self.assertEqual(files[0]["rank"], 0)
        self.assertEqual(files[0]["size"], os.path.getsize(os.path.join(self.path, "__0_0.distcp")))
        self.assertEqual(files[0]["items"], len(keys))
        self.assertEqual(doc["totals"]["tensors"], len(self.tensors))
        # The text form shows the same keys.
        text = ok("inspect", self.path).stdout
        self.assertIn("writer      torch (metadata version 1.0.0)", text)
        self.assertRegex(text, r"\nmodel\.net\.0\.weight +tensor +float32 +\[24, 16\] +1 +1\.5 KiB\n")

    # --- verify -------------------------------------------------------------------------------

    def test_verify_ok_and_flipped_payload(self):
        r = ok("verify", self.path)
        self.assertTrue(r.stdout.startswith("ok: "), r.stdout)
        self.assertEqual(r.stderr, "")
        bad = self.sub("flipped")
        shutil.copytree(self.path, bad)
        key = "model.net.0.weight"
        data_file, at = find_in_files(bad, self.tensors[key].numpy().tobytes())
        self.assertEqual(os.path.basename(data_file), "__0_0.distcp")
        self.assertGreater(at, 0)
        xor_byte(data_file, at + 17, 0x20)
        # torch's own loader does not notice.
        loaded = {key: torch.zeros_like(self.tensors[key])}
        dcp.load(loaded, checkpoint_id=bad)
        self.assertFalse(torch.equal(loaded[key], self.tensors[key]))
        r = run("verify", bad)
        self.assertEqual(r.returncode, 1, r.stdout)
        fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
        self.assertEqual(len(fails), 1, r.stdout)
        m = re.search(r'key "([^"]+)": (__0_0\.distcp) at offset (\d+): .*record \S+/data/0 \(bytes (\d+)\.\.(\d+)\): CRC-32', fails[0])
        self.assertIsNotNone(m, fails[0])
        self.assertEqual(m.group(1), key)
        self.assertEqual(int(m.group(3)), at)
        self.assertLessEqual(int(m.group(4)), at + 17)
        self.assertLess(at + 17, int(m.group(5)))
        self.assertEqual(len(r.stderr.splitlines()), 1)

    def test_verify_pickles_of_torch_checkpoint_are_allowed(self):
        # Model, Adam state, objects: every global torch wrote is on the allowlist.
        r = ok("verify", self.path, "--strict-pickles")
        self.assertNotIn("note:", r.stdout)
        self.assertRegex(r.stdout, r"and (\d+) pickles checked")
        self.assertGreater(int(re.search(r"and (\d+) pickles checked", r.stdout).group(1)), len(self.tensors))

    def test_verify_reports_pickles_that_would_run_code(self):
        class Payload:
            def __reduce__(self):
                return (os.system, ("echo pwned",))  # pickled, never run

        path = self.sub("payload")
        dcp.save({"w": torch.ones(2), "evil": Payload()}, checkpoint_id=path)
        r = ok("verify", path)
        notes = [line for line in r.stdout.splitlines() if line.startswith("note:")]
        self.assertEqual(len(notes), 1, r.stdout)
        self.assertIn('key "evil"', notes[0])
        self.assertIn("names posix.system", notes[0])
        r = run("verify", path, "--strict-pickles")
        self.assertEqual(r.returncode, 1, r.stdout)
        self.assertIn("names posix.system", r.stdout)

    # --- convert to safetensors ---------------------------------------------------------------

    def test_convert_to_safetensors_equals_torch(self):
        out = self.sub("st")
        r = ok("convert", self.path, "--to", "safetensors", out)
        self.assertIn("extra.cplx (complex64)", r.stderr)
        self.assertIn(f"skipped {len(self.objects)} objects", r.stderr)
        loaded = load_file(os.path.join(out, "model.safetensors"))
        want = {k: v for k, v in self.tensors.items() if not v.is_complex()}
        self.assertEqual(set(loaded), set(want))
        for k, t in want.items():
            self.assertTrue(same(loaded[k], t), k)
        with open(os.path.join(out, "model.safetensors.index.json")) as f:
            index = json.load(f)
        self.assertEqual(set(index["weight_map"].values()), {"model.safetensors"})
        self.assertEqual(index["metadata"]["total_size"], sum(t.numel() * t.element_size() for t in want.values()))

    def test_convert_casts_like_torch(self):
        for flag, dtype in (("bf16", torch.bfloat16), ("f16", torch.float16), ("f32", torch.float32)):
            out = self.sub(f"st-{flag}")
            ok("convert", self.path, "--to", "safetensors", out, "--dtype", flag, "--filter", "extra.", "--filter", "model.")
            loaded = load_file(os.path.join(out, "model.safetensors"))
            for k, t in self.tensors.items():
                if not (k.startswith("extra.") or k.startswith("model.")) or t.is_complex():
                    self.assertNotIn(k, loaded)
                    continue
                expect = t.to(dtype) if t.dtype in FLOATS else t
                self.assertTrue(same(loaded[k], expect), f"--dtype {flag}: {k}: {loaded[k]} vs {expect}")

    def test_shards_and_index_load_a_model(self):
        out = self.sub("shards")
        ok("convert", self.path, "--to", "safetensors", out, "--filter", "model.", "--strip-prefix", "model.",
           "--max-shard-size", "2KB")
        with open(os.path.join(out, "model.safetensors.index.json")) as f:
            index = json.load(f)
        files = sorted(set(index["weight_map"].values()))
        self.assertGreater(len(files), 2)
        self.assertEqual(files, [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])
        self.assertEqual(sorted(x for x in os.listdir(out) if x.endswith(".safetensors")), files)
        self.assertEqual(set(index["weight_map"]), set(self.model_sd))
        # What a transformers-style loader does: every shard the index names, into the model.
        sd = {}
        for name in files:
            part = load_file(os.path.join(out, name))
            for k in part:
                self.assertEqual(index["weight_map"][k], name)
            sd.update(part)
            data_bytes = sum(v.numel() * v.element_size() for v in part.values())
            self.assertTrue(data_bytes <= 2000 or len(part) == 1, f"{name}: {data_bytes} bytes")
        fresh = Model()
        fresh.load_state_dict(sd, strict=True)
        for k, v in fresh.state_dict().items():
            self.assertTrue(torch.equal(v, self.model_sd[k]), k)
        self.assertEqual(index["metadata"]["total_size"], sum(v.numel() * v.element_size() for v in self.model_sd.values()))

    # --- convert from safetensors -------------------------------------------------------------

    def test_convert_from_safetensors_loads_in_torch(self):
        tensors = {k: v for k, v in self.tensors.items() if not v.is_complex()}
        tensors["extra.empty"] = torch.zeros(0, 3)
        src = self.sub("st-in")
        os.makedirs(src)
        names = sorted(tensors)
        save_file({k: tensors[k].contiguous() for k in names[::2]}, os.path.join(src, "a.safetensors"), metadata={"format": "pt"})
        save_file({k: tensors[k].contiguous() for k in names[1::2]}, os.path.join(src, "b.safetensors"), metadata={"format": "pt"})
        out = self.sub("from-st")
        r = ok("convert", os.path.join(src, "a.safetensors"), os.path.join(src, "b.safetensors"), "--from", "safetensors", out)
        self.assertIn(f"wrote {len(tensors)} tensors", r.stdout)
        ok("verify", out)
        loaded = {k: torch.zeros_like(v) for k, v in tensors.items()}
        dcp.load(loaded, checkpoint_id=out)
        for k, t in tensors.items():
            self.assertTrue(same(loaded[k], t), k)
        # And a whole round trip: torch DCP -> safetensors -> libdcp DCP, diffed against the
        # original (only the objects and the complex tensor, which safetensors cannot hold, differ).
        st = self.sub("rt-st")
        ok("convert", self.path, "--to", "safetensors", st, "--max-shard-size", "4KB")
        back = self.sub("rt-back")
        ok("convert", st, "--from", "safetensors", back)
        r = run("diff", self.path, back)
        self.assertEqual(r.returncode, 1)
        only_a = sorted(line.removeprefix("only in A: ") for line in r.stdout.splitlines() if line.startswith("only in A: "))
        self.assertEqual(only_a, sorted(list(self.objects) + ["extra.cplx"]))
        self.assertNotIn("differs:", r.stdout)
        # The model part loads into a fresh model through torch dcp.load.
        fresh = Model()
        msd = {f"model.{k}": v for k, v in fresh.state_dict().items()}
        dcp.load(msd, checkpoint_id=back)
        for k, v in self.model_sd.items():
            self.assertTrue(torch.equal(msd[f"model.{k}"], v), k)

    # --- diff ---------------------------------------------------------------------------------

    def test_diff(self):
        r = ok("diff", self.path, self.path)
        self.assertEqual(r.stdout.strip(), f"identical: {len(self.tensors) + len(self.objects)} keys")
        changed = self.sub("changed")
        sd = {k: v.clone() for k, v in self.tensors.items()}
        sd["model.net.0.bias"][3] += 0.5
        sd["extra.bf16"][0, 0] = -sd["extra.bf16"][0, 0] - 1
        sd["extra.i64"][2] += 7
        dcp.save(sd, checkpoint_id=changed)
        r = run("diff", self.path, changed)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("differs: model.net.0.bias: 1 of 24 elements differ, max abs diff 0.5", r.stdout)
        self.assertIn("differs: extra.bf16: 1 of 16 elements differ", r.stdout)
        self.assertIn("differs: extra.i64: 1 of 7 elements differ, max abs diff 7", r.stdout)
        for k in self.objects:
            self.assertIn(f"only in A: {k}", r.stdout)

    # --- multi-chunk (libdcp, two processes) --------------------------------------------------

    def test_two_chunk_tensor(self):
        import multirank

        path = self.sub("two-chunks")
        multirank.run(2, save_two_chunks, path)
        doc = json.loads(ok("inspect", path, "--json", "--chunks").stdout)
        self.assertTrue(doc["writer"].startswith("libdcp "))
        keys = {k["key"]: k for k in doc["keys"]}
        self.assertEqual(keys["sharded"]["chunks"], 2)
        self.assertEqual([(c["offsets"], c["sizes"]) for c in keys["sharded"]["chunk_list"]], [([0, 0], [3, 4]), ([3, 0], [2, 4])])
        names = sorted(f["name"] for f in doc["files"])
        self.assertEqual([re.sub(r"_[0-9a-f]{12}\.distcp$", ".distcp", n) for n in names], ["__0_0.distcp", "__1_0.distcp"])
        self.assertEqual(sorted(r["rank"] for r in doc["ranks"]), [0, 1])
        ok("verify", path)
        st = self.sub("two-chunks-st")
        ok("convert", path, "--to", "safetensors", st)
        loaded = load_file(os.path.join(st, "model.safetensors"))
        self.assertTrue(torch.equal(loaded["sharded"], torch.arange(20, dtype=torch.float32).reshape(5, 4) * 0.25))
        self.assertTrue(torch.equal(loaded["other"], torch.tensor([1, 2, 3])))


if __name__ == "__main__":
    unittest.main()
