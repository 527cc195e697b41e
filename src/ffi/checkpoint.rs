use super::context::dcp_context;
use super::state::{copy_doubles, copy_object, copy_strings, cpu_view, strides_arg, value_kind};
use super::{copy_text_out, dcp_status, dims_arg, free_box, guard, invalid, mut_arg, ref_arg, str_arg, FfiResult};
use crate::engine::{Checkpoint, KeyKind};
use crate::tensor::numel;
use std::ffi::{c_char, c_void, CString};

/// A checkpoint opened read-only. Thread safety: reads may run concurrently from several
/// threads; `dcp_checkpoint_free` must not race with them.
pub struct dcp_checkpoint {
    inner: Checkpoint,
    names: Vec<CString>,
    shapes: Vec<Vec<i64>>,
    /// Per key, per chunk: (offsets, sizes).
    chunks: Vec<Vec<(Vec<i64>, Vec<i64>)>>,
}

/// Kinds of checkpoint keys.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub enum dcp_key_kind {
    DCP_KEY_TENSOR = 1,
    /// A torch.save'd Python object: bytes, int, float, or anything else picklable.
    DCP_KEY_OBJECT = 2,
}

/// Description of one key of an open checkpoint. Pointers stay valid until the checkpoint is
/// freed.
#[repr(C)]
pub struct dcp_key_info {
    /// The key, NUL-terminated.
    pub fqn: *const c_char,
    /// A `dcp_key_kind`.
    pub kind: i32,
    /// A `dcp_dtype` for tensors; 0 for objects and for dtypes this library does not know.
    pub dtype: i32,
    /// Dimensions of the global shape (0 for 0-d tensors and objects).
    pub ndim: i32,
    /// The global shape, `ndim` entries.
    pub shape: *const i64,
    /// Number of saved chunks (pieces) of the tensor.
    pub num_chunks: usize,
}

/// Opens the checkpoint at `path` for inspection (reads and checks `.metadata` and the
/// sidecar). Not collective; thread-safe. `*out` is owned by the caller; free it with
/// `dcp_checkpoint_free`. A directory without `.metadata` gives `DCP_ERROR_NOT_FOUND`. Storage
/// settings come from the environment (for S3 the AWS variables); see
/// `dcp_checkpoint_open_with_context` for a context's storage options.
#[no_mangle]
pub unsafe extern "C" fn dcp_checkpoint_open(path: *const c_char, out: *mut *mut dcp_checkpoint) -> dcp_status {
    guard("dcp_checkpoint_open", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (path, out) = unsafe { (str_arg(path, "path")?, mut_arg(out, "out")?) };
        *out = Box::into_raw(Box::new(wrap_checkpoint(Checkpoint::open(path)?)?));
        Ok(())
    })
}

/// Like `dcp_checkpoint_open`, with the storage options set on `ctx`
/// (`dcp_context_set_storage_option`: an S3 endpoint, credentials), as its saves and loads use
/// them. Not collective; thread-safe (`ctx` is only read). `*out` is owned by the caller; free
/// it with `dcp_checkpoint_free`.
#[no_mangle]
pub unsafe extern "C" fn dcp_checkpoint_open_with_context(
    ctx: *const dcp_context,
    path: *const c_char,
    out: *mut *mut dcp_checkpoint,
) -> dcp_status {
    guard("dcp_checkpoint_open_with_context", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (ctx, path, out) = unsafe { (ref_arg(ctx, "ctx")?, str_arg(path, "path")?, mut_arg(out, "out")?) };
        *out = Box::into_raw(Box::new(wrap_checkpoint(Checkpoint::open_with(&ctx.inner, path)?)?));
        Ok(())
    })
}

/// The C handle of an open checkpoint: its key names, shapes and chunks as C arrays.
fn wrap_checkpoint(inner: Checkpoint) -> FfiResult<dcp_checkpoint> {
    let mut names = Vec::with_capacity(inner.len());
    let mut shapes = Vec::with_capacity(inner.len());
    let mut chunks = Vec::with_capacity(inner.len());
    for k in inner.keys() {
        names.push(CString::new(k.fqn).map_err(|_| invalid(format!("key {:?} contains a NUL byte", k.fqn)))?);
        shapes.push(k.shape.iter().map(|&v| v as i64).collect());
        chunks.push(
            k.chunks
                .iter()
                .map(|c| {
                    (
                        c.offsets.iter().map(|&v| v as i64).collect(),
                        c.sizes.iter().map(|&v| v as i64).collect(),
                    )
                })
                .collect(),
        );
    }
    Ok(dcp_checkpoint {
        inner,
        names,
        shapes,
        chunks,
    })
}

