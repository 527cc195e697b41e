//! CUDA through cudarc's driver API, loaded at run time: libdcp builds and runs on machines
//! without CUDA, where registering a CUDA tensor is a clear error. Work runs in each device's
//! primary context, the one LibTorch and the runtime API use.

pub mod nccl;

use crate::error::{Error, ErrorKind, Result};
use cudarc::driver::{result, sys};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

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
        // SAFETY: this only tries to dlopen libcuda by its usual names (and closes it again);
        // loading runs the driver library's initialisers, which have no preconditions on us.
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
// SAFETY: a CUcontext is an opaque driver handle that libdcp never dereferences; the driver API
// is thread-safe and a primary context may be made current on any thread.
unsafe impl Send for Primary {}
// SAFETY: as above: `&Primary` only copies the handle out.
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
    // SAFETY: `dev` was just returned by cuDeviceGet for an ordinal checked to exist. The
    // retained context is never released: `CTXS` keeps it for the life of the process.
    let ctx = unsafe { result::primary_ctx::retain(dev) }.map_err(|e| cuda_err("cuDevicePrimaryCtxRetain", e))?;
    map.insert(ordinal, Primary(ctx));
    Ok(ctx)
}

/// Makes device `ordinal`'s primary context current on this thread.
pub fn activate(ordinal: i32) -> Result<()> {
    let ctx = primary(ordinal)?;
    // SAFETY: `ctx` is a primary context retained by `primary` and never released.
    unsafe { result::ctx::set_current(ctx) }.map_err(|e| cuda_err("cuCtxSetCurrent", e))
}

/// Checks that `[ptr, ptr + len)` is device memory of device `ordinal`.
pub fn check_device_range(ordinal: i32, ptr: u64, len: u64) -> Result<()> {
    activate(ordinal)?;
    if len == 0 {
        return Ok(());
    }
    // Each call below passes a pointer to a local of the attribute's C type (int for the device
    // ordinal, CUdeviceptr for the start address, size_t for the size).
    let attr = |a: sys::CUpointer_attribute, out: *mut c_void| {
        // SAFETY: `out` points to a live local of the type the driver writes for `a` (see
        // above); `ptr` is only looked up, never dereferenced.
        unsafe { sys::cuPointerGetAttribute(out, a, ptr).result() }
    };
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
    let mut buf = [0u8; 64];
    // SAFETY: the driver writes at most `buf.len()` bytes (the id and its NUL) into the local
    // array.
    unsafe { sys::cuDeviceGetPCIBusId(buf.as_mut_ptr().cast(), buf.len() as i32, dev).result() }
        .map_err(|e| cuda_err("cuDeviceGetPCIBusId", e))?;
    // Read up to the NUL within the array (none at all would be a driver bug: then it is empty).
    let bus = std::ffi::CStr::from_bytes_until_nul(&buf)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default();
    let host = crate::host::hostname();
    Ok(format!("{host}/{bus}"))
}

/// Waits for all work queued on the current thread's device.
pub fn synchronize_device(ordinal: i32) -> Result<()> {
    activate(ordinal)?;
    // SAFETY: takes no pointers; `activate` made the device's primary context current.
    unsafe { sys::cuCtxSynchronize().result() }.map_err(|e| cuda_err("cuCtxSynchronize", e))
}

/// A stream: the caller's (borrowed) or one libdcp created, shared by its clones and destroyed
/// when the last of them is dropped (so no clone outlives the stream).
#[derive(Clone)]
pub struct Stream {
    raw: sys::CUstream,
    _owner: Option<Arc<OwnedStream>>,
}
// SAFETY: a CUstream is an opaque driver handle, never dereferenced here; the driver allows
// queueing work on and synchronizing a stream from any thread.
unsafe impl Send for Stream {}
// SAFETY: as above; `&Stream` only passes the handle to the (thread-safe) driver.
unsafe impl Sync for Stream {}

/// A stream libdcp created; destroyed on drop.
struct OwnedStream(sys::CUstream);
// SAFETY: as for `Stream`.
unsafe impl Send for OwnedStream {}
// SAFETY: as for `Stream`.
unsafe impl Sync for OwnedStream {}

