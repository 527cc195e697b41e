//! libdcp: distributed checkpoints in PyTorch DCP's on-disk format, with a C ABI.
//!
//! Build a [`State`] of borrowed tensors and owned values, then [`save`] or [`load`] it with a
//! [`Context`] (one per process: the job's communicator and what is kept between operations).
//! [`Checkpoint`] opens a checkpoint read-only, [`verify`] checks one. A checkpoint written here is
//! one `torch.distributed.checkpoint.load` reads, and the other way round. Errors are [`Error`]s:
//! a [kind](ErrorKind), a message, and where known the key, file and offset they concern.
//!
//! The [`storage`] and [`comm`] modules are there to be extended: a [`storage::Storage`] backend,
//! a [`comm::Communicator`] for a job's ranks. The C API (`include/dcp.h`) is a thin layer over the
//! same functions.
//!
//! ```
//! use dcp::{load, save, Context, LoadOptions, SaveOptions, State, TensorView};
//!
//! # fn main() -> dcp::Result<()> {
//! let dir = std::env::temp_dir().join(format!("libdcp-doc-{}", std::process::id()));
//! let location = dir.to_str().unwrap();
//! let ctx = Context::local();
//!
//! let weights: Vec<f32> = (0..12).map(|i| i as f32 * 0.5).collect();
//! let mut state = State::new();
//! state.add_tensor("model.w", TensorView::from_slice(&weights, &[3, 4])?)?;
//! state.add_int("step", 100)?;
//! save(&ctx, &state, location, &SaveOptions::default())?;
//!
//! // Load into a buffer that holds something else, so that the comparison can fail.
//! let mut back = vec![f32::NAN; 12];
//! let mut state = State::new();
//! state.add_tensor("model.w", TensorView::from_slice_mut(&mut back, &[3, 4])?)?;
//! load(&ctx, &mut state, location, &LoadOptions::default())?;
//! drop(state);
//! assert_eq!(
//!     back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
//!     weights.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
//! );
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]
#![warn(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

/// Declares modules that are private to the crate, or public (and hidden from the documentation)
/// under the `internals` feature, which the crate's own integration tests, examples and fuzz
/// targets enable to reach formats and planning directly. Not part of the API.
macro_rules! internal_mod {
    ($($name:ident),* $(,)?) => {$(
        #[cfg(feature = "internals")]
        #[doc(hidden)]
        pub mod $name;
        #[cfg(not(feature = "internals"))]
        pub(crate) mod $name;
    )*};
}
pub(crate) use internal_mod;

pub mod comm;
pub mod storage;

mod cuda;
mod host;
internal_mod!(engine, error, format, mesh, plan, region, state, tensor);

mod ffi;
mod manager;

pub use engine::verify::{verify, verify_with_options, verify_with_progress, Problem, VerifyOptions, VerifyReport};
// The functions by their modules' paths: `engine::{load, save}` would re-export the modules too.
pub use engine::load::{load, LoadOptions, LoadReport};
pub use engine::save::{save, save_async, SaveOptions, SaveReport, StagingReport};
pub use engine::{writer_version, Checkpoint, Context, DirectIo, KeyInfo, KeyKind, PoolStats, SaveFuture};
pub use error::{Error, ErrorKind, Result};
pub use format::pyobj::{ObjectValue, PyValue};
pub use manager::{CheckpointManager, Damage, ManagerPolicy, Resume, Skipped, StepHealth, StepStatus, DEFAULT_LEASE_SECONDS};
pub use mesh::{DeviceMesh, Placement};
pub use region::Region;
pub use state::State;
pub use tensor::{DType, Device, Element, TensorView};
