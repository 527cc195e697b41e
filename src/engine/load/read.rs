//! Reading saved chunks into registered buffers: locate the payload, read only the byte ranges
//! the overlaps need (widened to checksum units), verify, scatter.

use crate::cuda;
use crate::engine::staging::{DeviceStreams, HostBuf};
use crate::error::{Error, ErrorKind, Result};
use crate::format::metadata::StorageInfo;
use crate::format::sidecar::{BlockRecord, Sidecar};
use crate::format::zipitem::{self, ItemContent, ItemSource, TensorRecord};
use crate::plan::runs::{byte_strides, BoxRuns, Run};
use crate::region::Region;
use crate::storage::DIRECT_ALIGN;
use crate::storage::{ReadHandle, Storage};
use crate::tensor::{is_contiguous, DType, Device, TensorView};
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
        if let Some(h) = crate::error::lock(&self.open).get(name) {
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
        crate::error::lock(&self.open).insert(name.to_string(), h.clone());
        Ok(h)
    }

    pub fn describe(&self, name: &str) -> String {
        self.storage.describe(name)
    }
}

/// An item whose bytes are already in memory, in three pieces: the zip records before the
/// payload, the payload (read straight into its destination tensor) and the records after it.
struct SplitItem<'b> {
    /// Absolute offset of the item in its file.
    start: u64,
    pieces: [&'b [u8]; 3],
}

impl ItemSource for SplitItem<'_> {
    fn read_item_range(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(len);
        let end = offset.saturating_add(len as u64);
        let mut piece_start = 0u64;
        for piece in self.pieces {
            let piece_end = piece_start + piece.len() as u64;
            let (lo, hi) = (offset.max(piece_start), end.min(piece_end));
            if lo < hi {
                out.extend_from_slice(&piece[(lo - piece_start) as usize..(hi - piece_start) as usize]);
            }
            piece_start = piece_end;
        }
        if out.len() != len {
            return Err(Error::internal(format!(
                "item bytes {offset}..{end} asked of a {piece_start}-byte item"
            )));
        }
        Ok(out)
    }
    fn item_start(&self) -> u64 {
        self.start
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
    fn item_start(&self) -> u64 {
        self.info.offset
    }
}

fn item_what(files: &Files, fqn: &str, info: &StorageInfo) -> String {
    format!(
        "key {fqn:?}: item at offset {} of {}",
        info.offset,
        files.describe(&info.relative_path)
    )
}

/// An error about the item `info` of `fqn`, with its key, file and item offset (unless the error
/// already names a more precise one).
fn at_item(e: Error, fqn: &str, info: &StorageInfo) -> Error {
    e.with_key(fqn).with_file(info.relative_path.as_str()).with_offset(info.offset)
}

/// Reads the item of a non-tensor entry.
pub fn read_object(files: &Files, fqn: &str, info: &StorageInfo) -> Result<crate::format::pyobj::ObjectValue> {
    read_object_item(files, fqn, info).map_err(|e| at_item(e, fqn, info))
}

fn read_object_item(files: &Files, fqn: &str, info: &StorageInfo) -> Result<crate::format::pyobj::ObjectValue> {
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
    /// O_DIRECT wherever the file system allows it.
    On,
    /// Always through the page cache.
    Off,
}

/// What one reader thread carries from chunk to chunk.
pub(crate) struct Reader<'f> {
    pub files: &'f Files,
    pub verify: bool,
    pub direct: DirectIo,
    /// The window buffer: WINDOW bytes plus room to align direct reads.
    pub buf: &'f mut HostBuf,
    pub(crate) streams: &'f mut DeviceStreams,
}

/// Size of a reader thread's window buffer.
pub fn window_buffer_len() -> usize {
    WINDOW as usize + 2 * DIRECT_ALIGN
}

