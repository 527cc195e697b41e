"""Helpers for multi-rank tests: run a function in N forked processes (one per rank, each with
its own libdcp TCP context), deterministic global state, and local shards computed with torch's
own DTensor arithmetic (an implementation independent of libdcp's)."""
import math
import multiprocessing as mp
import os
import socket
import traceback
import zlib

import torch
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import Replicate as TReplicate, Shard as TShard, _StridedShard

import libdcp as L

torch.set_num_threads(1)


def free_ports(n):
    """`n` distinct ports that were free a moment ago."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port():
    return free_ports(1)[0]


def _entry(q, rank, world, port, fn, args):
    try:
        q.put((rank, "ok", fn(rank, world, port, *args)))
    except BaseException:
        q.put((rank, "err", traceback.format_exc()))
    finally:
        q.close()
        q.join_thread()
        os._exit(0)


def run(world, fn, *args, timeout=180, may_vanish=()):
    """Runs fn(rank, world, port, *args) in `world` forked processes; returns [result per rank]
    or raises with every failing rank's traceback. A rank that exits without a result, or with a
    non-zero exit status (a signal included), fails the run unless it is in `may_vanish`; such a
    rank's result is None."""
    import queue
    import time

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    # Two ports per run: `port` for the function, DCP_TEST_PORT2 for a second rendezvous (tests
    # that also start torch.distributed).
    port, port2 = free_ports(2)
    os.environ["DCP_TEST_PORT2"] = str(port2)
    procs = [ctx.Process(target=_entry, args=(q, r, world, port, fn, args)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors, no_result = {}, {}, set()
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world:
            try:
                rank, status, value = q.get(timeout=0.5)
                (results if status == "ok" else errors)[rank] = value
                continue
            except queue.Empty:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"ranks {[r for r in range(world) if r not in results and r not in errors]} did not finish in {timeout} s")
            for r, p in enumerate(procs):
                if not p.is_alive() and r not in results and r not in errors:
                    # Give a result already in the queue a moment to arrive.
                    try:
                        rank, status, value = q.get(timeout=1.0)
                        (results if status == "ok" else errors)[rank] = value
                    except queue.Empty:
                        no_result.add(r)
                        results[r] = None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join(timeout=30)
    for r, p in enumerate(procs):
        if r in may_vanish or r in errors:
            continue
        if r in no_result or p.exitcode != 0:
            why = "without a result" if r in no_result else "after its result"
            errors[r] = f"rank {r} exited {why}, exit code {p.exitcode} (a negative code is a signal)\n"
    if errors:
        raise AssertionError("\n".join(f"--- rank {r} failed:\n{tb}" for r, tb in sorted(errors.items())))
    return [results[r] for r in range(world)]


def full_tensor(fqn, shape, dtype=torch.float32):
    """The deterministic global value of a key."""
    g = torch.Generator().manual_seed(zlib.crc32(fqn.encode()))
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    return torch.randint(-1000, 1000, shape, generator=g).to(dtype)


def torch_box(global_shape, mesh_shape, coord, placements):
    """(sizes, offsets) of the shard at `coord`, computed by torch's DTensor code."""
    tp = []
    for i, p in enumerate(placements):
        if p[0] == "R":
            tp.append(TReplicate())
        elif p[0] == "S":
            tp.append(TShard(p[1]))
        else:
            sf = math.prod(mesh_shape[j] for j in range(i + 1, len(placements)) if placements[j] == ("S", p[1]))
            tp.append(_StridedShard(p[1], split_factor=sf))
    sizes, offsets = _compute_local_shape_and_global_offset(list(global_shape), list(mesh_shape), list(coord), tp)
    return list(sizes), list(offsets)


def coord_of(mesh_shape, ranks, rank):
    pos = ranks.index(rank)
    c = []
    for s in reversed(mesh_shape):
        c.append(pos % s)
        pos //= s
    return list(reversed(c))


def slice_box(t, sizes, offsets):
    idx = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
    return t[idx] if t.dim() else t


# A layout says how one rank holds one key: ("full",), ("absent",), ("chunk", offsets, sizes) or
# ("mesh", mesh_shape, mesh_ranks or None, placements).

def register(state, ctx, rank, meshes, fqn, full, layout, fill=None):
    """Registers this rank's piece of `full` per `layout`; returns the local tensor (a copy, or
    a garbage-filled buffer of the right shape when `fill` is "garbage")."""
    kind = layout[0]
    if kind == "absent":
        return None
    if kind == "full":
        sizes, offsets = list(full.shape), [0] * full.dim()
    elif kind == "chunk":
        offsets, sizes = layout[1], layout[2]
    else:
        _, mshape, mranks, placements = layout
        mranks = mranks or list(range(math.prod(mshape)))
        sizes, offsets = torch_box(full.shape, mshape, coord_of(mshape, mranks, rank), placements)
    local = slice_box(full, sizes, offsets).clone()
    if fill == "garbage":
        local = torch.empty_like(local)
        if local.dtype.is_floating_point:
            local.fill_(float("nan"))
        elif local.numel():
            local.view(torch.uint8).fill_(0xA5) if local.dtype != torch.bool else local.fill_(True)
    if kind == "full":
        state.add_tensor(fqn, local)
    elif kind == "chunk":
        state.add_tensor(fqn, local, global_shape=list(full.shape), offsets=offsets)
    else:
        key = (tuple(mshape), tuple(mranks))
        if key not in meshes:
            meshes[key] = L.Mesh(ctx, mshape, mranks)
        state.add_tensor_sharded(fqn, local, list(full.shape), meshes[key], placements)
    return (local, sizes, offsets)


def expected(full, sizes, offsets):
    return slice_box(full, sizes, offsets)
