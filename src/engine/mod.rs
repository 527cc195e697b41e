//! Save, load and inspection: the operations a caller runs, built on planning, formats, storage
//! and communication.

pub mod checkpoint;
pub mod load;
mod read;
pub mod save;
pub mod verify;
mod wire;
mod write;

use crate::comm::local::LocalComm;
use crate::comm::Communicator;
use crate::plan::save::GlobalPlan;
use std::sync::{Arc, Mutex};

pub use checkpoint::{Checkpoint, KeyInfo, KeyKind};
pub use load::{load, LoadOptions, LoadReport};
pub use save::{save, SaveOptions, SaveReport};

/// One per process: the communicator of the job and what is cached between saves.
pub struct Context {
    comm: Box<dyn Communicator>,
    /// The last global save plan, with the local-plan hashes of every rank it was built from.
    plan_cache: Mutex<Option<(Vec<u64>, Arc<GlobalPlan>)>>,
}

impl Context {
    /// A context for a job of one process.
    pub fn local() -> Context {
        Context::with_communicator(Box::new(LocalComm))
    }

    pub fn with_communicator(comm: Box<dyn Communicator>) -> Context {
        Context {
            comm,
            plan_cache: Mutex::new(None),
        }
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }
    pub fn communicator(&self) -> &dyn Communicator {
        self.comm.as_ref()
    }
}

/// The version string of this build ("libdcp 0.1.0").
pub fn writer_version() -> String {
    format!("libdcp {}", env!("CARGO_PKG_VERSION"))
}
