//! Dense row-major bytes of a strided host view, produced piece by piece: the one strided
//! gather behind both the staging copy (whole views) and the file writer (buffer-sized pieces).

use crate::plan::runs::{byte_strides, dense_byte_strides, BoxRuns, Run};
use crate::tensor::{strided_extent_bytes, Device, TensorView};
use std::marker::PhantomData;

/// Copies a strided host view's elements into its dense row-major payload. Pieces may end in
/// the middle of an element: the rest of it starts the next piece.
pub(crate) struct HostGather<'s> {
    /// The source memory: readable for the view's strided extent while `'s` lasts.
    base: *const u8,
    elem: u64,
    /// The element runs, in payload order; `runs[next..]` are still to copy.
    runs: Vec<Run>,
    next: usize,
    /// Payload bytes produced so far: where the next piece starts.
    done: u64,
    /// The element the last piece cut: (source offset of its next byte, bytes left of it).
    cut: Option<(u64, u64)>,
    _src: PhantomData<&'s [u8]>,
}

impl<'s> HostGather<'s> {
    /// A gather of a host view's elements from the view's own memory.
    pub(crate) fn of_view(view: &'s TensorView) -> Self {
        assert_eq!(view.device(), Device::Cpu, "a host gather of device memory");
        // The view's memory is valid for its strided extent (checked by `TensorView::from_raw`,
        // whose contract keeps it so for the view's lifetime, which `'s` is within).
        Self::new(view.as_ptr(), view)
    }

    /// A gather of `view`'s elements from `extent`, a host copy of the view's whole memory
    /// extent (its elements at the view's strides from the start).
    pub(crate) fn of_extent(extent: &'s [u8], view: &TensorView) -> Self {
        let need = strided_extent_bytes(view.sizes(), view.strides(), view.dtype().size()).unwrap_or(u64::MAX);
        assert!(
            need <= extent.len() as u64,
            "a {}-byte host copy of a view spanning {need} bytes",
            extent.len()
        );
        Self::new(extent.as_ptr(), view)
    }

    fn new(base: *const u8, view: &TensorView) -> Self {
        let elem = view.dtype().size() as u64;
        let a = byte_strides(view.strides(), elem);
        let b = dense_byte_strides(view.sizes(), elem);
        let mut runs = Vec::new();
        BoxRuns::new(view.sizes(), &a, &b, 0, 0, elem).for_each(|r| runs.push(r));
        // Dense on the payload side, in payload order: each run continues where the previous
        // one ended (what `fill`'s bounds rely on).
        let mut end = 0;
        for r in &runs {
            assert!(
                r.b == end && (r.b_step == elem || r.count <= 1),
                "gather runs are not dense on the payload side"
            );
            end += r.count * elem;
        }
        HostGather {
            base,
            elem,
            runs,
            next: 0,
            done: 0,
            cut: None,
            _src: PhantomData,
        }
    }

    /// Fills `dst` with the payload bytes from `off`; pieces must follow each other from 0
    /// (`off` is where the previous one ended), and stay within the payload.
    pub(crate) fn fill(&mut self, off: u64, dst: &mut [u8]) {
        assert_eq!(off, self.done, "gather pieces must follow each other");
        let end = off + dst.len() as u64;
        let mut at = off;
        if let Some((a, left)) = self.cut.take() {
            let k = left.min(end - at);
            // SAFETY: source bytes `a..a + k` are the rest of one element the runs address
            // (inside the source extent, see `base`); destination bytes `0..k` lie in `dst`,
            // a distinct exclusively borrowed buffer.
            unsafe { std::ptr::copy_nonoverlapping(self.base.add(a as usize), dst.as_mut_ptr(), k as usize) };
            at += k;
            if k < left {
                self.cut = Some((a + k, left - k));
            }
        }
        while at < end && self.next < self.runs.len() {
            let run = self.runs[self.next];
            // The pieces so far ended exactly where this run's first untaken element starts.
            assert_eq!(run.b, at, "gather runs out of step with the pieces");
            // Whole elements that end by `end`, then maybe one that `end` cuts.
            let whole = ((end - run.b) / self.elem).min(run.count);
            if whole > 0 {
                // SAFETY: the run's first `whole` elements lie in the source extent (the runs
                // address the view's elements) and at payload bytes `run.b..run.b + whole *
                // elem`, which lie in `off..end`, i.e. in `dst` (from `off`); `dst` is a
                // distinct, exclusively borrowed buffer.
                unsafe { Run { count: whole, ..run }.copy(self.base, dst.as_mut_ptr(), self.elem, 0, off) };
            }
            if whole == run.count {
                at += whole * self.elem;
                self.next += 1;
                continue;
            }
            let (a, b) = (run.a + whole * run.a_step, run.b + whole * self.elem);
            let rest = run.count - whole;
            if b < end {
                let k = end - b;
                // SAFETY: the first `k < elem` bytes of the element at source offset `a` (in the
                // source extent) to payload bytes `b..end`, in `dst`.
                unsafe { std::ptr::copy_nonoverlapping(self.base.add(a as usize), dst.as_mut_ptr().add((b - off) as usize), k as usize) };
                self.cut = Some((a + k, self.elem - k));
                if rest == 1 {
                    self.next += 1;
                } else {
                    self.runs[self.next] = Run {
                        a: a + run.a_step,
                        b: b + self.elem,
                        count: rest - 1,
                        ..run
                    };
                }
            } else {
                self.runs[self.next] = Run { a, b, count: rest, ..run };
            }
            at = end;
        }
        assert!(at == end, "a gather piece past the end of the payload");
        self.done = end;
    }
}

