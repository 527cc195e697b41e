//! Collective load, in place. Rank 0 reads `.metadata` (and the sidecar) and broadcasts them;
//! each rank plans its own reads, reads only the bytes its boxes overlap, verifies CRC-32s, and
//! all ranks agree on the outcome.

mod broadcast;
pub(crate) mod read;

use super::layout::{self, RawCheckpoint};
use super::staging::{first_cuda_device, sync_devices, DeviceStreams, PoolBuf, StagingPool};
use super::wire::{agree, broadcast_result};
use super::workers::{check_thread_count, for_each_parallel};
use super::Context;
use broadcast::Broadcasts;
use read::{read_chunk, read_object, window_buffer_len, Files, Reader, Target};

use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::format::pyobj::ObjectValue;
use crate::format::sidecar::BlockIndex;
use crate::plan::load::plan_load;
use crate::plan::load::{ChunkRead, LoadPlan, ObjectRead};
use crate::state::{Entry, EntryValue, State};
use crate::storage::Storage;
use crate::tensor::TensorView;
pub use read::DirectIo;
use std::ffi::{CStr, CString};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// How [`load`] runs. Made with [`Default`] and the setters, so that new options do not break
/// callers:
///
/// ```
/// let opts = dcp::LoadOptions::default().strict(false).threads(2);
/// assert!(!opts.strict && opts.verify);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct LoadOptions {
    /// Every registered key must be in the checkpoint (default). Off: load what exists and
    /// report the rest in [`LoadReport::missing`] and [`State::missing`].
    pub strict: bool,
    /// Verify CRC-32s of everything read (default on).
    pub verify: bool,
    /// Reader threads per rank.
    pub threads: usize,
    /// Whether reads bypass the page cache (default: only for data not already cached).
    pub direct_io: DirectIo,
    /// When several ranks load the same box into GPU memory, one reads it and NCCL sends it to
    /// the others (default on; used only when every rank has NCCL and loads CUDA tensors).
    pub broadcast_replicated: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            strict: true,
            verify: true,
            threads: 4,
            direct_io: DirectIo::Auto,
            broadcast_replicated: true,
        }
    }
}

impl LoadOptions {
    /// Sets [`strict`](Self::strict).
    pub fn strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }
    /// Sets [`verify`](Self::verify).
    pub fn verify(mut self, verify: bool) -> Self {
        self.verify = verify;
        self
    }
    /// Sets [`threads`](Self::threads).
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads;
        self
    }
    /// Sets [`direct_io`](Self::direct_io).
    pub fn direct_io(mut self, direct_io: DirectIo) -> Self {
        self.direct_io = direct_io;
        self
    }
    /// Sets [`broadcast_replicated`](Self::broadcast_replicated).
    pub fn broadcast_replicated(mut self, broadcast_replicated: bool) -> Self {
        self.broadcast_replicated = broadcast_replicated;
        self
    }
}

/// What a load did, on this rank.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct LoadReport {
    /// Bytes of tensor data this rank read from storage.
    pub bytes_read: u64,
    /// Bytes this rank received from another rank instead (replicated boxes over NCCL).
    pub bytes_broadcast: u64,
    /// Registered keys the checkpoint lacks (a partial load skips them).
    pub missing: Vec<String>,
    /// Seconds the load took.
    pub seconds: f64,
    /// `missing` as C strings, made on first use by [`LoadReport::missing_c_str`].
    missing_c: OnceLock<Vec<CString>>,
}

impl LoadReport {
    /// Missing key `index` as a NUL-terminated string that lives as long as the report (the C
    /// API hands out pointers to it). A key with a NUL byte (which no key from a checkpoint
    /// has) comes back empty.
    pub fn missing_c_str(&self, index: usize) -> Option<&CStr> {
        let all = self
            .missing_c
            .get_or_init(|| self.missing.iter().map(|k| CString::new(k.as_str()).unwrap_or_default()).collect());
        all.get(index).map(CString::as_c_str)
    }
}

pub use super::layout::Opened;

/// Opens a checkpoint on one process (no collective).
pub fn open_local(storage: &dyn Storage) -> Result<Opened> {
    layout::open(storage)
}

/// Loads `location` into `state`. Collective: every rank of the context calls it.
pub fn load(ctx: &Context, state: &mut State, location: &str, opts: &LoadOptions) -> Result<LoadReport> {
    load_from(ctx, state, ctx.open_storage(location)?, opts)
}

