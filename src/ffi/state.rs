use super::{
    bytes_arg, copy_out, dcp_status, dcp_value_kind, dims_arg, free_box, guard, invalid, mut_arg, ref_arg, str_arg, FfiError, FfiResult,
};
use crate::format::metadata::PathPart;
use crate::format::pyobj::ObjectValue;
use crate::mesh::Placement;
use crate::state::State;
use crate::tensor::{DType, Device, TensorView};
use std::ffi::{c_char, c_void, CString};

/// The state one rank registers: tensors (borrowed caller memory), bytes and scalars (copied).
/// Thread safety: not thread-safe; do not modify it while a save or load uses it.
pub struct dcp_state {
    pub(crate) inner: State<'static>,
    pub(crate) missing_c: Vec<CString>,
}

impl dcp_state {
    pub(crate) fn refresh_missing(&mut self) {
        self.missing_c = self
            .inner
            .missing()
            .iter()
            .map(|k| CString::new(k.as_str()).unwrap_or_default())
            .collect();
    }
}

/// Creates an empty state. `*out` is owned by the caller; free it with `dcp_state_free`.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_new(out: *mut *mut dcp_state) -> dcp_status {
    guard("dcp_state_new", || {
        let out = mut_arg(out, "out")?;
        *out = Box::into_raw(Box::new(dcp_state {
            inner: State::new(),
            missing_c: vec![],
        }));
        Ok(())
    })
}

/// Frees a state (not the tensor memory it refers to). NULL is a no-op.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_free(state: *mut dcp_state) {
    free_box(state)
}

unsafe fn view_arg(
    dtype: i32,
    ndim: i32,
    sizes: *const i64,
    strides: *const i64,
    data: *mut c_void,
    nbytes: u64,
) -> FfiResult<TensorView<'static>> {
    let dtype = DType::try_from(dtype)?;
    let sizes = dims_arg(sizes, ndim, "sizes")?;
    let strides = strides_arg(strides, ndim)?;
    cpu_view(dtype, &sizes, strides.as_deref(), data, nbytes, ("data", "nbytes"))
}

/// `ndim` strides in elements; NULL: contiguous (`None`).
pub(crate) unsafe fn strides_arg(strides: *const i64, ndim: i32) -> FfiResult<Option<Vec<u64>>> {
    if strides.is_null() {
        Ok(None)
    } else {
        Ok(Some(dims_arg(strides, ndim, "strides")?))
    }
}

/// A view of caller CPU memory: `data` of `nbytes` bytes (`names`: how errors call the two
/// arguments). `data` may be NULL only when the view has no elements.
pub(crate) unsafe fn cpu_view(
    dtype: DType,
    sizes: &[u64],
    strides: Option<&[u64]>,
    data: *mut c_void,
    nbytes: u64,
    names: (&str, &str),
) -> FfiResult<TensorView<'static>> {
    let (data_name, nbytes_name) = names;
    let nbytes = usize::try_from(nbytes).map_err(|_| invalid(format!("{nbytes_name} does not fit in memory")))?;
    if data.is_null() && sizes.iter().all(|&s| s > 0) {
        return Err(super::null(data_name));
    }
    Ok(TensorView::from_raw(data as *mut u8, nbytes, dtype, sizes, strides, Device::Cpu)?)
}

/// `view_arg` with errors prefixed by the key.
unsafe fn keyed_view_arg(
    fqn: &str,
    dtype: i32,
    ndim: i32,
    sizes: *const i64,
    strides: *const i64,
    data: *mut c_void,
    nbytes: u64,
) -> FfiResult<TensorView<'static>> {
    view_arg(dtype, ndim, sizes, strides, data, nbytes).map_err(|mut e| {
        e.message = format!("key {fqn:?}: {}", e.message);
        e
    })
}

