//! Device meshes and placements: which box of a global tensor each rank holds.
//!
//! A mesh is an n-D array of global ranks (a sub-mesh is just another mesh). A placement per
//! mesh dimension says how the tensor is spread over it: `Replicate`, or `Shard(d)` which splits
//! tensor dim `d` into as many chunks as the mesh dimension has ranks, the way `torch.chunk` and
//! DTensor do it (chunk size = ceil(size / n); trailing chunks may be short or empty). Shards of
//! the same tensor dim on several mesh dims nest from left to right, as in DTensor; a
//! `StridedShard(d)` is applied after the plain shards of later mesh dims (torch's
//! `_StridedShard`, what FSDP2 uses on top of tensor parallelism).

use crate::error::{ensure, Error, Result};
use crate::region::Region;
use serde::{Deserialize, Serialize};

/// An n-dimensional array of global ranks (torch's `DeviceMesh`), with optional dim names.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceMesh {
    shape: Vec<u32>,
    /// Global ranks in row-major order of the mesh coordinates.
    ranks: Vec<u32>,
    names: Vec<String>,
}

/// Most dimensions a mesh may have.
pub const MAX_MESH_DIMS: usize = 16;
/// Most positions (ranks) a mesh may have.
pub const MAX_MESH_RANKS: u64 = 1 << 24;
/// Strided shards name tensor dims below this (the code `-2 - d` of a larger `d` is rejected).
pub const MAX_STRIDED_SHARD_DIM: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
/// How a tensor is laid out along one mesh dim (torch's DTensor placements).
pub enum Placement {
    /// Every rank along the dim holds the whole tensor.
    Replicate,
    /// The tensor's dim `d` is split into chunks (torch's ceil-divide chunking) along the mesh dim.
    Shard(usize),
    /// As `Shard(d)`, applied after the plain shards of later mesh dims (FSDP2 over TP).
    StridedShard(usize),
}

impl Placement {
    /// The C API's code of [`Placement::Replicate`] (`DCP_REPLICATE`).
    pub const REPLICATE_CODE: i32 = -1;

    /// Decodes the C API's `int32_t` placement: `DCP_REPLICATE` (-1), `DCP_SHARD(d)` (`d` >= 0)
    /// or `DCP_STRIDED_SHARD(d)` (`-2 - d`, `d` below 64).
    pub fn from_code(code: i32) -> Result<Placement> {
        match code {
            Self::REPLICATE_CODE => Ok(Placement::Replicate),
            d if d >= 0 => Ok(Placement::Shard(d as usize)),
            c if c <= -2 && ((-2 - c) as usize) < MAX_STRIDED_SHARD_DIM => Ok(Placement::StridedShard((-2 - c) as usize)),
            other => Err(Error::invalid(format!(
                "placement value {other} is not DCP_REPLICATE, DCP_SHARD(d) or DCP_STRIDED_SHARD(d)"
            ))),
        }
    }
}

/// Number of positions of a mesh of `shape`, if it is at most [`MAX_MESH_RANKS`].
pub fn mesh_positions(shape: &[u32]) -> Option<u64> {
    shape
        .iter()
        .try_fold(1u64, |a, &s| a.checked_mul(s as u64))
        .filter(|&n| n <= MAX_MESH_RANKS)
}

impl DeviceMesh {
    /// A mesh of `shape` over `ranks` (row-major; `None`: 0, 1, 2, ...), with optional dim names.
    pub fn new(shape: &[u32], ranks: Option<&[u32]>, names: Option<&[String]>) -> Result<DeviceMesh> {
        ensure!(
            !shape.is_empty() && shape.len() <= MAX_MESH_DIMS,
            Error::invalid(format!("a mesh needs 1..={MAX_MESH_DIMS} dimensions, not {}", shape.len()))
        );
        ensure!(
            shape.iter().all(|&s| s > 0),
            Error::invalid(format!("mesh shape {shape:?} has a zero dimension"))
        );
        let n = mesh_positions(shape).ok_or_else(|| Error::invalid(format!("mesh shape {shape:?} is too large")))?;
        let ranks = match ranks {
            Some(r) => {
                ensure!(
                    r.len() as u64 == n,
                    Error::invalid(format!("mesh shape {shape:?} has {n} positions but {} ranks were given", r.len()))
                );
                let mut seen = r.to_vec();
                seen.sort_unstable();
                ensure!(
                    seen.windows(2).all(|w| w[0] != w[1]),
                    Error::invalid(format!("mesh ranks {r:?} repeat a rank"))
                );
                r.to_vec()
            }
            None => (0..n as u32).collect(),
        };
        let names = match names {
            Some(ns) => {
                ensure!(
                    ns.len() == shape.len(),
                    Error::invalid(format!("{} dim names for a {}-D mesh", ns.len(), shape.len()))
                );
                ns.to_vec()
            }
            None => vec![String::new(); shape.len()],
        };
        Ok(DeviceMesh {
            shape: shape.to_vec(),
            ranks,
            names,
        })
    }