pub fn load_from(ctx: &Context, state: &mut State, storage: Arc<dyn Storage>, opts: &LoadOptions) -> Result<LoadReport> {
    state.reset_load_status();
    ctx.settle(true)?;
    let t0 = Instant::now();
    let comm = ctx.communicator();
    let opened = open_shared(comm, storage.as_ref())?;
    let mut planned = opened.and_then(|o| {
        let plan = plan_load(state, &o.metadata, &o.lookup, opts.strict)?;
        Ok((o, plan))
    });
    let bcast = broadcast::arrange(comm, state, planned.as_mut().ok().map(|(_, p)| p), opts.broadcast_replicated)?;
    // Kept for the NCCL fallback below, which reads from the same checkpoint.
    let mut opened = None;
    let local = planned.and_then(|(o, plan)| {
        let files = Files::new(storage.clone(), o.sidecar.as_ref());
        let r = execute_plan(&files, &o, state, plan, opts, &ctx.inner.pool);
        opened = Some((o, files));
        r
    });
    let mut report = local.as_ref().ok().cloned();
    // Every read must have succeeded before the broadcasts, which have no timeout.
    agree(comm, local.map(|_| ()))?;
    if let Some(b) = bcast {
        let received = broadcast::world_comm(&ctx.inner.nccl, comm, b.device).and_then(|c| broadcast::run(&b, &c, state));
        if let (Ok(n), Some(r)) = (&received, report.as_mut()) {
            r.bytes_broadcast = *n;
        }
        let me = comm.rank();
        if agree(comm, received.map(|_| ())).is_ok() {
            state.mark_loaded(b.received_entries(me));
        } else {
            // NCCL failed somewhere: every rank reads what it was to receive.
            let Broadcasts { skipped, .. } = b;
            // This rank's reads succeeded (all agreed), so its checkpoint is open.
            let r = match &opened {
                Some((o, files)) => execute_plan(files, o, state, skipped, opts, &ctx.inner.pool),
                None => Err(Error::internal("the NCCL fallback found no opened checkpoint")),
            };
            agree(comm, r.map(|_| ()))?;
        }
    }
    let mut report = report.unwrap_or_default();
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// Rank 0 reads (and decodes) `.metadata` and the sidecar; the others decode its bytes.
/// Collective. The outer error is every rank's (rank 0's read or the broadcast failed), the
/// inner one this rank's own decode.
fn open_shared(comm: &dyn Communicator, storage: &dyn Storage) -> Result<Result<Opened>> {
    let mut mine = None;
    let raw = broadcast_result(
        comm,
        0,
        if comm.rank() == 0 {
            layout::read_and_open(storage).map(|(raw, opened)| {
                mine = Some(opened);
                (raw.metadata, raw.sidecar)
            })
        } else {
            Ok((vec![], None))
        },
    )?;
    Ok(match mine {
        Some(o) => Ok(o),
        None => layout::decode(
            storage,
            &RawCheckpoint {
                metadata: raw.0,
                sidecar: raw.1,
            },
        ),
    })
}

/// Plans and runs a load on this rank alone.
pub fn execute(files: &Files, opened: &Opened, state: &mut State, opts: &LoadOptions, pool: &Mutex<StagingPool>) -> Result<LoadReport> {
    let plan = plan_load(state, &opened.metadata, &opened.lookup, opts.strict)?;
    execute_plan(files, opened, state, plan, opts, pool)
}

/// Runs a planned load on this rank alone: objects first (small, and they may fail early), then
/// every chunk on the reader threads, then the loaded flags.
fn execute_plan(
    files: &Files,
    opened: &Opened,
    state: &mut State,
    plan: LoadPlan,
    opts: &LoadOptions,
    pool: &Mutex<StagingPool>,
) -> Result<LoadReport> {
    let t0 = Instant::now();
    check_thread_count("reader threads", opts.threads)?;
    let bytes_read = plan.bytes_to_read(&opened.metadata, &opened.lookup);
    let blocks = BlockIndex::new(opened.sidecar.as_ref());
    let objects = read_objects(files, &plan.objects)?;
    read_chunks(files, &blocks, state.entries(), &plan.chunks, opts, pool)?;
    record_loaded(state, &plan, objects);
    Ok(LoadReport {
        bytes_read,
        bytes_broadcast: 0,
        missing: plan.missing,
        seconds: t0.elapsed().as_secs_f64(),
        ..Default::default()
    })
}

/// Reads (and decodes) every planned object, with the entry it goes to.
fn read_objects(files: &Files, objects: &[ObjectRead]) -> Result<Vec<(usize, ObjectValue)>> {
    objects
        .iter()
        .map(|o| Ok((o.entry, read_object(files, &o.fqn, &o.storage)?)))
        .collect()
}

/// One reader thread's own things. Dropped in field order: the streams (finishing their copies)
/// before the buffer goes back to the pool.
struct ReaderState<'p> {
    streams: DeviceStreams,
    buf: PoolBuf<'p>,
}

/// Reads every planned chunk into the tensors it overlaps, on `opts.threads` reader threads.
fn read_chunks(
    files: &Files,
    blocks: &BlockIndex,
    entries: &[Entry],
    chunks: &[ChunkRead],
    opts: &LoadOptions,
    pool: &Mutex<StagingPool>,
) -> Result<()> {
    // Device buffers may still be in use by the caller's kernels.
    sync_devices(entries.iter().filter_map(tensor_view))?;
    let gpu = first_cuda_device(
        chunks
            .iter()
            .flat_map(|c| &c.targets)
            .filter_map(|(ei, _)| tensor_view(&entries[*ei])),
    );
    for_each_parallel(
        chunks,
        opts.threads,
        || {
            Ok(ReaderState {
                streams: DeviceStreams::default(),
                buf: PoolBuf::acquire(pool, window_buffer_len(), gpu)?,
            })
        },
        |st, c| {
            let targets = chunk_targets(entries, c)?;
            let mut rd = Reader {
                files,
                verify: opts.verify,
                direct: opts.direct_io,
                buf: &mut st.buf,
                streams: &mut st.streams,
            };
            let b = blocks.get(&c.fqn, &c.chunk.offsets);
            read_chunk(&mut rd, b, &c.fqn, &c.chunk, &c.storage, &targets)
        },
    )?;
    Ok(())
}

