//! Byte formats: pickles, `.metadata`, torch.save zip items, the `.libdcp` sidecar.

pub mod json;
pub mod metadata;
pub mod pickle;
pub mod pickle_scan;
pub mod pyobj;
pub mod safetensors;
pub mod sidecar;
pub mod zipitem;
