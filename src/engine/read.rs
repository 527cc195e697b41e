//! Reading saved chunks into registered buffers: locate the payload, read only the byte ranges
//! the overlaps need (widened to checksum units), verify, scatter.

use super::staging::HostBuf;
use super::write::DeviceStreams;
use crate::cuda;
use crate::error::{Error, ErrorKind, Result};
use crate::format::metadata::StorageInfo;
use crate::format::sidecar::{BlockRecord, Sidecar};
use crate::format::zipitem::{self, ItemContent, ItemSource};
use crate::plan::runs::{byte_strides, BoxRuns, Run};
use crate::region::Region;
use crate::storage::DIRECT_ALIGN;
use crate::storage::{ReadHandle, Storage};
use crate::tensor::{is_contiguous, Device, TensorView};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Most bytes held in one read window.
const WINDOW: u64 = 64 << 20;
/// Needed ranges closer than this are read together.
const COALESCE_GAP: u64 = 1 << 20;

/// Open files of a checkpoint, shared by reader threads.
pub struct Files {
    storage: Arc<dyn Storage>,
    open: Mutex<HashMap<String, Arc<dyn ReadHandle>>>,
    expected_len: HashMap<String, u64>,
}

impl Files {
    pub fn new(storage: Arc<dyn Storage>, sidecar: Option<&Sidecar>) -> Self {
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
    pub overlap: &'v Region,
}

/// How a payload is verified: per block (from the sidecar), as a whole (the zip CRC), or not.
enum Check<'b> {
    Blocks(&'b BlockRecord, u64),
    Whole(u32),
    None,
}

/// Whether reads bypass the page cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirectIo {
    /// O_DIRECT for byte ranges mostly not in the page cache (cold), buffered otherwise.
    Auto,
    On,
    Off,
}

/// What one reader thread carries from chunk to chunk.
pub(crate) struct Reader<'f> {
    pub files: &'f Files,
    pub verify: bool,
    pub direct: DirectIo,
    /// The window buffer: WINDOW bytes plus room to align direct reads.
    pub buf: &'f HostBuf,
    pub(crate) streams: &'f mut DeviceStreams,
}

/// Size of a reader thread's window buffer.
pub fn window_buffer_len() -> usize {
    WINDOW as usize + 2 * DIRECT_ALIGN
}

/// Reads `len` payload bytes at absolute file offset `abs` into the window buffer `buf`,
/// directly (O_DIRECT) when the policy says so and the request can be aligned; returns them.
fn read_window<'b>(direct: DirectIo, buf: &'b HostBuf, file: &dyn ReadHandle, abs: u64, len: usize) -> Result<&'b [u8]> {
    if use_direct(direct, file, abs, len as u64) {
        let a = DIRECT_ALIGN as u64;
        let lo = abs / a * a;
        let hi = (abs + len as u64).div_ceil(a) * a;
        let span = (hi - lo) as usize;
        if span <= buf.capacity() {
            let dst = unsafe { buf.slice(span) };
            if file.read_direct(lo, dst)? {
                let skip = (abs - lo) as usize;
                return Ok(&dst[skip..skip + len]);
            }
        }
    }
    let dst = unsafe { buf.slice(len) };
    file.read_at(abs, dst)?;
    Ok(dst)
}

/// Whether `len` bytes at `abs` are read bypassing the page cache: always with `On`; with
/// `Auto` when the range is large and mostly not cached (the page-cache probe runs last).
fn use_direct(direct: DirectIo, file: &dyn ReadHandle, abs: u64, len: u64) -> bool {
    match direct {
        DirectIo::Off => false,
        DirectIo::On => true,
        DirectIo::Auto => len >= (1 << 20) && file.cached_fraction(abs, len).is_some_and(|f| f < 0.5),
    }
}

