"""ctypes bindings to libdcp's C API, for the interop tests: Python drives libdcp.so exactly as a
C program would (same functions, same arguments), and torch checks the results."""
import ctypes
import os

import torch

_lib = None

DTYPES = {
    torch.float32: 1, torch.float64: 2, torch.float16: 3, torch.bfloat16: 4,
    torch.float8_e4m3fn: 5, torch.float8_e5m2: 6, torch.int64: 7, torch.int32: 8,
    torch.int16: 9, torch.int8: 10, torch.uint8: 11, torch.bool: 12,
    torch.complex64: 13, torch.complex128: 14, torch.uint16: 15, torch.uint32: 16, torch.uint64: 17,
}
VALUE_BYTES, VALUE_INT, VALUE_DOUBLE, VALUE_PICKLE = 1, 2, 3, 4


def lib():
    global _lib
    if _lib is None:
        path = os.environ.get("LIBDCP_SO") or os.path.join(os.path.dirname(__file__), "../../target/release/libdcp.so")
        _lib = ctypes.CDLL(path)
        _lib.dcp_last_error.restype = ctypes.c_char_p
        _lib.dcp_version.restype = ctypes.c_char_p
    return _lib


class DcpError(Exception):
    def __init__(self, status, message):
        super().__init__(f"status {status}: {message}")
        self.status = status
        self.message = message


def check(status):
    if status != 0:
        raise DcpError(status, lib().dcp_last_error().decode())


def _dims(values):
    arr = (ctypes.c_int64 * max(len(values), 1))(*values)
    return arr


class Context:
    def __init__(self, handle=None):
        self.h = ctypes.c_void_p()
        if handle is None:
            check(lib().dcp_context_new_local(ctypes.byref(self.h)))
        else:
            self.h = handle

    @classmethod
    def tcp(cls, rank, world, port, addr="127.0.0.1", timeout_s=60):
        h = ctypes.c_void_p()
        check(lib().dcp_context_new_tcp(ctypes.c_int32(rank), ctypes.c_int32(world), addr.encode(), ctypes.c_uint16(port),
                                        ctypes.c_uint64(int(timeout_s * 1000)), ctypes.byref(h)))
        return cls(h)

    @classmethod
    def from_env(cls, timeout_s=60):
        h = ctypes.c_void_p()
        check(lib().dcp_context_new_from_env(ctypes.c_uint64(int(timeout_s * 1000)), ctypes.byref(h)))
        return cls(h)

    def rank(self):
        r, w = ctypes.c_int32(), ctypes.c_int32()
        check(lib().dcp_context_rank(self.h, ctypes.byref(r), ctypes.byref(w)))
        return r.value, w.value

    def barrier(self):
        check(lib().dcp_context_barrier(self.h))

    def staging_bytes(self):
        """(pinned, ordinary) bytes held by the staging pool."""
        p, h = ctypes.c_uint64(), ctypes.c_uint64()
        check(lib().dcp_context_staging_bytes(self.h, ctypes.byref(p), ctypes.byref(h)))
        return p.value, h.value

    def device_snapshot_bytes(self):
        """Device memory kept for snapshot saves."""
        n = ctypes.c_uint64()
        check(lib().dcp_context_device_snapshot_bytes(self.h, ctypes.byref(n)))
        return n.value

    def release_device_snapshots(self):
        check(lib().dcp_context_release_device_snapshots(self.h))

    def set_storage_option(self, key, value):
        check(lib().dcp_context_set_storage_option(self.h, key.encode(), str(value).encode()))

    def set_staging_budget(self, nbytes):
        check(lib().dcp_context_set_staging_budget(self.h, ctypes.c_uint64(nbytes)))

    def __del__(self):
        if getattr(self, "h", None):
            lib().dcp_context_free(self.h)


REPLICATE = ("R",)


def Shard(d):
    return ("S", d)


def StridedShard(d):
    return ("SS", d)


def _placement_code(p):
    if p[0] == "R":
        return -1
    return p[1] if p[0] == "S" else -2 - p[1]


