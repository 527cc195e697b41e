//! Save planning. Each rank describes what it holds (a [`LocalPlan`]); every rank computes the
//! same [`GlobalPlan`]: replicated chunks are written once, by one of their holders, so that
//! writes balance across ranks.
//!
//! Two ways to the global plan:
//! - Uniform: every rank's local plan is the same (SPMD layouts registered with meshes and
//!   placements, replicated tensors, objects everywhere). Each rank builds the plan from its own
//!   local plan in O(keys); nothing but a hash is exchanged. Writers of sharded tensors follow a
//!   rotation over each replica group, so no rank needs every chunk.
//! - Per rank: otherwise the local plans are all-gathered and merged; chunks held by several
//!   ranks go to the holder with the fewest bytes so far (largest chunks first).

use crate::error::{ensure, Error, Result};
use crate::format::metadata::{default_path, PathPart};
use crate::mesh::{check_placements, region_at, unravel, DeviceMesh, Placement};
use crate::region::{tiling_defect, Region, TilingDefect};
use crate::state::{EntryValue, State};
use crate::tensor::DType;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum LocalKind {
    /// A box given explicitly (or a whole tensor).
    Tensor {
        dtype: DType,
        global_shape: Vec<u64>,
        region: Region,
    },
    /// A shard given by a mesh (index into [`LocalPlan::meshes`]) and placements.
    Sharded {
        dtype: DType,
        global_shape: Vec<u64>,
        mesh: u32,
        placements: Vec<Placement>,
    },
    Object,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LocalItem {
    pub fqn: String,
    pub path: Vec<PathPart>,
    pub kind: LocalKind,
}

/// What one rank holds, sorted by key; meshes are listed once.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LocalPlan {
    pub meshes: Vec<DeviceMesh>,
    pub items: Vec<LocalItem>,
}

impl LocalPlan {
    pub fn from_state(state: &State) -> LocalPlan {
        let mut meshes: Vec<DeviceMesh> = Vec::new();
        let mut items: Vec<LocalItem> = Vec::with_capacity(state.len());
        for e in state.entries() {
            let kind = match &e.value {
                EntryValue::Tensor(t) => match &t.sharding {
                    Some(sh) => LocalKind::Sharded {
                        dtype: t.view.dtype(),
                        global_shape: t.global_shape.clone(),
                        mesh: intern(&mut meshes, &sh.mesh),
                        placements: sh.placements.clone(),
                    },
                    None => LocalKind::Tensor {
                        dtype: t.view.dtype(),
                        global_shape: t.global_shape.clone(),
                        region: t.region.clone(),
                    },
                },
                EntryValue::Object(_) => LocalKind::Object,
            };
            items.push(LocalItem {
                fqn: e.fqn.clone(),
                path: e.path.clone().unwrap_or_else(|| default_path(&e.fqn)),
                kind,
            });
        }
        items.sort_by(|a, b| a.fqn.cmp(&b.fqn));
        LocalPlan { meshes, items }
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("plan serialises")
    }

    pub fn decode(data: &[u8], rank: usize) -> Result<LocalPlan> {
        postcard::from_bytes(data).map_err(|e| Error::comm(format!("rank {rank} sent an unreadable save plan: {e}")))
    }

    /// Checks what building the global plan relies on (meshes well formed, placements fit the
    /// mesh and the tensor, boxes inside their tensors, element counts in range): a plan decoded
    /// from another rank has not been through `State`'s checks.
    pub fn validate(&self, whose: &str) -> Result<()> {
        for m in &self.meshes {
            DeviceMesh::new(m.shape(), Some(m.ranks()), Some(m.dim_names())).map_err(|e| e.context(format!("save plan of {whose}")))?;
        }
        for it in &self.items {
            let ctx = |e: Error| e.context(format!("save plan of {whose}, key {:?}", it.fqn));
            match &it.kind {
                LocalKind::Object => {}
                LocalKind::Tensor {
                    dtype,
                    global_shape,
                    region,
                } => {
                    tensor_bytes(*dtype, global_shape).map_err(ctx)?;
                    region.check_within(global_shape).map_err(ctx)?;
                }
                LocalKind::Sharded {
                    dtype,
                    global_shape,
                    mesh,
                    placements,
                } => {
                    tensor_bytes(*dtype, global_shape).map_err(ctx)?;
                    let m = self
                        .meshes
                        .get(*mesh as usize)
                        .ok_or_else(|| ctx(Error::invalid(format!("mesh {mesh} is not in the plan"))))?;
                    check_placements(m, placements, global_shape.len()).map_err(ctx)?;
                }
            }
        }
        Ok(())
    }
}

/// The index of `m` in `meshes`, added at the end if it is not there yet.
fn intern(meshes: &mut Vec<DeviceMesh>, m: &DeviceMesh) -> u32 {
    match meshes.iter().position(|x| x == m) {
        Some(i) => i as u32,
        None => {
            meshes.push(m.clone());
            meshes.len() as u32 - 1
        }
    }
}

