//! CUDA through cudarc's driver API, loaded at run time: libdcp builds and runs on machines
//! without CUDA, where registering a CUDA tensor is a clear error. Work runs in each device's
//! primary context, the one LibTorch and the runtime API use.

pub mod nccl;

use crate::error::{Error, ErrorKind, Result};
use cudarc::driver::{result, sys};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Mutex, OnceLock};

fn cuda_err(what: &str, e: result::DriverError) -> Error {
    let text = e
        .error_string()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0));
    Error::new(ErrorKind::Cuda, format!("{what}: {text}"))
}

/// Loads and initialises the driver once; an error when this machine has no usable CUDA.
pub fn driver() -> Result<()> {
    static INIT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| {
        // cudarc panics when the library is missing: look first.
        if !unsafe { sys::is_culib_present() } {
            return Err("the CUDA driver library (libcuda.so) is not installed on this machine".into());
        }
        result::init().map_err(|e| cuda_err("cuInit", e).message().to_string())
    })
    .clone()
    .map_err(Error::unsupported)
}

pub fn available() -> bool {
    driver().is_ok()
}

#[derive(Clone, Copy)]
struct Primary(sys::CUcontext);
unsafe impl Send for Primary {}
unsafe impl Sync for Primary {}

fn primary(ordinal: i32) -> Result<sys::CUcontext> {
    driver()?;
    static CTXS: OnceLock<Mutex<HashMap<i32, Primary>>> = OnceLock::new();
    let mut map = crate::error::lock(CTXS.get_or_init(Default::default));
    if let Some(p) = map.get(&ordinal) {
        return Ok(p.0);
    }
    let count = result::device::get_count().map_err(|e| cuda_err("cuDeviceGetCount", e))?;
    if ordinal < 0 || ordinal >= count {
        return Err(Error::invalid(format!(
            "CUDA device {ordinal} does not exist (this machine has {count})"
        )));
    }
    let dev = result::device::get(ordinal).map_err(|e| cuda_err("cuDeviceGet", e))?;
    let ctx = unsafe { result::primary_ctx::retain(dev) }.map_err(|e| cuda_err("cuDevicePrimaryCtxRetain", e))?;
    map.insert(ordinal, Primary(ctx));
    Ok(ctx)
}

/// Makes device `ordinal`'s primary context current on this thread.
pub fn activate(ordinal: i32) -> Result<()> {
    let ctx = primary(ordinal)?;
    unsafe { result::ctx::set_current(ctx) }.map_err(|e| cuda_err("cuCtxSetCurrent", e))
}

/// Checks that `[ptr, ptr + len)` is device memory of device `ordinal`.
pub fn check_device_range(ordinal: i32, ptr: u64, len: u64) -> Result<()> {
    activate(ordinal)?;
    if len == 0 {
        return Ok(());
    }
    let attr = |a: sys::CUpointer_attribute, out: *mut c_void| unsafe { sys::cuPointerGetAttribute(out, a, ptr).result() };
    let mut dev: i32 = -1;
    attr(
        sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
        &mut dev as *mut i32 as *mut c_void,
    )
    .map_err(|e| cuda_err(&format!("pointer 0x{ptr:x} is not CUDA memory (cuPointerGetAttribute)"), e))?;
    if dev != ordinal {
        return Err(Error::invalid(format!(
            "pointer 0x{ptr:x} is memory of CUDA device {dev}, not of device {ordinal}"
        )));
    }
    let mut start: u64 = 0;
    let mut size: usize = 0;
    attr(
        sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
        &mut start as *mut u64 as *mut c_void,
    )
    .map_err(|e| cuda_err("cuPointerGetAttribute", e))?;
    attr(
        sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_SIZE,
        &mut size as *mut usize as *mut c_void,
    )
    .map_err(|e| cuda_err("cuPointerGetAttribute", e))?;
    if ptr + len > start + size as u64 {
        return Err(Error::invalid(format!(
            "the tensor needs {len} bytes from 0x{ptr:x}, but its CUDA allocation ends at 0x{:x} ({} bytes short)",
            start + size as u64,
            ptr + len - start - size as u64
        )));
    }
    Ok(())
}

