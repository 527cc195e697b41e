use super::{dcp_status, guard, guard_void, mut_arg, ref_arg};
use crate::engine::Context;

/// A libdcp context: the job's communicator and caches. One per process (per job).
/// Thread safety: calls on one context must not run concurrently (collectives are ordered).
pub struct dcp_context {
    pub(crate) inner: Context,
}

/// Creates a context for a job of one process (rank 0 of 1); no communication.
/// On success `*out` owns a new context; free it with `dcp_context_free`. Not collective.
#[no_mangle]
pub unsafe extern "C" fn dcp_context_new_local(out: *mut *mut dcp_context) -> dcp_status {
    guard("dcp_context_new_local", || {
        let out = mut_arg(out, "out")?;
        *out = Box::into_raw(Box::new(dcp_context {
            inner: Context::local(),
        }));
        Ok(())
    })
}

/// This process's rank and the job's world size. Either out-pointer may be NULL.
#[no_mangle]
pub unsafe extern "C" fn dcp_context_rank(
    ctx: *const dcp_context,
    rank: *mut i32,
    world_size: *mut i32,
) -> dcp_status {
    guard("dcp_context_rank", || {
        let ctx = ref_arg(ctx, "ctx")?;
        if let Some(r) = rank.as_mut() {
            *r = ctx.inner.rank() as i32;
        }
        if let Some(w) = world_size.as_mut() {
            *w = ctx.inner.world_size() as i32;
        }
        Ok(())
    })
}

/// Frees a context. NULL is a no-op. No save or load may be running on it.
#[no_mangle]
pub unsafe extern "C" fn dcp_context_free(ctx: *mut dcp_context) {
    guard_void(|| {
        if !ctx.is_null() {
            drop(Box::from_raw(ctx));
        }
    })
}
