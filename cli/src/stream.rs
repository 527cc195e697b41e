//! Whole tensors read in bounded pieces. A tensor's size comes from `.metadata`, which nothing
//! vouches for: it is checked against the bytes really stored (each chunk's item length, each data
//! file's length) before anything is read, and then at most [`PIECE_BYTES`] are in memory at a
//! time, whatever the claim.

use dcp::{Checkpoint, DType, KeyInfo, TensorView};
use std::collections::HashMap;

/// Largest piece of a tensor in memory at once.
pub const PIECE_BYTES: u64 = 64 << 20;

/// [`PIECE_BYTES`], or a smaller size from `DCP_CLI_PIECE_BYTES` (tests: many pieces from small
/// tensors). Never larger than [`PIECE_BYTES`].
pub fn piece_bytes() -> u64 {
    static P: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *P.get_or_init(|| {
        std::env::var("DCP_CLI_PIECE_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(PIECE_BYTES, |v: u64| v.clamp(1, PIECE_BYTES))
    })
}

/// The boxes of a tensor of `shape` (elements of `elem` bytes), in row-major order, each at most
/// `max` bytes (or one element) and contiguous in the row-major layout: consecutive pieces are
/// consecutive bytes of the whole tensor. Nothing for a tensor with no elements.
pub struct Pieces {
    shape: Vec<u64>,
    /// Pieces split this dim; dims before it are single indices, dims after it whole.
    split: usize,
    /// Elements of `shape[split]` per piece.
    step: u64,
    next: Option<Vec<u64>>,
}

impl Pieces {
    pub fn new(shape: &[u64], elem: u64, max: u64) -> Pieces {
        let empty = shape.contains(&0);
        // inner[d]: bytes of one index of dim d (the dims after it whole).
        let mut inner = vec![elem.max(1); shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            inner[d] = inner[d + 1].saturating_mul(shape[d + 1]);
        }
        let split = (0..shape.len()).find(|&d| inner[d] <= max).unwrap_or(shape.len().saturating_sub(1));
        let step = inner.get(split).map_or(1, |&b| (max / b.max(1)).max(1));
        Pieces {
            shape: shape.to_vec(),
            split,
            step,
            next: (!empty).then(|| vec![0; shape.len()]),
        }
    }
}

impl Iterator for Pieces {
    /// (offsets, sizes)
    type Item = (Vec<u64>, Vec<u64>);

    fn next(&mut self) -> Option<Self::Item> {
        let offsets = self.next.take()?;
        if self.shape.is_empty() {
            return Some((offsets, Vec::new()));
        }
        let s = self.split;
        let len = self.step.min(self.shape[s] - offsets[s]);
        let sizes: Vec<u64> = (0..self.shape.len())
            .map(|d| match d.cmp(&s) {
                std::cmp::Ordering::Less => 1,
                std::cmp::Ordering::Equal => len,
                std::cmp::Ordering::Greater => self.shape[d],
            })
            .collect();
        // The next piece: further along dim s, else the next index of the dims before it.
        let mut n = offsets.clone();
        n[s] += len;
        let mut d = s;
        loop {
            if n[d] < self.shape[d] {
                self.next = Some(n);
                break;
            }
            if d == 0 {
                break;
            }
            n[d] = 0;
            d -= 1;
            n[d] += 1;
        }
        Some((offsets, sizes))
    }
}

/// One tensor key, checked to be backed by real bytes, ready to be read piece by piece.
pub struct TensorStream<'c> {
    ck: &'c Checkpoint,
    pub fqn: &'c str,
    pub dtype: DType,
    pub shape: &'c [u64],
    /// Whether each piece's read checks CRCs itself (false: the items were checked whole first).
    verify_pieces: bool,
}

