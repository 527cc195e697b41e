use super::{
    dcp_context, dcp_future, dcp_load_options, dcp_save_options, dcp_state, dcp_status, free_box, guard, invalid, mut_arg, ref_arg, str_arg,
};
use crate::engine::{LoadOptions, LoadReport};
use crate::manager::{CheckpointManager, Damage, ManagerPolicy, Resume, StepHealth};
use std::ffi::{c_char, CString};

/// Policy of a checkpoint manager (`dcp_manager_open`). Defaults: every step the caller asks
/// for is saved (interval 0), keep the last 3, nothing kept forever, the cheap integrity check
/// on resume, default save options, a 600 s lease, not read-only. Thread safety: not shared;
/// one thread at a time.
pub struct dcp_manager_policy {
    inner: ManagerPolicy,
}

/// A series of checkpoints under one root (`step-00000100`, ...), each a DCP checkpoint torch
/// loads as it is: saves, resume from the newest whole step, retention. Thread safety: one
/// thread at a time.
pub struct dcp_manager {
    inner: CheckpointManager,
    /// The steps the last `dcp_manager_latest` / `dcp_manager_load_latest` skipped, with why.
    skipped: Vec<(u64, dcp_step_health, CString)>,
}

/// Health of a step: why `dcp_manager_latest` skipped it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum dcp_step_health {
    /// Committed and passes the check.
    DCP_STEP_WHOLE = 0,
    /// No `.metadata`: a save (or a deletion) that did not finish.
    DCP_STEP_UNCOMMITTED = 1,
    /// A data file or the sidecar is missing.
    DCP_STEP_MISSING_FILE = 2,
    /// A data file is shorter or longer than recorded (torn).
    DCP_STEP_SIZE_MISMATCH = 3,
    /// Stored bytes do not match their checksum.
    DCP_STEP_CHECKSUM = 4,
    /// `.metadata` or the sidecar does not parse.
    DCP_STEP_UNREADABLE_METADATA = 5,
}

impl From<StepHealth> for dcp_step_health {
    fn from(h: StepHealth) -> Self {
        match h {
            StepHealth::Whole => dcp_step_health::DCP_STEP_WHOLE,
            StepHealth::Uncommitted => dcp_step_health::DCP_STEP_UNCOMMITTED,
            StepHealth::Damaged(Damage::MissingFile) => dcp_step_health::DCP_STEP_MISSING_FILE,
            StepHealth::Damaged(Damage::SizeMismatch) => dcp_step_health::DCP_STEP_SIZE_MISMATCH,
            StepHealth::Damaged(Damage::Checksum) => dcp_step_health::DCP_STEP_CHECKSUM,
            StepHealth::Damaged(Damage::UnreadableMetadata) => dcp_step_health::DCP_STEP_UNREADABLE_METADATA,
        }
    }
}

/// Creates a manager policy with the defaults. `*out` is owned by the caller; free it with
/// `dcp_manager_policy_free`. Not collective; thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_manager_policy_new(out: *mut *mut dcp_manager_policy) -> dcp_status {
    guard("dcp_manager_policy_new", || {
        // SAFETY: `out` is NULL or writable (header contract). Checked before the allocation: a
        // NULL `out` must not leak it.
        let out = unsafe { mut_arg(out, "out")? };
        *out = Box::into_raw(Box::new(dcp_manager_policy {
            inner: ManagerPolicy::default(),
        }));
        Ok(())
    })
}

/// Frees a policy. NULL is a no-op. Not collective; not concurrent with other uses of `policy`.
#[no_mangle]
pub unsafe extern "C" fn dcp_manager_policy_free(policy: *mut dcp_manager_policy) {
    // SAFETY: `policy` is NULL or from `dcp_manager_policy_new`, freed once (header contract).
    unsafe { free_box(policy) }
}

/// Runs `f` on the policy behind `policy` (NULL-checked), under `guard`.
fn with_policy(func: &str, policy: *mut dcp_manager_policy, f: impl FnOnce(&mut ManagerPolicy) -> super::FfiResult) -> dcp_status {
    guard(func, || {
        // SAFETY: `policy` is NULL or from `dcp_manager_policy_new` (header contract).
        f(&mut unsafe { mut_arg(policy, "policy")? }.inner)
    })
}

