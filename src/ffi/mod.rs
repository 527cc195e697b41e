//! The C API: every `extern "C"` function and nothing else. Each body runs inside [`guard`]
//! (panics become `DCP_ERROR_INTERNAL`), checks its pointers through the helpers below, converts
//! enums from `int32_t` with `TryFrom`, and calls the safe core.
//!
//! Logic lives in the safe layers (placement codes in [`crate::mesh`], typed reads of values
//! in [`crate::format::pyobj`], missing keys in [`crate::engine::LoadReport`]); what stays here
//! is what only the boundary needs: pointer checks, C types, status codes.
//!
//! Every exported function's safety contract is the header's: pointer arguments are NULL or
//! point to what their documentation says (objects made by this library and not yet freed,
//! NUL-terminated strings, arrays of the stated length), and an object is not used from two
//! threads at once unless its documentation allows it.
#![allow(non_camel_case_types)]
#![allow(clippy::missing_safety_doc)]
#![deny(unsafe_op_in_unsafe_fn)]

// Declared in the order the header lists them.
mod checkpoint;
mod context;
mod io;
mod manager;
mod options;
mod state;

pub use context::*;
pub(crate) use io::dcp_future;
pub use options::*;
pub use state::*;

use crate::error::{Error, ErrorKind};
use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Status of every fallible call. The numbers are stable and never reused.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum dcp_status {
    /// Success.
    DCP_OK = 0,
    /// A required pointer argument was NULL.
    DCP_ERROR_NULL_ARGUMENT = 1,
    /// An argument is out of range or inconsistent (unknown enum value, wrong size or shape).
    DCP_ERROR_INVALID_ARGUMENT = 2,
    /// An operating-system I/O call failed.
    DCP_ERROR_IO = 3,
    /// A checkpoint file is malformed or truncated.
    DCP_ERROR_CORRUPT = 4,
    /// Stored data does not match its CRC-32.
    DCP_ERROR_CHECKSUM = 5,
    /// A key, file or checkpoint does not exist.
    DCP_ERROR_NOT_FOUND = 6,
    /// Saved and registered state disagree (dtype, shape, kind).
    DCP_ERROR_MISMATCH = 7,
    /// A committed checkpoint exists at the destination and overwrite is off.
    DCP_ERROR_ALREADY_EXISTS = 8,
    /// A peer rank failed or the communicator broke.
    DCP_ERROR_COMM = 9,
    /// A collective did not complete within the timeout.
    DCP_ERROR_TIMEOUT = 10,
    /// Valid but not supported by this build or machine.
    DCP_ERROR_UNSUPPORTED = 11,
    /// A CUDA call failed.
    DCP_ERROR_CUDA = 12,
    /// A bug in libdcp (including a caught panic).
    DCP_ERROR_INTERNAL = 13,
    /// A caller buffer is too small; the length out-parameter holds the size needed.
    DCP_ERROR_BUFFER_TOO_SMALL = 14,
    /// The file system is full.
    DCP_ERROR_NO_SPACE = 15,
    /// Another operation (an async save) is in flight.
    DCP_ERROR_BUSY = 16,
}

/// Every status with its name (NUL-terminated for C).
const STATUSES: [(dcp_status, &str); 17] = {
    use dcp_status::*;
    [
        (DCP_OK, "DCP_OK\0"),
        (DCP_ERROR_NULL_ARGUMENT, "DCP_ERROR_NULL_ARGUMENT\0"),
        (DCP_ERROR_INVALID_ARGUMENT, "DCP_ERROR_INVALID_ARGUMENT\0"),
        (DCP_ERROR_IO, "DCP_ERROR_IO\0"),
        (DCP_ERROR_CORRUPT, "DCP_ERROR_CORRUPT\0"),
        (DCP_ERROR_CHECKSUM, "DCP_ERROR_CHECKSUM\0"),
        (DCP_ERROR_NOT_FOUND, "DCP_ERROR_NOT_FOUND\0"),
        (DCP_ERROR_MISMATCH, "DCP_ERROR_MISMATCH\0"),
        (DCP_ERROR_ALREADY_EXISTS, "DCP_ERROR_ALREADY_EXISTS\0"),
        (DCP_ERROR_COMM, "DCP_ERROR_COMM\0"),
        (DCP_ERROR_TIMEOUT, "DCP_ERROR_TIMEOUT\0"),
        (DCP_ERROR_UNSUPPORTED, "DCP_ERROR_UNSUPPORTED\0"),
        (DCP_ERROR_CUDA, "DCP_ERROR_CUDA\0"),
        (DCP_ERROR_INTERNAL, "DCP_ERROR_INTERNAL\0"),
        (DCP_ERROR_BUFFER_TOO_SMALL, "DCP_ERROR_BUFFER_TOO_SMALL\0"),
        (DCP_ERROR_NO_SPACE, "DCP_ERROR_NO_SPACE\0"),
        (DCP_ERROR_BUSY, "DCP_ERROR_BUSY\0"),
    ]
};