/// Registers a whole CPU tensor under `fqn` (e.g. "model.net1.weight").
///
/// `dtype` is a `dcp_dtype`; `sizes` has `ndim` entries (NULL when `ndim` is 0, a scalar);
/// `strides` are in elements (NULL: contiguous; any non-negative strides are allowed, e.g. a
/// transposed view); `data` points to caller memory of at least `nbytes` bytes covering every
/// element. The memory is borrowed: it must stay valid, and must not be freed, until the state
/// is freed. Save reads it; load writes it.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_add_tensor(
    state: *mut dcp_state,
    fqn: *const c_char,
    dtype: i32,
    ndim: i32,
    sizes: *const i64,
    strides: *const i64,
    data: *mut c_void,
    nbytes: u64,
) -> dcp_status {
    guard("dcp_state_add_tensor", || {
        let state = mut_arg(state, "state")?;
        let fqn = str_arg(fqn, "fqn")?;
        let view = keyed_view_arg(fqn, dtype, ndim, sizes, strides, data, nbytes)?;
        state.inner.add_tensor(fqn, view)?;
        Ok(())
    })
}

/// Registers a CPU tensor that is one piece of a larger global tensor: the piece (described
/// as in `dcp_state_add_tensor`) sits at `offsets` (ndim entries) of a global tensor of
/// `global_shape` (ndim entries). This is the explicit-chunk form for flat or irregular
/// layouts; the pieces of all ranks must tile the global tensor.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_add_tensor_chunk(
    state: *mut dcp_state,
    fqn: *const c_char,
    dtype: i32,
    ndim: i32,
    sizes: *const i64,
    strides: *const i64,
    data: *mut c_void,
    nbytes: u64,
    global_shape: *const i64,
    offsets: *const i64,
) -> dcp_status {
    guard("dcp_state_add_tensor_chunk", || {
        let state = mut_arg(state, "state")?;
        let fqn = str_arg(fqn, "fqn")?;
        let view = keyed_view_arg(fqn, dtype, ndim, sizes, strides, data, nbytes)?;
        let shape = dims_arg(global_shape, ndim, "global_shape")?;
        let offsets = dims_arg(offsets, ndim, "offsets")?;
        state.inner.add_tensor_chunk(fqn, view, &shape, &offsets)?;
        Ok(())
    })
}

/// Registers this rank's shard of a tensor laid out over `mesh` by `placements`: one int32 per
/// mesh dimension, `DCP_REPLICATE`, `DCP_SHARD(d)` (tensor dim `d` split like `torch.chunk`;
/// shards of one dim on several mesh dims nest left to right, as in DTensor) or
/// `DCP_STRIDED_SHARD(d)` (applied after the plain shards of later mesh dims: FSDP over tensor
/// parallelism, torch's `_StridedShard`). The library computes the box this rank holds; the
/// local tensor (described as in `dcp_state_add_tensor`) must have exactly that shape, else
/// `DCP_ERROR_INVALID_ARGUMENT` with both shapes in the message. Uneven and empty shards are
/// fine. Registering the same key with the same mesh and placements on every rank of the mesh
/// lets saves skip exchanging plans.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_add_tensor_sharded(
    state: *mut dcp_state,
    fqn: *const c_char,
    dtype: i32,
    ndim: i32,
    sizes: *const i64,
    strides: *const i64,
    data: *mut c_void,
    nbytes: u64,
    global_shape: *const i64,
    mesh: *const super::dcp_mesh,
    placements: *const i32,
) -> dcp_status {
    guard("dcp_state_add_tensor_sharded", || {
        let state = mut_arg(state, "state")?;
        let fqn = str_arg(fqn, "fqn")?;
        let mesh = ref_arg(mesh, "mesh")?;
        if placements.is_null() {
            return Err(super::null("placements"));
        }
        let view = keyed_view_arg(fqn, dtype, ndim, sizes, strides, data, nbytes)?;
        let shape = dims_arg(global_shape, ndim, "global_shape")?;
        let placements: Vec<Placement> = std::slice::from_raw_parts(placements, mesh.mesh.ndim())
            .iter()
            .map(|&p| match p {
                -1 => Ok(Placement::Replicate),
                d if d >= 0 => Ok(Placement::Shard(d as usize)),
                d if d <= -2 && d > -(2 + 64) => Ok(Placement::StridedShard((-2 - d) as usize)),
                other => Err(invalid(format!(
                    "placement value {other} is not DCP_REPLICATE, DCP_SHARD(d) or DCP_STRIDED_SHARD(d)"
                ))),
            })
            .collect::<FfiResult<_>>()?;
        state
            .inner
            .add_tensor_sharded(fqn, view, &shape, &mesh.mesh, mesh.rank, &placements)?;
        Ok(())
    })
}

