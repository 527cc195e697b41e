//! Errors of the safe core. Every error carries a kind (which maps to exactly one C status code)
//! and a message that names what failed: the key, the file, the offset.

use std::fmt;
use std::path::Path;

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

/// The error type of every fallible libdcp function.
#[derive(Clone, Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    pub fn message(&self) -> &str {
        &self.message
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, message)
    }
    pub fn mismatch(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Mismatch, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
    pub fn comm(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Comm, message)
    }

    /// An I/O error on `path` while doing `what`; ENOSPC and EDQUOT become [`ErrorKind::NoSpace`],
    /// a missing file [`ErrorKind::NotFound`].
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
    }

    /// Prefixes the message with more context, keeping the kind.
    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        self.message = format!("{ctx}: {}", self.message);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// `ensure!(cond, kind_ctor(msg))`: returns the error when the condition fails.
macro_rules! ensure {
    ($cond:expr, $err:expr) => {
        if !$cond {
            return Err($err);
        }
    };
}
pub(crate) use ensure;
