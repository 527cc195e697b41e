use super::{
    bytes_arg, copy_items_out, copy_out, copy_text_out, dcp_status, dcp_value_kind, dims_arg, free_box, guard, invalid, mut_arg, ref_arg,
    str_arg, FfiResult,
};
use crate::engine::LoadReport;
use crate::format::metadata::PathPart;
use crate::format::pyobj::ObjectValue;
use crate::mesh::Placement;
use crate::state::State;
use crate::tensor::{DType, Device, TensorView};
use std::ffi::{c_char, c_void};

/// The state one rank registers: tensors (borrowed caller memory), bytes and scalars (copied).
/// Thread safety: not thread-safe; do not modify it while a save or load uses it.
pub struct dcp_state {
    pub(crate) inner: State<'static>,
    /// The report of the last successful load (its missing keys back `dcp_state_missing_key`).
    pub(crate) last_load: LoadReport,
}

/// Creates an empty state. `*out` is owned by the caller; free it with `dcp_state_free`.
/// Not collective; thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_new(out: *mut *mut dcp_state) -> dcp_status {
    guard("dcp_state_new", || {
        // SAFETY: `out` is NULL or writable (header contract).
        let out = unsafe { mut_arg(out, "out")? };
        *out = Box::into_raw(Box::new(dcp_state {
            inner: State::new(),
            last_load: LoadReport::default(),
        }));
        Ok(())
    })
}

/// Frees a state (not the tensor memory it refers to). NULL is a no-op. Must not race with any
/// other use of the state. Not collective.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_free(state: *mut dcp_state) {
    // SAFETY: `state` is NULL or from `dcp_state_new`, freed once (header contract).
    unsafe { free_box(state) }
}

/// # Safety
/// `sizes` and `strides` are NULL or hold `ndim` entries; `data` is NULL or `nbytes` bytes.
unsafe fn view_arg(
    dtype: i32,
    ndim: i32,
    sizes: *const i64,
    strides: *const i64,
    data: *mut c_void,
    nbytes: u64,
) -> FfiResult<TensorView<'static>> {
    let dtype = DType::try_from(dtype)?;
    // SAFETY: forwarded from this function's contract.
    let (sizes, strides) = unsafe { (dims_arg(sizes, ndim, "sizes")?, strides_arg(strides, ndim)?) };
    // SAFETY: forwarded from this function's contract.
    unsafe { cpu_view(dtype, &sizes, strides.as_deref(), data, nbytes, ("data", "nbytes")) }
}

/// `ndim` strides in elements; NULL: contiguous (`None`).
///
/// # Safety
/// `strides` is NULL or holds `ndim` entries.
pub(crate) unsafe fn strides_arg(strides: *const i64, ndim: i32) -> FfiResult<Option<Vec<u64>>> {
    if strides.is_null() {
        Ok(None)
    } else {
        // SAFETY: non-NULL with `ndim` entries per this function's contract.
        Ok(Some(unsafe { dims_arg(strides, ndim, "strides")? }))
    }
}

/// A view of caller CPU memory: `data` of `nbytes` bytes (`names`: how errors call the two
/// arguments). `data` may be NULL only when the view has no elements.
///
/// # Safety
/// `data` is NULL or points to `nbytes` bytes that stay valid while the view is used.
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
    // SAFETY: `data` covers `nbytes` bytes and outlives the view (this function's contract);
    // `from_raw` checks that every element lies within them.
    Ok(unsafe { TensorView::from_raw(data as *mut u8, nbytes, dtype, sizes, strides, Device::Cpu) }?)
}