/// Bytes of a tensor of `shape`, checked to fit in 64 bits.
fn tensor_bytes(dtype: DType, shape: &[u64]) -> Result<u64> {
    crate::tensor::numel(shape)?
        .checked_mul(dtype.size() as u64)
        .ok_or_else(|| Error::invalid(format!("a {dtype} tensor of shape {shape:?} has more bytes than 64 bits count")))
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlannedChunk {
    pub region: Region,
    /// The rank that writes this chunk.
    pub writer: u32,
}

/// A tensor sharded over a mesh, held by every rank of the mesh: chunks and writers follow from
/// the placements.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardedTensor {
    pub mesh: u32,
    pub placements: Vec<Placement>,
    /// Rotates which replica writes, so replicated shards spread over the replica group.
    pub rotation: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum GlobalKind {
    Tensor {
        dtype: DType,
        global_shape: Vec<u64>,
        chunks: Vec<PlannedChunk>,
    },
    Sharded {
        dtype: DType,
        global_shape: Vec<u64>,
        spec: ShardedTensor,
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
    pub meshes: Vec<DeviceMesh>,
    /// Sorted by key.
    pub entries: Vec<GlobalEntry>,
}

/// What a rank contributes to the plan: its own plan when all are the same, or all of them.
pub enum Plans<'p> {
    Uniform(&'p LocalPlan, u32),
    PerRank(&'p [LocalPlan]),
}

/// Dims of the mesh that shard (the rest replicate).
fn shard_dims(placements: &[Placement]) -> Vec<bool> {
    placements.iter().map(|p| !matches!(p, Placement::Replicate)).collect()
}

impl ShardedTensor {
    /// (linear index over the sharding dims, linear index over the replicating dims, replica
    /// count) of a mesh coordinate.
    fn split_coord(&self, mesh: &DeviceMesh, coord: &[u32]) -> (u64, u64, u64) {
        let shards = shard_dims(&self.placements);
        let (mut s, mut r, mut n) = (0u64, 0u64, 1u64);
        for (d, &c) in coord.iter().enumerate() {
            let size = mesh.shape()[d] as u64;
            if shards[d] {
                s = s * size + c as u64;
            } else {
                r = r * size + c as u64;
                n *= size;
            }
        }
        (s, r, n)
    }

    /// The shard the rank at `coord` writes, if it writes one.
    pub fn writes(&self, mesh: &DeviceMesh, coord: &[u32], global_shape: &[u64]) -> Option<Region> {
        let region = region_at(global_shape, mesh.shape(), coord, &self.placements);
        let (s, r, n) = self.split_coord(mesh, coord);
        let keep = !region.is_empty() || (global_shape.iter().product::<u64>() == 0 && s == 0);
        (keep && r == (s + self.rotation) % n).then_some(region)
    }

    /// Every distinct non-empty chunk with its writer, in shard order.
    pub fn chunks(&self, mesh: &DeviceMesh, global_shape: &[u64]) -> Vec<PlannedChunk> {
        let shards = shard_dims(&self.placements);
        let shard_shape: Vec<u32> = mesh.shape().iter().zip(&shards).map(|(&s, &sh)| if sh { s } else { 1 }).collect();
        let repl_shape: Vec<u32> = mesh.shape().iter().zip(&shards).map(|(&s, &sh)| if sh { 1 } else { s }).collect();
        let n_shards: u64 = shard_shape.iter().map(|&s| s as u64).product();
        let n_repl: u64 = repl_shape.iter().map(|&s| s as u64).product();
        let all_empty = global_shape.iter().product::<u64>() == 0;
        let mut out = Vec::new();
        for s in 0..n_shards {
            let mut coord = unravel(s, &shard_shape);
            let region = region_at(global_shape, mesh.shape(), &coord, &self.placements);
            if region.is_empty() && !(all_empty && s == 0) {
                continue;
            }
            let r = unravel((s + self.rotation) % n_repl, &repl_shape);
            for d in 0..coord.len() {
                if !shards[d] {
                    coord[d] = r[d];
                }
            }
            out.push(PlannedChunk {
                region,
                writer: mesh.rank_at(&coord),
            });
        }
        out
    }
}

impl GlobalPlan {
    pub fn build(plans: Plans) -> Result<GlobalPlan> {
        match plans {
            Plans::Uniform(p, world) => {
                p.validate("this rank")?;
                Self::build_uniform(p, world)
            }
            Plans::PerRank(ps) => {
                for (r, p) in ps.iter().enumerate() {
                    p.validate(&format!("rank {r}"))?;
                }
                Self::build_per_rank(ps)
            }
        }
    }

    fn build_uniform(p: &LocalPlan, world: u32) -> Result<GlobalPlan> {
        let all: Vec<u32> = (0..world).collect();
        let mut entries = Vec::with_capacity(p.items.len());
        let mut work = Vec::new();
        for (i, it) in p.items.iter().enumerate() {
            let kind = match &it.kind {
                LocalKind::Object => {
                    work.push(object_work(i, all.clone()));
                    GlobalKind::Object { writer: 0 }
                }
                LocalKind::Tensor {
                    dtype,
                    global_shape,
                    region,
                } => {
                    let chunks = [(region.clone(), all.clone())];
                    check_tiling(&it.fqn, global_shape, &chunks)?;
                    work.extend(chunk_work(i, *dtype, &chunks));
                    GlobalKind::Tensor {
                        dtype: *dtype,
                        global_shape: global_shape.clone(),
                        chunks: vec![PlannedChunk {
                            region: region.clone(),
                            writer: 0,
                        }],
                    }
                }
                LocalKind::Sharded {
                    dtype,
                    global_shape,
                    mesh,
                    placements,
                } => {
                    check_mesh_spans_job(&it.fqn, p, *mesh, world)?;
                    GlobalKind::Sharded {
                        dtype: *dtype,
                        global_shape: global_shape.clone(),
                        spec: ShardedTensor {
                            mesh: *mesh,
                            placements: placements.clone(),
                            rotation: i as u64,
                        },
                    }
                }
            };
            entries.push(GlobalEntry {
                fqn: it.fqn.clone(),
                path: it.path.clone(),
                kind,
            });
        }
        let mut plan = GlobalPlan {
            world_size: world,
            meshes: p.meshes.clone(),
            entries,
        };
        plan.assign(work, &[]);
        Ok(plan)
    }

    fn build_per_rank(plans: &[LocalPlan]) -> Result<GlobalPlan> {
        let by_key = holders_by_key(plans);
        let mut meshes: Vec<DeviceMesh> = Vec::new();
        let mut entries = Vec::with_capacity(by_key.len());
        let mut work = Vec::new();
        for (fqn, holders) in by_key {
            let (first_rank, first) = holders[0];
            let entry = entries.len();
            let kind = if matches!(first.kind, LocalKind::Object) {
                check_all_objects(fqn, &holders)?;
                work.push(object_work(entry, holders.iter().map(|h| h.0).collect()));
                GlobalKind::Object { writer: first_rank }
            } else {
                let (dtype, shape) = agreed_tensor_meta(fqn, &holders)?;
                match tensor_layout(fqn, shape, &holders, plans)? {
                    TensorLayout::Sharded(mesh, placements) => GlobalKind::Sharded {
                        dtype,
                        global_shape: shape.to_vec(),
                        spec: ShardedTensor {
                            mesh: intern(&mut meshes, mesh),
                            placements: placements.to_vec(),
                            rotation: entry as u64,
                        },
                    },
                    TensorLayout::Chunks(chunks) => {
                        work.extend(chunk_work(entry, dtype, &chunks));
                        GlobalKind::Tensor {
                            dtype,
                            global_shape: shape.to_vec(),
                            chunks: planned_chunks(chunks),
                        }
                    }
                }
            };
            entries.push(GlobalEntry {
                fqn: fqn.to_string(),
                path: first.path.clone(),
                kind,
            });
        }
        let mut plan = GlobalPlan {
            world_size: plans.len() as u32,
            meshes,
            entries,
        };
        // Ranks already write their analytic shards: count those bytes before balancing the rest.
        let preload = plan.bytes_written(|k| matches!(k, GlobalKind::Sharded { .. }));
        plan.assign(work, &preload);
        Ok(plan)
    }

    /// Largest first, each to the least-loaded holder: balances bytes across writers.
    fn assign(&mut self, mut work: Vec<Work>, preload: &[u64]) {
        work.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.entry.cmp(&b.entry)).then(a.chunk.cmp(&b.chunk)));
        let mut load = vec![0u64; self.world_size as usize];
        for (l, p) in load.iter_mut().zip(preload) {
            *l = *p;
        }
        for w in work {
            let writer = *w
                .holders
                .iter()
                .min_by_key(|&&r| (load[r as usize], r))
                .expect("a chunk has a holder");
            load[writer as usize] = load[writer as usize].saturating_add(w.bytes.max(1));
            match &mut self.entries[w.entry].kind {
                GlobalKind::Tensor { chunks, .. } => chunks[w.chunk].writer = writer,
                GlobalKind::Object { writer: wr } => *wr = writer,
                GlobalKind::Sharded { .. } => {}
            }
        }
    }

    pub fn hash(&self) -> u64 {
        super::stable_hash(&postcard::to_allocvec(self).expect("plan serialises"))
    }

    pub fn mesh(&self, spec: &ShardedTensor) -> &DeviceMesh {
        &self.meshes[spec.mesh as usize]
    }

    /// The chunks `rank` writes for an entry (region list), in plan order (what tests, the fuzz
    /// targets and the plan benchmark check plans with).
    #[cfg(any(test, feature = "internals"))]
    pub fn chunks_written_by(&self, e: &GlobalEntry, rank: u32) -> Vec<Region> {
        match &e.kind {
            GlobalKind::Tensor { chunks, .. } => chunks.iter().filter(|c| c.writer == rank).map(|c| c.region.clone()).collect(),
            GlobalKind::Sharded { global_shape, spec, .. } => self.sharded_writes(spec, global_shape, rank).into_iter().collect(),
            GlobalKind::Object { .. } => vec![],
        }
    }

    /// Whether `rank` writes any chunk of a tensor entry (what `chunks_written_by` says, without
    /// collecting the regions).
    pub fn writes_any(&self, e: &GlobalEntry, rank: u32) -> bool {
        match &e.kind {
            GlobalKind::Tensor { chunks, .. } => chunks.iter().any(|c| c.writer == rank),
            GlobalKind::Sharded { global_shape, spec, .. } => self.sharded_writes(spec, global_shape, rank).is_some(),
            GlobalKind::Object { .. } => false,
        }
    }

    fn sharded_writes(&self, spec: &ShardedTensor, global_shape: &[u64], rank: u32) -> Option<Region> {
        let mesh = self.mesh(spec);
        spec.writes(mesh, &mesh.coordinate_of(rank)?, global_shape)
    }

    /// All chunks of a tensor entry with their writers (expands sharded entries).
    pub fn chunks_of(&self, e: &GlobalEntry) -> Vec<PlannedChunk> {
        match &e.kind {
            GlobalKind::Tensor { chunks, .. } => chunks.clone(),
            GlobalKind::Sharded { global_shape, spec, .. } => spec.chunks(self.mesh(spec), global_shape),
            GlobalKind::Object { .. } => vec![],
        }
    }

    /// Bytes of tensor data each rank writes.
    #[cfg(any(test, feature = "internals"))]
    pub fn bytes_per_rank(&self) -> Vec<u64> {
        self.bytes_written(|_| true)
    }

    /// Bytes of tensor data each rank writes for the entries of the kinds `counted` picks.
    fn bytes_written(&self, counted: impl Fn(&GlobalKind) -> bool) -> Vec<u64> {
        let mut out = vec![0u64; self.world_size as usize];
        for e in self.entries.iter().filter(|e| counted(&e.kind)) {
            let elem = match &e.kind {
                GlobalKind::Tensor { dtype, .. } | GlobalKind::Sharded { dtype, .. } => dtype.size() as u64,
                GlobalKind::Object { .. } => continue,
            };
            for c in self.chunks_of(e) {
                out[c.writer as usize] = out[c.writer as usize].saturating_add(c.region.numel() * elem);
            }
        }
        out
    }
}

struct Work {
    bytes: u64,
    entry: usize,
    chunk: usize,
    holders: Vec<u32>,
}

/// The items of every rank, grouped by key (keys sorted, ranks ascending within a key).
fn holders_by_key(plans: &[LocalPlan]) -> BTreeMap<&str, Vec<(u32, &LocalItem)>> {
    let mut by_key: BTreeMap<&str, Vec<(u32, &LocalItem)>> = BTreeMap::new();
    for (rank, p) in plans.iter().enumerate() {
        for it in &p.items {
            by_key.entry(it.fqn.as_str()).or_default().push((rank as u32, it));
        }
    }
    by_key
}

/// Writing an object: no tensor bytes, any of `holders` may write it.
fn object_work(entry: usize, holders: Vec<u32>) -> Work {
    Work {
        bytes: 0,
        entry,
        chunk: usize::MAX,
        holders,
    }
}

/// Writing each of the chunks (region, holders) of entry `entry`.
fn chunk_work(entry: usize, dtype: DType, chunks: &[(Region, Vec<u32>)]) -> impl Iterator<Item = Work> + '_ {
    chunks.iter().enumerate().map(move |(ci, (region, h))| Work {
        bytes: region.numel() * dtype.size() as u64,
        entry,
        chunk: ci,
        holders: h.clone(),
    })
}

