use super::{dcp_status, free_box, guard, invalid, mut_arg, threads_arg};
use crate::engine::{DirectIo, LoadOptions, SaveOptions};

/// Options of `dcp_save`. Defaults: overwrite off, 4 writer threads, O_DIRECT on where the file
/// system allows it. Thread safety: not shared; one thread at a time.
pub struct dcp_save_options {
    pub(crate) inner: SaveOptions,
}

/// Options of `dcp_load`. Defaults: strict, CRC-32 verification on, 4 reader threads,
/// direct I/O AUTO, broadcast of replicated boxes on. Thread safety: not shared; one thread at
/// a time.
pub struct dcp_load_options {
    pub(crate) inner: LoadOptions,
}

/// Creates save options with the defaults. `*out` is owned by the caller; free it with
/// `dcp_save_options_free`. Options are read only during the calls they are passed to. The
/// option functions are local (not collective). Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_save_options_new(out: *mut *mut dcp_save_options) -> dcp_status {
    guard("dcp_save_options_new", || {
        // SAFETY: `out` is NULL or writable (header contract).
        let out = unsafe { mut_arg(out, "out")? };
        *out = Box::into_raw(Box::new(dcp_save_options {
            inner: SaveOptions::default(),
        }));
        Ok(())
    })
}

/// Frees save options. NULL is a no-op. Not collective; not concurrent with other uses of `opts`.
#[no_mangle]
pub unsafe extern "C" fn dcp_save_options_free(opts: *mut dcp_save_options) {
    // SAFETY: `opts` is NULL or from the matching `_new`, freed once (header contract).
    unsafe { free_box(opts) }
}

/// Replace a committed checkpoint at the destination. Off (the default), saving where a
/// checkpoint exists fails with `DCP_ERROR_ALREADY_EXISTS` ("checkpoint already exists").
/// Not collective; not thread-safe (one thread per `opts`).
#[no_mangle]
pub unsafe extern "C" fn dcp_save_options_set_overwrite(opts: *mut dcp_save_options, overwrite: bool) -> dcp_status {
    guard("dcp_save_options_set_overwrite", || {
        // SAFETY: `opts` is NULL or from the matching `_new` (header contract).
        unsafe { mut_arg(opts, "opts")? }.inner.overwrite = overwrite;
        Ok(())
    })
}

/// Writer threads per rank, 1..=1024. Not collective; not thread-safe (one thread per `opts`).
#[no_mangle]
pub unsafe extern "C" fn dcp_save_options_set_threads(opts: *mut dcp_save_options, threads: u32) -> dcp_status {
    guard("dcp_save_options_set_threads", || {
        let threads = threads_arg(threads)?;
        // SAFETY: `opts` is NULL or from the matching `_new` (header contract).
        unsafe { mut_arg(opts, "opts")? }.inner.threads = threads;
        Ok(())
    })
}

/// Use O_DIRECT for data files where the file system supports it (default on).
/// Not collective; not thread-safe (one thread per `opts`).
#[no_mangle]
pub unsafe extern "C" fn dcp_save_options_set_direct_io(opts: *mut dcp_save_options, direct_io: bool) -> dcp_status {
    guard("dcp_save_options_set_direct_io", || {
        // SAFETY: `opts` is NULL or from the matching `_new` (header contract).
        unsafe { mut_arg(opts, "opts")? }.inner.direct_io = direct_io;
        Ok(())
    })
}

/// When an async save is still in flight on the context: wait for it (default) or fail with
/// `DCP_ERROR_BUSY`. Not collective; not thread-safe (one thread per `opts`).
#[no_mangle]
pub unsafe extern "C" fn dcp_save_options_set_wait_if_busy(opts: *mut dcp_save_options, wait: bool) -> dcp_status {
    guard("dcp_save_options_set_wait_if_busy", || {
        // SAFETY: `opts` is NULL or from the matching `_new` (header contract).
        unsafe { mut_arg(opts, "opts")? }.inner.wait_if_busy = wait;
        Ok(())
    })
}

/// Async saves: copy contiguous CUDA tensors to the host after `dcp_save_async` returns, on a
/// stream of libdcp's, ordered after the work queued on each tensor's registered stream (NULL:
/// the legacy default stream). The caller's forward and backward passes then overlap the
/// copy; before changing the tensors it calls `dcp_future_stream_wait` (see
/// `dcp_save_async`). Default off: `dcp_save_async` returns once everything is copied.
/// Not collective; not thread-safe (one thread per `opts`).
#[no_mangle]
pub unsafe extern "C" fn dcp_save_options_set_stream_ordered(opts: *mut dcp_save_options, enabled: bool) -> dcp_status {
    guard("dcp_save_options_set_stream_ordered", || {
        // SAFETY: `opts` is NULL or from the matching `_new` (header contract).
        unsafe { mut_arg(opts, "opts")? }.inner.stream_ordered = enabled;
        Ok(())
    })
}

