//! Load planning: for every registered box, the saved chunks that overlap it and the overlap.
//! Each rank plans alone from the checkpoint's metadata; no exchange is needed.

use crate::error::{ensure, Error, Result};
use crate::format::metadata::{EntryMeta, Metadata, MetadataLookup, StorageInfo, TensorMeta};
use crate::region::{tiling_defect, Region, TilingDefect};
use crate::state::{Entry, EntryValue, State, TensorEntry};

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
        plan_entry(&mut plan, ei, e, md, lookup, strict).map_err(|err| err.with_key(&e.fqn))?;
    }
    sort_in_file_order(&mut plan.chunks);
    check_no_shared_bytes(&plan.chunks)?;
    Ok(plan)
}

/// Adds the reads of state entry `ei` (`e`) to `plan`, or its key to the missing ones.
fn plan_entry(plan: &mut LoadPlan, ei: usize, e: &Entry, md: &Metadata, lookup: &MetadataLookup, strict: bool) -> Result<()> {
    let Some(meta) = lookup.entry(md, &e.fqn) else {
        ensure!(
            !strict,
            Error::not_found(format!("key {:?} is not in the checkpoint (strict load)", e.fqn))
        );
        plan.missing.push(e.fqn.clone());
        return Ok(());
    };
    match (&e.value, meta) {
        (EntryValue::Object(_), EntryMeta::Bytes) => plan.objects.push(object_read(ei, &e.fqn, md, lookup)?),
        (EntryValue::Tensor(t), EntryMeta::Tensor(tm)) => {
            t.view.ensure_writable(&e.fqn)?;
            check_saved_tensor_matches(&e.fqn, t, tm)?;
            let reads = chunk_reads(ei, &e.fqn, &t.region, tm, md, lookup)?;
            check_overlaps_tile(&e.fqn, &t.region, &reads)?;
            plan.chunks.extend(reads);
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
    Ok(())
}

/// The read of the non-tensor object at state entry `entry`.
fn object_read(entry: usize, fqn: &str, md: &Metadata, lookup: &MetadataLookup) -> Result<ObjectRead> {
    let storage = lookup.storage(md, fqn, None).ok_or_else(|| {
        Error::corrupt(format!(
            "key {fqn:?}: the checkpoint metadata lists it but has no storage entry for it"
        ))
    })?;
    Ok(ObjectRead {
        entry,
        fqn: fqn.to_string(),
        storage: storage.clone(),
    })
}

/// The saved tensor has a dtype libdcp knows, and the registered tensor's dtype and shape.
fn check_saved_tensor_matches(fqn: &str, t: &TensorEntry, tm: &TensorMeta) -> Result<()> {
    let saved_dtype = tm.dtype.ok_or_else(|| {
        Error::unsupported(format!(
            "key {fqn:?}: the checkpoint's dtype torch.{} is not supported",
            tm.dtype_name
        ))
    })?;
    ensure!(
        saved_dtype == t.view.dtype() && tm.size == t.global_shape,
        Error::mismatch(format!(
            "key {fqn:?}: the checkpoint has {} {:?} but the registered tensor is {} {:?}",
            saved_dtype,
            tm.size,
            t.view.dtype(),
            t.global_shape
        ))
    );
    Ok(())
}

/// The saved chunks of `tm` that overlap `region` (the box of state entry `entry`), in metadata
/// order, each targeting its overlap; every chunk listed must lie inside the tensor.
fn chunk_reads(entry: usize, fqn: &str, region: &Region, tm: &TensorMeta, md: &Metadata, lookup: &MetadataLookup) -> Result<Vec<ChunkRead>> {
    let mut reads = Vec::new();
    for chunk in &tm.chunks {
        chunk.check_within(&tm.size).map_err(|err| {
            Error::corrupt(format!(
                "key {fqn:?}: the checkpoint metadata lists a chunk outside the tensor: {}",
                err.message()
            ))
        })?;
        let Some(overlap) = chunk.intersect(region) else {
            continue;
        };
        let storage = lookup.storage(md, fqn, Some(&chunk.offsets)).ok_or_else(|| {
            Error::corrupt(format!(
                "key {fqn:?}: no storage entry for the chunk at offsets {:?}",
                chunk.offsets
            ))
        })?;
        reads.push(ChunkRead {
            fqn: fqn.to_string(),
            chunk: chunk.clone(),
            storage: storage.clone(),
            targets: vec![(entry, overlap)],
        });
    }
    Ok(reads)
}

/// The overlaps of `reads` (one target each) must tile the registered box: two saved chunks that
/// overlap (a damaged .metadata that no checksum covers) or a gap would leave part of it unwritten
/// or written twice.
fn check_overlaps_tile(fqn: &str, region: &Region, reads: &[ChunkRead]) -> Result<()> {
    let overlaps: Vec<&Region> = reads.iter().map(|c| &c.targets[0].1).collect();
    let defect = tiling_defect(region, &overlaps).map_err(|err| err.context(format!("key {fqn:?}")))?;
    match defect {
        None => Ok(()),
        Some(TilingDefect::Overlap { a, b, .. }) => {
            let (a, b) = (&reads[a].chunk, &reads[b].chunk);
            Err(Error::corrupt(format!(
                "key {fqn:?}: the checkpoint metadata lists overlapping chunks (offsets {:?} sizes {:?} and offsets {:?} sizes {:?})",
                a.offsets, a.sizes, b.offsets, b.sizes
            )))
        }
        Some(TilingDefect::Gap { at }) => {
            let covered: u64 = overlaps.iter().map(|r| r.numel()).fold(0, u64::saturating_add);
            Err(Error::corrupt(format!(
                "key {fqn:?}: the saved chunks cover {covered} of the {} elements needed at offsets {:?} sizes {:?} (none holds index {at:?})",
                region.numel(),
                region.offsets,
                region.sizes
            )))
        }
    }
}

/// Read in file order: fewer seeks, and neighbouring items share read-ahead.
fn sort_in_file_order(chunks: &mut [ChunkRead]) {
    chunks.sort_by(|a, b| (&a.storage.relative_path, a.storage.offset).cmp(&(&b.storage.relative_path, b.storage.offset)));
}

/// Whether `b`, stored at or after `a` in file order, starts before `a` ends in the same file.
fn shares_bytes(a: &StorageInfo, b: &StorageInfo) -> bool {
    a.relative_path == b.relative_path && a.offset.saturating_add(a.length) > b.offset
}

/// Every chunk has its own item: two that share bytes mean a damaged .metadata (a file name or
/// offset changed so that a chunk reads another chunk's intact item). `chunks` are in file order.
fn check_no_shared_bytes(chunks: &[ChunkRead]) -> Result<()> {
    for w in chunks.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if shares_bytes(&a.storage, &b.storage) {
            return Err(Error::corrupt(format!(
                "the checkpoint metadata puts the chunk of key {:?} at {:?} and the chunk of key {:?} at {:?} in overlapping bytes of {} (offsets {} and {})",
                a.fqn, a.chunk.offsets, b.fqn, b.chunk.offsets, a.storage.relative_path, a.storage.offset, b.storage.offset
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(offsets: &[u64], sizes: &[u64]) -> Region {
        Region {
            offsets: offsets.to_vec(),
            sizes: sizes.to_vec(),
        }
    }

    fn storage(path: &str, offset: u64, length: u64) -> StorageInfo {
        StorageInfo {
            relative_path: path.into(),
            offset,
            length,
        }
    }

    /// A read of the saved chunk `chunk` whose overlap with the registered box is `overlap`.
    fn read(chunk: Region, overlap: Region, at: StorageInfo) -> ChunkRead {
        ChunkRead {
            fqn: "w".into(),
            chunk,
            storage: at,
            targets: vec![(0, overlap)],
        }
    }

    #[test]
    fn overlaps_that_tile_the_box_pass() {
        let reads = [
            read(region(&[0], &[4]), region(&[2], &[2]), storage("a", 0, 16)),
            read(region(&[4], &[4]), region(&[4], &[2]), storage("a", 16, 16)),
        ];
        check_overlaps_tile("w", &region(&[2], &[4]), &reads).unwrap();
    }

    #[test]
    fn a_gap_in_the_overlaps_names_what_is_covered() {
        let reads = [read(region(&[0], &[2]), region(&[0], &[2]), storage("a", 0, 8))];
        let e = check_overlaps_tile("w", &region(&[0], &[4]), &reads).unwrap_err();
        assert_eq!(
            e.message(),
            "key \"w\": the saved chunks cover 2 of the 4 elements needed at offsets [0] sizes [4] (none holds index [2])"
        );
    }

    #[test]
    fn overlapping_chunks_are_named() {
        let reads = [
            read(region(&[0], &[3]), region(&[0], &[3]), storage("a", 0, 12)),
            read(region(&[2], &[2]), region(&[2], &[2]), storage("a", 12, 8)),
        ];
        let e = check_overlaps_tile("w", &region(&[0], &[4]), &reads).unwrap_err();
        assert_eq!(
            e.message(),
            "key \"w\": the checkpoint metadata lists overlapping chunks (offsets [0] sizes [3] and offsets [2] sizes [2])"
        );
    }

    #[test]
    fn file_order_is_by_path_then_offset() {
        let mut reads: Vec<ChunkRead> = [("b", 0), ("a", 8), ("a", 0), ("b", 4)]
            .into_iter()
            .map(|(p, o)| read(region(&[0], &[1]), region(&[0], &[1]), storage(p, o, 4)))
            .collect();
        sort_in_file_order(&mut reads);
        let order: Vec<(&str, u64)> = reads.iter().map(|c| (c.storage.relative_path.as_str(), c.storage.offset)).collect();
        assert_eq!(order, vec![("a", 0), ("a", 8), ("b", 0), ("b", 4)]);
    }

    #[test]
    fn shared_bytes_only_within_one_file() {
        assert!(!shares_bytes(&storage("a", 0, 8), &storage("a", 8, 8)), "adjacent items");
        assert!(shares_bytes(&storage("a", 0, 9), &storage("a", 8, 8)));
        assert!(!shares_bytes(&storage("a", 0, 9), &storage("b", 8, 8)), "another file");
        assert!(shares_bytes(&storage("a", 1, u64::MAX), &storage("a", u64::MAX - 1, 1)), "saturates");
    }

    #[test]
    fn chunks_sharing_bytes_are_refused() {
        let ok = [
            read(region(&[0], &[2]), region(&[0], &[2]), storage("a", 0, 8)),
            read(region(&[2], &[2]), region(&[2], &[2]), storage("a", 8, 8)),
        ];
        check_no_shared_bytes(&ok).unwrap();
        let bad = [ok[0].clone(), read(region(&[2], &[2]), region(&[2], &[2]), storage("a", 4, 8))];
        let e = check_no_shared_bytes(&bad).unwrap_err();
        assert_eq!(
            e.message(),
            "the checkpoint metadata puts the chunk of key \"w\" at [0] and the chunk of key \"w\" at [2] in overlapping bytes of a (offsets 0 and 4)"
        );
    }
}
