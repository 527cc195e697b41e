//! Where checkpoint files live. The engine talks to a [`Storage`] only: the file system, an
//! in-memory store for tests, S3-compatible object stores.
//!
//! # The write contract
//!
//! Every backend supports the same way of writing a data file: [`Storage::create`] gives a
//! [`WriteHandle`] that one writer fills front to back with [`WriteHandle::append`], then
//! [`WriteHandle::set_len`] (the final length) and [`WriteHandle::sync`] (the file becomes durable,
//! on an object store it appears whole). Small files are written whole and atomically
//! ([`Storage::put_atomic`], [`Storage::put_new`]).
//!
//! Beyond that a backend declares what more it can do ([`Storage::capabilities`]):
//! positional writes ([`WriteHandle::write_at`] at any offset, from several threads to disjoint
//! ranges) and direct I/O (O_DIRECT, writes that bypass the page cache and must be aligned).
//! Callers use them only where declared; the file system declares both, an object store
//! neither.

#[cfg(test)]
pub(crate) mod conformance;
#[doc(hidden)]
pub mod fault;
pub mod fs;
pub mod mem;
#[cfg(feature = "s3")]
pub mod s3;

use crate::error::Result;
use std::sync::Arc;

/// Random-access reads of one stored file.
pub trait ReadHandle: Send + Sync {
    /// The file's length in bytes.
    fn len(&self) -> u64;
    /// Whether the file has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fills `buf` from `offset`; a short file is an error naming the file and offset.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Reads `len` bytes at `offset` into a new buffer.
    fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read_at(offset, &mut v)?;
        Ok(v)
    }
    /// Reads into `buf` at `offset` bypassing the page cache, when the backend can and offset,
    /// length and memory are aligned to [`DIRECT_ALIGN`]; `Ok(false)` when it cannot (the
    /// caller then uses `read_at`). Bytes past the end of the file are left as they were.
    fn read_direct(&self, _offset: u64, _buf: &mut [u8]) -> Result<bool> {
        Ok(false)
    }
    /// Fraction of `[offset, offset + len)` in the page cache, when the backend can tell.
    fn cached_fraction(&self, _offset: u64, _len: u64) -> Option<f64> {
        None
    }
}

/// The error for a read past the end of a stored file (`what` names it).
pub fn check_range(what: &dyn std::fmt::Display, offset: u64, len: usize, file_len: u64) -> Result<()> {
    if offset.checked_add(len as u64).is_none_or(|e| e > file_len) {
        return Err(crate::error::Error::corrupt(format!(
            "{what}: needs bytes {offset}..{} but it has {file_len} bytes (truncated?)",
            offset.saturating_add(len as u64)
        )));
    }
    Ok(())
}

/// `put_new` for a backend without an atomic create-only write: checks, then `put_atomic`
/// (another writer may slip in between).
pub fn put_new_checked<S: Storage + ?Sized>(storage: &S, name: &str, data: &[u8]) -> Result<()> {
    if storage.exists(name)? {
        return Err(crate::error::Error::new(
            crate::error::ErrorKind::AlreadyExists,
            format!("{} already exists", storage.describe(name)),
        ));
    }
    storage.put_atomic(name, data)
}

/// Refuses a name that is not one plain path component: empty, `.`, `..`, or holding `/` or NUL.
/// Every backend checks the names it is given, whatever the caller validated before.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(crate::error::Error::invalid(format!(
            "{name:?} is not a file name inside a checkpoint (one path component: no '/', no NUL, not '.' or '..')"
        )));
    }
    Ok(())
}

/// The legacy fixed temporary name (`{name}.tmp`) that libdcp used before temporaries became
/// unique; only for recognising what an older save may have left behind.
pub fn tmp_name(name: &str) -> String {
    format!("{name}.tmp")
}

/// Hex digits of the random part of a temporary name.
const TMP_RANDOM_DIGITS: usize = 16;

/// A fresh temporary name a small file is staged under before it is renamed or linked to
/// `name`: `{name}.{16 random hex digits}.tmp`, so that two writers never share one.
pub fn unique_tmp_name(name: &str) -> String {
    format!("{name}.{:0width$x}.tmp", crate::host::random_u64(), width = TMP_RANDOM_DIGITS)
}

/// The name a temporary made by [`unique_tmp_name`] stands in for; `None` for any other name.
pub fn tmp_target(name: &str) -> Option<&str> {
    let stem = name.strip_suffix(".tmp")?;
    let (target, random) = stem.rsplit_once('.')?;
    let is_random = random.len() == TMP_RANDOM_DIGITS && random.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    (is_random && !target.is_empty()).then_some(target)
}

/// Whether `name` is a temporary made by [`unique_tmp_name`] (a leftover when no save is running).
pub fn is_tmp_name(name: &str) -> bool {
    tmp_target(name).is_some()
}

/// Alignment of direct (O_DIRECT) I/O.
pub const DIRECT_ALIGN: usize = 4096;

/// What a backend can do beyond the write contract every backend honours (see the module
/// documentation). The default is the contract alone: sequential appends, no direct I/O.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// [`WriteHandle::write_at`] works: writes at any offset of a file being created, from
    /// several threads at once to disjoint ranges.
    pub positional_writes: bool,
    /// `Some(n)`: [`Storage::create`] with `direct` may give a handle whose writes bypass the
    /// page cache and must be n-aligned in offset, length and memory (the handle's
    /// [`WriteHandle::direct_alignment`] says whether this one does). `None`: never.
    pub direct_alignment: Option<usize>,
}