/// A host view's elements, dense and row-major, into `dst` (exactly the payload's length).
pub(crate) fn copy_dense(view: &TensorView, dst: &mut [u8]) {
    assert_eq!(dst.len() as u64, view.data_bytes(), "a payload buffer of the wrong size");
    if view.is_contiguous() && view.device() == Device::Cpu {
        // SAFETY: a contiguous host view spans its `data_bytes()` (= `dst.len()`) bytes from its
        // pointer, readable while the view lives (`TensorView::from_raw`'s contract, extent
        // checked there); `dst` is a distinct, exclusively borrowed buffer.
        unsafe { std::ptr::copy_nonoverlapping(view.as_ptr(), dst.as_mut_ptr(), dst.len()) };
        return;
    }
    HostGather::of_view(view).fill(0, dst);
}

/// Bytes `start..start + dst.len()` of a contiguous host view's payload into `dst`: one piece
/// of a large tensor whose staging copy is spread over threads.
pub(crate) fn copy_contiguous_piece(view: &TensorView, start: u64, dst: &mut [u8]) {
    assert!(view.is_contiguous() && view.device() == Device::Cpu, "a piecewise copy of a strided or device view");
    let end = start.checked_add(dst.len() as u64).expect("a piece past u64");
    assert!(end <= view.data_bytes(), "a piece past the end of the payload");
    // SAFETY: a contiguous host view spans its `data_bytes()` bytes from its pointer, readable
    // while the view lives (`TensorView::from_raw`'s contract); `start..end` lies within them
    // (checked above), and `dst` is a distinct, exclusively borrowed buffer.
    unsafe { std::ptr::copy_nonoverlapping(view.as_ptr().add(start as usize), dst.as_mut_ptr(), dst.len()) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    /// A contiguous 3x5 u16 view of `src`'s 15 elements.
    fn unsafe_view_of(src: &mut [u16]) -> TensorView<'_> {
        // SAFETY: `src` holds the view's 15 elements (30 bytes, its whole extent) and outlives it.
        unsafe { TensorView::from_raw(src.as_mut_ptr().cast(), 30, DType::U16, &[3, 5], None, Device::Cpu).unwrap() }
    }

    /// A transposed 5x3 u16 matrix gathered in pieces of every length from 1 to 31 (cutting
    /// elements at every byte), against the whole gather.
    #[test]
    fn pieces_cut_elements_anywhere() {
        let mut src: Vec<u16> = (0..15).map(|i| 0x0101 * i + 0x1000).collect();
        let bytes: Vec<u8> = src.iter().flat_map(|v| v.to_ne_bytes()).collect();
        // SAFETY: `src` holds the view's 15 elements (its whole extent) and outlives it.
        let view = unsafe { TensorView::from_raw(src.as_mut_ptr().cast(), 30, DType::U16, &[3, 5], Some(&[1, 3]), Device::Cpu).unwrap() };
        let mut expect = Vec::new();
        for i in 0..3 {
            for j in 0..5 {
                expect.extend_from_slice(&bytes[2 * (j * 3 + i)..2 * (j * 3 + i) + 2]);
            }
        }
        let mut whole = vec![0u8; 30];
        copy_dense(&view, &mut whole);
        assert_eq!(whole, expect);
        for piece in 1..=31 {
            let mut g = HostGather::of_view(&view);
            let mut out = vec![0xAAu8; 30];
            for (i, chunk) in out.chunks_mut(piece).enumerate() {
                g.fill((i * piece) as u64, chunk);
            }
            assert_eq!(out, expect, "pieces of {piece} bytes");
        }
        // A contiguous view copied in pieces of every length, against the whole copy.
        let flat = unsafe_view_of(&mut src);
        let mut whole = vec![0u8; 30];
        copy_dense(&flat, &mut whole);
        for piece in 1..=31 {
            let mut out = vec![0xAAu8; 30];
            for (i, chunk) in out.chunks_mut(piece).enumerate() {
                copy_contiguous_piece(&flat, (i * piece) as u64, chunk);
            }
            assert_eq!(out, whole, "contiguous pieces of {piece} bytes");
        }
        let mut g = HostGather::of_extent(&bytes, &view);
        let mut out = vec![0xAAu8; 30];
        let (x, y) = out.split_at_mut(7);
        g.fill(0, x);
        g.fill(7, y);
        assert_eq!(out, expect);
    }
}
