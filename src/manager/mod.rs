//! A series of checkpoints under one root: save every N steps, resume from the newest one that
//! is whole, keep what the policy says. See `docs/manager.md` for the guarantees.
//!
//! Every step is a plain DCP checkpoint in its own directory `{root}/step-{step:08}` (torch
//! loads it as it is). Rank 0 decides (which step to resume from, what to delete) and tells
//! the others, so every rank resumes from the same step.

mod claim;
mod policy;
mod retention;
mod scan;

pub use policy::{ManagerPolicy, DEFAULT_LEASE_SECONDS};

use crate::engine::load::{load, LoadOptions, LoadReport};
use crate::engine::save::{save, save_async, SaveFuture, SaveReport};
use crate::engine::Context;
use crate::error::{lock, Error, ErrorKind, Result};
use crate::state::State;
use claim::Claim;
use scan::Root;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::BTreeSet;
use std::sync::Mutex;

/// What is wrong with a damaged step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Damage {
    /// A data file or the sidecar is missing.
    MissingFile,
    /// A data file is shorter or longer than recorded (torn).
    SizeMismatch,
    /// Stored bytes do not match their checksum (`.metadata` against its sidecar, or a data
    /// file under a full verify or a load).
    Checksum,
    /// `.metadata` or the sidecar does not parse.
    UnreadableMetadata,
}

/// Whether a step is a checkpoint to resume from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StepHealth {
    /// Committed and passes the check.
    Whole,
    /// No `.metadata`: a save that did not finish, or a deletion that did not.
    Uncommitted,
    /// Committed, but fails the check.
    Damaged(Damage),
}

/// A step newer than the one resumed from, and why it was not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// The step.
    pub step: u64,
    /// Why it was skipped (never `Whole`).
    pub reason: StepHealth,
    /// What exactly is wrong: the file and the numbers.
    pub message: String,
}

/// The step to resume from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// The step.
    pub step: u64,
    /// Its checkpoint's location (a directory or `s3://` URL), as `load` takes it.
    pub location: String,
    /// Every newer step, newest first, with the reason it was skipped.
    pub skipped: Vec<Skipped>,
}

/// One step under the root, as [`CheckpointManager::list`] sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepStatus {
    /// The step.
    pub step: u64,
    /// Its checkpoint's location.
    pub location: String,
    /// Whole, uncommitted or damaged.
    pub health: StepHealth,
    /// What is wrong, for a step that is not whole; empty otherwise.
    pub message: String,
    /// Bytes of its files.
    pub bytes: u64,
    /// When it was committed, in seconds since the Unix epoch (local roots only).
    pub modified_unix_seconds: Option<u64>,
    /// Whether [`latest`](CheckpointManager::latest) picks it.
    pub latest: bool,
}

/// Steps being loaded in this process, by root: retention leaves them alone.
static READING: Mutex<Vec<(String, u64)>> = Mutex::new(Vec::new());

/// Marks a step as being read until dropped.
struct ReadGuard {
    root: String,
    step: u64,
}

impl ReadGuard {
    fn new(root: &str, step: u64) -> ReadGuard {
        lock(&READING).push((root.to_string(), step));
        ReadGuard {
            root: root.to_string(),
            step,
        }
    }
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        let mut r = lock(&READING);
        if let Some(i) = r.iter().position(|(root, step)| *root == self.root && *step == self.step) {
            r.swap_remove(i);
        }
    }
}

fn steps_being_read(root: &str) -> BTreeSet<u64> {
    lock(&READING).iter().filter(|(r, _)| r == root).map(|(_, s)| *s).collect()
}

/// Rank 0's outcome, as every rank receives it.
#[derive(Serialize, Deserialize)]
enum Outcome<T> {
    Ok(T),
    Err { code: i32, message: String },
}