/// The chunks with their first holder as writer, until [`GlobalPlan::assign`] balances them.
fn planned_chunks(chunks: Vec<(Region, Vec<u32>)>) -> Vec<PlannedChunk> {
    chunks
        .into_iter()
        .map(|(region, h)| PlannedChunk { region, writer: h[0] })
        .collect()
}

/// A sharded tensor of a uniform plan is written by the mesh's ranks: they must be the job's.
fn check_mesh_spans_job(fqn: &str, p: &LocalPlan, mesh: u32, world: u32) -> Result<()> {
    let m = p
        .meshes
        .get(mesh as usize)
        .ok_or_else(|| Error::internal("plan refers to a missing mesh"))?;
    ensure!(
        m.size() as u32 == world && m.ranks().iter().all(|&r| r < world),
        Error::invalid(format!(
            "key {fqn:?}: its mesh has ranks {:?} but the job has ranks 0..{world}",
            m.ranks()
        ))
    );
    Ok(())
}

/// Every holder of a key the first holder registered as an object registered an object too.
fn check_all_objects(fqn: &str, holders: &[(u32, &LocalItem)]) -> Result<()> {
    let first_rank = holders[0].0;
    for (r, it) in holders {
        ensure!(
            matches!(it.kind, LocalKind::Object),
            Error::mismatch(format!("key {fqn:?} is an object on rank {first_rank} but a tensor on rank {r}"))
        );
    }
    Ok(())
}

