//! The staging pool: a context's host buffers kept across saves and loads ("cached staging"),
//! pinning at most `budget` bytes; beyond that it hands out ordinary memory.

use super::arena::{AlignedBuf, HostBuf, ALIGN};
use crate::cuda::PinnedBuf;
use crate::error::Result;
use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

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
#[non_exhaustive]
pub struct PoolStats {
    /// Page-locked (CUDA-registered) host bytes held.
    pub pinned_bytes: u64,
    /// Ordinary heap bytes held.
    pub heap_bytes: u64,
    /// Most page-locked bytes the pool may hold.
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
        self.heap_bytes += b.capacity() as u64;
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
                HostBuf::Heap(h) => self.heap_bytes -= h.capacity() as u64,
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

/// A buffer taken from a pool, given back to it when dropped.
pub(crate) struct PoolBuf<'p> {
    pool: &'p Mutex<StagingPool>,
    buf: Option<HostBuf>,
}

impl<'p> PoolBuf<'p> {
    /// [`StagingPool::acquire`] through `pool`'s lock (held only while acquiring).
    pub(crate) fn acquire(pool: &'p Mutex<StagingPool>, len: usize, pin_for: Option<i32>) -> Result<PoolBuf<'p>> {
        let buf = crate::error::lock(pool).acquire(len, pin_for)?;
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

impl DerefMut for PoolBuf<'_> {
    fn deref_mut(&mut self) -> &mut HostBuf {
        self.buf.as_mut().expect("a PoolBuf holds its buffer until dropped")
    }
}

impl Drop for PoolBuf<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            crate::error::lock(self.pool).release(b);
        }
    }
}

/// Half of physical memory: pinned memory cannot be swapped, so it must not take it all.
fn default_budget() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if pages > 0 && size > 0 {
        pages as u64 * size as u64 / 2
    } else {
        8 << 30
    }
}
