"""GPU tests for libdcp, run on a machine with an NVIDIA GPU and torch (the lent H100/H200):
CUDA tensors saved, then loaded in other processes into GPU buffers of another layout; async
save with the tensors changed right after the call returns; cached pinned staging; torch reads
what libdcp wrote from the GPU. Skipped with a message where there is no GPU.

    LIBDCP_SO=target/release/libdcp.so python3 tests/gpu/test_gpu.py
"""
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


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        r, w, port, path, keys = sys.argv[2:7]
        n = worker_load(int(r), int(w), int(port), path, keys.split(","))
        print(f"worker {r}/{w}: {n} keys match")
        sys.exit(0)
    if SKIP:
        print(f"SKIPPED: {SKIP}")
    unittest.main(verbosity=2)
