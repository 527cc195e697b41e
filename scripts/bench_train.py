"""Training-loop checkpoint benchmark: what each way of checkpointing costs a training step.

    LIBDCP_SO=target/release/libdcp.so python3 scripts/bench_train.py [--device cuda|cpu] [--steps 300] [--every 60]

The model: --layers x nn.Linear(width, width) with ReLU between, fp32 parameters, bf16 autocast
on CUDA, Adam (fused on CUDA), loss = output.float().pow(2).mean(). Every --every steps the
state (model parameters and Adam's exp_avg, exp_avg_sq and step) is saved to a fresh directory;
the previous one is deleted once the next save has completed. Each variant (one table row) runs
--warmup steps and one untimed first save, then --steps timed steps, each between two
synchronizations of the training stream. One markdown table is printed; docs/training-loop-benchmark.md explains the
columns. The libdcp binding is tests/python/libdcp.py, unless PYTHONPATH names a directory
holding another libdcp.py (it is searched first).
"""
import argparse
import datetime
import inspect
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.join(HERE, "..", "tests", "python"))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch import nn  # noqa: E402

import libdcp as L  # noqa: E402

sys.path.insert(0, HERE)
import bench  # noqa: E402  (scripts/bench.py: its PeakRss)

GIB = 1 << 30

VARIANTS = {
    "none": "none",
    "libdcp-host": "libdcp host staging",
    "libdcp-stream": "libdcp stream-ordered",
    "libdcp-snapshot": "libdcp device snapshot",
    "torch-cached": "torch async_save (cached staging)",
    "torch-async-staging": "torch DefaultStager async staging",
    "torch-process": "torch process-based async",
}

# What the stream-ordered and device-snapshot saves need from libdcp.so and from the binding.
STREAM_SYMBOLS = ["dcp_save_options_set_stream_ordered", "dcp_future_stream_wait", "dcp_future_staging_report"]
SNAPSHOT_SYMBOLS = STREAM_SYMBOLS + ["dcp_save_options_set_device_snapshot"]


class PeakRss(bench.PeakRss):
    """bench.py's sampler of this process's peak resident memory; `discount(n)` leaves n bytes
    the benchmark itself allocates out of it."""

    def discount(self, nbytes):
        self.base += nbytes


class DeviceMem:
    """Device memory a checkpoint takes beyond training's own: torch's peak allocation over the
    peak that training steps alone reach, plus memory allocated outside torch (through the CUDA
    driver, as libdcp's snapshot buffers are): used memory (total - free) less torch's reserved
    memory, sampled after each step and around each save."""

    def __init__(self, device, training_peak):
        self.cuda = device == "cuda"
        if not self.cuda:
            return
        self.training_peak = training_peak
        torch.cuda.reset_peak_memory_stats()
        self.outside0 = self._outside_torch()
        self.outside_peak = 0

    @staticmethod
    def _outside_torch():
        free, total = torch.cuda.mem_get_info()
        return total - free - torch.cuda.memory_reserved()

    def sample(self):
        if self.cuda:
            self.outside_peak = max(self.outside_peak, self._outside_torch() - self.outside0)

    def peak_increase(self):
        if not self.cuda:
            return None
        return max(0, torch.cuda.max_memory_allocated() - self.training_peak) + self.outside_peak


def sync(device):
    """Waits for the training stream. Not the whole device: torch.cuda.synchronize() would also
    wait for the copies libdcp and torch run on their own streams in the background, which a
    training loop never waits for (its loss.item() waits for its own stream only)."""
    if device == "cuda":
        torch.cuda.current_stream().synchronize()


def current_stream(device):
    return torch.cuda.current_stream().cuda_stream if device == "cuda" else 0


def remove_in_background(path):
    threading.Thread(target=shutil.rmtree, args=(path,), kwargs={"ignore_errors": True}, daemon=True).start()


class CheckpointDirs:
    """Fresh directories for one variant's saves; a save's predecessors are deleted (in the
    background, off the timed steps) once it has completed."""

    def __init__(self, root):
        self.root = root
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root)
        self.kept = []

    def fresh(self, name):
        return os.path.join(self.root, name)

    def completed(self, path):
        for old in self.kept:
            if old != path:
                remove_in_background(old)
        self.kept = [path]

    def remove_all(self):
        shutil.rmtree(self.root, ignore_errors=True)


