use super::{dcp_context, dcp_load_options, dcp_save_options, dcp_state, dcp_status, guard, mut_arg, ref_arg, str_arg};
use crate::engine::{LoadOptions, SaveOptions};

/// Saves the registered state to the checkpoint directory `path`.
///
/// Collective: every rank of `ctx` calls it with its own state and the same `path`. Data files
/// are written and synced, then `.metadata` is committed atomically; the previous content of
/// `path` is not a checkpoint again until the commit. `opts` may be NULL (defaults). Registered
/// tensor memory is read during the call and must not be modified until it returns.
/// Thread safety: one save or load per context at a time.
#[no_mangle]
pub unsafe extern "C" fn dcp_save(
    ctx: *mut dcp_context,
    state: *const dcp_state,
    path: *const std::ffi::c_char,
    opts: *const dcp_save_options,
) -> dcp_status {
    guard("dcp_save", || {
        let ctx = mut_arg(ctx, "ctx")?;
        let state = ref_arg(state, "state")?;
        let path = str_arg(path, "path")?;
        let default = SaveOptions::default();
        let opts = opts.as_ref().map(|o| &o.inner).unwrap_or(&default);
        crate::engine::save(&ctx.inner, &state.inner, path, opts)?;
        Ok(())
    })
}

/// Loads the checkpoint at `path` into the registered state, in place: tensors are written
/// into the registered buffers (resharded from whatever layout was saved); bytes and scalars
/// are stored in the state (read them with `dcp_state_get_*`).
///
/// Collective: every rank of `ctx` calls it. `opts` may be NULL (strict, verified). On error,
/// registered buffers may be partly overwritten; nothing on disk is changed.
#[no_mangle]
pub unsafe extern "C" fn dcp_load(
    ctx: *mut dcp_context,
    state: *mut dcp_state,
    path: *const std::ffi::c_char,
    opts: *const dcp_load_options,
) -> dcp_status {
    guard("dcp_load", || {
        let ctx = mut_arg(ctx, "ctx")?;
        let state = mut_arg(state, "state")?;
        let path = str_arg(path, "path")?;
        let default = LoadOptions::default();
        let opts = opts.as_ref().map(|o| &o.inner).unwrap_or(&default);
        state.missing_c.clear();
        crate::engine::load(&ctx.inner, &mut state.inner, path, opts)?;
        state.refresh_missing();
        Ok(())
    })
}