/// One data file being created. Every backend takes [`append`](Self::append)s from one writer
/// (the file is written front to back); [`write_at`](Self::write_at) only works where the
/// backend declares [`Capabilities::positional_writes`]. A handle is used one way or the other,
/// not both.
pub trait WriteHandle: Send + Sync {
    /// Writes all of `data` after the bytes appended so far.
    fn append(&self, data: &[u8]) -> Result<()>;
    /// Writes all of `data` at `offset`; several threads may write disjoint ranges. Only for
    /// backends that declare [`Capabilities::positional_writes`]; the others refuse it
    /// (`Unsupported`).
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let _ = (offset, data);
        Err(crate::error::Error::unsupported(
            "this storage takes sequential appends only (no positional writes)",
        ))
    }
    /// `Some(n)` when writes bypass the page cache and must be n-aligned in offset, length and
    /// memory.
    fn direct_alignment(&self) -> Option<usize>;
    /// Sets the final length: shorter than what was written after padded direct writes; a
    /// backend that cannot truncate (an object store) requires exactly the bytes written.
    fn set_len(&self, len: u64) -> Result<()>;
    /// Makes the data durable (on an object store: the file appears, whole).
    fn sync(&self) -> Result<()>;
}

/// A place holding the files of one checkpoint. Names are single path components
/// ([`check_name`]); every method that takes one refuses any other. A missing file is
/// `NotFound` to [`open_read`](Self::open_read) and [`read_all`](Self::read_all).
pub trait Storage: Send + Sync {
    /// A human-readable location of `name` for messages (a path, a URL).
    fn describe(&self, name: &str) -> String;
    /// What this backend can do beyond sequential appends.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    /// Creates the checkpoint location if needed.
    fn prepare(&self) -> Result<()>;
    /// Checks the location can be reached (a bucket exists and the credentials work), without
    /// creating anything.
    fn check_reachable(&self) -> Result<()> {
        Ok(())
    }
    /// Whether the file `name` exists.
    fn exists(&self, name: &str) -> Result<bool>;
    /// Opens the file `name` for reading.
    fn open_read(&self, name: &str) -> Result<Arc<dyn ReadHandle>>;
    /// Reads a whole (small) file.
    fn read_all(&self, name: &str) -> Result<Vec<u8>> {
        let h = self.open_read(name)?;
        h.read_vec(0, h.len() as usize)
    }
    /// Creates a new data file (see [`WriteHandle`]); `direct` asks for O_DIRECT where the
    /// backend declares it and the file system allows it. The name must be free: an existing
    /// file (or anything else at that name) is `AlreadyExists`; nothing is written through a
    /// link.
    fn create(&self, name: &str, direct: bool) -> Result<Arc<dyn WriteHandle>>;
    /// Writes a small file atomically and durably: a unique temporary name, sync, rename (which
    /// replaces whatever had the name, never writing through it).
    fn put_atomic(&self, name: &str, data: &[u8]) -> Result<()>;
    /// Like `put_atomic`, but fails with `AlreadyExists` when `name` exists: the commit of a
    /// save that must not replace a checkpoint.
    fn put_new(&self, name: &str, data: &[u8]) -> Result<()> {
        put_new_checked(self, name, data)
    }
    /// Removes a file; a missing file is not an error.
    fn remove(&self, name: &str) -> Result<()>;
    /// Makes renames and creations in the location durable.
    fn sync_dir(&self) -> Result<()>;
    /// The names of the location's files.
    fn list(&self) -> Result<Vec<String>>;
}

/// Opens the storage for a checkpoint location: a directory, or `s3://bucket/prefix`.
pub fn open(location: &str) -> Result<Arc<dyn Storage>> {
    open_with(location, &[])
}

/// Like [`open`], with backend settings (for S3: `object_store` configuration keys and values).
pub fn open_with(location: &str, options: &[(String, String)]) -> Result<Arc<dyn Storage>> {
    let storage = open_backend(location, options)?;
    // Interrupted saves for tests (DCP_FAULT), only in builds with the `fault-injection` feature.
    #[cfg(feature = "fault-injection")]
    let storage = fault::wrap_from_env(storage);
    Ok(storage)
}

fn open_backend(location: &str, options: &[(String, String)]) -> Result<Arc<dyn Storage>> {
    if location.is_empty() {
        return Err(crate::error::Error::invalid("checkpoint path is empty"));
    }
    if location.starts_with("s3://") {
        #[cfg(feature = "s3")]
        return Ok(Arc::new(s3::S3Storage::new(location, options)?));
        #[cfg(not(feature = "s3"))]
        return Err(crate::error::Error::unsupported(format!(
            "{location}: this build of libdcp has no S3 support (the `s3` feature)"
        )));
    }
    let _ = options;
    Ok(Arc::new(fs::FsStorage::new(location)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tmp_names() {
        let t = unique_tmp_name(".metadata");
        assert_ne!(t, unique_tmp_name(".metadata"));
        assert_eq!(tmp_target(&t), Some(".metadata"));
        assert!(is_tmp_name(&t));
        assert!(check_name(&t).is_ok());
        for other in [
            ".metadata",
            ".metadata.tmp",
            "__0_0.distcp",
            "x.0123456789abcdeg.tmp",
            ".0123456789abcdef.tmp",
        ] {
            assert!(!is_tmp_name(other), "{other}");
        }
    }
}
