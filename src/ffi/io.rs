use super::{dcp_context, dcp_load_options, dcp_save_options, dcp_state, dcp_status, guard, mut_arg, ref_arg, str_arg};
use crate::engine::{LoadOptions, LoadReport, SaveOptions};
use std::ffi::{c_char, c_void};

/// Saves the registered state to the checkpoint directory `path`.
///
/// Collective: every rank of `ctx` calls it with its own state and the same `path`. Data files
/// are written and synced, then `.metadata` is committed atomically; the previous content of
/// `path` is not a checkpoint again until the commit. `opts` may be NULL (defaults); nothing
/// is kept after the call. Registered tensor memory is read during the call and must not be
/// modified until it returns. Thread safety: one save or load per context at a time.
#[no_mangle]
pub unsafe extern "C" fn dcp_save(
    ctx: *mut dcp_context,
    state: *const dcp_state,
    path: *const c_char,
    opts: *const dcp_save_options,
) -> dcp_status {
    guard("dcp_save", || {
        // SAFETY: every pointer is NULL or valid (header contract).
        let (ctx, state, path, opts) = unsafe {
            (
                mut_arg(ctx, "ctx")?,
                ref_arg(state, "state")?,
                str_arg(path, "path")?,
                opts.as_ref(),
            )
        };
        let default = SaveOptions::default();
        let opts = opts.map(|o| &o.inner).unwrap_or(&default);
        crate::engine::save(&ctx.inner, &state.inner, path, opts)?;
        Ok(())
    })
}

/// Loads the checkpoint at `path` into the registered state, in place: tensors are written
/// into the registered buffers (resharded from whatever layout was saved); bytes and scalars
/// are stored in the state (read them with `dcp_state_get_*`).
///
/// Collective: every rank of `ctx` calls it. `opts` may be NULL (strict, verified). On error,
/// registered buffers may be partly overwritten; nothing on disk is changed. Thread safety:
/// one save or load per context at a time; nothing else may use the state meanwhile.
#[no_mangle]
pub unsafe extern "C" fn dcp_load(
    ctx: *mut dcp_context,
    state: *mut dcp_state,
    path: *const c_char,
    opts: *const dcp_load_options,
) -> dcp_status {
    guard("dcp_load", || {
        // SAFETY: every pointer is NULL or valid (header contract).
        let (ctx, state, path, opts) = unsafe {
            (
                mut_arg(ctx, "ctx")?,
                mut_arg(state, "state")?,
                str_arg(path, "path")?,
                opts.as_ref(),
            )
        };
        let default = LoadOptions::default();
        let opts = opts.map(|o| &o.inner).unwrap_or(&default);
        // A failed load reports nothing missing.
        state.last_load = LoadReport::default();
        state.last_load = crate::engine::load(&ctx.inner, &mut state.inner, path, opts)?;
        Ok(())
    })
}

/// The handle of an async save (`dcp_save_async`). Thread safety: may be waited on or polled
/// from any thread.
pub struct dcp_future {
    pub(crate) inner: crate::engine::SaveFuture,
}

/// Saves in the background. Returns once this rank's registered state has been copied into
/// staging memory (page-locked host memory for CUDA tensors, reused across saves): from then
/// on the caller may modify or free its tensors, and the checkpoint holds the values they had
/// during this call. Writing and committing continue on a libdcp thread.
///
/// With `dcp_save_options_set_stream_ordered` (or a device snapshot too small for the state),
/// contiguous CUDA tensors are instead copied after the call returns, ordered after the work
/// queued on their registered streams: the caller must call `dcp_future_stream_wait` (or
/// `dcp_future_wait_staged`) before changing or freeing them, and before any other call on
/// the future or the context; otherwise the save fails and commits nothing.
///
/// Collective: every rank calls it. At most one async save is in flight per context: a later
/// save, async save or load on the context first waits for it (or fails with
/// `DCP_ERROR_BUSY` if `dcp_save_options_set_wait_if_busy(opts, false)`). With a host-callbacks
/// context, the background thread calls the callbacks to commit, so they must be callable from
/// another thread (MPI: `MPI_THREAD_MULTIPLE`). On success `*out` owns a future: wait on it with
/// `dcp_future_wait` and free it with `dcp_future_free`.
#[no_mangle]
pub unsafe extern "C" fn dcp_save_async(
    ctx: *mut dcp_context,
    state: *const dcp_state,
    path: *const c_char,
    opts: *const dcp_save_options,
    out: *mut *mut dcp_future,
) -> dcp_status {
    guard("dcp_save_async", || {
        // SAFETY: every pointer is NULL or valid (header contract).
        let (ctx, state, path, out, opts) = unsafe {
            (
                mut_arg(ctx, "ctx")?,
                ref_arg(state, "state")?,
                str_arg(path, "path")?,
                mut_arg(out, "out")?,
                opts.as_ref(),
            )
        };
        let default = SaveOptions::default();
        let opts = opts.map(|o| &o.inner).unwrap_or(&default);
        let f = crate::engine::save_async(&ctx.inner, &state.inner, path, opts)?;
        *out = Box::into_raw(Box::new(dcp_future { inner: f }));
        Ok(())
    })
}