/// Runs `f` on rank 0 and gives every rank its outcome (rank 0 keeps its own error). Collective.
fn from_rank0<T: Serialize + DeserializeOwned>(ctx: &Context, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let comm = ctx.communicator();
    if comm.world_size() == 1 {
        return f();
    }
    if comm.rank() == 0 {
        let local = f();
        let wire = match &local {
            Ok(v) => Outcome::Ok(v),
            Err(e) => Outcome::Err {
                code: e.kind().code(),
                message: e.message().to_string(),
            },
        };
        let bytes = postcard::to_allocvec(&wire).map_err(|e| Error::internal(format!("encoding a manager decision: {e}")))?;
        comm.broadcast(&bytes, 0)?;
        return local;
    }
    let bytes = comm.broadcast(&[], 0)?;
    match postcard::from_bytes::<Outcome<T>>(&bytes) {
        Ok(Outcome::Ok(v)) => Ok(v),
        Ok(Outcome::Err { code, message }) => Err(Error::new(ErrorKind::from_code(code), format!("rank 0: {message}"))),
        Err(e) => Err(Error::comm(format!("rank 0 sent an unreadable manager decision: {e}"))),
    }
}

/// Fails on every rank when any rank failed (each returns its own error, or the lowest failing
/// rank's). Collective.
fn all_ok(ctx: &Context, local: Result<()>) -> Result<()> {
    let comm = ctx.communicator();
    if comm.world_size() == 1 {
        return local;
    }
    let mine = match &local {
        Ok(()) => Vec::new(),
        Err(e) => format!("{}\n{}", e.kind().code(), e.message()).into_bytes(),
    };
    let all = comm.all_gather(&mine)?;
    local?;
    match all.iter().enumerate().find(|(_, b)| !b.is_empty()) {
        Some((rank, bytes)) => {
            let text = String::from_utf8_lossy(bytes);
            let (code, message) = text.split_once('\n').unwrap_or(("13", &text));
            let kind = ErrorKind::from_code(code.parse().unwrap_or(13));
            Err(Error::new(kind, format!("rank {rank}: {message}")))
        }
        None => Ok(()),
    }
}

/// A series of checkpoints under one root (a directory or `s3://bucket/prefix`), one step per
/// directory `step-{step:08}`, saved, resumed from and deleted as a [`ManagerPolicy`] says.
///
/// Collective calls (every rank of the context makes them, in the same order): `open`, `save`,
/// `save_async`, `wait`, `finish`, `latest`, `load_latest`, `apply_retention`. `list` is not.
///
/// ```
/// use dcp::{CheckpointManager, Context, ManagerPolicy, State, TensorView};
/// # let dir = std::env::temp_dir().join(format!("libdcp-doc-manager-{}", std::process::id()));
/// # let root = dir.to_str().unwrap();
/// let ctx = Context::local();
/// let mut manager = CheckpointManager::open(&ctx, root, ManagerPolicy::default().keep_last(2))?;
/// let mut weights = vec![0f32; 4];
/// for step in 0..4u64 {
///     weights.iter_mut().for_each(|w| *w = step as f32);
///     let mut state = State::new();
///     state.add_tensor("w", TensorView::from_slice(&weights, &[4])?)?;
///     manager.save(step, &state)?;
/// }
/// let mut back = vec![f32::NAN; 4];
/// let mut state = State::new();
/// state.add_tensor("w", TensorView::from_slice_mut(&mut back, &[4])?)?;
/// let resume = manager.load_latest(&mut state)?.expect("a checkpoint");
/// drop(state);
/// assert_eq!((resume.step, back), (3, vec![3.0; 4]));
/// assert_eq!(manager.list()?.iter().map(|s| s.step).collect::<Vec<_>>(), [2, 3]);
/// manager.finish()?;
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), dcp::Error>(())
/// ```
pub struct CheckpointManager {
    ctx: Context,
    root: Root,
    policy: ManagerPolicy,
    /// Rank 0's claim on the root (`None` on other ranks and read-only managers).
    claim: Mutex<Option<Claim>>,
    /// The async save in flight, with its step; retention for it runs once it completed.
    pending: Mutex<Option<(u64, SaveFuture)>>,
    /// Whether [`release`](Self::release) gave the root up.
    released: std::sync::atomic::AtomicBool,
}

