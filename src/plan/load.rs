//! Load planning: for every registered box, the saved chunks that overlap it and the overlap.
//! Each rank plans alone from the checkpoint's metadata; no exchange is needed.

use crate::error::{ensure, Error, Result};
use crate::format::metadata::{EntryMeta, Metadata, MetadataLookup, StorageInfo};
use crate::region::{tiling_defect, Region, TilingDefect};
use crate::state::{EntryValue, State};

/// One saved chunk to read, and where its overlap with registered boxes goes.
#[derive(Clone, Debug)]
pub struct ChunkRead {
    pub fqn: String,
    pub chunk: Region,
    pub storage: StorageInfo,
    /// (index of the state entry, overlap in global coordinates).
    pub targets: Vec<(usize, Region)>,
}

#[derive(Clone, Debug)]
pub struct ObjectRead {
    pub entry: usize,
    pub fqn: String,
    pub storage: StorageInfo,
}

#[derive(Clone, Debug, Default)]
pub struct LoadPlan {
    pub chunks: Vec<ChunkRead>,
    pub objects: Vec<ObjectRead>,
    /// Registered keys the checkpoint does not have (partial load only).
    pub missing: Vec<String>,
}

impl LoadPlan {
    pub fn bytes_to_read(&self, md: &Metadata, lookup: &MetadataLookup) -> u64 {
        self.chunks
            .iter()
            .map(|c| match lookup.entry(md, &c.fqn) {
                Some(EntryMeta::Tensor(t)) => {
                    c.targets.iter().map(|(_, r)| r.numel()).sum::<u64>() * t.dtype.map_or(1, |d| d.size() as u64)
                }
                _ => 0,
            })
            .sum()
    }
}

pub fn plan_load(state: &State, md: &Metadata, lookup: &MetadataLookup, strict: bool) -> Result<LoadPlan> {
    let mut plan = LoadPlan::default();
    for (ei, e) in state.entries().iter().enumerate() {
        let Some(meta) = lookup.entry(md, &e.fqn) else {
            ensure!(
                !strict,
                Error::not_found(format!("key {:?} is not in the checkpoint (strict load)", e.fqn))
            );
            plan.missing.push(e.fqn.clone());
            continue;
        };
        match (&e.value, meta) {
            (EntryValue::Object(_), EntryMeta::Bytes) => {
                let storage = lookup.storage(md, &e.fqn, None).ok_or_else(|| {
                    Error::corrupt(format!(
                        "key {:?}: the checkpoint metadata lists it but has no storage entry for it",
                        e.fqn
                    ))
                })?;
                plan.objects.push(ObjectRead {
                    entry: ei,
                    fqn: e.fqn.clone(),
                    storage: storage.clone(),
                });
            }
            (EntryValue::Tensor(t), EntryMeta::Tensor(tm)) => {
                t.view.ensure_writable(&e.fqn)?;
                let saved_dtype = tm.dtype.ok_or_else(|| {
                    Error::unsupported(format!(
                        "key {:?}: the checkpoint's dtype torch.{} is not supported",
                        e.fqn, tm.dtype_name
                    ))
                })?;
                ensure!(
                    saved_dtype == t.view.dtype() && tm.size == t.global_shape,
                    Error::mismatch(format!(
                        "key {:?}: the checkpoint has {} {:?} but the registered tensor is {} {:?}",
                        e.fqn,
                        saved_dtype,
                        tm.size,
                        t.view.dtype(),
                        t.global_shape
                    ))
                );
                let first = plan.chunks.len();
                for chunk in &tm.chunks {
                    chunk.check_within(&tm.size).map_err(|err| {
                        Error::corrupt(format!(
                            "key {:?}: the checkpoint metadata lists a chunk outside the tensor: {}",
                            e.fqn,
                            err.message()
                        ))
                    })?;
                    let Some(overlap) = chunk.intersect(&t.region) else {
                        continue;
                    };
                    let storage = lookup.storage(md, &e.fqn, Some(&chunk.offsets)).ok_or_else(|| {
                        Error::corrupt(format!(
                            "key {:?}: no storage entry for the chunk at offsets {:?}",
                            e.fqn, chunk.offsets
                        ))
                    })?;
                    plan.chunks.push(ChunkRead {
                        fqn: e.fqn.clone(),
                        chunk: chunk.clone(),
                        storage: storage.clone(),
                        targets: vec![(ei, overlap)],
                    });
                }
                // The overlaps must tile the registered box: two saved chunks that overlap (a
                // damaged .metadata that no checksum covers) or a gap would leave part of it
                // unwritten or written twice.
                let overlaps: Vec<&Region> = plan.chunks[first..].iter().map(|c| &c.targets[0].1).collect();
                let defect = tiling_defect(&t.region, &overlaps).map_err(|err| err.context(format!("key {:?}", e.fqn)))?;
                match defect {
                    None => {}
                    Some(TilingDefect::Overlap { a, b, .. }) => {
                        let (a, b) = (&plan.chunks[first + a].chunk, &plan.chunks[first + b].chunk);
                        return Err(Error::corrupt(format!(
                            "key {:?}: the checkpoint metadata lists overlapping chunks (offsets {:?} sizes {:?} and offsets {:?} sizes {:?})",
                            e.fqn, a.offsets, a.sizes, b.offsets, b.sizes
                        )));
                    }
                    Some(TilingDefect::Gap { at }) => {
                        let covered: u64 = overlaps.iter().map(|r| r.numel()).fold(0, u64::saturating_add);
                        return Err(Error::corrupt(format!(
                            "key {:?}: the saved chunks cover {covered} of the {} elements needed at offsets {:?} sizes {:?} (none holds index {at:?})",
                            e.fqn,
                            t.region.numel(),
                            t.region.offsets,
                            t.region.sizes
                        )));
                    }
                }
            }
            (EntryValue::Tensor(_), EntryMeta::Bytes) => {
                return Err(Error::mismatch(format!(
                    "key {:?} is a tensor here but a non-tensor object in the checkpoint",
                    e.fqn
                )));
            }
            (EntryValue::Object(_), EntryMeta::Tensor(_)) => {
                return Err(Error::mismatch(format!(
                    "key {:?} is a non-tensor object here but a tensor in the checkpoint",
                    e.fqn
                )));
            }
        }
    }
    // Read in file order: fewer seeks, and neighbouring items share read-ahead.
    plan.chunks
        .sort_by(|a, b| (&a.storage.relative_path, a.storage.offset).cmp(&(&b.storage.relative_path, b.storage.offset)));
    // Every chunk has its own item: two that share bytes mean a damaged .metadata (a file name
    // or offset changed so that a chunk reads another chunk's intact item).
    for w in plan.chunks.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if a.storage.relative_path == b.storage.relative_path && a.storage.offset.saturating_add(a.storage.length) > b.storage.offset {
            return Err(Error::corrupt(format!(
                "the checkpoint metadata puts the chunk of key {:?} at {:?} and the chunk of key {:?} at {:?} in overlapping bytes of {} (offsets {} and {})",
                a.fqn, a.chunk.offsets, b.fqn, b.chunk.offsets, a.storage.relative_path, a.storage.offset, b.storage.offset
            )));
        }
    }
    Ok(plan)
}