/// The dtype and global shape of a tensor key, which every holder must register alike (and as a
/// tensor: the first holder did).
fn agreed_tensor_meta<'p>(fqn: &str, holders: &[(u32, &'p LocalItem)]) -> Result<(DType, &'p [u64])> {
    let (first_rank, first) = holders[0];
    let (dtype, shape) = tensor_meta(&first.kind);
    for (r, it) in holders {
        ensure!(
            !matches!(it.kind, LocalKind::Object),
            Error::mismatch(format!("key {fqn:?} is a tensor on rank {first_rank} but an object on rank {r}"))
        );
        let (d, g) = tensor_meta(&it.kind);
        ensure!(
            d == dtype && g == shape,
            Error::mismatch(format!(
                "key {fqn:?}: rank {first_rank} registered {dtype} {shape:?} but rank {r} registered {d} {g:?}"
            ))
        );
    }
    Ok((dtype, shape))
}

/// How the global plan describes a tensor key held by several ranks.
#[derive(Debug, PartialEq)]
enum TensorLayout<'p> {
    /// Every rank of a mesh holds it with the same mesh and placements: chunks follow from those.
    Sharded(&'p DeviceMesh, &'p [Placement]),
    /// Its distinct chunks, each with the ranks that hold it, checked to tile the tensor.
    Chunks(Vec<(Region, Vec<u32>)>),
}