/// How an async save staged this rank's state (`dcp_future_staging_report`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct dcp_staging_report {
    /// Bytes of CUDA tensors snapshotted in device memory during the call.
    pub device_snapshot_bytes: u64,
    /// Bytes of CUDA tensors copied to the host after the call returned, straight from the
    /// caller's tensors (ordered by `dcp_future_stream_wait`).
    pub stream_ordered_bytes: u64,
    /// All bytes staged (host staging memory used).
    pub copied_bytes: u64,
    /// Seconds the save call blocked.
    pub blocked_seconds: f64,
}

/// Makes the caller's CUDA stream `stream` (a `cudaStream_t`/`CUstream`; NULL: the legacy
/// default stream) wait, on the GPU, for the staging copies that read the caller's tensors;
/// the CPU does not wait. Call it before queueing work that changes the saved tensors (the
/// optimizer step) on that stream; work on other streams must in turn wait for `stream`.
/// A no-op when no copy reads the caller's tensors (no CUDA tensors, a complete device
/// snapshot, or a save that was not stream-ordered). Fails with `DCP_ERROR_INVALID_ARGUMENT`
/// when it comes too late: after `dcp_future_wait`/`dcp_future_done` on this save, or the next
/// save or load on the context (the save then fails and commits nothing). `stream` must be a
/// live stream of the tensors' device. Not collective; thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_future_stream_wait(future: *const dcp_future, stream: *mut c_void) -> dcp_status {
    guard("dcp_future_stream_wait", || {
        // SAFETY: `future` is NULL or from `dcp_save_async` (header contract).
        unsafe { ref_arg(future, "future")? }.inner.order_before(stream as usize)?;
        Ok(())
    })
}

/// Blocks the CPU until the staging copies that read the caller's tensors are done; the
/// caller may then change them. The CPU-waiting form of `dcp_future_stream_wait`, with the
/// same rules. Not collective; thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_future_wait_staged(future: *const dcp_future) -> dcp_status {
    guard("dcp_future_wait_staged", || {
        // SAFETY: `future` is NULL or from `dcp_save_async` (header contract).
        unsafe { ref_arg(future, "future")? }.inner.wait_staged()?;
        Ok(())
    })
}

/// Writes how the save staged this rank's state into `*out`. Not collective; thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_future_staging_report(future: *const dcp_future, out: *mut dcp_staging_report) -> dcp_status {
    guard("dcp_future_staging_report", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (f, out) = unsafe { (ref_arg(future, "future")?, mut_arg(out, "out")?) };
        let r = f.inner.staging_report();
        *out = dcp_staging_report {
            device_snapshot_bytes: r.device_snapshot_bytes,
            stream_ordered_bytes: r.stream_ordered_bytes,
            copied_bytes: r.copied_bytes,
            blocked_seconds: r.blocked_seconds,
        };
        Ok(())
    })
}

/// Blocks until the async save completes and returns its status (the same on every call; on
/// failure `dcp_last_error` on this thread says why). For a stream-ordered save, call
/// `dcp_future_stream_wait` or `dcp_future_wait_staged` first (see `dcp_save_async`). Not
/// collective; thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_future_wait(future: *const dcp_future) -> dcp_status {
    guard("dcp_future_wait", || {
        // SAFETY: `future` is NULL or from `dcp_save_async` (header contract).
        unsafe { ref_arg(future, "future")? }.inner.wait()?;
        Ok(())
    })
}

/// Whether the async save has completed (successfully or not), without blocking. For a
/// stream-ordered save, call `dcp_future_stream_wait` or `dcp_future_wait_staged` first (see
/// `dcp_save_async`). Not collective; thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_future_done(future: *const dcp_future, done: *mut bool) -> dcp_status {
    guard("dcp_future_done", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (f, done) = unsafe { (ref_arg(future, "future")?, mut_arg(done, "done")?) };
        *done = f.inner.is_done();
        Ok(())
    })
}

/// Frees the handle. The save itself goes on; the context waits for it before its next
/// collective and in `dcp_context_free`. NULL is a no-op. Must not race with other calls on
/// the handle.
#[no_mangle]
pub unsafe extern "C" fn dcp_future_free(future: *mut dcp_future) {
    // SAFETY: `future` is NULL or from `dcp_save_async`, freed once (header contract).
    unsafe { super::free_box(future) }
}
