//! Save, load and inspection: the operations a caller runs, built on planning, formats, storage
//! and communication.

pub mod checkpoint;
pub mod layout;
pub mod load;
pub mod save;
pub(crate) mod staging;
pub mod verify;
mod wire;
pub(crate) mod workers;

use crate::comm::local::LocalComm;
use crate::comm::Communicator;
use crate::error::{Error, ErrorKind, Result};
use crate::plan::save::GlobalPlan;
use std::sync::{Arc, Mutex};

pub use checkpoint::{Checkpoint, KeyInfo, KeyKind};
pub use load::DirectIo;
pub use load::{load, LoadOptions, LoadReport};
pub use save::{save, save_async, SaveFuture, SaveOptions};
pub use staging::PoolStats;

pub(crate) struct ContextInner {
    comm: Box<dyn Communicator>,
    /// The last global save plan, with the local-plan hashes of every rank it was built from.
    plan_cache: Mutex<Option<(Vec<u64>, Arc<GlobalPlan>)>>,
    /// Host buffers kept between operations (page-locked staging for the GPU path).
    pool: Mutex<staging::StagingPool>,
    /// The async save in flight, if any.
    in_flight: Mutex<Option<SaveFuture>>,
    /// Device buffers of snapshot saves, kept between saves.
    snapshots: Mutex<staging::SnapshotBuffers>,
    /// NCCL communicator over the job, made by the first load that broadcasts.
    nccl: Mutex<Option<Arc<crate::cuda::nccl::Comm>>>,
    /// Storage backend settings (S3 endpoint, credentials...), over the environment's.
    storage_options: Mutex<Vec<(String, String)>>,
}

/// One per process: the communicator of the job and what is kept between operations (the save
/// plan, staging buffers, the async save in flight). Cloning shares it.
#[derive(Clone)]
pub struct Context {
    inner: Arc<ContextInner>,
}

impl Context {
    /// A context for a job of one process.
    pub fn local() -> Context {
        Context::with_communicator(Box::new(LocalComm))
    }

    /// A context over `comm`, the job's collectives ([`TcpComm`](crate::comm::TcpComm), or a
    /// [`Communicator`] of the caller's own).
    pub fn with_communicator(comm: Box<dyn Communicator>) -> Context {
        Context {
            inner: Arc::new(ContextInner {
                comm,
                plan_cache: Mutex::new(None),
                pool: Mutex::new(staging::StagingPool::new()),
                in_flight: Mutex::new(None),
                snapshots: Mutex::new(Default::default()),
                nccl: Mutex::new(None),
                storage_options: Mutex::new(Vec::new()),
            }),
        }
    }

    /// This process's rank in the job.
    pub fn rank(&self) -> usize {
        self.inner.comm.rank()
    }
    /// Number of ranks in the job.
    pub fn world_size(&self) -> usize {
        self.inner.comm.world_size()
    }
    /// The job's communicator.
    pub fn communicator(&self) -> &dyn Communicator {
        self.inner.comm.as_ref()
    }

    /// Most page-locked host memory the staging pool may hold (default: half of RAM).
    pub fn set_staging_budget(&self, bytes: u64) {
        let mut pool = crate::error::lock(&self.inner.pool);
        pool.budget = bytes;
        pool.trim();
    }

    /// Sets a storage backend option for this context's saves and loads (for S3 the
    /// `object_store` configuration keys: `aws_endpoint`, `aws_access_key_id`, `aws_region`,
    /// `aws_allow_http`, `aws_virtual_hosted_style_request`, ...). Later values win.
    pub fn set_storage_option(&self, key: &str, value: &str) {
        let mut o = crate::error::lock(&self.inner.storage_options);
        o.retain(|(k, _)| k != key);
        o.push((key.to_string(), value.to_string()));
    }

    /// Opens a checkpoint location with this context's storage options.
    pub fn open_storage(&self, location: &str) -> Result<Arc<dyn crate::storage::Storage>> {
        let opts = crate::error::lock(&self.inner.storage_options).clone();
        crate::storage::open_with(location, &opts)
    }

    /// What the staging pool holds now.
    pub fn staging_stats(&self) -> PoolStats {
        crate::error::lock(&self.inner.pool).stats()
    }

    /// Device memory held for snapshot saves ([`SaveOptions::device_snapshot_bytes`]), in
    /// bytes: at most the largest budget a save used, per device.
    pub fn device_snapshot_bytes(&self) -> u64 {
        crate::error::lock(&self.inner.snapshots).bytes()
    }

    /// Frees the device memory kept for snapshot saves (after the async save in flight, if
    /// any, completes). The next snapshot save allocates again.
    pub fn release_device_snapshots(&self) {
        let _ = self.settle(true);
        crate::error::lock(&self.inner.snapshots).release();
    }

    /// Waits for the async save in flight (or fails with `Busy` when `wait` is false). Every
    /// collective operation settles first, so collectives never interleave. A stream-ordered
    /// save whose order is still pending is not committed (see [`SaveFuture`]).
    pub fn settle(&self, wait: bool) -> Result<()> {
        let current = crate::error::lock(&self.inner.in_flight).clone();
        if let Some(f) = current {
            if !f.finished() {
                if !wait {
                    return Err(Error::new(ErrorKind::Busy, "an async save is still in flight on this context"));
                }
                f.forget_order();
                let _ = f.wait();
            }
        }
        Ok(())
    }
}

/// The version string of this build ("libdcp 0.1.0").
pub fn writer_version() -> String {
    format!("libdcp {}", env!("CARGO_PKG_VERSION"))
}