/// Reads `len` payload bytes at absolute file offset `abs` into the window buffer `buf`,
/// directly (O_DIRECT) when the policy says so and the request can be aligned; returns them.
fn read_window<'b>(direct: DirectIo, buf: &'b mut HostBuf, file: &dyn ReadHandle, abs: u64, len: usize) -> Result<&'b [u8]> {
    if use_direct(direct, file, abs, len as u64) {
        let a = DIRECT_ALIGN as u64;
        let lo = abs / a * a;
        let hi = (abs + len as u64).div_ceil(a) * a;
        let span = (hi - lo) as usize;
        if span <= buf.capacity() && file.read_direct(lo, buf.bytes_mut(span))? {
            let skip = (abs - lo) as usize;
            return Ok(&buf.bytes(span)[skip..skip + len]);
        }
    }
    file.read_at(abs, buf.bytes_mut(len))?;
    Ok(buf.bytes(len))
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

/// A saved chunk's payload, located and checked against the metadata.
struct Located<'b> {
    /// Absolute offset of the payload in its file.
    payload_abs: u64,
    rec: TensorRecord,
    check: Check<'b>,
    /// The payload is dense and row-major (partial reads can address any element).
    dense: bool,
}

/// Finds a chunk's payload from its zip item; a sidecar block record must agree with the item
/// (it only adds per-block checksums). Dtype and shape must be what the metadata says.
fn locate<'b>(
    src: &dyn ItemSource,
    info: &StorageInfo,
    what: &str,
    sidecar_blocks: Option<(&'b BlockRecord, u64)>,
    chunk: &Region,
    dtype: DType,
    verify: bool,
) -> Result<Located<'b>> {
    let rec = match zipitem::read_item(src, info.length, what)? {
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
    if rec.dtype != dtype || rec.sizes != chunk.sizes {
        return Err(Error::corrupt(format!(
            "{what}: holds a {} tensor of shape {:?}, but the metadata describes a {dtype} chunk of shape {:?}",
            rec.dtype, rec.sizes, chunk.sizes
        )));
    }
    let check = match sidecar_blocks {
        _ if !verify => Check::None,
        // Windows end at block boundaries: an element cut by one would be read past the window.
        Some((_, bs)) if bs % dtype.size() as u64 != 0 => {
            return Err(Error::corrupt(format!(
                "{what}: the sidecar's checksum block size {bs} is not a whole number of {}-byte {dtype} elements (a damaged or forged sidecar)",
                dtype.size()
            )))
        }
        Some((b, bs)) => Check::Blocks(b, bs),
        None => Check::Whole(rec.crc),
    };
    let dense = rec.storage_offset == 0 && is_contiguous(&rec.sizes, &rec.strides);
    Ok(Located {
        payload_abs,
        rec,
        check,
        dense,
    })
}

/// Element runs from the payload (a: byte offset in the payload) to each target (b: byte
/// offset from the target view's pointer), sorted by payload offset; with the target index.
fn target_runs(rec: &TensorRecord, chunk: &Region, targets: &[Target]) -> Vec<(Run, usize)> {
    let elem = rec.dtype.size() as u64;
    let saved_strides = byte_strides(&rec.strides, elem);
    let mut runs = Vec::new();
    for (ti, t) in targets.iter().enumerate() {
        let rel_saved = t.overlap.relative_to(chunk);
        let rel_dst = t.overlap.relative_to(t.region);
        let a_base = (rec.storage_offset + rel_saved.iter().zip(&rec.strides).map(|(o, s)| o * s).sum::<u64>()) * elem;
        let dst_strides = byte_strides(t.view.strides(), elem);
        let b_base = rel_dst.iter().zip(&dst_strides).map(|(o, s)| o * s).sum::<u64>();
        BoxRuns::new(&t.overlap.sizes, &saved_strides, &dst_strides, a_base, b_base, elem).for_each(|r| runs.push((r, ti)));
    }
    runs.sort_by_key(|(r, _)| r.a);
    runs
}

