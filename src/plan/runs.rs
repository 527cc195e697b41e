//! Box copies as runs: a copy of an n-D box between two strided byte layouts ("a" and "b")
//! becomes a list of 1-D runs, after fusing every dimension that is dense on both sides. A run
//! whose steps equal the element size on both sides is one memcpy.

/// `count` elements from byte offset `a` (stepping `a_step`) to byte offset `b` (stepping
/// `b_step`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub a: u64,
    pub b: u64,
    pub count: u64,
    pub a_step: u64,
    pub b_step: u64,
}

impl Run {
    /// Bytes from the first to one past the last element on side a.
    pub fn a_span(&self, elem: u64) -> u64 {
        if self.count == 0 {
            0
        } else {
            (self.count - 1) * self.a_step + elem
        }
    }

    /// Splits the run so that the first part's elements start before `bound` on side a
    /// (`on_a`) or side b; returns (before, after).
    pub fn split(self, bound: u64, on_a: bool) -> (Option<Run>, Option<Run>) {
        let (start, step) = if on_a { (self.a, self.a_step) } else { (self.b, self.b_step) };
        if bound <= start {
            return (None, Some(self));
        }
        let n = if step == 0 {
            self.count
        } else {
            ((bound - start).div_ceil(step)).min(self.count)
        };
        if n >= self.count {
            return (Some(self), None);
        }
        let first = Run { count: n, ..self };
        let rest = Run {
            a: self.a + n * self.a_step,
            b: self.b + n * self.b_step,
            count: self.count - n,
            ..self
        };
        (Some(first), Some(rest))
    }

    /// Copies the run's `count` elements of `elem` bytes: element `i` from `a_base + (a -
    /// a_origin) + i * a_step` to `b_base + (b - b_origin) + i * b_step`.
    ///
    /// # Safety
    /// `a >= a_origin` and `b >= b_origin`; every source element must lie in one allocation
    /// readable through `a_base` and every destination element in one allocation writable
    /// through `b_base`; no destination byte may overlap a source byte, and nobody else may
    /// access the destination bytes (or write the source bytes) during the call.
    pub unsafe fn copy(&self, a_base: *const u8, b_base: *mut u8, elem: u64, a_origin: u64, b_origin: u64) {
        // SAFETY: the offsets are in bounds of the allocations (the caller's contract: the first
        // element of each side lies in them).
        let (src, dst) = unsafe { (a_base.add((self.a - a_origin) as usize), b_base.add((self.b - b_origin) as usize)) };
        if self.a_step == elem && self.b_step == elem {
            // SAFETY: with steps of one element the run is `count * elem` contiguous bytes on
            // each side, all of whose elements the caller vouches for; the sides are disjoint.
            unsafe { std::ptr::copy_nonoverlapping(src, dst, (self.count * elem) as usize) };
        } else {
            for i in 0..self.count as usize {
                // SAFETY: element `i` of each side, in bounds and disjoint by the contract.
                unsafe {
                    std::ptr::copy_nonoverlapping(src.add(i * self.a_step as usize), dst.add(i * self.b_step as usize), elem as usize)
                };
            }
        }
    }
}

/// The runs of one box copy.
#[derive(Clone, Debug)]
pub struct BoxRuns {
    /// Outer dims (size, a stride, b stride), outermost first.
    outer: Vec<(u64, u64, u64)>,
    inner: Run,
}

impl BoxRuns {
    /// `sizes` of the box; byte strides on each side; byte offsets of the box's first element.
    pub fn new(sizes: &[u64], a_strides: &[u64], b_strides: &[u64], a_base: u64, b_base: u64, elem: u64) -> BoxRuns {
        let empty = sizes.contains(&0);
        let mut dims: Vec<(u64, u64, u64)> = sizes
            .iter()
            .zip(a_strides)
            .zip(b_strides)
            .filter(|((&n, _), _)| n != 1)
            .map(|((&n, &a), &b)| (n, a, b))
            .collect();
        // Fuse inner dims while both sides are dense.
        let mut run = 1u64;
        while let Some(&(n, a, b)) = dims.last() {
            if a == run * elem && b == run * elem {
                run *= n;
                dims.pop();
            } else {
                break;
            }
        }
        let inner = if run > 1 || dims.is_empty() {
            Run {
                a: a_base,
                b: b_base,
                count: run,
                a_step: elem,
                b_step: elem,
            }
        } else {
            let (n, a, b) = dims.pop().unwrap();
            Run {
                a: a_base,
                b: b_base,
                count: n,
                a_step: a,
                b_step: b,
            }
        };
        let inner = if empty { Run { count: 0, ..inner } } else { inner };
        BoxRuns {
            outer: if empty { vec![] } else { dims },
            inner,
        }
    }