/// `view_arg` with errors prefixed by the key.
///
/// # Safety
/// As for `view_arg`.
unsafe fn keyed_view_arg(
    fqn: &str,
    dtype: i32,
    ndim: i32,
    sizes: *const i64,
    strides: *const i64,
    data: *mut c_void,
    nbytes: u64,
) -> FfiResult<TensorView<'static>> {
    // SAFETY: forwarded from this function's contract.
    unsafe { view_arg(dtype, ndim, sizes, strides, data, nbytes) }.map_err(|mut e| {
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
/// is freed. Save reads it; load writes it. `fqn` and the arrays are copied. Not collective;
/// not thread-safe (one state, one thread).
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
        // SAFETY: every pointer is NULL or valid as documented above (header contract).
        let (state, fqn) = unsafe { (mut_arg(state, "state")?, str_arg(fqn, "fqn")?) };
        // SAFETY: as above; the memory outlives the state (documented above).
        let view = unsafe { keyed_view_arg(fqn, dtype, ndim, sizes, strides, data, nbytes)? };
        state.inner.add_tensor(fqn, view)?;
        Ok(())
    })
}

/// Registers a CPU tensor that is one piece of a larger global tensor: the piece (described
/// as in `dcp_state_add_tensor`) sits at `offsets` (ndim entries) of a global tensor of
/// `global_shape` (ndim entries). This is the explicit-chunk form for flat or irregular
/// layouts; the pieces of all ranks must tile the global tensor. Ownership and threads as in
/// `dcp_state_add_tensor`. Not collective.
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
        // SAFETY: every pointer is NULL or valid as documented above (header contract).
        let (state, fqn) = unsafe { (mut_arg(state, "state")?, str_arg(fqn, "fqn")?) };
        // SAFETY: as above; the memory outlives the state (documented above).
        let view = unsafe { keyed_view_arg(fqn, dtype, ndim, sizes, strides, data, nbytes)? };
        // SAFETY: both arrays are NULL or hold `ndim` entries (documented above).
        let (shape, offsets) = unsafe { (dims_arg(global_shape, ndim, "global_shape")?, dims_arg(offsets, ndim, "offsets")?) };
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
/// lets saves skip exchanging plans. The state keeps its own copy of the mesh. Not collective;
/// ownership and threads as in `dcp_state_add_tensor`.
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
        // SAFETY: every pointer is NULL or valid as documented above (header contract).
        let (state, fqn, mesh) = unsafe { (mut_arg(state, "state")?, str_arg(fqn, "fqn")?, ref_arg(mesh, "mesh")?) };
        if placements.is_null() {
            return Err(super::null("placements"));
        }
        // SAFETY: as above; the memory outlives the state (documented above).
        let view = unsafe { keyed_view_arg(fqn, dtype, ndim, sizes, strides, data, nbytes)? };
        // SAFETY: NULL or `ndim` entries (documented above).
        let shape = unsafe { dims_arg(global_shape, ndim, "global_shape")? };
        // SAFETY: `placements` is non-NULL and holds one entry per mesh dimension (documented).
        let codes = unsafe { std::slice::from_raw_parts(placements, mesh.mesh.ndim()) };
        let placements = codes.iter().map(|&c| Placement::from_code(c)).collect::<crate::Result<Vec<_>>>()?;
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
/// with any `dcp_state_add_tensor*` function. The stream must outlive the state's saves and
/// loads. Not collective; not thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_set_cuda(state: *mut dcp_state, fqn: *const c_char, device: i32, stream: *mut c_void) -> dcp_status {
    guard("dcp_state_set_cuda", || {
        // SAFETY: `state` and `fqn` are NULL or valid (header contract).
        let (state, fqn) = unsafe { (mut_arg(state, "state")?, str_arg(fqn, "fqn")?) };
        state.inner.set_cuda(fqn, device, stream as usize)?;
        Ok(())
    })
}

/// Registers opaque bytes (saved as a Python `bytes` object). `data` is copied; `(NULL, 0)`
/// is the empty value. Not collective; not thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_add_bytes(state: *mut dcp_state, fqn: *const c_char, data: *const c_void, len: usize) -> dcp_status {
    guard("dcp_state_add_bytes", || {
        // SAFETY: the pointers are NULL or valid, `data` for `len` bytes (header contract).
        let (state, fqn, data) = unsafe {
            (
                mut_arg(state, "state")?,
                str_arg(fqn, "fqn")?,
                bytes_arg(data as *const u8, len, "data")?,
            )
        };
        state.inner.add_bytes(fqn, data)?;
        Ok(())
    })
}