class Mesh:
    """A device mesh bound to a context's rank (dcp_mesh_new)."""

    def __init__(self, ctx, shape, ranks=None, names=None):
        self.shape = list(shape)
        n = 1
        for s in shape:
            n *= s
        self.ranks = list(ranks) if ranks is not None else list(range(n))
        self.h = ctypes.c_void_p()
        r = (ctypes.c_int32 * n)(*self.ranks)
        nm = (ctypes.c_char_p * len(shape))(*[x.encode() for x in names]) if names else None
        check(lib().dcp_mesh_new(ctx.h, len(shape), _dims(self.shape), r, nm, ctypes.byref(self.h)))

    def __del__(self):
        if getattr(self, "h", None):
            lib().dcp_mesh_free(self.h)


class State:
    """Registers torch tensors (their memory, kept alive here) and values."""

    def __init__(self):
        self.h = ctypes.c_void_p()
        check(lib().dcp_state_new(ctypes.byref(self.h)))
        self._keep = []

    def __del__(self):
        if getattr(self, "h", None):
            lib().dcp_state_free(self.h)

    def add_tensor(self, fqn, t, global_shape=None, offsets=None):
        assert t.device.type == "cpu"
        self._keep.append(t)
        sizes = _dims(list(t.shape))
        strides = _dims(list(t.stride()))
        # The buffer spans from the view's first element to its furthest one.
        elem = t.element_size()
        extent = 0 if t.numel() == 0 else (sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1) * elem
        ptr = ctypes.c_void_p(t.data_ptr())
        if global_shape is None:
            check(lib().dcp_state_add_tensor(self.h, fqn.encode(), DTYPES[t.dtype], t.dim(), sizes, strides, ptr, ctypes.c_uint64(extent)))
        else:
            check(lib().dcp_state_add_tensor_chunk(self.h, fqn.encode(), DTYPES[t.dtype], t.dim(), sizes, strides, ptr,
                                                   ctypes.c_uint64(extent), _dims(list(global_shape)), _dims(list(offsets))))

    def add_tensor_sharded(self, fqn, t, global_shape, mesh, placements):
        assert t.device.type == "cpu"
        self._keep.append(t)
        elem = t.element_size()
        extent = 0 if t.numel() == 0 else (sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1) * elem
        codes = (ctypes.c_int32 * len(placements))(*[_placement_code(p) for p in placements])
        check(lib().dcp_state_add_tensor_sharded(self.h, fqn.encode(), DTYPES[t.dtype], t.dim(), _dims(list(t.shape)),
                                                 _dims(list(t.stride())), ctypes.c_void_p(t.data_ptr()), ctypes.c_uint64(extent),
                                                 _dims(list(global_shape)), mesh.h, codes))

    def set_cuda(self, fqn, device, stream=0):
        check(lib().dcp_state_set_cuda(self.h, fqn.encode(), ctypes.c_int32(device), ctypes.c_void_p(stream)))

    def add_tensor_any(self, fqn, t, **kw):
        """Registers a CPU or CUDA tensor (CUDA: on the current stream)."""
        if t.device.type == "cuda":
            self._add_device(fqn, t, kw)
        else:
            self.add_tensor(fqn, t, **kw)

    def _add_device(self, fqn, t, kw):
        self._keep.append(t)
        elem = t.element_size()
        extent = 0 if t.numel() == 0 else (sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1) * elem
        ptr = ctypes.c_void_p(t.data_ptr())
        if kw.get("global_shape") is None:
            check(lib().dcp_state_add_tensor(self.h, fqn.encode(), DTYPES[t.dtype], t.dim(), _dims(list(t.shape)), _dims(list(t.stride())), ptr, ctypes.c_uint64(extent)))
        else:
            check(lib().dcp_state_add_tensor_chunk(self.h, fqn.encode(), DTYPES[t.dtype], t.dim(), _dims(list(t.shape)), _dims(list(t.stride())), ptr,
                                                   ctypes.c_uint64(extent), _dims(list(kw["global_shape"])), _dims(list(kw["offsets"]))))
        import torch as _t
        self.set_cuda(fqn, t.device.index or 0, _t.cuda.current_stream(t.device).cuda_stream)

    def add_bytes(self, fqn, b):
        check(lib().dcp_state_add_bytes(self.h, fqn.encode(), b, ctypes.c_size_t(len(b))))

    def add_int(self, fqn, v):
        check(lib().dcp_state_add_int(self.h, fqn.encode(), ctypes.c_int64(v)))

    def add_double(self, fqn, v):
        check(lib().dcp_state_add_double(self.h, fqn.encode(), ctypes.c_double(v)))

    def add_literal(self, fqn, text):
        check(lib().dcp_state_add_literal(self.h, fqn.encode(), text.encode()))

    def add_pickle(self, fqn, data):
        check(lib().dcp_state_add_pickle(self.h, fqn.encode(), data, ctypes.c_size_t(len(data))))

    def set_path(self, fqn, parts):
        n = len(parts)
        arr = (ctypes.c_char_p * n)(*[str(p).encode() for p in parts])
        flags = (ctypes.c_uint8 * n)(*[1 if isinstance(p, int) else 0 for p in parts])
        check(lib().dcp_state_set_path(self.h, fqn.encode(), ctypes.c_size_t(n), arr, flags))

    def get_bytes(self, fqn):
        n = ctypes.c_size_t()
        kind = ctypes.c_int32()
        st = lib().dcp_state_get_bytes(self.h, fqn.encode(), None, ctypes.c_size_t(0), ctypes.byref(n), ctypes.byref(kind))
        if st not in (0, 14):
            check(st)
        buf = ctypes.create_string_buffer(max(n.value, 1))
        check(lib().dcp_state_get_bytes(self.h, fqn.encode(), buf, ctypes.c_size_t(n.value), ctypes.byref(n), ctypes.byref(kind)))
        return kind.value, buf.raw[: n.value]

    def get_int(self, fqn):
        v = ctypes.c_int64()
        check(lib().dcp_state_get_int(self.h, fqn.encode(), ctypes.byref(v)))
        return v.value

    def get_double(self, fqn):
        v = ctypes.c_double()
        check(lib().dcp_state_get_double(self.h, fqn.encode(), ctypes.byref(v)))
        return v.value

    def get_literal(self, fqn):
        n = ctypes.c_size_t()
        lib().dcp_state_get_literal(self.h, fqn.encode(), None, ctypes.c_size_t(0), ctypes.byref(n))
        buf = ctypes.create_string_buffer(n.value + 1)
        check(lib().dcp_state_get_literal(self.h, fqn.encode(), buf, ctypes.c_size_t(n.value + 1), ctypes.byref(n)))
        return buf.value.decode()

    def missing(self):
        n = ctypes.c_size_t()
        check(lib().dcp_state_num_missing(self.h, ctypes.byref(n)))
        out = []
        for i in range(n.value):
            p = ctypes.c_char_p()
            check(lib().dcp_state_missing_key(self.h, ctypes.c_size_t(i), ctypes.byref(p)))
            out.append(p.value.decode())
        return out