/// The payload byte ranges to read for `runs` (sorted by payload offset): each run widened to
/// whole checksum units of `unit` bytes, neighbours closer than [`COALESCE_GAP`] merged, then
/// cut into windows of at most `max_window` bytes at unit boundaries.
fn plan_windows(runs: &[(Run, usize)], elem: u64, unit: u64, data_len: u64, max_window: u64) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for (r, _) in runs {
        let lo = r.a / unit * unit;
        let hi = ((r.a + r.a_span(elem)).div_ceil(unit) * unit).min(data_len);
        match ranges.last_mut() {
            Some(last) if lo <= last.1 + COALESCE_GAP => last.1 = last.1.max(hi),
            _ => ranges.push((lo, hi)),
        }
    }
    let mut windows = Vec::new();
    for (lo, hi) in ranges {
        let mut w0 = lo;
        while w0 < hi {
            let w1 = w0.saturating_add(max_window).min(hi);
            windows.push((w0, w1));
            w0 = w1;
        }
    }
    windows
}

/// Copies window bytes to the targets: host targets directly, device targets on their streams
/// (synchronized before the window buffer is reused).
struct Scatter<'t, 'v, 'a, 's> {
    targets: &'t [Target<'v, 'a>],
    device_streams: &'s mut DeviceStreams,
    /// Each target's stream, resolved on its first copy.
    streams: Vec<Option<cuda::Stream>>,
    /// The device made current last.
    current: Option<i32>,
    copied_to: Vec<bool>,
}

impl<'t, 'v, 'a, 's> Scatter<'t, 'v, 'a, 's> {
    fn new(targets: &'t [Target<'v, 'a>], device_streams: &'s mut DeviceStreams) -> Self {
        Scatter {
            targets,
            device_streams,
            streams: targets.iter().map(|_| None).collect(),
            current: None,
            copied_to: vec![false; targets.len()],
        }
    }

    /// Copies `run` (whose payload bytes lie in `window`, which starts at payload offset `w0`)
    /// into target `ti`.
    fn copy(&mut self, run: &Run, ti: usize, window: &[u8], w0: u64, elem: u64) -> Result<()> {
        let view = self.targets[ti].view;
        let ptr = view.as_ptr();
        // The run's source bytes must lie in the window (a block size that is not a whole
        // number of elements would cut one at the window's end).
        if run.a < w0 || run.a - w0 + run.a_span(elem) > window.len() as u64 {
            return Err(Error::corrupt(format!(
                "payload bytes {}..{} are not all in the window read ({w0}..{}): the checksum block size does not fit the {elem}-byte elements",
                run.a,
                run.a + run.a_span(elem),
                w0 + window.len() as u64
            )));
        }
        match view.device() {
            // SAFETY: source: the run's elements lie in `window` (checked above). Destination:
            // the run was built from the target's overlap within its registered box, at the
            // view's strides from its pointer, so it addresses only elements of the view, whose
            // extent `TensorView::from_raw` checked against `nbytes`. The caller lends that
            // memory to the load (nobody else reads or writes it: `from_raw`'s contract), and
            // no other chunk writes these elements: the plan's overlaps tile each box without
            // overlapping (`plan::load`), so concurrent readers write disjoint bytes.
            Device::Cpu => unsafe { run.copy(window.as_ptr(), ptr, elem, w0, 0) },
            Device::Cuda(ordinal) => {
                let s = match &mut self.streams[ti] {
                    Some(s) => {
                        if self.current != Some(ordinal) {
                            cuda::activate(ordinal)?;
                        }
                        s
                    }
                    // `get` makes the device current.
                    slot => slot.insert(self.device_streams.get(ordinal, view.stream())?),
                };
                self.current = Some(ordinal);
                copy_run_to_device(s, run, window, w0, ptr as u64, elem)?;
                self.copied_to[ti] = true;
            }
        }
        Ok(())
    }