/// Marks the registered tensor `fqn` as CUDA memory: its data pointer is a device pointer of
/// CUDA device `device` (the `nbytes` given at registration must lie in one allocation of that
/// device). `stream` is the caller's `cudaStream_t` (NULL: none): libdcp's copies are queued on
/// it, after the caller's work; with NULL, libdcp waits for the whole device before copying.
/// Without a CUDA driver this returns `DCP_ERROR_UNSUPPORTED`. Applies to tensors registered
/// with any `dcp_state_add_tensor*` function.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_set_cuda(state: *mut dcp_state, fqn: *const c_char, device: i32, stream: *mut c_void) -> dcp_status {
    guard("dcp_state_set_cuda", || {
        let state = mut_arg(state, "state")?;
        let fqn = str_arg(fqn, "fqn")?;
        state.inner.set_cuda(fqn, device, stream as usize)?;
        Ok(())
    })
}

/// Registers opaque bytes (saved as a Python `bytes` object). `data` is copied; `(NULL, 0)`
/// is the empty value.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_add_bytes(state: *mut dcp_state, fqn: *const c_char, data: *const c_void, len: usize) -> dcp_status {
    guard("dcp_state_add_bytes", || {
        let state = mut_arg(state, "state")?;
        let fqn = str_arg(fqn, "fqn")?;
        state.inner.add_bytes(fqn, bytes_arg(data as *const u8, len, "data")?)?;
        Ok(())
    })
}

/// Registers an integer (saved as a Python `int`).
#[no_mangle]
pub unsafe extern "C" fn dcp_state_add_int(state: *mut dcp_state, fqn: *const c_char, value: i64) -> dcp_status {
    guard("dcp_state_add_int", || {
        let state = mut_arg(state, "state")?;
        state.inner.add_int(str_arg(fqn, "fqn")?, value)?;
        Ok(())
    })
}

/// Registers a double (saved as a Python `float`).
#[no_mangle]
pub unsafe extern "C" fn dcp_state_add_double(state: *mut dcp_state, fqn: *const c_char, value: f64) -> dcp_status {
    guard("dcp_state_add_double", || {
        let state = mut_arg(state, "state")?;
        state.inner.add_float(str_arg(fqn, "fqn")?, value)?;
        Ok(())
    })
}

/// Registers a plain Python value written in Python literal syntax, e.g. "(0.9, 0.999)",
/// "None", "['net1.weight', 'net1.bias']", "{'a': 1}". Saved as that Python object.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_add_literal(state: *mut dcp_state, fqn: *const c_char, literal: *const c_char) -> dcp_status {
    guard("dcp_state_add_literal", || {
        let state = mut_arg(state, "state")?;
        state.inner.add_literal(str_arg(fqn, "fqn")?, str_arg(literal, "literal")?)?;
        Ok(())
    })
}

/// Registers a pickle (any Python object, pickled by the caller) stored as-is. `pickle` is
/// copied.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_add_pickle(state: *mut dcp_state, fqn: *const c_char, pickle: *const c_void, len: usize) -> dcp_status {
    guard("dcp_state_add_pickle", || {
        let state = mut_arg(state, "state")?;
        let fqn = str_arg(fqn, "fqn")?;
        state.inner.add_pickle(fqn, bytes_arg(pickle as *const u8, len, "pickle")?)?;
        Ok(())
    })
}

/// Sets the key's path in the nested state dict, which torch records as `planner_data` and
/// uses to rebuild nesting (e.g. for "optimizer.state.net1.weight.exp_avg" the path
/// "optimizer", "state", "net1.weight", "exp_avg"). `parts` has `nparts` strings;
/// `is_index` (NULL: none) marks parts that are list indices (decimal digits). Without a
/// path, the fqn is split on '.' and all-digit parts are indices.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_set_path(
    state: *mut dcp_state,
    fqn: *const c_char,
    nparts: usize,
    parts: *const *const c_char,
    is_index: *const u8,
) -> dcp_status {
    guard("dcp_state_set_path", || {
        let state = mut_arg(state, "state")?;
        let fqn = str_arg(fqn, "fqn")?;
        if nparts == 0 || nparts > 4096 {
            return Err(invalid(format!("nparts must be 1..=4096, not {nparts}")));
        }
        if parts.is_null() {
            return Err(super::null("parts"));
        }
        let mut path = Vec::with_capacity(nparts);
        for i in 0..nparts {
            let p = str_arg(*parts.add(i), "parts[i]")?;
            if !is_index.is_null() && *is_index.add(i) != 0 {
                let v: u64 = p.parse().map_err(|_| {
                    invalid(format!(
                        "path part {i} ({p:?}) is marked as an index but is not a non-negative integer"
                    ))
                })?;
                path.push(PathPart::Index(v));
            } else {
                path.push(PathPart::Key(p.to_string()));
            }
        }
        state.inner.set_path(fqn, path)?;
        Ok(())
    })
}

