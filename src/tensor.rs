//! Element types, devices, and borrowed views of caller memory with shape and strides.

use crate::error::{ensure, Error, Result};
use std::marker::PhantomData;

/// Element type of a tensor. The discriminants are the values of `dcp_dtype` in the C API and
/// never change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum DType {
    /// `torch.float32`.
    F32 = 1,
    /// `torch.float64`.
    F64 = 2,
    /// `torch.float16`.
    F16 = 3,
    /// `torch.bfloat16`.
    BF16 = 4,
    /// `torch.float8_e4m3fn`.
    F8E4M3FN = 5,
    /// `torch.float8_e5m2`.
    F8E5M2 = 6,
    /// `torch.int64`.
    I64 = 7,
    /// `torch.int32`.
    I32 = 8,
    /// `torch.int16`.
    I16 = 9,
    /// `torch.int8`.
    I8 = 10,
    /// `torch.uint8`.
    U8 = 11,
    /// `torch.bool` (one byte, 0 or 1).
    Bool = 12,
    /// `torch.complex64`.
    C64 = 13,
    /// `torch.complex128`.
    C128 = 14,
    /// `torch.uint16`.
    U16 = 15,
    /// `torch.uint32`.
    U32 = 16,
    /// `torch.uint64`.
    U64 = 17,
}

pub const ALL_DTYPES: [DType; 17] = [
    DType::F32,
    DType::F64,
    DType::F16,
    DType::BF16,
    DType::F8E4M3FN,
    DType::F8E5M2,
    DType::I64,
    DType::I32,
    DType::I16,
    DType::I8,
    DType::U8,
    DType::Bool,
    DType::C64,
    DType::C128,
    DType::U16,
    DType::U32,
    DType::U64,
];

impl TryFrom<i32> for DType {
    type Error = Error;
    fn try_from(v: i32) -> Result<Self> {
        ALL_DTYPES
            .iter()
            .copied()
            .find(|d| *d as i32 == v)
            .ok_or_else(|| Error::invalid(format!("unknown dtype value {v}")))
    }
}

impl DType {
    /// Every dtype, in the order of their C values.
    pub const ALL: [DType; 17] = ALL_DTYPES;

    /// Bytes per element.
    pub fn size(self) -> usize {
        use DType::*;
        match self {
            F8E4M3FN | F8E5M2 | I8 | U8 | Bool => 1,
            F16 | BF16 | I16 | U16 => 2,
            F32 | I32 | U32 => 4,
            F64 | I64 | U64 | C64 => 8,
            C128 => 16,
        }
    }

    /// Bytes of a dense tensor of `shape`; `None` when that does not fit in 64 bits.
    pub fn nbytes(self, shape: &[u64]) -> Option<u64> {
        shape
            .iter()
            .try_fold(1u64, |acc, &s| acc.checked_mul(s))?
            .checked_mul(self.size() as u64)
    }