impl CheckpointManager {
    /// Opens the series at `root` (created if missing) and, unless the policy is read-only,
    /// claims it: a root another live manager holds is `Busy`, naming the holder. Collective.
    pub fn open(ctx: &Context, root: &str, policy: ManagerPolicy) -> Result<CheckpointManager> {
        let opened = policy.check().and_then(|()| Root::open(ctx, root));
        let ok = opened.as_ref().map(|_| ()).map_err(Error::clone);
        all_ok(ctx, ok)?;
        let root = opened?;
        let mut claim = None;
        let claimed = if ctx.rank() == 0 && !policy.read_only {
            Claim::acquire(root.storage.clone(), policy.lease_seconds).map(|c| claim = Some(c))
        } else {
            Ok(())
        };
        from_rank0(ctx, || claimed)?;
        Ok(CheckpointManager {
            ctx: ctx.clone(),
            root,
            policy,
            claim: Mutex::new(claim),
            pending: Mutex::new(None),
            released: Default::default(),
        })
    }

    /// The policy.
    pub fn policy(&self) -> &ManagerPolicy {
        &self.policy
    }

    /// The root, as given to `open` (without a trailing `/`).
    pub fn root(&self) -> &str {
        &self.root.url
    }

    /// Where `step`'s checkpoint is (or would be).
    pub fn step_location(&self, step: u64) -> String {
        self.root.step_location(step)
    }

    /// Whether the policy saves at `step` ([`ManagerPolicy::should_save`]).
    pub fn should_save(&self, step: u64) -> bool {
        self.policy.should_save(step)
    }

    /// Saves `state` as `step` and, once it is committed, applies retention. A step that
    /// exists whole is `AlreadyExists` unless the save options overwrite; an uncommitted or
    /// damaged one is deleted first. Collective.
    pub fn save(&mut self, step: u64, state: &State) -> Result<SaveReport> {
        let location = self.begin_save(step)?;
        let report = save(&self.ctx, state, &location, &self.policy.save_options)?;
        self.retain_after_save(step)?;
        Ok(report)
    }

    /// Starts saving `state` as `step` in the background (see [`crate::save_async`]). Retention
    /// for it runs only after it committed: at the next call on the manager, or in
    /// [`wait`](Self::wait) or [`finish`](Self::finish). Collective.
    pub fn save_async(&mut self, step: u64, state: &State) -> Result<SaveFuture> {
        let location = self.begin_save(step)?;
        let future = save_async(&self.ctx, state, &location, &self.policy.save_options)?;
        *lock(&self.pending) = Some((step, future.clone()));
        Ok(future)
    }

    /// Waits for the async save in flight, if any, applies retention after it and returns its
    /// report (`None` when none was in flight). Collective.
    pub fn wait(&mut self) -> Result<Option<SaveReport>> {
        self.settle()?.transpose()
    }

    /// Waits for the async save in flight, applies retention, and gives the root up.
    /// Collective. (Dropping the manager instead gives the root up too, when no async save is
    /// writing, but runs no retention.)
    pub fn finish(self) -> Result<()> {
        let waited = self.settle().and_then(|o| o.transpose()).map(|_| ());
        waited.and(self.release())
    }

    /// Gives the claim on the root up (after which the manager neither saves nor deletes).
    /// Call it after the last save completed ([`wait`](Self::wait)). Collective.
    pub fn release(&self) -> Result<()> {
        self.released.store(true, std::sync::atomic::Ordering::SeqCst);
        from_rank0(&self.ctx, || match lock(&self.claim).take() {
            Some(c) => c.release(),
            None => Ok(()),
        })
    }

    /// The newest step that is committed and passes the check (the cheap one, or a full CRC
    /// verify with [`ManagerPolicy::full_verify_on_resume`]), with every newer step and why it
    /// was skipped; `None` when no step is whole. Decided on rank 0; every rank returns the
    /// same. Collective.
    pub fn latest(&self) -> Result<Option<Resume>> {
        self.settle()?;
        from_rank0(&self.ctx, || self.find_latest(None))
    }

    /// Loads the step [`latest`](Self::latest) picks into `state`. A step whose load finds
    /// damage the check did not (a checksum) is skipped like the others and the next older
    /// whole step is loaded. Collective.
    pub fn load_latest(&self, state: &mut State) -> Result<Option<Resume>> {
        Ok(self.load_latest_with(state, &LoadOptions::default())?.map(|(resume, _)| resume))
    }