impl dcp_status {
    /// The status of an error kind (their numbers agree, see `ErrorKind::code`).
    fn from_kind(kind: ErrorKind) -> dcp_status {
        STATUSES
            .iter()
            .map(|(s, _)| *s)
            .find(|s| *s as i32 == kind.code())
            .unwrap_or(dcp_status::DCP_ERROR_INTERNAL)
    }
}

/// Element types (`int32_t dtype` arguments take these values).
// Read by cbindgen for include/dcp.h; Rust code converts through `DType::try_from`.
#[allow(dead_code)]
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub enum dcp_dtype {
    DCP_FLOAT32 = 1,
    DCP_FLOAT64 = 2,
    DCP_FLOAT16 = 3,
    DCP_BFLOAT16 = 4,
    DCP_FLOAT8_E4M3FN = 5,
    DCP_FLOAT8_E5M2 = 6,
    DCP_INT64 = 7,
    DCP_INT32 = 8,
    DCP_INT16 = 9,
    DCP_INT8 = 10,
    DCP_UINT8 = 11,
    DCP_BOOL = 12,
    DCP_COMPLEX64 = 13,
    DCP_COMPLEX128 = 14,
    DCP_UINT16 = 15,
    DCP_UINT32 = 16,
    DCP_UINT64 = 17,
}

/// What a non-tensor value holds (`int32_t *kind` out-parameters take these values).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub enum dcp_value_kind {
    /// A Python `bytes` object: the raw bytes.
    DCP_VALUE_BYTES = 1,
    /// A Python `int` that fits in int64.
    DCP_VALUE_INT = 2,
    /// A Python `float`.
    DCP_VALUE_DOUBLE = 3,
    /// Any other Python object; the bytes are its pickle (protocol 2, as torch.save writes).
    DCP_VALUE_PICKLE = 4,
}

/// An error crossing the boundary.
pub(crate) struct FfiError {
    status: dcp_status,
    message: String,
    /// Where it happened, when the safe core knew: the key, the file, the byte offset in it.
    key: Option<String>,
    file: Option<String>,
    offset: Option<u64>,
}

impl FfiError {
    pub(crate) fn plain(status: dcp_status, message: String) -> Self {
        FfiError {
            status,
            message,
            key: None,
            file: None,
            offset: None,
        }
    }
}

impl From<Error> for FfiError {
    fn from(e: Error) -> Self {
        FfiError {
            status: dcp_status::from_kind(e.kind()),
            message: e.message().to_string(),
            key: e.key().map(str::to_string),
            file: e.file().map(str::to_string),
            offset: e.offset(),
        }
    }
}

pub(crate) type FfiResult<T = ()> = Result<T, FfiError>;

pub(crate) fn null(name: &str) -> FfiError {
    FfiError::plain(dcp_status::DCP_ERROR_NULL_ARGUMENT, format!("argument `{name}` is NULL"))
}

pub(crate) fn invalid(message: impl Into<String>) -> FfiError {
    FfiError::plain(dcp_status::DCP_ERROR_INVALID_ARGUMENT, message.into())
}

/// The last failed call's error on this thread, as C strings ("" for a field not known).
#[derive(Default)]
struct LastError {
    message: CString,
    key: CString,
    file: CString,
    offset: Option<u64>,
}

thread_local! {
    static LAST_ERROR: RefCell<LastError> = RefCell::new(LastError::default());
}

pub(crate) fn c_text(text: &str) -> CString {
    CString::new(text.replace('\0', "\\0")).unwrap_or_default()
}

fn set_last_error(func: &str, e: &FfiError) {
    let last = LastError {
        message: c_text(&format!("{func}: {}", e.message)),
        key: c_text(e.key.as_deref().unwrap_or("")),
        file: c_text(e.file.as_deref().unwrap_or("")),
        offset: e.offset,
    };
    LAST_ERROR.with(|cell| *cell.borrow_mut() = last);
}

