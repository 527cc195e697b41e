//! Save planning. Each rank describes what it holds (a [`LocalPlan`]); the plans are exchanged
//! once; every rank computes the same [`GlobalPlan`] from them: replicated chunks are written
//! once, by the holder with the fewest bytes assigned so far, so writes balance across ranks.

use crate::error::{ensure, Error, Result};
use crate::format::metadata::{default_path, PathPart};
use crate::region::Region;
use crate::state::{EntryValue, State};
use crate::tensor::DType;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum LocalKind {
    Tensor {
        dtype: i32,
        global_shape: Vec<u64>,
        region: Region,
    },
    Object,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LocalItem {
    pub fqn: String,
    pub path: Vec<PathPart>,
    pub kind: LocalKind,
}

/// What one rank holds, sorted by key.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LocalPlan {
    pub items: Vec<LocalItem>,
}

impl LocalPlan {
    pub fn from_state(state: &State) -> LocalPlan {
        let mut items: Vec<LocalItem> = state
            .entries()
            .iter()
            .map(|e| LocalItem {
                fqn: e.fqn.clone(),
                path: e.path.clone().unwrap_or_else(|| default_path(&e.fqn)),
                kind: match &e.value {
                    EntryValue::Tensor(t) => LocalKind::Tensor {
                        dtype: t.view.dtype() as i32,
                        global_shape: t.global_shape.clone(),
                        region: t.region.clone(),
                    },
                    EntryValue::Object(_) => LocalKind::Object,
                },
            })
            .collect();
        items.sort_by(|a, b| a.fqn.cmp(&b.fqn));
        LocalPlan { items }
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("plan serialises")
    }

