use super::{dcp_status, dims_arg, free_box, guard, guard_void, invalid, mut_arg, ref_arg, str_arg, FfiResult};
use crate::comm::callbacks::{CallbackComm, HostCallbacks};
use crate::comm::tcp::{env_settings, TcpComm};
use crate::engine::Context;
use crate::mesh::{mesh_positions, DeviceMesh, MAX_MESH_DIMS};
use std::ffi::{c_char, c_void};
use std::time::Duration;

/// A libdcp context: the job's communicator and caches. One per process (per job).
/// Thread safety: calls on one context must not run concurrently (collectives are ordered).
pub struct dcp_context {
    pub(crate) inner: Context,
}

/// # Safety
/// `out` is NULL or writable.
unsafe fn new_context(out: *mut *mut dcp_context, comm: Box<dyn crate::comm::Communicator>) -> FfiResult {
    // SAFETY: forwarded from this function's contract.
    let out = unsafe { mut_arg(out, "out")? };
    *out = Box::into_raw(Box::new(dcp_context {
        inner: Context::with_communicator(comm),
    }));
    Ok(())
}

fn timeout_arg(timeout_ms: u64) -> FfiResult<Duration> {
    if timeout_ms == 0 {
        return Err(invalid("timeout_ms must be positive"));
    }
    Ok(Duration::from_millis(timeout_ms))
}

/// Creates a context for a job of one process (rank 0 of 1); no communication.
/// On success `*out` owns a new context; free it with `dcp_context_free`. Not collective;
/// thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_context_new_local(out: *mut *mut dcp_context) -> dcp_status {
    guard("dcp_context_new_local", || {
        // SAFETY: `out` is NULL or writable (header contract).
        unsafe { new_context(out, Box::new(crate::comm::local::LocalComm)) }
    })
}

/// Joins a job through libdcp's built-in TCP rendezvous: rank 0 listens on `port` (all
/// interfaces) and the other ranks connect to `master_addr:port`. Collective: every rank calls
/// it; it returns once all `world_size` ranks are connected, or fails with
/// `DCP_ERROR_TIMEOUT` naming the missing ranks after `timeout_ms`. Every later collective is
/// bounded by `timeout_ms` too. Only control messages cross this connection, never tensor data.
/// On success `*out` owns a new context; free it with `dcp_context_free`.
/// Thread-safe (each call makes its own context).
#[no_mangle]
pub unsafe extern "C" fn dcp_context_new_tcp(
    rank: i32,
    world_size: i32,
    master_addr: *const c_char,
    port: u16,
    timeout_ms: u64,
    out: *mut *mut dcp_context,
) -> dcp_status {
    guard("dcp_context_new_tcp", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let addr = unsafe { str_arg(master_addr, "master_addr")? };
        // SAFETY: as above; checked before connecting so a NULL `out` fails fast.
        unsafe { mut_arg(out, "out")? };
        let (rank, world_size) = rank_arg(rank, world_size)?;
        let comm = TcpComm::connect(rank, world_size, addr, port, timeout_arg(timeout_ms)?)?;
        // SAFETY: `out` is writable (checked above, header contract).
        unsafe { new_context(out, Box::new(comm)) }
    })
}

/// `rank` and `world_size` checked to be a rank of that world.
fn rank_arg(rank: i32, world_size: i32) -> FfiResult<(usize, usize)> {
    if rank < 0 || world_size < 1 || rank >= world_size {
        return Err(invalid(format!("rank {rank} is not in a world of size {world_size}")));
    }
    Ok((rank as usize, world_size as usize))
}