/// Registers an integer (saved as a Python `int`). Not collective; not thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_add_int(state: *mut dcp_state, fqn: *const c_char, value: i64) -> dcp_status {
    guard("dcp_state_add_int", || {
        // SAFETY: `state` and `fqn` are NULL or valid (header contract).
        let (state, fqn) = unsafe { (mut_arg(state, "state")?, str_arg(fqn, "fqn")?) };
        state.inner.add_int(fqn, value)?;
        Ok(())
    })
}

/// Registers a double (saved as a Python `float`). Not collective; not thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_add_double(state: *mut dcp_state, fqn: *const c_char, value: f64) -> dcp_status {
    guard("dcp_state_add_double", || {
        // SAFETY: `state` and `fqn` are NULL or valid (header contract).
        let (state, fqn) = unsafe { (mut_arg(state, "state")?, str_arg(fqn, "fqn")?) };
        state.inner.add_float(fqn, value)?;
        Ok(())
    })
}

/// Registers a plain Python value written in Python literal syntax, e.g. "(0.9, 0.999)",
/// "None", "['net1.weight', 'net1.bias']", "{'a': 1}". Saved as that Python object. The
/// literal is parsed and copied. Not collective; not thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_add_literal(state: *mut dcp_state, fqn: *const c_char, literal: *const c_char) -> dcp_status {
    guard("dcp_state_add_literal", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (state, fqn, literal) = unsafe { (mut_arg(state, "state")?, str_arg(fqn, "fqn")?, str_arg(literal, "literal")?) };
        state.inner.add_literal(fqn, literal)?;
        Ok(())
    })
}

/// Registers a pickle (any Python object, pickled by the caller) stored as-is. `pickle` is
/// copied. Not collective; not thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_add_pickle(state: *mut dcp_state, fqn: *const c_char, pickle: *const c_void, len: usize) -> dcp_status {
    guard("dcp_state_add_pickle", || {
        // SAFETY: the pointers are NULL or valid, `pickle` for `len` bytes (header contract).
        let (state, fqn, pickle) = unsafe {
            (
                mut_arg(state, "state")?,
                str_arg(fqn, "fqn")?,
                bytes_arg(pickle as *const u8, len, "pickle")?,
            )
        };
        state.inner.add_pickle(fqn, pickle)?;
        Ok(())
    })
}

/// Most parts of a key's path.
const MAX_PATH_PARTS: usize = 4096;

