//! Hugging Face safetensors files through the `safetensors` crate: an 8-byte little-endian
//! header length, a JSON header (`{"name": {"dtype": "F32", "shape": [2, 3], "data_offsets":
//! [start, end]}, "__metadata__": {...}}`, offsets relative to the end of the header), then the
//! tensors' bytes, back to back.

use dcp::DType;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;

/// The safetensors crate refuses headers larger than this.
pub const MAX_HEADER: u64 = 100_000_000;

/// The safetensors dtype of a libdcp dtype. Complex dtypes have none: torch's safetensors
/// loader has no complex64 (and no format has complex128), so they are skipped.
pub fn dtype_name(d: DType) -> Option<Dtype> {
    Some(match d {
        DType::F64 => Dtype::F64,
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::F8E4M3FN => Dtype::F8_E4M3,
        DType::F8E5M2 => Dtype::F8_E5M2,
        DType::I64 => Dtype::I64,
        DType::I32 => Dtype::I32,
        DType::I16 => Dtype::I16,
        DType::I8 => Dtype::I8,
        DType::U8 => Dtype::U8,
        DType::U16 => Dtype::U16,
        DType::U32 => Dtype::U32,
        DType::U64 => Dtype::U64,
        DType::Bool => Dtype::BOOL,
        DType::C64 | DType::C128 => return None,
    })
}

/// The libdcp dtype of a safetensors dtype, for those libdcp reads and writes.
pub fn dtype_from(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::F64 => DType::F64,
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F8_E4M3 => DType::F8E4M3FN,
        Dtype::F8_E5M2 => DType::F8E5M2,
        Dtype::I64 => DType::I64,
        Dtype::I32 => DType::I32,
        Dtype::I16 => DType::I16,
        Dtype::I8 => DType::I8,
        Dtype::U8 => DType::U8,
        Dtype::U16 => DType::U16,
        Dtype::U32 => DType::U32,
        Dtype::U64 => DType::U64,
        Dtype::BOOL => DType::Bool,
        _ => return None,
    })
}

/// One tensor of a file to write, or of a file read: its bytes are `start..end` of the data.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub start: u64,
    pub end: u64,
}

impl Tensor {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
}

/// The bytes before the data of a file holding `tensors` (name, dtype, shape, bytes) back to
/// back in that order: length prefix and JSON header, padded with spaces so the data starts on
/// a multiple of 8, as the safetensors library writes it.
pub fn encode_header(tensors: &[(String, DType, Vec<u64>, u64)], metadata: &[(&str, &str)]) -> Result<Vec<u8>, String> {
    let mut infos = Vec::with_capacity(tensors.len());
    let mut pos = 0u64;
    for (name, dtype, shape, bytes) in tensors {
        if name == "__metadata__" {
            return Err("a tensor cannot be named __metadata__ in a safetensors file".into());
        }
        let st_dtype = dtype_name(*dtype).ok_or_else(|| format!("tensor {name:?}: safetensors has no dtype for {dtype}"))?;
        let end = pos
            .checked_add(*bytes)
            .filter(|&e| usize::try_from(e).is_ok())
            .ok_or_else(|| format!("tensor {name:?} of shape {shape:?} overflows the file"))?;
        let info = TensorInfo {
            dtype: st_dtype,
            shape: shape.iter().map(|&d| d as usize).collect(),
            data_offsets: (pos as usize, end as usize),
        };
        infos.push((name.clone(), info));
        pos = end;
    }
    let meta: HashMap<String, String> = metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let header = Metadata::new((!meta.is_empty()).then_some(meta), infos).map_err(|e| format!("safetensors header: {e}"))?;
    let mut json = serde_json::to_string(&header).map_err(|e| format!("safetensors header: {e}"))?;
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    if json.len() as u64 > MAX_HEADER {
        return Err(format!(
            "safetensors header of {} bytes exceeds the {MAX_HEADER}-byte limit",
            json.len()
        ));
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    Ok(out)
}

/// The header length from a file's first 8 bytes, checked against the file's length (before
/// the file is mapped).
pub fn header_len(first8: &[u8], file_len: u64, what: &str) -> Result<u64, String> {
    let (Some(first8), true) = (first8.get(..8), file_len >= 8) else {
        return Err(format!("{what}: too short for a safetensors file"));
    };
    let n = u64::from_le_bytes(first8.try_into().expect("8 bytes"));
    if n > MAX_HEADER || n > file_len - 8 {
        return Err(format!(
            "{what}: not a safetensors file (header length {n} for a {file_len}-byte file)"
        ));
    }
    Ok(n)
}

/// The tensors of a whole file (`file` holds all its bytes), in the order of their data, with
/// offsets from the start of the file. The safetensors crate checks that the tensors tile the
/// data exactly and that each holds its dtype and shape's bytes.
pub fn read_tensors(file: &[u8], what: &str) -> Result<Vec<Tensor>, String> {
    let (n, header) = SafeTensors::read_metadata(file).map_err(|e| format!("{what}: bad safetensors file: {e}"))?;
    let data_start = 8 + n as u64;
    let mut out = Vec::new();
    for name in header.offset_keys() {
        let info = header.info(&name).expect("a name of the header");
        let dtype = dtype_from(info.dtype)
            .ok_or_else(|| format!("{what}: tensor {name:?} has dtype {}, which libdcp does not support", info.dtype))?;
        out.push(Tensor {
            dtype,
            shape: info.shape.iter().map(|&d| d as u64).collect(),
            start: data_start + info.data_offsets.0 as u64,
            end: data_start + info.data_offsets.1 as u64,
            name,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip() {
        let tensors = [
            ("a.weight".to_string(), DType::BF16, vec![2, 3], 12),
            ("scalar \"q\"".to_string(), DType::F64, vec![], 8),
            ("empty".to_string(), DType::I32, vec![0, 4], 0),
        ];
        let head = encode_header(&tensors, &[("format", "pt")]).unwrap();
        assert_eq!(head.len() % 8, 0);
        let mut file = head.clone();
        file.extend_from_slice(&[7; 20]);
        let got = read_tensors(&file, "t").unwrap();
        let h = head.len() as u64;
        assert_eq!(
            got.iter()
                .map(|t| (t.name.as_str(), t.dtype, t.start - h, t.end - h))
                .collect::<Vec<_>>(),
            [
                ("a.weight", DType::BF16, 0, 12),
                ("scalar \"q\"", DType::F64, 12, 20),
                ("empty", DType::I32, 20, 20)
            ]
        );
        // Truncated data is refused.
        assert!(read_tensors(&file[..file.len() - 1], "t").is_err());
        assert_eq!(header_len(&file, file.len() as u64, "t").unwrap(), h - 8);
        assert!(header_len(&file, 8, "t").unwrap_err().contains("not a safetensors file"));
    }

    #[test]
    fn names() {
        use DType::*;
        // dtype_name's match names every DType; each name maps back.
        for d in [
            F64, F32, F16, BF16, F8E4M3FN, F8E5M2, I64, I32, I16, I8, U8, U16, U32, U64, Bool, C64, C128,
        ] {
            match dtype_name(d) {
                Some(n) => assert_eq!(dtype_from(n), Some(d)),
                None => assert!(matches!(d, DType::C64 | DType::C128)),
            }
        }
    }
}