/// Runs an exported function's body: converts errors to a status plus the thread's last-error
/// message, and panics to `DCP_ERROR_INTERNAL`.
pub(crate) fn guard(func: &str, body: impl FnOnce() -> FfiResult) -> dcp_status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => dcp_status::DCP_OK,
        Ok(Err(e)) => {
            set_last_error(func, &e);
            e.status
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            set_last_error(
                func,
                &FfiError::plain(dcp_status::DCP_ERROR_INTERNAL, format!("internal error (panic): {what}")),
            );
            dcp_status::DCP_ERROR_INTERNAL
        }
    }
}

/// For functions that return nothing (the `_free`s): swallows panics.
pub(crate) fn guard_void(body: impl FnOnce()) {
    let _ = catch_unwind(AssertUnwindSafe(body));
}

/// The body of every `_free` function: drops a box made by `Box::into_raw`; NULL is a no-op.
///
/// # Safety
/// `p` is NULL or a pointer this library returned for a `T` that has not been freed yet.
pub(crate) unsafe fn free_box<T>(p: *mut T) {
    guard_void(|| {
        if !p.is_null() {
            // SAFETY: per this function's contract `p` came from `Box::into_raw` and is freed once.
            drop(unsafe { Box::from_raw(p) });
        }
    })
}

/// Threads per rank of save and load options, 1..=`MAX_THREADS` (the engine's one check).
pub(crate) fn threads_arg(threads: u32) -> FfiResult<usize> {
    let n = threads as usize;
    crate::engine::workers::check_thread_count("threads", n)?;
    Ok(n)
}

/// A C string argument as UTF-8.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that outlives `'a`.
pub(crate) unsafe fn str_arg<'a>(p: *const c_char, name: &str) -> FfiResult<&'a str> {
    if p.is_null() {
        return Err(null(name));
    }
    // SAFETY: `p` is non-NULL and NUL-terminated per this function's contract.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| invalid(format!("argument `{name}` is not valid UTF-8")))
}

/// # Safety
/// `p` is NULL or points to a valid `T` that is not written during `'a`.
pub(crate) unsafe fn ref_arg<'a, T>(p: *const T, name: &str) -> FfiResult<&'a T> {
    // SAFETY: NULL is checked by `as_ref`; otherwise `p` is valid per this function's contract.
    unsafe { p.as_ref() }.ok_or_else(|| null(name))
}

/// # Safety
/// `p` is NULL or points to a valid `T` that nothing else accesses during `'a`.
pub(crate) unsafe fn mut_arg<'a, T>(p: *mut T, name: &str) -> FfiResult<&'a mut T> {
    // SAFETY: NULL is checked by `as_mut`; otherwise `p` is valid and unaliased per the contract.
    unsafe { p.as_mut() }.ok_or_else(|| null(name))
}

/// Most dimensions of a tensor argument.
const MAX_NDIM: i32 = 64;

/// `n` dimensions from a C array; NULL is allowed when `n` is 0; negative values are rejected.
///
/// # Safety
/// `p` is NULL or points to at least `n` readable `i64`s.
pub(crate) unsafe fn dims_arg(p: *const i64, n: i32, name: &str) -> FfiResult<Vec<u64>> {
    if !(0..=MAX_NDIM).contains(&n) {
        return Err(invalid(format!("`ndim` must be 0..={MAX_NDIM}, not {n}")));
    }
    if n == 0 {
        return Ok(vec![]);
    }
    if p.is_null() {
        return Err(null(name));
    }
    // SAFETY: `p` is non-NULL with `n` (checked positive) elements per this function's contract.
    unsafe { std::slice::from_raw_parts(p, n as usize) }
        .iter()
        .map(|&v| u64::try_from(v).map_err(|_| invalid(format!("`{name}` has a negative value {v}"))))
        .collect()
}

/// `(NULL, 0)` is the empty slice.
///
/// # Safety
/// `p` is NULL or points to `len` readable bytes that are not written during `'a`.
pub(crate) unsafe fn bytes_arg<'a>(p: *const u8, len: usize, name: &str) -> FfiResult<&'a [u8]> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(null(name));
    }
    // SAFETY: `p` is non-NULL with `len` bytes per this function's contract.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// Writes `items` to a caller buffer with a size query: `len` always receives the number of
