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
            match unsafe { libloading::Library::new(name) } {
                Ok(lib) => unsafe {
                    let sym = |n: &str| -> std::result::Result<*const (), String> {
                        lib.get::<*const ()>(n.as_bytes())
                            .map(|s| *s)
                            .map_err(|e| format!("{name} lacks {n}: {e}"))
                    };
                    let api = Api {
                        get_unique_id: std::mem::transmute::<*const (), GetUniqueId>(sym("ncclGetUniqueId")?),
                        comm_init_rank: std::mem::transmute::<*const (), CommInitRank>(sym("ncclCommInitRank")?),
                        comm_destroy: std::mem::transmute::<*const (), CommDestroy>(sym("ncclCommDestroy")?),
                        send: std::mem::transmute::<*const (), SendRecv>(sym("ncclSend")?),
                        recv: std::mem::transmute::<*const (), SendRecv>(sym("ncclRecv")?),
                        error_string: std::mem::transmute::<*const (), GetErrorString>(sym("ncclGetErrorString")?),
                        group_start: std::mem::transmute::<*const (), Group>(sym("ncclGroupStart")?),
                        group_end: std::mem::transmute::<*const (), Group>(sym("ncclGroupEnd")?),
                        _lib: lib,
                    };
                    return Ok(api);
                },
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

pub fn available() -> bool {
    super::available() && api().is_ok()
}

fn check(what: &str, r: ncclResult_t) -> Result<()> {
    if r == ncclResult_t::ncclSuccess {
        return Ok(());
    }
    let text = api()
        .ok()
        .map(|a| unsafe { CStr::from_ptr((a.error_string)(r)) }.to_string_lossy().into_owned())
        .unwrap_or_default();
    Err(Error::new(ErrorKind::Cuda, format!("{what}: NCCL error {r:?}: {text}")))
}

/// A new unique id (on the rank that creates the communicator), as bytes to broadcast.
pub fn unique_id() -> Result<Vec<u8>> {
    let a = api()?;
    let mut id = ncclUniqueId { internal: [0; 128] };
    check("ncclGetUniqueId", unsafe { (a.get_unique_id)(&mut id) })?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// An NCCL communicator of `nranks` GPUs, one per process.
pub struct Comm {
    raw: ncclComm_t,
    pub rank: usize,
}
unsafe impl Send for Comm {}
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
        check("ncclCommInitRank", unsafe {
            (a.comm_init_rank)(&mut raw, nranks as c_int, uid, rank as c_int)
        })?;
        Ok(Comm { raw, rank })
    }

    /// Queues sending `len` bytes at device address `buf` to rank `peer`.
    pub fn send(&self, buf: u64, len: usize, peer: usize, stream: &super::Stream) -> Result<()> {
        self.p2p("ncclSend", |a| a.send, buf, len, peer, stream)
    }

    /// Queues receiving `len` bytes from rank `peer` into device address `buf`.
    pub fn recv(&self, buf: u64, len: usize, peer: usize, stream: &super::Stream) -> Result<()> {
        self.p2p("ncclRecv", |a| a.recv, buf, len, peer, stream)
    }

    fn p2p(&self, what: &str, f: impl Fn(&Api) -> SendRecv, buf: u64, len: usize, peer: usize, stream: &super::Stream) -> Result<()> {
        let a = api()?;
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
        check("ncclGroupStart", unsafe { (a.group_start)() })?;
        let r = f();
        check("ncclGroupEnd", unsafe { (a.group_end)() })?;
        r
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        if let Ok(a) = api() {
            unsafe {
                let _ = (a.comm_destroy)(self.raw);
            }
        }
    }
}
