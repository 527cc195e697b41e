//! Errors of the safe core. Every error carries a kind (which maps to exactly one C status code)
//! and a message that names what failed: the key, the file, the offset.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

/// What went wrong, coarsely. Each kind maps to one `dcp_status` value in the C API; the numbers
/// are part of the ABI and are never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(i32)]
pub enum ErrorKind {
    /// An argument is out of range or inconsistent (wrong size, unknown enum value, bad shape).
    InvalidArgument = 2,
    /// An operating-system I/O call failed.
    Io = 3,
    /// A checkpoint file is malformed or truncated.
    Corrupt = 4,
    /// Stored data does not match its checksum.
    Checksum = 5,
    /// A key, file or checkpoint does not exist.
    NotFound = 6,
    /// Saved and registered state disagree (dtype, shape, kind).
    Mismatch = 7,
    /// A committed checkpoint is already at the destination and overwrite is off.
    AlreadyExists = 8,
    /// A peer rank failed or the communicator broke.
    Comm = 9,
    /// A collective did not complete in time.
    Timeout = 10,
    /// The operation is valid but not supported here (no CUDA driver, unknown dtype in a file).
    Unsupported = 11,
    /// A CUDA call failed.
    Cuda = 12,
    /// A bug in libdcp (a caught panic, a broken invariant).
    Internal = 13,
    /// A caller buffer is too small; the message says how large it must be.
    BufferTooSmall = 14,
    /// The file system is full (ENOSPC / EDQUOT).
    NoSpace = 15,
    /// Another operation is in flight (an async save) and the options say not to wait.
    Busy = 16,
}

impl ErrorKind {
    const ALL: [ErrorKind; 15] = {
        use ErrorKind::*;
        [
            InvalidArgument,
            Io,
            Corrupt,
            Checksum,
            NotFound,
            Mismatch,
            AlreadyExists,
            Comm,
            Timeout,
            Unsupported,
            Cuda,
            Internal,
            BufferTooSmall,
            NoSpace,
            Busy,
        ]
    };

    /// The `dcp_status` value of this kind (stable ABI numbers).
    pub fn code(self) -> i32 {
        self as i32
    }

    /// The kind of a `dcp_status` value; `Internal` for a number that is no kind's.
    pub fn from_code(code: i32) -> ErrorKind {
        Self::ALL.into_iter().find(|k| k.code() == code).unwrap_or(ErrorKind::Internal)
    }
}

/// The error type of every fallible libdcp function: a [kind](ErrorKind), a message that says
/// what failed, and, where known, the key, the file and the byte offset it concerns and the
/// underlying error.
///
/// ```
/// use dcp::{Error, ErrorKind};
///
/// let e = Error::corrupt("bad zip record").with_key("model.w").with_file("__0_0.distcp").with_offset(4096);
/// assert_eq!(e.kind(), ErrorKind::Corrupt);
/// assert_eq!((e.key(), e.file(), e.offset()), (Some("model.w"), Some("__0_0.distcp"), Some(4096)));
/// assert_eq!(e.to_string(), "bad zip record");
/// ```
#[derive(Clone, Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    /// Boxed so that `Result<T>` stays small on the paths that never fail.
    details: Option<Box<Details>>,
}