def save(ctx, state, path, overwrite=False, threads=None):
    opts = ctypes.c_void_p()
    check(lib().dcp_save_options_new(ctypes.byref(opts)))
    try:
        check(lib().dcp_save_options_set_overwrite(opts, ctypes.c_bool(overwrite)))
        if threads:
            check(lib().dcp_save_options_set_threads(opts, ctypes.c_uint32(threads)))
        check(lib().dcp_save(ctx.h, state.h, str(path).encode(), opts))
    finally:
        lib().dcp_save_options_free(opts)


class Future:
    def __init__(self, h):
        self.h = h

    def wait(self):
        check(lib().dcp_future_wait(self.h))

    def done(self):
        d = ctypes.c_bool()
        check(lib().dcp_future_done(self.h, ctypes.byref(d)))
        return d.value

    def stream_wait(self, stream=0):
        """Makes CUDA stream `stream` (a cudaStream_t as an int, e.g.
        torch.cuda.current_stream().cuda_stream) wait for the save's staging copies, without
        blocking the CPU. Call it before changing the saved tensors (stream-ordered saves)."""
        check(lib().dcp_future_stream_wait(self.h, ctypes.c_void_p(stream)))

    def wait_staged(self):
        """Blocks the CPU until the save's staging copies are done."""
        check(lib().dcp_future_wait_staged(self.h))

    def staging(self):
        """What staging did on this rank: a dict of device_snapshot_bytes, stream_ordered_bytes,
        copied_bytes (all bytes staged) and blocked_seconds."""
        r = StagingReport()
        check(lib().dcp_future_staging_report(self.h, ctypes.byref(r)))
        return {f: getattr(r, f) for f, _ in StagingReport._fields_}

    def __del__(self):
        if getattr(self, "h", None):
            lib().dcp_future_free(self.h)