class Trainer:
    def __init__(self, args):
        self.device = args.device
        torch.manual_seed(0)
        layers = []
        for i in range(args.layers):
            layers.append(nn.Linear(args.width, args.width))
            if i + 1 < args.layers:
                layers.append(nn.ReLU())
        self.model = nn.Sequential(*layers).to(args.device)
        cuda = args.device == "cuda"
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-5, fused=True if cuda else None)
        self.x = torch.randn(args.batch, args.width, device=args.device)
        self.param_names = [n for n, _ in self.model.named_parameters()]

    def forward_backward(self):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device == "cuda"):
            out = self.model(self.x)
        out.float().pow(2).mean().backward()

    def optimizer_step(self):
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def state(self):
        """The live tensors (no copies), flattened: model.<name>, optim.state.<name>.<key>."""
        out = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        for idx, per_param in self.opt.state_dict()["state"].items():
            for key, v in per_param.items():
                if torch.is_tensor(v):
                    out[f"optim.state.{self.param_names[idx]}.{key}"] = v
        return out


def state_bytes(state):
    return sum(t.numel() * t.element_size() for t in state.values())


def cpu_copy(state):
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


# ---- savers: one class per kind of checkpointing; the step loop calls save(), then
# before_optimizer_step() in every step, in_flight() at the start of a step, finish() at the end.


class NoSaver:
    note = ""
    checks = False
    waits_ms = ()

    def save(self, state, path):
        raise AssertionError("the baseline never saves")

    def before_optimizer_step(self):
        pass

    def in_flight(self):
        return False

    def finish(self):
        pass

    def close(self):
        pass


class LibdcpSaver:
    """libdcp save_async on a standalone context; mode is host, stream or snapshot."""

    checks = True

    def __init__(self, mode, device, dirs, snapshot_bytes):
        self.mode, self.device, self.dirs = mode, device, dirs
        self.kwargs = {}
        if mode in ("stream", "snapshot"):
            self.kwargs["stream_ordered"] = True
        if mode == "snapshot":
            self.kwargs["device_snapshot_bytes"] = snapshot_bytes
        self.ctx = L.Context()
        self.future = self.path = self.registered = None
        self.needs_stream_wait = False
        self.staging_report = None
        self.note = ""
        self.waits_ms = []

    def save(self, state, path):
        t0 = time.perf_counter()
        self._wait_previous()
        self.waits_ms.append((time.perf_counter() - t0) * 1e3)
        registered = L.State()
        for k, v in state.items():
            registered.add_tensor_any(k, v)
        self.future = L.save_async(self.ctx, registered, path, overwrite=True, **self.kwargs)
        self.path, self.registered = path, registered
        self.needs_stream_wait = self.mode != "host"

    def before_optimizer_step(self):
        # Stream-ordered copies read the live tensors: the optimizer's kernels must queue after them.
        if self.needs_stream_wait:
            self.future.stream_wait(current_stream(self.device))
            self.needs_stream_wait = False

    def in_flight(self):
        return self.future is not None and not self.future.done()

    def _wait_previous(self):
        if self.future is None:
            return
        self.future.wait()
        if self.mode != "host":
            self.staging_report = self.future.staging()
        self.dirs.completed(self.path)
        self.future = self.registered = None

    def finish(self):
        self._wait_previous()

    def check(self, path, expected):
        """Loads `path` into poisoned CPU buffers: 'bit-exact' if every byte is `expected`'s."""
        registered = L.State()
        loaded = {}
        for k, v in expected.items():
            loaded[k] = L.poison(torch.empty_like(v))
            registered.add_tensor(k, loaded[k])
        L.load(self.ctx, registered, path)
        same = all(torch.equal(L.raw_bytes(loaded[k]), L.raw_bytes(v)) for k, v in expected.items())
        return "bit-exact" if same else "MISMATCH"

    def close(self):
        self.ctx = None


def missing_libdcp_features(mode):
    """What this libdcp.so or binding lacks for `mode` (names), empty when it has everything."""
    symbols = {"host": [], "stream": STREAM_SYMBOLS, "snapshot": SNAPSHOT_SYMBOLS}[mode]
    missing = [s for s in symbols if not hasattr(L.lib(), s)]
    params = inspect.signature(L.save_async).parameters
    for p in {"host": [], "stream": ["stream_ordered"], "snapshot": ["stream_ordered", "device_snapshot_bytes"]}[mode]:
        if p not in params:
            missing.append(f"binding argument {p}")
    return missing