/// Sets the key's path in the nested state dict, which torch records as `planner_data` and
/// uses to rebuild nesting (e.g. for "optimizer.state.net1.weight.exp_avg" the path
/// "optimizer", "state", "net1.weight", "exp_avg"). `parts` has `nparts` strings;
/// `is_index` (NULL: none) marks parts that are list indices (decimal digits). Without a
/// path, the fqn is split on '.' and all-digit parts are indices. The strings are copied.
/// Not collective; not thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_set_path(
    state: *mut dcp_state,
    fqn: *const c_char,
    nparts: usize,
    parts: *const *const c_char,
    is_index: *const u8,
) -> dcp_status {
    guard("dcp_state_set_path", || {
        // SAFETY: `state` and `fqn` are NULL or valid (header contract).
        let (state, fqn) = unsafe { (mut_arg(state, "state")?, str_arg(fqn, "fqn")?) };
        if nparts == 0 || nparts > MAX_PATH_PARTS {
            return Err(invalid(format!("nparts must be 1..={MAX_PATH_PARTS}, not {nparts}")));
        }
        if parts.is_null() {
            return Err(super::null("parts"));
        }
        // SAFETY: `parts` is non-NULL with `nparts` entries (documented above).
        let parts = unsafe { std::slice::from_raw_parts(parts, nparts) };
        // SAFETY: `is_index` is non-NULL here and has `nparts` entries (documented above).
        let is_index = (!is_index.is_null()).then(|| unsafe { std::slice::from_raw_parts(is_index, nparts) });
        let mut path = Vec::with_capacity(nparts);
        for (i, &part) in parts.iter().enumerate() {
            // SAFETY: each part is NULL or a NUL-terminated string (documented above).
            let p = unsafe { str_arg(part, "parts[i]")? };
            if is_index.is_some_and(|marks| marks[i] != 0) {
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

/// The C enum of a value's kind.
pub(crate) fn value_kind(v: &ObjectValue) -> i32 {
    (match v {
        ObjectValue::Bytes(_) => dcp_value_kind::DCP_VALUE_BYTES,
        ObjectValue::Int(_) => dcp_value_kind::DCP_VALUE_INT,
        ObjectValue::Float(_) => dcp_value_kind::DCP_VALUE_DOUBLE,
        ObjectValue::Py(_) | ObjectValue::Pickle(_) => dcp_value_kind::DCP_VALUE_PICKLE,
    }) as i32
}

/// The non-tensor value `fqn` of `state`.
///
/// # Safety
/// `state` and `fqn` are NULL or valid, and the state is not written during `'a`.
unsafe fn state_object<'a>(state: *const dcp_state, fqn: *const c_char) -> FfiResult<(&'a str, &'a ObjectValue)> {
    // SAFETY: forwarded from this function's contract.
    let (state, fqn) = unsafe { (ref_arg(state, "state")?, str_arg(fqn, "fqn")?) };
    Ok((fqn, state.inner.object(fqn)?))
}

/// The kind (`dcp_value_kind`) of a non-tensor entry: what was registered, or after a load,
/// what the checkpoint holds. Not collective; reads may run concurrently with other reads.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_value_kind(state: *const dcp_state, fqn: *const c_char, kind: *mut i32) -> dcp_status {
    guard("dcp_state_value_kind", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let ((_, v), kind) = unsafe { (state_object(state, fqn)?, mut_arg(kind, "kind")?) };
        *kind = value_kind(v);
        Ok(())
    })
}

/// Reads an integer entry. A float entry with an integral value converts; other kinds give
/// `DCP_ERROR_MISMATCH`. Not collective; reads may run concurrently with other reads.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_get_int(state: *const dcp_state, fqn: *const c_char, value: *mut i64) -> dcp_status {
    guard("dcp_state_get_int", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (fqn, v) = unsafe { state_object(state, fqn)? };
        let converted = v.to_int(fqn)?;
        // SAFETY: `value` is NULL or writable (header contract).
        *unsafe { mut_arg(value, "value")? } = converted;
        Ok(())
    })
}

/// Reads a double entry (an int entry converts). Not collective; reads may run concurrently
/// with other reads.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_get_double(state: *const dcp_state, fqn: *const c_char, value: *mut f64) -> dcp_status {
    guard("dcp_state_get_double", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (fqn, v) = unsafe { state_object(state, fqn)? };
        let converted = v.to_float(fqn)?;
        // SAFETY: `value` is NULL or writable (header contract).
        *unsafe { mut_arg(value, "value")? } = converted;
        Ok(())
    })
}

/// Reads a Python `bool` entry (`True`/`False`; ints do not convert, other kinds give
/// `DCP_ERROR_MISMATCH`). Not collective; reads may run concurrently with other reads.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_get_bool(state: *const dcp_state, fqn: *const c_char, value: *mut bool) -> dcp_status {
    guard("dcp_state_get_bool", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (fqn, v) = unsafe { state_object(state, fqn)? };
        let converted = v.to_bool(fqn)?;
        // SAFETY: `value` is NULL or writable (header contract).
        *unsafe { mut_arg(value, "value")? } = converted;
        Ok(())
    })
}

/// Copies the items of a list or tuple of numbers (Python ints and floats, e.g. Adam's
/// `betas`) into `buf` as doubles. `*len` always receives the number of items (call with `buf`
/// NULL and `cap` 0 to query it); a `cap` (in doubles) smaller than that gives
/// `DCP_ERROR_BUFFER_TOO_SMALL`. Any other value, or an item that is not an int or float
/// (bools included), gives `DCP_ERROR_MISMATCH`. Not collective; reads may run concurrently
/// with other reads.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_get_doubles(
    state: *const dcp_state,
    fqn: *const c_char,
    buf: *mut f64,
    cap: usize,
    len: *mut usize,
) -> dcp_status {
    guard("dcp_state_get_doubles", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (fqn, v) = unsafe { state_object(state, fqn)? };
        // SAFETY: `len` is NULL or writable; `buf` is NULL or holds `cap` doubles (documented).
        unsafe { copy_doubles(fqn, v, buf, cap, len) }
    })
}