/// `dcp_manager_should_save` is true for multiples of `steps` (0: never; the caller decides).
/// Not collective; not thread-safe (one thread per `policy`).
#[no_mangle]
pub unsafe extern "C" fn dcp_manager_policy_set_save_interval(policy: *mut dcp_manager_policy, steps: u64) -> dcp_status {
    with_policy("dcp_manager_policy_set_save_interval", policy, |p| {
        p.save_interval_steps = steps;
        Ok(())
    })
}

/// Retention keeps the newest `keep_last` whole steps (at least 1; default 3). Not collective;
/// not thread-safe (one thread per `policy`).
#[no_mangle]
pub unsafe extern "C" fn dcp_manager_policy_set_keep_last(policy: *mut dcp_manager_policy, keep_last: u32) -> dcp_status {
    with_policy("dcp_manager_policy_set_keep_last", policy, |p| {
        if keep_last == 0 {
            return Err(invalid(
                "keep_last must be at least 1: retention never deletes the newest whole step",
            ));
        }
        p.keep_last = keep_last as usize;
        Ok(())
    })
}

/// Steps that are multiples of `steps` are kept forever (0, the default: none). Not collective;
/// not thread-safe (one thread per `policy`).
#[no_mangle]
pub unsafe extern "C" fn dcp_manager_policy_set_keep_every(policy: *mut dcp_manager_policy, steps: u64) -> dcp_status {
    with_policy("dcp_manager_policy_set_keep_every", policy, |p| {
        p.keep_every_steps = (steps > 0).then_some(steps);
        Ok(())
    })
}

/// Resume checks every CRC-32 of a step (a full verify) instead of the cheap check (commit,
/// sidecar, metadata, file sizes; default). Not collective; not thread-safe (one thread per
/// `policy`).
#[no_mangle]
pub unsafe extern "C" fn dcp_manager_policy_set_full_verify(policy: *mut dcp_manager_policy, full: bool) -> dcp_status {
    with_policy("dcp_manager_policy_set_full_verify", policy, |p| {
        p.full_verify_on_resume = full;
        Ok(())
    })
}

/// How long the manager's claim on its root lasts without a save renewing it (seconds, default
/// 600); an expired claim may be taken over by another manager. Not collective; not
/// thread-safe (one thread per `policy`).
#[no_mangle]
pub unsafe extern "C" fn dcp_manager_policy_set_lease_seconds(policy: *mut dcp_manager_policy, seconds: u64) -> dcp_status {
    with_policy("dcp_manager_policy_set_lease_seconds", policy, |p| {
        p.lease_seconds = seconds;
        Ok(())
    })
}

/// Read-only: the manager neither claims the root nor saves or deletes (for evaluation jobs
/// and inspection). Not collective; not thread-safe (one thread per `policy`).
#[no_mangle]
pub unsafe extern "C" fn dcp_manager_policy_set_read_only(policy: *mut dcp_manager_policy, read_only: bool) -> dcp_status {
    with_policy("dcp_manager_policy_set_read_only", policy, |p| {
        p.read_only = read_only;
        Ok(())
    })
}

/// The save options of every save (copied; `opts` may be freed afterwards). Not collective;
/// not thread-safe (one thread per `policy`).
#[no_mangle]
pub unsafe extern "C" fn dcp_manager_policy_set_save_options(policy: *mut dcp_manager_policy, opts: *const dcp_save_options) -> dcp_status {
    with_policy("dcp_manager_policy_set_save_options", policy, |p| {
        // SAFETY: `opts` is NULL or from `dcp_save_options_new` (header contract).
        p.save_options = unsafe { ref_arg(opts, "opts")? }.inner.clone();
        Ok(())
    })
}

/// Opens the series of checkpoints at `root` (a directory, created if missing, or an
/// `s3://bucket/prefix` with the context's storage options) and, unless the policy is
/// read-only, claims it: a root another live manager holds fails with `DCP_ERROR_BUSY`, naming
/// the holder. `policy` NULL: the defaults. `*out` is owned by the caller; free it with
/// `dcp_manager_free`. The manager uses the context: free it before the context. Collective.
#[no_mangle]
pub unsafe extern "C" fn dcp_manager_open(
    ctx: *mut dcp_context,
    root: *const c_char,
    policy: *const dcp_manager_policy,
    out: *mut *mut dcp_manager,
) -> dcp_status {
    guard("dcp_manager_open", || {
        // SAFETY: every pointer is NULL or valid (header contract).
        let (ctx, root, policy, out) = unsafe { (ref_arg(ctx, "ctx")?, str_arg(root, "root")?, policy.as_ref(), mut_arg(out, "out")?) };
        let policy = policy.map(|p| p.inner.clone()).unwrap_or_default();
        let inner = CheckpointManager::open(&ctx.inner, root, policy)?;
        *out = Box::into_raw(Box::new(dcp_manager {
            inner,
            skipped: Vec::new(),
        }));
        Ok(())
    })
}

