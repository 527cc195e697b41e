//! Reading saved chunks into registered buffers: locate the payload, read only the byte ranges
//! the overlaps need (widened to checksum units), verify, scatter.

use crate::error::{Error, ErrorKind, Result};
use crate::format::metadata::StorageInfo;
use crate::format::sidecar::{BlockRecord, Sidecar};
use crate::format::zipitem::{self, ItemContent, ItemSource, TensorRecord};
use crate::plan::runs::{BoxRuns, Run};
use crate::region::Region;
use crate::storage::{ReadHandle, Storage};
use crate::tensor::{is_contiguous, Device, TensorView};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Most bytes held in one read window.
const WINDOW: u64 = 64 << 20;
/// Needed ranges closer than this are read together.
const COALESCE_GAP: u64 = 1 << 20;

/// Open files of a checkpoint, shared by reader threads.
pub struct Files<'s> {
    storage: &'s dyn Storage,
    open: Mutex<HashMap<String, Arc<dyn ReadHandle>>>,
    expected_len: HashMap<String, u64>,
}

impl<'s> Files<'s> {
    pub fn new(storage: &'s dyn Storage, sidecar: Option<&Sidecar>) -> Self {
        let expected_len = sidecar
            .map(|s| s.files.iter().map(|f| (f.name.clone(), f.len)).collect())
            .unwrap_or_default();
        Files {
            storage,
            open: Mutex::new(HashMap::new()),
            expected_len,
        }
    }

    pub fn get(&self, name: &str) -> Result<Arc<dyn ReadHandle>> {
        if let Some(h) = self.open.lock().unwrap().get(name) {
            return Ok(h.clone());
        }
        let h = self.storage.open_read(name).map_err(|e| match e.kind() {
            ErrorKind::NotFound => Error::corrupt(format!("data file {} is missing", self.storage.describe(name))),
            _ => e,
        })?;
        if let Some(&want) = self.expected_len.get(name) {
            if h.len() != want {
                return Err(Error::corrupt(format!(
                    "data file {} has {} bytes but was written with {want} (truncated or replaced)",
                    self.storage.describe(name),
                    h.len()
                )));
            }
        }
        self.open.lock().unwrap().insert(name.to_string(), h.clone());
        Ok(h)
    }

    pub fn describe(&self, name: &str) -> String {
        self.storage.describe(name)
    }
}

/// An item's bytes inside its file.
struct ItemSlice<'h> {
    file: &'h dyn ReadHandle,
    info: &'h StorageInfo,
}

impl ItemSource for ItemSlice<'_> {
    fn read_item_range(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.file.read_vec(self.info.offset + offset, len)
    }
}

fn item_what(files: &Files, fqn: &str, info: &StorageInfo) -> String {
    format!(
        "key {fqn:?}: item at offset {} of {}",
        info.offset,
        files.describe(&info.relative_path)
    )
}

/// Reads the item of a non-tensor entry.
pub fn read_object(files: &Files, fqn: &str, info: &StorageInfo) -> Result<crate::format::pyobj::ObjectValue> {
    let file = files.get(&info.relative_path)?;
    let what = item_what(files, fqn, info);
    check_item_bounds(file.as_ref(), info, &what)?;
    match zipitem::read_item(&ItemSlice { file: file.as_ref(), info }, info.length, &what)? {
        ItemContent::Object(v) => Ok(v),
        ItemContent::Tensor(_) => Err(Error::mismatch(format!(
            "{what}: holds a tensor, but the metadata says it is an object"
        ))),
    }
}

fn check_item_bounds(file: &dyn ReadHandle, info: &StorageInfo, what: &str) -> Result<()> {
    if info.offset.checked_add(info.length).is_none_or(|e| e > file.len()) {
        return Err(Error::corrupt(format!(
            "{what}: the item ({} bytes) runs past the end of the {}-byte file (truncated?)",
            info.length,
            file.len()
        )));
    }
    Ok(())
}