/// A name for the physical device behind `ordinal`: its PCI bus id, prefixed by the host name
/// (ordinals differ between processes with different `CUDA_VISIBLE_DEVICES`).
pub fn physical_id(ordinal: i32) -> Result<String> {
    driver()?;
    let dev = result::device::get(ordinal).map_err(|e| cuda_err("cuDeviceGet", e))?;
    let mut buf = [0 as std::ffi::c_char; 64];
    unsafe { sys::cuDeviceGetPCIBusId(buf.as_mut_ptr(), buf.len() as i32, dev).result() }
        .map_err(|e| cuda_err("cuDeviceGetPCIBusId", e))?;
    let bus = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
    let mut host = [0u8; 256];
    unsafe { libc::gethostname(host.as_mut_ptr() as *mut std::ffi::c_char, host.len()) };
    let host = String::from_utf8_lossy(&host[..host.iter().position(|&b| b == 0).unwrap_or(0)]).into_owned();
    Ok(format!("{host}/{bus}"))
}

/// Waits for all work queued on the current thread's device.
pub fn synchronize_device(ordinal: i32) -> Result<()> {
    activate(ordinal)?;
    unsafe { sys::cuCtxSynchronize().result() }.map_err(|e| cuda_err("cuCtxSynchronize", e))
}

/// A stream: the caller's (borrowed) or one libdcp created (destroyed on drop).
pub struct Stream {
    raw: sys::CUstream,
    owned: bool,
}
unsafe impl Send for Stream {}
unsafe impl Sync for Stream {}

impl Stream {
    /// The caller's stream; its work is ordered before the copies libdcp queues on it.
    pub fn borrowed(raw: usize) -> Stream {
        Stream {
            raw: raw as sys::CUstream,
            owned: false,
        }
    }
    /// A new non-blocking stream on the current device.
    pub fn new(ordinal: i32) -> Result<Stream> {
        activate(ordinal)?;
        let raw = result::stream::create(result::stream::StreamKind::NonBlocking).map_err(|e| cuda_err("cuStreamCreate", e))?;
        Ok(Stream { raw, owned: true })
    }
    pub(crate) fn raw_handle(&self) -> *mut c_void {
        self.raw as *mut c_void
    }
    pub fn synchronize(&self) -> Result<()> {
        unsafe { result::stream::synchronize(self.raw) }.map_err(|e| cuda_err("cuStreamSynchronize", e))
    }
    /// Queues a device-to-host copy.
    ///
    /// # Safety
    /// `src` must be device memory of at least `dst.len()` bytes, and `dst` must stay valid until
    /// the stream is synchronised.
    pub unsafe fn d2h(&self, dst: &mut [u8], src: u64) -> Result<()> {
        result::memcpy_dtoh_async(dst, src, self.raw)
            .map_err(|e| cuda_err(&format!("copying {} bytes from device memory 0x{src:x}", dst.len()), e))
    }
    /// Queues a host-to-device copy.
    ///
    /// # Safety
    /// `dst` must be device memory of at least `src.len()` bytes; `src` must stay valid until
    /// the stream is synchronised.
    pub unsafe fn h2d(&self, dst: u64, src: &[u8]) -> Result<()> {
        result::memcpy_htod_async(dst, src, self.raw)
            .map_err(|e| cuda_err(&format!("copying {} bytes to device memory 0x{dst:x}", src.len()), e))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.owned {
            unsafe {
                let _ = result::stream::synchronize(self.raw);
                let _ = result::stream::destroy(self.raw);
            }
        }
    }
}

/// Page-locked host memory (fast, asynchronous copies to and from the GPU; 4096-aligned, so
/// also usable for O_DIRECT).
pub struct PinnedBuf {
    ptr: *mut u8,
    len: usize,
}
unsafe impl Send for PinnedBuf {}
unsafe impl Sync for PinnedBuf {}

impl PinnedBuf {
    /// Allocates through device `ordinal`'s primary context (PORTABLE: usable with every
    /// device), so a process that uses one GPU creates no context on another.
    pub fn new(len: usize, ordinal: i32) -> Result<PinnedBuf> {
        activate(ordinal)?;
        let ptr = unsafe { result::malloc_host(len.max(1), sys::CU_MEMHOSTALLOC_PORTABLE) }
            .map_err(|e| cuda_err(&format!("allocating {len} bytes of pinned host memory"), e))?;
        Ok(PinnedBuf { ptr: ptr as *mut u8, len })
    }
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        unsafe {
            let _ = result::free_host(self.ptr as *mut c_void);
        }
    }
}