/// The body of `dcp_state_get_doubles` and `dcp_checkpoint_read_doubles`.
///
/// # Safety
/// As for [`copy_items_out`].
pub(crate) unsafe fn copy_doubles(fqn: &str, v: &ObjectValue, buf: *mut f64, cap: usize, len: *mut usize) -> FfiResult {
    // SAFETY: `len` is NULL or writable per this function's contract.
    unsafe { mut_arg(len, "len")? };
    let items = v.to_floats(fqn)?;
    // SAFETY: this function's contract is `copy_items_out`'s.
    unsafe { copy_items_out(&items, buf, cap, len, "numbers") }
}

/// Copies the items of a list or tuple of strings (e.g. a param group's `params`) into `buf`,
/// each followed by a NUL: "a\0b.c\0". `*len` always receives the bytes needed, NULs
/// included, and `*count` (may be NULL) the number of strings; a `cap` smaller than `*len`
/// gives `DCP_ERROR_BUFFER_TOO_SMALL`. Any other value gives `DCP_ERROR_MISMATCH`; a string
/// holding a NUL character gives `DCP_ERROR_UNSUPPORTED`. Not collective; reads may run
/// concurrently with other reads.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_get_strings(
    state: *const dcp_state,
    fqn: *const c_char,
    buf: *mut c_char,
    cap: usize,
    len: *mut usize,
    count: *mut usize,
) -> dcp_status {
    guard("dcp_state_get_strings", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (fqn, v) = unsafe { state_object(state, fqn)? };
        // SAFETY: `len` and `count` are NULL or writable; `buf` is NULL or `cap` bytes.
        unsafe { copy_strings(fqn, v, buf, cap, len, count) }
    })
}

/// The body of `dcp_state_get_strings` and `dcp_checkpoint_read_strings`.
///
/// # Safety
/// As for [`copy_items_out`]; `count` is NULL or writable.
pub(crate) unsafe fn copy_strings(
    fqn: &str,
    v: &ObjectValue,
    buf: *mut c_char,
    cap: usize,
    len: *mut usize,
    count: *mut usize,
) -> FfiResult {
    // SAFETY: `len` is NULL or writable per this function's contract.
    unsafe { mut_arg(len, "len")? };
    let items = v.to_strs(fqn)?;
    if let Some(i) = items.iter().position(|s| s.contains('\0')) {
        return Err(crate::Error::unsupported(format!("key {fqn:?}: string {i} holds a NUL character")).into());
    }
    let packed: Vec<u8> = items.iter().flat_map(|s| s.bytes().chain([0])).collect();
    // SAFETY: `count` is NULL or writable per this function's contract.
    if let Some(c) = unsafe { count.as_mut() } {
        *c = items.len();
    }
    // SAFETY: this function's contract is `copy_items_out`'s.
    unsafe { copy_items_out(&packed, buf as *mut u8, cap, len, "bytes") }
}

/// Copies a non-tensor value into `buf`: the raw bytes of a bytes value, the pickle of any
/// other value. `*len` always receives the value's size (call with `buf` NULL and `cap` 0 to
/// query it); a buffer smaller than that gives `DCP_ERROR_BUFFER_TOO_SMALL`. `kind` (may be
/// NULL) receives the `dcp_value_kind`. Not collective; reads may run concurrently with other
/// reads.
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
        // SAFETY: the pointers are NULL or valid (header contract).
        let (_, v) = unsafe { state_object(state, fqn)? };
        // SAFETY: `len` and `kind` are NULL or writable; `buf` is NULL or `cap` bytes.
        unsafe { copy_object(v, buf, cap, len, kind) }
    })
}

