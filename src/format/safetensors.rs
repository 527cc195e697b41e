//! Hugging Face safetensors files: an 8-byte little-endian header length, a JSON header
//! (`{"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [start, end]}, "__metadata__":
//! {...}}`, offsets relative to the end of the header), then the tensors' bytes.

use super::json::{self, Value};
use crate::error::{ensure, Error, Result};
use crate::tensor::{numel, DType};
use std::fmt::Write;

/// The safetensors library refuses headers larger than this.
pub const MAX_HEADER: u64 = 100 << 20;

/// The safetensors name of a dtype; complex dtypes have none.
pub fn dtype_name(d: DType) -> Option<&'static str> {
    use DType::*;
    Some(match d {
        F64 => "F64",
        F32 => "F32",
        F16 => "F16",
        BF16 => "BF16",
        F8E4M3FN => "F8_E4M3",
        F8E5M2 => "F8_E5M2",
        I64 => "I64",
        I32 => "I32",
        I16 => "I16",
        I8 => "I8",
        U8 => "U8",
        U16 => "U16",
        U32 => "U32",
        U64 => "U64",
        Bool => "BOOL",
        C64 | C128 => return None,
    })
}

pub fn dtype_from_name(name: &str) -> Option<DType> {
    crate::tensor::ALL_DTYPES.iter().copied().find(|d| dtype_name(*d) == Some(name))
}

#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// Byte range relative to the start of the data (after the header).
    pub start: u64,
    pub end: u64,
}

impl TensorInfo {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    /// In the order the JSON lists them.
    pub tensors: Vec<TensorInfo>,
    pub metadata: Vec<(String, String)>,
    /// File offset of the data: 8 + the JSON's length.
    pub data_start: u64,
}

/// Places tensors back to back in the given order: (name, dtype, shape) -> infos with offsets.
pub fn layout(tensors: &[(String, DType, Vec<u64>)]) -> Result<Vec<TensorInfo>> {
    let mut pos = 0u64;
    let mut out = Vec::with_capacity(tensors.len());
    for (name, dtype, shape) in tensors {
        let n = numel(shape)?
            .checked_mul(dtype.size() as u64)
            .ok_or_else(|| Error::invalid(format!("tensor {name:?} of shape {shape:?} overflows")))?;
        out.push(TensorInfo {
            name: name.clone(),
            dtype: *dtype,
            shape: shape.clone(),
            start: pos,
            end: pos + n,
        });
        pos += n;
    }
    Ok(out)
}

/// The bytes before the data: length prefix and JSON header, padded with spaces so the data
/// starts on a multiple of 8.
pub fn encode_header(tensors: &[TensorInfo], metadata: &[(String, String)]) -> Result<Vec<u8>> {
    let mut j = String::from("{");
    if !metadata.is_empty() {
        j.push_str("\"__metadata__\":{");
        for (i, (k, v)) in metadata.iter().enumerate() {
            if i > 0 {
                j.push(',');
            }
            let _ = write!(j, "{}:{}", json::quote(k), json::quote(v));
        }
        j.push('}');
    }
    for (i, t) in tensors.iter().enumerate() {
        ensure!(
            t.name != "__metadata__",
            Error::invalid("a tensor cannot be named __metadata__ in a safetensors file")
        );
        let dtype = dtype_name(t.dtype)
            .ok_or_else(|| Error::unsupported(format!("tensor {:?}: safetensors has no dtype for {}", t.name, t.dtype)))?;
        if i > 0 || !metadata.is_empty() {
            j.push(',');
        }
        let shape: Vec<String> = t.shape.iter().map(|s| s.to_string()).collect();
        let _ = write!(
            j,
            "{}:{{\"dtype\":\"{dtype}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
            json::quote(&t.name),
            shape.join(","),
            t.start,
            t.end
        );
    }
    j.push('}');
    while j.len() % 8 != 0 {
        j.push(' ');
    }
    ensure!(
        j.len() as u64 <= MAX_HEADER,
        Error::invalid(format!("safetensors header of {} bytes exceeds the 100 MiB limit", j.len()))
    );
    let mut out = Vec::with_capacity(8 + j.len());
    out.extend_from_slice(&(j.len() as u64).to_le_bytes());
    out.extend_from_slice(j.as_bytes());
    Ok(out)
}

/// The header length from a file's first 8 bytes (checked against the file length).
pub fn header_len(first8: &[u8], file_len: u64, what: &str) -> Result<u64> {
    ensure!(
        first8.len() >= 8 && file_len >= 8,
        Error::corrupt(format!("{what}: too short for a safetensors file"))
    );
    let n = u64::from_le_bytes(first8[..8].try_into().unwrap());
    ensure!(
        n <= MAX_HEADER && n <= file_len - 8,
        Error::corrupt(format!(
            "{what}: not a safetensors file (header length {n} for a {file_len}-byte file)"
        ))
    );
    Ok(n)
}

