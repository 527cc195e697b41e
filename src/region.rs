//! n-dimensional boxes of a global tensor: where a chunk sits (offsets) and how large it is.

use crate::error::{ensure, Error, Result};

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Region {
    pub offsets: Vec<u64>,
    pub sizes: Vec<u64>,
}

impl Region {
    pub fn new(offsets: Vec<u64>, sizes: Vec<u64>) -> Result<Self> {
        ensure!(
            offsets.len() == sizes.len(),
            Error::invalid(format!("offsets {offsets:?} and sizes {sizes:?} have different ranks"))
        );
        Ok(Region { offsets, sizes })
    }

    /// The whole tensor of the given shape.
    pub fn full(shape: &[u64]) -> Self {
        Region {
            offsets: vec![0; shape.len()],
            sizes: shape.to_vec(),
        }
    }

    pub fn ndim(&self) -> usize {
        self.sizes.len()
    }

    pub fn numel(&self) -> u64 {
        self.sizes.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.sizes.iter().any(|&s| s == 0)
    }

    /// Checks the box lies inside a tensor of `shape`.
    pub fn check_within(&self, shape: &[u64]) -> Result<()> {
        ensure!(
            self.offsets.len() == self.sizes.len(),
            Error::invalid(format!("box with {} offsets and {} sizes", self.offsets.len(), self.sizes.len()))
        );
        ensure!(
            self.ndim() == shape.len(),
            Error::invalid(format!("box of rank {} for a tensor of rank {}", self.ndim(), shape.len()))
        );
        for d in 0..shape.len() {
            let end = self.offsets[d].checked_add(self.sizes[d]);
            ensure!(
                end.is_some_and(|e| e <= shape[d]),
                Error::invalid(format!(
                    "box at offsets {:?} with sizes {:?} exceeds the global shape {:?} in dim {d}",
                    self.offsets, self.sizes, shape
                ))
            );
        }
        Ok(())
    }

    /// The overlap of two boxes, or `None` if they do not overlap (or it is empty).
    pub fn intersect(&self, other: &Region) -> Option<Region> {
        if self.ndim() != other.ndim() {
            return None;
        }
        let mut offsets = Vec::with_capacity(self.ndim());
        let mut sizes = Vec::with_capacity(self.ndim());
        for d in 0..self.ndim() {
            let lo = self.offsets[d].max(other.offsets[d]);
            let hi = (self.offsets[d] + self.sizes[d]).min(other.offsets[d] + other.sizes[d]);
            if hi <= lo {
                return None;
            }
            offsets.push(lo);
            sizes.push(hi - lo);
        }
        Some(Region { offsets, sizes })
    }

    /// Whether the two boxes share an element (what `intersect(..).is_some()` says, without
    /// building the overlap).
    pub fn overlaps(&self, other: &Region) -> bool {
        self.ndim() == other.ndim()
            && (0..self.ndim()).all(|d| {
                let lo = self.offsets[d].max(other.offsets[d]);
                let hi = (self.offsets[d] + self.sizes[d]).min(other.offsets[d] + other.sizes[d]);
                lo < hi
            })
    }

    /// The same box expressed relative to the origin of `outer` (which must contain it).
    pub fn relative_to(&self, outer: &Region) -> Vec<u64> {
        self.offsets.iter().zip(&outer.offsets).map(|(a, b)| a - b).collect()
    }
}

/// Every pair `(i, j)`, `i < j`, of boxes that overlap (boxes of one rank). A sweep along the dim
/// where their starts differ most: only boxes whose ranges meet in that dim are compared, which is
/// linear for boxes that split a tensor along one dim. Pairs come lazily, so a caller that wants
/// one pays for one.
pub fn overlapping_pairs<'a>(boxes: &'a [&'a Region]) -> impl Iterator<Item = (usize, usize)> + 'a {
    let ndim = boxes.first().map_or(0, |b| b.ndim());
    let d = (0..ndim)
        .max_by_key(|&d| {
            let mut starts: Vec<u64> = boxes.iter().map(|b| b.offsets[d]).collect();
            starts.sort_unstable();
            starts.dedup();
            starts.len()
        })
        .unwrap_or(0);
    // A 0-d box is one element: every pair of them meets.
    let lo = move |i: usize| boxes[i].offsets.get(d).copied().unwrap_or(0);
    let hi = move |i: usize| boxes[i].offsets.get(d).map_or(1, |&o| o.saturating_add(boxes[i].sizes[d]));
    let mut order: Vec<usize> = (0..boxes.len()).collect();
    order.sort_by_key(|&i| (lo(i), i));
    let (mut k, mut m) = (0, 1);
    std::iter::from_fn(move || {
        while k < order.len() {
            let i = order[k];
            if m < order.len() && lo(order[m]) < hi(i) {
                let j = order[m];
                m += 1;
                if boxes[i].overlaps(boxes[j]) {
                    return Some((i.min(j), i.max(j)));
                }
            } else {
                k += 1;
                m = k + 1;
            }
        }
        None
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intersect_boxes() {
        let a = Region::new(vec![0, 0], vec![4, 4]).unwrap();
        let b = Region::new(vec![2, 3], vec![4, 4]).unwrap();
        assert_eq!(
            a.intersect(&b),
            Some(Region {
                offsets: vec![2, 3],
                sizes: vec![2, 1]
            })
        );
        let c = Region::new(vec![4, 0], vec![1, 1]).unwrap();
        assert_eq!(a.intersect(&c), None);
        let scalar = Region::full(&[]);
        assert_eq!(scalar.intersect(&scalar), Some(scalar.clone()));
        assert_eq!(scalar.numel(), 1);
        for (x, y) in [(&a, &b), (&a, &c), (&b, &c), (&scalar, &scalar)] {
            assert_eq!(x.overlaps(y), x.intersect(y).is_some());
        }
    }

    #[test]
    fn overlapping_pairs_sweep() {
        let r = |o: [u64; 2], s: [u64; 2]| Region::new(o.to_vec(), s.to_vec()).unwrap();
        // Column shards (every start 0 in dim 0), the last one overlapping the one before.
        let boxes = [r([0, 0], [4, 2]), r([0, 2], [4, 2]), r([0, 4], [4, 2]), r([0, 5], [4, 2])];
        let refs: Vec<&Region> = boxes.iter().collect();
        assert_eq!(overlapping_pairs(&refs).collect::<Vec<_>>(), vec![(2, 3)]);
        assert_eq!(overlapping_pairs(&refs[..3]).next(), None);
        let scalar = Region::full(&[]);
        assert_eq!(overlapping_pairs(&[&scalar, &scalar, &scalar]).count(), 3);
        assert_eq!(overlapping_pairs(&[]).next(), None);
    }

    #[test]
    fn within() {
        let a = Region::new(vec![2], vec![3]).unwrap();
        assert!(a.check_within(&[5]).is_ok());
        assert!(a.check_within(&[4]).is_err());
        assert!(a.check_within(&[4, 4]).is_err());
    }
}
