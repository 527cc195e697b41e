"""GPU tests for libdcp, run on a machine with an NVIDIA GPU and torch (the lent H100/H200):
CUDA tensors saved, then loaded in other processes into GPU buffers of another layout; async
save with the tensors changed right after the call returns; cached pinned staging; torch reads
what libdcp wrote from the GPU. Skipped with a message where there is no GPU.

    LIBDCP_SO=target/release/libdcp.so python3 tests/gpu/test_gpu.py
"""
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
import torch  # noqa: E402

import libdcp as L  # noqa: E402

GPU = torch.cuda.is_available()
SKIP = None if GPU else "no CUDA GPU here: the GPU tests run on the lent GPU machine (see README)"

# fqn -> (shape, dtype); values are deterministic (see value()).
SPEC = {
    "model.big": ((4096, 4096), torch.float32),  # 64 MiB: several checksum blocks
    "model.uneven": ((1000, 257), torch.float32),
    "model.bf16": ((333, 64), torch.bfloat16),
    "model.f16": ((64, 3), torch.float16),
    "model.f8": ((128, 16), torch.float8_e4m3fn),
    "model.i64": ((77,), torch.int64),
    "model.mask": ((50, 2), torch.bool),
    "optim.step": ((), torch.float32),
    "model.empty": ((0, 4), torch.float32),
}


def value(fqn, shape, dtype, device="cuda"):
    g = torch.Generator().manual_seed(sum(map(ord, fqn)))
    if dtype == torch.bool:
        t = torch.randint(0, 2, shape, generator=g).bool()
    elif dtype in (torch.int64,):
        t = torch.randint(-(2**40), 2**40, shape, generator=g)
    else:
        t = torch.randn(shape, generator=g).to(dtype)
    return t.to(device)


def shard0(shape, rank, world):
    """torch.chunk's rows for `rank`: (offset, size)."""
    n = shape[0]
    full = -(-n // world)
    start = min(full * rank, n)
    return start, max(0, min(n, start + full) - start)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_load(rank, world, port, path, spec_keys):
    """In a fresh process: registers this rank's Shard(0) piece (GPU, garbage-filled, some keys
    as transposed views and column slices) and loads; returns the number of keys checked."""
    torch.cuda.set_device(0)
    ctx = L.Context.tcp(rank, world, port, timeout_s=120) if world > 1 else L.Context()
    st = L.State()
    want = {}
    for k in spec_keys:
        shape, dtype = SPEC[k]
        full = value(k, shape, dtype)
        if len(shape) == 0:
            buf = L.poison(torch.empty((), dtype=dtype, device="cuda"))
            st.add_tensor_any(k, buf)
            want[k] = (buf, full)
            continue
        off, rows = shard0(shape, rank, world)
        if k == "model.uneven":
            # A transposed destination on the GPU: stored (257, rows) and seen as (rows, 257).
            store = L.poison(torch.empty((shape[1], rows), dtype=dtype, device="cuda"))
            buf = store.t()
        else:
            buf = L.poison(torch.empty((rows,) + tuple(shape[1:]), dtype=dtype, device="cuda"))
        st.add_tensor_any(k, buf, global_shape=list(shape), offsets=[off] + [0] * (len(shape) - 1))
        want[k] = (buf, full[off:off + rows])
    L.load(ctx, st, path)
    torch.cuda.synchronize()
    for k, (buf, exp) in want.items():
        a, b = buf.contiguous().reshape(-1), exp.contiguous().reshape(-1)
        if a.numel():
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert torch.equal(a, b), f"rank {rank}: {k} differs"
    # A column box through the inspection API into a GPU-side check.
    ck = L.Checkpoint(path)
    box = ck.read_tensor("model.big", torch.empty((4096, 1000)), offsets=[0, 1500])
    assert torch.equal(box.cuda(), value("model.big", (4096, 4096), torch.float32)[:, 1500:2500]), "box read differs"
    return len(want)


def run_workers(world, path, keys):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), str(world), str(port), path, ",".join(keys)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs)):
        if p.returncode != 0:
            raise AssertionError(f"worker {r} of {world} failed:\n{out}")
    return outs


