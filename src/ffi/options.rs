use super::{dcp_status, free_box, guard, invalid, mut_arg, threads_arg};
use crate::engine::{DirectIo, LoadOptions, SaveOptions};

/// Options of `dcp_save`. Defaults: overwrite off, 4 writer threads, O_DIRECT on where the file
/// system allows it. Thread safety: not shared; one thread at a time.
pub struct dcp_save_options {
    pub(crate) inner: SaveOptions,
}

/// Options of `dcp_load`. Defaults: strict, CRC-32 verification on, 4 reader threads.
pub struct dcp_load_options {
    pub(crate) inner: LoadOptions,
}

/// Creates save options with the defaults. `*out` is owned by the caller; free it with
/// `dcp_save_options_free`.
#[no_mangle]
pub unsafe extern "C" fn dcp_save_options_new(out: *mut *mut dcp_save_options) -> dcp_status {
    guard("dcp_save_options_new", || {
        let out = mut_arg(out, "out")?;
        *out = Box::into_raw(Box::new(dcp_save_options {
            inner: SaveOptions::default(),
        }));
        Ok(())
    })
}

/// Frees save options. NULL is a no-op.
#[no_mangle]
pub unsafe extern "C" fn dcp_save_options_free(opts: *mut dcp_save_options) {
    free_box(opts)
}

/// Replace a committed checkpoint at the destination. Off (the default), saving where a
/// checkpoint exists fails with `DCP_ERROR_ALREADY_EXISTS` ("checkpoint already exists").
#[no_mangle]
pub unsafe extern "C" fn dcp_save_options_set_overwrite(opts: *mut dcp_save_options, overwrite: bool) -> dcp_status {
    guard("dcp_save_options_set_overwrite", || {
        mut_arg(opts, "opts")?.inner.overwrite = overwrite;
        Ok(())
    })
}

/// Writer threads per rank, 1..=1024.
#[no_mangle]
pub unsafe extern "C" fn dcp_save_options_set_threads(opts: *mut dcp_save_options, threads: u32) -> dcp_status {
    guard("dcp_save_options_set_threads", || {
        let threads = threads_arg(threads)?;
        mut_arg(opts, "opts")?.inner.threads = threads;
        Ok(())
    })
}

/// Use O_DIRECT for data files where the file system supports it (default on).
#[no_mangle]
pub unsafe extern "C" fn dcp_save_options_set_direct_io(opts: *mut dcp_save_options, direct_io: bool) -> dcp_status {
    guard("dcp_save_options_set_direct_io", || {
        mut_arg(opts, "opts")?.inner.direct_io = direct_io;
        Ok(())
    })
}

/// When an async save is still in flight on the context: wait for it (default) or fail with
/// `DCP_ERROR_BUSY`.
#[no_mangle]
pub unsafe extern "C" fn dcp_save_options_set_wait_if_busy(opts: *mut dcp_save_options, wait: bool) -> dcp_status {
    guard("dcp_save_options_set_wait_if_busy", || {
        mut_arg(opts, "opts")?.inner.wait_if_busy = wait;
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

/// Creates load options with the defaults. Free with `dcp_load_options_free`.
#[no_mangle]
pub unsafe extern "C" fn dcp_load_options_new(out: *mut *mut dcp_load_options) -> dcp_status {
    guard("dcp_load_options_new", || {
        let out = mut_arg(out, "out")?;
        *out = Box::into_raw(Box::new(dcp_load_options {
            inner: LoadOptions::default(),
        }));
        Ok(())
    })
}

/// Frees load options. NULL is a no-op.
#[no_mangle]
pub unsafe extern "C" fn dcp_load_options_free(opts: *mut dcp_load_options) {
    free_box(opts)
}

/// Strict (default): every registered key must be in the checkpoint with the same dtype and
/// global shape. Partial: keys the checkpoint lacks are skipped and listed by
/// `dcp_state_missing_key` (dtype and shape must still match for keys that exist).
#[no_mangle]
pub unsafe extern "C" fn dcp_load_options_set_strict(opts: *mut dcp_load_options, strict: bool) -> dcp_status {
    guard("dcp_load_options_set_strict", || {
        mut_arg(opts, "opts")?.inner.strict = strict;
        Ok(())
    })
}

/// Verify the CRC-32 of everything read (default on).
#[no_mangle]
pub unsafe extern "C" fn dcp_load_options_set_verify(opts: *mut dcp_load_options, verify: bool) -> dcp_status {
    guard("dcp_load_options_set_verify", || {
        mut_arg(opts, "opts")?.inner.verify = verify;
        Ok(())
    })
}

/// Whether reads bypass the page cache: a `dcp_direct_io` value (default AUTO).
#[no_mangle]
pub unsafe extern "C" fn dcp_load_options_set_direct_io(opts: *mut dcp_load_options, mode: i32) -> dcp_status {
    guard("dcp_load_options_set_direct_io", || {
        let o = mut_arg(opts, "opts")?;
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
#[no_mangle]
pub unsafe extern "C" fn dcp_load_options_set_broadcast(opts: *mut dcp_load_options, enabled: bool) -> dcp_status {
    guard("dcp_load_options_set_broadcast", || {
        mut_arg(opts, "opts")?.inner.broadcast_replicated = enabled;
        Ok(())
    })
}

/// Reader threads per rank, 1..=1024.
#[no_mangle]
pub unsafe extern "C" fn dcp_load_options_set_threads(opts: *mut dcp_load_options, threads: u32) -> dcp_status {
    guard("dcp_load_options_set_threads", || {
        let threads = threads_arg(threads)?;
        mut_arg(opts, "opts")?.inner.threads = threads;
        Ok(())
    })
}
