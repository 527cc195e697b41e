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

    /// Many small items, written back to back: every one loads whole (the split fast path),
    /// in part (resharded boxes), or not at all (keys skipped leave gaps between the items read).
    mod small_items {
        use crate::engine::save::{save, SaveOptions};
        use crate::engine::Context;
        use crate::error::ErrorKind;
        use crate::region::Region;
        use crate::state::State;
        use crate::tensor::{DType, TensorView};
        use crate::LoadOptions;
        use std::path::PathBuf;

        /// Element counts from 1 to ~50 KiB of bytes, and dtypes of 1, 2 and 4 bytes.
        fn shape_of(i: usize) -> (DType, Vec<u64>) {
            let n = [1u64, 3, 64, 1000, 1025, 3000, 4096, 12_000][i % 8] + i as u64;
            match i % 3 {
                0 => (DType::U8, vec![n]),
                1 => (DType::BF16, vec![2, n]),
                _ => (DType::F32, vec![n, 3]),
            }
        }

        fn nbytes(i: usize) -> usize {
            let (d, sizes) = shape_of(i);
            sizes.iter().product::<u64>() as usize * d.size()
        }

        /// Bytes no other tensor has: an 8-byte tag, then a pattern seeded by the index.
        fn content(i: usize) -> Vec<u8> {
            let mut v: Vec<u8> = (0..nbytes(i)).map(|j| (j as u8).wrapping_mul(13).wrapping_add(i as u8)).collect();
            let tag = [b"TAG".as_slice(), &(i as u32).to_le_bytes(), b"!"].concat();
            let n = tag.len().min(v.len());
            v[..n].copy_from_slice(&tag[..n]);
            v
        }

        struct Dir(PathBuf);
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }

        const N: usize = 300;

        fn saved(tag: &str) -> Dir {
            let dir = Dir(std::env::temp_dir().join(format!("libdcp-small-{tag}-{}", std::process::id())));
            let _ = std::fs::remove_dir_all(&dir.0);
            let mut bufs: Vec<Vec<u8>> = (0..N).map(content).collect();
            let mut st = State::new();
            for (i, b) in bufs.iter_mut().enumerate() {
                let (d, sizes) = shape_of(i);
                st.add_tensor(&format!("t{i:03}"), TensorView::from_bytes(b, d, &sizes).unwrap())
                    .unwrap();
            }
            save(&Context::local(), &st, dir.0.to_str().unwrap(), &SaveOptions::default()).unwrap();
            dir
        }

        /// Loads every key whose index `pick` accepts into buffers of 0xA5 bytes; returns them.
        fn load_picked(dir: &Dir, pick: impl Fn(usize) -> bool, threads: usize) -> crate::error::Result<Vec<(usize, Vec<u8>)>> {
            let mut got: Vec<(usize, Vec<u8>)> = (0..N).filter(|&i| pick(i)).map(|i| (i, vec![0xA5; nbytes(i)])).collect();
            let mut st = State::new();
            for (i, b) in got.iter_mut() {
                let (d, sizes) = shape_of(*i);
                st.add_tensor(&format!("t{i:03}"), TensorView::from_bytes(b, d, &sizes).unwrap())?;
            }
            let opts = LoadOptions::default().threads(threads);
            crate::load(&Context::local(), &mut st, dir.0.to_str().unwrap(), &opts)?;
            drop(st);
            Ok(got)
        }

        #[test]
        fn every_small_item_loads_bit_exact_whole_or_skipped() {
            let dir = saved("whole");
            for (pick, threads) in [(0usize, 1usize), (0, 3), (2, 4), (5, 2)] {
                let got = load_picked(&dir, |i| pick == 0 || i % pick == 1, threads).unwrap();
                assert!(!got.is_empty());
                for (i, b) in got {
                    assert!(b == content(i), "t{i:03} differs (every {pick}th key, {threads} threads)");
                }
            }
        }

        #[test]
        fn resharded_boxes_of_small_items_load_bit_exact() {
            let dir = saved("boxes");
            // The second half of the rows of every 2-D tensor (bf16 [2, n] and f32 [n, 3]).
            let keys: Vec<usize> = (0..N).filter(|i| i % 3 != 0).collect();
            let mut got: Vec<Vec<u8>> = Vec::new();
            let mut boxes = Vec::new();
            for &i in &keys {
                let (d, sizes) = shape_of(i);
                let rows = sizes[0] / 2;
                let region = Region::new(vec![sizes[0] - rows, 0], vec![rows, sizes[1]]).unwrap();
                got.push(vec![0xA5; region.numel() as usize * d.size()]);
                boxes.push((i, d, sizes, region));
            }
            let mut st = State::new();
            for (b, (i, d, sizes, region)) in got.iter_mut().zip(&boxes) {
                let view = TensorView::from_bytes(b, *d, &region.sizes).unwrap();
                st.add_tensor_chunk(&format!("t{i:03}"), view, sizes, &region.offsets).unwrap();
            }
            crate::load(&Context::local(), &mut st, dir.0.to_str().unwrap(), &LoadOptions::default()).unwrap();
            drop(st);
            for (b, (i, _, _, _)) in got.iter().zip(&boxes) {
                let whole = content(*i);
                assert!(b[..] == whole[whole.len() - b.len()..], "t{i:03}: the box differs");
            }
        }

        /// Flips the byte `at` bytes after the tag of tensor `i` in whichever data file holds it.
        fn flip_in_payload(dir: &Dir, i: usize, at: usize) {
            let tag = &content(i)[..8];
            for entry in std::fs::read_dir(&dir.0).unwrap() {
                let path = entry.unwrap().path();
                let mut bytes = std::fs::read(&path).unwrap();
                if let Some(pos) = bytes.windows(8).position(|w| w == tag) {
                    bytes[pos + at] ^= 0x40;
                    std::fs::write(&path, bytes).unwrap();
                    return;
                }
            }
            panic!("t{i:03}'s payload is in no file");
        }

        #[test]
        fn a_flipped_byte_in_a_small_payload_fails_naming_its_key() {
            let dir = saved("flip");
            // t003: 1,003 bytes (the whole item is one read); t007: 48,028 bytes (flipped in
            // the part read straight into the tensor, and in the first bytes read); t014: 49,320
            // bytes (flipped in the last bytes read).
            for (i, at) in [(3usize, 500usize), (7, 20_000), (7, 100), (14, 48_500)] {
                flip_in_payload(&dir, i, at);
                let e = load_picked(&dir, |_| true, 3).unwrap_err();
                assert_eq!(e.kind(), ErrorKind::Checksum, "{e}");
                assert_eq!(e.key(), Some(format!("t{i:03}").as_str()), "{e}");
                assert!(e.message().contains("checksum mismatch"), "{e}");
                flip_in_payload(&dir, i, at);
            }
            assert_eq!(load_picked(&dir, |_| true, 2).unwrap().len(), N);
        }
    }
}
