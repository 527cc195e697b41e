//! What rank 0 assembles at the commit from every rank's report: the `.metadata` of the plan
//! (torch's format) and the sidecar.

use super::write::ItemWritten;
use crate::engine::writer_version;
use crate::error::{Error, Result};
use crate::format::metadata::{EntryMeta, Metadata, StorageIndex, StorageInfo, TensorMeta};
use crate::format::sidecar::{self, FileRecord, Sidecar, BLOCK_SIZE};
use crate::plan::save::{GlobalKind, GlobalPlan};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// What one rank wrote: its files and the items in them.
#[derive(Serialize, Deserialize)]
pub(super) struct RankWrites {
    pub(super) files: Vec<FileRecord>,
    pub(super) items: Vec<ItemWritten>,
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

/// The sidecar and `.metadata` bytes of a save, from what every rank reports having written.
pub(super) fn commit_records(plan: &GlobalPlan, location: &str, save_id: &str, ranks: Vec<RankWrites>) -> Result<(Sidecar, Vec<u8>)> {
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
