//! Collective save. Every rank calls [`save`] with its own state; one checkpoint results.
//!
//! 1. Ranks all-gather the hashes of their local plans; an unchanged layout reuses the cached
//!    global plan, otherwise the local plans are all-gathered and every rank builds the same plan.
//! 2. Rank 0 prepares the directory (refusing to replace a committed checkpoint unless asked).
//! 3. Each rank writes its `__{rank}_0.distcp` and fdatasyncs it.
//! 4. Rank 0 gathers what was written, then commits: sidecar, then `.metadata` by atomic rename,
//!    then a directory fsync. Without `.metadata` a directory is not a checkpoint.

use super::wire::{broadcast_result, Wire};
use super::write::{layout_file, write_file, ItemSource, ItemWritten};
use super::{writer_version, Context};
use crate::error::{Error, ErrorKind, Result};
use crate::format::metadata::{EntryMeta, Metadata, StorageIndex, StorageInfo, TensorMeta};
use crate::format::sidecar::{self, FileRecord, Sidecar, BLOCK_SIZE};
use crate::plan::save::{GlobalKind, GlobalPlan, LocalPlan, Plans};
use crate::plan::stable_hash;
use crate::state::{EntryValue, State};
use crate::storage::{self, Storage};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

pub const METADATA_FILE: &str = ".metadata";

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
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            overwrite: false,
            threads: 4,
            direct_io: true,
            buffer_bytes: 8 << 20,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct SaveReport {
    /// Bytes this rank wrote.
    pub bytes_written: u64,
    /// Whether the global plan came from the cache (no full plan exchange).
    pub plan_cached: bool,
    pub seconds: f64,
}

#[derive(Serialize, Deserialize)]
struct RankWrites {
    files: Vec<FileRecord>,
    items: Vec<ItemWritten>,
}

/// Saves `state` to `location`. Collective: every rank of the context calls it.
pub fn save(ctx: &Context, state: &State, location: &str, opts: &SaveOptions) -> Result<SaveReport> {
    let storage = storage::open(location)?;
    save_to(ctx, state, storage, location, opts)
}