pub(crate) fn value_kind(v: &ObjectValue) -> i32 {
    (match v {
        ObjectValue::Bytes(_) => dcp_value_kind::DCP_VALUE_BYTES,
        ObjectValue::Int(_) => dcp_value_kind::DCP_VALUE_INT,
        ObjectValue::Float(_) => dcp_value_kind::DCP_VALUE_DOUBLE,
        ObjectValue::Py(_) | ObjectValue::Pickle(_) => dcp_value_kind::DCP_VALUE_PICKLE,
    }) as i32
}

/// The kind (`dcp_value_kind`) of a non-tensor entry: what was registered, or after a load,
/// what the checkpoint holds.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_value_kind(state: *const dcp_state, fqn: *const c_char, kind: *mut i32) -> dcp_status {
    guard("dcp_state_value_kind", || {
        let v = ref_arg(state, "state")?.inner.object(str_arg(fqn, "fqn")?)?;
        *mut_arg(kind, "kind")? = value_kind(v);
        Ok(())
    })
}

/// Reads an integer entry. A float entry with an integral value converts; other kinds give
/// `DCP_ERROR_MISMATCH`.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_get_int(state: *const dcp_state, fqn: *const c_char, value: *mut i64) -> dcp_status {
    guard("dcp_state_get_int", || {
        let fqn = str_arg(fqn, "fqn")?;
        let v = ref_arg(state, "state")?.inner.object(fqn)?;
        *mut_arg(value, "value")? = object_as_int(fqn, v)?;
        Ok(())
    })
}

pub(crate) fn object_as_int(fqn: &str, v: &ObjectValue) -> FfiResult<i64> {
    match v {
        ObjectValue::Int(i) => Ok(*i),
        ObjectValue::Float(f) if f.fract() == 0.0 && f.abs() < 9.2e18 => Ok(*f as i64),
        other => Err(crate::Error::mismatch(format!("key {fqn:?} holds a {}, not an int", other.kind_name())).into()),
    }
}

pub(crate) fn object_as_double(fqn: &str, v: &ObjectValue) -> FfiResult<f64> {
    match v {
        ObjectValue::Float(f) => Ok(*f),
        ObjectValue::Int(i) => Ok(*i as f64),
        other => Err(crate::Error::mismatch(format!("key {fqn:?} holds a {}, not a float", other.kind_name())).into()),
    }
}

/// Bytes of a non-tensor value: the raw bytes of a bytes value, the pickle of anything else.
pub(crate) fn object_bytes(v: &ObjectValue) -> std::borrow::Cow<'_, [u8]> {
    match v {
        ObjectValue::Bytes(b) => std::borrow::Cow::Borrowed(b),
        ObjectValue::Pickle(p) => std::borrow::Cow::Borrowed(p),
        other => std::borrow::Cow::Owned(other.to_pickle()),
    }
}

/// Reads a double entry (an int entry converts).
#[no_mangle]
pub unsafe extern "C" fn dcp_state_get_double(state: *const dcp_state, fqn: *const c_char, value: *mut f64) -> dcp_status {
    guard("dcp_state_get_double", || {
        let fqn = str_arg(fqn, "fqn")?;
        let v = ref_arg(state, "state")?.inner.object(fqn)?;
        *mut_arg(value, "value")? = object_as_double(fqn, v)?;
        Ok(())
    })
}

