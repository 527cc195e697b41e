//! Where checkpoint files live. The engine talks to a [`Storage`] only; the file system is the
//! first backend, an in-memory one serves tests, object stores come later.

pub mod fault;
pub mod fs;
pub mod mem;
#[cfg(feature = "s3")]
pub mod s3;

use crate::error::Result;
use std::sync::Arc;

/// Random-access reads of one stored file.
pub trait ReadHandle: Send + Sync {
    fn len(&self) -> u64;
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

/// The temporary name a small file is staged under before it is renamed to `name`.
pub fn tmp_name(name: &str) -> String {
    format!("{name}.tmp")
}

/// Alignment of direct (O_DIRECT) I/O.
pub const DIRECT_ALIGN: usize = 4096;

/// Positional writes to one file being created; several threads may write disjoint ranges.
pub trait WriteHandle: Send + Sync {
    /// Writes all of `data` at `offset`.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()>;
    /// `Some(n)` when writes bypass the page cache and must be n-aligned in offset, length and
    /// memory.
    fn direct_alignment(&self) -> Option<usize>;
    /// Sets the final length (after padded direct writes).
    fn set_len(&self, len: u64) -> Result<()>;
    /// Makes the data durable.
    fn sync(&self) -> Result<()>;
}

pub trait Storage: Send + Sync {
    /// A human-readable location of `name` for messages (a path, a URL).
    fn describe(&self, name: &str) -> String;
    /// Creates the checkpoint location if needed.
    fn prepare(&self) -> Result<()>;
    /// Checks the location can be reached (a bucket exists and the credentials work), without
    /// creating anything.
    fn check_reachable(&self) -> Result<()> {
        Ok(())
    }
    fn exists(&self, name: &str) -> Result<bool>;
    fn open_read(&self, name: &str) -> Result<Arc<dyn ReadHandle>>;
    /// Reads a whole (small) file.
    fn read_all(&self, name: &str) -> Result<Vec<u8>> {
        let h = self.open_read(name)?;
        h.read_vec(0, h.len() as usize)
    }
    /// Creates (truncating) a file for positional writes; `direct` asks for O_DIRECT where the
    /// backend and file system allow it.
    fn create(&self, name: &str, direct: bool) -> Result<Arc<dyn WriteHandle>>;
    /// Writes a small file atomically and durably: temporary name, sync, rename.
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
    fn list(&self) -> Result<Vec<String>>;
}

/// Opens the storage for a checkpoint location: a directory, or `s3://bucket/prefix`.
pub fn open(location: &str) -> Result<Arc<dyn Storage>> {
    open_with(location, &[])
}

/// Like [`open`], with backend settings (for S3: `object_store` configuration keys and values).
pub fn open_with(location: &str, options: &[(String, String)]) -> Result<Arc<dyn Storage>> {
    if location.is_empty() {
        return Err(crate::error::Error::invalid("checkpoint path is empty"));
    }
    if location.starts_with("s3://") {
        #[cfg(feature = "s3")]
        return Ok(fault::wrap(Arc::new(s3::S3Storage::new(location, options)?)));
        #[cfg(not(feature = "s3"))]
        return Err(crate::error::Error::unsupported(format!(
            "{location}: this build of libdcp has no S3 support (the `s3` feature)"
        )));
    }
    let _ = options;
    Ok(fault::wrap(Arc::new(fs::FsStorage::new(location))))
}

#[cfg(test)]
pub(crate) mod conformance {
    //! Checks every backend must pass.
    use super::*;

    pub fn run(s: &dyn Storage) {
        s.prepare().unwrap();
        assert!(!s.exists("a").unwrap());
        let w = s.create("a", false).unwrap();
        w.write_at(4, b"5678").unwrap();
        w.write_at(0, b"1234").unwrap();
        w.sync().unwrap();
        drop(w);
        assert!(s.exists("a").unwrap());
        let r = s.open_read("a").unwrap();
        assert_eq!(r.len(), 8);
        assert_eq!(r.read_vec(2, 4).unwrap(), b"3456");
        let err = r.read_vec(6, 4).unwrap_err();
        assert!(err.message().contains("a"), "{err}");
        s.put_atomic("m", b"meta").unwrap();
        assert_eq!(s.read_all("m").unwrap(), b"meta");
        s.put_atomic("m", b"meta2").unwrap();
        assert_eq!(s.read_all("m").unwrap(), b"meta2");
        let mut names = s.list().unwrap();
        names.sort();
        assert_eq!(names, vec!["a".to_string(), "m".to_string()]);
        s.remove("a").unwrap();
        s.remove("a").unwrap();
        assert!(!s.exists("a").unwrap());
        assert!(s.open_read("a").is_err());
        s.sync_dir().unwrap();
    }
}
