"""Interoperability of libdcp (through its C API, via ctypes) with real PyTorch DCP.

Run:  /work/main/.venv/bin/python tests/python/test_interop.py [-v]
      (after `cargo build --release`; LIBDCP_SO overrides the library path)

No process group is initialised: torch DCP runs as a single process (it warns; silenced below).
  1. torch saves (dcp.save + FileSystemWriter, thread_count 1/4, single_file_per_rank on/off),
     libdcp loads every key, inspects keys and reads boxes.
  2. libdcp saves, torch loads (dcp.load, dcp_to_torch_save), and a real model + Adam resumes
     training bit-exactly from a libdcp checkpoint.
  3. Damaged checkpoints (written by libdcp and by torch): flipped payload byte, truncated data
     file, garbled and deleted .metadata.
  4. zip64: a 4 GiB + 4 KiB tensor saved by torch, boxes read by libdcp (skipped on < 10 GiB disk);
     about 40 s of the run, most of it torch writing the 4 GiB.
KnownBugs holds expectedFailure reproductions of libdcp bugs found here.
Runs only this group, for example:  python tests/python/test_interop.py -v Corruption
"""
import fractions
import gc
import os
import pickle
import shutil
import sys
import tempfile
import unittest
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter  # noqa: E402
from torch.distributed.checkpoint._nested_dict import flatten_state_dict  # noqa: E402
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: E402

import libdcp  # noqa: E402
from libdcp import DTYPES, DcpError, VALUE_BYTES, VALUE_DOUBLE, VALUE_INT, VALUE_PICKLE  # noqa: E402
from libdcp import find_in_files, raw_bytes, xor_byte  # noqa: E402

ST_CORRUPT, ST_CHECKSUM, ST_NOT_FOUND = 4, 5, 6
KEY_TENSOR, KEY_OBJECT = 1, 2

# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def dtype_tensors(seed, shape=(3, 5)):
    """One tensor of every dtype libdcp supports, random values over each dtype's full range."""
    g = torch.Generator().manual_seed(seed)

    def ri(lo, hi, dt):
        return torch.randint(lo, hi, shape, generator=g, dtype=dt)

    def rn(dt=torch.float32, scale=1.0):
        return torch.randn(shape, generator=g, dtype=dt) * scale

    return {
        "float32": rn(),
        "float64": rn(torch.float64),
        "float16": rn().to(torch.float16),
        "bfloat16": rn().to(torch.bfloat16),
        "float8_e4m3fn": rn(scale=16.0).to(torch.float8_e4m3fn),
        "float8_e5m2": rn(scale=16.0).to(torch.float8_e5m2),
        "int64": ri(-2**63, 2**63 - 1, torch.int64),
        "int32": ri(-2**31, 2**31 - 1, torch.int32),
        "int16": ri(-2**15, 2**15 - 1, torch.int16),
        "int8": ri(-128, 127, torch.int8),
        "uint8": ri(0, 256, torch.uint8),
        "bool": ri(0, 2, torch.int64).bool(),
        "complex64": rn(torch.complex64),
        "complex128": rn(torch.complex128),
        # Unsigned wide types: reinterpret signed randoms so the high bit is exercised.
        "uint16": ri(-2**15, 2**15 - 1, torch.int16).view(torch.uint16),
        "uint32": ri(-2**31, 2**31 - 1, torch.int32).view(torch.uint32),
        "uint64": ri(-2**63, 2**63 - 1, torch.int64).view(torch.uint64),
    }


_NO_EQUAL = {torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32, torch.uint64}


def zeros_like_contig(t):
    return torch.zeros(t.shape, dtype=t.dtype)