/// Frees an open checkpoint, and with it every pointer its functions returned. NULL is a
/// no-op. Must not race with other calls on the checkpoint. Not collective.
#[no_mangle]
pub unsafe extern "C" fn dcp_checkpoint_free(ckpt: *mut dcp_checkpoint) {
    // SAFETY: `ckpt` is NULL or from `dcp_checkpoint_open`, freed once (header contract).
    unsafe { free_box(ckpt) }
}

/// Number of keys. Not collective; thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_checkpoint_num_keys(ckpt: *const dcp_checkpoint, n: *mut usize) -> dcp_status {
    guard("dcp_checkpoint_num_keys", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (c, n) = unsafe { (ref_arg(ckpt, "ckpt")?, mut_arg(n, "n")?) };
        *n = c.names.len();
        Ok(())
    })
}

/// Describes key number `index` (0-based, in the checkpoint's order). The pointers in `*info`
/// are owned by the checkpoint. Not collective; thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_checkpoint_key(ckpt: *const dcp_checkpoint, index: usize, info: *mut dcp_key_info) -> dcp_status {
    guard("dcp_checkpoint_key", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (c, info) = unsafe { (ref_arg(ckpt, "ckpt")?, mut_arg(info, "info")?) };
        let k = c
            .inner
            .key(index)
            .ok_or_else(|| invalid(format!("index {index} is out of range ({} keys)", c.names.len())))?;
        *info = dcp_key_info {
            fqn: c.names[index].as_ptr(),
            kind: match k.kind {
                KeyKind::Tensor => dcp_key_kind::DCP_KEY_TENSOR,
                KeyKind::Object => dcp_key_kind::DCP_KEY_OBJECT,
            } as i32,
            dtype: k.dtype.map_or(0, |d| d as i32),
            ndim: c.shapes[index].len() as i32,
            shape: c.shapes[index].as_ptr(),
            num_chunks: c.chunks[index].len(),
        };
        Ok(())
    })
}

/// Finds a key's index. A key that is not there gives `DCP_ERROR_NOT_FOUND`. Not collective;
/// thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_checkpoint_find(ckpt: *const dcp_checkpoint, fqn: *const c_char, index: *mut usize) -> dcp_status {
    guard("dcp_checkpoint_find", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (c, fqn) = unsafe { (ref_arg(ckpt, "ckpt")?, str_arg(fqn, "fqn")?) };
        let i = c
            .inner
            .index_of(fqn)
            .ok_or_else(|| crate::Error::not_found(format!("key {fqn:?} is not in the checkpoint")))?;
        // SAFETY: `index` is NULL or writable (header contract).
        *unsafe { mut_arg(index, "index")? } = i;
        Ok(())
    })
}

/// The offsets and sizes (each `ndim` entries, valid until the checkpoint is freed) of saved
/// chunk `chunk` of key `key`. Not collective; thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_checkpoint_chunk(
    ckpt: *const dcp_checkpoint,
    key: usize,
    chunk: usize,
    offsets: *mut *const i64,
    sizes: *mut *const i64,
) -> dcp_status {
    guard("dcp_checkpoint_chunk", || {
        // SAFETY: `ckpt` is NULL or valid (header contract).
        let c = unsafe { ref_arg(ckpt, "ckpt")? };
        let chunks = c
            .chunks
            .get(key)
            .ok_or_else(|| invalid(format!("key index {key} is out of range ({} keys)", c.names.len())))?;
        let (o, s) = chunks
            .get(chunk)
            .ok_or_else(|| invalid(format!("chunk index {chunk} is out of range ({} chunks)", chunks.len())))?;
        // SAFETY: the out-pointers are NULL or writable (header contract).
        let (offsets, sizes) = unsafe { (mut_arg(offsets, "offsets")?, mut_arg(sizes, "sizes")?) };
        *offsets = o.as_ptr();
        *sizes = s.as_ptr();
        Ok(())
    })
}

