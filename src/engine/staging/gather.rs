//! Dense row-major bytes of a strided host view, produced piece by piece: the one strided
//! gather behind both the staging copy (whole views) and the file writer (buffer-sized pieces).

use crate::plan::runs::{byte_strides, dense_byte_strides, BoxRuns, Run};
use crate::tensor::TensorView;

/// Copies a strided host view's elements into its dense row-major payload.
pub(crate) struct HostGather {
    base: *const u8,
    elem: u64,
    runs: Vec<Run>,
    next: usize,
}

impl HostGather {
    /// A gather of `view`'s elements, read from `base` at the view's strides (`base` is the
    /// view's own memory, or a host copy of its extent).
    pub(crate) fn new(base: *const u8, view: &TensorView) -> Self {
        let elem = view.dtype().size() as u64;
        let a = byte_strides(view.strides(), elem);
        let b = dense_byte_strides(view.sizes(), elem);
        let mut runs = Vec::new();
        BoxRuns::new(view.sizes(), &a, &b, 0, 0, elem).for_each(|r| runs.push(r));
        HostGather { base, elem, runs, next: 0 }
    }

    /// Fills `dst` with payload bytes starting at `off`; calls come in increasing `off`.
    pub(crate) fn fill(&mut self, off: u64, dst: &mut [u8]) {
        let end = off + dst.len() as u64;
        while self.next < self.runs.len() {
            let run = self.runs[self.next];
            if run.b >= end {
                break;
            }
            let (head, tail) = run.split(end, false);
            if let Some(h) = head {
                // SAFETY: the runs address the view's elements from `base` (valid for the
                // view's strided extent, as the view's construction checked) and payload bytes
                // `off..end` in `dst`, which `split` keeps this piece within; `h` starts at or
                // after `off` (earlier pieces went to earlier calls).
                unsafe { h.copy(self.base, dst.as_mut_ptr(), self.elem, 0, off) };
            }
            match tail {
                Some(t) => {
                    self.runs[self.next] = t;
                    break;
                }
                None => self.next += 1,
            }
        }
    }
}

/// A host view's elements, dense and row-major, into `dst` (exactly the payload's length).
pub(crate) fn copy_dense(view: &TensorView, dst: &mut [u8]) {
    if view.is_contiguous() {
        // SAFETY: a contiguous view spans `dst.len()` readable bytes from its pointer (checked
        // when the view was made), and `dst` is a distinct, exclusively borrowed buffer.
        unsafe { std::ptr::copy_nonoverlapping(view.as_ptr(), dst.as_mut_ptr(), dst.len()) };
        return;
    }
    HostGather::new(view.as_ptr(), view).fill(0, dst);
}