    /// The attribute name in the `torch` module (`torch.float32` is pickled as `torch float32`).
    pub fn torch_name(self) -> &'static str {
        use DType::*;
        match self {
            F32 => "float32",
            F64 => "float64",
            F16 => "float16",
            BF16 => "bfloat16",
            F8E4M3FN => "float8_e4m3fn",
            F8E5M2 => "float8_e5m2",
            I64 => "int64",
            I32 => "int32",
            I16 => "int16",
            I8 => "int8",
            U8 => "uint8",
            Bool => "bool",
            C64 => "complex64",
            C128 => "complex128",
            U16 => "uint16",
            U32 => "uint32",
            U64 => "uint64",
        }
    }

    /// The dtype of a `torch` attribute name, aliases included (`float`, `long`, ...).
    pub fn from_torch_name(name: &str) -> Option<DType> {
        let alias = match name {
            "float" => Some(DType::F32),
            "double" => Some(DType::F64),
            "half" => Some(DType::F16),
            "long" => Some(DType::I64),
            "int" => Some(DType::I32),
            "short" => Some(DType::I16),
            "cfloat" => Some(DType::C64),
            "cdouble" => Some(DType::C128),
            _ => None,
        };
        alias.or_else(|| ALL_DTYPES.iter().copied().find(|d| d.torch_name() == name))
    }

    /// The legacy typed-storage class torch.save uses for this dtype (`_rebuild_tensor_v2`);
    /// `None` for dtypes torch saves through `UntypedStorage` and `_rebuild_tensor_v3`.
    pub fn storage_name(self) -> Option<&'static str> {
        use DType::*;
        Some(match self {
            F64 => "DoubleStorage",
            F32 => "FloatStorage",
            F16 => "HalfStorage",
            BF16 => "BFloat16Storage",
            I64 => "LongStorage",
            I32 => "IntStorage",
            I16 => "ShortStorage",
            I8 => "CharStorage",
            U8 => "ByteStorage",
            Bool => "BoolStorage",
            C64 => "ComplexFloatStorage",
            C128 => "ComplexDoubleStorage",
            F8E4M3FN | F8E5M2 | U16 | U32 | U64 => return None,
        })
    }

    /// The dtype of a legacy typed-storage class name (`FloatStorage`).
    pub fn from_storage_name(name: &str) -> Option<DType> {
        ALL_DTYPES.iter().copied().find(|d| d.storage_name() == Some(name))
    }

    /// Whether the dtype is a floating-point type (complex types are not).
    pub fn is_floating_point(self) -> bool {
        use DType::*;
        matches!(self, F32 | F64 | F16 | BF16 | F8E4M3FN | F8E5M2)
    }
}

impl serde::Serialize for DType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_i32(*self as i32)
    }
}
impl<'de> serde::Deserialize<'de> for DType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = <i32 as serde::Deserialize>::deserialize(d)?;
        DType::try_from(v).map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.torch_name())
    }
}

/// Where tensor memory lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    /// Host memory.
    Cpu,
    /// A CUDA device ordinal.
    Cuda(i32),
}

/// Product of sizes, with overflow checked.
pub fn numel(sizes: &[u64]) -> Result<u64> {
    sizes
        .iter()
        .try_fold(1u64, |acc, &s| acc.checked_mul(s))
        .ok_or_else(|| Error::invalid(format!("shape {sizes:?} overflows")))
}

/// Row-major (C-contiguous) strides, in elements.
pub fn contiguous_strides(sizes: &[u64]) -> Vec<u64> {
    let mut strides = vec![0u64; sizes.len()];
    let mut acc = 1u64;
    for i in (0..sizes.len()).rev() {
        strides[i] = acc;
        acc = acc.saturating_mul(sizes[i].max(1));
    }
    strides
}

/// Bytes spanned by a strided layout: one past the furthest element, or 0 if it has no elements.
pub fn strided_extent_bytes(sizes: &[u64], strides: &[u64], elem: usize) -> Result<u64> {
    if sizes.contains(&0) {
        return Ok(0);
    }
    let mut last = 0u64;
    for (&s, &st) in sizes.iter().zip(strides) {
        last = (s - 1)
            .checked_mul(st)
            .and_then(|v| v.checked_add(last))
            .ok_or_else(|| Error::invalid("strides overflow"))?;
    }
    last.checked_add(1)
        .and_then(|v| v.checked_mul(elem as u64))
        .ok_or_else(|| Error::invalid("strides overflow"))
}

/// A Rust element type with a libdcp [`DType`]: what [`TensorView::from_slice`] and
/// [`TensorView::from_slice_mut`] take, so that a view's dtype is its element type's.
///
/// # Safety
/// `size_of::<Self>()` is `DTYPE.size()`, and every bit pattern of that many bytes is a valid
/// `Self` (a load writes whatever the checkpoint holds). Implement it for a crate's own types of
/// dtypes libdcp has and Rust has not (`half::bf16` as [`DType::BF16`]).
pub unsafe trait Element: Copy + Send + Sync + 'static {
    /// The dtype of this element type.
    const DTYPE: DType;
}