    /// Waits for the window's copies to the devices: the window buffer is reused next.
    fn finish_window(&mut self) -> Result<()> {
        let mut synced: Vec<*mut std::ffi::c_void> = Vec::new();
        for (copied, s) in self.copied_to.iter_mut().zip(&self.streams) {
            if let (true, Some(s)) = (std::mem::take(copied), s) {
                if !synced.contains(&s.raw_handle()) {
                    s.synchronize()?;
                    synced.push(s.raw_handle());
                }
            }
        }
        Ok(())
    }
}

impl Drop for Scatter<'_, '_, '_, '_> {
    /// An early error return must not free or reuse a window buffer that queued copies still
    /// read.
    fn drop(&mut self) {
        let _ = self.finish_window();
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
    read_chunk_item(rd, sidecar_blocks, fqn, chunk, info, targets).map_err(|e| at_item(e, fqn, info))
}

fn read_chunk_item(
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
    let dtype = targets
        .first()
        .map(|t| t.view.dtype())
        .ok_or_else(|| Error::internal("no target"))?;
    if let [t] = targets {
        if read_whole_split(rd, file.as_ref(), info, &what, sidecar_blocks, chunk, t)? {
            return Ok(());
        }
    }
    let item = locate(&ItemSlice { file: file.as_ref(), info }, info, &what, sidecar_blocks, chunk, dtype, rd.verify)?;
    let (rec, elem) = (&item.rec, dtype.size() as u64);

    // Fast path: the whole chunk into one dense host buffer, from the page cache: read straight
    // into it.
    if let [t] = targets {
        let whole = item.dense && t.overlap == chunk && t.region == chunk && rec.data_len == chunk.numel() * elem;
        if whole
            && t.view.device() == Device::Cpu
            && t.view.is_contiguous()
            && !(rec.data_len >= 1 << 20 && use_direct(rd.direct, file.as_ref(), item.payload_abs, rec.data_len))
        {
            // SAFETY: a contiguous host view whose box is the chunk's spans `numel * elem` =
            // `data_len` bytes from its pointer, within the `nbytes` `TensorView::from_raw`
            // checked. The caller lends that memory to the load (`from_raw`'s contract), and no
            // other chunk targets this box (overlaps tile it, `plan::load`), so this is the only
            // reference to those bytes while it lives.
            let dst = unsafe { std::slice::from_raw_parts_mut(t.view.as_ptr(), rec.data_len as usize) };
            file.read_at(item.payload_abs, dst)?;
            return verify_bytes(&item.check, 0, dst, true, &what, item.payload_abs);
        }
    }

    let mut runs = target_runs(rec, chunk, targets);
    let unit = match (&item.check, item.dense) {
        (_, false) | (Check::Whole(_), _) => rec.data_len.max(1),
        (Check::Blocks(_, bs), _) => *bs,
        (Check::None, _) => 1,
    };
    // A strided saved layout must be in memory at once (rare: torch writes transposed views as
    // they are).
    let max_window = if item.dense { (WINDOW / unit).max(1) * unit } else { u64::MAX };
    let mut whole = crc32fast::Hasher::new();
    let mut next_run = 0usize;
    let mut big: Option<Vec<u8>> = None;
    let mut sink = Scatter::new(targets, rd.streams);
    for (w0, w1) in plan_windows(&runs, elem, unit, rec.data_len, max_window) {
        let n = (w1 - w0) as usize;
        let data: &[u8] = if n <= WINDOW as usize {
            read_window(rd.direct, rd.buf, file.as_ref(), item.payload_abs + w0, n)?
        } else {
            let v = big.insert(vec![0u8; n]);
            file.read_at(item.payload_abs + w0, v)?;
            v
        };
        match &item.check {
            Check::Whole(_) => whole.update(data),
            check => verify_bytes(check, w0, data, false, &what, item.payload_abs)?,
        }
        while let Some(&(run, ti)) = runs.get(next_run) {
            if run.a >= w1 {
                break;
            }
            let (head, tail) = run.split(w1, true);
            if let Some(h) = head {
                sink.copy(&h, ti, data, w0, elem).map_err(|e| e.context(format!("key {fqn:?}")))?;
            }
            match tail {
                Some(t) => {
                    runs[next_run].0 = t;
                    break;
                }
                None => next_run += 1,
            }
        }
        sink.finish_window()?;
    }
    if let Check::Whole(expected) = item.check {
        let got = whole.finalize();
        if got != expected {
            return Err(checksum_error(&what, item.payload_abs, rec.data_len, got, expected));
        }
    }
    Ok(())
}

/// Bytes of an item read before its payload is located: room for the zip records in front of a
/// payload aligned to 4096 bytes in the file, and for the records and directory behind it.
const ITEM_HEAD: u64 = 8 << 10;
const ITEM_TAIL: u64 = 4 << 10;

/// The first and last bytes of an item of `len` bytes (one piece, the whole item, when it is
/// short), read into `buf`; returns (head, tail).
fn read_item_ends<'b>(file: &dyn ReadHandle, info: &StorageInfo, buf: &'b mut HostBuf) -> Result<(&'b [u8], &'b [u8])> {
    let len = info.length;
    let (head_len, tail_len) = if len <= ITEM_HEAD + ITEM_TAIL { (len, 0) } else { (ITEM_HEAD, ITEM_TAIL) };
    let (head, tail) = buf.bytes_mut((head_len + tail_len) as usize).split_at_mut(head_len as usize);
    file.read_at(info.offset, head)?;
    file.read_at(info.offset + len - tail_len, tail)?;
    Ok((head, tail))
}