fn tensor_layout<'p>(fqn: &str, shape: &[u64], holders: &[(u32, &'p LocalItem)], plans: &'p [LocalPlan]) -> Result<TensorLayout<'p>> {
    let specs: Vec<(u32, Option<ShardingRef<'p>>)> = holders
        .iter()
        .map(|(r, it)| (*r, sharding_of(&it.kind, &plans[*r as usize])))
        .collect();
    if let Some((mesh, placements)) = uniform_sharding(&specs) {
        if holds_whole_mesh(holders, mesh) {
            return Ok(TensorLayout::Sharded(mesh, placements));
        }
    }
    let chunks = distinct_chunks(holders, plans)?;
    check_tiling(fqn, shape, &chunks)?;
    Ok(TensorLayout::Chunks(chunks))
}

/// Whether the holders are exactly the ranks of `mesh`.
fn holds_whole_mesh(holders: &[(u32, &LocalItem)], mesh: &DeviceMesh) -> bool {
    let mut ranks: Vec<u32> = holders.iter().map(|h| h.0).collect();
    let mut mesh_ranks = mesh.ranks().to_vec();
    ranks.sort_unstable();
    mesh_ranks.sort_unstable();
    ranks == mesh_ranks
}

/// The distinct regions the holders registered, each with its holders, in region order; empty
/// regions are dropped, unless all are empty (a tensor with no elements): then one is kept.
fn distinct_chunks(holders: &[(u32, &LocalItem)], plans: &[LocalPlan]) -> Result<Vec<(Region, Vec<u32>)>> {
    let mut regions: BTreeMap<Region, Vec<u32>> = BTreeMap::new();
    for (r, it) in holders {
        regions
            .entry(region_of_item(&it.kind, &plans[*r as usize], *r)?)
            .or_default()
            .push(*r);
    }
    let all_empty = regions.keys().all(|r| r.is_empty());
    let mut chunks: Vec<(Region, Vec<u32>)> = regions.into_iter().filter(|(r, _)| all_empty || !r.is_empty()).collect();
    if all_empty {
        chunks.truncate(1);
    }
    Ok(chunks)
}

fn tensor_meta(k: &LocalKind) -> (DType, &[u64]) {
    match k {
        LocalKind::Tensor { dtype, global_shape, .. } | LocalKind::Sharded { dtype, global_shape, .. } => (*dtype, global_shape),
        LocalKind::Object => unreachable!("objects are handled apart"),
    }
}

fn sharding_of<'p>(k: &'p LocalKind, plan: &'p LocalPlan) -> Option<(&'p DeviceMesh, &'p [Placement])> {
    match k {
        LocalKind::Sharded { mesh, placements, .. } => plan.meshes.get(*mesh as usize).map(|m| (m, placements.as_slice())),
        _ => None,
    }
}

/// A mesh and the placements of a tensor on it.
type ShardingRef<'p> = (&'p DeviceMesh, &'p [Placement]);