    /// [`load_latest`](Self::load_latest) with load options (partial loads, threads...); also
    /// returns the load's report (the keys a partial load did not find). Collective.
    pub fn load_latest_with(&self, state: &mut State, opts: &LoadOptions) -> Result<Option<(Resume, LoadReport)>> {
        self.settle()?;
        let mut found: Vec<Skipped> = Vec::new();
        let mut below = None;
        loop {
            let Some(mut resume) = from_rank0(&self.ctx, || self.find_latest(below))? else {
                return Ok(None);
            };
            let _guard = ReadGuard::new(&self.root.url, resume.step);
            let loaded = load(&self.ctx, state, &resume.location, opts);
            let damage = from_rank0(&self.ctx, || Ok(loaded.as_ref().err().and_then(|e| load_damage(e.kind()))))?;
            match (loaded, damage) {
                (Ok(report), _) => {
                    found.append(&mut resume.skipped);
                    resume.skipped = found;
                    return Ok(Some((resume, report)));
                }
                (Err(e), Some(d)) => {
                    found.append(&mut resume.skipped);
                    found.push(Skipped {
                        step: resume.step,
                        reason: StepHealth::Damaged(d),
                        message: format!("loading it failed: {}", e.message()),
                    });
                    below = Some(resume.step);
                }
                (Err(e), None) => return Err(e),
            }
        }
    }

    /// Every step under the root, ascending, with its health, size and age, and which one
    /// `latest` picks. Not collective: only this process looks.
    pub fn list(&self) -> Result<Vec<StepStatus>> {
        let mut out = Vec::new();
        for step in self.root.steps()? {
            let location = self.root.step_location(step);
            let (health, message) = self.check_step(step, self.policy.full_verify_on_resume)?;
            let storage = self.ctx.open_storage(&location)?;
            let (bytes, modified_unix_seconds) = scan::usage(storage.as_ref(), self.root.step_dir(step).as_deref())?;
            out.push(StepStatus {
                step,
                location,
                health,
                message,
                bytes,
                modified_unix_seconds,
                latest: false,
            });
        }
        if let Some(newest) = out.iter_mut().rev().find(|s| s.health == StepHealth::Whole) {
            newest.latest = true;
        }
        Ok(out)
    }

    /// Applies `policy`'s retention (its `keep_last` and `keep_every_steps`) now; returns the
    /// steps deleted. Collective.
    pub fn apply_retention(&self, policy: &ManagerPolicy) -> Result<Vec<u64>> {
        policy.check()?;
        self.settle()?;
        from_rank0(&self.ctx, || self.retain(policy))
    }

    fn writable(&self) -> Result<()> {
        if self.policy.read_only {
            return Err(Error::invalid(format!(
                "the manager of {} was opened read-only: it neither saves nor deletes",
                self.root.url
            )));
        }
        Ok(())
    }

    /// Waits for the async save in flight; once it committed, applies retention. Returns the
    /// save's outcome (`None`: none was in flight); a failed save committed nothing, so nothing
    /// is deleted after it. Collective.
    fn settle(&self) -> Result<Option<Result<SaveReport>>> {
        self.ctx.settle(true)?;
        let Some((step, future)) = lock(&self.pending).take() else {
            return Ok(None);
        };
        // Finished (the context settled): wait returns at once. Every rank has the same
        // outcome (the save agrees on its commit); rank 0's decides.
        let outcome = future.wait();
        let committed = outcome.is_ok();
        from_rank0(&self.ctx, || if committed { self.retain(&self.policy) } else { Ok(Vec::new()) })
            .map_err(|e| e.context(format!("step {step} is saved, but retention after it failed")))?;
        Ok(Some(outcome))
    }

    /// Before a save: the root is still ours, the step is free (an uncommitted or damaged one
    /// is deleted), and its marker is written. Returns the step's location. Collective.
    fn begin_save(&mut self, step: u64) -> Result<String> {
        self.writable()?;
        self.ctx.settle(self.policy.save_options.wait_if_busy)?;
        self.settle()?;
        from_rank0(&self.ctx, || self.make_room(step))?;
        Ok(self.root.step_location(step))
    }