def torch_has_async_stager():
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions  # noqa: F401
    except ImportError:
        return False
    return "async_stager" in inspect.signature(dcp.async_save).parameters


def stager_drops_its_cache():
    """True where DefaultStager._stage closes its StateDictStager after every stage (torch 2.11):
    that drops the cached staging buffers and clears its deepcopy dispatch table, so a second
    stage() on the same stager raises KeyError: <class 'type'>. Later torch closes only stagers
    async_save created itself."""
    from torch.distributed.checkpoint.staging import DefaultStager

    try:
        return "_state_dict_stager.close()" in inspect.getsource(DefaultStager._stage)
    except (OSError, TypeError):
        return False


class TorchSaver:
    """torch.distributed.checkpoint.async_save with a DefaultStager: one kept for the whole run
    (its staging buffers are cached by storage and reused by every save), or a fresh one per
    save where torch cannot reuse one."""

    checks = False

    def __init__(self, kind, device, dirs):
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        self.dirs = dirs
        self.waits_ms = []
        process = kind == "process"
        self.checkpointer = AsyncCheckpointerType.PROCESS if process else AsyncCheckpointerType.THREAD
        self.options = self.stager = self.previous_stager = None
        self.fresh_stager_per_save = False
        if not torch_has_async_stager():
            self.note = f"torch {torch.__version__} has no async_stager: plain async_save (staging not cached)"
        else:
            from torch.distributed.checkpoint.staging import StagingOptions

            cuda = device == "cuda"
            self.options = StagingOptions(
                use_pinned_memory=cuda,  # pinning needs CUDA
                use_shared_memory=process,  # the checkpoint process maps the staged tensors
                use_async_staging=kind == "async-staging",
                use_non_blocking_copy=cuda,  # needs an accelerator
            )
            self.fresh_stager_per_save = stager_drops_its_cache()
            o = self.options
            self.note = (f"DefaultStager(pinned={o.use_pinned_memory}, shared={o.use_shared_memory}, "
                         f"async_staging={o.use_async_staging}, non_blocking={o.use_non_blocking_copy})")
            if self.fresh_stager_per_save:
                self.note += (f"; torch {torch.__version__}'s DefaultStager drops its cache after each stage "
                              "(reused, it raises KeyError: <class 'type'>): a fresh stager per save, staging not cached")
        self.upload = self.staging = self.path = None

    def _stager_for_this_save(self):
        from torch.distributed.checkpoint.staging import DefaultStager

        if self.stager is None or self.fresh_stager_per_save:
            self.previous_stager, self.stager = self.stager, DefaultStager(self.options)
        return self.stager

    def save(self, state, path):
        t0 = time.perf_counter()
        self._wait_previous()
        self.waits_ms.append((time.perf_counter() - t0) * 1e3)
        kwargs = {"async_checkpointer_type": self.checkpointer}
        if self.options is not None:
            kwargs["async_stager"] = self._stager_for_this_save()
        response = dcp.async_save(state, checkpoint_id=path, **kwargs)
        if hasattr(response, "upload_completion"):  # AsyncSaveResponse: staging runs in the background
            self.staging, self.upload = response.staging_completion, response.upload_completion
        else:
            self.upload = response
        self.path = path

    def before_optimizer_step(self):
        if self.staging is not None:
            self.staging.result()
            self.staging = None

    def in_flight(self):
        return self.upload is not None and not self.upload.done()

    def _wait_previous(self):
        if self.upload is None:
            return
        self.upload.result()
        self.dirs.completed(self.path)
        self.upload = None
        if self.previous_stager is not None:  # its save has completed
            self.previous_stager.close()
            self.previous_stager = None

    def finish(self):
        self.before_optimizer_step()
        self._wait_previous()

    def close(self):
        for stager in (self.previous_stager, self.stager):
            if stager is not None:
                stager.close()


def make_saver(key, args, dirs, snapshot_bytes):
    if key == "none":
        return NoSaver()
    if key.startswith("libdcp-"):
        return LibdcpSaver(key.removeprefix("libdcp-"), args.device, dirs, snapshot_bytes)
    return TorchSaver(key.removeprefix("torch-"), args.device, dirs)


