//! libdcp: distributed checkpoints in PyTorch DCP's on-disk format, with a C ABI.
//!
//! The safe Rust API is public for Rust users: build a [`State`] of borrowed tensors and owned
//! values, then [`save`] or [`load`] with a [`Context`]; open a checkpoint read-only with
//! [`Checkpoint`]. The C API in [`ffi`] is a thin layer over the same functions.

pub mod comm;
pub mod cuda;
pub mod engine;
pub mod error;
pub mod ffi;
pub mod format;
pub mod mesh;
pub mod plan;
pub mod region;
pub mod state;
pub mod storage;
pub mod tensor;

pub use engine::verify::{verify, verify_with_options, verify_with_progress, Problem, VerifyOptions, VerifyReport};
pub use engine::{
    writer_version, load, save, save_async, Checkpoint, Context, DirectIo, KeyInfo, KeyKind, LoadOptions, LoadReport, SaveFuture, SaveOptions, SaveReport,
};
pub use error::{Error, ErrorKind, Result};
pub use format::pyobj::{ObjectValue, PyValue};
pub use mesh::{DeviceMesh, Placement};
pub use region::Region;
pub use state::State;
pub use tensor::{DType, Device, TensorView};
