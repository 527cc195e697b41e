"""libdcp benchmark: one table with each figure beside the machine's limit and torch DCP measured
in the same run. The limits are taken with several dd processes at once (--streams, 8 by
default, as libdcp's 8 threads): O_DIRECT writes and reads on the same disk, and buffered reads of
cached files for warm loads; a single dd's figures are printed too.

    LIBDCP_SO=target/release/libdcp.so python3 scripts/bench.py [--dir DIR] [--gib 8] [--device cuda|cpu]

Cases: GIB GiB of fp32 state as 64 MiB tensors (sync save, async save, cold and warm load);
10,000 small tensors of 4 KiB - 1 MiB; an LLM-like bf16 mix (74 tensors, 3.5 GiB). Peak host
memory (RSS) is sampled during each operation; pinned memory is libdcp's staging pool.
"""
import argparse
import ctypes
import datetime
import math
import os
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "python"))
import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402

import libdcp as L  # noqa: E402

GB = 1e9


class PeakRss:
    """Samples this process's resident memory while a block runs; `peak` is the highest
    increase over the start (memory the operation itself took)."""

    def __enter__(self):
        self.base = self._rss()
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _rss(self):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss() - self.base)

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss() - self.base)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def files_of(path):
    """`path` itself when it is a file, else every file below it."""
    if os.path.isfile(path):
        return [path]
    return [os.path.join(root, f) for root, _, files in os.walk(path) for f in files]


