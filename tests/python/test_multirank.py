"""Every seed scenario (PyTorch's own DCP tests) through libdcp's C API, with N processes on
loopback: save under one layout, load under the same or another, compare every byte."""
import ctypes
import os
import pickle
import random
import shutil
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402

import libdcp as L  # noqa: E402
from multirank import expected, full_tensor, register, run  # noqa: E402

R, S, SS = L.REPLICATE, L.Shard, L.StridedShard

# Models of the seeds: name -> {param: shape}.
MLP = {"net1.weight": (16, 10), "net1.bias": (16,), "net2.weight": (10, 16), "net2.bias": (10,)}
UNEVEN_TP = {"net1.weight": (10, 5), "net1.bias": (10,), "net2.weight": (15, 10), "net2.bias": (15,), "net3.weight": (1, 15), "net3.bias": (1,)}
SIMPLE_UNEVEN = {"net1.weight": (10, 5), "net1.bias": (10,), "net2.weight": (15, 10), "net2.bias": (15,),
                 "net3.weight": (30, 15), "net3.bias": (30,), "net4.weight": (5, 30), "net4.bias": (5,)}
DUMMY = {"net1.weight": (16, 8), "net1.bias": (16,), "net2.weight": (32, 16), "net2.bias": (32,),
         "net3.weight": (64, 32), "net3.bias": (64,), "net4.weight": (8, 64), "net4.bias": (8,)}


def model_and_adam(params):
    """fqn -> (shape, dtype) for model + Adam state, torch's flattened names."""
    spec = {}
    for k, shape in params.items():
        spec[f"model.{k}"] = (shape, torch.float32)
        spec[f"optimizer.state.{k}.exp_avg"] = (shape, torch.float32)
        spec[f"optimizer.state.{k}.exp_avg_sq"] = (shape, torch.float32)
        spec[f"optimizer.state.{k}.step"] = ((), torch.float32)
    return spec


def param_of(fqn):
    for prefix in ("model.", "optimizer.state."):
        if fqn.startswith(prefix):
            rest = fqn[len(prefix):]
            for suffix in (".exp_avg_sq", ".exp_avg", ".step"):
                if rest.endswith(suffix):
                    return rest[: -len(suffix)], suffix
            return rest, ""
    return fqn, ""


def save_rank(rank, world, port, path, spec, layout_fn, objects=None, order_seed=None, overwrite=False):
    ctx = L.Context.tcp(rank, world, port, timeout_s=60)
    st, meshes = L.State(), {}
    keys = sorted(spec)
    if order_seed is not None:
        random.Random(order_seed + rank).shuffle(keys)
    for k in keys:
        shape, dtype = spec[k]
        register(st, ctx, rank, meshes, k, full_tensor(k, shape, dtype), layout_fn(k, shape, rank, world))
    for k, v in (objects or {}).items():
        if isinstance(v, bytes):
            st.add_bytes(k, v)
        elif isinstance(v, int):
            st.add_int(k, v)
        else:
            st.add_double(k, v)
    L.save(ctx, st, path, overwrite=overwrite)
    return True


def load_rank(rank, world, port, path, spec, layout_fn, objects=None, order_seed=None, strict=True, extra_keys=()):
    ctx = L.Context.tcp(rank, world, port, timeout_s=60)
    st, meshes = L.State(), {}
    held = {}
    keys = sorted(spec)
    if order_seed is not None:
        random.Random(order_seed + 7 * rank).shuffle(keys)
    for k in keys:
        shape, dtype = spec[k]
        full = full_tensor(k, shape, dtype)
        got = register(st, ctx, rank, meshes, k, full, layout_fn(k, shape, rank, world), fill="garbage")
        if got is not None:
            held[k] = (got, full)
    for k in extra_keys:
        st.add_tensor(k, torch.zeros(3))
    for k, v in (objects or {}).items():
        st.add_bytes(k, b"") if isinstance(v, bytes) else st.add_int(k, 0)
    L.load(ctx, st, path, strict=strict)
    for k, ((local, sizes, offsets), full) in held.items():
        want = expected(full, sizes, offsets)
        assert torch.equal(local.view(-1).view(torch.uint8), want.contiguous().view(-1).view(torch.uint8)), f"rank {rank}: key {k} differs"
    for k, v in (objects or {}).items():
        if isinstance(v, bytes):
            assert st.get_bytes(k) == (L.VALUE_BYTES, v), k
        elif isinstance(v, int):
            assert st.get_int(k) == v, k
        else:
            assert st.get_double(k) == v, k
    return {"checked": len(held), "keys": sorted(held), "missing": st.missing()}