impl<'c> TensorStream<'c> {
    /// Checks that every chunk of `k` has an item at least as long as its elements, inside its
    /// data file; for a tensor read in several pieces without the sidecar's block checksums,
    /// checks every item's CRCs first (one streaming pass), since a piece's read would otherwise
    /// re-read the whole chunk to check it.
    pub fn open(ck: &'c Checkpoint, k: &KeyInfo<'c>, file_lens: &mut HashMap<String, u64>) -> Result<Self, String> {
        let fqn = k.fqn;
        let dtype = k
            .dtype
            .ok_or_else(|| format!("key {fqn:?}: dtype torch.{} is not supported", k.dtype_name))?;
        let nbytes = k
            .nbytes()
            .ok_or_else(|| format!("key {fqn:?}: shape {:?} of {dtype} is too large to address", k.shape))?;
        let mut stored = 0u64;
        for c in k.chunks {
            let info = ck
                .storage_info(fqn, Some(&c.offsets))
                .ok_or_else(|| format!("key {fqn:?}: the chunk at {:?} has no storage entry", c.offsets))?;
            let file = &info.relative_path;
            let need = dtype.nbytes(&c.sizes).unwrap_or(u64::MAX);
            if info.length < need {
                return Err(format!(
                    "key {fqn:?}: {file} at offset {}: the chunk at {:?} (sizes {:?}) needs {need} bytes of {dtype} but its item has {} (damaged .metadata?)",
                    info.offset, c.offsets, c.sizes, info.length
                ));
            }
            let len = match file_lens.get(file) {
                Some(&l) => l,
                None => {
                    let h = ck.storage().open_read(file).map_err(|e| format!("key {fqn:?}: {e}"))?;
                    file_lens.insert(file.clone(), h.len());
                    h.len()
                }
            };
            if info.offset.checked_add(info.length).is_none_or(|e| e > len) {
                return Err(format!(
                    "key {fqn:?}: {file} at offset {}: the item of the chunk at {:?} ({} bytes) runs past the end of the {len}-byte file",
                    info.offset, c.offsets, info.length
                ));
            }
            stored = stored.saturating_add(info.length);
        }
        if stored < nbytes {
            return Err(format!(
                "key {fqn:?}: {nbytes} bytes of {dtype} {:?}, but its items hold only {stored} bytes (damaged .metadata?)",
                k.shape
            ));
        }
        let has_blocks = |c: &dcp::Region| {
            ck.sidecar()
                .is_some_and(|s| s.blocks.iter().any(|b| b.fqn == fqn && b.chunk_offsets == c.offsets))
        };
        let verify_pieces = nbytes <= piece_bytes() || k.chunks.iter().all(has_blocks);
        if !verify_pieces {
            if let Some(p) = ck.verify_key(fqn).first() {
                return Err(p.to_string());
            }
        }
        Ok(TensorStream {
            ck,
            fqn,
            dtype,
            shape: k.shape,
            verify_pieces,
        })
    }

    /// Calls `f` with the tensor's bytes, piece by piece in row-major order, reusing `buf`.
    pub fn for_each_piece(&self, buf: &mut Vec<u8>, mut f: impl FnMut(&[u8]) -> Result<(), String>) -> Result<(), String> {
        for (offsets, sizes) in Pieces::new(self.shape, self.dtype.size() as u64, piece_bytes()) {
            self.read_piece(&offsets, &sizes, buf)?;
            f(buf)?;
        }
        Ok(())
    }

    /// Reads the box at `offsets` of `sizes` (a piece from [`Pieces`]) into `buf`.
    pub fn read_piece(&self, offsets: &[u64], sizes: &[u64], buf: &mut Vec<u8>) -> Result<(), String> {
        let n = self
            .dtype
            .nbytes(sizes)
            .filter(|&n| n <= piece_bytes().max(self.dtype.size() as u64))
            .ok_or_else(|| format!("key {:?}: piece {sizes:?} larger than {PIECE_BYTES} bytes", self.fqn))?;
        buf.clear();
        buf.resize(n as usize, 0);
        let view = TensorView::from_bytes(buf, self.dtype, sizes).map_err(|e| e.to_string())?;
        self.ck
            .read_tensor_into(self.fqn, offsets, view, self.verify_pieces)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every piece within the limit, and the pieces, concatenated, are the tensor in row-major
    /// order.
    #[test]
    fn pieces_cover_the_tensor_in_order() {
        for shape in [vec![], vec![7], vec![3, 5], vec![2, 3, 4], vec![4, 1, 9], vec![2, 0, 3]] {
            for max in [1u64, 3, 4, 5, 12, 13, 100] {
                let strides = {
                    let mut s = vec![1u64; shape.len()];
                    for d in (0..shape.len().saturating_sub(1)).rev() {
                        s[d] = s[d + 1] * shape[d + 1];
                    }
                    s
                };
                let mut next = 0u64;
                for (o, z) in Pieces::new(&shape, 1, max) {
                    let n: u64 = z.iter().product();
                    assert!(n <= max.max(1), "{shape:?} {max}: {z:?}");
                    let start: u64 = o.iter().zip(&strides).map(|(a, b)| a * b).sum();
                    assert_eq!(start, next, "{shape:?} {max}: {o:?}");
                    next += n;
                }
                assert_eq!(next, shape.iter().product::<u64>(), "{shape:?} {max}");
            }
        }
    }
}
