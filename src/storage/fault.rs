//! A test hook for interrupted saves on any backend: with `DCP_FAULT=write:<part of a file
//! name>:<bytes>` in the environment, writes to matching data files fail with an injected I/O
//! error once that many bytes went through. Without the variable nothing is wrapped.

use super::{ReadHandle, Storage, WriteHandle};
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

struct FaultStorage {
    inner: Arc<dyn Storage>,
    pattern: String,
    after: u64,
}

struct FaultWrite {
    inner: Arc<dyn WriteHandle>,
    name: String,
    after: u64,
    written: AtomicU64,
}

/// Wraps `s` when `DCP_FAULT` asks for it.
pub fn wrap(s: Arc<dyn Storage>) -> Arc<dyn Storage> {
    let Ok(spec) = std::env::var("DCP_FAULT") else { return s };
    let mut parts = spec.splitn(3, ':');
    match (parts.next(), parts.next(), parts.next().and_then(|n| n.parse().ok())) {
        (Some("write"), Some(pattern), Some(after)) => Arc::new(FaultStorage {
            inner: s,
            pattern: pattern.to_string(),
            after,
        }),
        _ => s,
    }
}

impl WriteHandle for FaultWrite {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let before = self.written.fetch_add(data.len() as u64, Ordering::Relaxed);
        if before + data.len() as u64 > self.after {
            return Err(Error::new(
                crate::error::ErrorKind::Io,
                format!(
                    "writing {} bytes at offset {offset} of {}: injected fault (DCP_FAULT)",
                    data.len(),
                    self.name
                ),
            ));
        }
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
        if !name.contains(&self.pattern) {
            return Ok(h);
        }
        Ok(Arc::new(FaultWrite {
            inner: h,
            name: self.describe(name),
            after: self.after,
            written: AtomicU64::new(0),
        }))
    }
    fn put_atomic(&self, name: &str, data: &[u8]) -> Result<()> {
        self.inner.put_atomic(name, data)
    }
    fn put_new(&self, name: &str, data: &[u8]) -> Result<()> {
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