class Case(unittest.TestCase):
    def setUp(self):
        # torch DCP warns that it runs without a process group; that is intended here.
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        self.dir = tempfile.mkdtemp(prefix="libdcp-interop-")
        self.ctx = libdcp.Context()

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)
        gc.collect()

    def sub(self, name):
        p = os.path.join(self.dir, name)
        os.makedirs(p, exist_ok=True)
        return p

    # --- comparisons --------------------------------------------------------------------------

    def assertTensorEqual(self, got, want, what=""):
        self.assertEqual(got.dtype, want.dtype, what)
        self.assertEqual(tuple(got.shape), tuple(want.shape), what)
        if want.dtype in _NO_EQUAL:
            # float8 (and the wide unsigned types) compared as their bytes.
            self.assertTrue(torch.equal(raw_bytes(got), raw_bytes(want)), what)
        else:
            self.assertTrue(torch.equal(got, want), f"{what}: {got} != {want}")
            # Bit-exact as well (-0.0 vs 0.0 and NaN payloads).
            self.assertTrue(torch.equal(raw_bytes(got), raw_bytes(want)), what)

    def assertNestedEqual(self, got, want, path="root"):
        if isinstance(want, torch.Tensor):
            self.assertIsInstance(got, torch.Tensor, path)
            self.assertTensorEqual(got, want, path)
        elif isinstance(want, dict):
            self.assertIsInstance(got, dict, path)
            self.assertEqual(set(got), set(want), path)
            for k in want:
                self.assertNestedEqual(got[k], want[k], f"{path}.{k}")
        elif isinstance(want, (list, tuple)):
            self.assertIs(type(got), type(want), path)
            self.assertEqual(len(got), len(want), path)
            for i, (a, b) in enumerate(zip(got, want)):
                self.assertNestedEqual(a, b, f"{path}[{i}]")
        else:
            self.assertIs(type(got), type(want), path)
            self.assertEqual(got, want, path)

    def assertValue(self, src, fqn, want):
        """Checks a non-tensor value through a loaded State or an open Checkpoint."""
        kind, data = src.get_bytes(fqn)
        if isinstance(want, bytes):
            self.assertEqual(kind, VALUE_BYTES, fqn)
            self.assertEqual(data, want, fqn)
            return
        if isinstance(want, int) and not isinstance(want, bool):
            self.assertEqual(kind, VALUE_INT, fqn)
            self.assertEqual(src.get_int(fqn), want, fqn)
        elif isinstance(want, float):
            self.assertEqual(kind, VALUE_DOUBLE, fqn)
            got = src.get_double(fqn)
            self.assertEqual(got.hex(), want.hex(), fqn)
        else:
            self.assertEqual(kind, VALUE_PICKLE, fqn)
        # For every non-bytes kind the bytes are a pickle of the value.
        obj = pickle.loads(data)
        self.assertIs(type(obj), type(want), fqn)
        self.assertEqual(obj, want, fqn)

    def assertDcpError(self, status, fn, *args, **kw):
        with self.assertRaises(DcpError) as cm:
            fn(*args, **kw)
        if status is not None:
            self.assertEqual(cm.exception.status, status, cm.exception.message)
        return cm.exception


# --- a small model -------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net1 = nn.Linear(8, 16)
        self.relu = nn.ReLU()
        self.net2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.net2(self.relu(self.net1(x)))


def make_model(seed):
    torch.manual_seed(seed)
    return MLP()


def batch(i):
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)


def train_step(model, optim, i):
    x, y = batch(i)
    optim.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    optim.step()
    return loss.item()


def trained_model(steps=2):
    model = make_model(0)
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = [train_step(model, optim, i) for i in range(steps)]
    return model, optim, losses


def register_value(st, fqn, v):
    """Registers a non-tensor Python value with the natural libdcp call."""
    if isinstance(v, bytes):
        st.add_bytes(fqn, v)
    elif isinstance(v, bool):
        st.add_literal(fqn, repr(v))
    elif isinstance(v, int):
        st.add_int(fqn, v)
    elif isinstance(v, float):
        st.add_double(fqn, v)
    else:
        st.add_literal(fqn, repr(v))


def register_placeholder(st, fqn, v):
    """Registers a slot for a value to be loaded (the checkpoint decides the final kind)."""
    if isinstance(v, bytes):
        st.add_bytes(fqn, b"")
    elif isinstance(v, int) and not isinstance(v, bool):
        st.add_int(fqn, 0)
    elif isinstance(v, float):
        st.add_double(fqn, 0.0)
    else:
        st.add_literal(fqn, "None")