impl Stream {
    /// The caller's stream; its work is ordered before the copies libdcp queues on it.
    ///
    /// # Safety
    /// `raw` must be a live `CUstream` of the context current when the stream is used (or 0,
    /// the legacy default stream), and must not be destroyed while the returned `Stream` lives.
    pub unsafe fn borrowed(raw: usize) -> Stream {
        Stream {
            raw: raw as sys::CUstream,
            _owner: None,
        }
    }
    /// A new non-blocking stream on the current device.
    pub fn new(ordinal: i32) -> Result<Stream> {
        activate(ordinal)?;
        let raw = result::stream::create(result::stream::StreamKind::NonBlocking).map_err(|e| cuda_err("cuStreamCreate", e))?;
        Ok(Stream {
            raw,
            _owner: Some(Arc::new(OwnedStream(raw))),
        })
    }
    pub(crate) fn raw_handle(&self) -> *mut c_void {
        self.raw as *mut c_void
    }
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: `raw` is live: created by `new` and destroyed only when the last clone
        // (this one among them) drops its `_owner`, or borrowed under `borrowed`'s contract.
        unsafe { result::stream::synchronize(self.raw) }.map_err(|e| cuda_err("cuStreamSynchronize", e))
    }
    /// Queues a device-to-host copy.
    ///
    /// # Safety
    /// `src` must be device memory of at least `dst.len()` bytes, readable on this stream's
    /// device. The copy writes `dst` asynchronously: it must stay allocated, and nothing may read
    /// or write it, until the stream is synchronised.
    pub unsafe fn d2h(&self, dst: &mut [u8], src: u64) -> Result<()> {
        // SAFETY: the caller guarantees the source range and `dst`'s lifetime and exclusivity
        // until the synchronize; `raw` is live (see `synchronize`).
        unsafe { result::memcpy_dtoh_async(dst, src, self.raw) }
            .map_err(|e| cuda_err(&format!("copying {} bytes from device memory 0x{src:x}", dst.len()), e))
    }
    /// Queues a host-to-device copy.
    ///
    /// # Safety
    /// `dst` must be device memory of at least `src.len()` bytes, writable on this stream's
    /// device and not used by anyone else meanwhile. The copy reads `src` asynchronously: it must
    /// stay allocated and unchanged until the stream is synchronised.
    pub unsafe fn h2d(&self, dst: u64, src: &[u8]) -> Result<()> {
        // SAFETY: the caller guarantees the destination range and `src`'s lifetime until the
        // synchronize; `raw` is live (see `synchronize`).
        unsafe { result::memcpy_htod_async(dst, src, self.raw) }
            .map_err(|e| cuda_err(&format!("copying {} bytes to device memory 0x{dst:x}", src.len()), e))
    }
}

impl Stream {
    /// Makes this stream wait (on the GPU, without blocking the CPU) for the work captured by
    /// `event`.
    pub fn wait(&self, event: &Event) -> Result<()> {
        // SAFETY: `raw` is live (see `synchronize`); `event.raw` lives as long as `event`.
        unsafe { result::stream::wait_event(self.raw, event.raw, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }
            .map_err(|e| cuda_err("cuStreamWaitEvent", e))
    }
    /// Queues a device-to-device copy of `len` bytes.
    ///
    /// # Safety
    /// `src` and `dst` must be device memory of this stream's device of at least `len` bytes
    /// each, not overlapping; nothing else may write `dst` (or free either) until the copy is
    /// known done (an event recorded after it completes, or the stream synchronised).
    pub unsafe fn d2d(&self, dst: u64, src: u64, len: usize) -> Result<()> {
        // SAFETY: the caller guarantees both ranges and their lifetimes; `raw` is live.
        unsafe { result::memcpy_dtod_async(dst, src, len, self.raw) }
            .map_err(|e| cuda_err(&format!("copying {len} bytes from device memory 0x{src:x} to 0x{dst:x}"), e))
    }
}

/// A CUDA event (without timing), destroyed on drop: marks a point in a stream that other
/// streams and the host can wait for.
pub struct Event {
    raw: sys::CUevent,
}
// SAFETY: a CUevent is an opaque driver handle, never dereferenced here; the driver allows
// recording, waiting for and querying an event from any thread.
unsafe impl Send for Event {}
// SAFETY: as above.
unsafe impl Sync for Event {}

impl Event {
    /// A new event in device `ordinal`'s primary context.
    pub fn new(ordinal: i32) -> Result<Event> {
        activate(ordinal)?;
        let raw = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(|e| cuda_err("cuEventCreate", e))?;
        Ok(Event { raw })
    }
    /// Captures the work queued on `stream` so far.
    pub fn record(&self, stream: &Stream) -> Result<()> {
        // SAFETY: both handles are live (the event until dropped, the stream see `synchronize`).
        unsafe { result::event::record(self.raw, stream.raw) }.map_err(|e| cuda_err("cuEventRecord", e))
    }
    /// Blocks until the captured work is done.
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: `raw` is a live event (destroyed only on drop).
        unsafe { result::event::synchronize(self.raw) }.map_err(|e| cuda_err("cuEventSynchronize", e))
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created by `Event::new`, destroyed only here; the driver lets an event be
        // destroyed before it completes (its resources are released at completion).
        unsafe {
            let _ = result::event::destroy(self.raw);
        }
    }
}