def drop_cache(path):
    """Evicts a file, or a checkpoint's files, from the page cache (they are synced first)."""
    for f in files_of(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_cache(path):
    """Reads a file, or a checkpoint's files, into the page cache."""
    for f in files_of(path):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def dd_limits(d, gib, repeat):
    """Median O_DIRECT write and read rates of dd on the benchmark's disk."""
    f = os.path.join(d, "dd.bin")
    n = max(1, int(gib * 16))
    ws, rs = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(["dd", "if=/dev/zero", f"of={f}", "bs=64M", f"count={n}", "oflag=direct", "conv=fsync"], check=True, capture_output=True)
        ws.append(n * (64 << 20) / (time.perf_counter() - t))
        drop_cache(f)
        t = time.perf_counter()
        subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=64M", "iflag=direct"], check=True, capture_output=True)
        rs.append(n * (64 << 20) / (time.perf_counter() - t))
        os.remove(f)
    return sorted(ws)[len(ws) // 2], sorted(rs)[len(rs) // 2]


def parallel_limits(d, gib, streams, repeat):
    """The disk's and page cache's limits with `streams` dd processes at once (libdcp writes and
    reads with several threads, so a single dd understates what the machine can do): median
    O_DIRECT write, O_DIRECT read (cache dropped) and buffered read from the page cache (files
    cached), in bytes per second over all streams."""
    per = max(1, int(gib * 16 / streams))  # 64 MiB blocks per stream
    files = [os.path.join(d, f"dd-{i}.bin") for i in range(streams)]
    total = per * streams * (64 << 20)

    def all_at_once(argv_of):
        t = time.perf_counter()
        procs = [subprocess.Popen(argv_of(f), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for f in files]
        for p in procs:
            if p.wait() != 0:
                raise RuntimeError(f"dd failed: {p.args}")
        return total / (time.perf_counter() - t)

    ws, rs, cs = [], [], []
    for _ in range(repeat):
        ws.append(all_at_once(lambda f: ["dd", "if=/dev/zero", f"of={f}", "bs=64M", f"count={per}", "oflag=direct", "conv=fsync"]))
        for f in files:
            drop_cache(f)
        rs.append(all_at_once(lambda f: ["dd", f"if={f}", "of=/dev/null", "bs=64M", "iflag=direct"]))
        for f in files:
            warm_cache(f)
        cs.append(all_at_once(lambda f: ["dd", f"if={f}", "of=/dev/null", "bs=64M"]))
        for f in files:
            os.remove(f)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return med(ws), med(rs), med(cs)


def make_state(kind, device, gib):
    g = torch.Generator(device=device).manual_seed(0)
    sd = {}
    if kind == "big":
        n = max(1, int(gib * 16))
        for i in range(n):
            sd[f"model.t{i:03d}"] = torch.randn((4096, 4096), generator=g, device=device)
    elif kind == "small":
        rng = torch.Generator().manual_seed(1)
        logs = torch.rand(10000, generator=rng) * (math.log(1 << 20) - math.log(4096)) + math.log(4096)
        for i, lg in enumerate(logs.tolist()):
            sd[f"model.s{i:05d}"] = torch.randn(int(math.exp(lg)) // 4, generator=g, device=device)
    else:  # LLM-like bf16 mix: 8 layers of 9 tensors, embedding and head
        h, f, v = 4096, 11008, 32000
        sd["model.embed"] = torch.randn((v, h), generator=g, device=device).bfloat16()
        for layer in range(8):
            for name, shape in [("q", (h, h)), ("k", (h, h)), ("v", (h, h)), ("o", (h, h)), ("gate", (f, h)), ("up", (f, h)), ("down", (h, f)), ("norm1", (h,)), ("norm2", (h,))]:
                sd[f"model.layers.{layer}.{name}"] = torch.randn(shape, generator=g, device=device).bfloat16()
        sd["model.head"] = torch.randn((v, h), generator=g, device=device).bfloat16()
    sync(device)
    return sd


def libdcp_state(sd):
    st = L.State()
    for k, t in sd.items():
        st.add_tensor_any(k, t)
    return st


def empty_like_state(sd):
    return {k: torch.empty_like(t) for k, t in sd.items()}


def check_equal(a, b):
    for k in a:
        if not torch.equal(a[k], b[k]):
            raise AssertionError(f"{k} differs after load")


class Bench:
    def __init__(self, args):
        self.args = args
        self.rows = []
        self.ctx = L.Context()

    def path(self, name):
        return os.path.join(self.args.dir, name)

    def fresh(self, name):
        p = self.path(name)
        shutil.rmtree(p, ignore_errors=True)
        return p

    def row(self, case, limit, torch_gbs, dcp_gbs, rss, note="", torch_s=None, dcp_s=None, unit="GB/s"):
        pinned, _ = self.ctx.staging_bytes()
        self.rows.append((case, limit, torch_gbs, dcp_gbs, rss, pinned, note, torch_s, dcp_s, unit))
        print(f"  {case}: torch {torch_gbs} libdcp {dcp_gbs} {note}", flush=True)

    def timed(self, fn, before=None):
        """Median time of `--repeat` runs of fn (each after `before`), and the peak memory."""
        times, peak = [], 0
        for _ in range(self.args.repeat):
            if before:
                before()
            with PeakRss() as m:
                t = time.perf_counter()
                fn()
                sync(self.args.device)
                times.append(time.perf_counter() - t)
            peak = max(peak, m.peak)
        return sorted(times)[len(times) // 2], peak

    def save_load(self, kind, label, limits, threads):
        dev = self.args.device
        sd = make_state(kind, dev, self.args.gib)
        nbytes = sum(t.numel() * t.element_size() for t in sd.values())
        wlim, rlim = limits[0], limits[1]
        tp, lp = self.fresh(f"torch-{kind}"), self.fresh(f"dcp-{kind}")
        st = libdcp_state(sd)
        # Sync save.
        t_torch, rss_t = self.timed(lambda: dcp.save(sd, storage_writer=dcp.FileSystemWriter(tp, thread_count=threads)), lambda: shutil.rmtree(tp, ignore_errors=True))
        t_dcp, rss_d = self.timed(lambda: L.save(self.ctx, st, lp, threads=threads), lambda: shutil.rmtree(lp, ignore_errors=True))
        self.row(f"{label}: sync save", wlim, nbytes / t_torch / GB, nbytes / t_dcp / GB, rss_d, f"{len(sd)} tensors, {nbytes / 2**30:.2f} GiB, {threads} threads")
        if kind == "big":
            self.async_saves(sd, st, nbytes, wlim, threads)
            # Cold load (files evicted from the page cache).
            dst_t, dst_d = empty_like_state(sd), empty_like_state(sd)
            t_torch, _ = self.timed(lambda: dcp.load(dst_t, checkpoint_id=tp), lambda: drop_cache(tp))
            st_d = libdcp_state(dst_d)
            t_dcp, rss_d = self.timed(lambda: L.load(self.ctx, st_d, lp, threads=threads), lambda: drop_cache(lp))
            check_equal(dst_d, sd)
            self.row(f"{label}: cold load", rlim, nbytes / t_torch / GB, nbytes / t_dcp / GB, rss_d, "page cache dropped; direct I/O auto")
            if self.args.cold_buffered:
                t_dcp, rss_d = self.timed(lambda: L.load(self.ctx, st_d, lp, threads=threads, direct_io=L.DIRECT_OFF), lambda: drop_cache(lp))
                check_equal(dst_d, sd)
                self.row(f"{label}: cold load", rlim, nbytes / t_torch / GB, nbytes / t_dcp / GB, rss_d, "page cache dropped; buffered reads")
        # Warm load.
        warm_cache(tp)
        warm_cache(lp)
        dst_t, dst_d = empty_like_state(sd), empty_like_state(sd)
        t_torch, _ = self.timed(lambda: dcp.load(dst_t, checkpoint_id=tp))
        st_d = libdcp_state(dst_d)
        t_dcp, rss_d = self.timed(lambda: L.load(self.ctx, st_d, lp, threads=threads))
        check_equal(dst_d, sd)
        check_equal(dst_t, sd)
        self.row(f"{label}: warm load", limits[2], nbytes / t_torch / GB, nbytes / t_dcp / GB, rss_d, "files in the page cache")
        shutil.rmtree(tp, ignore_errors=True)
        shutil.rmtree(lp, ignore_errors=True)
        del sd, st, st_d, dst_t, dst_d
        if dev == "cuda":
            torch.cuda.empty_cache()

    def async_saves(self, sd, st, nbytes, wlim, threads):
        # Each library's second async save, with its staging cached from the first.
        blocked_t, done_t, blocked_d, done_d = [], [], [], []
        tp, lp = self.path("torch-async"), self.path("dcp-async")
        # torch caches its staged (pinned) copy in the writer: reuse one writer.
        writer = dcp.FileSystemWriter(tp, thread_count=threads, cache_staged_state_dict=torch.cuda.is_available())
        for _ in range(1 + self.args.repeat):
            shutil.rmtree(tp, ignore_errors=True)
            t = time.perf_counter()
            f = dcp.async_save(sd, storage_writer=writer)
            blocked_t.append(time.perf_counter() - t)
            f.result()
            done_t.append(time.perf_counter() - t)
        shutil.rmtree(tp, ignore_errors=True)
        for _ in range(1 + self.args.repeat):
            shutil.rmtree(lp, ignore_errors=True)
            with PeakRss() as m:
                t = time.perf_counter()
                f = L.save_async(self.ctx, st, lp, threads=threads)
                blocked_d.append(time.perf_counter() - t)
                f.wait()
                done_d.append(time.perf_counter() - t)
        shutil.rmtree(lp, ignore_errors=True)
        med = lambda xs: sorted(xs[1:])[len(xs[1:]) // 2]  # noqa: E731 (the first call allocates staging)
        self.row(f"async save: caller blocked ({nbytes / 2**30:.0f} GiB)", None, f"{med(blocked_t):.2f} s", f"{med(blocked_d):.3f} s", m.peak,
                 f"staging cached; first call: torch {blocked_t[0]:.2f} s, libdcp {blocked_d[0]:.2f} s", unit="s")
        self.row("async save: completion", wlim, nbytes / med(done_t) / GB, nbytes / med(done_d) / GB, m.peak, "call to committed")

    def print_table(self, limits, header):
        print()
        print(header)
        print()
        print(f"| case | machine limit ({self.args.streams} parallel dd streams) | torch DCP | libdcp | libdcp / limit | libdcp / torch | libdcp host memory (peak RSS increase) | libdcp pinned pool |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for case, limit, tg, dg, rss, pinned, note, _, _, unit in self.rows:
            fmt = (lambda x: f"{x:.2f} GB/s") if unit == "GB/s" else (lambda x: x)
            lim = f"{limit / GB:.2f} GB/s" if limit else "-"
            ratio_l = f"{dg / (limit / GB):.0%}" if (limit and unit == "GB/s") else "-"
            ratio_t = f"{dg / tg:.1f}x" if unit == "GB/s" else "-"
            print(f"| {case} ({note}) | {lim} | {fmt(tg)} | {fmt(dg)} | {ratio_l} | {ratio_t} | {rss / 2**20:.0f} MiB | {pinned / 2**20:.0f} MiB |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=os.path.join(os.getcwd(), "bench-data"))
    ap.add_argument("--gib", type=float, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--cases", default="big,small,llm")
    ap.add_argument("--cold-buffered", action="store_true", help="also a cold load with buffered (not O_DIRECT) reads")
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement (the median is reported)")
    ap.add_argument("--streams", type=int, default=8, help="parallel dd streams for the machine's limits")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    dev = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"libdcp {L.lib().dcp_version().decode()} | torch {torch.__version__} | {dev} | {os.cpu_count()} CPUs | {datetime.date.today()}", flush=True)
    print(subprocess.run(["df", "-h", args.dir], capture_output=True, text=True).stdout.strip(), flush=True)
    limits = dd_limits(args.dir, min(args.gib, 8), args.repeat)
    print(f"dd O_DIRECT: write {limits[0] / GB:.2f} GB/s, read {limits[1] / GB:.2f} GB/s", flush=True)
    args.dd = limits
    plimits = parallel_limits(args.dir, min(args.gib, 8), args.streams, args.repeat)
    print(f"{args.streams} parallel dd streams: O_DIRECT write {plimits[0] / GB:.2f} GB/s, O_DIRECT read {plimits[1] / GB:.2f} GB/s, "
          f"page-cache read {plimits[2] / GB:.2f} GB/s", flush=True)
    limits = plimits
    b = Bench(args)
    cases = args.cases.split(",")
    if "big" in cases:
        b.save_load("big", f"{args.gib:g} GiB fp32, 64 MiB tensors", limits, args.threads)
    if "small" in cases:
        b.save_load("small", "10,000 small tensors", limits, args.threads)
    if "llm" in cases:
        b.save_load("llm", "LLM-like bf16 mix", limits, args.threads)
    b.print_table(limits, f"Benchmark: {dev}, {args.device} tensors, {datetime.date.today()} (limits: {args.streams} parallel dd streams, "
                  f"O_DIRECT write {limits[0] / GB:.2f}, read {limits[1] / GB:.2f}, page-cache read {limits[2] / GB:.2f} GB/s; "
                  f"one dd: write {args.dd[0] / GB:.2f}, read {args.dd[1] / GB:.2f} GB/s)")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