# ------------------------------------------------------------------------------------------------
# 1. torch saves, libdcp loads
# ------------------------------------------------------------------------------------------------


def torch_side_state():
    model, optim, losses = trained_model(2)
    msd, osd = get_state_dict(model, optim)
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) * 1.5 - 7.0
    return {
        "model": msd,
        "optimizer": osd,
        "dtypes": dtype_tensors(1),
        "scalar": torch.tensor(3.25, dtype=torch.float64),
        "empty": torch.empty(0, 4),
        "transposed": base.t(),
        # 12 MiB: larger than libdcp's 4 MiB checksum block.
        "large": torch.randn(3, 1 << 20, generator=torch.Generator().manual_seed(9)),
        "nested": {"a": {"b": {"c": torch.arange(10, dtype=torch.int32)}}, "count": 7},
        "step_count": 123456789012,
        "neg_int": -5,
        "lr_value": 0.000123,
        "blob": bytes(range(256)) + b"\x00end",
        "empty_blob": b"",
        "loss_history": losses + [0.5, 0.25],
        "note": "hello \u00fcn\u00efcode",
        "fraction": fractions.Fraction(1, 3),
        "nothing": None,
    }


class TorchSavesLibdcpLoads(Case):
    def test_torch_save_matrix(self):
        sd = torch_side_state()
        flat, _ = flatten_state_dict(sd)
        # Sanity of the fixture: the torch way of flattening, with Adam state present.
        self.assertTrue(torch.is_tensor(flat["optimizer.state.net1.weight.exp_avg"]))
        self.assertTrue(torch.is_tensor(flat["optimizer.state.net2.bias.exp_avg_sq"]))
        self.assertEqual(flat["optimizer.state.net1.weight.step"].dim(), 0)
        self.assertEqual(flat["optimizer.param_groups.0.betas"], (0.9, 0.999))
        self.assertFalse(flat["transposed"].is_contiguous())
        for threads in (1, 4):
            for single in (True, False):
                with self.subTest(thread_count=threads, single_file_per_rank=single):
                    d = self.sub(f"t{threads}_s{int(single)}")
                    dcp.save(sd, storage_writer=FileSystemWriter(d, thread_count=threads, single_file_per_rank=single))
                    self._check_load(d, flat)
                    self._check_inspect(d, flat)

    def _check_load(self, d, flat):
        st = libdcp.State()
        dst = {}
        holder = torch.zeros(3, 3, 1 << 20)
        for k, v in flat.items():
            if k == "transposed":  # a transposed destination
                dst[k] = torch.zeros(v.shape[::-1], dtype=v.dtype).t()
            elif k == "large":  # a destination at a storage offset inside a larger buffer
                dst[k] = holder[1]
            elif torch.is_tensor(v):
                dst[k] = zeros_like_contig(v)
            else:
                register_placeholder(st, k, v)
                continue
            st.add_tensor(k, dst[k])
        libdcp.load(self.ctx, st, d)
        self.assertEqual(st.missing(), [])
        self.assertFalse(dst["transposed"].is_contiguous())
        self.assertEqual(holder[0].count_nonzero().item() + holder[2].count_nonzero().item(), 0)
        for k, v in flat.items():
            self.assertTrue(st.loaded(k), k)
            if torch.is_tensor(v):
                self.assertTensorEqual(dst[k], v.detach(), k)
            else:
                self.assertValue(st, k, v)

    def _check_inspect(self, d, flat):
        ck = libdcp.Checkpoint(d)
        keys = ck.keys()
        self.assertEqual(set(keys), set(flat))
        for k, v in flat.items():
            kind, dtype, shape, nchunks = keys[k]
            if torch.is_tensor(v):
                self.assertEqual((kind, dtype, shape, nchunks), (KEY_TENSOR, DTYPES[v.dtype], list(v.shape), 1), k)
            else:
                self.assertEqual((kind, dtype, shape), (KEY_OBJECT, 0, []), k)
                self.assertValue(ck, k, v)
        # Boxes (offsets != 0) of tensors.
        w = flat["model.net1.weight"].detach()
        box = ck.read_tensor("model.net1.weight", torch.empty(5, 4), offsets=[2, 3])
        self.assertTensorEqual(box, w[2:7, 3:7].contiguous())
        tr = flat["transposed"]
        box = ck.read_tensor("transposed", torch.empty(3, 2), offsets=[1, 2])
        self.assertTensorEqual(box, tr[1:4, 2:4].contiguous())
        for name in DTYPES_NAMES:
            t = flat[f"dtypes.{name}"]
            box = ck.read_tensor(f"dtypes.{name}", torch.empty(2, 3, dtype=t.dtype), offsets=[1, 2])
            self.assertTensorEqual(box, t[1:3, 2:5].contiguous(), name)
        self.assertTensorEqual(ck.read_tensor("scalar", torch.empty((), dtype=torch.float64)), flat["scalar"])
        self.assertTensorEqual(ck.read_tensor("empty", torch.empty(0, 4)), flat["empty"])
        big = flat["large"]
        box = ck.read_tensor("large", torch.empty(2, 5000), offsets=[1, (1 << 20) - 5000])
        self.assertTensorEqual(box, big[1:3, -5000:].contiguous())


