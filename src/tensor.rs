//! Element types, devices, and borrowed views of caller memory with shape and strides.

use crate::error::{ensure, Error, Result};
use std::marker::PhantomData;

/// Element type of a tensor. The discriminants are the values of `dcp_dtype` in the C API and
/// never change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum DType {
    F32 = 1,
    F64 = 2,
    F16 = 3,
    BF16 = 4,
    F8E4M3FN = 5,
    F8E5M2 = 6,
    I64 = 7,
    I32 = 8,
    I16 = 9,
    I8 = 10,
    U8 = 11,
    Bool = 12,
    C64 = 13,
    C128 = 14,
    U16 = 15,
    U32 = 16,
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

    pub fn from_storage_name(name: &str) -> Option<DType> {
        ALL_DTYPES.iter().copied().find(|d| d.storage_name() == Some(name))
    }

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
    _borrow: PhantomData<&'a mut [u8]>,
}

// SAFETY: the view stands for memory lent to it for `'a` (a `&'a mut [u8]`, or `from_raw`'s
// contract), which is not tied to a thread: sending the view is sending that loan.
unsafe impl Send for TensorView<'_> {}
// SAFETY: `&TensorView` gives only the description and the raw pointer; the memory is reached
// through the pointer solely in libdcp's unsafe blocks, where threads only read it (save) or
// write disjoint elements of it (load: plan overlaps tile each box without overlapping).
unsafe impl Sync for TensorView<'_> {}

/// Element types a typed slice may be lent as (`TensorView::from_slice`): plain numbers, for
/// which any bytes a load writes are a valid value (unlike `bool`, `char` or references).
pub trait Element: Copy + sealed::Sealed {}

mod sealed {
    pub trait Sealed {}
}

macro_rules! elements {
    ($($t:ty),*) => {$(
        impl sealed::Sealed for $t {}
        impl Element for $t {}
    )*};
}
elements!(u8, i8, u16, i16, u32, i32, u64, i64, f32, f64);

impl<'a> TensorView<'a> {
    /// A contiguous CPU tensor over a mutable byte slice.
    pub fn from_bytes(data: &'a mut [u8], dtype: DType, sizes: &[u64]) -> Result<Self> {
        // SAFETY: `data` is `data.len()` bytes exclusively borrowed for `'a`, so nobody else
        // reads or writes them while the view exists.
        unsafe { Self::from_raw(data.as_mut_ptr(), data.len(), dtype, sizes, None, Device::Cpu) }
    }

    /// A contiguous CPU tensor over a typed slice (`f32`, `i64`, ...); the dtype must have the
    /// element's size.
    pub fn from_slice<T: Element>(data: &'a mut [T], dtype: DType, sizes: &[u64]) -> Result<Self> {
        ensure!(
            std::mem::size_of::<T>() == dtype.size(),
            Error::invalid(format!(
                "element size {} does not match dtype {dtype} ({} bytes)",
                std::mem::size_of::<T>(),
                dtype.size()
            ))
        );
        let nbytes = std::mem::size_of_val(data);
        let ptr = data.as_mut_ptr() as *mut u8;
        // SAFETY: `data` is `nbytes` bytes exclusively borrowed for `'a`; `T` is a plain number
        // type without padding, so every byte is initialised and any bytes a load writes form
        // valid `T`s.
        unsafe { Self::from_raw(ptr, nbytes, dtype, sizes, None, Device::Cpu) }
    }

    /// A view of raw memory.
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
            _borrow: PhantomData,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn sizes(&self) -> &[u64] {
        &self.sizes
    }
    pub fn strides(&self) -> &[u64] {
        &self.strides
    }
    pub fn device(&self) -> Device {
        self.device
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
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
    pub fn nbytes(&self) -> usize {
        self.nbytes
    }
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
