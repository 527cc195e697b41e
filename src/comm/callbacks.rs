//! A communicator made of the host's own collectives (a c10d ProcessGroup, MPI), given as C
//! function pointers. Each receives the call's timeout and should honour it: libdcp cannot
//! interrupt a host collective.

use super::Communicator;
use crate::error::{Error, ErrorKind, Result};
use std::ffi::c_void;

/// Every rank contributes `len` bytes from `send`; `recv` receives `world_size * len` bytes in
/// rank order. Returns 0 on success.
pub type AllGatherFn =
    unsafe extern "C" fn(user_data: *mut c_void, send: *const c_void, recv: *mut c_void, len: usize, timeout_ms: u64) -> i32;
/// `len` bytes of `buf` on rank `root` are copied into `buf` on every rank. Returns 0 on success.
pub type BroadcastFn = unsafe extern "C" fn(user_data: *mut c_void, buf: *mut c_void, len: usize, root: i32, timeout_ms: u64) -> i32;
/// Returns when every rank has called it. Returns 0 on success.
pub type BarrierFn = unsafe extern "C" fn(user_data: *mut c_void, timeout_ms: u64) -> i32;

pub struct HostCallbacks {
    pub all_gather: AllGatherFn,
    pub broadcast: BroadcastFn,
    pub barrier: Option<BarrierFn>,
    pub user_data: *mut c_void,
}

pub struct CallbackComm {
    rank: usize,
    world: usize,
    timeout_ms: u64,
    cb: HostCallbacks,
}

// SAFETY: `user_data` is only handed back to the host's callbacks, never dereferenced here, and
// the host promises in the C API (`dcp_context_new_callbacks`, `dcp_save_async`) that they may be
// called with it from the thread of the save or load, or from libdcp's async save thread.
unsafe impl Send for CallbackComm {}
// SAFETY: as above; the callbacks are never called from two threads at once: each save or load
// on a context settles the async save in flight first (`Context::settle`), so one collective
// runs at a time.
unsafe impl Sync for CallbackComm {}

impl CallbackComm {
    pub fn new(rank: usize, world: usize, timeout_ms: u64, cb: HostCallbacks) -> Result<CallbackComm> {
        if world == 0 || rank >= world {
            return Err(Error::invalid(format!("rank {rank} is not in a world of size {world}")));
        }
        Ok(CallbackComm {
            rank,
            world,
            timeout_ms,
            cb,
        })
    }

    fn check(&self, what: &str, rc: i32) -> Result<()> {
        if rc == 0 {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::Comm,
                format!("the host's {what} callback failed with code {rc} on rank {}", self.rank),
            ))
        }
    }

    fn gather_fixed(&self, send: &[u8]) -> Result<Vec<u8>> {
        let mut recv = vec![0u8; send.len() * self.world];
        // SAFETY: the host's all-gather reads `send.len()` bytes from `send` and writes
        // `world * len` bytes to `recv`, which has exactly that many; both outlive the call
        // (the callback returns when done), and `user_data` is the host's own pointer.
        let rc = unsafe {
            (self.cb.all_gather)(
                self.cb.user_data,
                send.as_ptr() as *const c_void,
                recv.as_mut_ptr() as *mut c_void,
                send.len(),
                self.timeout_ms,
            )
        };
        self.check("all_gather", rc)?;
        Ok(recv)
    }

    fn bcast_fixed(&self, buf: &mut [u8], root: usize) -> Result<()> {
        // SAFETY: the host's broadcast reads (on the root) or writes (elsewhere) `buf.len()`
        // bytes of `buf`, exclusively borrowed for the call; `root` is a rank of the world
        // (checked by the callers), so it fits an i32 like `world` (checked by the C API).
        let rc = unsafe {
            (self.cb.broadcast)(
                self.cb.user_data,
                buf.as_mut_ptr() as *mut c_void,
                buf.len(),
                root as i32,
                self.timeout_ms,
            )
        };
        self.check("broadcast", rc)
    }
}

impl Communicator for CallbackComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    /// Two host all-gathers: the lengths, then the data padded to the longest.
    fn all_gather(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let lens = self.gather_fixed(&(data.len() as u64).to_le_bytes())?;
        let lens: Vec<usize> = lens.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap()) as usize).collect();
        let max = lens.iter().copied().max().unwrap_or(0);
        if max == 0 {
            return Ok(vec![Vec::new(); self.world]);
        }
        let mut padded = data.to_vec();
        padded.resize(max, 0);
        let all = self.gather_fixed(&padded)?;
        Ok(all.chunks(max).zip(&lens).map(|(c, &n)| c[..n].to_vec()).collect())
    }
    fn broadcast(&self, data: &[u8], root: usize) -> Result<Vec<u8>> {
        if root >= self.world {
            return Err(Error::invalid(format!("broadcast root {root} is not a rank of {}", self.world)));
        }
        let mut len = (data.len() as u64).to_le_bytes();
        self.bcast_fixed(&mut len, root)?;
        let mut buf = if self.rank == root {
            data.to_vec()
        } else {
            vec![0u8; u64::from_le_bytes(len) as usize]
        };
        if !buf.is_empty() {
            self.bcast_fixed(&mut buf, root)?;
        }
        Ok(buf)
    }
    fn barrier(&self) -> Result<()> {
        match self.cb.barrier {
            // SAFETY: takes only the host's `user_data` and the timeout.
            Some(b) => self.check("barrier", unsafe { b(self.cb.user_data, self.timeout_ms) }),
            None => self.gather_fixed(&[0u8]).map(|_| ()),
        }
    }
}