DTYPES_NAMES = list(dtype_tensors(0))
assert len(DTYPES_NAMES) == len(DTYPES) == 17

# ------------------------------------------------------------------------------------------------
# 2. libdcp saves, torch loads
# ------------------------------------------------------------------------------------------------


def zeros_tree(tree):
    """Same structure: tensors zeroed (transposed sources get a transposed destination), other leaves None."""
    if torch.is_tensor(tree):
        if tree.dim() == 2 and tree.stride() == (1, tree.shape[0]):
            return torch.zeros(tree.shape[::-1], dtype=tree.dtype).t()  # transposed like the source
        return torch.zeros(tree.shape, dtype=tree.dtype)
    if isinstance(tree, dict):
        return {k: zeros_tree(v) for k, v in tree.items()}
    if isinstance(tree, list) and any(isinstance(x, (dict, list)) for x in tree):
        return [zeros_tree(v) for v in tree]
    return None


class LibdcpSavesTorchLoads(Case):
    def _libdcp_state(self):
        """(State, expected nested dict) covering every kind of value."""
        dts = dtype_tensors(2)
        base = torch.arange(24, dtype=torch.float64).reshape(4, 6) / 3.0
        exp_avg = torch.randn(16, 8, generator=torch.Generator().manual_seed(5))
        step = torch.tensor(2.0)
        frac = fractions.Fraction(2, 7)
        large = torch.randn(3, 1 << 20, generator=torch.Generator().manual_seed(6))
        expanded = torch.arange(4, dtype=torch.int32).expand(3, 4)  # stride 0
        sliced = torch.arange(100.0).reshape(10, 10)[2:5, 3:9:2]  # storage offset, step 2
        expected = {
            "dtypes": dts,
            "scalar": torch.tensor(-2.5, dtype=torch.float64),
            "empty": torch.empty(0, 4),
            "transposed": base.t(),
            "large": large,
            "expanded": expanded,
            "sliced": sliced,
            "optimizer": {
                "state": {"net1.weight": {"exp_avg": exp_avg, "step": step}},
                "param_groups": [{
                    "lr": 0.001,
                    "betas": (0.9, 0.999),
                    "weight_decay": 0,
                    "amsgrad": False,
                    "foreach": None,
                    "params": ["net1.weight", "net1.bias"],
                }],
            },
            "blob": b"\x00\x01binary\xff" * 10,
            "step_count": -123456789012,
            "lr": 0.1,
            "meta": {"name": "mlp", "dims": [8, 16, 4], "ratio": 1.5},
            "fraction": frac,
        }
        st = libdcp.State()
        for name, t in dts.items():
            st.add_tensor(f"dtypes.{name}", t)
        st.add_tensor("scalar", expected["scalar"])
        st.add_tensor("empty", expected["empty"])
        st.add_tensor("transposed", expected["transposed"])
        for k in ("large", "expanded", "sliced"):
            st.add_tensor(k, expected[k])
        for leaf, t in (("exp_avg", exp_avg), ("step", step)):
            fqn = f"optimizer.state.net1.weight.{leaf}"
            st.add_tensor(fqn, t)
            st.set_path(fqn, ["optimizer", "state", "net1.weight", leaf])
        st.add_double("optimizer.param_groups.0.lr", 0.001)
        st.add_literal("optimizer.param_groups.0.betas", "(0.9, 0.999)")
        st.add_int("optimizer.param_groups.0.weight_decay", 0)
        st.add_literal("optimizer.param_groups.0.amsgrad", "False")
        st.add_literal("optimizer.param_groups.0.foreach", "None")
        st.add_literal("optimizer.param_groups.0.params", "['net1.weight', 'net1.bias']")
        st.add_bytes("blob", expected["blob"])
        st.add_int("step_count", expected["step_count"])
        st.add_double("lr", 0.1)
        st.add_literal("meta", "{'name': 'mlp', 'dims': [8, 16, 4], 'ratio': 1.5}")
        st.add_pickle("fraction", pickle.dumps(frac, protocol=2))
        return st, expected

    def test_torch_loads_libdcp_checkpoint(self):
        st, expected = self._libdcp_state()
        d = self.sub("ck")
        libdcp.save(self.ctx, st, d)

        # dcp.load into a nested dict of zero tensors / None placeholders ("meta" is one value).
        target = zeros_tree(expected)
        target["meta"] = None
        self.assertFalse(target["transposed"].is_contiguous())
        dcp.load(target, storage_reader=FileSystemReader(d))
        self.assertNestedEqual(target, expected)

        # dcp_to_torch_save rebuilds the nesting from planner_data (set_path keeps "net1.weight").
        out = os.path.join(self.dir, "full.pt")
        dcp_to_torch_save(d, out)
        full = torch.load(out, weights_only=False)
        self.assertIn("net1.weight", full["optimizer"]["state"])
        self.assertNestedEqual(full, expected)

    def test_model_adam_round_trip(self):
        model, optim, _ = trained_model(2)
        msd, osd = get_state_dict(model, optim)
        flat, mapping = flatten_state_dict({"model": msd, "optimizer": osd})
        st = libdcp.State()
        for k, v in flat.items():
            if torch.is_tensor(v):
                st.add_tensor(k, v.detach())
            else:
                register_value(st, k, v)
            st.set_path(k, list(mapping[k]))
        d = self.sub("ck")
        libdcp.save(self.ctx, st, d)
        del st

        # Continue the original for two more steps.
        ref = [train_step(model, optim, 2), train_step(model, optim, 3)]

        # A fresh model + optimizer with different weights and hyper-parameters resumes from libdcp's checkpoint.
        model2 = make_model(123)
        optim2 = torch.optim.Adam(model2.parameters(), lr=0.5, betas=(0.5, 0.6))
        msd2, osd2 = get_state_dict(model2, optim2)
        sd2 = {"model": msd2, "optimizer": osd2}
        dcp.load(sd2, storage_reader=FileSystemReader(d))
        set_state_dict(model2, optim2, model_state_dict=sd2["model"], optim_state_dict=sd2["optimizer"])
        self.assertEqual(optim2.param_groups[0]["lr"], 1e-2)
        self.assertEqual(optim2.param_groups[0]["betas"], (0.9, 0.999))
        got = [train_step(model2, optim2, 2), train_step(model2, optim2, 3)]
        self.assertEqual(got, ref)
        for (n, p), (n2, p2) in zip(model.named_parameters(), model2.named_parameters()):
            self.assertEqual(n, n2)
            self.assertTrue(torch.equal(p, p2), n)