    pub fn decode(data: &[u8], rank: usize) -> Result<LocalPlan> {
        postcard::from_bytes(data)
            .map_err(|e| Error::comm(format!("rank {rank} sent an unreadable save plan: {e}")))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlannedChunk {
    pub region: Region,
    /// The rank that writes this chunk.
    pub writer: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum GlobalKind {
    Tensor {
        dtype: DType,
        global_shape: Vec<u64>,
        chunks: Vec<PlannedChunk>,
    },
    Object {
        writer: u32,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GlobalEntry {
    pub fqn: String,
    pub path: Vec<PathPart>,
    pub kind: GlobalKind,
}

/// The save plan of the whole job, identical on every rank.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GlobalPlan {
    pub world_size: u32,
    /// Sorted by key.
    pub entries: Vec<GlobalEntry>,
}

impl GlobalPlan {
    /// Builds the global plan from every rank's local plan (index = rank).
    pub fn build(plans: &[LocalPlan]) -> Result<GlobalPlan> {
        let mut by_key: BTreeMap<&str, Vec<(u32, &LocalItem)>> = BTreeMap::new();
        for (rank, p) in plans.iter().enumerate() {
            for it in &p.items {
                by_key
                    .entry(it.fqn.as_str())
                    .or_default()
                    .push((rank as u32, it));
            }
        }
        let mut entries = Vec::with_capacity(by_key.len());
        // (bytes, entry index, chunk index or usize::MAX for objects, holders)
        let mut work: Vec<(u64, usize, usize, Vec<u32>)> = Vec::new();
        for (fqn, holders) in by_key {
            let (first_rank, first) = holders[0];
            let entry_idx = entries.len();
            match &first.kind {
                LocalKind::Object => {
                    for (r, it) in &holders {
                        ensure!(
                            matches!(it.kind, LocalKind::Object),
                            Error::mismatch(format!("key {fqn:?} is an object on rank {first_rank} but a tensor on rank {r}"))
                        );
                    }
                    work.push((
                        0,
                        entry_idx,
                        usize::MAX,
                        holders.iter().map(|h| h.0).collect(),
                    ));
                    entries.push(GlobalEntry {
                        fqn: fqn.to_string(),
                        path: first.path.clone(),
                        kind: GlobalKind::Object { writer: first_rank },
                    });
                }
                LocalKind::Tensor {
                    dtype,
                    global_shape,
                    ..
                } => {
                    let mut regions: BTreeMap<&Region, Vec<u32>> = BTreeMap::new();
                    for (r, it) in &holders {
                        let LocalKind::Tensor {
                            dtype: d,
                            global_shape: g,
                            region,
                        } = &it.kind
                        else {
                            return Err(Error::mismatch(format!("key {fqn:?} is a tensor on rank {first_rank} but an object on rank {r}")));
                        };
                        ensure!(
                            d == dtype && g == global_shape,
                            Error::mismatch(format!(
                                "key {fqn:?}: rank {first_rank} registered {} {global_shape:?} but rank {r} registered {} {g:?}",
                                dtype_name(*dtype),
                                dtype_name(*d)
                            ))
                        );
                        regions.entry(region).or_default().push(*r);
                    }
                    let dtype = DType::try_from(*dtype)?;
                    let all_empty = regions.keys().all(|r| r.is_empty());
                    let mut chunks: Vec<(Region, Vec<u32>)> = regions
                        .into_iter()
                        .filter(|(r, _)| all_empty || !r.is_empty())
                        .map(|(r, h)| (r.clone(), h))
                        .collect();
                    if all_empty {
                        chunks.truncate(1);
                    }
                    check_tiling(fqn, global_shape, &chunks)?;
                    for (ci, (region, holders)) in chunks.iter().enumerate() {
                        work.push((
                            region.numel() * dtype.size() as u64,
                            entry_idx,
                            ci,
                            holders.clone(),
                        ));
                    }
                    let planned = chunks
                        .into_iter()
                        .map(|(region, h)| PlannedChunk {
                            region,
                            writer: h[0],
                        })
                        .collect();
                    entries.push(GlobalEntry {
                        fqn: fqn.to_string(),
                        path: first.path.clone(),
                        kind: GlobalKind::Tensor {
                            dtype,
                            global_shape: global_shape.clone(),
                            chunks: planned,
                        },
                    });
                }
            }
        }
        // Largest first, each to the least-loaded holder: balances bytes across writers.
        work.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let mut load = vec![0u64; plans.len()];
        for (bytes, ei, ci, holders) in work {
            let w = *holders
                .iter()
                .min_by_key(|&&r| (load[r as usize], r))
                .expect("a chunk has a holder");
            load[w as usize] += bytes.max(1);
            match &mut entries[ei].kind {
                GlobalKind::Tensor { chunks, .. } => chunks[ci].writer = w,
                GlobalKind::Object { writer } => *writer = w,
            }
        }
        Ok(GlobalPlan {
            world_size: plans.len() as u32,
            entries,
        })
    }

    pub fn hash(&self) -> u64 {
        super::stable_hash(&postcard::to_allocvec(self).expect("plan serialises"))
    }

    /// Bytes of tensor data each rank writes.
    pub fn bytes_per_rank(&self) -> Vec<u64> {
        let mut out = vec![0u64; self.world_size as usize];
        for e in &self.entries {
            if let GlobalKind::Tensor { dtype, chunks, .. } = &e.kind {
                for c in chunks {
                    out[c.writer as usize] += c.region.numel() * dtype.size() as u64;
                }
            }
        }
        out
    }
}

fn dtype_name(v: i32) -> String {
    DType::try_from(v)
        .map(|d| d.to_string())
        .unwrap_or_else(|_| format!("dtype#{v}"))
}

/// The distinct chunks of a tensor must not overlap and must cover it exactly.
fn check_tiling(fqn: &str, shape: &[u64], chunks: &[(Region, Vec<u32>)]) -> Result<()> {
    let total: u64 = shape.iter().product();
    let mut covered: u64 = 0;
    for (r, holders) in chunks {
        r.check_within(shape)
            .map_err(|e| e.context(format!("key {fqn:?} on rank {}", holders[0])))?;
        covered += r.numel();
    }
    // Sweep along dim 0: only chunks whose dim-0 ranges overlap can overlap.
    if !shape.is_empty() {
        let mut order: Vec<usize> = (0..chunks.len()).collect();
        order.sort_by_key(|&i| chunks[i].0.offsets[0]);
        let mut active: Vec<usize> = Vec::new();
        for &i in &order {
            let r = &chunks[i].0;
            active.retain(|&j| chunks[j].0.offsets[0] + chunks[j].0.sizes[0] > r.offsets[0]);
            for &j in &active {
                if let Some(x) = r.intersect(&chunks[j].0) {
                    return Err(Error::invalid(format!(
                        "key {fqn:?}: the piece of rank {} (offsets {:?}, sizes {:?}) overlaps the piece of rank {} (offsets {:?}, sizes {:?}) in {} elements",
                        chunks[i].1[0],
                        r.offsets,
                        r.sizes,
                        chunks[j].1[0],
                        chunks[j].0.offsets,
                        chunks[j].0.sizes,
                        x.numel()
                    )));
                }
            }
            active.push(i);
        }
    } else if chunks.len() > 1 {
        return Err(Error::invalid(format!(
            "key {fqn:?}: a 0-d tensor registered as several pieces"
        )));
    }
    ensure!(
        covered == total,
        Error::invalid(format!("key {fqn:?}: the registered pieces cover {covered} of the {total} elements of the global shape {shape:?}"))
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(fqn: &str, shape: &[u64], off: &[u64], sizes: &[u64]) -> LocalItem {
        LocalItem {
            fqn: fqn.into(),
            path: default_path(fqn),
            kind: LocalKind::Tensor {
                dtype: DType::F32 as i32,
                global_shape: shape.to_vec(),
                region: Region {
                    offsets: off.to_vec(),
                    sizes: sizes.to_vec(),
                },
            },
        }
    }

    #[test]
    fn replicated_written_once_and_balanced() {
        // Two ranks each hold two whole tensors (DDP): each tensor is written once.
        let p = LocalPlan {
            items: vec![item("a", &[4], &[0], &[4]), item("b", &[4], &[0], &[4])],
        };
        let g = GlobalPlan::build(&[p.clone(), p]).unwrap();
        let writers: Vec<u32> = g
            .entries
            .iter()
            .map(|e| match &e.kind {
                GlobalKind::Tensor { chunks, .. } => {
                    assert_eq!(chunks.len(), 1);
                    chunks[0].writer
                }
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(writers, vec![0, 1]);
        assert_eq!(g.bytes_per_rank(), vec![16, 16]);
    }

    #[test]
    fn gaps_and_overlaps_are_rejected() {
        let a = LocalPlan {
            items: vec![item("w", &[4], &[0], &[2])],
        };
        let e = GlobalPlan::build(&[a.clone()]).unwrap_err();
        assert!(e.message().contains("cover 2 of the 4"), "{e}");
        let b = LocalPlan {
            items: vec![item("w", &[4], &[1], &[3])],
        };
        let e = GlobalPlan::build(&[a, b]).unwrap_err();
        assert!(e.message().contains("overlaps"), "{e}");
    }

    #[test]
    fn dtype_disagreement_names_ranks() {
        let a = LocalPlan {
            items: vec![item("w", &[4], &[0], &[2])],
        };
        let mut bi = item("w", &[4], &[2], &[2]);
        bi.kind = LocalKind::Tensor {
            dtype: DType::BF16 as i32,
            global_shape: vec![4],
            region: Region {
                offsets: vec![2],
                sizes: vec![2],
            },
        };
        let e = GlobalPlan::build(&[a, LocalPlan { items: vec![bi] }]).unwrap_err();
        assert!(e.message().contains("rank 1 registered bfloat16"), "{e}");
    }

    #[test]
    fn empty_shards_are_dropped() {
        let a = LocalPlan {
            items: vec![item("w", &[2], &[0], &[2])],
        };
        let b = LocalPlan {
            items: vec![item("w", &[2], &[2], &[0])],
        };
        let g = GlobalPlan::build(&[a, b]).unwrap();
        match &g.entries[0].kind {
            GlobalKind::Tensor { chunks, .. } => assert_eq!(chunks.len(), 1),
            _ => unreachable!(),
        }
    }
}