def fsdp(world):
    return lambda k, shape, r, w: ("mesh", [w], None, [S(0)]) if len(shape) else ("mesh", [w], None, [R])


def hsdp(k, shape, r, w):
    return ("mesh", [2, w // 2], None, [R, S(0)] if len(shape) else [R, R])


def ddp(k, shape, r, w):
    return ("mesh", [w], None, [R])


def fsdp_tp(k, shape, r, w):
    """2-D (dp, tp): net1 colwise, net2 rowwise on tp; FSDP shards dim 0 on dp (strided where tp
    already shards dim 0)."""
    mesh = [2, w // 2]
    p, _ = param_of(k)
    if len(shape) == 0:
        return ("mesh", mesh, None, [R, R])
    if p in ("net1.weight", "net1.bias"):
        return ("mesh", mesh, None, [SS(0), S(0)])
    if p == "net2.weight":
        return ("mesh", mesh, None, [S(0), S(1)])
    return ("mesh", mesh, None, [S(0), R])


def tp_colwise_rowwise(k, shape, r, w):
    p, _ = param_of(k)
    if len(shape) == 0:
        return ("mesh", [w], None, [R])
    return ("mesh", [w], None, {"net1.weight": [S(0)], "net1.bias": [S(0)], "net2.weight": [S(1)]}.get(p, [R]))


def tp_uneven(k, shape, r, w):
    p, _ = param_of(k)
    return ("mesh", [w], None, {"net1.weight": [S(1)], "net2.weight": [S(0)], "net2.bias": [S(0)]}.get(p, [R]))


def full_layout(k, shape, r, w):
    return ("full",)


class MultiRank(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="libdcp-mr-")
        self.path = os.path.join(self.dir, "ckpt")

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def roundtrip(self, spec, save_world, save_layout, load_world, load_layout, **kw):
        run(save_world, save_rank, self.path, spec, save_layout, kw.get("objects"), kw.get("order_seed"))
        res = run(load_world, load_rank, self.path, spec, load_layout, kw.get("objects"), kw.get("order_seed"))
        # Every key was compared on some rank.
        self.assertEqual(set().union(*(r["keys"] for r in res)), set(spec))
        return res

    def data_bytes(self):
        return sum(os.path.getsize(os.path.join(self.path, f)) for f in os.listdir(self.path) if f.endswith(".distcp"))

    # --- TP (seed 000) ---------------------------------------------------------------------
    def test_tp_colwise_rowwise(self):
        spec = {f"model.{k}": (v, torch.float32) for k, v in MLP.items()}
        for world in (2, 4):
            with self.subTest(world=world):
                self.roundtrip(spec, world, tp_colwise_rowwise, world, tp_colwise_rowwise)
                shutil.rmtree(self.path)

    def test_tp_uneven_into_uninitialised_buffers(self):
        # dims 5, 10, 15, 1 over 2 and 4 ranks: short and empty shards; buffers start as NaN.
        spec = {f"model.{k}": (v, torch.float32) for k, v in UNEVEN_TP.items()}
        for world in (2, 4):
            with self.subTest(world=world):
                self.roundtrip(spec, world, tp_uneven, world, tp_uneven)
                # And the whole model in one process.
                run(1, load_rank, self.path, spec, full_layout)
                shutil.rmtree(self.path)

    # --- HSDP (seed 001) -------------------------------------------------------------------
    def test_hsdp_save_load(self):
        for params in (MLP, SIMPLE_UNEVEN):
            spec = {f"model.{k}": (v, torch.float32) for k, v in params.items()}
            self.roundtrip(spec, 4, hsdp, 4, hsdp)
            shutil.rmtree(self.path)

    def test_hsdp_to_fsdp(self):
        spec = {f"model.{k}": (v, torch.float32) for k, v in SIMPLE_UNEVEN.items()}
        self.roundtrip(spec, 4, hsdp, 4, fsdp(4))

    # --- E2E (seed 002) --------------------------------------------------------------------
    def test_e2e_model_optimizer_objects(self):
        spec = model_and_adam(DUMMY)
        objects = {"train_state.losses": pickle.dumps([0.5, 0.25, 0.125]), "train_state.step": 2, "train_state.current_loss": 0.125}
        layouts = {"FSDP": fsdp(4), "HSDP": hsdp, "DDP": ddp, "FSDP_TP": fsdp_tp}
        state_bytes = sum(torch.Size(s).numel() * 4 for s, _ in spec.values())
        for name, layout in layouts.items():
            with self.subTest(mode=name):
                run(4, save_rank, self.path, spec, layout, objects)
                # Replicated chunks are written once: the files hold one copy of the state.
                self.assertLess(self.data_bytes(), state_bytes + len(spec) * 10_000, f"{name}: replicated data written more than once")
                for other in ("FSDP", name):
                    run(4, load_rank, self.path, spec, layouts[other], objects)
                shutil.rmtree(self.path)

    def test_ddp_every_key_one_chunk(self):
        spec = model_and_adam(DUMMY)
        run(4, save_rank, self.path, spec, ddp)
        keys = L.Checkpoint(self.path).keys()
        self.assertEqual({k: v[3] for k, v in keys.items()}, {k: 1 for k in spec})

    def test_partial_load_model_only(self):
        spec = model_and_adam(DUMMY)
        run(4, save_rank, self.path, spec, fsdp(4))
        model_only = {k: v for k, v in spec.items() if k.startswith("model.")}
        run(4, load_rank, self.path, model_only, fsdp(4))
        # A key the checkpoint lacks: strict fails on every rank, partial reports it.
        with self.assertRaisesRegex(AssertionError, "not in the checkpoint"):
            run(2, load_rank, self.path, model_only, fsdp(2), None, None, True, ("model.extra",))
        res = run(2, load_rank, self.path, model_only, fsdp(2), None, None, False, ("model.extra",))
        self.assertEqual([r["missing"] for r in res], [["model.extra"]] * 2)

    def test_different_key_order_per_rank(self):
        spec = model_and_adam(MLP)
        self.roundtrip(spec, 4, fsdp(4), 4, hsdp, order_seed=11)

    def test_no_process_group_empty_state(self):
        run(1, save_rank, self.path, {}, full_layout)
        run(1, load_rank, self.path, {}, full_layout)

    # --- Pipeline (seed 003) ---------------------------------------------------------------
    def test_pipeline_to_fsdp(self):
        dim = 500
        spec = {}
        for i in range(1, 5):
            spec.update({f"model.layer{i}.weight": ((dim, dim), torch.float32), f"model.layer{i}.bias": ((dim,), torch.float32),
                         f"optim.state.layer{i}.weight.exp_avg": ((dim, dim), torch.float32)})

        def stage(k, shape, r, w):
            layer = int(k.split("layer")[1][0])
            return ("full",) if layer == r + 1 else ("absent",)
        self.roundtrip(spec, 4, stage, 4, fsdp(4))

    def test_rank_holding_nothing(self):
        spec = {f"model.{k}": (v, torch.float32) for k, v in MLP.items()}

        def ranks01(k, shape, r, w):
            return ("mesh", [2], [0, 1], [S(0)]) if r < 2 else ("absent",)
        self.roundtrip(spec, 3, ranks01, 3, lambda k, s, r, w: ("full",) if r == 2 else ("absent",))

    # --- FSDP2 (seed 004) ------------------------------------------------------------------
    def test_fsdp2_dims_2_to_5_with_empty_shards(self):
        spec = {f"model.w{d}": ((d, 3), torch.float32) for d in range(2, 6)}
        spec.update({f"model.m{d}": ((d, d), torch.float32) for d in range(2, 6)})
        one_d = lambda k, s, r, w: ("mesh", [w], None, [S(0)])
        two_d = lambda k, s, r, w: ("mesh", [2, w // 2], None, [S(0), S(1)])
        self.roundtrip(spec, 4, one_d, 4, one_d)
        shutil.rmtree(self.path)
        self.roundtrip(spec, 4, two_d, 4, two_d)
        run(4, load_rank, self.path, spec, one_d)

    def test_full_state_on_rank0_only(self):
        spec = model_and_adam(DUMMY)
        run(4, save_rank, self.path, spec, fsdp(4))
        res = run(4, load_rank, self.path, spec, lambda k, s, r, w: ("full",) if r == 0 else ("absent",))
        self.assertEqual(res[0]["checked"], len(spec))
        self.assertEqual([r["checked"] for r in res[1:]], [0, 0, 0])

    def test_world_size_change(self):
        spec = model_and_adam(SIMPLE_UNEVEN)
        run(4, save_rank, self.path, spec, fsdp(4))
        for world in (2, 3, 1):
            with self.subTest(world=world):
                run(world, load_rank, self.path, spec, fsdp(world))

    def test_eight_ranks_2d(self):
        spec = model_and_adam(DUMMY)
        for layout in (hsdp, fsdp_tp):
            run(8, save_rank, self.path, spec, layout)
            run(4, load_rank, self.path, spec, fsdp(4))
            shutil.rmtree(self.path)

    def test_explicit_irregular_chunks(self):
        # Flat-parameter style pieces of uneven sizes, then a sharded load on 2 ranks.
        rows = [(0, 3), (3, 1), (4, 6)]
        spec = {"model.flat": ((10, 4), torch.float32)}
        chunked = lambda k, s, r, w: ("chunk", [rows[r][0], 0], [rows[r][1], 4])
        self.roundtrip(spec, 3, chunked, 2, fsdp(2))

    # --- failures ---------------------------------------------------------------------------
    def test_killed_rank_gives_every_other_rank_an_error(self):
        spec = {f"model.{k}": (v, torch.float32) for k, v in MLP.items()}
        run(3, save_rank, self.path, spec, fsdp(3))

        def load_or_die(rank, world, port):
            ctx = L.Context.tcp(rank, world, port, timeout_s=4)
            if rank == 2:
                os._exit(0)  # dies after joining, before the collective load
            st = L.State()
            st.add_tensor("model.net1.bias", torch.empty(16))
            t0 = time.monotonic()
            try:
                L.load(ctx, st, self.path)
            except L.DcpError as e:
                return (e.status, e.message, time.monotonic() - t0)
            return None

        res = [r for r in run(3, load_or_die, timeout=60, may_vanish=(2,)) if r is not None]
        self.assertEqual(len(res), 2)
        for status, message, elapsed in res:
            self.assertIn(status, (9, 10), message)
            self.assertIn("rank 2", message)
            self.assertLess(elapsed, 15)

    def test_placement_shape_mismatch_names_both_shapes(self):
        def wrong(rank, world, port):
            ctx = L.Context.tcp(rank, world, port)
            mesh = L.Mesh(ctx, [2])
            st = L.State()
            try:
                st.add_tensor_sharded("w", torch.zeros(5, 4), [10, 4], mesh, [S(1)])
            except L.DcpError as e:
                return e.message
        msgs = run(2, wrong)
        self.assertIn("[5, 4]", msgs[0])
        self.assertIn("[10, 2]", msgs[0])


if __name__ == "__main__":
    unittest.main(verbosity=2)
