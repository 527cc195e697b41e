//! Local file system backend: pread/pwrite, O_DIRECT where the file system takes it, fdatasync,
//! atomic rename, directory fsync.
//!
//! A checkpoint directory may hold anything (it may come from elsewhere, or share a path with
//! another job), so every file is opened defensively: reads open only regular files, without
//! following a symbolic link and without blocking on a FIFO or device (O_NONBLOCK | O_NOFOLLOW,
//! then fstat); writes only create new files (O_CREAT | O_EXCL, which never follows a link) or
//! replace a name by rename/link from a unique temporary of their own.

use super::{Capabilities, ReadHandle, Storage, WriteHandle};
use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::DIRECT_ALIGN;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;

/// A directory of the local file system.
pub struct FsStorage {
    root: PathBuf,
}

impl FsStorage {
    /// The directory `root` (created by the first save's `prepare`).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        FsStorage { root: root.into() }
    }
    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
    /// The path of `name`, once it is known to be one plain component.
    fn checked_path(&self, name: &str) -> Result<PathBuf> {
        super::check_name(name)?;
        Ok(self.path(name))
    }
}

/// What a file that is not a regular file is, for messages.
fn kind_of(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "not a file"
    }
}

fn symlink_error(path: &Path) -> Error {
    Error::corrupt(format!(
        "opening {}: is a symbolic link; libdcp does not follow links inside a checkpoint",
        path.display()
    ))
}

fn not_regular_error(path: &Path, t: std::fs::FileType) -> Error {
    if t.is_symlink() {
        return symlink_error(path);
    }
    Error::corrupt(format!("opening {}: is not a regular file ({})", path.display(), kind_of(t)))
}