/// Like `dcp_context_new_tcp` with torchrun's environment: `RANK`, `WORLD_SIZE`,
/// `MASTER_ADDR` (default 127.0.0.1) and the port `DCP_MASTER_PORT`, or else `MASTER_PORT` + 1
/// (under torchrun, `MASTER_PORT` itself is taken by torch's store). With neither `RANK` nor
/// `WORLD_SIZE` set it makes a single-process context. Collective as `dcp_context_new_tcp`;
/// `*out` as there. Thread-safe (each call makes its own context).
#[no_mangle]
pub unsafe extern "C" fn dcp_context_new_from_env(timeout_ms: u64, out: *mut *mut dcp_context) -> dcp_status {
    guard("dcp_context_new_from_env", || {
        // SAFETY: `out` is NULL or writable (header contract); checked before connecting.
        unsafe { mut_arg(out, "out")? };
        let timeout = timeout_arg(timeout_ms)?;
        let comm: Box<dyn crate::comm::Communicator> = match env_settings()? {
            None => Box::new(crate::comm::local::LocalComm),
            Some((rank, world, addr, port)) => Box::new(TcpComm::connect(rank, world, &addr, port, timeout)?),
        };
        // SAFETY: `out` is writable (header contract).
        unsafe { new_context(out, comm) }
    })
}

/// Host all-gather: every rank contributes `len` bytes from `send`; `recv` receives
/// `world_size * len` bytes in rank order. Return 0 on success, anything else on failure.
pub type dcp_allgather_fn =
    Option<unsafe extern "C" fn(user_data: *mut c_void, send: *const c_void, recv: *mut c_void, len: usize, timeout_ms: u64) -> i32>;
/// Host broadcast: the `len` bytes of `buf` on rank `root` are copied into `buf` on every rank.
pub type dcp_broadcast_fn =
    Option<unsafe extern "C" fn(user_data: *mut c_void, buf: *mut c_void, len: usize, root: i32, timeout_ms: u64) -> i32>;
/// Host barrier.
pub type dcp_barrier_fn = Option<unsafe extern "C" fn(user_data: *mut c_void, timeout_ms: u64) -> i32>;

/// Makes a context that communicates through the host's own collectives (a c10d ProcessGroup,
/// an MPI communicator): `allgather` and `broadcast` are required, `barrier` may be NULL (an
/// all-gather is used). libdcp calls them only from the thread that called `dcp_save` /
/// `dcp_load`, in the same order on every rank, with `user_data` and the call's timeout, which
/// they should honour (libdcp cannot interrupt them). Not collective itself. `user_data` must
/// outlive the context. On success `*out` owns a new context; free it with `dcp_context_free`.
#[no_mangle]
pub unsafe extern "C" fn dcp_context_new_callbacks(
    rank: i32,
    world_size: i32,
    allgather: dcp_allgather_fn,
    broadcast: dcp_broadcast_fn,
    barrier: dcp_barrier_fn,
    user_data: *mut c_void,
    timeout_ms: u64,
    out: *mut *mut dcp_context,
) -> dcp_status {
    guard("dcp_context_new_callbacks", || {
        // SAFETY: `out` is NULL or writable (header contract).
        unsafe { mut_arg(out, "out")? };
        let all_gather = allgather.ok_or_else(|| super::null("allgather"))?;
        let broadcast = broadcast.ok_or_else(|| super::null("broadcast"))?;
        timeout_arg(timeout_ms)?;
        let (rank, world_size) = rank_arg(rank, world_size)?;
        let comm = CallbackComm::new(
            rank,
            world_size,
            timeout_ms,
            HostCallbacks {
                all_gather,
                broadcast,
                barrier,
                user_data,
            },
        )?;
        // SAFETY: `out` is writable (header contract).
        unsafe { new_context(out, Box::new(comm)) }
    })
}

/// This process's rank and the job's world size. Either out-pointer may be NULL. Not
/// collective; thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_context_rank(ctx: *const dcp_context, rank: *mut i32, world_size: *mut i32) -> dcp_status {
    guard("dcp_context_rank", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (ctx, rank, world_size) = unsafe { (ref_arg(ctx, "ctx")?, rank.as_mut(), world_size.as_mut()) };
        if let Some(r) = rank {
            *r = ctx.inner.rank() as i32;
        }
        if let Some(w) = world_size {
            *w = ctx.inner.world_size() as i32;
        }
        Ok(())
    })
}

/// Waits until every rank of the job calls it. Collective; one collective per context at a time.
/// Thread safety: not concurrent with other collectives on the context.
#[no_mangle]
pub unsafe extern "C" fn dcp_context_barrier(ctx: *mut dcp_context) -> dcp_status {
    guard("dcp_context_barrier", || {
        // SAFETY: `ctx` is NULL or from a `dcp_context_new_*` (header contract).
        unsafe { ref_arg(ctx, "ctx")? }.inner.communicator().barrier()?;
        Ok(())
    })
}