/// A registered destination: the overlap and the view it goes into.
pub struct Target<'v, 'a> {
    pub view: &'v TensorView<'a>,
    /// The view's box in global coordinates.
    pub region: &'v Region,
    /// The overlap with the saved chunk, in global coordinates.
    pub overlap: Region,
}

/// How a payload is verified: per block (from the sidecar), as a whole (the zip CRC), or not.
enum Check<'b> {
    Blocks(&'b BlockRecord, u64),
    Whole(u32),
    None,
}

/// Reads one saved chunk into its targets.
pub fn read_chunk(
    files: &Files,
    sidecar_blocks: Option<(&BlockRecord, u64)>,
    fqn: &str,
    chunk: &Region,
    info: &StorageInfo,
    targets: &[Target],
    verify: bool,
) -> Result<()> {
    let file = files.get(&info.relative_path)?;
    let what = item_what(files, fqn, info);
    check_item_bounds(file.as_ref(), info, &what)?;
    for t in targets {
        if t.view.device() != Device::Cpu {
            return Err(Error::unsupported(format!(
                "key {fqn:?}: loading into CUDA tensors is not supported by this build"
            )));
        }
    }
    let elem_expected = targets.first().map(|t| t.view.dtype());
    // Where the payload is and how it is laid out.
    let (payload_abs, rec) = match sidecar_blocks {
        Some((b, _)) => {
            let dtype = elem_expected.ok_or_else(|| Error::internal("no target"))?;
            let rec = TensorRecord {
                dtype,
                sizes: chunk.sizes.clone(),
                strides: crate::tensor::contiguous_strides(&chunk.sizes),
                storage_offset: 0,
                data_offset: b.payload_offset - info.offset,
                data_len: b.payload_len,
                crc: 0,
            };
            (b.payload_offset, rec)
        }
        None => match zipitem::read_item(&ItemSlice { file: file.as_ref(), info }, info.length, &what)? {
            ItemContent::Tensor(rec) => (info.offset + rec.data_offset, rec),
            ItemContent::Object(_) => {
                return Err(Error::mismatch(format!(
                    "{what}: holds an object, but the metadata says it is a tensor chunk"
                )))
            }
        },
    };
    if Some(rec.dtype) != elem_expected || rec.sizes != chunk.sizes {
        return Err(Error::corrupt(format!(
            "{what}: holds a {} tensor of shape {:?}, but the metadata describes a {} chunk of shape {:?}",
            rec.dtype,
            rec.sizes,
            elem_expected.map(|d| d.to_string()).unwrap_or_default(),
            chunk.sizes
        )));
    }
    let check = if !verify {
        Check::None
    } else if let Some((b, bs)) = sidecar_blocks {
        Check::Blocks(b, bs)
    } else {
        Check::Whole(rec.crc)
    };
    let elem = rec.dtype.size() as u64;
    let saved_dense = rec.storage_offset == 0 && is_contiguous(&rec.sizes, &rec.strides);

    // Fast path: the whole chunk into one dense registered buffer: read straight into it.
    if let [t] = targets {
        if saved_dense && t.overlap == *chunk && t.region == chunk && t.view.is_contiguous() && rec.data_len == chunk.numel() * elem {
            let dst = unsafe { std::slice::from_raw_parts_mut(t.view.as_ptr(), rec.data_len as usize) };
            file.read_at(payload_abs, dst)?;
            return verify_bytes(&check, 0, dst, true, &what, payload_abs);
        }
    }

    // Runs from the payload (a) to each target (b, addressed by absolute pointer).
    let saved_strides: Vec<u64> = rec.strides.iter().map(|s| s * elem).collect();
    let mut runs: Vec<(Run, *mut u8)> = Vec::new();
    for t in targets {
        let rel_saved = t.overlap.relative_to(chunk);
        let rel_dst = t.overlap.relative_to(t.region);
        let a_base = (rec.storage_offset + rel_saved.iter().zip(&rec.strides).map(|(o, s)| o * s).sum::<u64>()) * elem;
        let dst_strides: Vec<u64> = t.view.strides().iter().map(|s| s * elem).collect();
        let b_base = rel_dst.iter().zip(&dst_strides).map(|(o, s)| o * s).sum::<u64>();
        let ptr = t.view.as_ptr();
        BoxRuns::new(&t.overlap.sizes, &saved_strides, &dst_strides, a_base, b_base, elem).for_each(|r| runs.push((r, ptr)));
    }
    runs.sort_by_key(|(r, _)| r.a);

    // Byte ranges of the payload to read.
    let unit = match (&check, saved_dense) {
        (_, false) | (Check::Whole(_), _) => rec.data_len.max(1),
        (Check::Blocks(_, bs), _) => *bs,
        (Check::None, _) => 1,
    };
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for (r, _) in &runs {
        let lo = r.a / unit * unit;
        let hi = ((r.a + r.a_span(elem)).div_ceil(unit) * unit).min(rec.data_len);
        match ranges.last_mut() {
            Some(last) if lo <= last.1 + COALESCE_GAP => last.1 = last.1.max(hi),
            _ => ranges.push((lo, hi)),
        }
    }
    // Windows: ranges cut into pieces of at most WINDOW bytes at unit boundaries (unless the
    // unit is the whole record and the saved layout is strided: then it must be in memory at
    // once).
    let max_window = if saved_dense { (WINDOW / unit).max(1) * unit } else { u64::MAX };
    let mut whole = crc32fast::Hasher::new();
    let mut next_run = 0usize;
    let mut buf = Vec::new();
    for (lo, hi) in ranges {
        let mut w0 = lo;
        while w0 < hi {
            let w1 = (w0 + max_window).min(hi);
            buf.resize((w1 - w0) as usize, 0);
            file.read_at(payload_abs + w0, &mut buf)?;
            match &check {
                Check::Whole(_) => whole.update(&buf),
                _ => verify_bytes(&check, w0, &buf, false, &what, payload_abs)?,
            }
            while next_run < runs.len() {
                let (run, ptr) = runs[next_run];
                if run.a >= w1 {
                    break;
                }
                let (head, tail) = run.split(w1, true);
                if let Some(h) = head {
                    unsafe { h.copy(buf.as_ptr(), ptr, elem, w0, 0) };
                }
                match tail {
                    Some(t) => {
                        runs[next_run].0 = t;
                        break;
                    }
                    None => next_run += 1,
                }
            }
            w0 = w1;
        }
    }
    if let Check::Whole(expected) = check {
        let got = whole.finalize();
        if got != expected {
            return Err(checksum_error(&what, payload_abs, rec.data_len, got, expected));
        }
    }
    Ok(())
}

