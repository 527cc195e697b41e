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

use super::future::SaveFuture;
use super::layout::{self, PreparedLocation, WrittenFile};
use super::staging::{self, HostBuf, PoolBuf};
use super::wire::{broadcast_result, Wire};
use super::write::{layout_files, with_host_extent, write_files, DeviceStreams, ItemSource, ItemWritten, WriteOptions};
use super::{writer_version, Context};
use crate::error::{Error, Result};
use crate::format::metadata::{EntryMeta, Metadata, StorageIndex, StorageInfo, TensorMeta};
use crate::format::sidecar::{self, FileRecord, Sidecar, BLOCK_SIZE};
use crate::plan::runs::{byte_strides, dense_byte_strides, BoxRuns};
use crate::plan::save::{GlobalKind, GlobalPlan, LocalPlan, Plans};
use crate::plan::stable_hash;
use crate::state::{EntryValue, State};
use crate::storage::Storage;
use crate::tensor::{Device, TensorView};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

pub use super::layout::{is_data_file, METADATA_FILE};

#[derive(Clone, Debug)]
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
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            overwrite: false,
            threads: 4,
            direct_io: true,
            buffer_bytes: 8 << 20,
            wait_if_busy: true,
        }
    }
}

#[derive(Clone, Debug, Default)]
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

#[derive(Serialize, Deserialize)]
struct RankWrites {
    files: Vec<FileRecord>,
    items: Vec<ItemWritten>,
}

/// What the foreground part of a save agreed on.
struct Prepared {
    plan: Arc<GlobalPlan>,
    plan_cached: bool,
    location_state: PreparedLocation,
    storage: Arc<dyn Storage>,
    location: String,
}

/// Saves `state` to `location`. Collective: every rank of the context calls it.
pub fn save(ctx: &Context, state: &State, location: &str, opts: &SaveOptions) -> Result<SaveReport> {
    save_to(ctx, state, ctx.open_storage(location)?, location, opts)
}

pub fn save_to(ctx: &Context, state: &State, storage: Arc<dyn Storage>, location: &str, opts: &SaveOptions) -> Result<SaveReport> {
    let t0 = Instant::now();
    ctx.settle(opts.wait_if_busy)?;
    let p = prepare_save(ctx, state, storage, location, opts)?;
    let bytes_written = write_and_commit(ctx, state, &p, opts)?;
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
pub fn save_async(ctx: &Context, state: &State, location: &str, opts: &SaveOptions) -> Result<SaveFuture> {
    let t0 = Instant::now();
    ctx.settle(opts.wait_if_busy)?;
    let p = prepare_save(ctx, state, ctx.open_storage(location)?, location, opts)?;
    // Stage what this rank writes; every rank reports, so all stop together on a failure.
    let staged = stage(ctx, state, &p.plan, ctx.rank());
    let staged = super::wire::agree(ctx.communicator(), staged.as_ref().map(|_| ()).map_err(|e| e.clone())).and(staged)?;
    let blocked = t0.elapsed().as_secs_f64();
    let future = SaveFuture::new();
    *ctx.inner.in_flight.lock().unwrap_or_else(|e| e.into_inner()) = Some(future.clone());
    let (ctx2, fut2, opts2) = (ctx.clone(), future.clone(), opts.clone());
    let spawned = std::thread::Builder::new().name("dcp-async-save".into()).spawn(move || {
        // A panic here must still complete the future: every later call on the context waits
        // for it.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| write_and_commit(&ctx2, &staged.state, &p, &opts2)))
            .unwrap_or_else(|_| Err(Error::internal("the async save thread panicked (a bug in libdcp)")));
        let plan_cached = p.plan_cached;
        staging::lock(&ctx2.inner.pool).release(staged.into_arena());
        fut2.complete(r.map(|bytes_written| SaveReport {
            bytes_written,
            plan_cached,
            blocked_seconds: blocked,
            seconds: t0.elapsed().as_secs_f64(),
        }));
    });
    if let Err(e) = spawned {
        future.complete(Err(Error::internal(format!("cannot start the async save thread: {e}"))));
    }
    Ok(future)
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
    })
}