macro_rules! elements {
    ($($t:ty => $d:ident),* $(,)?) => {$(
        // SAFETY: a primitive number of exactly the dtype's size; every bit pattern is valid.
        unsafe impl Element for $t {
            const DTYPE: DType = DType::$d;
        }
    )*};
}
elements!(f32 => F32, f64 => F64, i64 => I64, i32 => I32, i16 => I16, i8 => I8, u8 => U8, u16 => U16, u32 => U32, u64 => U64);

/// A borrowed view of caller memory holding a (local) tensor: dtype, sizes, strides in elements,
/// and the device it lives on. The view does not own the memory.
#[derive(Debug)]
pub struct TensorView<'a> {
    ptr: *mut u8,
    nbytes: usize,
    dtype: DType,
    sizes: Vec<u64>,
    strides: Vec<u64>,
    device: Device,
    /// The caller's CUDA stream (a `CUstream`), 0 for none.
    stream: usize,
    /// False for views of shared slices ([`TensorView::from_slice`]), which may only be saved.
    writable: bool,
    _borrow: PhantomData<&'a mut [u8]>,
}

// SAFETY: the view stands for memory lent to it for `'a` (a `&'a mut [u8]`, or `from_raw`'s
// contract), which is not tied to a thread: sending the view is sending that loan.
unsafe impl Send for TensorView<'_> {}
// SAFETY: `&TensorView` gives only the description and the raw pointer; the memory is reached
// through the pointer solely in libdcp's unsafe blocks, where threads only read it (save) or
// write disjoint elements of it (load: plan overlaps tile each box without overlapping).
unsafe impl Sync for TensorView<'_> {}

impl<'a> TensorView<'a> {
    /// A contiguous CPU tensor over the typed slice `data` (`f32`, `i64`, ...), to save: the view
    /// is read-only, and a load into it fails with [`ErrorKind::InvalidArgument`](crate::ErrorKind).
    /// The dtype is the element type's.
    ///
    /// ```
    /// use dcp::{DType, TensorView};
    /// let w = vec![1.0f32; 6];
    /// let view = TensorView::from_slice(&w, &[2, 3])?;
    /// assert_eq!((view.dtype(), view.sizes()), (DType::F32, &[2u64, 3][..]));
    /// assert!(TensorView::from_slice(&w, &[4, 2]).is_err()); // 8 elements do not fit in 6
    /// # Ok::<(), dcp::Error>(())
    /// ```
    pub fn from_slice<T: Element>(data: &'a [T], sizes: &[u64]) -> Result<Self> {
        // SAFETY: the slice's bytes are borrowed for 'a; the view is marked read-only below, so
        // no load writes through the pointer.
        let mut view = unsafe { Self::from_raw(data.as_ptr() as *mut u8, std::mem::size_of_val(data), T::DTYPE, sizes, None, Device::Cpu)? };
        view.writable = false;
        Ok(view)
    }

    /// A contiguous CPU tensor over the typed slice `data`, to load into (or save).
    pub fn from_slice_mut<T: Element>(data: &'a mut [T], sizes: &[u64]) -> Result<Self> {
        // SAFETY: the slice is borrowed exclusively for 'a, and `Element` makes any bytes a load
        // writes valid elements.
        unsafe { Self::from_raw(data.as_mut_ptr() as *mut u8, std::mem::size_of_val(data), T::DTYPE, sizes, None, Device::Cpu) }
    }

    /// A contiguous CPU tensor of `dtype` over the bytes `data`, to save (read-only, as
    /// [`from_slice`](Self::from_slice)): for dtypes with no Rust element type (`bfloat16`,
    /// `float8`, `bool`), or bytes as they come.
    pub fn from_bytes_ref(data: &'a [u8], dtype: DType, sizes: &[u64]) -> Result<Self> {
        // SAFETY: as in `from_slice`: borrowed for 'a, read-only.
        let mut view = unsafe { Self::from_raw(data.as_ptr() as *mut u8, data.len(), dtype, sizes, None, Device::Cpu)? };
        view.writable = false;
        Ok(view)
    }