class StagingReport(ctypes.Structure):
    _fields_ = [
        ("device_snapshot_bytes", ctypes.c_uint64),
        ("stream_ordered_bytes", ctypes.c_uint64),
        ("copied_bytes", ctypes.c_uint64),
        ("blocked_seconds", ctypes.c_double),
    ]


def save_async(ctx, state, path, overwrite=False, threads=None, wait_if_busy=True, stream_ordered=False,
               device_snapshot_bytes=0):
    """Async save. stream_ordered: CUDA tensors are copied after the call returns, ordered after
    the work queued on their registered streams; call Future.stream_wait (or wait_staged) before
    changing them. device_snapshot_bytes > 0: up to that many bytes of CUDA tensors are copied
    device to device on their streams during the call (the caller may change them at once); the
    rest is stream-ordered."""
    opts = ctypes.c_void_p()
    check(lib().dcp_save_options_new(ctypes.byref(opts)))
    try:
        check(lib().dcp_save_options_set_overwrite(opts, ctypes.c_bool(overwrite)))
        check(lib().dcp_save_options_set_wait_if_busy(opts, ctypes.c_bool(wait_if_busy)))
        if stream_ordered:
            check(lib().dcp_save_options_set_stream_ordered(opts, ctypes.c_bool(True)))
        if device_snapshot_bytes:
            check(lib().dcp_save_options_set_device_snapshot(opts, ctypes.c_uint64(device_snapshot_bytes)))
        if threads:
            check(lib().dcp_save_options_set_threads(opts, ctypes.c_uint32(threads)))
        h = ctypes.c_void_p()
        check(lib().dcp_save_async(ctx.h, state.h, str(path).encode(), opts, ctypes.byref(h)))
        return Future(h)
    finally:
        lib().dcp_save_options_free(opts)


def cuda_available():
    lib().dcp_cuda_available.restype = ctypes.c_bool
    return lib().dcp_cuda_available()


DIRECT_AUTO, DIRECT_ON, DIRECT_OFF = 0, 1, 2


def load(ctx, state, path, strict=True, verify=True, direct_io=None, threads=None):
    opts = ctypes.c_void_p()
    check(lib().dcp_load_options_new(ctypes.byref(opts)))
    try:
        check(lib().dcp_load_options_set_strict(opts, ctypes.c_bool(strict)))
        check(lib().dcp_load_options_set_verify(opts, ctypes.c_bool(verify)))
        if direct_io is not None:
            check(lib().dcp_load_options_set_direct_io(opts, ctypes.c_int32(direct_io)))
        if threads:
            check(lib().dcp_load_options_set_threads(opts, ctypes.c_uint32(threads)))
        check(lib().dcp_load(ctx.h, state.h, str(path).encode(), opts))
    finally:
        lib().dcp_load_options_free(opts)


class KeyInfo(ctypes.Structure):
    _fields_ = [("fqn", ctypes.c_char_p), ("kind", ctypes.c_int32), ("dtype", ctypes.c_int32),
                ("ndim", ctypes.c_int32), ("shape", ctypes.POINTER(ctypes.c_int64)), ("num_chunks", ctypes.c_size_t)]


def append_figures(lines):
    """Prints a table of figures (lines of text) and appends it to the file $DCP_FIGURES names,
    where scripts/test.sh collects the reliability tables."""
    text = "\n".join(lines)
    print(text, flush=True)
    if os.environ.get("DCP_FIGURES"):
        with open(os.environ["DCP_FIGURES"], "a") as f:
            f.write(text + "\n")


def raw_bytes(t):
    """The tensor's elements, in logical (row-major) order, as uint8."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def find_in_files(d, needle, limit=-1):
    """(path, offset) of `needle` in the checkpoint's data files (searching the first `limit` bytes)."""
    for name in sorted(os.listdir(d)):
        if name.startswith("."):
            continue
        p = os.path.join(d, name)
        with open(p, "rb") as f:
            data = f.read(limit)
        i = data.find(needle)
        if i >= 0:
            return p, i
    raise AssertionError(f"pattern not found in {d}")