/// Writes this rank's files, then commits on rank 0. Collective.
fn write_and_commit(ctx: &Context, state: &State, p: &Prepared, opts: &SaveOptions) -> Result<u64> {
    let comm = ctx.communicator();
    let written = write_rank(ctx, state, &p.plan, comm.rank(), p.storage.as_ref(), opts, &p.location_state);
    let bytes_written = written.as_ref().map(|w| w.files.iter().map(|f| f.len).sum()).unwrap_or(0);
    let gathered = comm.gather(&Wire::from_result(written).encode(), 0)?;
    let commit = match gathered {
        Some(all) => commit(p.storage.as_ref(), &p.location, &p.plan, &p.location_state, all, opts.overwrite),
        None => Ok(()),
    };
    broadcast_result(comm, 0, commit)?;
    Ok(bytes_written)
}

/// This rank's written items, copied into one staging buffer (page-locked when CUDA tensors
/// are involved), and a state of views into it.
struct Staged {
    // Declared before `arena`: its views point into it.
    state: State<'static>,
    arena: HostBuf,
}

impl Staged {
    fn into_arena(self) -> HostBuf {
        drop(self.state);
        self.arena
    }
}

fn stage(ctx: &Context, state: &State, plan: &GlobalPlan, rank: usize) -> Result<Staged> {
    let mut tensors = Vec::new();
    let mut objects = Vec::new();
    for entry in my_entries(state, plan, rank)? {
        match &entry.value {
            EntryValue::Tensor(t) => tensors.push((entry, t)),
            EntryValue::Object(v) => objects.push((entry.fqn.clone(), v.clone())),
        }
    }
    sync_devices(tensors.iter().map(|(_, t)| &t.view))?;
    let align = super::staging::ALIGN as u64;
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut total = 0u64;
    for (_, t) in &tensors {
        offsets.push(total);
        total += (t.view.numel() * t.view.dtype().size() as u64).next_multiple_of(align);
    }
    let pinned = tensors.iter().find_map(|(_, t)| match t.view.device() {
        Device::Cuda(o) => Some(o),
        Device::Cpu => None,
    });
    let arena = PoolBuf::acquire(&ctx.inner.pool, total as usize, pinned)?;
    copy_into_arena(ctx, &tensors, &offsets, &arena)?;
    // Dropped before `arena` (back to the pool) on an error: its views point into it.
    let mut staged = State::new();
    for ((entry, t), off) in tensors.iter().zip(&offsets) {
        let n = (t.view.numel() * t.view.dtype().size() as u64) as usize;
        let view = unsafe {
            TensorView::from_raw(
                arena.as_ptr().add(*off as usize),
                n,
                t.view.dtype(),
                t.view.sizes(),
                None,
                Device::Cpu,
            )?
        };
        staged.add_tensor_chunk(&entry.fqn, view, &t.global_shape, &t.region.offsets)?;
    }
    for (fqn, v) in objects {
        staged.add_object(&fqn, v)?;
    }
    Ok(Staged {
        state: staged,
        arena: arena.into_inner(),
    })
}