@unittest.skipIf(SKIP, SKIP)
class Gpu(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="libdcp-gpu-", dir=os.environ.get("DCP_GPU_TEST_DIR"))
        self.path = os.path.join(self.dir, "ckpt")

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def register_gpu_state(self, st):
        tensors = {}
        for k, (shape, dtype) in SPEC.items():
            t = value(k, shape, dtype)
            if k == "model.bf16":
                # A non-contiguous CUDA view (saved through a host copy of its extent).
                store = torch.empty((shape[1], shape[0]), dtype=dtype, device="cuda")
                store.copy_(t.t())
                t = store.t()
            tensors[k] = t
            st.add_tensor_any(k, t)
        return tensors

    def test_cuda_available_to_libdcp(self):
        self.assertTrue(L.cuda_available())

    def test_save_gpu_then_load_other_layouts_in_other_processes(self):
        ctx, st = L.Context(), L.State()
        tensors = self.register_gpu_state(st)
        L.save(ctx, st, self.path)
        # One process (whole tensors on the GPU, some into transposed views) and two processes
        # (Shard(0) pieces, with empty ones), each a fresh process.
        for world in (1, 2):
            run_workers(world, self.path, list(SPEC))
        # torch reads what libdcp wrote from GPU memory.
        import torch.distributed.checkpoint as dcp
        sd = {k: L.poison(torch.empty(v.shape, dtype=v.dtype)) for k, v in tensors.items()}
        dcp.load(sd, checkpoint_id=self.path)
        for k, v in tensors.items():
            a, b = sd[k].contiguous().reshape(-1), v.cpu().contiguous().reshape(-1)
            if a.numel():
                a, b = a.view(torch.uint8), b.view(torch.uint8)
            self.assertTrue(torch.equal(a, b), k)

    def test_async_save_keeps_the_values_of_the_call(self):
        ctx, st = L.Context(), L.State()
        tensors = self.register_gpu_state(st)
        f = L.save_async(ctx, st, self.path)
        # Change every tensor right after the call returns, on the same stream.
        for k, t in tensors.items():
            if t.numel() and t.dtype.is_floating_point and t.dtype != torch.float8_e4m3fn:
                t.add_(1.0)
            elif t.numel() and t.dtype == torch.int64:
                t.add_(7)
            elif t.dtype == torch.bool:
                t.logical_not_()
            elif t.dtype == torch.float8_e4m3fn:
                t.view(torch.uint8).bitwise_xor_(1)
        f.wait()
        run_workers(1, self.path, list(SPEC))
        pinned, _ = ctx.staging_bytes()
        self.assertGreater(pinned, 64 << 20, "the async save staged in page-locked memory")

    def test_cached_staging_makes_the_second_async_save_cheaper(self):
        ctx, st = L.Context(), L.State()
        self.register_gpu_state(st)
        times = []
        for i in range(2):
            t0 = time.perf_counter()
            f = L.save_async(ctx, st, self.path + str(i))
            times.append(time.perf_counter() - t0)
            f.wait()
        pinned, _ = ctx.staging_bytes()
        print(f"\nasync save blocked: first {times[0]*1e3:.1f} ms, second {times[1]*1e3:.1f} ms; pinned pool {pinned >> 20} MiB")
        self.assertLess(times[1], times[0])



def mutate_all(tensors):
    """Changes every tensor in place, on the current stream."""
    for t in tensors.values():
        if not t.numel():
            continue
        if not t.is_contiguous():
            t.neg_().sub_(1)
        elif t.dtype in (torch.int64,):
            t.add_(7)
        elif t.dtype == torch.bool:
            t.logical_not_()
        else:
            t.view(torch.uint8).bitwise_xor_(0x41)


# Contiguous CUDA tensors (copied after the call in stream-ordered saves): 64 MiB and 18 MiB
# of fp32 (several copies' worth of time), bf16, fp8, int64, bool, and an empty one.
ZERO_STALL = {
    "model.big": ((4096, 4096), torch.float32),
    "model.mid": ((3000, 1537), torch.float32),
    "model.bf16": ((1024, 999), torch.bfloat16),
    "model.f8": ((128, 16), torch.float8_e4m3fn),
    "optim.i64": ((77,), torch.int64),
    "model.mask": ((50, 2), torch.bool),
    "model.empty": ((0, 4), torch.float32),
}
SLEEP_CYCLES = 1_000_000_000  # about half a second of GPU time at H200 clocks