def xor_byte(path, offset, mask=0x01):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ mask]))


def poison(t):
    """Fills a contiguous tensor's bytes with 0xA5 (any dtype and device, 0-d and empty too), so
    that a load that writes nothing into it cannot pass for a correct one; returns it."""
    t.view(-1).view(torch.uint8).fill_(0xA5)
    return t


class Checkpoint:
    def __init__(self, path):
        self.h = ctypes.c_void_p()
        check(lib().dcp_checkpoint_open(str(path).encode(), ctypes.byref(self.h)))

    def __del__(self):
        if getattr(self, "h", None):
            lib().dcp_checkpoint_free(self.h)

    def keys(self):
        n = ctypes.c_size_t()
        check(lib().dcp_checkpoint_num_keys(self.h, ctypes.byref(n)))
        out = {}
        for i in range(n.value):
            info = KeyInfo()
            check(lib().dcp_checkpoint_key(self.h, ctypes.c_size_t(i), ctypes.byref(info)))
            out[info.fqn.decode()] = (info.kind, info.dtype, [info.shape[j] for j in range(info.ndim)], info.num_chunks)
        return out

    def read_tensor(self, fqn, like, offsets=None):
        """Reads into a fresh tensor shaped like `like` (dtype and box sizes); offsets default 0."""
        out = poison(torch.empty_like(like, memory_format=torch.contiguous_format))
        offs = offsets or [0] * out.dim()
        check(lib().dcp_checkpoint_read_tensor(self.h, fqn.encode(), out.dim(), _dims(offs), _dims(list(out.shape)), None,
                                               ctypes.c_void_p(out.data_ptr()), ctypes.c_uint64(out.numel() * out.element_size())))
        return out

    def read_bytes(self, fqn):
        n = ctypes.c_size_t()
        kind = ctypes.c_int32()
        lib().dcp_checkpoint_read_bytes(self.h, fqn.encode(), None, ctypes.c_size_t(0), ctypes.byref(n), ctypes.byref(kind))
        buf = ctypes.create_string_buffer(max(n.value, 1))
        check(lib().dcp_checkpoint_read_bytes(self.h, fqn.encode(), buf, ctypes.c_size_t(n.value), ctypes.byref(n), ctypes.byref(kind)))
        return kind.value, buf.raw[: n.value]


# --- Additions for test_interop.py (additive; the functions above are unchanged). ---

def _state_value_kind(self, fqn):
    k = ctypes.c_int32()
    check(lib().dcp_state_value_kind(self.h, fqn.encode(), ctypes.byref(k)))
    return k.value


def _state_loaded(self, fqn):
    b = ctypes.c_bool()
    check(lib().dcp_state_loaded(self.h, fqn.encode(), ctypes.byref(b)))
    return b.value


State.value_kind = _state_value_kind
State.loaded = _state_loaded


def _ckpt_read_int(self, fqn):
    v = ctypes.c_int64()
    check(lib().dcp_checkpoint_read_int(self.h, fqn.encode(), ctypes.byref(v)))
    return v.value


def _ckpt_read_double(self, fqn):
    v = ctypes.c_double()
    check(lib().dcp_checkpoint_read_double(self.h, fqn.encode(), ctypes.byref(v)))
    return v.value


def _ckpt_read_literal(self, fqn):
    n = ctypes.c_size_t()
    lib().dcp_checkpoint_read_literal(self.h, fqn.encode(), None, ctypes.c_size_t(0), ctypes.byref(n))
    buf = ctypes.create_string_buffer(n.value + 1)
    check(lib().dcp_checkpoint_read_literal(self.h, fqn.encode(), buf, ctypes.c_size_t(n.value + 1), ctypes.byref(n)))
    return buf.value.decode()


Checkpoint.read_int = _ckpt_read_int
Checkpoint.read_double = _ckpt_read_double
Checkpoint.read_literal = _ckpt_read_literal
# Uniform names, so one checker serves a loaded State and an open Checkpoint.
Checkpoint.get_bytes = Checkpoint.read_bytes
Checkpoint.get_int = _ckpt_read_int
Checkpoint.get_double = _ckpt_read_double
Checkpoint.get_literal = _ckpt_read_literal
