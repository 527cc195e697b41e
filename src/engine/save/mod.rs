//! Collective save. Every rank calls [`save`] with its own state; one checkpoint results.
//!
//! 1. Ranks all-gather the hashes of their local plans; an unchanged layout reuses the cached
//!    global plan, otherwise the local plans are all-gathered and every rank builds the same plan.
//! 2. Rank 0 readies the location (refusing to replace a committed checkpoint unless asked) and
//!    picks the save's id, whose token makes every file name of this save unique.
//! 3. Each rank writes its `__{rank}_{n}_{token}.distcp` files and fdatasyncs them.
//! 4. Rank 0 gathers what was written, then commits (see [`super::layout`]): sidecar, then
//!    `.metadata` (create-only, or an atomic replace when overwriting), a directory fsync, and
//!    only then removes the replaced checkpoint's files. Without `.metadata` a directory is not a
//!    checkpoint.

mod records;
mod stage;
mod write;

mod future;
pub use future::SaveFuture;
use super::layout::{self, PreparedLocation, WrittenFile};
use super::staging::sync_devices;
use super::wire::{broadcast_result, Wire};
use super::workers::check_thread_count;
use super::Context;
use crate::error::{Error, Result};
use crate::format::sidecar::FileRecord;
use crate::plan::save::{GlobalKind, GlobalPlan, LocalPlan, Plans};
use crate::plan::stable_hash;
use crate::state::{EntryValue, State};
use crate::storage::Storage;
use records::{commit_records, RankWrites};
use std::sync::Arc;
use std::time::Instant;
use write::{layout_files, write_files, ItemSource, WriteOptions};

#[cfg(feature = "internals")]
pub use records::metadata_of;


/// How [`save`] and [`save_async`] run. Made with [`Default`] and the setters, so that new options
/// do not break callers:
///
/// ```
/// let opts = dcp::SaveOptions::default().overwrite(true).threads(8);
/// assert!(opts.overwrite && opts.direct_io);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SaveOptions {
    /// Replace a committed checkpoint at the destination (default: refuse).
    pub overwrite: bool,
    /// Writer threads per rank.
    pub threads: usize,
    /// Use O_DIRECT where the file system allows it.
    pub direct_io: bool,
    /// Size of each writer thread's aligned buffer.
    pub buffer_bytes: usize,
    /// When an async save is still in flight on the context: wait for it (default) or fail
    /// with `Busy`.
    pub wait_if_busy: bool,
    /// Async saves: contiguous CUDA tensors are copied to the host after the call returns, on a
    /// stream of libdcp's, ordered after the work queued on each tensor's registered stream (0:
    /// the legacy default stream). Before changing them, the caller makes its stream wait for
    /// the copies ([`SaveFuture::order_before`]) or waits for them
    /// ([`SaveFuture::wait_staged`]). Default off: the call returns once everything is copied.
    pub stream_ordered: bool,
    /// Async saves: up to this many bytes (per device) of contiguous CUDA tensors are copied
    /// device to device, on the tensors' streams, into a buffer libdcp keeps between saves;
    /// the caller may change those tensors as soon as the call returns. Tensors that do not
    /// fit are stream-ordered as with [`stream_ordered`](Self::stream_ordered). Default 0: no
    /// snapshot.
    pub device_snapshot_bytes: u64,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            overwrite: false,
            threads: 4,
            direct_io: true,
            buffer_bytes: 8 << 20,
            wait_if_busy: true,
            stream_ordered: false,
            device_snapshot_bytes: 0,
        }
    }
}

impl SaveOptions {
    /// Sets [`overwrite`](Self::overwrite).
    pub fn overwrite(mut self, overwrite: bool) -> Self {
        self.overwrite = overwrite;
        self
    }
    /// Sets [`threads`](Self::threads).
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads;
        self
    }
    /// Sets [`direct_io`](Self::direct_io).
    pub fn direct_io(mut self, direct_io: bool) -> Self {
        self.direct_io = direct_io;
        self
    }
    /// Sets [`buffer_bytes`](Self::buffer_bytes).
    pub fn buffer_bytes(mut self, buffer_bytes: usize) -> Self {
        self.buffer_bytes = buffer_bytes;
        self
    }
    /// Sets [`wait_if_busy`](Self::wait_if_busy).
    pub fn wait_if_busy(mut self, wait_if_busy: bool) -> Self {
        self.wait_if_busy = wait_if_busy;
        self
    }
    /// Sets [`stream_ordered`](Self::stream_ordered).
    pub fn stream_ordered(mut self, stream_ordered: bool) -> Self {
        self.stream_ordered = stream_ordered;
        self
    }
    /// Sets [`device_snapshot_bytes`](Self::device_snapshot_bytes).
    pub fn device_snapshot_bytes(mut self, bytes: u64) -> Self {
        self.device_snapshot_bytes = bytes;
        self
    }
    /// Whether CUDA tensors may be copied after the call returns.
    fn defers_device_copies(&self) -> bool {
        self.stream_ordered || self.device_snapshot_bytes > 0
    }
}