@unittest.skipIf(SKIP, SKIP)
class ZeroStall(unittest.TestCase):
    """Stream-ordered staging and device snapshots: the checkpoint holds the values the
    tensors have at the call in stream order (written by kernels still queued when the call
    is made), even with writes queued right after the call returns."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="libdcp-zerostall-", dir=os.environ.get("DCP_GPU_TEST_DIR"))
        self.ctx = L.Context()

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def queued_state(self, spec=ZERO_STALL, stream=None):
        """Tensors registered with `stream` (default: the current one), whose values at the
        call are written by kernels queued behind half a second of GPU sleep: returns the state,
        the tensors and their expected values (on the CPU)."""
        stream = stream or torch.cuda.current_stream()
        st, tensors, expected = L.State(), {}, {}
        with torch.cuda.stream(stream):
            for k, (shape, dtype) in spec.items():
                expected[k] = value(k, shape, dtype, device="cpu")
                src = expected[k].to("cuda")
                t = torch.zeros(shape, dtype=dtype, device="cuda")
                tensors[k] = (t, src)
            torch.cuda.synchronize()
            torch.cuda._sleep(SLEEP_CYCLES)
            for k, (t, src) in tensors.items():
                t.copy_(src)
        tensors = {k: t for k, (t, _) in tensors.items()}
        for k, t in tensors.items():
            st.add_tensor_any(k, t)
            st.set_cuda(k, 0, stream.cuda_stream)
        return st, tensors, expected

    def assert_checkpoint(self, path, expected):
        st = L.State()
        got = {k: L.poison(torch.empty(v.shape, dtype=v.dtype)) for k, v in expected.items()}
        for k, t in got.items():
            st.add_tensor(k, t)
        L.load(L.Context(), st, path)
        for k, v in expected.items():
            self.assertTrue(torch.equal(L.raw_bytes(got[k]), L.raw_bytes(v)), f"{k} differs from its value at the call")

    def contiguous_cuda_bytes(self, spec=ZERO_STALL):
        return sum(math.prod(shape) * torch.empty((), dtype=dt).element_size() for shape, dt in spec.values())

    def test_stream_ordered_save_returns_before_the_queued_work_and_holds_its_results(self):
        st, tensors, expected = self.queued_state()
        path = os.path.join(self.dir, "ordered")
        f = L.save_async(self.ctx, st, path, stream_ordered=True)
        self.assertFalse(torch.cuda.current_stream().query(), "the call waited for the caller's stream")
        r = f.staging()
        self.assertEqual(r["stream_ordered_bytes"], self.contiguous_cuda_bytes())
        self.assertEqual(r["device_snapshot_bytes"], 0)
        f.stream_wait(torch.cuda.current_stream().cuda_stream)
        mutate_all(tensors)  # queued right after: ordered after the copies
        f.wait()
        self.assert_checkpoint(path, expected)

    def test_wait_staged_is_the_cpu_form(self):
        st, tensors, expected = self.queued_state()
        path = os.path.join(self.dir, "staged")
        f = L.save_async(self.ctx, st, path, stream_ordered=True)
        f.wait_staged()
        self.assertTrue(torch.cuda.current_stream().query(), "the staged copies finished before the caller's work")
        mutate_all(tensors)
        f.wait()
        self.assert_checkpoint(path, expected)

    def test_device_snapshot_lets_the_caller_write_at_once(self):
        need = self.contiguous_cuda_bytes()
        for i in range(2):
            st, tensors, expected = self.queued_state()
            path = os.path.join(self.dir, f"snap{i}")
            # A generous budget, then exactly the state's bytes: both hold everything.
            f = L.save_async(self.ctx, st, path, stream_ordered=True, device_snapshot_bytes=(1 << 30) if i == 0 else need)
            self.assertFalse(torch.cuda.current_stream().query(), "the call waited for the caller's stream")
            mutate_all(tensors)  # no stream_wait: every tensor is in the snapshot
            r = f.staging()
            self.assertEqual((r["device_snapshot_bytes"], r["stream_ordered_bytes"]), (need, 0))
            f.wait()
            self.assert_checkpoint(path, expected)
            held = self.ctx.device_snapshot_bytes()
            self.assertGreaterEqual(held, need)
            self.assertEqual(held, need, "a budget of the state's bytes holds the whole state")
            if i == 0:
                first = held
        self.assertEqual(self.ctx.device_snapshot_bytes(), first, "the snapshot buffer is reused, not grown")
        self.ctx.release_device_snapshots()
        self.assertEqual(self.ctx.device_snapshot_bytes(), 0)

    def test_budget_smaller_than_the_state_snapshots_what_fits_and_orders_the_rest(self):
        budget = 32 << 20  # less than model.big alone
        st, tensors, expected = self.queued_state()
        # And a strided CUDA tensor: copied during the call (after the queued work).
        strided = torch.arange(64 * 33, dtype=torch.float32, device="cuda").reshape(33, 64).t()
        expected["model.strided"] = strided.cpu().clone()
        st.add_tensor_any("model.strided", strided)
        tensors["model.strided"] = strided
        path = os.path.join(self.dir, "partial")
        f = L.save_async(self.ctx, st, path, stream_ordered=True, device_snapshot_bytes=budget)
        r = f.staging()
        self.assertGreater(r["device_snapshot_bytes"], 0)
        self.assertLessEqual(r["device_snapshot_bytes"], budget)
        self.assertGreaterEqual(r["stream_ordered_bytes"], 64 << 20)
        self.assertEqual(r["device_snapshot_bytes"] + r["stream_ordered_bytes"], self.contiguous_cuda_bytes())
        self.assertLessEqual(self.ctx.device_snapshot_bytes(), budget)
        f.stream_wait(torch.cuda.current_stream().cuda_stream)
        mutate_all(tensors)
        f.wait()
        self.assert_checkpoint(path, expected)

    def test_tensors_on_a_side_stream(self):
        side = torch.cuda.Stream()
        st, tensors, expected = self.queued_state(stream=side)
        path = os.path.join(self.dir, "side")
        f = L.save_async(self.ctx, st, path, stream_ordered=True, device_snapshot_bytes=8 << 20)
        f.stream_wait(side.cuda_stream)
        with torch.cuda.stream(side):
            mutate_all(tensors)
        f.wait()
        self.assert_checkpoint(path, expected)

    def test_a_forgotten_stream_wait_commits_nothing(self):
        st, tensors, expected = self.queued_state()
        path = os.path.join(self.dir, "forgotten")
        f = L.save_async(self.ctx, st, path, stream_ordered=True)
        with self.assertRaises(L.DcpError) as e:
            f.wait()
        self.assertIn("not committed", str(e.exception))
        self.assertFalse(os.path.exists(os.path.join(path, ".metadata")))
        with self.assertRaises(L.DcpError):
            f.stream_wait(torch.cuda.current_stream().cuda_stream)
        # The next save on the context works.
        f = L.save_async(self.ctx, st, path, stream_ordered=True)
        f.stream_wait(torch.cuda.current_stream().cuda_stream)
        f.wait()

    def test_consecutive_saves_each_hold_their_own_values(self):
        st, tensors, _ = self.queued_state()
        saved = []
        for i, kw in enumerate([dict(stream_ordered=True), dict(device_snapshot_bytes=1 << 30), dict(stream_ordered=True, device_snapshot_bytes=40 << 20), {}]):
            torch.cuda.synchronize()
            saved.append({k: t.cpu().clone() for k, t in tensors.items()})
            path = os.path.join(self.dir, f"seq{i}")
            f = L.save_async(self.ctx, st, path, **kw)  # waits for the previous save first
            f.stream_wait(torch.cuda.current_stream().cuda_stream)
            mutate_all(tensors)
        f.wait()
        for i, expected in enumerate(saved):
            self.assert_checkpoint(os.path.join(self.dir, f"seq{i}"), expected)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        r, w, port, path, keys = sys.argv[2:7]
        n = worker_load(int(r), int(w), int(port), path, keys.split(","))
        print(f"worker {r}/{w}: {n} keys match")
        sys.exit(0)
    if SKIP:
        print(f"SKIPPED: {SKIP}")
    unittest.main(verbosity=2)