/// Copies tensors (dense, row-major) into the arena: device tensors by asynchronous copies,
/// host tensors by several threads.
fn copy_into_arena(
    ctx: &Context,
    tensors: &[(&crate::state::Entry, &crate::state::TensorEntry)],
    offsets: &[u64],
    arena: &HostBuf,
) -> Result<()> {
    let base = arena.as_ptr() as usize;
    let mut streams = DeviceStreams::default();
    let mut used = Vec::new();
    let mut host = Vec::new();
    for ((entry, t), &off) in tensors.iter().zip(offsets) {
        let n = (t.view.numel() * t.view.dtype().size() as u64) as usize;
        match t.view.device() {
            Device::Cuda(ordinal) if t.view.is_contiguous() => {
                let s = streams.get(ordinal, t.view.stream())?;
                let dst = unsafe { std::slice::from_raw_parts_mut((base + off as usize) as *mut u8, n) };
                unsafe { s.d2h(dst, t.view.as_ptr() as u64) }.map_err(|e| e.context(format!("key {:?}", entry.fqn)))?;
                used.push(s);
            }
            Device::Cuda(ordinal) => {
                // Strided device memory: its whole extent to the host, then gathered densely.
                let s = streams.get(ordinal, t.view.stream())?;
                with_host_extent(&ctx.inner.pool, &s, &t.view, ordinal, |host, extent| {
                    let local = unsafe {
                        TensorView::from_raw(
                            host.as_ptr(),
                            extent,
                            t.view.dtype(),
                            t.view.sizes(),
                            Some(t.view.strides()),
                            Device::Cpu,
                        )?
                    };
                    copy_dense(&local, unsafe {
                        std::slice::from_raw_parts_mut((base + off as usize) as *mut u8, n)
                    });
                    Ok(())
                })
                .map_err(|e| e.context(format!("key {:?}", entry.fqn)))?;
            }
            Device::Cpu => host.push((t, off as usize, n)),
        }
    }
    // Host copies, spread over threads by bytes.
    let threads = 4usize.min(host.len()).max(1);
    std::thread::scope(|s| {
        for part in 0..threads {
            let host = &host;
            s.spawn(move || {
                for (i, (t, off, n)) in host.iter().enumerate() {
                    if i % threads != part {
                        continue;
                    }
                    let dst = unsafe { std::slice::from_raw_parts_mut((base + off) as *mut u8, *n) };
                    copy_dense(&t.view, dst);
                }
            });
        }
    });
    for s in &used {
        s.synchronize()?;
    }
    Ok(())
}

/// A host view's elements, dense and row-major, into `dst`.
fn copy_dense(view: &TensorView, dst: &mut [u8]) {
    if view.is_contiguous() {
        unsafe { std::ptr::copy_nonoverlapping(view.as_ptr(), dst.as_mut_ptr(), dst.len()) };
        return;
    }
    let elem = view.dtype().size() as u64;
    let src_strides = byte_strides(view.strides(), elem);
    let dst_strides = dense_byte_strides(view.sizes(), elem);
    let (src, dst) = (view.as_ptr() as *const u8, dst.as_mut_ptr());
    BoxRuns::new(view.sizes(), &src_strides, &dst_strides, 0, 0, elem).for_each(|r| unsafe { r.copy(src, dst, elem, 0, 0) });
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
    let mut cache = ctx.inner.plan_cache.lock().unwrap_or_else(|p| p.into_inner());
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
    if opts.threads == 0 || opts.threads > 1024 {
        return Err(Error::invalid(format!("writer threads must be 1..=1024, not {}", opts.threads)));
    }
    Ok(())
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

/// Waits for the work queued on the devices of CUDA tensors registered without a stream, so
/// copies see the caller's finished results.
pub(crate) fn sync_devices<'a>(views: impl Iterator<Item = &'a TensorView<'a>>) -> Result<()> {
    let mut done = Vec::new();
    for v in views {
        if let Device::Cuda(o) = v.device() {
            if v.stream() == 0 && !done.contains(&o) {
                crate::cuda::synchronize_device(o)?;
                done.push(o);
            }
        }
    }
    Ok(())
}