/// items; a buffer that is NULL or holds fewer gives `DCP_ERROR_BUFFER_TOO_SMALL` (`what`
/// names the unit in that message: "bytes", "numbers").
///
/// # Safety
/// `len` is NULL or writable; `buf` is NULL or points to `cap` writable `T`s.
pub(crate) unsafe fn copy_items_out<T: Copy>(items: &[T], buf: *mut T, cap: usize, len: *mut usize, what: &str) -> FfiResult {
    // SAFETY: `len` is NULL or writable per this function's contract.
    let len = unsafe { mut_arg(len, "len")? };
    *len = items.len();
    if items.is_empty() {
        return Ok(());
    }
    if buf.is_null() || cap < items.len() {
        return Err(FfiError::plain(
            dcp_status::DCP_ERROR_BUFFER_TOO_SMALL,
            format!(
                "the value has {} {what} but the buffer holds {cap}; `len` holds the size needed",
                items.len()
            ),
        ));
    }
    // SAFETY: `buf` is non-NULL with room for `cap` >= `items.len()` items (contract), and
    // caller memory cannot overlap the library's `items`.
    unsafe { std::ptr::copy_nonoverlapping(items.as_ptr(), buf, items.len()) };
    Ok(())
}

/// [`copy_items_out`] for bytes.
///
/// # Safety
/// As for [`copy_items_out`].
pub(crate) unsafe fn copy_out(data: &[u8], buf: *mut u8, cap: usize, len: *mut usize) -> FfiResult {
    // SAFETY: this function's contract is `copy_items_out`'s.
    unsafe { copy_items_out(data, buf, cap, len, "bytes") }
}

/// Writes `text` and a NUL to a caller buffer with a size query: `len` always receives the
/// text's length without the NUL; `cap` must hold the NUL too, else
/// `DCP_ERROR_BUFFER_TOO_SMALL`.
///
/// # Safety
/// `len` is NULL or writable; `buf` is NULL or points to `cap` writable bytes.
pub(crate) unsafe fn copy_text_out(text: &[u8], buf: *mut c_char, cap: usize, len: *mut usize, what: &str) -> FfiResult {
    // SAFETY: `len` is NULL or writable per this function's contract.
    let len = unsafe { mut_arg(len, "len")? };
    *len = text.len();
    if buf.is_null() || cap <= text.len() {
        return Err(FfiError::plain(
            dcp_status::DCP_ERROR_BUFFER_TOO_SMALL,
            format!(
                "the {what} has {} characters and needs a buffer of {} bytes (with its NUL), not {cap}",
                text.len(),
                text.len() + 1
            ),
        ));
    }
    // SAFETY: `buf` is non-NULL with `cap` > `text.len()` writable bytes (contract); caller
    // memory cannot overlap the library's `text`.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), buf as *mut u8, text.len());
        *buf.add(text.len()) = 0;
    }
    Ok(())
}

/// The message of the last failed call on this thread ("" if none). The pointer stays valid
/// until the next failing libdcp call on the same thread. Never NULL. Thread safety: per thread.
/// Not collective.
#[no_mangle]
pub extern "C" fn dcp_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().message.as_ptr())
}

/// The key (fully qualified name) the last failed call on this thread was working on, when it
/// was about one key ("" otherwise). Valid, never NULL and per thread as `dcp_last_error`.
/// Not collective.
#[no_mangle]
pub extern "C" fn dcp_last_error_key() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().key.as_ptr())
}

/// The file (a name inside the checkpoint, or a path) the last failed call on this thread was
/// reading or writing, when it was about one file ("" otherwise). Valid, never NULL and per
/// thread as `dcp_last_error`. Not collective.
#[no_mangle]
pub extern "C" fn dcp_last_error_file() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().file.as_ptr())
}

/// The byte offset in `dcp_last_error_file()` where the last failed call on this thread found
/// the problem, or -1 when it is not known. Per thread; not collective.
#[no_mangle]
pub extern "C" fn dcp_last_error_offset() -> i64 {
    LAST_ERROR.with(|e| e.borrow().offset.and_then(|o| i64::try_from(o).ok()).unwrap_or(-1))
}

/// The library version, e.g. "0.1.0". A static string; never NULL. Not collective; thread-safe.
#[no_mangle]
pub extern "C" fn dcp_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// A static name for a status value ("DCP_OK", "DCP_ERROR_IO", ...; "DCP_UNKNOWN_STATUS" for
/// values this version does not define). Never NULL. Not collective; thread-safe.
#[no_mangle]
pub extern "C" fn dcp_status_name(status: i32) -> *const c_char {
    let name = STATUSES
        .iter()
        .find(|(s, _)| *s as i32 == status)
        .map_or("DCP_UNKNOWN_STATUS\0", |(_, n)| n);
    name.as_ptr() as *const c_char
}
