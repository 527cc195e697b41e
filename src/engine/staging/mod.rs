//! Staging: the host buffers bytes pass through between caller memory (host or CUDA) and
//! storage, the pool that keeps them across operations, the device side of those copies, and
//! the strided gather into dense payloads.

mod arena;
mod device;
mod gather;
mod ordered;
mod pool;

pub use arena::{HostBuf, ALIGN};
pub(crate) use device::{first_cuda_device, sync_devices, with_host_extent, DeviceStreams, SyncOnDrop};
pub(crate) use ordered::{launch as launch_deferred, DeferredBytes, DeferredCopy, InFlightCopies, SnapshotBuffers};
pub(crate) use gather::{copy_contiguous_piece, copy_dense, HostGather};
pub(crate) use pool::PoolBuf;
pub use pool::{PoolStats, StagingPool};