fn checksum_error(what: &str, at: u64, len: u64, got: u32, expected: u32) -> Error {
    Error::new(
        ErrorKind::Checksum,
        format!(
            "{what}: checksum mismatch in bytes {at}..{} of the file: CRC-32 is {got:08x}, expected {expected:08x}",
            at + len
        ),
    )
}

/// Verifies `data`, which holds payload bytes from `off`: whole-record CRC (only when `data` is
/// the whole payload) or every block it contains.
fn verify_bytes(check: &Check, off: u64, data: &[u8], is_whole: bool, what: &str, payload_abs: u64) -> Result<()> {
    match check {
        Check::None => Ok(()),
        Check::Whole(expected) => {
            debug_assert!(is_whole);
            let got = crc32fast::hash(data);
            if got != *expected {
                return Err(checksum_error(what, payload_abs, data.len() as u64, got, *expected));
            }
            Ok(())
        }
        Check::Blocks(b, bs) => {
            let first = off / bs;
            for (i, piece) in data.chunks(*bs as usize).enumerate() {
                let block = first + i as u64;
                let expected = *b
                    .crcs
                    .get(block as usize)
                    .ok_or_else(|| Error::corrupt(format!("{what}: block {block} has no recorded checksum")))?;
                let got = crc32fast::hash(piece);
                if got != expected {
                    return Err(checksum_error(what, payload_abs + block * bs, piece.len() as u64, got, expected));
                }
            }
            Ok(())
        }
    }
}
