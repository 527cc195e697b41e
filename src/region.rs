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

    /// The same box expressed relative to the origin of `outer` (which must contain it).
    pub fn relative_to(&self, outer: &Region) -> Vec<u64> {
        self.offsets.iter().zip(&outer.offsets).map(|(a, b)| a - b).collect()
    }
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
    }

    #[test]
    fn within() {
        let a = Region::new(vec![2], vec![3]).unwrap();
        assert!(a.check_within(&[5]).is_ok());
        assert!(a.check_within(&[4]).is_err());
        assert!(a.check_within(&[4, 4]).is_err());
    }
}