/// Where an item's payload of `nbytes` lies (a range of the item's bytes), guessed from its
/// ends: the stored record of that size in the central directory, `data/0` (torch.save's
/// storage record) first. `None` when the ends do not hold the directory and that record's
/// local header, or the bytes outside the payload. Only a guess: the item is parsed in full
/// afterwards, and must agree.
fn guess_payload(head: &[u8], tail: &[u8], len: u64, nbytes: u64) -> Option<(u64, u64)> {
    let ends = if tail.is_empty() { head } else { tail };
    let tail_start = len - ends.len() as u64;
    let loc = zipitem::locate_central_directory(ends, len, "").ok()?;
    let cd_at = loc.offset.checked_sub(tail_start)? as usize;
    let cd = ends.get(cd_at..cd_at.checked_add(usize::try_from(loc.size).ok()?)?)?;
    let entries = zipitem::parse_central_directory(cd, loc, len, "").ok()?;
    let record = entries
        .iter()
        .filter(|e| e.method == 0 && e.size == nbytes)
        .min_by_key(|e| !e.name.ends_with("data/0"))?;
    let h = record.header_offset as usize;
    let start = zipitem::local_data_offset(head.get(h..h.checked_add(30)?)?, record, len, "").ok()?;
    let end = start.checked_add(record.size)?;
    (start <= head.len() as u64 && end >= tail_start && end <= len).then_some((start, end))
}

/// Fills `dst` with the item's payload bytes `start..end`: the parts already in `head` (item
/// bytes from 0) and `tail` (the item's last bytes) are copied, the rest read from the file.
fn fill_payload(file: &dyn ReadHandle, info: &StorageInfo, (head, tail): (&[u8], &[u8]), (start, end): (u64, u64), dst: &mut [u8]) -> Result<()> {
    let tail_start = info.length - tail.len() as u64;
    let from_head = end.min(head.len() as u64).saturating_sub(start);
    dst[..from_head as usize].copy_from_slice(&head[start as usize..(start + from_head) as usize]);
    let middle = (start + from_head, end.min(tail_start.max(start + from_head)));
    if middle.0 < middle.1 {
        file.read_at(info.offset + middle.0, &mut dst[(middle.0 - start) as usize..(middle.1 - start) as usize])?;
    }
    if middle.1 < end {
        dst[(middle.1 - start) as usize..].copy_from_slice(&tail[(middle.1 - tail_start) as usize..(end - tail_start) as usize]);
    }
    Ok(())
}