/// Opens `path` for reading if, and only if, it is a regular file: a symbolic link is refused
/// (O_NOFOLLOW), a FIFO or device neither blocks the open (O_NONBLOCK) nor is read (fstat).
/// `extra_flags` are added to the open (O_DIRECT).
fn open_regular(path: &Path, extra_flags: i32) -> std::result::Result<File, OpenError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC | extra_flags)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => OpenError::Refused(symlink_error(path)),
            // A socket cannot be opened; say what it is rather than "no such device".
            Some(libc::ENXIO) | Some(libc::EOPNOTSUPP) => match std::fs::symlink_metadata(path) {
                Ok(m) if !m.file_type().is_file() => OpenError::Refused(not_regular_error(path, m.file_type())),
                _ => OpenError::Os(e),
            },
            _ => OpenError::Os(e),
        })?;
    let meta = file.metadata().map_err(OpenError::Os)?;
    if !meta.file_type().is_file() {
        return Err(OpenError::Refused(not_regular_error(path, meta.file_type())));
    }
    // Regular files ignore O_NONBLOCK today; clear it so that reads stay plain blocking reads.
    // SAFETY: fcntl on a descriptor this function owns, with flag arguments only.
    let cleared = unsafe {
        let fd = file.as_raw_fd();
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) == 0
    };
    if !cleared {
        return Err(OpenError::Os(std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// Why [`open_regular`] gave no file: the OS refused the open, or libdcp refused what it found.
enum OpenError {
    Os(std::io::Error),
    Refused(Error),
}

impl OpenError {
    fn into_error(self, what: &str, path: &Path) -> Error {
        match self {
            OpenError::Os(e) => Error::io(what, path, e),
            OpenError::Refused(e) => e,
        }
    }
}

/// The error for a name that is taken, saying what holds it when that is not a file.
fn exists_error(path: &Path) -> Error {
    let what = match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_file() => format!(" ({})", kind_of(m.file_type())),
        _ => String::new(),
    };
    Error::new(
        crate::error::ErrorKind::AlreadyExists,
        format!(
            "{} already exists{what}: libdcp creates its data files new and does not write over anything",
            path.display()
        ),
    )
}

struct FsRead {
    file: File,
    len: u64,
    path: PathBuf,
    /// A second descriptor with O_DIRECT, opened on first use (`None` if refused).
    direct: OnceLock<Option<File>>,
}

impl FsRead {
    /// A second descriptor of the same file with O_DIRECT; `None` when the file system refuses
    /// it, or the name now holds another file (replaced since it was opened).
    fn open_direct(&self) -> Option<File> {
        let f = open_regular(&self.path, libc::O_DIRECT).ok()?;
        let (a, b) = (f.metadata().ok()?, self.file.metadata().ok()?);
        (a.dev() == b.dev() && a.ino() == b.ino()).then_some(f)
    }
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
        let Some(f) = self.direct.get_or_init(|| self.open_direct()) else {
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
        // SAFETY: a read-only shared mapping of `span` bytes of a regular file this handle owns,
        // within its length; `vec` has one byte per page of the span, as mincore needs; the
        // mapping is unmapped before returning and never dereferenced.
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
    /// Where the next append goes (appends are pwrites there, like positional writes).
    end: Mutex<u64>,
}

impl WriteHandle for FsWrite {
    fn append(&self, data: &[u8]) -> Result<()> {
        let mut end = crate::error::lock(&self.end);
        self.write_at(*end, data)?;
        *end += data.len() as u64;
        Ok(())
    }
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
    /// pwrite anywhere, from any thread; O_DIRECT where the file system takes it.
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            positional_writes: true,
            direct_alignment: Some(DIRECT_ALIGN),
        }
    }
    /// Creates the directory if it is missing; a path that holds something else is an error.
    fn prepare(&self) -> Result<()> {
        match std::fs::metadata(&self.root) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(m) => Err(Error::invalid(format!(
                "checkpoint path {} exists and is not a directory ({})",
                self.root.display(),
                kind_of(m.file_type())
            ))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(&self.root).map_err(|e| Error::io("creating directory", &self.root, e))
            }
            Err(e) => Err(Error::io("checking directory", &self.root, e)),
        }
    }
    /// Whether anything (a file, a link, a FIFO, ...) has the name: a name that is taken.
    fn exists(&self, name: &str) -> Result<bool> {
        let path = self.checked_path(name)?;
        match std::fs::symlink_metadata(&path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io("checking", &path, e)),
        }
    }
    fn open_read(&self, name: &str) -> Result<Arc<dyn ReadHandle>> {
        let path = self.checked_path(name)?;
        let file = open_regular(&path, 0).map_err(|e| e.into_error("opening", &path))?;
        let len = file.metadata().map_err(|e| Error::io("reading the size of", &path, e))?.len();
        Ok(Arc::new(FsRead {
            file,
            len,
            path,
            direct: OnceLock::new(),
        }))
    }
    fn create(&self, name: &str, direct: bool) -> Result<Arc<dyn WriteHandle>> {
        let path = self.checked_path(name)?;
        let file = create_new(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => exists_error(&path),
            _ => Error::io("creating", &path, e),
        })?;
        // tmpfs and some FUSE file systems refuse O_DIRECT: then the writes are buffered.
        let direct = direct && set_direct(&file);
        Ok(Arc::new(FsWrite {
            file,
            direct,
            path,
            end: Mutex::new(0),
        }))
    }
    fn put_atomic(&self, name: &str, data: &[u8]) -> Result<()> {
        let dst = self.checked_path(name)?;
        let tmp = self.write_staged(name, data)?;
        // rename replaces the directory entry (a link there is replaced, not followed).
        std::fs::rename(&tmp, &dst).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io("renaming into place", &dst, e)
        })
    }
    fn put_new(&self, name: &str, data: &[u8]) -> Result<()> {
        let dst = self.checked_path(name)?;
        let tmp = self.write_staged(name, data).map_err(|e| e.context("staging"))?;
        // A hard link fails if the destination exists (as anything, a dangling link included):
        // an atomic create-only rename.
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
        let path = self.checked_path(name)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("removing", &path, e)),
        }
    }
    fn sync_dir(&self) -> Result<()> {
        let d = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(&self.root)
            .map_err(|e| Error::io("opening directory", &self.root, e))?;
        d.sync_all().map_err(|e| Error::io("fsync of directory", &self.root, e))
    }
    /// The regular files of the directory (links, FIFOs and subdirectories are not listed).
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

