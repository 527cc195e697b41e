//! Injected failures, for tests of interrupted saves on any backend: a [`FaultStorage`] wraps a
//! storage and fails the writes that its [`Faults`] name (a data file once some bytes went
//! through, the commit of a small file).
//!
//! Rust tests wrap a storage themselves. Processes driven from outside (the Python tests) set
//! `DCP_FAULT=write:<part of a data file's name>:<bytes>`, which [`super::open_with`] reads only in
//! a library built with the `fault-injection` cargo feature: the shipped library never looks.

use super::{Capabilities, ReadHandle, Storage, WriteHandle};
use crate::error::{Error, ErrorKind, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Which writes fail, and how.
#[derive(Clone, Debug)]
pub struct Faults {
    /// Data files whose name contains `.0` fail once `.1` bytes were written to each.
    pub write: Option<(String, u64)>,
    /// The small file (`put_atomic`, `put_new`) of this name fails.
    pub put: Option<String>,
    /// The kind of the injected errors (`Io` for a failing device, `NoSpace` for a full disk).
    pub kind: ErrorKind,
}

impl Faults {
    /// Data files whose name contains `pattern` fail after `after` bytes, with an I/O error.
    pub fn write(pattern: &str, after: u64) -> Faults {
        Faults {
            write: Some((pattern.to_string(), after)),
            put: None,
            kind: ErrorKind::Io,
        }
    }
}

/// A storage whose writes fail as its [`Faults`] say; everything else passes through.
pub struct FaultStorage {
    inner: Arc<dyn Storage>,
    faults: Faults,
}

impl FaultStorage {
    pub fn new(inner: Arc<dyn Storage>, faults: Faults) -> FaultStorage {
        FaultStorage { inner, faults }
    }
}

/// The injected error for `what` (`"writing ... of <file>"`).
fn injected(kind: ErrorKind, what: String) -> Error {
    let label = if kind == ErrorKind::NoSpace {
        "no space left on device, "
    } else {
        ""
    };
    Error::new(kind, format!("{what}: {label}injected fault"))
}

/// Wraps `s` when `DCP_FAULT` asks for it (`write:<part of a file name>:<bytes>`); a value of
/// another form is an error on stderr and wraps nothing.
#[cfg(feature = "fault-injection")]
pub fn wrap_from_env(s: Arc<dyn Storage>) -> Arc<dyn Storage> {
    let Ok(spec) = std::env::var("DCP_FAULT") else { return s };
    let mut parts = spec.splitn(3, ':');
    match (parts.next(), parts.next(), parts.next().and_then(|n| n.parse().ok())) {
        (Some("write"), Some(pattern), Some(after)) => Arc::new(FaultStorage::new(s, Faults::write(pattern, after))),
        _ => {
            eprintln!("libdcp: DCP_FAULT={spec:?} is not write:<part of a file name>:<bytes>; no fault injected");
            s
        }
    }
}

struct FaultWrite {
    inner: Arc<dyn WriteHandle>,
    storage_name: String,
    after: u64,
    written: AtomicU64,
    kind: ErrorKind,
}

impl FaultWrite {
    /// Counts `len` more bytes; the injected error once they pass the limit.
    fn check(&self, offset: Option<u64>, len: usize) -> Result<()> {
        let before = self.written.fetch_add(len as u64, Ordering::Relaxed);
        if before + len as u64 <= self.after {
            return Ok(());
        }
        let at = offset.map_or_else(|| format!("after byte {before}"), |o| format!("at offset {o}"));
        Err(injected(self.kind, format!("writing {len} bytes {at} of {}", self.storage_name)))
    }
}

impl WriteHandle for FaultWrite {
    fn append(&self, data: &[u8]) -> Result<()> {
        self.check(None, data.len())?;
        self.inner.append(data)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check(Some(offset), data.len())?;
        self.inner.write_at(offset, data)
    }
    fn direct_alignment(&self) -> Option<usize> {
        self.inner.direct_alignment()
    }
    fn set_len(&self, len: u64) -> Result<()> {
        self.inner.set_len(len)
    }
    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }
}

impl Storage for FaultStorage {
    fn describe(&self, name: &str) -> String {
        self.inner.describe(name)
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn prepare(&self) -> Result<()> {
        self.inner.prepare()
    }
    fn check_reachable(&self) -> Result<()> {
        self.inner.check_reachable()
    }
    fn exists(&self, name: &str) -> Result<bool> {
        self.inner.exists(name)
    }
    fn open_read(&self, name: &str) -> Result<Arc<dyn ReadHandle>> {
        self.inner.open_read(name)
    }
    fn read_all(&self, name: &str) -> Result<Vec<u8>> {
        self.inner.read_all(name)
    }
    fn create(&self, name: &str, direct: bool) -> Result<Arc<dyn WriteHandle>> {
        let h = self.inner.create(name, direct)?;
        let Some((pattern, after)) = &self.faults.write else { return Ok(h) };
        if !name.contains(pattern.as_str()) {
            return Ok(h);
        }
        Ok(Arc::new(FaultWrite {
            inner: h,
            storage_name: self.describe(name),
            after: *after,
            written: AtomicU64::new(0),
            kind: self.faults.kind,
        }))
    }
    fn put_atomic(&self, name: &str, data: &[u8]) -> Result<()> {
        if self.faults.put.as_deref() == Some(name) {
            return Err(injected(self.faults.kind, format!("writing {}", self.describe(name))));
        }
        self.inner.put_atomic(name, data)
    }
    fn put_new(&self, name: &str, data: &[u8]) -> Result<()> {
        if self.faults.put.as_deref() == Some(name) {
            return Err(injected(self.faults.kind, format!("writing {}", self.describe(name))));
        }
        self.inner.put_new(name, data)
    }
    fn remove(&self, name: &str) -> Result<()> {
        self.inner.remove(name)
    }
    fn sync_dir(&self) -> Result<()> {
        self.inner.sync_dir()
    }
    fn list(&self) -> Result<Vec<String>> {
        self.inner.list()
    }
}