/// The body of `dcp_state_get_bytes` and `dcp_checkpoint_read_bytes`.
///
/// # Safety
/// As for [`copy_out`]; `kind` is NULL or writable.
pub(crate) unsafe fn copy_object(v: &ObjectValue, buf: *mut c_void, cap: usize, len: *mut usize, kind: *mut i32) -> FfiResult {
    // `kind` is written with `len`: on success and on a size query (BUFFER_TOO_SMALL).
    // SAFETY: `len` and `kind` are NULL or writable per this function's contract.
    unsafe {
        mut_arg(len, "len")?;
        if let Some(k) = kind.as_mut() {
            *k = value_kind(v);
        }
    }
    // SAFETY: this function's contract is `copy_out`'s.
    unsafe { copy_out(&v.bytes_or_pickle(), buf as *mut u8, cap, len) }
}

/// Copies a non-tensor value as Python literal text (NUL-terminated; `*len` excludes the NUL
/// and `cap` must hold `*len + 1`). Values that are opaque pickles give `DCP_ERROR_UNSUPPORTED`.
/// For typed reads prefer `dcp_state_get_int`, `_get_double`, `_get_bool`, `_get_doubles` and
/// `_get_strings`. Not collective; reads may run concurrently with other reads.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_get_literal(
    state: *const dcp_state,
    fqn: *const c_char,
    buf: *mut c_char,
    cap: usize,
    len: *mut usize,
) -> dcp_status {
    guard("dcp_state_get_literal", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (fqn, v) = unsafe { state_object(state, fqn)? };
        let text = v.to_literal(fqn)?;
        // SAFETY: `len` is NULL or writable; `buf` is NULL or `cap` bytes (documented above).
        unsafe { copy_text_out(text.as_bytes(), buf, cap, len, "literal") }
    })
}

/// Whether the last load filled this entry. Not collective; reads may run concurrently with
/// other reads.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_loaded(state: *const dcp_state, fqn: *const c_char, loaded: *mut bool) -> dcp_status {
    guard("dcp_state_loaded", || {
        // SAFETY: `state` and `fqn` are NULL or valid (header contract).
        let (state, fqn) = unsafe { (ref_arg(state, "state")?, str_arg(fqn, "fqn")?) };
        let e = state
            .inner
            .get(fqn)
            .ok_or_else(|| crate::Error::not_found(format!("key {fqn:?} is not registered")))?;
        // SAFETY: `loaded` is NULL or writable (header contract).
        *unsafe { mut_arg(loaded, "loaded")? } = e.loaded;
        Ok(())
    })
}

/// Number of registered keys the last (partial) load did not find in the checkpoint (0 before
/// any load and after a failed one). Not collective; reads may run concurrently with other
/// reads.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_num_missing(state: *const dcp_state, n: *mut usize) -> dcp_status {
    guard("dcp_state_num_missing", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (state, n) = unsafe { (ref_arg(state, "state")?, mut_arg(n, "n")?) };
        *n = state.last_load.missing.len();
        Ok(())
    })
}

/// The `index`-th missing key. `*key` points into the state (owned by it) and stays valid until
/// the next load on this state or `dcp_state_free`. Not collective; reads may run concurrently
/// with other reads.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_missing_key(state: *const dcp_state, index: usize, key: *mut *const c_char) -> dcp_status {
    guard("dcp_state_missing_key", || {
        // SAFETY: `state` is NULL or valid (header contract).
        let s = unsafe { ref_arg(state, "state")? };
        let k = s.last_load.missing_c_str(index).ok_or_else(|| {
            invalid(format!(
                "index {index} is out of range ({} missing keys)",
                s.last_load.missing.len()
            ))
        })?;
        // SAFETY: `key` is NULL or writable (header contract).
        *unsafe { mut_arg(key, "key")? } = k.as_ptr();
        Ok(())
    })
}

/// Number of registered entries. Not collective; reads may run concurrently with other reads.
#[no_mangle]
pub unsafe extern "C" fn dcp_state_len(state: *const dcp_state, n: *mut usize) -> dcp_status {
    guard("dcp_state_len", || {
        // SAFETY: the pointers are NULL or valid (header contract).
        let (state, n) = unsafe { (ref_arg(state, "state")?, mut_arg(n, "n")?) };
        *n = state.inner.len();
        Ok(())
    })
}
