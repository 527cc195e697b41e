//! Host buffers for I/O and staging: 4096-aligned (O_DIRECT), page-locked when CUDA is in play
//! (fast, asynchronous device copies). A pool per context keeps them across saves and loads
//! ("cached staging"), pinning at most `budget` bytes; beyond that it hands out ordinary memory.

use crate::cuda::PinnedBuf;
use crate::error::{Error, ErrorKind, Result};
use std::alloc::Layout;
use std::ops::Deref;
use std::sync::{Mutex, MutexGuard};

pub const ALIGN: usize = 4096;

/// 4096-aligned heap memory.
pub struct AlignedBuf {
    ptr: *mut u8,
    cap: usize,
}
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub fn new(cap: usize) -> Result<AlignedBuf> {
        let cap = cap.max(1).next_multiple_of(ALIGN);
        let layout = Layout::from_size_align(cap, ALIGN).map_err(|e| Error::invalid(format!("buffer size {cap}: {e}")))?;
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            return Err(Error::new(ErrorKind::NoSpace, format!("cannot allocate a {cap}-byte host buffer")));
        }
        Ok(AlignedBuf { ptr, cap })
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        unsafe { std::alloc::dealloc(self.ptr, Layout::from_size_align_unchecked(self.cap, ALIGN)) }
    }
}

pub enum HostBuf {
    Heap(AlignedBuf),
    Pinned(PinnedBuf),
}

impl HostBuf {
    pub fn as_ptr(&self) -> *mut u8 {
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
    ///
    /// # Safety
    /// Callers must not hold two overlapping mutable slices of the same buffer.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, len: usize) -> &mut [u8] {
        assert!(len <= self.capacity());
        std::slice::from_raw_parts_mut(self.as_ptr(), len)
    }
}

/// Buffers kept between operations of one context.
pub struct StagingPool {
    /// Most page-locked bytes held at once.
    pub budget: u64,
    pinned_bytes: u64,
    heap_bytes: u64,
    free: Vec<HostBuf>,
}

/// What a pool holds now.
#[derive(Clone, Copy, Debug, Default)]
pub struct PoolStats {
    pub pinned_bytes: u64,
    pub heap_bytes: u64,
    pub budget: u64,
}

impl StagingPool {
    pub fn new() -> StagingPool {
        StagingPool {
            budget: default_budget(),
            pinned_bytes: 0,
            heap_bytes: 0,
            free: Vec::new(),
        }
    }

    /// A buffer of at least `len` bytes; page-locked (through the primary context of device
    /// `pin_for`) if asked, CUDA is present and the budget allows. Reuses the smallest free
    /// buffer that fits.
    pub fn acquire(&mut self, len: usize, pin_for: Option<i32>) -> Result<HostBuf> {
        let want_pinned = pin_for.is_some() && crate::cuda::available();
        let best = self
            .free
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len && (b.is_pinned() || !want_pinned))
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        if let Some(i) = best {
            return Ok(self.free.swap_remove(i));
        }
        let len = len.max(1).next_multiple_of(ALIGN);
        if want_pinned {
            // Make room in the budget by dropping free pinned buffers that are too small.
            while self.pinned_bytes + len as u64 > self.budget {
                let Some(i) = self.free.iter().position(|b| b.is_pinned()) else {
                    break;
                };
                let b = self.free.swap_remove(i);
                self.pinned_bytes -= b.capacity() as u64;
            }
            if self.pinned_bytes + len as u64 <= self.budget {
                let b = PinnedBuf::new(len, pin_for.unwrap_or(0))?;
                self.pinned_bytes += len as u64;
                return Ok(HostBuf::Pinned(b));
            }
        }
        let b = AlignedBuf::new(len)?;
        self.heap_bytes += b.cap as u64;
        Ok(HostBuf::Heap(b))
    }

    pub fn release(&mut self, buf: HostBuf) {
        self.free.push(buf);
    }

    /// Frees every buffer not in use.
    pub fn trim(&mut self) {
        for b in self.free.drain(..) {
            match &b {
                HostBuf::Pinned(p) => self.pinned_bytes -= p.len() as u64,
                HostBuf::Heap(h) => self.heap_bytes -= h.cap as u64,
            }
        }
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            pinned_bytes: self.pinned_bytes,
            heap_bytes: self.heap_bytes,
            budget: self.budget,
        }
    }
}

impl Default for StagingPool {
    fn default() -> Self {
        Self::new()
    }
}

/// Locks a pool; one left poisoned by a panicking thread is still usable (it only holds
/// buffers).
pub(crate) fn lock(pool: &Mutex<StagingPool>) -> MutexGuard<'_, StagingPool> {
    pool.lock().unwrap_or_else(|p| p.into_inner())
}

/// A buffer taken from a pool, given back to it when dropped.
pub(crate) struct PoolBuf<'p> {
    pool: &'p Mutex<StagingPool>,
    buf: Option<HostBuf>,
}

impl<'p> PoolBuf<'p> {
    /// [`StagingPool::acquire`] through `pool`'s lock (held only while acquiring).
    pub(crate) fn acquire(pool: &'p Mutex<StagingPool>, len: usize, pin_for: Option<i32>) -> Result<PoolBuf<'p>> {
        let buf = lock(pool).acquire(len, pin_for)?;
        Ok(PoolBuf { pool, buf: Some(buf) })
    }

    /// The buffer, no longer given back on drop: its new owner releases it.
    pub(crate) fn into_inner(mut self) -> HostBuf {
        self.buf.take().expect("a PoolBuf holds its buffer until dropped")
    }
}

impl Deref for PoolBuf<'_> {
    type Target = HostBuf;
    fn deref(&self) -> &HostBuf {
        self.buf.as_ref().expect("a PoolBuf holds its buffer until dropped")
    }
}

impl Drop for PoolBuf<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            lock(self.pool).release(b);
        }
    }
}

/// Half of physical memory: pinned memory cannot be swapped, so it must not take it all.
fn default_budget() -> u64 {
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if pages > 0 && size > 0 {
        pages as u64 * size as u64 / 2
    } else {
        8 << 30
    }
}