/// Frees the manager. It gives its claim on the root back unless an async save is still
/// writing (then the claim expires), and runs no retention: call `dcp_manager_finish` first
/// for that. NULL is a no-op. Not collective.
#[no_mangle]
pub unsafe extern "C" fn dcp_manager_free(manager: *mut dcp_manager) {
    // SAFETY: `manager` is NULL or from `dcp_manager_open`, freed once (header contract).
    unsafe { free_box(manager) }
}

/// Whether the policy saves at `step` (`dcp_manager_policy_set_save_interval`). Not
/// collective; thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_manager_should_save(manager: *const dcp_manager, step: u64, out: *mut bool) -> dcp_status {
    guard("dcp_manager_should_save", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (m, out) = unsafe { (ref_arg(manager, "manager")?, mut_arg(out, "out")?) };
        *out = m.inner.should_save(step);
        Ok(())
    })
}

/// Saves `state` as `step` (`ROOT/step-%08d`), then applies retention once it is committed.
/// A step that exists whole fails with `DCP_ERROR_ALREADY_EXISTS` unless the save options
/// overwrite; an uncommitted or damaged one is replaced. Collective.
#[no_mangle]
pub unsafe extern "C" fn dcp_manager_save(manager: *mut dcp_manager, step: u64, state: *const dcp_state) -> dcp_status {
    guard("dcp_manager_save", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (m, st) = unsafe { (mut_arg(manager, "manager")?, ref_arg(state, "state")?) };
        m.inner.save(step, &st.inner)?;
        Ok(())
    })
}

/// Starts saving `state` as `step` in the background, as `dcp_save_async` does (the same
/// rules for stream-ordered saves); retention for it runs only after it committed, at the next
/// call on the manager or in `dcp_manager_wait` / `dcp_manager_finish`. `*out` owns a future
/// (free it with `dcp_future_free`). Collective.
#[no_mangle]
pub unsafe extern "C" fn dcp_manager_save_async(
    manager: *mut dcp_manager,
    step: u64,
    state: *const dcp_state,
    out: *mut *mut dcp_future,
) -> dcp_status {
    guard("dcp_manager_save_async", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (m, st, out) = unsafe { (mut_arg(manager, "manager")?, ref_arg(state, "state")?, mut_arg(out, "out")?) };
        let f = m.inner.save_async(step, &st.inner)?;
        *out = Box::into_raw(Box::new(dcp_future { inner: f }));
        Ok(())
    })
}

/// Waits for the manager's async save in flight (if any) and applies retention after it;
/// returns the save's status. Collective.
#[no_mangle]
pub unsafe extern "C" fn dcp_manager_wait(manager: *mut dcp_manager) -> dcp_status {
    guard("dcp_manager_wait", || {
        // SAFETY: `manager` is NULL or from `dcp_manager_open` (header contract).
        unsafe { mut_arg(manager, "manager")? }.inner.wait()?;
        Ok(())
    })
}

/// Records what `latest` found: the step (-1: none) and the steps skipped.
fn remember(m: &mut dcp_manager, found: Option<Resume>, step: &mut i64) {
    m.skipped.clear();
    *step = -1;
    if let Some(r) = found {
        *step = r.step as i64;
        m.skipped = r
            .skipped
            .into_iter()
            .map(|s| (s.step, s.reason.into(), super::c_text(&s.message)))
            .collect();
    }
}

/// The newest step that is committed and passes the integrity check, into `*step` (-1: no
/// whole step). Every newer step skipped is listed by `dcp_manager_skipped`. Decided by rank 0;
/// every rank gets the same. Collective.
#[no_mangle]
pub unsafe extern "C" fn dcp_manager_latest(manager: *mut dcp_manager, step: *mut i64) -> dcp_status {
    guard("dcp_manager_latest", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (m, step) = unsafe { (mut_arg(manager, "manager")?, mut_arg(step, "step")?) };
        let found = m.inner.latest()?;
        remember(m, found, step);
        Ok(())
    })
}

