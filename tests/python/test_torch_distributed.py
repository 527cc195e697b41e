"""Interop with real torch.distributed (gloo on CPU, 2 and 4 processes, real modules): torch
saves DTensor state (parallelize_module with ColwiseParallel/RowwiseParallel, fully_shard,
2-D HSDP meshes) and libdcp loads it under another layout; libdcp saves and torch `dcp.load`
reads it into DTensors of another layout. Values are compared exactly."""
import os
import shutil
import sys
import tempfile
import unittest
import warnings

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module  # noqa: E402

import libdcp as L  # noqa: E402
from multirank import expected, full_tensor, register, run  # noqa: E402
from test_multirank import fsdp, fsdp_tp, hsdp, tp_colwise_rowwise  # noqa: E402

warnings.filterwarnings("ignore")
R, S, SS = L.REPLICATE, L.Shard, L.StridedShard


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.net1 = nn.Linear(10, 16)
        self.relu = nn.ReLU()
        self.net2 = nn.Linear(16, 12)


def init_pg(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def libdcp_ctx(rank, world, port):
    return L.Context.tcp(rank, world, int(os.environ["DCP_TEST_PORT2"]), timeout_s=60)


def torch_layout(kind, model, world):
    """Builds a torch model under a parallel layout on CPU."""
    if kind == "tp":
        mesh = init_device_mesh("cpu", (world,))
        return parallelize_module(model, mesh, {"net1": ColwiseParallel(), "net2": RowwiseParallel()})
    from torch.distributed.fsdp import fully_shard
    if kind == "fsdp":
        mesh = init_device_mesh("cpu", (world,))
    elif kind == "hsdp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    else:
        raise ValueError(kind)
    fully_shard(model, mesh=mesh)
    return model


def placements_of(dt):
    out = []
    for p in dt.placements:
        name = type(p).__name__
        if name == "Replicate":
            out.append(R)
        elif name == "_StridedShard":
            out.append(SS(p.dim))
        else:
            out.append(S(p.dim))
    return out


def torch_saves_libdcp_loads(rank, world, port, path, kind, load_layout):
    init_pg(rank, world, port)
    try:
        model = torch_layout(kind, MLP(), world)
        sd = {"model": model.state_dict()}
        fulls = {f"model.{k}": (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in sd["model"].items()}
        dcp.save(sd, checkpoint_id=path)
        dist.barrier()
        ctx = libdcp_ctx(rank, world, port)
        st, meshes, held = L.State(), {}, {}
        for k, full in fulls.items():
            got = register(st, ctx, rank, meshes, k, full, load_layout(k, full.shape, rank, world), fill="garbage")
            if got is not None:
                held[k] = (got, full)
        L.load(ctx, st, path)
        for k, ((local, sizes, offsets), full) in held.items():
            want = expected(full, sizes, offsets).contiguous()
            assert torch.equal(local.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), f"rank {rank}: {k} differs"
        return sorted(held)
    finally:
        dist.destroy_process_group()


def libdcp_saves_torch_loads(rank, world, port, path, save_layout, kind):
    init_pg(rank, world, port)
    try:
        ref = MLP()
        fulls = {f"model.{k}": full_tensor(k, v.shape) for k, v in ref.state_dict().items()}
        ctx = libdcp_ctx(rank, world, port)
        st, meshes = L.State(), {}
        for k, full in fulls.items():
            register(st, ctx, rank, meshes, k, full, save_layout(k, full.shape, rank, world))
        L.save(ctx, st, path)
        dist.barrier()
        model = torch_layout(kind, MLP(), world)
        sd = {"model": model.state_dict()}
        dcp.load(sd, checkpoint_id=path)
        for k, v in sd["model"].items():
            got = v.full_tensor() if isinstance(v, DTensor) else v
            assert torch.equal(got, fulls[f"model.{k}"]), f"rank {rank}: {k} differs after torch load"
        return True
    finally:
        dist.destroy_process_group()


# The layouts of test_multirank (the same placements for these keys, whose names it maps).
fsdp_layout, hsdp_layout, tp_layout, fsdp_tp_layout = fsdp(None), hsdp, tp_colwise_rowwise, fsdp_tp  # fsdp(w) ignores w


def rank0_full(k, shape, r, w):
    return ("full",) if r == 0 else ("absent",)


class TorchDistributedInterop(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="libdcp-td-")
        self.path = os.path.join(self.dir, "ckpt")

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def fresh(self):
        shutil.rmtree(self.path, ignore_errors=True)

    def torch_to_libdcp(self, world, kind, load_layout):
        """torch saves under `kind`, libdcp loads under `load_layout`: every key compared somewhere."""
        res = run(world, torch_saves_libdcp_loads, self.path, kind, load_layout)
        self.assertEqual(set().union(*res), {f"model.{k}" for k in MLP().state_dict()})

    def test_torch_tp_to_libdcp_fsdp(self):
        for world in (2, 4):
            with self.subTest(world=world):
                self.fresh()
                self.torch_to_libdcp(world, "tp", fsdp_layout)

    def test_torch_fsdp2_to_libdcp_tp_and_rank0(self):
        for world in (2, 4):
            with self.subTest(world=world):
                self.fresh()
                self.torch_to_libdcp(world, "fsdp", tp_layout)
                self.fresh()
                self.torch_to_libdcp(world, "fsdp", rank0_full)

    def test_torch_hsdp_to_libdcp_fsdp(self):
        self.torch_to_libdcp(4, "hsdp", fsdp_layout)

    def test_libdcp_fsdp_to_torch_tp(self):
        for world in (2, 4):
            with self.subTest(world=world):
                self.fresh()
                run(world, libdcp_saves_torch_loads, self.path, fsdp_layout, "tp")

    def test_libdcp_tp_to_torch_fsdp2(self):
        run(2, libdcp_saves_torch_loads, self.path, tp_layout, "fsdp")

    def test_libdcp_fsdp_tp_2d_to_torch_hsdp(self):
        run(4, libdcp_saves_torch_loads, self.path, fsdp_tp_layout, "hsdp")

    def test_libdcp_hsdp_to_torch_tp(self):
        run(4, libdcp_saves_torch_loads, self.path, hsdp_layout, "tp")


if __name__ == "__main__":
    unittest.main(verbosity=2)