    #[cfg(test)]
    pub fn num_runs(&self) -> u64 {
        if self.inner.count == 0 {
            0
        } else {
            self.outer.iter().map(|d| d.0).product()
        }
    }

    pub fn for_each(&self, mut f: impl FnMut(Run)) {
        if self.inner.count == 0 {
            return;
        }
        let mut idx = vec![0u64; self.outer.len()];
        loop {
            let mut a = self.inner.a;
            let mut b = self.inner.b;
            for (i, &(_, sa, sb)) in idx.iter().zip(&self.outer) {
                a += i * sa;
                b += i * sb;
            }
            f(Run { a, b, ..self.inner });
            // Odometer increment, innermost outer dim fastest.
            let mut d = self.outer.len();
            loop {
                if d == 0 {
                    return;
                }
                d -= 1;
                idx[d] += 1;
                if idx[d] < self.outer[d].0 {
                    break;
                }
                idx[d] = 0;
            }
        }
    }
}

/// Element strides to byte strides.
pub fn byte_strides(strides: &[u64], elem: u64) -> Vec<u64> {
    strides.iter().map(|s| s * elem).collect()
}

/// Row-major byte strides of a dense array of `sizes`.
pub fn dense_byte_strides(sizes: &[u64], elem: u64) -> Vec<u64> {
    byte_strides(&crate::tensor::contiguous_strides(sizes), elem)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(r: &BoxRuns) -> Vec<Run> {
        let mut v = vec![];
        r.for_each(|x| v.push(x));
        v
    }

    #[test]
    fn dense_box_is_one_run() {
        let s = dense_byte_strides(&[4, 5], 4);
        let r = BoxRuns::new(&[4, 5], &s, &s, 0, 0, 4);
        assert_eq!(
            collect(&r),
            vec![Run {
                a: 0,
                b: 0,
                count: 20,
                a_step: 4,
                b_step: 4
            }]
        );
    }

    #[test]
    fn column_slice_is_runs_per_row() {
        // Box [0..3, 1..3] of a 3x4 array (a), into a dense 3x2 array (b).
        let a = dense_byte_strides(&[3, 4], 1);
        let b = dense_byte_strides(&[3, 2], 1);
        let r = BoxRuns::new(&[3, 2], &a, &b, 1, 0, 1);
        let runs = collect(&r);
        assert_eq!(runs.len(), 3);
        assert_eq!(
            runs[2],
            Run {
                a: 9,
                b: 4,
                count: 2,
                a_step: 1,
                b_step: 1
            }
        );
    }

    #[test]
    fn transposed_destination() {
        // 2x3 dense (a) into a transposed view (b strides 1, 2 elements).
        let r = BoxRuns::new(&[2, 3], &[3, 1], &[1, 2], 0, 0, 1);
        let src: Vec<u8> = (0..6).collect();
        let mut dst = vec![0u8; 6];
        // SAFETY: the box's runs address bytes 0..6 of each 6-byte vector; they are distinct.
        r.for_each(|run| unsafe { run.copy(src.as_ptr(), dst.as_mut_ptr(), 1, 0, 0) });
        assert_eq!(dst, vec![0, 3, 1, 4, 2, 5]);
    }

    #[test]
    fn split_runs() {
        let run = Run {
            a: 100,
            b: 0,
            count: 10,
            a_step: 4,
            b_step: 4,
        };
        let (x, y) = run.split(110, true);
        assert_eq!(x.unwrap().count, 3);
        assert_eq!(y.unwrap().a, 112);
        assert_eq!(run.split(100, true), (None, Some(run)));
        assert_eq!(run.split(1000, true), (Some(run), None));
    }

    #[test]
    fn empty_and_scalar() {
        assert_eq!(BoxRuns::new(&[0, 3], &[3, 1], &[3, 1], 0, 0, 4).num_runs(), 0);
        let r = BoxRuns::new(&[], &[], &[], 8, 16, 8);
        assert_eq!(
            collect(&r),
            vec![Run {
                a: 8,
                b: 16,
                count: 1,
                a_step: 8,
                b_step: 8
            }]
        );
    }
}