/// Frees a context, after waiting for its async save in flight, if any. NULL is a no-op. No
/// other call may be running on it. Not collective.
/// Thread safety: no other call may use the context meanwhile.
#[no_mangle]
pub unsafe extern "C" fn dcp_context_free(ctx: *mut dcp_context) {
    guard_void(|| {
        if !ctx.is_null() {
            // SAFETY: `ctx` came from a `dcp_context_new_*` and is freed once (header contract).
            let ctx = unsafe { Box::from_raw(ctx) };
            let _ = ctx.inner.settle(true);
            drop(ctx);
        }
    })
}

/// Limits the page-locked (pinned) host memory the context's staging pool holds, in bytes
/// (default: half of physical memory). Staging beyond it uses ordinary memory (slower device
/// copies). Frees cached buffers not in use. Not collective; thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_context_set_staging_budget(ctx: *mut dcp_context, bytes: u64) -> dcp_status {
    guard("dcp_context_set_staging_budget", || {
        // SAFETY: `ctx` is NULL or from a `dcp_context_new_*` (header contract).
        unsafe { ref_arg(ctx, "ctx")? }.inner.set_staging_budget(bytes);
        Ok(())
    })
}

/// Bytes the context's staging pool holds now: page-locked and ordinary. Either out-pointer may
/// be NULL. Not collective; thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_context_staging_bytes(ctx: *const dcp_context, pinned: *mut u64, heap: *mut u64) -> dcp_status {
    guard("dcp_context_staging_bytes", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (ctx, pinned, heap) = unsafe { (ref_arg(ctx, "ctx")?, pinned.as_mut(), heap.as_mut()) };
        let st = ctx.inner.staging_stats();
        if let Some(p) = pinned {
            *p = st.pinned_bytes;
        }
        if let Some(h) = heap {
            *h = st.heap_bytes;
        }
        Ok(())
    })
}

/// Device memory the context keeps for snapshot saves (`dcp_save_options_set_device_snapshot`),
/// in bytes, into `*out`. Not collective; thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_context_device_snapshot_bytes(ctx: *const dcp_context, out: *mut u64) -> dcp_status {
    guard("dcp_context_device_snapshot_bytes", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (ctx, out) = unsafe { (ref_arg(ctx, "ctx")?, mut_arg(out, "out")?) };
        *out = ctx.inner.device_snapshot_bytes();
        Ok(())
    })
}

/// Frees the device memory kept for snapshot saves, after the async save in flight (if any)
/// completes; the next snapshot save allocates again. Not collective; not concurrent with a
/// save or load on the context.
#[no_mangle]
pub unsafe extern "C" fn dcp_context_release_device_snapshots(ctx: *mut dcp_context) -> dcp_status {
    guard("dcp_context_release_device_snapshots", || {
        // SAFETY: `ctx` is NULL or from a `dcp_context_new_*` (header contract).
        unsafe { ref_arg(ctx, "ctx")? }.inner.release_device_snapshots();
        Ok(())
    })
}

/// Sets a storage option for this context's saves and loads, over the environment's. For
/// `s3://bucket/prefix` locations the keys are `object_store`'s S3 configuration keys, e.g.
/// `aws_endpoint` ("http://127.0.0.1:8333"), `aws_access_key_id`, `aws_secret_access_key`,
/// `aws_region`, `aws_allow_http` ("true"), `aws_virtual_hosted_style_request` ("false" for
/// path-style addressing). Unknown keys are rejected at the next save or load. `key` and
/// `value` are copied. Not collective; not concurrent with a save or load on the context.
#[no_mangle]
pub unsafe extern "C" fn dcp_context_set_storage_option(ctx: *mut dcp_context, key: *const c_char, value: *const c_char) -> dcp_status {
    guard("dcp_context_set_storage_option", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (ctx, key, value) = unsafe { (ref_arg(ctx, "ctx")?, str_arg(key, "key")?, str_arg(value, "value")?) };
        ctx.inner.set_storage_option(key, value);
        Ok(())
    })
}

