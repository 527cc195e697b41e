//! Byte formats: pickles, `.metadata`, torch.save zip items, the `.libdcp` sidecar.

// The `dcp` tool's (a binary of this package, so it sees only what is public).
#[doc(hidden)]
pub mod json;
#[doc(hidden)]
pub mod safetensors;

crate::internal_mod!(metadata, pickle, pickle_scan, pyobj, sidecar, zipitem);

/// Whether `name` is one plain file name (no separator, NUL, `.` or `..`): the only kind of
/// name a checkpoint's `.metadata` or sidecar may give for a file inside it.
pub(crate) fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['/', '\\', '\0']) && name != "." && name != ".."
}