impl FsStorage {
    /// Writes `data` under a fresh unique temporary name next to `name` and fsyncs it; returns
    /// the temporary's path. On failure nothing is left behind.
    fn write_staged(&self, name: &str, data: &[u8]) -> Result<PathBuf> {
        // A clash of 64 random bits means a broken random source: a few tries, then an error.
        let mut last = None;
        for _ in 0..4 {
            let tmp = self.path(&super::unique_tmp_name(name));
            let file = match create_new(&tmp) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    last = Some(exists_error(&tmp));
                    continue;
                }
                Err(e) => return Err(Error::io("creating", &tmp, e)),
            };
            let written = file.write_all_at(data, 0).and_then(|()| file.sync_all());
            return match written {
                Ok(()) => Ok(tmp),
                Err(e) => {
                    drop(file);
                    let _ = std::fs::remove_file(&tmp);
                    Err(Error::io("writing", &tmp, e))
                }
            };
        }
        Err(last.unwrap_or_else(|| Error::internal("no temporary name was tried")))
    }
}

/// Creates a new file for writing: O_CREAT | O_EXCL, so an existing name (a file, or a link,
/// dangling or not, which is never followed) fails with `AlreadyExists`.
fn create_new(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Switches `file` to O_DIRECT; false when its file system does not take it.
fn set_direct(file: &File) -> bool {
    // SAFETY: fcntl on a descriptor `file` owns, with flag arguments only.
    unsafe {
        let fd = file.as_raw_fd();
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_DIRECT) == 0
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

    /// A fresh directory `tag` holding the checkpoint directory `ck` and a file `outside` next
    /// to it (a target for links); removed when dropped.
    struct Scratch {
        dir: PathBuf,
    }
    impl Scratch {
        fn new(tag: &str) -> (Scratch, FsStorage, PathBuf) {
            let dir = std::env::temp_dir().join(format!("libdcp-fs-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("ck")).unwrap();
            let outside = dir.join("outside");
            std::fs::write(&outside, b"precious bytes outside the checkpoint").unwrap();
            let s = FsStorage::new(dir.join("ck"));
            (Scratch { dir }, s, outside)
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Runs `f` on another thread; fails the test when it takes more than 5 s (a hang).
    fn within_5s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .expect("the storage call returned within 5 s")
    }

    fn assert_refused(r: Result<impl Sized>, kind: crate::error::ErrorKind, needles: &[&str]) {
        let err = r.err().expect("the call is refused");
        assert_eq!(err.kind(), kind, "{err}");
        for n in needles {
            assert!(err.message().contains(n), "{n:?} not in: {err}");
        }
    }

    fn assert_unchanged(outside: &Path) {
        assert_eq!(std::fs::read(outside).unwrap(), b"precious bytes outside the checkpoint");
    }

    #[test]
    fn fifo_and_socket_are_refused_without_blocking() {
        use crate::error::ErrorKind;
        let (_scratch, s, _) = Scratch::new("fifo");
        let fifo = s.path("__0_0.distcp");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let sock = s.path(".libdcp");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let s = Arc::new(s);
        let path = fifo.display().to_string();
        for name in ["__0_0.distcp", ".libdcp"] {
            let s2 = s.clone();
            let (opened, read) = within_5s(move || (s2.open_read(name).map(drop), s2.read_all(name)));
            let what = if name == ".libdcp" { "(a socket)" } else { "(a FIFO)" };
            assert_refused(opened, ErrorKind::Corrupt, &[name, "is not a regular file", what]);
            assert_refused(read, ErrorKind::Corrupt, &[name, what]);
        }
        assert_refused(s.create("__0_0.distcp", false), ErrorKind::AlreadyExists, &[&path, "(a FIFO)"]);
        assert!(s.exists("__0_0.distcp").unwrap());
        assert!(s.list().unwrap().is_empty(), "{:?}", s.list());
    }

    #[test]
    fn symlink_to_a_file_outside_is_not_followed() {
        use crate::error::ErrorKind;
        let (_scratch, s, outside) = Scratch::new("symlink");
        std::os::unix::fs::symlink(&outside, s.path(".metadata")).unwrap();
        let s = Arc::new(s);
        let s2 = s.clone();
        let (opened, read) = within_5s(move || (s2.open_read(".metadata").map(drop), s2.read_all(".metadata")));
        for r in [opened, read.map(drop)] {
            assert_refused(r, ErrorKind::Corrupt, &[".metadata", "is a symbolic link", "does not follow links"]);
        }
        assert_refused(s.put_new(".metadata", b"new"), ErrorKind::AlreadyExists, &[".metadata"]);
        assert_unchanged(&outside);
        // put_atomic replaces the link itself with a file of its own.
        s.put_atomic(".metadata", b"new").unwrap();
        assert_unchanged(&outside);
        assert!(std::fs::symlink_metadata(s.path(".metadata")).unwrap().file_type().is_file());
        assert_eq!(s.read_all(".metadata").unwrap(), b"new");
        let mut names = s.list().unwrap();
        names.sort();
        assert_eq!(names, vec![".metadata".to_string()]);
    }

    #[test]
    fn symlink_at_a_name_create_would_use_is_not_written_through() {
        use crate::error::ErrorKind;
        let (_scratch, s, outside) = Scratch::new("create-link");
        std::os::unix::fs::symlink(&outside, s.path("__0_0.distcp")).unwrap();
        // The legacy fixed temporary name, as an attacker would pre-place it.
        std::os::unix::fs::symlink(&outside, s.path(&super::super::tmp_name(".metadata"))).unwrap();
        for direct in [false, true] {
            assert_refused(
                s.create("__0_0.distcp", direct),
                ErrorKind::AlreadyExists,
                &[&s.describe("__0_0.distcp"), "(a symbolic link)"],
            );
        }
        s.put_atomic(".metadata", b"md").unwrap();
        s.put_new(".libdcp", b"sc").unwrap();
        assert_unchanged(&outside);
        assert_eq!(s.read_all(".metadata").unwrap(), b"md");
        assert_eq!(s.read_all(".libdcp").unwrap(), b"sc");
    }

    #[test]
    fn directory_in_place_of_a_file() {
        use crate::error::ErrorKind;
        let (_scratch, s, _) = Scratch::new("dir");
        std::fs::create_dir(s.path(".metadata")).unwrap();
        assert_refused(
            s.open_read(".metadata").map(drop),
            ErrorKind::Corrupt,
            &[".metadata", "(a directory)"],
        );
        assert_refused(s.read_all(".metadata"), ErrorKind::Corrupt, &[".metadata", "(a directory)"]);
        assert_refused(
            s.create(".metadata", false),
            ErrorKind::AlreadyExists,
            &[".metadata", "(a directory)"],
        );
        assert!(s.put_atomic(".metadata", b"x").is_err());
        assert!(s.put_new(".metadata", b"x").is_err());
        assert!(s.remove(".metadata").is_err());
        assert!(s.list().unwrap().is_empty(), "no temporary left: {:?}", s.list());
        assert!(std::fs::metadata(s.path(".metadata")).unwrap().is_dir());
    }

    #[test]
    fn dangling_symlink_is_a_taken_name_never_followed() {
        use crate::error::ErrorKind;
        let (scratch, s, _) = Scratch::new("dangling");
        let target = scratch.dir.join("would-be-created");
        for name in ["__0_0.distcp", ".metadata"] {
            std::os::unix::fs::symlink(&target, s.path(name)).unwrap();
        }
        assert!(s.exists(".metadata").unwrap());
        // A link is refused as a link, not reported as a missing file.
        assert_refused(s.read_all(".metadata"), ErrorKind::Corrupt, &[".metadata", "is a symbolic link"]);
        assert_refused(s.create("__0_0.distcp", false), ErrorKind::AlreadyExists, &["__0_0.distcp"]);
        assert_refused(s.put_new(".metadata", b"x"), ErrorKind::AlreadyExists, &[".metadata"]);
        assert!(!target.exists(), "nothing was created through the link");
        s.remove("__0_0.distcp").unwrap();
        assert!(std::fs::symlink_metadata(s.path("__0_0.distcp")).is_err());
    }

    #[test]
    fn prepare_refuses_a_path_that_is_not_a_directory() {
        let (scratch, _, outside) = Scratch::new("prepare");
        let err = FsStorage::new(&outside).prepare().unwrap_err();
        assert!(err.message().contains("exists and is not a directory"), "{err}");
        let fresh = FsStorage::new(scratch.dir.join("a/b"));
        fresh.prepare().unwrap();
        fresh.prepare().unwrap();
        assert!(scratch.dir.join("a/b").is_dir());
    }
}