/// Device memory allocated by libdcp (`cuMemAlloc`), freed on drop.
pub struct DeviceBuf {
    ptr: sys::CUdeviceptr,
    len: usize,
    ordinal: i32,
}
// SAFETY: the allocation is owned outright and only reached through the driver with its
// address; the driver API is thread-safe.
unsafe impl Send for DeviceBuf {}
// SAFETY: as above: `&DeviceBuf` gives only the address and length.
unsafe impl Sync for DeviceBuf {}

impl DeviceBuf {
    /// Allocates `len` bytes on device `ordinal`.
    pub fn new(len: usize, ordinal: i32) -> Result<DeviceBuf> {
        activate(ordinal)?;
        // SAFETY: allocates fresh device memory in the context made current above; it is only
        // ever used as the destination and source of byte copies.
        let ptr = unsafe { result::malloc_sync(len.max(1)) }
            .map_err(|e| cuda_err(&format!("allocating {len} bytes of device memory on CUDA device {ordinal}"), e))?;
        Ok(DeviceBuf { ptr, len, ordinal })
    }
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn ordinal(&self) -> i32 {
        self.ordinal
    }
}

impl Drop for DeviceBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `malloc_sync` in `new` and is freed only here, once. Its
        // owners drop it only after the copies using it are done (the save that used it has
        // completed); cuMemFree also waits for work on the device.
        unsafe {
            let _ = activate(self.ordinal);
            let _ = result::free_sync(self.ptr);
        }
    }
}

impl Drop for OwnedStream {
    fn drop(&mut self) {
        // SAFETY: the stream was created by `Stream::new` and is destroyed only here, once, after
        // its queued copies finish: every `Stream` using it holds this `Arc`, so none is left.
        unsafe {
            let _ = result::stream::synchronize(self.0);
            let _ = result::stream::destroy(self.0);
        }
    }
}

/// Page-locked host memory (fast, asynchronous copies to and from the GPU; 4096-aligned, so
/// also usable for O_DIRECT).
pub struct PinnedBuf {
    ptr: *mut u8,
    len: usize,
}
// SAFETY: PinnedBuf owns its allocation outright (the fields are private and no other handle to
// it exists); its memory is only reached through `HostBuf`'s `&self`/`&mut self` accessors, so
// the borrow rules govern access from any thread. Page-locked memory is not tied to a thread.
unsafe impl Send for PinnedBuf {}
// SAFETY: as above: `&PinnedBuf` gives only the pointer and length.
unsafe impl Sync for PinnedBuf {}

impl PinnedBuf {
    /// Allocates through device `ordinal`'s primary context (PORTABLE: usable with every
    /// device), so a process that uses one GPU creates no context on another.
    pub fn new(len: usize, ordinal: i32) -> Result<PinnedBuf> {
        activate(ordinal)?;
        // SAFETY: allocates fresh memory through the context `activate` made current; the bytes
        // are only reached as `u8`s (every bit pattern valid), through `HostBuf`.
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
        // SAFETY: `ptr` came from `malloc_host` in `new` (non-null on success) and is freed only
        // here, once; slices of it borrow `self`, so none outlives this.
        unsafe {
            let _ = result::free_host(self.ptr as *mut c_void);
        }
    }
}