    /// A contiguous CPU tensor of `dtype` over the bytes `data`, to load into (or save).
    pub fn from_bytes(data: &'a mut [u8], dtype: DType, sizes: &[u64]) -> Result<Self> {
        // SAFETY: `data` is `data.len()` bytes exclusively borrowed for `'a`, so nobody else
        // reads or writes them while the view exists; any bytes are valid `u8`s.
        unsafe { Self::from_raw(data.as_mut_ptr(), data.len(), dtype, sizes, None, Device::Cpu) }
    }

    /// A view of raw memory: CPU memory, or (after [`set_cuda`](Self::set_cuda)) a CUDA device
    /// pointer; `strides` in elements, `None` for row-major.
    ///
    /// # Safety
    /// `ptr` must point to `nbytes` initialised bytes that stay allocated for `'a` (for CUDA
    /// tensors it is a device pointer, see [`TensorView::set_cuda`]). While a save uses the view
    /// nobody may write those bytes; while a load uses it nobody else may read or write them,
    /// and the views of one load must not overlap one another. Whatever the bytes are read as
    /// must accept any bit pattern (a load writes what the checkpoint holds).
    pub unsafe fn from_raw(
        ptr: *mut u8,
        nbytes: usize,
        dtype: DType,
        sizes: &[u64],
        strides: Option<&[u64]>,
        device: Device,
    ) -> Result<Self> {
        let strides = match strides {
            Some(s) => {
                ensure!(
                    s.len() == sizes.len(),
                    Error::invalid(format!("{} strides given for {} dimensions", s.len(), sizes.len()))
                );
                s.to_vec()
            }
            None => contiguous_strides(sizes),
        };
        numel(sizes)?;
        let extent = strided_extent_bytes(sizes, &strides, dtype.size())?;
        ensure!(
            extent <= nbytes as u64,
            Error::invalid(format!(
                "buffer of {nbytes} bytes is too small for a {dtype} tensor of sizes {sizes:?} and strides {strides:?} ({extent} bytes needed)"
            ))
        );
        ensure!(
            extent == 0 || !ptr.is_null(),
            Error::invalid("data pointer is null for a non-empty tensor")
        );
        Ok(TensorView {
            ptr,
            nbytes,
            dtype,
            sizes: sizes.to_vec(),
            strides,
            device,
            stream: 0,
            writable: true,
            _borrow: PhantomData,
        })
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// The local sizes (shape) of the view.
    pub fn sizes(&self) -> &[u64] {
        &self.sizes
    }
    /// Strides in elements, one per dimension.
    pub fn strides(&self) -> &[u64] {
        &self.strides
    }
    /// Where the memory lives.
    pub fn device(&self) -> Device {
        self.device
    }
    /// Whether a load may write into the view (false for [`from_slice`](Self::from_slice) and
    /// [`from_bytes_ref`](Self::from_bytes_ref) views).
    pub fn is_writable(&self) -> bool {
        self.writable
    }
    /// An error unless a load may write into the view.
    pub(crate) fn ensure_writable(&self, fqn: &str) -> Result<()> {
        ensure!(
            self.writable,
            Error::invalid(format!(
                "key {fqn:?}: its tensor view is read-only (TensorView::from_slice); load into one made with from_slice_mut"
            ))
            .with_key(fqn)
        );
        Ok(())
    }
    /// The caller's CUDA stream (0: none; libdcp then waits for the device before copying).
    pub fn stream(&self) -> usize {
        self.stream
    }

    /// Makes this view memory of CUDA device `ordinal` (the pointer is a device pointer), with
    /// the caller's stream (`0` for none). Checks that the driver is present and that the view's
    /// bytes lie in one allocation of that device; on failure the view is left as it was.
    /// `stream` goes to the driver as is: it must be a live `CUstream` until the saves and
    /// loads that use the view have returned (it cannot be checked, so this is the caller's
    /// promise, as in the C API).
    pub fn set_cuda(&mut self, ordinal: i32, stream: usize) -> Result<()> {
        let extent = strided_extent_bytes(&self.sizes, &self.strides, self.dtype.size())?;
        crate::cuda::driver().map_err(|e| Error::unsupported(format!("CUDA tensors cannot be used here: {}", e.message())))?;
        crate::cuda::check_device_range(ordinal, self.ptr as u64, extent)?;
        self.device = Device::Cuda(ordinal);
        self.stream = stream;
        Ok(())
    }
    /// The address of the first element (a device pointer for CUDA views).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
    /// Bytes of memory the view was made over.
    pub fn nbytes(&self) -> usize {
        self.nbytes
    }
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.sizes.iter().product()
    }
    /// Bytes of the view's elements, packed densely.
    pub fn data_bytes(&self) -> u64 {
        self.numel() * self.dtype.size() as u64
    }
    /// True when the elements are dense and in row-major order.
    pub fn is_contiguous(&self) -> bool {
        is_contiguous(&self.sizes, &self.strides)
    }
}

