"""The C++ / LibTorch layer (include/dcp_torch.hpp, include/dcp_c10d.hpp) against itself and against
Python torch, through examples/libtorch_train.cpp.

Run:  .venv/bin/python tests/python/test_libtorch.py -v
      (after scripts/cpp-tests.sh has built build/cpp/libtorch_train; LIBTORCH_TRAIN overrides it)

1. CppResume: the C++ example saves asynchronously at step K and a second process resumes with
   losses bit-identical to the uninterrupted run: one process; 4 gloo ranks saving sharded
   (FSDP-style) files resumed by 1, 2 and 4 ranks; 2 ranks (libdcp over the gloo c10d::Backend
   rather than a ProcessGroup) resumed by 4; every optimizer.
2. KeySets: for Adam, AdamW, Adam(amsgrad), SGD (momentum, nesterov) and plain SGD, before and
   after training, the C++ checkpoint holds exactly the keys, nesting (planner_data), dtypes and
   shapes of Python's get_state_dict(model, optim) for the same module and optimizer, and
   Python loads it with dcp.load + set_state_dict.
3. CrossLanguage: training continues across languages (also from a Python checkpoint in which
   one layer has no optimizer state yet, and into 2 C++ ranks).
   - SGD: LibTorch's and Python's updates are the same op sequence: bit-exact both ways.
   - Adam: Python's torch.optim.Adam updates exp_avg with lerp_ while LibTorch's Adam uses
     mul_().add_(), so the two differ by rounding (a few ulps after a few steps). The test is
     bit-exact against LibTorch's update written op for op in Python (libtorch_adam_step below),
     which proves every tensor and scalar crossed exactly, and within rtol 1e-5 against
     torch.optim.Adam itself.
The training step is the example's: 4 micro-batches of 8 rows, gradients summed in micro-batch
order and scaled by 1/4 (so that every world size does the same arithmetic), one intra-op thread.
"""
import math
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.distributed.checkpoint import FileSystemReader  # noqa: E402
from torch.distributed.checkpoint._nested_dict import flatten_state_dict  # noqa: E402
from torch.distributed.checkpoint.metadata import TensorStorageMetadata  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: E402

import libdcp as L  # noqa: E402

BIN = os.environ.get("LIBTORCH_TRAIN") or os.path.join(ROOT, "build", "cpp", "libtorch_train")
STEPS, SAVE_AT = 12, 5

torch.set_num_threads(1)


class Net(nn.Module):
    """The example's MLP, under the same names."""

    def __init__(self):
        super().__init__()
        self.net1 = nn.Linear(8, 16)
        self.net2 = nn.Linear(16, 32)
        self.net3 = nn.Linear(32, 64)
        self.net4 = nn.Linear(64, 8)

    def forward(self, x):
        x = F.relu(self.net1(x))
        x = F.relu(self.net2(x))
        x = F.relu(self.net3(x))
        return self.net4(x)


# The example's optimizers (examples/libtorch_train.cpp, make_optimizer), in Python.
OPTIMS = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
    "amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, weight_decay=0.01),
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "sgd0": lambda p: torch.optim.SGD(p, lr=0.05),
}


def batch(i):
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(32, 8, generator=g), torch.randn(32, 8, generator=g)


def train_step(model, optim, i, update=None):
    """The example's step: 4 micro-batches, gradients summed in order, then the update."""
    x, y = batch(i)
    params = list(model.parameters())
    flats = []
    for m in range(4):
        optim.zero_grad()
        loss = F.mse_loss(model(x.narrow(0, m * 8, 8)), y.narrow(0, m * 8, 8))
        loss.backward()
        flats.append(torch.cat([p.grad.reshape(-1) for p in params] + [loss.detach().reshape(1)]))
    allg = torch.stack(flats)
    with torch.no_grad():
        s = allg[0].clone()
        for m in range(1, 4):
            s.add_(allg[m])
        s.mul_(1.0 / 4)
        off = 0
        for p in params:
            p.grad = s.narrow(0, off, p.numel()).view_as(p).clone()
            off += p.numel()
    (update or (lambda o: o.step()))(optim)
    return s[off].item()