/// Parses a header: `head` holds the file's first 8 + header-length bytes.
pub fn parse_header(head: &[u8], file_len: u64, what: &str) -> Result<Header> {
    let n = header_len(head, file_len, what)?;
    let bad = |m: String| Error::corrupt(format!("{what}: bad safetensors header: {m}"));
    let text = head.get(8..8 + n as usize).ok_or_else(|| bad("header is cut short".into()))?;
    let text = std::str::from_utf8(text).map_err(|_| bad("not UTF-8".into()))?;
    let root = json::parse(text, what)?;
    let items = root.as_object().ok_or_else(|| bad("not a JSON object".into()))?;
    let data_start = 8 + n;
    let data_len = file_len - data_start;
    let mut header = Header {
        tensors: Vec::new(),
        metadata: Vec::new(),
        data_start,
    };
    for (name, v) in items {
        if name == "__metadata__" {
            for (k, mv) in v.as_object().ok_or_else(|| bad("__metadata__ is not an object".into()))? {
                let s = mv
                    .as_str()
                    .ok_or_else(|| bad(format!("__metadata__ value {k:?} is not a string")))?;
                header.metadata.push((k.clone(), s.to_string()));
            }
            continue;
        }
        let dtype_s = v
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("tensor {name:?} has no dtype")))?;
        let dtype = dtype_from_name(dtype_s).ok_or_else(|| {
            Error::unsupported(format!(
                "{what}: tensor {name:?} has dtype {dtype_s}, which libdcp does not support"
            ))
        })?;
        let shape = v
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad(format!("tensor {name:?} has no shape")))?
            .iter()
            .map(|d| {
                d.as_u64()
                    .ok_or_else(|| bad(format!("tensor {name:?}: shape is not a list of sizes")))
            })
            .collect::<Result<Vec<u64>>>()?;
        let offs = v
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .ok_or_else(|| bad(format!("tensor {name:?} has no data_offsets pair")))?;
        let (start, end) = match (offs[0].as_u64(), offs[1].as_u64()) {
            (Some(s), Some(e)) if s <= e => (s, e),
            _ => return Err(bad(format!("tensor {name:?}: bad data_offsets"))),
        };
        let want = dtype
            .nbytes(&shape)
            .ok_or_else(|| bad(format!("tensor {name:?}: shape {shape:?} overflows")))?;
        ensure!(
            end - start == want,
            bad(format!(
                "tensor {name:?}: {} bytes at data_offsets [{start}, {end}] but a {dtype_s} tensor of shape {shape:?} has {want}",
                end - start
            ))
        );
        ensure!(
            end <= data_len,
            Error::corrupt(format!(
                "{what}: tensor {name:?} ends at data offset {end} but the file holds {data_len} bytes of data (truncated?)"
            ))
        );
        header.tensors.push(TensorInfo {
            name: name.clone(),
            dtype,
            shape,
            start,
            end,
        });
    }
    let mut by_start: Vec<&TensorInfo> = header.tensors.iter().filter(|t| !t.is_empty()).collect();
    by_start.sort_by_key(|t| t.start);
    for w in by_start.windows(2) {
        ensure!(
            w[1].start >= w[0].end,
            bad(format!("tensors {:?} and {:?} overlap", w[0].name, w[1].name))
        );
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip() {
        let tensors = layout(&[
            ("a.weight".into(), DType::BF16, vec![2, 3]),
            ("scalar \"q\"".into(), DType::F64, vec![]),
            ("empty".into(), DType::I32, vec![0, 4]),
        ])
        .unwrap();
        assert_eq!((tensors[1].start, tensors[1].end), (12, 20));
        let meta = vec![("format".to_string(), "pt".to_string())];
        let head = encode_header(&tensors, &meta).unwrap();
        assert_eq!(head.len() % 8, 0);
        let file_len = head.len() as u64 + 20;
        let h = parse_header(&head, file_len, "t").unwrap();
        assert_eq!(h.tensors, tensors);
        assert_eq!(h.metadata, meta);
        assert_eq!(h.data_start, head.len() as u64);
        // Truncated data is an error naming the tensor.
        let e = parse_header(&head, file_len - 1, "t").unwrap_err();
        assert!(e.message().contains("scalar"), "{e}");
    }

    #[test]
    fn names() {
        for d in crate::tensor::ALL_DTYPES {
            match dtype_name(d) {
                Some(n) => assert_eq!(dtype_from_name(n), Some(d)),
                None => assert!(matches!(d, DType::C64 | DType::C128)),
            }
        }
    }
}