    fn make_room(&self, step: u64) -> Result<()> {
        self.confirm_claim()?;
        let location = self.root.step_location(step);
        let exists = self.root.step_dir(step).is_none_or(|d| d.exists());
        if exists {
            match self.check_step(step, false)?.0 {
                StepHealth::Whole if self.policy.save_options.overwrite => {}
                StepHealth::Whole => {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!("step {step} already exists whole at {location} (save with overwrite to replace it)"),
                    ))
                }
                _ => retention::delete_step(&self.ctx, &self.root, step)?,
            }
        }
        self.root.storage.put_atomic(&scan::marker_name(step), b"")?;
        self.root.storage.sync_dir()
    }

    /// Retention after `step` committed. Collective.
    fn retain_after_save(&self, step: u64) -> Result<()> {
        from_rank0(&self.ctx, || self.retain(&self.policy))
            .map(|_| ())
            .map_err(|e| e.context(format!("step {step} is saved, but retention after it failed")))
    }

    fn confirm_claim(&self) -> Result<()> {
        match lock(&self.claim).as_mut() {
            Some(c) => c.confirm_and_renew(),
            None if self.released.load(std::sync::atomic::Ordering::SeqCst) => Err(Error::invalid(format!(
                "the manager of {} gave its root up (finish/release): open a new one to save or delete",
                self.root.url
            ))),
            None => self
                .writable()
                .and(Err(Error::internal("a writable manager without its claim on rank 0"))),
        }
    }

    /// The steps [`apply_retention`](Self::apply_retention) with `policy` would delete now,
    /// deleting nothing (a dry run; works on a read-only manager). Not collective.
    pub fn retention_preview(&self, policy: &ManagerPolicy) -> Result<Vec<u64>> {
        policy.check()?;
        let mut healths = Vec::new();
        for step in self.root.steps()? {
            healths.push((step, self.check_step(step, false)?.0));
        }
        // The step a resume would pick, by the resume's own check, is never deleted.
        let newest_whole = if self.policy.full_verify_on_resume {
            self.find_latest(None)?.map(|r| r.step)
        } else {
            healths.iter().rev().find(|(_, h)| *h == StepHealth::Whole).map(|(s, _)| *s)
        };
        let protected = steps_being_read(&self.root.url);
        Ok(retention::to_delete(&healths, newest_whole, policy, &protected))
    }

    /// Deletes what `policy` does not keep (rank 0).
    fn retain(&self, policy: &ManagerPolicy) -> Result<Vec<u64>> {
        self.writable()?;
        self.confirm_claim()?;
        let doomed = self.retention_preview(policy)?;
        for &step in &doomed {
            retention::delete_step(&self.ctx, &self.root, step)?;
        }
        Ok(doomed)
    }

    /// `step`'s health and what is wrong with it: the cheap check, or a full verify.
    fn check_step(&self, step: u64, full_verify: bool) -> Result<(StepHealth, String)> {
        let location = self.root.step_location(step);
        let storage = self.ctx.open_storage(&location)?;
        scan::check_step(storage.as_ref(), &location, full_verify)
    }

    /// The newest whole step (below `below`, when given), with the newer ones skipped (rank 0).
    fn find_latest(&self, below: Option<u64>) -> Result<Option<Resume>> {
        let mut skipped = Vec::new();
        for step in self.root.steps()?.into_iter().rev().filter(|s| below.is_none_or(|b| *s < b)) {
            let location = self.root.step_location(step);
            let (health, message) = self.check_step(step, self.policy.full_verify_on_resume)?;
            if health == StepHealth::Whole {
                return Ok(Some(Resume { step, location, skipped }));
            }
            skipped.push(Skipped {
                step,
                reason: health,
                message,
            });
        }
        Ok(None)
    }
}

/// The damage a failed load reveals (`None`: the failure is not the checkpoint's).
fn load_damage(kind: ErrorKind) -> Option<Damage> {
    match kind {
        ErrorKind::Checksum => Some(Damage::Checksum),
        ErrorKind::Corrupt => Some(Damage::UnreadableMetadata),
        _ => None,
    }
}

impl Drop for CheckpointManager {
    /// Gives the root up (best effort) unless an async save is still writing under it.
    fn drop(&mut self) {
        let in_flight = lock(&self.pending).as_ref().is_some_and(|(_, f)| !f.finished());
        if let (Some(c), false) = (lock(&self.claim).take(), in_flight) {
            let _ = c.release();
        }
    }
}
