//! Byte formats: pickles, `.metadata`, torch.save zip items, the `.libdcp` sidecar.

crate::internal_mod!(metadata, pickle, pickle_scan, pyobj, sidecar, zipitem);

/// Whether `name` is one plain file name (no separator, NUL, `.` or `..`): the only kind of
/// name a checkpoint's `.metadata` or sidecar may give for a file inside it.
pub(crate) fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['/', '\\', '\0']) && name != "." && name != ".."
}