    /// Size of each dim.
    pub fn shape(&self) -> &[u32] {
        &self.shape
    }
    /// Global ranks in row-major order of the mesh coordinates.
    pub fn ranks(&self) -> &[u32] {
        &self.ranks
    }
    /// Number of dims.
    pub fn ndim(&self) -> usize {
        self.shape.len()
    }
    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.ranks.len()
    }
    /// The dims' names (empty strings for unnamed dims).
    pub fn dim_names(&self) -> &[String] {
        &self.names
    }
    /// Index of the dim called `name`.
    pub fn dim(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// Coordinates of a global rank, or `None` if it is not in the mesh.
    pub fn coordinate_of(&self, rank: u32) -> Option<Vec<u32>> {
        let pos = self.ranks.iter().position(|&r| r == rank)?;
        Some(self.coordinate_at(pos))
    }

    /// Coordinates of the `pos`-th position (row-major).
    pub fn coordinate_at(&self, pos: usize) -> Vec<u32> {
        unravel(pos as u64, &self.shape)
    }

    /// The global rank at `coord`.
    pub fn rank_at(&self, coord: &[u32]) -> u32 {
        let mut pos = 0usize;
        for (d, &c) in coord.iter().enumerate() {
            pos = pos * self.shape[d] as usize + c as usize;
        }
        self.ranks[pos]
    }
}

/// Coordinates of the `i`-th position (row-major) of a grid of `shape`.
pub fn unravel(mut i: u64, shape: &[u32]) -> Vec<u32> {
    let mut c = vec![0u32; shape.len()];
    for d in (0..shape.len()).rev() {
        c[d] = (i % shape[d] as u64) as u32;
        i /= shape[d] as u64;
    }
    c
}

/// torch.chunk's split of `size` into `n`: (size, offset) of chunk `k`. An empty chunk sits at
/// the end.
pub fn chunk(size: u64, n: u64, k: u64) -> (u64, u64) {
    let full = size.div_ceil(n);
    let start = full.saturating_mul(k);
    if start >= size {
        return (0, size);
    }
    (start.saturating_add(full).min(size) - start, start)
}

/// Checks placements against a mesh and a tensor rank.
pub fn check_placements(mesh: &DeviceMesh, placements: &[Placement], ndim: usize) -> Result<()> {
    ensure!(
        placements.len() == mesh.ndim(),
        Error::invalid(format!(
            "{} placements for a {}-D mesh (one per mesh dimension)",
            placements.len(),
            mesh.ndim()
        ))
    );
    for p in placements {
        if let Placement::Shard(d) | Placement::StridedShard(d) = p {
            ensure!(
                *d < ndim,
                Error::invalid(format!("placement {p:?} shards dim {d} of a {ndim}-D tensor"))
            );
        }
    }
    Ok(())
}

/// The box of a tensor of `global_shape` held at mesh coordinate `coord`.
pub fn region_at(global_shape: &[u64], mesh_shape: &[u32], coord: &[u32], placements: &[Placement]) -> Region {
    let mut offsets = vec![0u64; global_shape.len()];
    let mut sizes = global_shape.to_vec();
    let mut apply = |md: usize, d: usize| {
        let (s, o) = chunk(sizes[d], mesh_shape[md] as u64, coord[md] as u64);
        offsets[d] += o;
        sizes[d] = s;
    };
    for (md, p) in placements.iter().enumerate() {
        if let Placement::Shard(d) = p {
            apply(md, *d);
        }
    }
    for (md, p) in placements.iter().enumerate() {
        if let Placement::StridedShard(d) = p {
            apply(md, *d);
        }
    }
    Region { offsets, sizes }
}