# ---- the training loop


class StepTimer:
    """Wall time of one step in ms, the training stream synchronized at both ends so that steps
    are measured one by one (the synchronization is there for the measurement)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *a):
        sync(self.device)
        self.ms = (time.perf_counter() - self.t0) * 1e3


NO_SAMPLES = DeviceMem("cpu", 0)


def train_step(trainer, saver, state_to_save=None, path=None, mem=NO_SAMPLES):
    with StepTimer(trainer.device) as t:
        if state_to_save is not None:
            saver.save(state_to_save, path)
            mem.sample()
        trainer.forward_backward()
        saver.before_optimizer_step()
        mem.sample()
        trainer.optimizer_step()
    mem.sample()
    return t.ms


def warm_up(trainer, args):
    """Warmup steps (the first creates Adam's state); returns their median and training's peak
    device allocation."""
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [train_step(trainer, NoSaver()) for _ in range(args.warmup)]
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else 0
    return statistics.median(times), peak


class Result:
    def __init__(self, key):
        self.key = key
        self.steps = []  # (ms, kind): kind is save, background (a save in flight) or plain
        self.first_save_ms = None
        self.rss = self.device_mem = None
        self.note = ""
        self.failed = None
        self.staging_report = None
        self.waits_ms = []

    def times(self, *kinds):
        return [ms for ms, k in self.steps if k in kinds]


def run_variant(key, trainer, args, snapshot_bytes):
    result = Result(key)
    missing = missing_libdcp_features(key.removeprefix("libdcp-")) if key.startswith("libdcp-") else []
    if missing:
        result.failed = "not in this build: " + ", ".join(missing)
        return result
    dirs = CheckpointDirs(os.path.join(args.dir, key))
    saver = None
    try:
        saver = make_saver(key, args, dirs, snapshot_bytes)
        timed_run(trainer, saver, args, dirs, result)
    except Exception as e:  # a variant this torch or libdcp cannot run is a row, not a crash
        message = str(e).strip().splitlines()
        result.failed = f"failed: {type(e).__name__}: {message[0] if message else ''}"
        if saver is not None:
            drain(saver)
    finally:
        if saver is not None:
            saver.close()
        dirs.remove_all()
    return result


def drain(saver):
    try:
        saver.finish()
    except Exception:
        pass  # the variant has already failed; its first error is the one reported


def timed_run(trainer, saver, args, dirs, result):
    median_warm, training_peak = warm_up(trainer, args)
    mem = DeviceMem(args.device, training_peak)
    save_steps = set() if isinstance(saver, NoSaver) else set(range(0, args.steps, args.every))
    check_step = max(save_steps) if saver.checks and save_steps else None
    expected = None
    with PeakRss() as rss:
        if save_steps:
            first = train_step(trainer, saver, trainer.state(), dirs.fresh("first"), mem)
            result.first_save_ms = first - median_warm
            saver.finish()
            saver.waits_ms.clear()
        for i in range(args.steps):
            in_flight = saver.in_flight()
            if i == check_step:
                state = trainer.state()
                rss.discount(state_bytes(state))
                expected = cpu_copy(state)
                check_path = dirs.fresh(f"step-{i}")
                train_step(trainer, saver, state, check_path, mem)
                continue
            saving = i in save_steps
            ms = train_step(trainer, saver, trainer.state() if saving else None, dirs.fresh(f"step-{i}"), mem)
            result.steps.append((ms, "save" if saving else "background" if in_flight else "plain"))
        saver.finish()
    result.rss = rss.peak
    result.waits_ms = list(saver.waits_ms)
    result.device_mem = mem.peak_increase()
    result.note = saver.note
    if expected is not None:
        verdict = saver.check(check_path, expected)
        result.note = "; ".join(x for x in (result.note, f"last save {verdict}") if x)
    if isinstance(saver, LibdcpSaver):
        result.staging_report = saver.staging_report


# ---- the table


def fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def row(r, baseline_mean):
    name = VARIANTS[r.key]
    if r.failed:
        return f"| {name} | " + " | ".join(["-"] * 8) + f" | {r.failed} |"
    all_ms = r.times("save", "background", "plain")
    mean = statistics.mean(all_ms)
    between = r.times("background", "plain")
    median = statistics.median(between) if between else None
    saves = r.times("save")
    cost = statistics.mean(ms - median for ms in saves) if saves and median is not None else None
    background = r.times("background")
    overhead = (mean - baseline_mean) / baseline_mean * 100 if baseline_mean else None
    waited = statistics.mean(r.waits_ms) if r.waits_ms else None
    cells = [fmt(mean), fmt(overhead), fmt(cost), fmt(waited), fmt(statistics.median(background) if background else None),
             fmt(r.first_save_ms), fmt(r.rss / GIB, 2), fmt(None if r.device_mem is None else r.device_mem / GIB, 2)]
    return f"| {name} | " + " | ".join(cells) + f" | {r.note} |"


def print_table(results, args, nbytes, snapshot_bytes):
    baseline = next((r for r in results if r.key == "none" and not r.failed), None)
    baseline_mean = statistics.mean(baseline.times("plain")) if baseline else None
    print()
    print("| variant | mean step (ms) | overhead vs none (%) | cost per save (ms) | of which waiting for the previous save (ms) "
          "| median step during background writes (ms) "
          "| first save (ms) | peak host RSS increase (GiB) | peak device mem increase (GiB) | note |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in results:
        print(row(r, baseline_mean))
    print()
    nsaves = len(range(0, args.steps, args.every))
    print(f"{args.steps} timed steps after {args.warmup} warmup steps; a save every {args.every} steps ({nsaves} saves, "
          f"{nbytes / GIB:.2f} GiB each). Steps are timed one by one between two synchronizations of the training stream (not the device: background copy streams are not waited for).")
    print("First save: the untimed save before the timed steps (it allocates staging buffers), as its step's time "
          "less the median warmup step; it is not in the other columns.")
    print("libdcp rows: the step of the last save is not timed (the state is copied to the CPU right before it, "
          "for the bit-exact check of what that save wrote, loaded back into poisoned buffers).")
    print(f"Device snapshot budget: {snapshot_bytes / GIB:.2f} GiB.")
    for r in results:
        if r.staging_report:
            print(f"{VARIANTS[r.key]}: f.staging() of its last save: {r.staging_report}")


# ---- setup


def init_process_group():
    """A 1-rank gloo group: torch's async_save uses the default group, and its PROCESS mode needs
    one (it broadcasts the checkpoint process's store address over it)."""
    if dist.is_initialized():
        return
    # PROCESS mode's checkpoint process starts a TCPStore on MASTER_ADDR, else on the host's name.
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    store_file = tempfile.NamedTemporaryFile(prefix="bench-train-store-", delete=False).name
    dist.init_process_group("gloo", store=dist.FileStore(store_file, 1), rank=0, world_size=1)


def machine_info(args):
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "no GPU (cpu run)"
    return (f"{gpu} | torch {torch.__version__} | libdcp {L.lib().dcp_version().decode()} | {os.cpu_count()} CPUs | "
            f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} | torch async_stager: "
            f"{'yes' if torch_has_async_stager() else 'no'}")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--batch", type=int, default=16384)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=60, help="save every N steps")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--dir", default="/tmp/bench-train")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    p.add_argument("--snapshot-gib", type=float, default=None, help="device snapshot budget (default: the whole state)")
    args = p.parse_args()
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if args.every < 1 or args.steps < 1:
        p.error("--steps and --every must be positive")
    return args


def main():
    args = parse_args()
    init_process_group()
    trainer = Trainer(args)
    warm_up(trainer, args)  # creates Adam's state, so that the state's size is known
    nbytes = state_bytes(trainer.state())
    snapshot_bytes = int(args.snapshot_gib * GIB) if args.snapshot_gib is not None else nbytes
    print(machine_info(args), flush=True)
    print(f"model: {args.layers} x Linear({args.width}, {args.width}), batch {args.batch}; "
          f"state {nbytes / GIB:.2f} GiB = {nbytes / 2**20:.1f} MiB ({len(trainer.state())} tensors)", flush=True)
    results = []
    for key in args.variants:
        print(f"running {VARIANTS[key]} ...", file=sys.stderr, flush=True)
        results.append(run_variant(key, trainer, args, snapshot_bytes))
    print_table(results, args, nbytes, snapshot_bytes)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