pub fn is_contiguous(sizes: &[u64], strides: &[u64]) -> bool {
    let mut expected = 1u64;
    for i in (0..sizes.len()).rev() {
        if sizes[i] != 1 && strides[i] != expected {
            return false;
        }
        expected = expected.saturating_mul(sizes[i]);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_roundtrip_and_names() {
        for d in ALL_DTYPES {
            assert_eq!(DType::try_from(d as i32).unwrap(), d);
            assert_eq!(DType::from_torch_name(d.torch_name()), Some(d));
            if let Some(s) = d.storage_name() {
                assert_eq!(DType::from_storage_name(s), Some(d));
            }
        }
        assert!(DType::try_from(0).is_err());
        assert!(DType::try_from(99).is_err());
    }

    #[test]
    fn element_dtypes_have_their_size() {
        fn check<T: Element>() {
            assert_eq!(std::mem::size_of::<T>(), T::DTYPE.size(), "{}", T::DTYPE);
        }
        check::<f32>();
        check::<f64>();
        check::<i64>();
        check::<i32>();
        check::<i16>();
        check::<i8>();
        check::<u8>();
        check::<u16>();
        check::<u32>();
        check::<u64>();
    }

    #[test]
    fn shared_views_are_read_only() {
        let data = [1.5f64, 2.5];
        let v = TensorView::from_slice(&data, &[2]).unwrap();
        assert_eq!(v.dtype(), DType::F64);
        assert!(!v.is_writable());
        assert!(v.ensure_writable("x").unwrap_err().message().contains("read-only"));
        let bytes = [0u8; 4];
        assert!(!TensorView::from_bytes_ref(&bytes, DType::BF16, &[2]).unwrap().is_writable());
        let mut out = [0i32; 3];
        let v = TensorView::from_slice_mut(&mut out, &[3]).unwrap();
        assert_eq!(v.dtype(), DType::I32);
        assert!(v.is_writable());
    }

    #[test]
    fn view_rejects_small_buffer() {
        let mut buf = vec![0u8; 10];
        let err = TensorView::from_bytes(&mut buf, DType::F32, &[3]).unwrap_err();
        assert!(err.message().contains("too small"), "{}", err);
    }

    #[test]
    fn extent_and_contiguity() {
        assert_eq!(strided_extent_bytes(&[2, 3], &[1, 2], 4).unwrap(), 24);
        assert_eq!(strided_extent_bytes(&[0, 3], &[3, 1], 4).unwrap(), 0);
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(!is_contiguous(&[2, 3], &[1, 2]));
        assert!(is_contiguous(&[1, 3], &[99, 1]));
    }
}