#[derive(Clone, Debug, Default)]
struct Details {
    key: Option<String>,
    file: Option<String>,
    offset: Option<u64>,
    /// Shared so that errors stay `Clone` (an async save's result is read by every waiter).
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

/// `Result` with libdcp's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            details: None,
        }
    }
    /// What went wrong, coarsely.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    /// What failed, in words (the `Display` text).
    pub fn message(&self) -> &str {
        &self.message
    }
    /// The key (fully qualified name) the error concerns, if known.
    pub fn key(&self) -> Option<&str> {
        self.details.as_ref()?.key.as_deref()
    }
    /// The file (a name inside the checkpoint, or a path) the error concerns, if known.
    pub fn file(&self) -> Option<&str> {
        self.details.as_ref()?.file.as_deref()
    }
    /// The byte offset in [`file`](Self::file) the error concerns, if known.
    pub fn offset(&self) -> Option<u64> {
        self.details.as_ref()?.offset
    }
    /// An [`ErrorKind::InvalidArgument`] error.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
    /// An [`ErrorKind::Corrupt`] error.
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, message)
    }
    /// An [`ErrorKind::Mismatch`] error.
    pub fn mismatch(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Mismatch, message)
    }
    /// An [`ErrorKind::NotFound`] error.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    /// An [`ErrorKind::Unsupported`] error.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }
    /// An [`ErrorKind::Internal`] error.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
    /// An [`ErrorKind::Comm`] error.
    pub fn comm(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Comm, message)
    }

    /// An I/O error on `path` while doing `what`; ENOSPC and EDQUOT become [`ErrorKind::NoSpace`],
    /// a missing file [`ErrorKind::NotFound`]. The path is the error's [`file`](Self::file) and
    /// `err` its [`source`](std::error::Error::source).
    pub fn io(what: &str, path: &Path, err: std::io::Error) -> Self {
        let kind = match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::NoSpace,
            _ if err.kind() == std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            _ => ErrorKind::Io,
        };
        let label = if kind == ErrorKind::NoSpace {
            " (ENOSPC: no space left on device)"
        } else {
            ""
        };
        Self::new(kind, format!("{what} {}: {err}{label}", path.display()))
            .with_file(path.display().to_string())
            .with_source(err)
    }

    /// Prefixes the message with more context, keeping the kind and the details.
    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        self.message = format!("{ctx}: {}", self.message);
        self
    }

    fn details_mut(&mut self) -> &mut Details {
        self.details.get_or_insert_with(Default::default)
    }

    /// Sets the key the error concerns, unless one is already set (the innermost site knows best).
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        let d = self.details_mut();
        if d.key.is_none() {
            d.key = Some(key.into());
        }
        self
    }
    /// Sets the file the error concerns, unless one is already set.
    pub fn with_file(mut self, file: impl Into<String>) -> Self {
        let d = self.details_mut();
        if d.file.is_none() {
            d.file = Some(file.into());
        }
        self
    }
    /// Sets the byte offset (in [`file`](Self::file)) the error concerns, unless one is already set.
    pub fn with_offset(mut self, offset: u64) -> Self {
        let d = self.details_mut();
        if d.offset.is_none() {
            d.offset = Some(offset);
        }
        self
    }
    /// Moves the offset from one relative to a buffer to one in the file, where the buffer starts
    /// at `base` (an error with no offset gets `base`, the buffer's start).
    pub(crate) fn rebased(mut self, base: u64) -> Self {
        let d = self.details_mut();
        d.offset = Some(d.offset.map_or(base, |o| base.saturating_add(o)));
        self
    }
    /// Sets the underlying error, returned by [`source`](std::error::Error::source).
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.details_mut().source = Some(Arc::new(source));
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        let source = self.details.as_ref()?.source.as_ref()?;
        Some(source.as_ref() as &(dyn std::error::Error + 'static))
    }
}

/// Locks `mutex`, recovering it if a thread panicked while holding it. Every critical section in
/// libdcp leaves its data consistent (no invariant spans a panic point), and panics are caught at
/// the C boundary, so a poisoned lock is still safe to use; refusing it would turn one caught
/// panic into a context that fails forever.
pub(crate) fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `ensure!(cond, kind_ctor(msg))`: returns the error when the condition fails.
macro_rules! ensure {
    ($cond:expr, $err:expr) => {
        if !$cond {
            return Err($err);
        }
    };
}
pub(crate) use ensure;

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn io_error_exposes_its_source_and_file() {
        let io = std::io::Error::from_raw_os_error(libc::EACCES);
        let e = Error::io("opening", Path::new("/ckpt/__0_0.distcp"), io).context("loading");
        assert_eq!(e.kind(), ErrorKind::Io);
        assert_eq!(e.file(), Some("/ckpt/__0_0.distcp"));
        let source = e.source().expect("an I/O error keeps its io::Error");
        let io = source.downcast_ref::<std::io::Error>().expect("the source is the io::Error");
        assert_eq!(io.raw_os_error(), Some(libc::EACCES));
        assert!(e.to_string().starts_with("loading: opening /ckpt/__0_0.distcp: "), "{e}");
    }

    #[test]
    fn no_space_keeps_its_kind_and_source() {
        let e = Error::io("writing", Path::new("x"), std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        assert!(e.source().is_some());
    }

    #[test]
    fn details_keep_the_innermost_value_and_survive_context() {
        let e = Error::corrupt("bad").with_key("a").with_offset(7).context("outer").with_key("b").with_file("f");
        assert_eq!((e.key(), e.file(), e.offset()), (Some("a"), Some("f"), Some(7)));
        assert_eq!(e.message(), "outer: bad");
        assert!(e.source().is_none());
        let rebased = Error::corrupt("in a pickle").with_offset(5).rebased(100).with_offset(1);
        assert_eq!(rebased.offset(), Some(105));
        assert_eq!(Error::corrupt("no offset").rebased(100).offset(), Some(100));
        let plain = Error::invalid("x");
        assert_eq!((plain.key(), plain.file(), plain.offset()), (None, None, None));
    }

    #[test]
    fn codes_round_trip() {
        for k in ErrorKind::ALL {
            assert_eq!(ErrorKind::from_code(k.code()), k);
        }
        assert_eq!(ErrorKind::from_code(0), ErrorKind::Internal);
        assert_eq!(ErrorKind::Io.code(), 3);
        assert_eq!(ErrorKind::Busy.code(), 16);
    }
}