fn uniform_sharding<'p>(specs: &[(u32, Option<ShardingRef<'p>>)]) -> Option<ShardingRef<'p>> {
    let first = specs.first()?.1?;
    specs.iter().all(|(_, s)| *s == Some(first)).then_some(first)
}

fn region_of_item(k: &LocalKind, plan: &LocalPlan, rank: u32) -> Result<Region> {
    match k {
        LocalKind::Tensor { region, .. } => Ok(region.clone()),
        LocalKind::Sharded {
            global_shape,
            mesh,
            placements,
            ..
        } => {
            let m = plan
                .meshes
                .get(*mesh as usize)
                .ok_or_else(|| Error::internal("plan refers to a missing mesh"))?;
            crate::mesh::region_of(global_shape, m, rank, placements)
        }
        LocalKind::Object => Err(Error::internal("object has no region")),
    }
}

/// The distinct chunks of a tensor must not overlap and must cover it exactly.
fn check_tiling(fqn: &str, shape: &[u64], chunks: &[(Region, Vec<u32>)]) -> Result<()> {
    let total: u64 = shape.iter().product();
    let mut covered: u64 = 0;
    for (r, holders) in chunks {
        r.check_within(shape)
            .map_err(|e| e.context(format!("key {fqn:?} on rank {}", holders[0])))?;
        covered = covered.saturating_add(r.numel());
    }
    if shape.is_empty() && chunks.len() > 1 {
        return Err(Error::invalid(format!("key {fqn:?}: a 0-d tensor registered as several pieces")));
    }
    let boxes: Vec<&Region> = chunks.iter().map(|c| &c.0).collect();
    let defect = tiling_defect(&Region::full(shape), &boxes).map_err(|e| e.context(format!("key {fqn:?}")))?;
    if let Some(TilingDefect::Overlap { a: i, b: j, .. }) = defect {
        let (r, x) = (&chunks[i].0, chunks[i].0.intersect(&chunks[j].0).expect("the pair overlaps"));
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
    ensure!(
        defect.is_none(),
        Error::invalid(format!(
            "key {fqn:?}: the registered pieces cover {covered} of the {total} elements of the global shape {shape:?}"
        ))
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
                dtype: DType::F32,
                global_shape: shape.to_vec(),
                region: Region {
                    offsets: off.to_vec(),
                    sizes: sizes.to_vec(),
                },
            },
        }
    }

    fn plan(items: Vec<LocalItem>) -> LocalPlan {
        LocalPlan { meshes: vec![], items }
    }

    #[test]
    fn replicated_written_once_and_balanced() {
        // Two ranks each hold two whole tensors (DDP): each tensor is written once.
        let p = plan(vec![item("a", &[4], &[0], &[4]), item("b", &[4], &[0], &[4])]);
        for g in [
            GlobalPlan::build(Plans::PerRank(&[p.clone(), p.clone()])).unwrap(),
            GlobalPlan::build(Plans::Uniform(&p, 2)).unwrap(),
        ] {
            let writers: Vec<u32> = g.entries.iter().map(|e| g.chunks_of(e)[0].writer).collect();
            assert_eq!(writers, vec![0, 1]);
            assert_eq!(g.bytes_per_rank(), vec![16, 16]);
        }
    }

    #[test]
    fn gaps_and_overlaps_are_rejected() {
        let a = plan(vec![item("w", &[4], &[0], &[2])]);
        let e = GlobalPlan::build(Plans::PerRank(std::slice::from_ref(&a))).unwrap_err();
        assert!(e.message().contains("cover 2 of the 4"), "{e}");
        let b = plan(vec![item("w", &[4], &[1], &[3])]);
        let e = GlobalPlan::build(Plans::PerRank(&[a, b])).unwrap_err();
        assert!(e.message().contains("overlaps"), "{e}");
    }

    #[test]
    fn dtype_disagreement_names_ranks() {
        let a = plan(vec![item("w", &[4], &[0], &[2])]);
        let mut bi = item("w", &[4], &[2], &[2]);
        bi.kind = LocalKind::Tensor {
            dtype: DType::BF16,
            global_shape: vec![4],
            region: Region {
                offsets: vec![2],
                sizes: vec![2],
            },
        };
        let e = GlobalPlan::build(Plans::PerRank(&[a, plan(vec![bi])])).unwrap_err();
        assert!(e.message().contains("rank 1 registered bfloat16"), "{e}");
    }

    #[test]
    fn empty_shards_are_dropped() {
        let a = plan(vec![item("w", &[2], &[0], &[2])]);
        let b = plan(vec![item("w", &[2], &[2], &[0])]);
        let g = GlobalPlan::build(Plans::PerRank(&[a, b])).unwrap();
        assert_eq!(g.chunks_of(&g.entries[0]).len(), 1);
    }

    fn sharded(fqn: &str, shape: &[u64], placements: Vec<Placement>) -> LocalItem {
        LocalItem {
            fqn: fqn.into(),
            path: default_path(fqn),
            kind: LocalKind::Sharded {
                dtype: DType::F32,
                global_shape: shape.to_vec(),
                mesh: 0,
                placements,
            },
        }
    }

    #[test]
    fn hsdp_sharded_writes_each_shard_once() {
        // Mesh 2x2, Replicate on dim 0, Shard(0) on dim 1: two distinct shards, each written once,
        // by a member of its replica group; the same chunks whichever way the plan is built.
        let mesh = DeviceMesh::new(&[2, 2], None, None).unwrap();
        let p = LocalPlan {
            meshes: vec![mesh.clone()],
            items: vec![sharded("w", &[6, 3], vec![Placement::Replicate, Placement::Shard(0)])],
        };
        let uni = GlobalPlan::build(Plans::Uniform(&p, 4)).unwrap();
        let per = GlobalPlan::build(Plans::PerRank(&[p.clone(), p.clone(), p.clone(), p.clone()])).unwrap();
        for g in [&uni, &per] {
            let chunks = g.chunks_of(&g.entries[0]);
            assert_eq!(chunks.len(), 2);
            let mut written: Vec<Region> = (0..4).flat_map(|r| g.chunks_written_by(&g.entries[0], r)).collect();
            written.sort();
            let mut expect: Vec<Region> = chunks.iter().map(|c| c.region.clone()).collect();
            expect.sort();
            assert_eq!(written, expect);
            for c in &chunks {
                assert_eq!(g.chunks_written_by(&g.entries[0], c.writer), vec![c.region.clone()]);
            }
        }
    }

    #[test]
    fn fsdp_with_empty_shards() {
        // Dim of 2 over 4 ranks: two ranks hold nothing; two chunks are written.
        let mesh = DeviceMesh::new(&[4], None, None).unwrap();
        let p = LocalPlan {
            meshes: vec![mesh],
            items: vec![sharded("w", &[2, 5], vec![Placement::Shard(0)])],
        };
        let g = GlobalPlan::build(Plans::Uniform(&p, 4)).unwrap();
        assert_eq!(g.chunks_of(&g.entries[0]).len(), 2);
        assert_eq!((0..4).map(|r| g.chunks_written_by(&g.entries[0], r).len()).sum::<usize>(), 2);
        // A tensor with no elements still gets one (empty) chunk.
        let p = LocalPlan {
            meshes: p.meshes.clone(),
            items: vec![sharded("e", &[0, 5], vec![Placement::Shard(0)])],
        };
        let g = GlobalPlan::build(Plans::Uniform(&p, 4)).unwrap();
        assert_eq!(g.chunks_of(&g.entries[0]).len(), 1);
        assert_eq!((0..4).map(|r| g.chunks_written_by(&g.entries[0], r).len()).sum::<usize>(), 1);
    }

    #[test]
    fn partial_mesh_registration_falls_back_to_regions() {
        // Only rank 0 and 1 of a 2-rank mesh, but rank 1 registers it explicitly: regions path.
        let mesh = DeviceMesh::new(&[2], None, None).unwrap();
        let a = LocalPlan {
            meshes: vec![mesh],
            items: vec![sharded("w", &[4], vec![Placement::Shard(0)])],
        };
        let b = plan(vec![item("w", &[4], &[2], &[2])]);
        let g = GlobalPlan::build(Plans::PerRank(&[a, b])).unwrap();
        assert!(matches!(g.entries[0].kind, GlobalKind::Tensor { .. }));
        assert_eq!(g.chunks_of(&g.entries[0]).len(), 2);
    }


    fn object(fqn: &str) -> LocalItem {
        LocalItem {
            fqn: fqn.into(),
            path: default_path(fqn),
            kind: LocalKind::Object,
        }
    }

    fn region(offsets: &[u64], sizes: &[u64]) -> Region {
        Region {
            offsets: offsets.to_vec(),
            sizes: sizes.to_vec(),
        }
    }

    /// (rank, item) pairs of the key `fqn` in `plans`, as `holders_by_key` groups them.
    fn holders<'p>(plans: &'p [LocalPlan], fqn: &str) -> Vec<(u32, &'p LocalItem)> {
        holders_by_key(plans).remove(fqn).unwrap()
    }

    #[test]
    fn holders_are_grouped_by_key_in_rank_order() {
        let plans = [plan(vec![object("b"), object("a")]), plan(vec![object("a")])];
        let by_key: Vec<(&str, Vec<u32>)> = holders_by_key(&plans)
            .into_iter()
            .map(|(k, h)| (k, h.iter().map(|(r, _)| *r).collect()))
            .collect();
        assert_eq!(by_key, vec![("a", vec![0, 1]), ("b", vec![0])]);
    }

    #[test]
    fn chunk_work_counts_bytes_per_chunk() {
        let chunks = vec![(region(&[0], &[3]), vec![0, 1]), (region(&[3], &[1]), vec![1])];
        let work: Vec<(u64, usize, usize, Vec<u32>)> =
            chunk_work(7, DType::F32, &chunks).map(|w| (w.bytes, w.entry, w.chunk, w.holders)).collect();
        assert_eq!(work, vec![(12, 7, 0, vec![0, 1]), (4, 7, 1, vec![1])]);
        let o = object_work(3, vec![2, 5]);
        assert_eq!((o.bytes, o.entry, o.chunk, o.holders), (0, 3, usize::MAX, vec![2, 5]));
        assert_eq!(
            planned_chunks(chunks),
            vec![
                PlannedChunk {
                    region: region(&[0], &[3]),
                    writer: 0
                },
                PlannedChunk {
                    region: region(&[3], &[1]),
                    writer: 1
                }
            ]
        );
    }

    #[test]
    fn distinct_chunks_merge_holders_and_drop_empty_ones() {
        let plans = [
            plan(vec![item("w", &[2], &[0], &[2])]),
            plan(vec![item("w", &[2], &[2], &[0])]),
            plan(vec![item("w", &[2], &[0], &[2])]),
        ];
        assert_eq!(
            distinct_chunks(&holders(&plans, "w"), &plans).unwrap(),
            vec![(region(&[0], &[2]), vec![0, 2])]
        );
        // A tensor with no elements keeps one (the first) empty chunk.
        let plans = [plan(vec![item("e", &[2, 0], &[1, 0], &[1, 0])]), plan(vec![item("e", &[2, 0], &[0, 0], &[1, 0])])];
        assert_eq!(
            distinct_chunks(&holders(&plans, "e"), &plans).unwrap(),
            vec![(region(&[0, 0], &[1, 0]), vec![1])]
        );
    }

    #[test]
    fn tensor_meta_must_agree_across_holders() {
        let plans = [plan(vec![item("w", &[4], &[0], &[2])]), plan(vec![item("w", &[4], &[2], &[2])])];
        let (dtype, shape) = agreed_tensor_meta("w", &holders(&plans, "w")).unwrap();
        assert_eq!((dtype, shape), (DType::F32, &[4u64][..]));
        let plans = [plan(vec![item("w", &[4], &[0], &[2])]), plan(vec![item("w", &[5], &[2], &[2])])];
        let e = agreed_tensor_meta("w", &holders(&plans, "w")).unwrap_err();
        assert_eq!(e.message(), "key \"w\": rank 0 registered float32 [4] but rank 1 registered float32 [5]");
        let plans = [plan(vec![item("w", &[4], &[0], &[2])]), plan(vec![object("w")])];
        let e = agreed_tensor_meta("w", &holders(&plans, "w")).unwrap_err();
        assert_eq!(e.message(), "key \"w\" is a tensor on rank 0 but an object on rank 1");
        let e = check_all_objects("w", &[(1, &object("w")), (3, &item("w", &[4], &[0], &[4]))]).unwrap_err();
        assert_eq!(e.message(), "key \"w\" is an object on rank 1 but a tensor on rank 3");
    }

    #[test]
    fn layout_is_sharded_only_when_the_whole_mesh_holds_it() {
        let mesh = DeviceMesh::new(&[2], None, None).unwrap();
        let p = LocalPlan {
            meshes: vec![mesh.clone()],
            items: vec![sharded("w", &[4], vec![Placement::Shard(0)])],
        };
        let both = [p.clone(), p.clone()];
        assert!(holds_whole_mesh(&holders(&both, "w"), &mesh));
        assert_eq!(
            tensor_layout("w", &[4], &holders(&both, "w"), &both).unwrap(),
            TensorLayout::Sharded(&mesh, &[Placement::Shard(0)][..])
        );
        // Rank 1 registers its box explicitly: the regions decide.
        let mixed = [p, plan(vec![item("w", &[4], &[2], &[2])])];
        assert!(holds_whole_mesh(&holders(&mixed, "w"), &mesh));
        assert_eq!(
            tensor_layout("w", &[4], &holders(&mixed, "w"), &mixed).unwrap(),
            TensorLayout::Chunks(vec![(region(&[0], &[2]), vec![0]), (region(&[2], &[2]), vec![1])])
        );
        assert!(!holds_whole_mesh(&holders(&mixed[..1], "w"), &mesh));
    }

    #[test]
    fn uniform_mesh_must_span_the_job() {
        let p = LocalPlan {
            meshes: vec![DeviceMesh::new(&[2], None, None).unwrap()],
            items: vec![],
        };
        check_mesh_spans_job("w", &p, 0, 2).unwrap();
        let e = check_mesh_spans_job("w", &p, 0, 4).unwrap_err();
        assert_eq!(e.message(), "key \"w\": its mesh has ranks [0, 1] but the job has ranks 0..4");
        assert!(check_mesh_spans_job("w", &p, 1, 2).is_err(), "mesh 1 is not in the plan");
    }
}