/// Whether CUDA is usable in this process (a driver and at least one device). Never fails.
/// Not collective; thread-safe.
#[no_mangle]
pub extern "C" fn dcp_cuda_available() -> bool {
    std::panic::catch_unwind(crate::cuda::available).unwrap_or(false)
}

/// A device mesh: an n-D array of global ranks, optionally with dim names, bound to this
/// process's rank in a context. Immutable; thread-safe to share.
pub struct dcp_mesh {
    pub(crate) mesh: DeviceMesh,
    pub(crate) rank: u32,
}

/// Makes a mesh of `ndim` dimensions of sizes `shape`, over the global ranks `ranks` in
/// row-major order (NULL: 0, 1, 2, ...), with optional dim names (NULL, or `ndim` strings).
/// A sub-mesh (the "tp" dim of a 2-D mesh, a pipeline stage's group) is just a mesh over those
/// ranks. The mesh records `ctx`'s rank, which need not be in it (registering a tensor on a mesh
/// the rank is not part of is an error). Not collective; thread-safe. `*out` is owned by the
/// caller; free it with `dcp_mesh_free`. The arrays and names are copied.
#[no_mangle]
pub unsafe extern "C" fn dcp_mesh_new(
    ctx: *const dcp_context,
    ndim: i32,
    shape: *const i64,
    ranks: *const i32,
    dim_names: *const *const c_char,
    out: *mut *mut dcp_mesh,
) -> dcp_status {
    guard("dcp_mesh_new", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (ctx, out) = unsafe { (ref_arg(ctx, "ctx")?, mut_arg(out, "out")?) };
        if !(1..=MAX_MESH_DIMS as i32).contains(&ndim) {
            return Err(invalid(format!("a mesh needs 1..={MAX_MESH_DIMS} dimensions, not {ndim}")));
        }
        // SAFETY: `shape` is NULL or holds `ndim` entries (documented above).
        let shape = unsafe { dims_arg(shape, ndim, "shape")? };
        let shape: Vec<u32> = shape
            .iter()
            .map(|&s| u32::try_from(s).map_err(|_| invalid(format!("mesh size {s} is too large"))))
            .collect::<FfiResult<_>>()?;
        let ranks = if ranks.is_null() {
            None
        } else {
            let n = mesh_positions(&shape).ok_or_else(|| invalid("mesh is too large"))?;
            // SAFETY: `ranks` is non-NULL and holds one entry per mesh position (documented).
            let ranks = unsafe { std::slice::from_raw_parts(ranks, n as usize) };
            Some(
                ranks
                    .iter()
                    .map(|&r| u32::try_from(r).map_err(|_| invalid(format!("negative rank {r} in the mesh"))))
                    .collect::<FfiResult<Vec<u32>>>()?,
            )
        };
        let names = if dim_names.is_null() {
            None
        } else {
            // SAFETY: `dim_names` is non-NULL and holds `ndim` (checked positive) strings.
            let names = unsafe { std::slice::from_raw_parts(dim_names, ndim as usize) };
            Some(
                names
                    .iter()
                    // SAFETY: each name is NULL or a NUL-terminated string (documented above).
                    .map(|&n| unsafe { str_arg(n, "dim_names[i]") }.map(str::to_string))
                    .collect::<FfiResult<Vec<String>>>()?,
            )
        };
        let mesh = DeviceMesh::new(&shape, ranks.as_deref(), names.as_deref())?;
        *out = Box::into_raw(Box::new(dcp_mesh {
            mesh,
            rank: ctx.inner.rank() as u32,
        }));
        Ok(())
    })
}

/// Frees a mesh. NULL is a no-op. States that registered tensors with it keep their own copy.
/// Must not race with other uses of the mesh. Not collective.
#[no_mangle]
pub unsafe extern "C" fn dcp_mesh_free(mesh: *mut dcp_mesh) {
    // SAFETY: `mesh` is NULL or from `dcp_mesh_new`, freed once (header contract).
    unsafe { free_box(mesh) }
}