@torch.no_grad()
def libtorch_adam_step(optim):
    """torch::optim::Adam::step (torch/csrc/api/src/optim/adam.cpp), op for op, on a Python
    torch.optim.Adam's state (step as a float tensor, as Python keeps it)."""
    for group in optim.param_groups:
        b1, b2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            st = optim.state[p]
            if not st:  # LibTorch's lazy initialisation
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            step = int(st["step"].item()) + 1
            st["step"].fill_(step)
            bc1 = 1 - b1 ** step
            bc2 = 1 - b2 ** step
            grad = p.grad
            if wd != 0:
                grad = grad.add(p, alpha=wd)
            st["exp_avg"].mul_(b1).add_(grad, alpha=1 - b1)
            st["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
            denom = (st["exp_avg_sq"].sqrt() / math.sqrt(bc2)).add_(eps)
            p.addcdiv_(st["exp_avg"], denom, value=-(lr / bc1))


def parse_losses(text):
    """{step: loss} from the example's "step I loss HEX" lines."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] == "step" and parts[2] == "loss":
            out[int(parts[1])] = float.fromhex(parts[3])
    return out


def run_cpp(*args, world=1, timeout=240):
    """Runs the example on `world` ranks (gloo over a FileStore); returns rank 0's {step: loss}."""
    args = [str(a) for a in args]
    if world == 1:
        r = subprocess.run([BIN, *args], capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise AssertionError(f"libtorch_train {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return parse_losses(r.stdout)
    tmp = tempfile.mkdtemp(prefix="libdcp-store-")
    store = os.path.join(tmp, "store")
    procs = [subprocess.Popen([BIN, *args, "--rank", str(r), "--world", str(world), "--store", store],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    bad = [(r, p.returncode, o[1]) for r, (p, o) in enumerate(zip(procs, outs)) if p.returncode != 0]
    if bad:
        raise AssertionError(f"libtorch_train {' '.join(args)} on {world} ranks failed: {bad}")
    return parse_losses(outs[0][0])


def hexes(losses, steps):
    return [float(losses[i]).hex() for i in steps]


@unittest.skipUnless(os.path.exists(BIN), f"{BIN} is not built (scripts/cpp-tests.sh builds it)")
class Case(unittest.TestCase):
    def setUp(self):
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        self.dir = tempfile.mkdtemp(prefix="libdcp-libtorch-")

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def sub(self, name):
        return os.path.join(self.dir, name)


class CppResume(Case):
    def test_one_process(self):
        full = run_cpp("--steps", STEPS, "--save-at", SAVE_AT, "--save", self.sub("ck"))
        self.assertEqual(sorted(full), list(range(STEPS)))
        resumed = run_cpp("--steps", STEPS, "--resume", self.sub("ck"))
        self.assertEqual(sorted(resumed), list(range(SAVE_AT, STEPS)))
        self.assertEqual(hexes(resumed, range(SAVE_AT, STEPS)), hexes(full, range(SAVE_AT, STEPS)))

    def test_series_resumes_in_one_call(self):
        # Killed after step 8 of 12 (a run of 8 steps): every 3 steps a save, the last 2 kept;
        # the rerun resumes from step 6 and reproduces the uninterrupted run's losses exactly.
        root = self.sub("series")
        full = run_cpp("--steps", STEPS)
        first = run_cpp("--steps", 8, "--series", root, "--every", 3)
        self.assertEqual(hexes(first, range(8)), hexes(full, range(8)))
        self.assertEqual(sorted(d for d in os.listdir(root) if d.startswith("step-")), ["step-00000003", "step-00000006"])
        resumed = run_cpp("--steps", STEPS, "--series", root, "--every", 3)
        self.assertEqual(sorted(resumed), list(range(6, STEPS)))
        self.assertEqual(hexes(resumed, range(6, STEPS)), hexes(full, range(6, STEPS)))
        # torch loads a step of the series as it is.
        meta = FileSystemReader(os.path.join(root, "step-00000012")).read_metadata()
        self.assertIn("model.net1.weight", meta.state_dict_metadata)

    def test_world_sizes(self):
        ref = run_cpp("--steps", STEPS)
        # 4 ranks save sharded files; their run is the same arithmetic as one process's.
        w4 = run_cpp("--steps", STEPS, "--save-at", SAVE_AT, "--save", self.sub("w4"), world=4)
        self.assertEqual(hexes(w4, range(STEPS)), hexes(ref, range(STEPS)))
        meta = FileSystemReader(self.sub("w4")).read_metadata()
        w = meta.state_dict_metadata["model.net3.weight"]
        self.assertEqual(sorted(tuple(c.offsets) for c in w.chunks), [(0, 0), (16, 0), (32, 0), (48, 0)])
        self.assertEqual(len(meta.state_dict_metadata["optimizer.state.net1.weight.exp_avg"].chunks), 4)
        self.assertEqual(len(meta.state_dict_metadata["optimizer.state.net1.weight.step"].chunks), 1)
        files = sorted(f for f in os.listdir(self.sub("w4")) if f.endswith(".distcp"))
        self.assertEqual([f.rsplit("_", 1)[0] for f in files], [f"__{r}_0" for r in range(4)])
        self.assertEqual(len({f.rsplit("_", 1)[1] for f in files}), 1, files)  # one save, one token
        for world in (1, 2, 4):
            with self.subTest(saved=4, resumed=world):
                got = run_cpp("--steps", STEPS, "--resume", self.sub("w4"), world=world)
                self.assertEqual(hexes(got, range(SAVE_AT, STEPS)), hexes(ref, range(SAVE_AT, STEPS)))
        # libdcp over the gloo c10d::Backend itself rather than a c10d::ProcessGroup.
        w2 = run_cpp("--steps", STEPS, "--save-at", 8, "--save", self.sub("w2"), "--dcp-group", "backend", world=2)
        self.assertEqual(hexes(w2, range(STEPS)), hexes(ref, range(STEPS)))
        got = run_cpp("--steps", STEPS, "--resume", self.sub("w2"), world=4)
        self.assertEqual(hexes(got, range(8, STEPS)), hexes(ref, range(8, STEPS)))

    def test_every_optimizer(self):
        for name in OPTIMS:
            with self.subTest(optim=name):
                full = run_cpp("--steps", 8, "--optim", name, "--save-at", 3, "--save", self.sub(name))
                got = run_cpp("--steps", 8, "--optim", name, "--resume", self.sub(name))
                self.assertEqual(hexes(got, range(3, 8)), hexes(full, range(3, 8)))


def python_keys(optim_name, steps):
    """Python's flattened get_state_dict keys -> (path, tensor meta or value) for the example's
    module and optimizer after `steps` training steps."""
    torch.manual_seed(0)
    model = Net()
    optim = OPTIMS[optim_name](model.parameters())
    for i in range(steps):
        train_step(model, optim, i)
    msd, osd = get_state_dict(model, optim)
    flat, mapping = flatten_state_dict({"model": msd, "optimizer": osd})
    return flat, mapping


class KeySets(Case):
    def test_keys_match_get_state_dict(self):
        for name in OPTIMS:
            for steps in (0, 2):
                with self.subTest(optim=name, steps=steps):
                    d = self.sub(f"{name}-{steps}")
                    run_cpp("--steps", steps, "--optim", name, "--save-at", steps, "--save", d)
                    flat, mapping = python_keys(name, steps)
                    meta = FileSystemReader(d).read_metadata()
                    saved = dict(meta.state_dict_metadata)
                    self.assertIn("train.step", saved)
                    del saved["train.step"]
                    self.assertEqual(sorted(saved), sorted(flat))
                    for k, v in flat.items():
                        self.assertEqual(tuple(meta.planner_data[k]), tuple(mapping[k]), k)
                        if torch.is_tensor(v):
                            md = saved[k]
                            self.assertIsInstance(md, TensorStorageMetadata, k)
                            self.assertEqual(md.properties.dtype, v.dtype, k)
                            self.assertEqual(tuple(md.size), tuple(v.shape), k)

                    # Python loads it into a fresh module and optimizer, with other hyper-parameters.
                    torch.manual_seed(1)
                    model = Net()
                    optim = OPTIMS[name](model.parameters())
                    for g in optim.param_groups:
                        g["lr"] = 0.5
                    msd, osd = get_state_dict(model, optim)
                    sd = {"model": msd, "optimizer": osd}
                    dcp.load(sd, storage_reader=FileSystemReader(d))
                    set_state_dict(model, optim, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
                    want = OPTIMS[name](Net().parameters()).param_groups[0]
                    got = optim.param_groups[0]
                    for hp in want:
                        if hp != "params":
                            self.assertEqual(got[hp], want[hp], hp)
                    if name.startswith("adam") or name == "amsgrad":
                        steps_loaded = {float(s["step"]) for s in optim.state.values()}
                        self.assertEqual(steps_loaded, {float(steps)})
                        self.assertTrue(all(s["step"].dtype == torch.float32 for s in optim.state.values()))
                    # Every tensor Python now holds (parameters, exp_avg, exp_avg_sq, max_exp_avg_sq,
                    # momentum buffers, steps) has the bytes the C++ program saved, read with libdcp.
                    got, _ = flatten_state_dict(dict(zip(("model", "optimizer"), get_state_dict(model, optim))))
                    ck = L.Checkpoint(d)
                    tensor_keys = {k for k, md in saved.items() if isinstance(md, TensorStorageMetadata)}
                    self.assertEqual({k for k, v in got.items() if torch.is_tensor(v)}, tensor_keys)
                    for k in tensor_keys:
                        v = got[k].detach().contiguous()
                        want = ck.read_tensor(k, v)
                        self.assertTrue(torch.equal(v.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), k)


class CrossLanguage(Case):
    def _python_resume(self, ckpt, optim_name, update, start, stop):
        """A fresh Python module + optimizer loaded from `ckpt` trains steps start..stop-1."""
        torch.manual_seed(123)
        model = Net()
        optim = OPTIMS[optim_name](model.parameters())
        for g in optim.param_groups:
            g["lr"] = 0.5  # overwritten by the load
        msd, osd = get_state_dict(model, optim)
        sd = {"model": msd, "optimizer": osd, "train": {"step": -1}}
        dcp.load(sd, storage_reader=FileSystemReader(ckpt))
        set_state_dict(model, optim, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
        self.assertEqual(sd["train"]["step"], start)
        self.assertNotEqual(optim.param_groups[0]["lr"], 0.5)
        return {i: train_step(model, optim, i, update) for i in range(start, stop)}

    def test_cpp_to_python(self):
        for name, exact_update in (("sgd", None), ("adam", libtorch_adam_step)):
            with self.subTest(optim=name):
                d = self.sub(f"cpp-{name}")
                full = run_cpp("--steps", STEPS, "--optim", name, "--save-at", SAVE_AT, "--save", d)
                exact = self._python_resume(d, name, exact_update, SAVE_AT, STEPS)
                self.assertEqual(hexes(exact, range(SAVE_AT, STEPS)), hexes(full, range(SAVE_AT, STEPS)))
                if name == "adam":
                    # torch.optim.Adam itself: lerp_ instead of mul_().add_(), rounding apart.
                    real = self._python_resume(d, name, None, SAVE_AT, STEPS)
                    for i in range(SAVE_AT, STEPS):
                        self.assertTrue(math.isclose(real[i], full[i], rel_tol=1e-5), f"step {i}: {real[i]} vs {full[i]}")

    def _python_checkpoint(self, optim_name, d, steps):
        torch.manual_seed(7)
        model = Net()
        optim = OPTIMS[optim_name](model.parameters())
        for i in range(steps):
            train_step(model, optim, i)
        msd, osd = get_state_dict(model, optim)
        dcp.save({"model": msd, "optimizer": osd, "train": {"step": steps}}, checkpoint_id=d)
        return model, optim

    def test_python_to_cpp(self):
        k = 4
        for name, exact_update in (("sgd", None), ("adam", libtorch_adam_step)):
            with self.subTest(optim=name):
                d = self.sub(f"py-{name}")
                self._python_checkpoint(name, d, k)
                cpp = run_cpp("--steps", STEPS, "--optim", name, "--resume", d)
                self.assertEqual(sorted(cpp), list(range(k, STEPS)))
                model, optim = self._python_checkpoint(name, self.sub(f"py-{name}-again"), k)
                want = {i: train_step(model, optim, i, exact_update) for i in range(k, STEPS)}
                self.assertEqual(hexes(cpp, range(k, STEPS)), hexes(want, range(k, STEPS)))
                if name == "adam":
                    model, optim = self._python_checkpoint(name, self.sub(f"py-{name}-real"), k)
                    real = {i: train_step(model, optim, i) for i in range(k, STEPS)}
                    for i in range(k, STEPS):
                        self.assertTrue(math.isclose(real[i], cpp[i], rel_tol=1e-5), f"step {i}: {real[i]} vs {cpp[i]}")

    def test_parameter_without_state(self):
        """Python never stepped net4 (no optimizer state for it): the C++ strict load accepts
        that, leaves net4 without state (LibTorch creates it at the next step) and trains on
        exactly as LibTorch's update does in Python."""
        d = self.sub("py-partial-state")

        def make():
            torch.manual_seed(11)
            model = Net()
            optim = OPTIMS["adam"](model.parameters())

            def skip_net4(o):
                model.net4.weight.grad = None
                model.net4.bias.grad = None
                o.step()

            train_step(model, optim, 0, skip_net4)
            return model, optim

        model, optim = make()
        msd, osd = get_state_dict(model, optim)
        flat, _ = flatten_state_dict({"optimizer": osd})
        self.assertFalse(any(k.startswith("optimizer.state.net4.") for k in flat))
        self.assertIn("optimizer.state.net3.weight.exp_avg", flat)
        dcp.save({"model": msd, "optimizer": osd, "train": {"step": 1}}, checkpoint_id=d)
        cpp = run_cpp("--steps", 8, "--resume", d)
        model, optim = make()
        want = {i: train_step(model, optim, i, libtorch_adam_step) for i in range(1, 8)}
        self.assertEqual(hexes(cpp, range(1, 8)), hexes(want, range(1, 8)))

    def test_python_to_cpp_sharded(self):
        """A Python checkpoint resumed by 2 C++ ranks over gloo (each loads whole tensors)."""
        d = self.sub("py-adam-2")
        self._python_checkpoint("adam", d, 3)
        one = run_cpp("--steps", 8, "--resume", d)
        two = run_cpp("--steps", 8, "--resume", d, world=2)
        self.assertEqual(hexes(two, range(3, 8)), hexes(one, range(3, 8)))
        # Against an independent reader: Python resumed from the same checkpoint through torch's
        # dcp.load, with LibTorch's Adam update.
        want = self._python_resume(d, "adam", libtorch_adam_step, 3, 8)
        self.assertEqual(hexes(two, range(3, 8)), hexes(want, range(3, 8)))


if __name__ == "__main__":
    unittest.main()
