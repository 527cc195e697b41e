//! Save, load and inspection: the operations a caller runs, built on planning, formats, storage
//! and communication.

mod broadcast;
pub mod checkpoint;
pub mod future;
pub mod layout;
pub mod load;
pub mod read;
pub mod save;
pub mod staging;
pub mod verify;
mod wire;
mod write;

use crate::comm::local::LocalComm;
use crate::comm::Communicator;
use crate::error::{Error, ErrorKind, Result};
use crate::plan::save::GlobalPlan;
use std::sync::{Arc, Mutex};

pub use checkpoint::{Checkpoint, KeyInfo, KeyKind};
pub use future::SaveFuture;
pub use load::{load, LoadOptions, LoadReport};
pub use read::DirectIo;
pub use save::{save, save_async, SaveOptions, SaveReport};
pub use staging::PoolStats;

pub(crate) struct ContextInner {
    comm: Box<dyn Communicator>,
    /// The last global save plan, with the local-plan hashes of every rank it was built from.
    plan_cache: Mutex<Option<(Vec<u64>, Arc<GlobalPlan>)>>,
    /// Host buffers kept between operations (page-locked staging for the GPU path).
    pool: Mutex<staging::StagingPool>,
    /// The async save in flight, if any.
    in_flight: Mutex<Option<SaveFuture>>,
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

    pub fn with_communicator(comm: Box<dyn Communicator>) -> Context {
        Context {
            inner: Arc::new(ContextInner {
                comm,
                plan_cache: Mutex::new(None),
                pool: Mutex::new(staging::StagingPool::new()),
                in_flight: Mutex::new(None),
                nccl: Mutex::new(None),
                storage_options: Mutex::new(Vec::new()),
            }),
        }
    }

    pub fn rank(&self) -> usize {
        self.inner.comm.rank()
    }
    pub fn world_size(&self) -> usize {
        self.inner.comm.world_size()
    }
    pub fn communicator(&self) -> &dyn Communicator {
        self.inner.comm.as_ref()
    }

    /// Most page-locked host memory the staging pool may hold (default: half of RAM).
    pub fn set_staging_budget(&self, bytes: u64) {
        let mut pool = self.inner.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.budget = bytes;
        pool.trim();
    }

    /// Sets a storage backend option for this context's saves and loads (for S3 the
    /// `object_store` configuration keys: `aws_endpoint`, `aws_access_key_id`, `aws_region`,
    /// `aws_allow_http`, `aws_virtual_hosted_style_request`, ...). Later values win.
    pub fn set_storage_option(&self, key: &str, value: &str) {
        let mut o = self.inner.storage_options.lock().unwrap_or_else(|p| p.into_inner());
        o.retain(|(k, _)| k != key);
        o.push((key.to_string(), value.to_string()));
    }

    /// Opens a checkpoint location with this context's storage options.
    pub fn open_storage(&self, location: &str) -> Result<Arc<dyn crate::storage::Storage>> {
        let opts = self.inner.storage_options.lock().unwrap_or_else(|p| p.into_inner()).clone();
        crate::storage::open_with(location, &opts)
    }

    /// What the staging pool holds now.
    pub fn staging_stats(&self) -> PoolStats {
        self.inner.pool.lock().unwrap_or_else(|p| p.into_inner()).stats()
    }

    /// Waits for the async save in flight (or fails with `Busy` when `wait` is false). Every
    /// collective operation settles first, so collectives never interleave.
    pub fn settle(&self, wait: bool) -> Result<()> {
        let current = self.inner.in_flight.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(f) = current {
            if !f.is_done() {
                if !wait {
                    return Err(Error::new(ErrorKind::Busy, "an async save is still in flight on this context"));
                }
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