/// How an async save staged this rank's state.
#[derive(Clone, Copy, Debug, Default)]
#[non_exhaustive]
pub struct StagingReport {
    /// Bytes of CUDA tensors snapshotted in device memory during the call.
    pub device_snapshot_bytes: u64,
    /// Bytes of CUDA tensors copied to the host after the call returned, from the caller's
    /// memory (the caller orders its writes after them).
    pub stream_ordered_bytes: u64,
    /// All bytes staged (host staging memory used).
    pub copied_bytes: u64,
    /// Seconds the call blocked.
    pub blocked_seconds: f64,
}


/// What a save did, on this rank.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct SaveReport {
    /// Bytes this rank wrote.
    pub bytes_written: u64,
    /// Whether the global plan came from the cache (no full plan exchange).
    pub plan_cached: bool,
    /// Seconds the caller was blocked (for an async save: until the state was staged).
    pub blocked_seconds: f64,
    /// Seconds until the checkpoint was committed.
    pub seconds: f64,
}

/// What the foreground part of a save agreed on.
struct Prepared {
    plan: Arc<GlobalPlan>,
    plan_cached: bool,
    location_state: PreparedLocation,
    storage: Arc<dyn Storage>,
    location: String,
    overwrite: bool,
}

/// Saves `state` to `location`. Collective: every rank of the context calls it.
pub fn save(ctx: &Context, state: &State, location: &str, opts: &SaveOptions) -> Result<SaveReport> {
    save_to(ctx, state, ctx.open_storage(location)?, location, opts)
}

pub fn save_to(ctx: &Context, state: &State, storage: Arc<dyn Storage>, location: &str, opts: &SaveOptions) -> Result<SaveReport> {
    let t0 = Instant::now();
    ctx.settle(opts.wait_if_busy)?;
    let p = prepare_save(ctx, state, storage, location, opts)?;
    let bytes_written = write_and_commit(ctx, &p, || {
        write_rank(ctx, state, &p.plan, ctx.rank(), p.storage.as_ref(), opts, &p.location_state)
    })?;
    let seconds = t0.elapsed().as_secs_f64();
    Ok(SaveReport {
        bytes_written,
        plan_cached: p.plan_cached,
        blocked_seconds: seconds,
        seconds,
    })
}

/// Saves in the background: returns once this rank's state is copied into staging memory (so
/// the caller may change its tensors right away); writing and committing continue on a thread
/// of the context. Collective. At most one async save is in flight per context: a second one
/// (or any save or load) first waits for it, or fails with `Busy` when `wait_if_busy` is off.
///
/// ```
/// use dcp::{save_async, Checkpoint, Context, SaveOptions, State, TensorView};
/// # let dir = std::env::temp_dir().join(format!("libdcp-doc-async-{}", std::process::id()));
/// # let location = dir.to_str().unwrap();
/// let ctx = Context::local();
/// let mut step = vec![1i64];
/// let future = {
///     let mut state = State::new();
///     state.add_tensor("step", TensorView::from_slice(&step, &[1])?)?;
///     save_async(&ctx, &state, location, &SaveOptions::default())?
/// };
/// step[0] = 2; // the checkpoint keeps the value at the call
/// future.wait()?;
/// let (_, _, bytes) = Checkpoint::open(location)?.read_tensor("step")?;
/// assert_eq!(bytes, 1i64.to_le_bytes());
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), dcp::Error>(())
/// ```
pub fn save_async(ctx: &Context, state: &State, location: &str, opts: &SaveOptions) -> Result<SaveFuture> {
    let t0 = Instant::now();
    ctx.settle(opts.wait_if_busy)?;
    let p = prepare_save(ctx, state, ctx.open_storage(location)?, location, opts)?;
    // Stage what this rank writes; every rank reports, so all stop together on a failure.
    let staged = stage::stage(ctx, state, &p.plan, ctx.rank(), opts);
    let mut staged = super::wire::agree(ctx.communicator(), staged.as_ref().map(|_| ()).map_err(|e| e.clone())).and(staged)?;
    let blocked = t0.elapsed().as_secs_f64();
    staged.report.blocked_seconds = blocked;
    let future = SaveFuture::new(staged.report, staged.in_flight.clone());
    *crate::error::lock(&ctx.inner.in_flight) = Some(future.clone());
    let (ctx2, fut2, opts2) = (ctx.clone(), future.clone(), opts.clone());
    let spawned = std::thread::Builder::new().name("dcp-async-save".into()).spawn(move || {
        // A panic here must still complete the future: every later call on the context waits
        // for it.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| write_staged(&ctx2, &staged, &p, &opts2, &fut2)))
            .unwrap_or_else(|_| Err(Error::internal("the async save thread panicked (a bug in libdcp)")));
        let plan_cached = p.plan_cached;
        crate::error::lock(&ctx2.inner.pool).release(staged.into_arena());
        fut2.complete(r.map(|bytes_written| SaveReport {
            bytes_written,
            plan_cached,
            blocked_seconds: blocked,
            seconds: t0.elapsed().as_secs_f64(),
        }));
    });
    if let Err(e) = spawned {
        // The copies may still run: they finish before the arena goes back (dropping the last
        // handle waits for them), and the order check is moot: nothing will be written.
        future.complete(Err(Error::internal(format!("cannot start the async save thread: {e}"))));
    }
    Ok(future)
}

