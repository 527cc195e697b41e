//! CUDA devices seen from the host side of staging: the streams a thread copies on, waiting for
//! the caller's queued work, and bringing a strided device view's memory over.

use super::arena::HostBuf;
use super::pool::{PoolBuf, StagingPool};
use crate::cuda;
use crate::error::Result;
use crate::tensor::{strided_extent_bytes, Device, TensorView};
use std::sync::Mutex;

/// Streams of the CUDA devices one thread copies from or to (the caller's, or its own).
#[derive(Default)]
pub(crate) struct DeviceStreams {
    own: Vec<(i32, cuda::Stream)>,
}

impl DeviceStreams {
    /// Activates `ordinal` on this thread and returns the stream to copy on: the caller's
    /// registered stream (`caller != 0`), else one of this thread's own.
    pub(crate) fn get(&mut self, ordinal: i32, caller: usize) -> Result<cuda::Stream> {
        cuda::activate(ordinal)?;
        if caller != 0 {
            // SAFETY: `caller` is the `cudaStream_t` registered with the tensor
            // (`dcp_state_set_cuda`), on which the caller asks libdcp to queue its copies: it
            // must stay alive while a save or load uses the state, and this `Stream` lives only
            // within one. (`State::set_cuda` is safe and takes any value: see its docs.)
            return Ok(unsafe { cuda::Stream::borrowed(caller) });
        }
        if let Some((_, s)) = self.own.iter().find(|(o, _)| *o == ordinal) {
            return Ok(s.clone());
        }
        let s = cuda::Stream::new(ordinal)?;
        self.own.push((ordinal, s.clone()));
        Ok(s)
    }
}

/// Streams with device copies queued into (or out of) host buffers: synchronised when this is
/// dropped, so that on an early error return no buffer goes back to its pool (or is freed)
/// while a copy still reads or writes it. Declare it after the buffers, so it drops first.
#[derive(Default)]
pub(crate) struct SyncOnDrop(pub(crate) Vec<cuda::Stream>);

impl Drop for SyncOnDrop {
    fn drop(&mut self) {
        for s in &self.0 {
            let _ = s.synchronize();
        }
    }
}

/// The first CUDA device among `views` (the device host buffers are page-locked through).
pub(crate) fn first_cuda_device<'v, 'a: 'v>(views: impl IntoIterator<Item = &'v TensorView<'a>>) -> Option<i32> {
    views.into_iter().find_map(|v| match v.device() {
        Device::Cuda(o) => Some(o),
        Device::Cpu => None,
    })
}

/// Waits for the work queued on the devices of CUDA tensors registered without a stream, so
/// copies see the caller's finished results.
pub(crate) fn sync_devices<'v, 'a: 'v>(views: impl IntoIterator<Item = &'v TensorView<'a>>) -> Result<()> {
    let mut done = Vec::new();
    for v in views {
        if let Device::Cuda(o) = v.device() {
            if v.stream() == 0 && !done.contains(&o) {
                cuda::synchronize_device(o)?;
                done.push(o);
            }
        }
    }
    Ok(())
}

/// Copies the whole memory extent of a strided device view (on `stream`, device `ordinal`) into
/// a page-locked pool buffer and calls `f(buffer, extent bytes)`: the view's elements lie in
/// it at their strides from its start.
pub(crate) fn with_host_extent<R>(
    pool: &Mutex<StagingPool>,
    stream: &cuda::Stream,
    view: &TensorView,
    ordinal: i32,
    f: impl FnOnce(&HostBuf, usize) -> Result<R>,
) -> Result<R> {
    let extent = strided_extent_bytes(view.sizes(), view.strides(), view.dtype().size())? as usize;
    let mut host = PoolBuf::acquire(pool, extent, Some(ordinal))?;
    // SAFETY: the view is CUDA memory of device `ordinal` (current: the caller got `stream`
    // from `DeviceStreams::get`), its strided extent checked by `set_cuda` to lie in one
    // allocation of that device; `extent` bytes of the host buffer are exclusively borrowed for
    // the copy, and nothing touches the buffer before the synchronize below.
    unsafe { stream.d2h(host.bytes_mut(extent), view.as_ptr() as u64)? };
    stream.synchronize()?;
    f(&host, extent)
}