/// Reads one saved chunk into its targets.
pub(crate) fn read_chunk(
    rd: &mut Reader,
    sidecar_blocks: Option<(&BlockRecord, u64)>,
    fqn: &str,
    chunk: &Region,
    info: &StorageInfo,
    targets: &[Target],
) -> Result<()> {
    let files = rd.files;
    let file = files.get(&info.relative_path)?;
    let what = item_what(files, fqn, info);
    check_item_bounds(file.as_ref(), info, &what)?;
    let elem_expected = targets.first().map(|t| t.view.dtype());
    // Where the payload is and how it is laid out: always from the item itself; a sidecar
    // block record must agree with it (it only adds per-block checksums).
    let rec = match zipitem::read_item(&ItemSlice { file: file.as_ref(), info }, info.length, &what)? {
        ItemContent::Tensor(rec) => rec,
        ItemContent::Object(_) => {
            return Err(Error::mismatch(format!(
                "{what}: holds an object, but the metadata says it is a tensor chunk"
            )))
        }
    };
    let payload_abs = info.offset + rec.data_offset;
    if let Some((b, _)) = sidecar_blocks {
        if b.payload_offset != payload_abs || b.payload_len != rec.data_len {
            return Err(Error::corrupt(format!(
                "{what}: the sidecar's block record (payload at {} of {} bytes) does not match the item (payload at {payload_abs} of {} bytes): a damaged or forged sidecar",
                b.payload_offset, b.payload_len, rec.data_len
            )));
        }
    }
    if Some(rec.dtype) != elem_expected || rec.sizes != chunk.sizes {
        return Err(Error::corrupt(format!(
            "{what}: holds a {} tensor of shape {:?}, but the metadata describes a {} chunk of shape {:?}",
            rec.dtype,
            rec.sizes,
            elem_expected.map(|d| d.to_string()).unwrap_or_default(),
            chunk.sizes
        )));
    }
    let check = if !rd.verify {
        Check::None
    } else if let Some((b, bs)) = sidecar_blocks {
        Check::Blocks(b, bs)
    } else {
        Check::Whole(rec.crc)
    };
    let elem = rec.dtype.size() as u64;
    let saved_dense = rec.storage_offset == 0 && is_contiguous(&rec.sizes, &rec.strides);

    // Fast path: the whole chunk into one dense host buffer, from the page cache: read straight
    // into it.
    if let [t] = targets {
        let whole = saved_dense && t.overlap == chunk && t.region == chunk && rec.data_len == chunk.numel() * elem;
        if whole
            && t.view.device() == Device::Cpu
            && t.view.is_contiguous()
            && !(rec.data_len >= 1 << 20 && use_direct(rd.direct, file.as_ref(), payload_abs, rec.data_len))
        {
            let dst = unsafe { std::slice::from_raw_parts_mut(t.view.as_ptr(), rec.data_len as usize) };
            file.read_at(payload_abs, dst)?;
            return verify_bytes(&check, 0, dst, true, &what, payload_abs);
        }
    }

    // Runs from the payload (a) to each target (b, addressed by absolute pointer).
    let saved_strides = byte_strides(&rec.strides, elem);
    let mut runs: Vec<(Run, *mut u8, usize)> = Vec::new();
    for (ti, t) in targets.iter().enumerate() {
        let rel_saved = t.overlap.relative_to(chunk);
        let rel_dst = t.overlap.relative_to(t.region);
        let a_base = (rec.storage_offset + rel_saved.iter().zip(&rec.strides).map(|(o, s)| o * s).sum::<u64>()) * elem;
        let dst_strides = byte_strides(t.view.strides(), elem);
        let b_base = rel_dst.iter().zip(&dst_strides).map(|(o, s)| o * s).sum::<u64>();
        let ptr = t.view.as_ptr();
        BoxRuns::new(&t.overlap.sizes, &saved_strides, &dst_strides, a_base, b_base, elem).for_each(|r| runs.push((r, ptr, ti)));
    }
    runs.sort_by_key(|(r, _, _)| r.a);

    // Byte ranges of the payload to read.
    let unit = match (&check, saved_dense) {
        (_, false) | (Check::Whole(_), _) => rec.data_len.max(1),
        (Check::Blocks(_, bs), _) => *bs,
        (Check::None, _) => 1,
    };
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for (r, _, _) in &runs {
        let lo = r.a / unit * unit;
        let hi = ((r.a + r.a_span(elem)).div_ceil(unit) * unit).min(rec.data_len);
        match ranges.last_mut() {
            Some(last) if lo <= last.1 + COALESCE_GAP => last.1 = last.1.max(hi),
            _ => ranges.push((lo, hi)),
        }
    }
    // Windows: ranges cut into pieces of at most WINDOW bytes at unit boundaries. A strided
    // saved layout must be in memory at once (rare: torch writes transposed views as they are).
    let max_window = if saved_dense { (WINDOW / unit).max(1) * unit } else { u64::MAX };
    let mut whole = crc32fast::Hasher::new();
    let mut next_run = 0usize;
    let mut big: Option<Vec<u8>> = None;
    // Device targets: each one's stream (resolved on its first copy), the device made current
    // last, and which targets the current window copied to.
    let mut streams: Vec<Option<cuda::Stream>> = targets.iter().map(|_| None).collect();
    let mut current: Option<i32> = None;
    let mut copied_to = vec![false; targets.len()];
    for (lo, hi) in ranges {
        let mut w0 = lo;
        while w0 < hi {
            let w1 = (w0 + max_window).min(hi);
            let n = (w1 - w0) as usize;
            let data: &[u8] = if n <= WINDOW as usize {
                read_window(rd.direct, rd.buf, file.as_ref(), payload_abs + w0, n)?
            } else {
                let v = big.insert(vec![0u8; n]);
                file.read_at(payload_abs + w0, v)?;
                v
            };
            match &check {
                Check::Whole(_) => whole.update(data),
                _ => verify_bytes(&check, w0, data, false, &what, payload_abs)?,
            }
            while next_run < runs.len() {
                let (run, ptr, ti) = runs[next_run];
                if run.a >= w1 {
                    break;
                }
                let (head, tail) = run.split(w1, true);
                if let Some(h) = head {
                    let view = targets[ti].view;
                    match view.device() {
                        Device::Cpu => unsafe { h.copy(data.as_ptr(), ptr, elem, w0, 0) },
                        Device::Cuda(ordinal) => {
                            let s = match &mut streams[ti] {
                                Some(s) => {
                                    if current != Some(ordinal) {
                                        cuda::activate(ordinal)?;
                                    }
                                    s
                                }
                                // `get` makes the device current.
                                slot => slot.insert(rd.streams.get(ordinal, view.stream())?),
                            };
                            current = Some(ordinal);
                            copy_run_to_device(s, &h, data, w0, ptr as u64, elem).map_err(|e| e.context(format!("key {fqn:?}")))?;
                            copied_to[ti] = true;
                        }
                    }
                }
                match tail {
                    Some(t) => {
                        runs[next_run].0 = t;
                        break;
                    }
                    None => next_run += 1,
                }
            }
            // The window buffer is reused next: its copies to the device must be done.
            let mut synced: Vec<*mut std::ffi::c_void> = Vec::new();
            for (copied, s) in copied_to.iter_mut().zip(&streams) {
                if let (true, Some(s)) = (std::mem::take(copied), s) {
                    if !synced.contains(&s.raw_handle()) {
                        s.synchronize()?;
                        synced.push(s.raw_handle());
                    }
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

/// Queues the host-to-device copies of one run (one copy when it is dense on both sides).
fn copy_run_to_device(s: &cuda::Stream, run: &Run, window: &[u8], w0: u64, dst: u64, elem: u64) -> Result<()> {
    let src = (run.a - w0) as usize;
    if run.a_step == elem && run.b_step == elem {
        let n = (run.count * elem) as usize;
        return unsafe { s.h2d(dst + run.b, &window[src..src + n]) };
    }
    for i in 0..run.count as usize {
        let a = src + i * run.a_step as usize;
        unsafe { s.h2d(dst + run.b + i as u64 * run.b_step, &window[a..a + elem as usize])? };
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
