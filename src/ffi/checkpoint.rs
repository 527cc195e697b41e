use super::state::{copy_literal, copy_object, cpu_view, literal_of, object_as_double, object_as_int, strides_arg};
use super::{dcp_status, dims_arg, free_box, guard, invalid, mut_arg, ref_arg, str_arg, FfiResult};
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
/// sidecar). Not collective. `*out` is owned by the caller; free it with
/// `dcp_checkpoint_free`. A directory without `.metadata` gives `DCP_ERROR_NOT_FOUND`.
#[no_mangle]
pub unsafe extern "C" fn dcp_checkpoint_open(path: *const c_char, out: *mut *mut dcp_checkpoint) -> dcp_status {
    guard("dcp_checkpoint_open", || {
        let path = str_arg(path, "path")?;
        let out = mut_arg(out, "out")?;
        let inner = Checkpoint::open(path)?;
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
        *out = Box::into_raw(Box::new(dcp_checkpoint {
            inner,
            names,
            shapes,
            chunks,
        }));
        Ok(())
    })
}

/// Frees an open checkpoint. NULL is a no-op.
#[no_mangle]
pub unsafe extern "C" fn dcp_checkpoint_free(ckpt: *mut dcp_checkpoint) {
    free_box(ckpt)
}

/// Number of keys.
#[no_mangle]
pub unsafe extern "C" fn dcp_checkpoint_num_keys(ckpt: *const dcp_checkpoint, n: *mut usize) -> dcp_status {
    guard("dcp_checkpoint_num_keys", || {
        *mut_arg(n, "n")? = ref_arg(ckpt, "ckpt")?.names.len();
        Ok(())
    })
}

/// Describes key number `index` (0-based, in the checkpoint's order).
#[no_mangle]
pub unsafe extern "C" fn dcp_checkpoint_key(ckpt: *const dcp_checkpoint, index: usize, info: *mut dcp_key_info) -> dcp_status {
    guard("dcp_checkpoint_key", || {
        let c = ref_arg(ckpt, "ckpt")?;
        let info = mut_arg(info, "info")?;
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

/// Finds a key's index. A key that is not there gives `DCP_ERROR_NOT_FOUND`.
#[no_mangle]
pub unsafe extern "C" fn dcp_checkpoint_find(ckpt: *const dcp_checkpoint, fqn: *const c_char, index: *mut usize) -> dcp_status {
    guard("dcp_checkpoint_find", || {
        let c = ref_arg(ckpt, "ckpt")?;
        let fqn = str_arg(fqn, "fqn")?;
        let i = c
            .inner
            .index_of(fqn)
            .ok_or_else(|| crate::Error::not_found(format!("key {fqn:?} is not in the checkpoint")))?;
        *mut_arg(index, "index")? = i;
        Ok(())
    })
}

/// The offsets and sizes (each `ndim` entries, valid until the checkpoint is freed) of saved
/// chunk `chunk` of key `key`.
#[no_mangle]
pub unsafe extern "C" fn dcp_checkpoint_chunk(
    ckpt: *const dcp_checkpoint,
    key: usize,
    chunk: usize,
    offsets: *mut *const i64,
    sizes: *mut *const i64,
) -> dcp_status {
    guard("dcp_checkpoint_chunk", || {
        let c = ref_arg(ckpt, "ckpt")?;
        let chunks = c
            .chunks
            .get(key)
            .ok_or_else(|| invalid(format!("key index {key} is out of range ({} keys)", c.names.len())))?;
        let (o, s) = chunks
            .get(chunk)
            .ok_or_else(|| invalid(format!("chunk index {chunk} is out of range ({} chunks)", chunks.len())))?;
        *mut_arg(offsets, "offsets")? = o.as_ptr();
        *mut_arg(sizes, "sizes")? = s.as_ptr();
        Ok(())
    })
}

/// Reads a box of tensor `fqn` into `dst`, with no registration: the box starts at `offsets`
/// and has `sizes` (each `ndim` entries, which must equal the tensor's rank; both NULL: the
/// whole tensor). `dst` receives the elements in the saved dtype, laid out with `strides`
/// (elements; NULL: contiguous) within `dst_nbytes` bytes. CRC-32s are verified.
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
        let c = ref_arg(ckpt, "ckpt")?;
        let fqn = str_arg(fqn, "fqn")?;
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
            (dims_arg(offsets, ndim, "offsets")?, dims_arg(sizes, ndim, "sizes")?)
        };
        let strides = strides_arg(strides, ndim)?;
        numel(&sizes)?;
        let view = cpu_view(dtype, &sizes, strides.as_deref(), dst, dst_nbytes, ("dst", "dst_nbytes"))?;
        c.inner.read_tensor_into(fqn, &offsets, view, true)?;
        Ok(())
    })
}

fn object<'c>(c: &'c dcp_checkpoint, fqn: &str) -> FfiResult<crate::ObjectValue> {
    Ok(c.inner.read_object(fqn)?)
}

/// Reads a non-tensor value as in `dcp_state_get_bytes`: raw bytes for a bytes value, the
/// pickle (data.pkl) for any other object, with the `dcp_value_kind` in `*kind` (may be NULL)
/// and a size query through `*len`.
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
        let c = ref_arg(ckpt, "ckpt")?;
        let v = object(c, str_arg(fqn, "fqn")?)?;
        copy_object(&v, buf, cap, len, kind)
    })
}

/// Reads an int value (a float with an integral value converts).
#[no_mangle]
pub unsafe extern "C" fn dcp_checkpoint_read_int(ckpt: *const dcp_checkpoint, fqn: *const c_char, value: *mut i64) -> dcp_status {
    guard("dcp_checkpoint_read_int", || {
        let fqn = str_arg(fqn, "fqn")?;
        let v = object(ref_arg(ckpt, "ckpt")?, fqn)?;
        *mut_arg(value, "value")? = object_as_int(fqn, &v)?;
        Ok(())
    })
}

/// Reads a float value (an int converts).
#[no_mangle]
pub unsafe extern "C" fn dcp_checkpoint_read_double(ckpt: *const dcp_checkpoint, fqn: *const c_char, value: *mut f64) -> dcp_status {
    guard("dcp_checkpoint_read_double", || {
        let fqn = str_arg(fqn, "fqn")?;
        let v = object(ref_arg(ckpt, "ckpt")?, fqn)?;
        *mut_arg(value, "value")? = object_as_double(fqn, &v)?;
        Ok(())
    })
}

/// Reads a non-tensor value as Python literal text, as in `dcp_state_get_literal`.
#[no_mangle]
pub unsafe extern "C" fn dcp_checkpoint_read_literal(
    ckpt: *const dcp_checkpoint,
    fqn: *const c_char,
    buf: *mut c_char,
    cap: usize,
    len: *mut usize,
) -> dcp_status {
    guard("dcp_checkpoint_read_literal", || {
        let fqn = str_arg(fqn, "fqn")?;
        let v = object(ref_arg(ckpt, "ckpt")?, fqn)?;
        copy_literal(&literal_of(fqn, &v)?, buf, cap, len)
    })
}