/// Copies a non-tensor value into `buf`: the raw bytes of a bytes value, the pickle of any
/// other value. `*len` always receives the value's size (call with `buf` NULL and `cap` 0 to
/// query it); a buffer smaller than that gives `DCP_ERROR_BUFFER_TOO_SMALL`. `kind` (may be
/// NULL) receives the `dcp_value_kind`.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_get_bytes(
    state: *const dcp_state,
    fqn: *const c_char,
    buf: *mut c_void,
    cap: usize,
    len: *mut usize,
    kind: *mut i32,
) -> dcp_status {
    guard("dcp_state_get_bytes", || {
        let v = ref_arg(state, "state")?.inner.object(str_arg(fqn, "fqn")?)?;
        copy_object(v, buf, cap, len, kind)
    })
}

/// The body of `dcp_state_get_bytes` and `dcp_checkpoint_read_bytes`.
pub(crate) unsafe fn copy_object(v: &ObjectValue, buf: *mut c_void, cap: usize, len: *mut usize, kind: *mut i32) -> FfiResult {
    // `kind` is written with `len`: on success and on a size query (BUFFER_TOO_SMALL).
    mut_arg(len, "len")?;
    if let Some(k) = kind.as_mut() {
        *k = value_kind(v);
    }
    copy_out(&object_bytes(v), buf as *mut u8, cap, len)
}

/// Copies a non-tensor value as Python literal text (NUL-terminated; `*len` excludes the NUL
/// and `cap` must hold `*len + 1`). Values that are opaque pickles give `DCP_ERROR_UNSUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_get_literal(
    state: *const dcp_state,
    fqn: *const c_char,
    buf: *mut c_char,
    cap: usize,
    len: *mut usize,
) -> dcp_status {
    guard("dcp_state_get_literal", || {
        let fqn = str_arg(fqn, "fqn")?;
        let v = ref_arg(state, "state")?.inner.object(fqn)?;
        let text = literal_of(fqn, v)?;
        copy_literal(&text, buf, cap, len)
    })
}

pub(crate) fn literal_of(fqn: &str, v: &ObjectValue) -> FfiResult<String> {
    v.literal()
        .ok_or_else(|| crate::Error::unsupported(format!("key {fqn:?} holds a pickled object that has no literal form")).into())
}

pub(crate) unsafe fn copy_literal(text: &str, buf: *mut c_char, cap: usize, len: *mut usize) -> FfiResult {
    let len = mut_arg(len, "len")?;
    *len = text.len();
    if buf.is_null() || cap <= text.len() {
        return Err(FfiError {
            status: dcp_status::DCP_ERROR_BUFFER_TOO_SMALL,
            message: format!(
                "the literal has {} characters and needs a buffer of {} bytes (with its NUL), not {cap}",
                text.len(),
                text.len() + 1
            ),
        });
    }
    std::ptr::copy_nonoverlapping(text.as_ptr(), buf as *mut u8, text.len());
    *buf.add(text.len()) = 0;
    Ok(())
}

/// Whether the last load filled this entry.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_loaded(state: *const dcp_state, fqn: *const c_char, loaded: *mut bool) -> dcp_status {
    guard("dcp_state_loaded", || {
        let fqn = str_arg(fqn, "fqn")?;
        let e = ref_arg(state, "state")?
            .inner
            .get(fqn)
            .ok_or_else(|| crate::Error::not_found(format!("key {fqn:?} is not registered")))?;
        *mut_arg(loaded, "loaded")? = e.loaded;
        Ok(())
    })
}

/// Number of registered keys the last (partial) load did not find in the checkpoint.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_num_missing(state: *const dcp_state, n: *mut usize) -> dcp_status {
    guard("dcp_state_num_missing", || {
        *mut_arg(n, "n")? = ref_arg(state, "state")?.missing_c.len();
        Ok(())
    })
}

/// The `index`-th missing key. `*key` points into the state and stays valid until the next
/// load on this state or `dcp_state_free`.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_missing_key(state: *const dcp_state, index: usize, key: *mut *const c_char) -> dcp_status {
    guard("dcp_state_missing_key", || {
        let s = ref_arg(state, "state")?;
        let k = s
            .missing_c
            .get(index)
            .ok_or_else(|| invalid(format!("index {index} is out of range ({} missing keys)", s.missing_c.len())))?;
        *mut_arg(key, "key")? = k.as_ptr();
        Ok(())
    })
}

/// Number of registered entries.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_len(state: *const dcp_state, n: *mut usize) -> dcp_status {
    guard("dcp_state_len", || {
        *mut_arg(n, "n")? = ref_arg(state, "state")?.inner.len();
        Ok(())
    })
}
