//! NCCL, loaded explicitly at run time. cudarc's loader looks for `libnccl.so` and
//! `libnccl.so.<CUDA major>`, but NCCL ships `libnccl.so.2` (the PyPI wheel `nvidia-nccl-*` has
//! only that name), so the few functions libdcp uses are resolved here from `libnccl.so.2`
//! (`DCP_NCCL_LIBRARY` overrides the path). A process that already loaded NCCL (torch) shares it.

use crate::error::{Error, ErrorKind, Result};
use cudarc::nccl::sys::{ncclComm_t, ncclDataType_t, ncclResult_t, ncclUniqueId};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

type GetUniqueId = unsafe extern "C" fn(*mut ncclUniqueId) -> ncclResult_t;
type CommInitRank = unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> ncclResult_t;
type CommDestroy = unsafe extern "C" fn(ncclComm_t) -> ncclResult_t;
type GetErrorString = unsafe extern "C" fn(ncclResult_t) -> *const c_char;
type SendRecv = unsafe extern "C" fn(*mut c_void, usize, ncclDataType_t, c_int, ncclComm_t, *mut c_void) -> ncclResult_t;
type Group = unsafe extern "C" fn() -> ncclResult_t;

struct Api {
    _lib: libloading::Library,
    get_unique_id: GetUniqueId,
    comm_init_rank: CommInitRank,
    comm_destroy: CommDestroy,
    send: SendRecv,
    recv: SendRecv,
    error_string: GetErrorString,
    group_start: Group,
    group_end: Group,
}

fn api() -> Result<&'static Api> {
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| {
        let candidates: Vec<String> = match std::env::var("DCP_NCCL_LIBRARY") {
            Ok(p) if !p.is_empty() => vec![p],
            _ => vec!["libnccl.so.2".into(), "libnccl.so".into()],
        };
        let mut last = String::new();
        for name in &candidates {
            // SAFETY: loading runs the library's initialisers; NCCL's (from its usual names, or
            // the file the user points DCP_NCCL_LIBRARY at) have no preconditions on us, and a
            // process that already loaded it (torch) just gets its handle again.
            match unsafe { libloading::Library::new(name) } {
                Ok(lib) => {
                    // SAFETY: (every `symbol` call) each type alias above is the C signature
                    // nccl.h declares for that symbol, and the pointers live in `Api` next to
                    // `_lib`, which keeps the library loaded for as long as they exist (forever:
                    // `API` is a static).
                    let api = unsafe {
                        Api {
                            get_unique_id: symbol(&lib, name, "ncclGetUniqueId")?,
                            comm_init_rank: symbol(&lib, name, "ncclCommInitRank")?,
                            comm_destroy: symbol(&lib, name, "ncclCommDestroy")?,
                            send: symbol(&lib, name, "ncclSend")?,
                            recv: symbol(&lib, name, "ncclRecv")?,
                            error_string: symbol(&lib, name, "ncclGetErrorString")?,
                            group_start: symbol(&lib, name, "ncclGroupStart")?,
                            group_end: symbol(&lib, name, "ncclGroupEnd")?,
                            _lib: lib,
                        }
                    };
                    return Ok(api);
                }
                Err(e) => last = format!("{name}: {e}"),
            }
        }
        Err(format!(
            "NCCL is not available (tried {candidates:?}; last error {last}); set DCP_NCCL_LIBRARY to libnccl.so.2's path"
        ))
    })
    .as_ref()
    .map_err(|m| Error::unsupported(m.clone()))
}

/// The function `name` of `lib` (loaded from `file`), as a pointer of type `T`.
///
/// # Safety
/// `T` must be a function pointer type with the symbol's C signature, and the pointer must not
/// be called after `lib` is unloaded.
unsafe fn symbol<T: Copy>(lib: &libloading::Library, file: &str, name: &str) -> std::result::Result<T, String> {
    // SAFETY: forwarded from this function's contract.
    unsafe { lib.get::<T>(name.as_bytes()) }
        .map(|s| *s)
        .map_err(|e| format!("{file} lacks {name}: {e}"))
}

pub fn available() -> bool {
    super::available() && api().is_ok()
}

fn check(what: &str, r: ncclResult_t) -> Result<()> {
    if r == ncclResult_t::ncclSuccess {
        return Ok(());
    }
    let text = api()
        .ok()
        // SAFETY: ncclGetErrorString takes any result code and returns a pointer to a static,
        // NUL-terminated string (a generic one for unknown codes).
        .map(|a| unsafe { CStr::from_ptr((a.error_string)(r)) }.to_string_lossy().into_owned())
        .unwrap_or_default();
    Err(Error::new(ErrorKind::Cuda, format!("{what}: NCCL error {r:?}: {text}")))
}