/// Async saves: up to `max_bytes` per device of contiguous CUDA tensors are copied device to
/// device, on the tensors' streams, into a buffer libdcp allocates once and keeps between
/// saves (`dcp_context_device_snapshot_bytes`, `dcp_context_release_device_snapshots`); the
/// caller may change those tensors as soon as `dcp_save_async` returns, and they drain to the
/// host in the background. Tensors that do not fit are stream-ordered (see
/// `dcp_save_options_set_stream_ordered`). 0 (default): no snapshot.
/// Not collective; not thread-safe (one thread per `opts`).
#[no_mangle]
pub unsafe extern "C" fn dcp_save_options_set_device_snapshot(opts: *mut dcp_save_options, max_bytes: u64) -> dcp_status {
    guard("dcp_save_options_set_device_snapshot", || {
        // SAFETY: `opts` is NULL or from the matching `_new` (header contract).
        unsafe { mut_arg(opts, "opts")? }.inner.device_snapshot_bytes = max_bytes;
        Ok(())
    })
}

/// Values of `dcp_load_options_set_direct_io`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub enum dcp_direct_io {
    /// O_DIRECT for data mostly not in the page cache, buffered reads for cached data.
    DCP_DIRECT_IO_AUTO = 0,
    DCP_DIRECT_IO_ON = 1,
    DCP_DIRECT_IO_OFF = 2,
}

/// Creates load options with the defaults. `*out` is owned by the caller; free it with
/// `dcp_load_options_free`. The option functions are local (not collective). Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_load_options_new(out: *mut *mut dcp_load_options) -> dcp_status {
    guard("dcp_load_options_new", || {
        // SAFETY: `out` is NULL or writable (header contract).
        let out = unsafe { mut_arg(out, "out")? };
        *out = Box::into_raw(Box::new(dcp_load_options {
            inner: LoadOptions::default(),
        }));
        Ok(())
    })
}

/// Frees load options. NULL is a no-op. Not collective; not concurrent with other uses of `opts`.
#[no_mangle]
pub unsafe extern "C" fn dcp_load_options_free(opts: *mut dcp_load_options) {
    // SAFETY: `opts` is NULL or from the matching `_new`, freed once (header contract).
    unsafe { free_box(opts) }
}

/// Strict (default): every registered key must be in the checkpoint with the same dtype and
/// global shape. Partial: keys the checkpoint lacks are skipped and listed by
/// `dcp_state_missing_key` (dtype and shape must still match for keys that exist).
/// Not collective; not thread-safe (one thread per `opts`).
#[no_mangle]
pub unsafe extern "C" fn dcp_load_options_set_strict(opts: *mut dcp_load_options, strict: bool) -> dcp_status {
    guard("dcp_load_options_set_strict", || {
        // SAFETY: `opts` is NULL or from the matching `_new` (header contract).
        unsafe { mut_arg(opts, "opts")? }.inner.strict = strict;
        Ok(())
    })
}

/// Verify the CRC-32 of everything read (default on).
/// Not collective; not thread-safe (one thread per `opts`).
#[no_mangle]
pub unsafe extern "C" fn dcp_load_options_set_verify(opts: *mut dcp_load_options, verify: bool) -> dcp_status {
    guard("dcp_load_options_set_verify", || {
        // SAFETY: `opts` is NULL or from the matching `_new` (header contract).
        unsafe { mut_arg(opts, "opts")? }.inner.verify = verify;
        Ok(())
    })
}

/// Whether reads bypass the page cache: a `dcp_direct_io` value (default AUTO).
/// Not collective; not thread-safe (one thread per `opts`).
#[no_mangle]
pub unsafe extern "C" fn dcp_load_options_set_direct_io(opts: *mut dcp_load_options, mode: i32) -> dcp_status {
    guard("dcp_load_options_set_direct_io", || {
        // SAFETY: `opts` is NULL or from `dcp_load_options_new` (header contract).
        let o = unsafe { mut_arg(opts, "opts")? };
        o.inner.direct_io = match mode {
            m if m == dcp_direct_io::DCP_DIRECT_IO_AUTO as i32 => DirectIo::Auto,
            m if m == dcp_direct_io::DCP_DIRECT_IO_ON as i32 => DirectIo::On,
            m if m == dcp_direct_io::DCP_DIRECT_IO_OFF as i32 => DirectIo::Off,
            other => return Err(invalid(format!("direct I/O mode {other} is not a dcp_direct_io value"))),
        };
        Ok(())
    })
}

/// When several ranks load the same box of a key into GPU memory (replicated tensors), one
/// reads it and NCCL sends it to the others (default on). Used only when every rank of the job
/// has NCCL (`libnccl.so.2`, or `DCP_NCCL_LIBRARY`) and loads into CUDA tensors; the first such
/// load makes an NCCL communicator over the job (collective). Off: every rank reads for itself.
/// Setting it is local; not thread-safe (one thread per `opts`).
#[no_mangle]
pub unsafe extern "C" fn dcp_load_options_set_broadcast(opts: *mut dcp_load_options, enabled: bool) -> dcp_status {
    guard("dcp_load_options_set_broadcast", || {
        // SAFETY: `opts` is NULL or from the matching `_new` (header contract).
        unsafe { mut_arg(opts, "opts")? }.inner.broadcast_replicated = enabled;
        Ok(())
    })
}

/// Reader threads per rank, 1..=1024. Not collective; not thread-safe (one thread per `opts`).
#[no_mangle]
pub unsafe extern "C" fn dcp_load_options_set_threads(opts: *mut dcp_load_options, threads: u32) -> dcp_status {
    guard("dcp_load_options_set_threads", || {
        let threads = threads_arg(threads)?;
        // SAFETY: `opts` is NULL or from the matching `_new` (header contract).
        unsafe { mut_arg(opts, "opts")? }.inner.threads = threads;
        Ok(())
    })
}