/// Loads the newest whole step into `state` (in place, resharding as needed, with `opts`; NULL:
/// the defaults) and writes it to `*step` (-1, with `state` untouched: no whole step). A step
/// whose load finds damage the check did not is skipped too, and the next older one loaded.
/// Keys the checkpoint lacks (partial loads) are listed by `dcp_state_missing_key`. Collective.
#[no_mangle]
pub unsafe extern "C" fn dcp_manager_load_latest(
    manager: *mut dcp_manager,
    state: *mut dcp_state,
    opts: *const dcp_load_options,
    step: *mut i64,
) -> dcp_status {
    guard("dcp_manager_load_latest", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (m, st, opts, step) = unsafe {
            (
                mut_arg(manager, "manager")?,
                mut_arg(state, "state")?,
                opts.as_ref(),
                mut_arg(step, "step")?,
            )
        };
        let default = LoadOptions::default();
        st.last_load = LoadReport::default();
        let found = m
            .inner
            .load_latest_with(&mut st.inner, opts.map(|o| &o.inner).unwrap_or(&default))?;
        let found = found.map(|(resume, report)| {
            st.last_load = report;
            resume
        });
        remember(m, found, step);
        Ok(())
    })
}

/// How many newer steps the last `dcp_manager_latest` / `dcp_manager_load_latest` skipped.
/// Not collective; not concurrent with other calls on the manager.
#[no_mangle]
pub unsafe extern "C" fn dcp_manager_skipped_count(manager: *const dcp_manager, n: *mut usize) -> dcp_status {
    guard("dcp_manager_skipped_count", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (m, n) = unsafe { (ref_arg(manager, "manager")?, mut_arg(n, "n")?) };
        *n = m.skipped.len();
        Ok(())
    })
}

/// The `index`-th skipped step (newest first): its number, why (`health`) and what exactly is
/// wrong (`*message`, owned by the manager, valid until its next `latest`/`load_latest` or
/// `dcp_manager_free`). Any out-pointer may be NULL. Not collective; not concurrent with other
/// calls on the manager.
#[no_mangle]
pub unsafe extern "C" fn dcp_manager_skipped(
    manager: *const dcp_manager,
    index: usize,
    step: *mut u64,
    health: *mut dcp_step_health,
    message: *mut *const c_char,
) -> dcp_status {
    guard("dcp_manager_skipped", || {
        // SAFETY: `manager` is NULL or valid; the out-pointers NULL or writable (header contract).
        let (m, step, health, message) = unsafe { (ref_arg(manager, "manager")?, step.as_mut(), health.as_mut(), message.as_mut()) };
        let (s, h, text) = m
            .skipped
            .get(index)
            .ok_or_else(|| invalid(format!("index {index} is out of range ({} skipped steps)", m.skipped.len())))?;
        if let Some(out) = step {
            *out = *s;
        }
        if let Some(out) = health {
            *out = *h;
        }
        if let Some(out) = message {
            *out = text.as_ptr();
        }
        Ok(())
    })
}

/// Applies the manager's retention policy now: deletes the whole steps it does not keep, the
/// uncommitted ones and damaged steps older than the newest whole one (each made uncommitted
/// first, so a crash mid-delete never leaves a step that looks whole); never the newest whole
/// step. `*deleted` (may be NULL) gets how many steps were deleted. Collective.
#[no_mangle]
pub unsafe extern "C" fn dcp_manager_apply_retention(manager: *mut dcp_manager, deleted: *mut usize) -> dcp_status {
    guard("dcp_manager_apply_retention", || {
        // SAFETY: `manager` is NULL or valid; `deleted` NULL or writable (header contract).
        let (m, deleted) = unsafe { (ref_arg(manager, "manager")?, deleted.as_mut()) };
        let gone = m.inner.apply_retention(m.inner.policy())?;
        if let Some(out) = deleted {
            *out = gone.len();
        }
        Ok(())
    })
}

/// Waits for the async save in flight, applies retention and gives the claim on the root back;
/// the manager may then only be freed. Collective.
#[no_mangle]
pub unsafe extern "C" fn dcp_manager_finish(manager: *mut dcp_manager) -> dcp_status {
    guard("dcp_manager_finish", || {
        // SAFETY: `manager` is NULL or valid (header contract).
        let m = unsafe { mut_arg(manager, "manager")? };
        m.inner.wait()?;
        m.inner.release()?;
        Ok(())
    })
}
