//! What a [`CheckpointManager`](super::CheckpointManager) saves, keeps and checks.

use crate::engine::save::SaveOptions;

/// How long a claim on a root lasts without a save renewing it, by default (seconds).
pub const DEFAULT_LEASE_SECONDS: u64 = 600;

/// A manager's policy, made with [`Default`] and the setters:
///
/// ```
/// let policy = dcp::ManagerPolicy::default().save_interval_steps(100).keep_last(2).keep_every_steps(Some(1000));
/// assert!(policy.should_save(300) && !policy.should_save(301));
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ManagerPolicy {
    /// [`should_save`](Self::should_save) is true for multiples of this step count; 0: the
    /// caller decides (never true).
    pub save_interval_steps: u64,
    /// Whole checkpoints kept, newest first (at least 1; default 3).
    pub keep_last: usize,
    /// Steps that are multiples of this are kept forever (`None`: none are).
    pub keep_every_steps: Option<u64>,
    /// Whether the caller saves with [`save_async`](super::CheckpointManager::save_async); a
    /// hint for callers that pick one of the two from the policy (the C API, the CLI).
    pub async_save: bool,
    /// [`latest`](super::CheckpointManager::latest) checks every CRC of a candidate
    /// (reads it whole) instead of the cheap check (metadata, sidecar, file sizes).
    pub full_verify_on_resume: bool,
    /// Options of every save.
    pub save_options: SaveOptions,
    /// Seconds a claim on the root lasts after it was taken or last renewed (by a save or
    /// retention); after that another manager may take the root over.
    pub lease_seconds: u64,
    /// Open without claiming the root: `latest`, `load_latest` and `list` work, saving and
    /// retention are refused (a reader, `dcp ls`).
    pub read_only: bool,
}

impl Default for ManagerPolicy {
    fn default() -> Self {
        ManagerPolicy {
            save_interval_steps: 0,
            keep_last: 3,
            keep_every_steps: None,
            async_save: false,
            full_verify_on_resume: false,
            save_options: SaveOptions::default(),
            lease_seconds: DEFAULT_LEASE_SECONDS,
            read_only: false,
        }
    }
}

impl ManagerPolicy {
    /// Sets [`save_interval_steps`](Self::save_interval_steps).
    pub fn save_interval_steps(mut self, steps: u64) -> Self {
        self.save_interval_steps = steps;
        self
    }
    /// Sets [`keep_last`](Self::keep_last).
    pub fn keep_last(mut self, keep_last: usize) -> Self {
        self.keep_last = keep_last;
        self
    }
    /// Sets [`keep_every_steps`](Self::keep_every_steps).
    pub fn keep_every_steps(mut self, steps: Option<u64>) -> Self {
        self.keep_every_steps = steps;
        self
    }
    /// Sets [`async_save`](Self::async_save).
    pub fn async_save(mut self, async_save: bool) -> Self {
        self.async_save = async_save;
        self
    }
    /// Sets [`full_verify_on_resume`](Self::full_verify_on_resume).
    pub fn full_verify_on_resume(mut self, full: bool) -> Self {
        self.full_verify_on_resume = full;
        self
    }
    /// Sets [`save_options`](Self::save_options).
    pub fn save_options(mut self, opts: SaveOptions) -> Self {
        self.save_options = opts;
        self
    }
    /// Sets [`lease_seconds`](Self::lease_seconds).
    pub fn lease_seconds(mut self, seconds: u64) -> Self {
        self.lease_seconds = seconds;
        self
    }
    /// Sets [`read_only`](Self::read_only).
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Whether `step` is one the policy saves: a multiple of
    /// [`save_interval_steps`](Self::save_interval_steps) (never when that is 0).
    pub fn should_save(&self, step: u64) -> bool {
        self.save_interval_steps != 0 && step % self.save_interval_steps == 0
    }

    /// Whether `step` is kept forever.
    pub fn keeps_forever(&self, step: u64) -> bool {
        self.keep_every_steps.is_some_and(|m| m != 0 && step % m == 0)
    }

    pub(crate) fn check(&self) -> crate::error::Result<()> {
        if self.keep_last == 0 {
            return Err(crate::error::Error::invalid(
                "keep_last is 0: a manager keeps at least the newest whole checkpoint",
            ));
        }
        if self.lease_seconds == 0 {
            return Err(crate::error::Error::invalid("lease_seconds is 0: a claim must last a while"));
        }
        Ok(())
    }
}
