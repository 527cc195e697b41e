//! Host buffers for I/O and staging: 4096-aligned (O_DIRECT), page-locked when CUDA is in play
//! (fast, asynchronous device copies). This is the one place raw host buffer memory is handed
//! out: shared access as `&[u8]`, exclusive access as `&mut [u8]` through `&mut self`, and split
//! into disjoint pieces with [`HostBuf::split`].

use crate::cuda::PinnedBuf;
use crate::error::{Error, ErrorKind, Result};
use crate::tensor::{DType, Device, TensorView};

pub const ALIGN: usize = 4096;

/// 4096-aligned heap memory: an anonymous private mapping, so it arrives zeroed (every byte is
/// initialised) without being written first, however large.
pub struct AlignedBuf {
    ptr: *mut u8,
    cap: usize,
}

// SAFETY: AlignedBuf owns its mapping outright (the fields are private: no other handle to it
// exists); its bytes are only reached through `HostBuf`'s `&self`/`&mut self` accessors, so the
// borrow rules govern access from any thread, and a mapping is not tied to a thread.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above: `&AlignedBuf` gives only the capacity (and, through `HostBuf`, shared reads).
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub fn new(cap: usize) -> Result<AlignedBuf> {
        let cap = cap.max(1).next_multiple_of(ALIGN);
        // SAFETY: an anonymous private mapping with no address hint: the kernel picks fresh,
        // zeroed pages and touches no existing memory. Failure is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                cap,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!("cannot allocate a {cap}-byte host buffer: {}", std::io::Error::last_os_error()),
            ));
        }
        Ok(AlignedBuf { ptr: ptr.cast(), cap })
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`cap` are exactly the mapping made in `new`, unmapped once, here; slices
        // of it borrow the buffer and detached views must be gone (`detached_view`'s contract).
        unsafe { libc::munmap(self.ptr.cast(), self.cap) };
    }
}

pub enum HostBuf {
    Heap(AlignedBuf),
    Pinned(PinnedBuf),
}

impl HostBuf {
    /// The start of the buffer; raw access stays inside this module.
    fn as_ptr(&self) -> *mut u8 {
        match self {
            HostBuf::Heap(b) => b.ptr,
            HostBuf::Pinned(b) => b.as_ptr(),
        }
    }
    pub fn capacity(&self) -> usize {
        match self {
            HostBuf::Heap(b) => b.cap,
            HostBuf::Pinned(b) => b.len(),
        }
    }
    pub fn is_pinned(&self) -> bool {
        matches!(self, HostBuf::Pinned(_))
    }
    /// The first `len` bytes.
    pub fn bytes(&self, len: usize) -> &[u8] {
        assert!(len <= self.capacity(), "{len} bytes of a {}-byte buffer", self.capacity());
        // SAFETY: the buffer is one allocation of `capacity()` >= `len` bytes owned by `self`,
        // which this shared borrow keeps alive and unwritten (writes need `&mut self`; detached
        // views are read-only). Its bytes are initialised: the heap mapping arrives zeroed, and
        // the driver's page-locked allocation holds whatever the driver left in pages it
        // faulted in and locked (foreign memory, not uninitialised Rust memory), or bytes
        // written since.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), len) }
    }
    /// The first `len` bytes, writable.
    pub fn bytes_mut(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= self.capacity(), "{len} bytes of a {}-byte buffer", self.capacity());
        // SAFETY: as in `bytes`; the exclusive borrow of `self` makes this the only access
        // (detached views must be gone before the buffer is written: `detached_view`).
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr(), len) }
    }
    /// A host view of the dense `dtype` tensor of `sizes` in bytes `off..off + len`, not tied to
    /// a borrow of the buffer: the async save's staged state keeps such views next to the
    /// buffer they point into.
    ///
    /// # Safety
    /// The view (and every copy of its pointer) must be gone before the buffer is dropped,
    /// written (`bytes_mut`, `split`) or handed to another owner (back to its pool), and the
    /// view must only be read through (a save), never written (a load).
    pub unsafe fn detached_view(&self, off: usize, len: usize, dtype: DType, sizes: &[u64]) -> Result<TensorView<'static>> {
        assert!(
            off.checked_add(len).is_some_and(|end| end <= self.capacity()),
            "a view of bytes {off}..+{len} of a {}-byte buffer",
            self.capacity()
        );
        // SAFETY: `off + len <= capacity()`, so the pointer stays within the allocation and the
        // view's `len` bytes (which `from_raw` checks cover its shape) lie in the buffer; the
        // buffer's memory does not move when the `HostBuf` does. Lifetime and aliasing are the
        // caller's contract.
        unsafe { TensorView::from_raw(self.as_ptr().add(off), len, dtype, sizes, None, Device::Cpu) }
    }
    /// Disjoint writable pieces of the given lengths, back to back from the start.
    pub fn split(&mut self, lens: impl IntoIterator<Item = usize>) -> Vec<&mut [u8]> {
        let cap = self.capacity();
        let mut rest = self.bytes_mut(cap);
        let mut out = Vec::new();
        for n in lens {
            let (piece, tail) = std::mem::take(&mut rest).split_at_mut(n);
            out.push(piece);
            rest = tail;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_pieces_are_disjoint_and_in_order() {
        let mut b = HostBuf::Heap(AlignedBuf::new(10).unwrap());
        assert_eq!(b.capacity(), ALIGN);
        assert!(b.bytes(ALIGN).iter().all(|&x| x == 0));
        let mut parts = b.split([3, 0, 5]);
        parts[0].fill(1);
        parts[2].fill(2);
        assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), vec![3, 0, 5]);
        assert_eq!(b.bytes(9), &[1, 1, 1, 2, 2, 2, 2, 2, 0]);
    }
}