pub fn save_to(ctx: &Context, state: &State, storage: Arc<dyn Storage>, location: &str, opts: &SaveOptions) -> Result<SaveReport> {
    let t0 = Instant::now();
    let comm = ctx.communicator();
    let rank = comm.rank();
    let (plan, plan_cached) = global_plan(ctx, state, opts)?;

    let save_id = broadcast_result(
        comm,
        0,
        if rank == 0 {
            prepare(storage.as_ref(), opts.overwrite)
        } else {
            Ok(String::new())
        },
    )?;

    let written = write_rank(state, &plan, rank, storage.as_ref(), opts, &save_id);
    let bytes_written = written.as_ref().map(|w| w.files.iter().map(|f| f.len).sum()).unwrap_or(0);
    let gathered = comm.gather(&Wire::from_result(written).encode(), 0)?;
    let commit = match gathered {
        Some(all) => commit(storage.as_ref(), location, &plan, &save_id, all),
        None => Ok(()),
    };
    broadcast_result(comm, 0, commit)?;
    Ok(SaveReport {
        bytes_written,
        plan_cached,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Steps 1: agree on local validity and plan hashes; reuse or rebuild the global plan.
fn global_plan(ctx: &Context, state: &State, opts: &SaveOptions) -> Result<(Arc<GlobalPlan>, bool)> {
    let comm = ctx.communicator();
    let local = LocalPlan::from_state(state);
    let encoded = local.encode();
    let check = validate_local(state, opts).map(|_| stable_hash(&encoded));
    let hashes = comm.all_gather(&Wire::from_result(check).encode())?;
    let mut all = Vec::with_capacity(hashes.len());
    for (r, h) in hashes.iter().enumerate() {
        all.push(Wire::<u64>::decode(h, r)?.into_result(r)?);
    }
    let mut cache = ctx.plan_cache.lock().unwrap_or_else(|p| p.into_inner());
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

fn validate_local(state: &State, opts: &SaveOptions) -> Result<()> {
    if opts.threads == 0 || opts.threads > 1024 {
        return Err(Error::invalid(format!("writer threads must be 1..=1024, not {}", opts.threads)));
    }
    for e in state.entries() {
        if let EntryValue::Tensor(t) = &e.value {
            if t.view.device() != crate::tensor::Device::Cpu {
                return Err(Error::unsupported(format!(
                    "key {:?}: CUDA tensors are not supported by this build",
                    e.fqn
                )));
            }
        }
    }
    Ok(())
}

/// Step 2 (rank 0): create the directory; refuse or clear an existing checkpoint.
fn prepare(storage: &dyn Storage, overwrite: bool) -> Result<String> {
    storage.prepare()?;
    if storage.exists(METADATA_FILE)? {
        if !overwrite {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "checkpoint already exists at {} (it has a committed .metadata; save with overwrite to replace it)",
                    storage.describe("")
                ),
            ));
        }
        // Uncommit first: from here on the directory is not a checkpoint until the new commit.
        storage.remove(METADATA_FILE)?;
        storage.sync_dir()?;
    }
    for name in storage.list()? {
        if is_data_file(&name) || name == sidecar::FILE_NAME || name == ".metadata.tmp" || name == ".libdcp.tmp" {
            storage.remove(&name)?;
        }
    }
    storage.sync_dir()?;
    Ok(new_save_id())
}

/// `__{rank}_{n}.distcp`, the data files torch's FileSystemWriter and libdcp write.
pub fn is_data_file(name: &str) -> bool {
    name.strip_prefix("__")
        .and_then(|r| r.strip_suffix(".distcp"))
        .and_then(|r| r.split_once('_'))
        .is_some_and(|(a, b)| {
            !a.is_empty() && !b.is_empty() && a.bytes().all(|c| c.is_ascii_digit()) && b.bytes().all(|c| c.is_ascii_digit())
        })
}

fn new_save_id() -> String {
    let mut bytes = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut bytes);
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    for (i, b) in t.to_le_bytes().iter().enumerate() {
        bytes[i] ^= b;
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let h: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// Step 3: this rank's items, in plan order, into one file.
fn write_rank(
    state: &State,
    plan: &GlobalPlan,
    rank: usize,
    storage: &dyn Storage,
    opts: &SaveOptions,
    save_id: &str,
) -> Result<RankWrites> {
    let mut sources = Vec::new();
    for e in &plan.entries {
        let mine = match &e.kind {
            GlobalKind::Object { writer } => *writer as usize == rank,
            _ => !plan.chunks_written_by(e, rank as u32).is_empty(),
        };
        if !mine {
            continue;
        }
        let entry = state
            .get(&e.fqn)
            .ok_or_else(|| Error::internal(format!("planned key {:?} is not registered on rank {rank}", e.fqn)))?;
        match &entry.value {
            EntryValue::Tensor(t) => sources.push(ItemSource::Tensor {
                fqn: &entry.fqn,
                view: &t.view,
                offsets: t.region.offsets.clone(),
            }),
            EntryValue::Object(v) => sources.push(ItemSource::Object { fqn: &entry.fqn, value: v }),
        }
    }
    if sources.is_empty() {
        return Ok(RankWrites {
            files: vec![],
            items: vec![],
        });
    }
    let name = format!("__{rank}_0.distcp");
    let layout = layout_file(name.clone(), sources, opts.threads, stable_hash(save_id.as_bytes()) ^ rank as u64);
    let (len, items) = write_file(storage, &layout, opts.direct_io, opts.buffer_bytes)?;
    Ok(RankWrites {
        files: vec![FileRecord {
            name,
            len,
            rank: rank as u32,
        }],
        items,
    })
}

/// Step 4 (rank 0): check every rank wrote, then commit sidecar and `.metadata`.
fn commit(storage: &dyn Storage, location: &str, plan: &GlobalPlan, save_id: &str, all: Vec<Vec<u8>>) -> Result<()> {
    let mut files = Vec::new();
    let mut items: HashMap<(String, Option<Vec<u64>>), ItemWritten> = HashMap::new();
    for (r, bytes) in all.iter().enumerate() {
        let w = Wire::<RankWrites>::decode(bytes, r)?.into_result(r)?;
        files.extend(w.files);
        for it in w.items {
            items.insert((it.fqn.clone(), it.chunk_offsets.clone()), it);
        }
    }
    let file_index: HashMap<&str, u32> = files.iter().enumerate().map(|(i, f)| (f.name.as_str(), i as u32)).collect();
    let mut md = Metadata {
        checkpoint_id: Some(location.to_string()),
        save_id: Some(save_id.to_string()),
        version: Some("1.0.0".into()),
        ..Default::default()
    };
    let mut blocks = Vec::new();
    let missing = |fqn: &str| Error::internal(format!("no rank reported writing key {fqn:?}"));
    for e in &plan.entries {
        md.planner_data.push((e.fqn.clone(), e.path.clone()));
        match &e.kind {
            GlobalKind::Object { .. } => {
                md.entries.push((e.fqn.clone(), EntryMeta::Bytes));
                let it = items.get(&(e.fqn.clone(), None)).ok_or_else(|| missing(&e.fqn))?;
                md.storage.push((
                    StorageIndex {
                        fqn: e.fqn.clone(),
                        offset: None,
                        index: None,
                    },
                    StorageInfo {
                        relative_path: it.file.clone(),
                        offset: it.offset,
                        length: it.length,
                    },
                ));
            }
            GlobalKind::Tensor { dtype, global_shape, .. } | GlobalKind::Sharded { dtype, global_shape, .. } => {
                let chunks = plan.chunks_of(e);
                md.entries.push((
                    e.fqn.clone(),
                    EntryMeta::Tensor(TensorMeta {
                        dtype: Some(*dtype),
                        dtype_name: dtype.torch_name().to_string(),
                        size: global_shape.clone(),
                        chunks: chunks.iter().map(|c| c.region.clone()).collect(),
                    }),
                ));
                for (ci, c) in chunks.iter().enumerate() {
                    let it = items
                        .get(&(e.fqn.clone(), Some(c.region.offsets.clone())))
                        .ok_or_else(|| missing(&e.fqn))?;
                    md.storage.push((
                        StorageIndex {
                            fqn: e.fqn.clone(),
                            offset: Some(c.region.offsets.clone()),
                            index: Some(ci as u64),
                        },
                        StorageInfo {
                            relative_path: it.file.clone(),
                            offset: it.offset,
                            length: it.length,
                        },
                    ));
                    if let Some(b) = &it.block {
                        blocks.push(sidecar::BlockRecord {
                            file: file_index[it.file.as_str()],
                            ..b.clone()
                        });
                    }
                }
            }
        }
    }
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
    storage.put_atomic(sidecar::FILE_NAME, &sc.encode())?;
    storage.put_atomic(METADATA_FILE, &md_bytes)?;
    storage.sync_dir()
}

#[cfg(test)]
mod tests {
    #[test]
    fn data_file_names() {
        assert!(super::is_data_file("__0_0.distcp"));
        assert!(super::is_data_file("__12_3.distcp"));
        assert!(!super::is_data_file("__a_0.distcp"));
        assert!(!super::is_data_file("__0_.distcp"));
        assert!(!super::is_data_file("x.distcp"));
    }
}