/// Reads a box of tensor `fqn` into `dst`, with no registration: the box starts at `offsets`
/// and has `sizes` (each `ndim` entries, which must equal the tensor's rank; both NULL: the
/// whole tensor). `dst` receives the elements in the saved dtype, laid out with `strides`
/// (elements; NULL: contiguous) within `dst_nbytes` bytes. CRC-32s are verified. Not
/// collective; thread-safe (concurrent reads into disjoint buffers).
#[no_mangle]
pub unsafe extern "C" fn dcp_checkpoint_read_tensor(
    ckpt: *const dcp_checkpoint,
    fqn: *const c_char,
    ndim: i32,
    offsets: *const i64,
    sizes: *const i64,
    strides: *const i64,
    dst: *mut c_void,
    dst_nbytes: u64,
) -> dcp_status {
    guard("dcp_checkpoint_read_tensor", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (c, fqn) = unsafe { (ref_arg(ckpt, "ckpt")?, str_arg(fqn, "fqn")?) };
        let k = c
            .inner
            .find(fqn)
            .ok_or_else(|| crate::Error::not_found(format!("key {fqn:?} is not in the checkpoint")))?;
        if k.kind != KeyKind::Tensor {
            return Err(crate::Error::mismatch(format!("key {fqn:?} is an object; read it with dcp_checkpoint_read_bytes")).into());
        }
        let dtype = k
            .dtype
            .ok_or_else(|| crate::Error::unsupported(format!("key {fqn:?}: dtype torch.{} is not supported", k.dtype_name)))?;
        if ndim as usize != k.shape.len() {
            return Err(invalid(format!("key {fqn:?} has {} dimensions, not {ndim}", k.shape.len())));
        }
        let (offsets, sizes) = if offsets.is_null() && sizes.is_null() {
            (vec![0; k.shape.len()], k.shape.to_vec())
        } else {
            // SAFETY: both arrays are NULL or hold `ndim` entries (documented above).
            unsafe { (dims_arg(offsets, ndim, "offsets")?, dims_arg(sizes, ndim, "sizes")?) }
        };
        // SAFETY: NULL or `ndim` entries (documented above).
        let strides = unsafe { strides_arg(strides, ndim)? };
        numel(&sizes)?;
        // SAFETY: `dst` is NULL or `dst_nbytes` writable bytes for the call (documented above).
        let view = unsafe { cpu_view(dtype, &sizes, strides.as_deref(), dst, dst_nbytes, ("dst", "dst_nbytes"))? };
        c.inner.read_tensor_into(fqn, &offsets, view, true)?;
        Ok(())
    })
}

/// Reads the non-tensor value `fqn` of the checkpoint.
///
/// # Safety
/// `ckpt` and `fqn` are NULL or valid.
unsafe fn read_object<'a>(ckpt: *const dcp_checkpoint, fqn: *const c_char) -> FfiResult<(&'a str, crate::ObjectValue)> {
    // SAFETY: forwarded from this function's contract.
    let (c, fqn) = unsafe { (ref_arg(ckpt, "ckpt")?, str_arg(fqn, "fqn")?) };
    Ok((fqn, c.inner.read_object(fqn)?))
}

/// The kind (`dcp_value_kind`) of a non-tensor value, as `dcp_state_value_kind` reports it
/// after a load. Not collective; thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_checkpoint_value_kind(ckpt: *const dcp_checkpoint, fqn: *const c_char, kind: *mut i32) -> dcp_status {
    guard("dcp_checkpoint_value_kind", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (_, v) = unsafe { read_object(ckpt, fqn)? };
        // SAFETY: `kind` is NULL or writable (header contract).
        *unsafe { mut_arg(kind, "kind")? } = value_kind(&v);
        Ok(())
    })
}