/// The fast path for a whole chunk into one dense host tensor: the item's ends are read into
/// the window buffer, and its payload, located from them, straight into the tensor (each byte
/// is read once, as a plain file copy would). The item is then parsed from those pieces and
/// checked against the sidecar and the metadata like any other, and the tensor's bytes
/// verified. `Ok(false)` when the chunk does not fit this path or the item is not laid out as
/// guessed (the general path then reads it again, overwriting whatever this one wrote).
fn read_whole_split(
    rd: &mut Reader,
    file: &dyn ReadHandle,
    info: &StorageInfo,
    what: &str,
    sidecar_blocks: Option<(&BlockRecord, u64)>,
    chunk: &Region,
    t: &Target,
) -> Result<bool> {
    let view = t.view;
    let Some(nbytes) = chunk.numel().checked_mul(view.dtype().size() as u64) else {
        return Ok(false);
    };
    let fits = nbytes > 0
        && t.overlap == chunk
        && t.region == chunk
        && view.device() == Device::Cpu
        && view.is_contiguous()
        && !(nbytes >= 1 << 20 && use_direct(rd.direct, file, info.offset, info.length));
    if !fits {
        return Ok(false);
    }
    let ends = read_item_ends(file, info, rd.buf)?;
    let Some((start, end)) = guess_payload(ends.0, ends.1, info.length, nbytes) else {
        return Ok(false);
    };
    // SAFETY: a contiguous host view whose box is the chunk's spans `numel * elem` = `nbytes`
    // bytes from its pointer, within the `nbytes` `TensorView::from_raw` checked. The caller
    // lends that memory to the load (`from_raw`'s contract), and no other chunk targets this box
    // (overlaps tile it, `plan::load`), so this is the only reference to those bytes while it
    // lives.
    let dst = unsafe { std::slice::from_raw_parts_mut(view.as_ptr(), nbytes as usize) };
    fill_payload(file, info, ends, (start, end), dst)?;
    let after = if ends.1.is_empty() { &ends.0[end as usize..] } else { &ends.1[(end - (info.length - ends.1.len() as u64)) as usize..] };
    let src = SplitItem {
        start: info.offset,
        pieces: [&ends.0[..start as usize], dst, after],
    };
    let item = locate(&src, info, what, sidecar_blocks, chunk, view.dtype(), rd.verify)?;
    if !(item.dense && item.payload_abs == info.offset + start && item.rec.data_len == nbytes) {
        return Ok(false);
    }
    verify_bytes(&item.check, 0, dst, true, what, item.payload_abs)?;
    Ok(true)
}