/// The box `rank` holds, or an error if the rank is not in the mesh.
pub fn region_of(global_shape: &[u64], mesh: &DeviceMesh, rank: u32, placements: &[Placement]) -> Result<Region> {
    check_placements(mesh, placements, global_shape.len())?;
    let coord = mesh
        .coordinate_of(rank)
        .ok_or_else(|| Error::invalid(format!("rank {rank} is not in the mesh (ranks {:?})", mesh.ranks())))?;
    Ok(region_at(global_shape, mesh.shape(), &coord, placements))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_codes() {
        assert_eq!(Placement::from_code(-1).unwrap(), Placement::Replicate);
        assert_eq!(Placement::from_code(0).unwrap(), Placement::Shard(0));
        assert_eq!(Placement::from_code(i32::MAX).unwrap(), Placement::Shard(i32::MAX as usize));
        assert_eq!(Placement::from_code(-2).unwrap(), Placement::StridedShard(0));
        assert_eq!(Placement::from_code(-65).unwrap(), Placement::StridedShard(63));
        for bad in [-66, i32::MIN] {
            assert!(Placement::from_code(bad).unwrap_err().message().contains(&bad.to_string()));
        }
        assert_eq!(mesh_positions(&[4, 2]), Some(8));
        assert_eq!(mesh_positions(&[1 << 12, 1 << 12]), Some(MAX_MESH_RANKS));
        assert_eq!(mesh_positions(&[1 << 12, (1 << 12) + 1]), None);
        assert_eq!(mesh_positions(&[u32::MAX; 16]), None);
    }

    #[test]
    fn torch_chunking() {
        // 5 over 2: 3 + 2; 2 over 4: 1, 1, 0, 0; 10 over 4: 3, 3, 3, 1.
        assert_eq!(chunk(5, 2, 0), (3, 0));
        assert_eq!(chunk(5, 2, 1), (2, 3));
        assert_eq!(chunk(2, 4, 2), (0, 2));
        assert_eq!(chunk(10, 4, 3), (1, 9));
        assert_eq!(chunk(1, 2, 1), (0, 1));
    }

    #[test]
    fn hsdp_and_nested() {
        let mesh = DeviceMesh::new(&[2, 2], None, None).unwrap();
        let p = [Placement::Replicate, Placement::Shard(0)];
        assert_eq!(
            region_of(&[8, 3], &mesh, 3, &p).unwrap(),
            Region {
                offsets: vec![4, 0],
                sizes: vec![4, 3]
            }
        );
        assert_eq!(
            region_of(&[8, 3], &mesh, 1, &p).unwrap(),
            Region {
                offsets: vec![4, 0],
                sizes: vec![4, 3]
            }
        );
        // Shard(0) on both dims nests left to right: rank (1, 0) gets rows 4..6.
        let nested = [Placement::Shard(0), Placement::Shard(0)];
        assert_eq!(
            region_of(&[8], &mesh, 2, &nested).unwrap(),
            Region {
                offsets: vec![4],
                sizes: vec![2]
            }
        );
        // StridedShard(0) then Shard(0): the second dim shards first; rank (1, 0) gets rows 2..4.
        let strided = [Placement::StridedShard(0), Placement::Shard(0)];
        assert_eq!(
            region_of(&[8], &mesh, 2, &strided).unwrap(),
            Region {
                offsets: vec![2],
                sizes: vec![2]
            }
        );
    }

    #[test]
    fn bad_meshes() {
        assert!(DeviceMesh::new(&[2, 2], Some(&[0, 1, 2]), None).is_err());
        assert!(DeviceMesh::new(&[2], Some(&[1, 1]), None).is_err());
        assert!(DeviceMesh::new(&[0], None, None).is_err());
        let mesh = DeviceMesh::new(&[2], Some(&[4, 6]), None).unwrap();
        assert!(region_of(&[4], &mesh, 5, &[Placement::Shard(0)])
            .unwrap_err()
            .message()
            .contains("not in the mesh"));
        assert!(region_of(&[4], &mesh, 4, &[Placement::Shard(1)]).is_err());
        assert_eq!(mesh.rank_at(&[1]), 6);
    }
}