/// Reads a non-tensor value as in `dcp_state_get_bytes`: raw bytes for a bytes value, the
/// pickle (data.pkl) for any other object, with the `dcp_value_kind` in `*kind` (may be NULL)
/// and a size query through `*len`. Not collective; thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_checkpoint_read_bytes(
    ckpt: *const dcp_checkpoint,
    fqn: *const c_char,
    buf: *mut c_void,
    cap: usize,
    len: *mut usize,
    kind: *mut i32,
) -> dcp_status {
    guard("dcp_checkpoint_read_bytes", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (_, v) = unsafe { read_object(ckpt, fqn)? };
        // SAFETY: `len` and `kind` are NULL or writable; `buf` is NULL or `cap` bytes.
        unsafe { copy_object(&v, buf, cap, len, kind) }
    })
}

/// Reads an int value (a float with an integral value converts), as `dcp_state_get_int`. Not
/// collective; thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_checkpoint_read_int(ckpt: *const dcp_checkpoint, fqn: *const c_char, value: *mut i64) -> dcp_status {
    guard("dcp_checkpoint_read_int", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (fqn, v) = unsafe { read_object(ckpt, fqn)? };
        let converted = v.to_int(fqn)?;
        // SAFETY: `value` is NULL or writable (header contract).
        *unsafe { mut_arg(value, "value")? } = converted;
        Ok(())
    })
}

/// Reads a float value (an int converts), as `dcp_state_get_double`. Not collective;
/// thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_checkpoint_read_double(ckpt: *const dcp_checkpoint, fqn: *const c_char, value: *mut f64) -> dcp_status {
    guard("dcp_checkpoint_read_double", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (fqn, v) = unsafe { read_object(ckpt, fqn)? };
        let converted = v.to_float(fqn)?;
        // SAFETY: `value` is NULL or writable (header contract).
        *unsafe { mut_arg(value, "value")? } = converted;
        Ok(())
    })
}

/// Reads a Python `bool` value, as `dcp_state_get_bool`. Not collective; thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_checkpoint_read_bool(ckpt: *const dcp_checkpoint, fqn: *const c_char, value: *mut bool) -> dcp_status {
    guard("dcp_checkpoint_read_bool", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (fqn, v) = unsafe { read_object(ckpt, fqn)? };
        let converted = v.to_bool(fqn)?;
        // SAFETY: `value` is NULL or writable (header contract).
        *unsafe { mut_arg(value, "value")? } = converted;
        Ok(())
    })
}

/// Reads a list or tuple of numbers as doubles, as `dcp_state_get_doubles` (`cap` and `*len`
/// count doubles). Not collective; thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_checkpoint_read_doubles(
    ckpt: *const dcp_checkpoint,
    fqn: *const c_char,
    buf: *mut f64,
    cap: usize,
    len: *mut usize,
) -> dcp_status {
    guard("dcp_checkpoint_read_doubles", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (fqn, v) = unsafe { read_object(ckpt, fqn)? };
        // SAFETY: `len` is NULL or writable; `buf` is NULL or holds `cap` doubles.
        unsafe { copy_doubles(fqn, &v, buf, cap, len) }
    })
}

/// Reads a list or tuple of strings, NUL after each, as `dcp_state_get_strings`. Not
/// collective; thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_checkpoint_read_strings(
    ckpt: *const dcp_checkpoint,
    fqn: *const c_char,
    buf: *mut c_char,
    cap: usize,
    len: *mut usize,
    count: *mut usize,
) -> dcp_status {
    guard("dcp_checkpoint_read_strings", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (fqn, v) = unsafe { read_object(ckpt, fqn)? };
        // SAFETY: `len` and `count` are NULL or writable; `buf` is NULL or `cap` bytes.
        unsafe { copy_strings(fqn, &v, buf, cap, len, count) }
    })
}

/// Reads a non-tensor value as Python literal text, as in `dcp_state_get_literal`. Not
/// collective; thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_checkpoint_read_literal(
    ckpt: *const dcp_checkpoint,
    fqn: *const c_char,
    buf: *mut c_char,
    cap: usize,
    len: *mut usize,
) -> dcp_status {
    guard("dcp_checkpoint_read_literal", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (fqn, v) = unsafe { read_object(ckpt, fqn)? };
        let text = v.to_literal(fqn)?;
        // SAFETY: `len` is NULL or writable; `buf` is NULL or `cap` bytes (documented above).
        unsafe { copy_text_out(text.as_bytes(), buf, cap, len, "literal") }
    })
}