/// Queues the host-to-device copies of one run (one copy when it is dense on both sides).
fn copy_run_to_device(s: &cuda::Stream, run: &Run, window: &[u8], w0: u64, dst: u64, elem: u64) -> Result<()> {
    let src = (run.a - w0) as usize;
    if run.a_step == elem && run.b_step == elem {
        let n = (run.count * elem) as usize;
        // SAFETY: `dst + run.b..+n` lies in the registered device view (the run comes from its
        // overlap; `set_cuda` checked the view's extent lies in one allocation of the device
        // `s` copies on, made current by the caller) and no other chunk writes it (overlaps
        // tile the box); the window slice stays alive and unchanged until `finish_window`
        // synchronizes the stream (also on an early return: `Scatter`'s drop).
        return unsafe { s.h2d(dst + run.b, &window[src..src + n]) };
    }
    for i in 0..run.count as usize {
        let a = src + i * run.a_step as usize;
        // SAFETY: as above, element by element: element `i` of the run.
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
    .with_offset(at)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn run(a: u64, count: u64) -> (Run, usize) {
        (
            Run {
                a,
                b: 0,
                count,
                a_step: 4,
                b_step: 4,
            },
            0,
        )
    }

    #[test]
    fn windows_widen_to_units_coalesce_and_split() {
        // Two runs 100 bytes apart coalesce; a third far away stands alone.
        let runs = [run(0, 10), run(140, 10), run(10 << 20, 1)];
        assert_eq!(
            plan_windows(&runs, 4, 1, 64 << 20, u64::MAX),
            vec![(0, 180), (10 << 20, (10 << 20) + 4)]
        );
        // Widened to 64-byte units, never past the payload.
        assert_eq!(plan_windows(&[run(70, 2)], 4, 64, 100, u64::MAX), vec![(64, 100)]);
        // Cut into windows at unit boundaries.
        assert_eq!(plan_windows(&[run(0, 64)], 4, 64, 256, 128), vec![(0, 128), (128, 256)]);
        assert!(plan_windows(&[], 4, 1, 100, 8).is_empty());
    }

    /// A tensor item of `payload_len` u8 elements starting at `start` in its file, its payload
    /// on a multiple of `align`; and where the payload lies in it.
    fn item(payload_len: u64, start: u64, align: u64) -> (Vec<u8>, (u64, u64)) {
        let l = zipitem::TensorItemLayout::new(DType::U8, &[payload_len], start, align, 1);
        let payload: Vec<u8> = (0..payload_len).map(|i| (i % 251) as u8).collect();
        let at = l.prefix.len() as u64;
        let mut bytes = l.prefix.clone();
        bytes.extend_from_slice(&payload);
        bytes.extend_from_slice(&l.trailer(crc32fast::hash(&payload)));
        (bytes, (at, at + payload_len))
    }

    /// The ends `read_item_ends` reads of `bytes`.
    fn ends(bytes: &[u8]) -> (&[u8], &[u8]) {
        let len = bytes.len() as u64;
        if len <= ITEM_HEAD + ITEM_TAIL {
            (bytes, &[])
        } else {
            (&bytes[..ITEM_HEAD as usize], &bytes[(len - ITEM_TAIL) as usize..])
        }
    }

    #[test]
    fn the_payload_is_found_from_the_item_ends() {
        // libdcp's 4096-byte payload alignment and torch's 64, payloads inside the first bytes,
        // across both ends, and far past them.
        for align in [4096, 64] {
            for start in [0, 64, 4000] {
                for payload_len in [0, 1, 100, 3000, 8192, 20_000, 300_000] {
                    let (bytes, want) = item(payload_len, start, align);
                    let (head, tail) = ends(&bytes);
                    let got = guess_payload(head, tail, bytes.len() as u64, payload_len);
                    assert_eq!(got, Some(want), "payload of {payload_len} bytes at {start}, aligned to {align}");
                }
            }
        }
    }

    #[test]
    fn no_payload_is_guessed_from_bytes_that_are_not_an_item() {
        let (mut bytes, _) = item(20_000, 0, 4096);
        let len = bytes.len() as u64;
        assert_eq!(guess_payload(&[0u8; 100], &[], 100, 10), None);
        let (head, tail) = ends(&bytes);
        assert_eq!(guess_payload(head, tail, len, 19_999), None, "no record of that size");
        // The tail's end record damaged.
        *bytes.last_mut().unwrap() ^= 0xff;
        let (head, tail) = ends(&bytes);
        assert_eq!(guess_payload(head, tail, len, 20_000), None);
        // The payload's local header is not in the first bytes read.
        let (bytes, _) = item(20_000, 0, 4096);
        let (_, tail) = ends(&bytes);
        assert_eq!(guess_payload(&bytes[..100], tail, len, 20_000), None);
    }
}
