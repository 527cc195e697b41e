//! An in-memory backend, for tests and for staging small checkpoints.

use super::{Capabilities, ReadHandle, Storage, WriteHandle};
use crate::error::{Error, Result};
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// One stored file's bytes, shared with its open handles.
type FileBytes = Arc<Mutex<Vec<u8>>>;

/// Files in memory (for tests); clones share the files.
#[derive(Default, Clone)]
pub struct MemStorage {
    files: Arc<Mutex<HashMap<String, FileBytes>>>,
    /// Takes appends only, as an object store does (for tests of that path).
    sequential_only: bool,
}

impl MemStorage {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store that declares no positional writes and refuses them, like an object store.
    pub fn sequential_only() -> Self {
        MemStorage {
            sequential_only: true,
            ..Self::default()
        }
    }
}

struct MemFile {
    name: String,
    data: FileBytes,
}

impl ReadHandle for MemFile {
    fn len(&self) -> u64 {
        crate::error::lock(&self.data).len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let d = crate::error::lock(&self.data);
        super::check_range(&format_args!("mem://{}", self.name), offset, buf.len(), d.len() as u64)?;
        let start = offset as usize;
        buf.copy_from_slice(&d[start..start + buf.len()]);
        Ok(())
    }
}

/// A file being created: appends go after `end`, positional writes anywhere.
struct MemWrite {
    data: FileBytes,
    end: Mutex<u64>,
    positional: bool,
}

impl MemWrite {
    fn write(&self, offset: u64, data: &[u8]) {
        let mut d = crate::error::lock(&self.data);
        let end = offset as usize + data.len();
        if d.len() < end {
            d.resize(end, 0);
        }
        d[offset as usize..end].copy_from_slice(data);
    }
}

impl WriteHandle for MemWrite {
    fn append(&self, data: &[u8]) -> Result<()> {
        let mut end = crate::error::lock(&self.end);
        self.write(*end, data);
        *end += data.len() as u64;
        Ok(())
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        if !self.positional {
            return Err(Error::unsupported(format!(
                "writing {} bytes at offset {offset}: this in-memory store takes appends only",
                data.len()
            )));
        }
        self.write(offset, data);
        Ok(())
    }
    fn direct_alignment(&self) -> Option<usize> {
        None
    }
    fn set_len(&self, len: u64) -> Result<()> {
        let appended = *crate::error::lock(&self.end);
        if !self.positional && len != appended {
            return Err(Error::internal(format!(
                "{appended} bytes were appended but the file is to be {len} bytes long (this in-memory store, like an object store, cannot truncate or extend)"
            )));
        }
        crate::error::lock(&self.data).resize(len as usize, 0);
        Ok(())
    }
    fn sync(&self) -> Result<()> {
        Ok(())
    }
}

fn already_exists(name: &str) -> Error {
    Error::new(crate::error::ErrorKind::AlreadyExists, format!("mem://{name} already exists"))
}

impl Storage for MemStorage {
    fn describe(&self, name: &str) -> String {
        format!("mem://{name}")
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            positional_writes: !self.sequential_only,
            direct_alignment: None,
        }
    }
    fn prepare(&self) -> Result<()> {
        Ok(())
    }
    fn exists(&self, name: &str) -> Result<bool> {
        super::check_name(name)?;
        Ok(crate::error::lock(&self.files).contains_key(name))
    }
    fn open_read(&self, name: &str) -> Result<Arc<dyn ReadHandle>> {
        super::check_name(name)?;
        let data = crate::error::lock(&self.files)
            .get(name)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("mem://{name} does not exist")))?;
        Ok(Arc::new(MemFile {
            name: name.to_string(),
            data,
        }))
    }
    fn create(&self, name: &str, _direct: bool) -> Result<Arc<dyn WriteHandle>> {
        super::check_name(name)?;
        let data = Arc::new(Mutex::new(Vec::new()));
        match crate::error::lock(&self.files).entry(name.to_string()) {
            Entry::Occupied(_) => return Err(already_exists(name)),
            Entry::Vacant(v) => v.insert(data.clone()),
        };
        Ok(Arc::new(MemWrite {
            data,
            end: Mutex::new(0),
            positional: !self.sequential_only,
        }))
    }
    fn put_atomic(&self, name: &str, data: &[u8]) -> Result<()> {
        super::check_name(name)?;
        crate::error::lock(&self.files).insert(name.to_string(), Arc::new(Mutex::new(data.to_vec())));
        Ok(())
    }
    /// Create-only under the map's lock: atomic.
    fn put_new(&self, name: &str, data: &[u8]) -> Result<()> {
        super::check_name(name)?;
        match crate::error::lock(&self.files).entry(name.to_string()) {
            Entry::Occupied(_) => Err(already_exists(name)),
            Entry::Vacant(v) => {
                v.insert(Arc::new(Mutex::new(data.to_vec())));
                Ok(())
            }
        }
    }
    fn remove(&self, name: &str) -> Result<()> {
        super::check_name(name)?;
        crate::error::lock(&self.files).remove(name);
        Ok(())
    }
    fn sync_dir(&self) -> Result<()> {
        Ok(())
    }
    fn list(&self) -> Result<Vec<String>> {
        Ok(crate::error::lock(&self.files).keys().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn conformance() {
        super::super::conformance::run(&super::MemStorage::new());
        super::super::conformance::run(&super::MemStorage::sequential_only());
    }
}