class LiteralLimits(Case):
    # Regression: an integer literal outside int64 used to become a float silently. It is now
    # rejected at add_literal with DCP_ERROR_INVALID_ARGUMENT.
    def test_literal_int_beyond_int64_is_rejected(self):
        for v in (2**70, -(2**70), 2**63):
            st = libdcp.State()
            with self.assertRaises(DcpError) as cm:
                st.add_literal("big", repr(v))
            self.assertEqual(cm.exception.status, 2)
            self.assertIn("int64", cm.exception.message)


# ------------------------------------------------------------------------------------------------
# 3. Damaged checkpoints
# ------------------------------------------------------------------------------------------------


class Corruption(Case):
    VICTIM_LEN = 8192
    FLIP_AT = 1000  # byte of the victim's payload to flip

    def _state_dict(self):
        g = torch.Generator().manual_seed(77)
        return {
            "victim": torch.randint(0, 256, (self.VICTIM_LEN,), generator=g, dtype=torch.uint8),
            "other": torch.randn(64, 32, generator=g),
            "count": 11,
            "blob": b"payload bytes",
        }

    def _registered(self, sd):
        st = libdcp.State()
        dst = {}
        for k, v in sd.items():
            if torch.is_tensor(v):
                dst[k] = libdcp.poison(torch.empty(v.shape, dtype=v.dtype))
                st.add_tensor(k, dst[k])
            else:
                register_placeholder(st, k, v)
        return st, dst

    def _libdcp_load(self, d, sd, verify=True):
        st, dst = self._registered(sd)
        libdcp.load(self.ctx, st, d, verify=verify)
        return st, dst

    def _save_libdcp(self, d, sd):
        st = libdcp.State()
        for k, v in sd.items():
            if torch.is_tensor(v):
                st.add_tensor(k, v)
            else:
                register_value(st, k, v)
        libdcp.save(self.ctx, st, d)

    def _save_torch(self, d, sd):
        dcp.save(sd, storage_writer=FileSystemWriter(d))

    def _copy(self, pristine, name):
        d = os.path.join(self.dir, name)
        shutil.copytree(pristine, d)
        return d

    def _run(self, writer):
        sd = self._state_dict()
        pristine = self.sub("pristine")
        writer(pristine, sd)
        st, dst = self._libdcp_load(pristine, sd)  # the undamaged checkpoint loads, every key exact
        for k, v in sd.items():
            if torch.is_tensor(v):
                self.assertTensorEqual(dst[k], v, k)
            else:
                self.assertValue(st, k, v)
        needle = sd["victim"].numpy().tobytes()[:64]

        # Flipped payload byte: libdcp fails with CHECKSUM naming the key and the file.
        d = self._copy(pristine, "flipped")
        path, at = find_in_files(d, needle)
        xor_byte(path, at + self.FLIP_AT)
        e = self.assertDcpError(ST_CHECKSUM, self._libdcp_load, d, sd)
        self.assertIn("victim", e.message)
        self.assertIn(os.path.basename(path), e.message)
        self.assertDcpError(ST_CHECKSUM, libdcp.Checkpoint(d).read_tensor, "victim", sd["victim"])
        # verify=False: the option works; the flipped byte comes through.
        _, dst = self._libdcp_load(d, sd, verify=False)
        diff = (dst["victim"] != sd["victim"]).nonzero().flatten().tolist()
        self.assertEqual(diff, [self.FLIP_AT])
        # The gap libdcp closes: torch's own loader does not check the zip CRC-32 and silently
        # returns the flipped byte.
        target = {k: (zeros_like_contig(v) if torch.is_tensor(v) else None) for k, v in sd.items()}
        dcp.load(target, storage_reader=FileSystemReader(d))
        self.assertFalse(torch.equal(target["victim"], sd["victim"]))

        # Truncated data file: CORRUPT, never a successful load.
        d = self._copy(pristine, "truncated")
        path, at = find_in_files(d, needle)
        os.truncate(path, at + self.VICTIM_LEN // 2)
        e = self.assertDcpError(ST_CORRUPT, self._libdcp_load, d, sd)
        self.assertIn(os.path.basename(path), e.message)

        # Garbled .metadata (16 bytes in its middle inverted): an error.
        d = self._copy(pristine, "garbled")
        md = os.path.join(d, ".metadata")
        n = os.path.getsize(md)
        for i in range(n // 2 - 8, n // 2 + 8):
            xor_byte(md, i, 0xFF)
        e = self.assertDcpError(None, self._libdcp_load, d, sd)
        self.assertNotEqual(e.message, "")

        # Deleted .metadata: NOT_FOUND, "not a committed checkpoint".
        d = self._copy(pristine, "nometa")
        os.remove(os.path.join(d, ".metadata"))
        e = self.assertDcpError(ST_NOT_FOUND, self._libdcp_load, d, sd)
        self.assertTrue("not a committed checkpoint" in e.message or "no checkpoint" in e.message, e.message)
        self.assertDcpError(ST_NOT_FOUND, libdcp.Checkpoint, d)

    def test_libdcp_written(self):
        self._run(self._save_libdcp)

    def test_torch_written(self):
        self._run(self._save_torch)


# ------------------------------------------------------------------------------------------------
# 4. zip64
# ------------------------------------------------------------------------------------------------


class Zip64(Case):
    def test_torch_4gib_tensor(self):
        n = 4 * 2**30 + 4096
        free = shutil.disk_usage(self.dir).free
        if free < 10 * 2**30:
            self.skipTest(f"needs 10 GiB free disk, {free / 2**30:.1f} GiB free")
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            avail = None
        if avail is not None and avail < 6 * 2**30:
            self.skipTest(f"needs 6 GiB free memory, {avail / 2**30:.1f} GiB free")
        head = (torch.arange(4096, dtype=torch.int64) * 7 % 251).to(torch.uint8)
        tail = (torch.arange(4096, dtype=torch.int64) * 13 % 253 + 1).to(torch.uint8)
        # A few bytes in the middle, two just below the 4 GiB element boundary (the tail starts at 2**32).
        mid = {2**31: 0xAB, 2**32 - 2: 0xCD, 2**32 - 1: 0xEF}
        t = torch.empty(n, dtype=torch.uint8)
        t[:4096] = head
        t[-4096:] = tail
        for i, b in mid.items():
            t[i] = b
        d = self.sub("big")
        dcp.save({"big": t}, storage_writer=FileSystemWriter(d, thread_count=1))
        del t
        gc.collect()
        self.assertGreater(sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)), n)

        ck = libdcp.Checkpoint(d)
        self.assertEqual(ck.keys()["big"], (KEY_TENSOR, DTYPES[torch.uint8], [n], 1))
        # Each read verifies the whole 4 GiB record's CRC-32 (torch's zip has no finer checksums).
        got = ck.read_tensor("big", torch.empty(4096, dtype=torch.uint8), offsets=[n - 4096])
        self.assertTrue(torch.equal(got, tail))
        got = ck.read_tensor("big", torch.empty(4096, dtype=torch.uint8), offsets=[0])
        self.assertTrue(torch.equal(got, head))
        # A box straddling the 4 GiB boundary.
        got = ck.read_tensor("big", torch.empty(4, dtype=torch.uint8), offsets=[2**32 - 2])
        self.assertEqual(got.tolist(), [0xCD, 0xEF] + tail[:2].tolist())
        got = ck.read_tensor("big", torch.empty(1, dtype=torch.uint8), offsets=[2**31])
        self.assertEqual(got.tolist(), [0xAB])
        del ck

        # The box reads above did verify the whole record: a byte flipped 3 GiB into the payload,
        # far from the box, fails a read of the last 4 KiB with CHECKSUM.
        path, at = find_in_files(d, head[:64].numpy().tobytes(), limit=1 << 20)
        xor_byte(path, at + 3 * 2**30 + 5)
        ck = libdcp.Checkpoint(d)
        e = self.assertDcpError(ST_CHECKSUM, ck.read_tensor, "big", torch.empty(4096, dtype=torch.uint8), offsets=[n - 4096])
        self.assertIn("big", e.message)
        del ck
        gc.collect()


if __name__ == "__main__":
    unittest.main()