/// The background half of an async save: waits for the staging copies still on the GPU,
/// writes, and commits only once the caller has ordered its writes after the copies that read
/// its tensors. Collective.
fn write_staged(ctx: &Context, staged: &stage::Staged, p: &Prepared, opts: &SaveOptions, future: &SaveFuture) -> Result<u64> {
    let copied = match &staged.in_flight {
        Some(c) => c.wait_all(),
        None => Ok(()),
    };
    let ordered = |written: &RankWrites| {
        future.await_order().inspect_err(|_| {
            layout::discard(p.storage.as_ref(), written.files.iter().map(|f| f.name.as_str()));
        })
    };
    write_and_commit(ctx, p, || {
        copied?;
        let written = write_rank(ctx, &staged.state, &p.plan, ctx.rank(), p.storage.as_ref(), opts, &p.location_state)?;
        ordered(&written)?;
        Ok(written)
    })
}

/// Collectives before any byte is written: validity and plan, then rank 0 readies the directory.
fn prepare_save(ctx: &Context, state: &State, storage: Arc<dyn Storage>, location: &str, opts: &SaveOptions) -> Result<Prepared> {
    let comm = ctx.communicator();
    let (plan, plan_cached) = global_plan(ctx, state, opts)?;
    let prepared = broadcast_result(
        comm,
        0,
        if comm.rank() == 0 {
            layout::prepare(storage.as_ref(), opts.overwrite).map(|p| (p.save_id, p.replaced))
        } else {
            Ok((String::new(), Vec::new()))
        },
    )?;
    let (save_id, replaced) = prepared;
    Ok(Prepared {
        plan,
        plan_cached,
        location_state: PreparedLocation {
            token: layout::token_of(&save_id),
            save_id,
            replaced,
        },
        storage,
        location: location.to_string(),
        overwrite: opts.overwrite,
    })
}

/// Writes this rank's files (`write`), then commits on rank 0. Collective.
fn write_and_commit(ctx: &Context, p: &Prepared, write: impl FnOnce() -> Result<RankWrites>) -> Result<u64> {
    let comm = ctx.communicator();
    let written = write();
    let bytes_written = written.as_ref().map(|w| w.files.iter().map(|f| f.len).sum()).unwrap_or(0);
    let gathered = comm.gather(&Wire::from_result(written).encode(), 0)?;
    let commit = match gathered {
        Some(all) => commit(p.storage.as_ref(), &p.location, &p.plan, &p.location_state, all, p.overwrite),
        None => Ok(()),
    };
    broadcast_result(comm, 0, commit)?;
    Ok(bytes_written)
}

/// Steps 1: agree on local validity and plan hashes; reuse or rebuild the global plan.
fn global_plan(ctx: &Context, state: &State, opts: &SaveOptions) -> Result<(Arc<GlobalPlan>, bool)> {
    let comm = ctx.communicator();
    let local = LocalPlan::from_state(state);
    let encoded = local.encode();
    let check = validate_local(opts).map(|_| stable_hash(&encoded));
    let hashes = comm.all_gather(&Wire::from_result(check).encode())?;
    let mut all = Vec::with_capacity(hashes.len());
    for (r, h) in hashes.iter().enumerate() {
        all.push(Wire::<u64>::decode(h, r)?.into_result(r)?);
    }
    let mut cache = crate::error::lock(&ctx.inner.plan_cache);
    if let Some((h, plan)) = cache.as_ref() {
        if *h == all {
            return Ok((plan.clone(), true));
        }
    }
    // Every rank holds the same description: each builds the plan from its own, no exchange.
    let plan = if all.iter().all(|h| *h == all[0]) {
        GlobalPlan::build(Plans::Uniform(&local, all.len() as u32))?
    } else {
        let plans = comm.all_gather(&encoded)?;
        let plans = plans
            .iter()
            .enumerate()
            .map(|(r, b)| LocalPlan::decode(b, r))
            .collect::<Result<Vec<_>>>()?;
        GlobalPlan::build(Plans::PerRank(&plans))?
    };
    let plan = Arc::new(plan);
    *cache = Some((all, plan.clone()));
    Ok((plan, false))
}