/// The `.metadata` of a save plan, given where each written item went (`stored(key, chunk
/// offsets)`; offsets are `None` for objects).
pub fn metadata_of(
    plan: &GlobalPlan,
    location: &str,
    save_id: &str,
    mut stored: impl FnMut(&str, Option<&[u64]>) -> Option<StorageInfo>,
) -> Result<Metadata> {
    let mut md = Metadata {
        checkpoint_id: Some(location.to_string()),
        save_id: Some(save_id.to_string()),
        version: Some("1.0.0".into()),
        ..Default::default()
    };
    let missing = |fqn: &str| Error::internal(format!("no rank reported writing key {fqn:?}"));
    for e in &plan.entries {
        md.planner_data.push((e.fqn.clone(), e.path.clone()));
        match &e.kind {
            GlobalKind::Object { .. } => {
                md.entries.push((e.fqn.clone(), EntryMeta::Bytes));
                let info = stored(&e.fqn, None).ok_or_else(|| missing(&e.fqn))?;
                md.storage.push((
                    StorageIndex {
                        fqn: e.fqn.clone(),
                        offset: None,
                        index: None,
                    },
                    info,
                ));
            }
            GlobalKind::Tensor { dtype, global_shape, .. } | GlobalKind::Sharded { dtype, global_shape, .. } => {
                let chunks = plan.chunks_of(e);
                for (ci, c) in chunks.iter().enumerate() {
                    let info = stored(&e.fqn, Some(&c.region.offsets)).ok_or_else(|| missing(&e.fqn))?;
                    md.storage.push((
                        StorageIndex {
                            fqn: e.fqn.clone(),
                            offset: Some(c.region.offsets.clone()),
                            index: Some(ci as u64),
                        },
                        info,
                    ));
                }
                md.entries.push((
                    e.fqn.clone(),
                    EntryMeta::Tensor(TensorMeta {
                        dtype: Some(*dtype),
                        dtype_name: dtype.torch_name().to_string(),
                        size: global_shape.clone(),
                        chunks: chunks.into_iter().map(|c| c.region).collect(),
                    }),
                ));
            }
        }
    }
    Ok(md)
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

/// The sidecar and `.metadata` bytes of a save, from what every rank reports having written.
fn commit_records(plan: &GlobalPlan, location: &str, save_id: &str, ranks: Vec<RankWrites>) -> Result<(Sidecar, Vec<u8>)> {
    let mut files = Vec::new();
    let mut written: Vec<ItemWritten> = Vec::new();
    for (r, w) in ranks.into_iter().enumerate() {
        // A rank's items are in its own files (the sidecar's block records index them).
        if let Some(it) = w.items.iter().find(|it| !w.files.iter().any(|f| f.name == it.file)) {
            return Err(Error::comm(format!(
                "rank {r} reported key {:?} in data file {:?}, which is not among the files it reported writing",
                it.fqn, it.file
            )));
        }
        files.extend(w.files);
        written.extend(w.items);
    }
    // By key and chunk; a later report of the same one replaces an earlier.
    let items: HashMap<(&str, Option<&[u64]>), &ItemWritten> = written
        .iter()
        .map(|it| ((it.fqn.as_str(), it.chunk_offsets.as_deref()), it))
        .collect();
    let md = metadata_of(plan, location, save_id, |fqn, offsets| {
        items.get(&(fqn, offsets)).map(|it| StorageInfo {
            relative_path: it.file.clone(),
            offset: it.offset,
            length: it.length,
        })
    })?;
    let file_index: HashMap<&str, u32> = files.iter().enumerate().map(|(i, f)| (f.name.as_str(), i as u32)).collect();
    let blocks: Vec<sidecar::BlockRecord> = items
        .values()
        .filter_map(|it| {
            it.block.as_ref().map(|b| sidecar::BlockRecord {
                fqn: it.fqn.clone(),
                chunk_offsets: it.chunk_offsets.clone().unwrap_or_default(),
                file: file_index[it.file.as_str()],
                payload_offset: b.payload_offset,
                payload_len: b.payload_len,
                crcs: b.crcs.clone(),
            })
        })
        .collect();
    let md_bytes = md.encode();
    let sc = Sidecar {
        format_version: sidecar::FORMAT_VERSION,
        writer: writer_version(),
        save_id: save_id.to_string(),
        world_size: plan.world_size,
        metadata_len: md_bytes.len() as u64,
        metadata_crc32: crc32fast::hash(&md_bytes),
        plan_hash: plan.hash(),
        block_size: BLOCK_SIZE,
        files,
        blocks,
    };
    Ok((sc, md_bytes))
}