/// A new unique id (on the rank that creates the communicator), as bytes to broadcast.
pub fn unique_id() -> Result<Vec<u8>> {
    let a = api()?;
    let mut id = ncclUniqueId { internal: [0; 128] };
    // SAFETY: NCCL fills the local `id`, to which it gets the only pointer, during the call.
    check("ncclGetUniqueId", unsafe { (a.get_unique_id)(&mut id) })?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// An NCCL communicator of `nranks` GPUs, one per process.
pub struct Comm {
    raw: ncclComm_t,
    pub rank: usize,
}
// SAFETY: an NCCL communicator may be used from any thread (not from two at once); libdcp never
// dereferences the handle. Destroying it takes `&mut self` (drop).
unsafe impl Send for Comm {}
// SAFETY: the only `&self` methods that reach the communicator are `send` and `recv`, which are
// unsafe and require that no other thread uses it at the same time; `group` touches only
// NCCL's per-thread group state.
unsafe impl Sync for Comm {}

impl Comm {
    /// Collective over the `nranks` processes that call it with the same id; the calling
    /// thread's current device is used.
    pub fn init(id: &[u8], rank: usize, nranks: usize, device: i32) -> Result<Comm> {
        let a = api()?;
        super::activate(device)?;
        let mut uid = ncclUniqueId { internal: [0; 128] };
        if id.len() != uid.internal.len() {
            return Err(Error::comm("malformed NCCL unique id"));
        }
        for (d, s) in uid.internal.iter_mut().zip(id) {
            *d = *s as c_char;
        }
        let mut raw: ncclComm_t = std::ptr::null_mut();
        // SAFETY: NCCL writes the new communicator into the local `raw`; `uid` is passed by value
        // and the device was made current above.
        check("ncclCommInitRank", unsafe {
            (a.comm_init_rank)(&mut raw, nranks as c_int, uid, rank as c_int)
        })?;
        Ok(Comm { raw, rank })
    }

    /// Queues sending `len` bytes at device address `buf` to rank `peer`.
    ///
    /// # Safety
    /// `buf..buf + len` must be device memory of the current device that nothing writes until
    /// `stream` is synchronised, and no other thread may use this communicator meanwhile.
    pub unsafe fn send(&self, buf: u64, len: usize, peer: usize, stream: &super::Stream) -> Result<()> {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.p2p("ncclSend", |a| a.send, buf, len, peer, stream) }
    }

    /// Queues receiving `len` bytes from rank `peer` into device address `buf`.
    ///
    /// # Safety
    /// `buf..buf + len` must be device memory of the current device that nothing else reads or
    /// writes until `stream` is synchronised, and no other thread may use this communicator
    /// meanwhile.
    pub unsafe fn recv(&self, buf: u64, len: usize, peer: usize, stream: &super::Stream) -> Result<()> {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.p2p("ncclRecv", |a| a.recv, buf, len, peer, stream) }
    }

    /// # Safety
    /// As for `send` (for `f` = send) or `recv` (for `f` = recv).
    unsafe fn p2p(
        &self,
        what: &str,
        f: impl Fn(&Api) -> SendRecv,
        buf: u64,
        len: usize,
        peer: usize,
        stream: &super::Stream,
    ) -> Result<()> {
        let a = api()?;
        // SAFETY: the device range and exclusive use of the communicator are the caller's
        // contract; `self.raw` is live until drop, and `stream` keeps its stream alive while
        // borrowed here (NCCL only queues work on it).
        check(what, unsafe {
            f(a)(
                buf as *mut c_void,
                len,
                ncclDataType_t::ncclUint8,
                peer as c_int,
                self.raw,
                stream.raw_handle(),
            )
        })
    }

    /// Runs `f` (several sends and receives) as one NCCL group.
    pub fn group<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let a = api()?;
        // SAFETY: takes no arguments; it opens a group in this thread's NCCL state.
        check("ncclGroupStart", unsafe { (a.group_start)() })?;
        let r = f();
        // SAFETY: closes the group opened above on this thread (also after an error in `f`, so
        // the thread is not left inside a group).
        check("ncclGroupEnd", unsafe { (a.group_end)() })?;
        r
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        if let Ok(a) = api() {
            // SAFETY: `raw` came from ncclCommInitRank and is destroyed only here, once; `&mut
            // self` means no send or receive is being queued on it.
            unsafe {
                let _ = (a.comm_destroy)(self.raw);
            }
        }
    }
}