fn validate_local(opts: &SaveOptions) -> Result<()> {
    check_thread_count("writer threads", opts.threads)
}

/// The entries this rank writes, in plan order.
fn my_entries<'s, 'a>(state: &'s State<'a>, plan: &GlobalPlan, rank: usize) -> Result<Vec<&'s crate::state::Entry<'a>>> {
    let mut out = Vec::new();
    for e in &plan.entries {
        let mine = match &e.kind {
            GlobalKind::Object { writer } => *writer as usize == rank,
            _ => plan.writes_any(e, rank as u32),
        };
        if mine {
            out.push(
                state
                    .get(&e.fqn)
                    .ok_or_else(|| Error::internal(format!("planned key {:?} is not registered on rank {rank}", e.fqn)))?,
            );
        }
    }
    Ok(out)
}

/// Step 3: this rank's items, in plan order, into one file.
fn write_rank(
    ctx: &Context,
    state: &State,
    plan: &GlobalPlan,
    rank: usize,
    storage: &dyn Storage,
    opts: &SaveOptions,
    location: &PreparedLocation,
) -> Result<RankWrites> {
    let entries = my_entries(state, plan, rank)?;
    sync_devices(entries.iter().filter_map(|e| match &e.value {
        EntryValue::Tensor(t) => Some(&t.view),
        _ => None,
    }))?;
    let sources: Vec<ItemSource> = entries
        .iter()
        .map(|entry| match &entry.value {
            EntryValue::Tensor(t) => ItemSource::Tensor {
                fqn: &entry.fqn,
                view: &t.view,
                offsets: t.region.offsets.clone(),
            },
            EntryValue::Object(v) => ItemSource::Object { fqn: &entry.fqn, value: v },
        })
        .collect();
    if sources.is_empty() {
        return Ok(RankWrites {
            files: vec![],
            items: vec![],
        });
    }
    let layouts = layout_files(
        rank,
        &location.token,
        sources,
        opts.threads,
        stable_hash(location.save_id.as_bytes()) ^ rank as u64,
    );
    let wopts = WriteOptions {
        direct: opts.direct_io,
        buffer_bytes: opts.buffer_bytes,
    };
    let written = write_files(storage, &layouts, &wopts, &ctx.inner.pool).inspect_err(|_| {
        // This save's files are its own: nobody else writes these names.
        layout::discard(storage, layouts.iter().map(|l| l.name.as_str()));
    })?;
    let mut out = RankWrites {
        files: Vec::new(),
        items: Vec::new(),
    };
    for (layout, (len, items)) in layouts.iter().zip(written) {
        out.files.push(FileRecord {
            name: layout.name.clone(),
            len,
            rank: rank as u32,
        });
        out.items.extend(items);
    }
    Ok(out)
}

/// Step 4 (rank 0): check every rank wrote, then commit sidecar and `.metadata`. On any error
/// the files this save wrote are removed: the location keeps what it had.
fn commit(
    storage: &dyn Storage,
    location: &str,
    plan: &GlobalPlan,
    prepared: &PreparedLocation,
    all: Vec<Vec<u8>>,
    overwrite: bool,
) -> Result<()> {
    let reports: Vec<Result<RankWrites>> = all
        .iter()
        .enumerate()
        .map(|(r, bytes)| Wire::<RankWrites>::decode(bytes, r).and_then(|w| w.into_result(r)))
        .collect();
    // Ranks that failed removed their own files; these are the others'.
    let own: Vec<String> = reports
        .iter()
        .flatten()
        .flat_map(|w| w.files.iter().map(|f| f.name.clone()))
        .collect();
    let records = reports
        .into_iter()
        .collect::<Result<Vec<_>>>()
        .and_then(|ranks| commit_records(plan, location, &prepared.save_id, ranks));
    match records {
        Ok((sc, md_bytes)) => {
            let written: Vec<WrittenFile> = sc.files.iter().map(|f| WrittenFile { name: &f.name, len: f.len }).collect();
            layout::commit(storage, prepared, &written, &sc.encode(), &md_bytes, overwrite)
        }
        Err(e) => {
            layout::discard(storage, own.iter().map(String::as_str));
            Err(e)
        }
    }
}