/// The view of a tensor entry; `None` for an object.
fn tensor_view<'e, 'a>(e: &'e Entry<'a>) -> Option<&'e TensorView<'a>> {
    match &e.value {
        EntryValue::Tensor(t) => Some(&t.view),
        EntryValue::Object(_) => None,
    }
}

/// Where the overlaps of chunk `c` go: each target entry's view and region.
fn chunk_targets<'e, 'a>(entries: &'e [Entry<'a>], c: &'e ChunkRead) -> Result<Vec<Target<'e, 'a>>> {
    c.targets
        .iter()
        .map(|(ei, overlap)| match &entries[*ei].value {
            EntryValue::Tensor(t) => Ok(Target {
                view: &t.view,
                region: &t.region,
                overlap,
            }),
            EntryValue::Object(_) => Err(Error::internal("tensor read planned into an object entry")),
        })
        .collect()
}

/// Stores the objects read and marks what this pass filled as loaded, and records the missing
/// keys. Flags only go up here: a load may run in passes (see the NCCL fallback).
fn record_loaded(state: &mut State, plan: &LoadPlan, objects: Vec<(usize, ObjectValue)>) {
    let mut loaded = loaded_tensor_entries(state.entries(), &plan.chunks, &plan.missing);
    let entries = state.entries_mut();
    for (ei, v) in objects {
        entries[ei].value = EntryValue::Object(v);
        loaded.push(ei);
    }
    state.mark_loaded(loaded);
    state.add_missing(plan.missing.clone());
}

/// The tensor entries a pass fills: every chunk's targets, and every empty tensor the checkpoint
/// has (nothing to read, loaded all the same).
fn loaded_tensor_entries(entries: &[Entry], chunks: &[ChunkRead], missing: &[String]) -> Vec<usize> {
    let mut loaded: Vec<usize> = chunks.iter().flat_map(|c| c.targets.iter().map(|t| t.0)).collect();
    for (i, e) in entries.iter().enumerate() {
        if matches!(&e.value, EntryValue::Tensor(t) if t.region.is_empty() && !missing.contains(&e.fqn)) {
            loaded.push(i);
        }
    }
    loaded
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::metadata::StorageInfo;
    use crate::region::Region;
    use crate::tensor::DType;

    fn chunk_read(fqn: &str, targets: Vec<usize>) -> ChunkRead {
        let region = Region::new(vec![0], vec![2]).unwrap();
        ChunkRead {
            fqn: fqn.into(),
            chunk: region.clone(),
            storage: StorageInfo {
                relative_path: "__0_0.distcp".into(),
                offset: 0,
                length: 8,
            },
            targets: targets.into_iter().map(|t| (t, region.clone())).collect(),
        }
    }

    #[test]
    fn loaded_entries_are_chunk_targets_and_present_empty_tensors() {
        let (mut a, mut empty, mut gone) = ([0u8; 8], [0u8; 0], [0u8; 0]);
        let mut st = State::new();
        st.add_tensor("a", TensorView::from_bytes(&mut a, DType::F32, &[2]).unwrap())
            .unwrap();
        st.add_int("n", 3).unwrap();
        st.add_tensor("empty", TensorView::from_bytes(&mut empty, DType::F32, &[0]).unwrap())
            .unwrap();
        st.add_tensor("gone", TensorView::from_bytes(&mut gone, DType::F32, &[0]).unwrap())
            .unwrap();
        let chunks = vec![chunk_read("a", vec![0])];
        let got = loaded_tensor_entries(st.entries(), &chunks, &["gone".to_string()]);
        assert_eq!(got, vec![0, 2]);
        assert_eq!(loaded_tensor_entries(st.entries(), &[], &[]), vec![2, 3]);
    }

    #[test]
    fn chunk_targets_refuse_an_object_entry() {
        let mut a = [0u8; 8];
        let mut st = State::new();
        st.add_tensor("a", TensorView::from_bytes(&mut a, DType::F32, &[2]).unwrap())
            .unwrap();
        st.add_int("n", 3).unwrap();
        let one = chunk_read("a", vec![0]);
        let targets = chunk_targets(st.entries(), &one).unwrap();
        assert_eq!(targets.len(), 1);
        assert_eq!(targets[0].overlap, &Region::new(vec![0], vec![2]).unwrap());
        let Err(e) = chunk_targets(st.entries(), &chunk_read("a", vec![0, 1])) else {
            panic!("a target in an object entry was accepted");
        };
        assert_eq!(e.message(), "tensor read planned into an object entry");
    }

}
