//! Local file system backend: pread/pwrite, O_DIRECT where the file system takes it, fdatasync,
//! atomic rename, directory fsync.

use super::{ReadHandle, Storage, WriteHandle};
use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::DIRECT_ALIGN;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;

pub struct FsStorage {
    root: PathBuf,
}

impl FsStorage {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        FsStorage { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

struct FsRead {
    file: File,
    len: u64,
    path: PathBuf,
    /// A second descriptor with O_DIRECT, opened on first use (`None` if refused).
    direct: OnceLock<Option<File>>,
}

impl ReadHandle for FsRead {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        super::check_range(&self.path.display(), offset, buf.len(), self.len)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io(&format!("reading {} bytes at offset {offset} of", buf.len()), &self.path, e))
    }

    fn read_direct(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        let a = DIRECT_ALIGN;
        if offset % a as u64 != 0 || buf.len() % a != 0 || (buf.as_ptr() as usize) % a != 0 {
            return Ok(false);
        }
        let Some(f) = self
            .direct
            .get_or_init(|| OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&self.path).ok())
        else {
            return Ok(false);
        };
        // Reads until the buffer is full or the file ends (the tail past EOF stays as is).
        let mut done = 0usize;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && done == 0 => return Ok(false),
                Err(e) => {
                    return Err(Error::io(
                        &format!("reading {} bytes at offset {offset} (O_DIRECT) of", buf.len()),
                        &self.path,
                        e,
                    ))
                }
            }
            if done % a != 0 {
                break;
            }
        }
        Ok(true)
    }

    fn cached_fraction(&self, offset: u64, len: u64) -> Option<f64> {
        let page = 4096u64;
        let start = offset / page * page;
        let end = (offset + len).min(self.len);
        if end <= start {
            return Some(1.0);
        }
        let span = (end - start) as usize;
        unsafe {
            let map = libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ,
                libc::MAP_SHARED,
                self.file.as_raw_fd(),
                start as libc::off_t,
            );
            if map == libc::MAP_FAILED {
                return None;
            }
            let mut vec = vec![0u8; span.div_ceil(page as usize)];
            let r = libc::mincore(map, span, vec.as_mut_ptr());
            libc::munmap(map, span);
            if r != 0 {
                return None;
            }
            Some(vec.iter().filter(|&&b| b & 1 != 0).count() as f64 / vec.len() as f64)
        }
    }
}

struct FsWrite {
    file: File,
    direct: bool,
    path: PathBuf,
}

impl WriteHandle for FsWrite {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.file
            .write_all_at(data, offset)
            .map_err(|e| Error::io(&format!("writing {} bytes at offset {offset} of", data.len()), &self.path, e))
    }
    fn direct_alignment(&self) -> Option<usize> {
        self.direct.then_some(DIRECT_ALIGN)
    }
    fn set_len(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| Error::io("setting the length of", &self.path, e))
    }
    fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io("fdatasync of", &self.path, e))
    }
}

impl Storage for FsStorage {
    fn describe(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
    fn prepare(&self) -> Result<()> {
        std::fs::create_dir_all(&self.root).map_err(|e| Error::io("creating directory", &self.root, e))
    }
    fn exists(&self, name: &str) -> Result<bool> {
        match std::fs::metadata(self.path(name)) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io("checking", &self.path(name), e)),
        }
    }
    fn open_read(&self, name: &str) -> Result<Arc<dyn ReadHandle>> {
        let path = self.path(name);
        let file = File::open(&path).map_err(|e| Error::io("opening", &path, e))?;
        let len = file.metadata().map_err(|e| Error::io("reading the size of", &path, e))?.len();
        Ok(Arc::new(FsRead {
            file,
            len,
            path,
            direct: OnceLock::new(),
        }))
    }
    fn create(&self, name: &str, direct: bool) -> Result<Arc<dyn WriteHandle>> {
        let path = self.path(name);
        let open = |flags: i32| {
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(flags)
                .open(&path)
        };
        if direct {
            match open(libc::O_DIRECT) {
                Ok(file) => return Ok(Arc::new(FsWrite { file, direct: true, path })),
                // tmpfs and some FUSE file systems refuse O_DIRECT: fall back to buffered I/O.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
                Err(e) => return Err(Error::io("creating", &path, e)),
            }
        }
        let file = open(0).map_err(|e| Error::io("creating", &path, e))?;
        Ok(Arc::new(FsWrite { file, direct: false, path }))
    }
    fn put_atomic(&self, name: &str, data: &[u8]) -> Result<()> {
        let tmp = self.path(&super::tmp_name(name));
        let dst = self.path(name);
        write_synced(&tmp, data)?;
        std::fs::rename(&tmp, &dst).map_err(|e| Error::io("renaming into place", &dst, e))
    }
    fn put_new(&self, name: &str, data: &[u8]) -> Result<()> {
        let tmp = self.path(&super::tmp_name(name));
        let dst = self.path(name);
        write_synced(&tmp, data).map_err(|e| e.context("staging"))?;
        // A hard link fails if the destination exists: an atomic create-only rename.
        let linked = std::fs::hard_link(&tmp, &dst);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(Error::new(
                crate::error::ErrorKind::AlreadyExists,
                format!("{} already exists (another save committed there first)", dst.display()),
            )),
            Err(e) => Err(Error::io("committing", &dst, e)),
        }
    }

    fn remove(&self, name: &str) -> Result<()> {
        match std::fs::remove_file(self.path(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("removing", &self.path(name), e)),
        }
    }
    fn sync_dir(&self) -> Result<()> {
        let d = File::open(&self.root).map_err(|e| Error::io("opening directory", &self.root, e))?;
        d.sync_all().map_err(|e| Error::io("fsync of directory", &self.root, e))
    }
    fn list(&self) -> Result<Vec<String>> {
        let rd = std::fs::read_dir(&self.root).map_err(|e| Error::io("listing", &self.root, e))?;
        let mut out = Vec::new();
        for e in rd {
            let e = e.map_err(|e| Error::io("listing", &self.root, e))?;
            if e.file_type().map(|t| t.is_file()).unwrap_or(false) {
                out.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conformance() {
        let dir = std::env::temp_dir().join(format!("libdcp-fs-conf-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        super::super::conformance::run(&FsStorage::new(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Writes `data` to a fresh file at `path` and fsyncs it; on failure the partial file is removed.
fn write_synced(path: &Path, data: &[u8]) -> Result<()> {
    let write = || -> std::io::Result<()> {
        let f = OpenOptions::new().write(true).create(true).truncate(true).open(path)?;
        f.write_all_at(data, 0)?;
        f.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(path);
        Error::io("writing", path, e)
    })
}
