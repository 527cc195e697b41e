//! Writing one rank's data files: items laid out at known offsets in several files, written in
//! parallel (a thread per file) through aligned buffers (O_DIRECT where possible), payload
//! CRC-32s computed on the way. Payloads come from host memory (written straight from it when
//! it is contiguous and, for O_DIRECT, aligned) or from CUDA memory (copied to page-locked
//! buffers first).

use crate::cuda;
use crate::engine::staging::{first_cuda_device, with_host_extent, DeviceStreams, HostGather, PoolBuf, StagingPool, SyncOnDrop, ALIGN};
use crate::engine::workers::for_each_parallel;
use crate::error::{Error, Result};
use crate::format::pyobj::ObjectValue;
use crate::format::sidecar::{BlockHasher, BLOCK_SIZE};
use crate::format::zipitem::{self, TensorItemLayout, RECORD_ALIGN};
use crate::storage::{Storage, WriteHandle};
use crate::tensor::{Device, TensorView};
use serde::{Deserialize, Serialize};
use std::sync::Mutex;

pub const SEGMENT_ALIGN: u64 = ALIGN as u64;

pub enum ItemBody<'s, 'a> {
    Tensor {
        view: &'s TensorView<'a>,
        layout: TensorItemLayout,
    },
    Object(Vec<u8>),
}

pub struct PlacedItem<'s, 'a> {
    pub fqn: &'s str,
    pub chunk_offsets: Option<Vec<u64>>,
    pub offset: u64,
    pub body: ItemBody<'s, 'a>,
}

impl PlacedItem<'_, '_> {
    fn len(&self) -> u64 {
        match &self.body {
            ItemBody::Tensor { layout, .. } => layout.len(),
            ItemBody::Object(b) => b.len() as u64,
        }
    }
}

/// What a rank wants written: a tensor (its whole local view, as the chunk at `offsets`) or an
/// object.
pub enum ItemSource<'s, 'a> {
    Tensor {
        fqn: &'s str,
        view: &'s TensorView<'a>,
        offsets: Vec<u64>,
    },
    Object {
        fqn: &'s str,
        value: &'s ObjectValue,
    },
}

pub struct FileLayout<'s, 'a> {
    pub name: String,
    pub items: Vec<PlacedItem<'s, 'a>>,
    pub len: u64,
}

/// Result of one written item, sent to the committing rank.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ItemWritten {
    pub fqn: String,
    pub chunk_offsets: Option<Vec<u64>>,
    pub file: String,
    pub offset: u64,
    pub length: u64,
    /// Per-block payload CRCs of a large tensor item (the committer makes its sidecar record).
    pub block: Option<PayloadBlocks>,
}

/// Where a large tensor item's payload lies in its file, and the CRC-32 of each of its blocks.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PayloadBlocks {
    pub payload_offset: u64,
    pub payload_len: u64,
    pub crcs: Vec<u32>,
}

/// Files never split below this size: small checkpoints stay in one file per rank.
const MIN_FILE_BYTES: u64 = 32 << 20;

/// Splits a rank's items, in order, into at most `threads` files of similar size
/// (`__{rank}_{n}_{token}.distcp`), each written by its own thread: parallel appends to separate files
/// do not contend the way parallel writes into one growing file do. Items are placed back to
/// back (64-byte aligned; tensor payloads of 4 KiB or more 4096-aligned in the file).
pub fn layout_files<'s, 'a>(
    rank: usize,
    token: &str,
    sources: Vec<ItemSource<'s, 'a>>,
    threads: usize,
    seed: u64,
) -> Vec<FileLayout<'s, 'a>> {
    let weight = |s: &ItemSource| match s {
        ItemSource::Tensor { view, .. } => view.numel() * view.dtype().size() as u64 + 2048,
        ItemSource::Object { .. } => 2048,
    };
    let total: u64 = sources.iter().map(weight).sum();
    let nfiles = (total / MIN_FILE_BYTES).clamp(1, threads.max(1) as u64);
    let target = total.div_ceil(nfiles);
    let mut files: Vec<FileLayout> = Vec::new();
    let mut acc = u64::MAX;
    for (i, src) in sources.into_iter().enumerate() {
        if acc >= target && (files.len() as u64) < nfiles {
            files.push(FileLayout {
                name: crate::engine::layout::data_file_name(rank, files.len(), token),
                items: Vec::new(),
                len: 0,
            });
            acc = 0;
        }
        acc += weight(&src);
        let file = files.last_mut().expect("a file exists");
        let offset = file.len.next_multiple_of(RECORD_ALIGN);
        let item_seed = seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let item = match src {
            ItemSource::Tensor { fqn, view, offsets } => {
                let payload = view.numel() * view.dtype().size() as u64;
                let align = if payload >= SEGMENT_ALIGN { SEGMENT_ALIGN } else { RECORD_ALIGN };
                let layout = TensorItemLayout::new(view.dtype(), view.sizes(), offset, align, item_seed);
                PlacedItem {
                    fqn,
                    chunk_offsets: Some(offsets),
                    offset,
                    body: ItemBody::Tensor { view, layout },
                }
            }
            ItemSource::Object { fqn, value } => PlacedItem {
                fqn,
                chunk_offsets: None,
                offset,
                body: ItemBody::Object(zipitem::object_item(value, item_seed)),
            },
        };
        file.len = offset + item.len();
        file.items.push(item);
    }
    files
}

/// Sequential writer of one file through an aligned buffer: the file is written front to back,
/// by offset (pwrite) where the storage takes positional writes, by appends elsewhere.
struct FileWriter<'h, 'p> {
    handle: &'h dyn WriteHandle,
    positional: bool,
    buf: PoolBuf<'p>,
    cap: usize,
    start: u64,
    filled: usize,
}

impl FileWriter<'_, '_> {
    fn pos(&self) -> u64 {
        self.start + self.filled as u64
    }
    /// Writes `data` at `start` (the end of what was written) and moves `start` past it.
    fn write_next(handle: &dyn WriteHandle, positional: bool, start: &mut u64, data: &[u8]) -> Result<()> {
        if positional {
            handle.write_at(*start, data)?;
        } else {
            handle.append(data)?;
        }
        *start += data.len() as u64;
        Ok(())
    }
    fn flush(&mut self) -> Result<()> {
        if self.filled > 0 {
            Self::write_next(self.handle, self.positional, &mut self.start, self.buf.bytes(self.filled))?;
            self.filled = 0;
        }
        Ok(())
    }
    /// Produces `n` bytes with `f(offset within these n, destination)`.
    fn produce(&mut self, n: u64, mut f: impl FnMut(u64, &mut [u8]) -> Result<()>) -> Result<()> {
        let mut done = 0u64;
        while done < n {
            let k = (self.cap - self.filled).min((n - done) as usize);
            let dst = &mut self.buf.bytes_mut(self.filled + k)[self.filled..];
            f(done, dst)?;
            self.filled += k;
            done += k as u64;
            if self.filled == self.cap {
                self.flush()?;
            }
        }
        Ok(())
    }
    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.produce(bytes.len() as u64, |off, dst| {
            dst.copy_from_slice(&bytes[off as usize..off as usize + dst.len()]);
            Ok(())
        })
    }
    fn zeros_to(&mut self, pos: u64) -> Result<()> {
        let n = pos - self.pos();
        self.produce(n, |_, dst| {
            dst.fill(0);
            Ok(())
        })
    }
    /// Writes `data` (host memory, at the current position) without copying it into the buffer
    /// where the file allows it: always for buffered files; for O_DIRECT when the memory and the
    /// position are aligned (the unaligned tail is copied). Returns false when it cannot.
    fn write_through(&mut self, data: &[u8]) -> Result<bool> {
        let bulk = match self.handle.direct_alignment() {
            None => data.len(),
            Some(a) => {
                if (data.as_ptr() as usize) % a != 0 || self.pos() % a as u64 != 0 {
                    return Ok(false);
                }
                data.len() / a * a
            }
        };
        if bulk < (1 << 20) {
            return Ok(false);
        }
        self.flush()?;
        for piece in data[..bulk].chunks(WRITE_PIECE) {
            Self::write_next(self.handle, self.positional, &mut self.start, piece)?;
        }
        self.put(&data[bulk..])?;
        Ok(true)
    }
    /// Writes what is left; with O_DIRECT the last block is padded (the caller sets the file's
    /// final length afterwards). The buffer goes back to its pool.
    fn finish(mut self) -> Result<()> {
        if let Some(a) = self.handle.direct_alignment() {
            let padded = self.filled.next_multiple_of(a);
            let filled = self.filled;
            self.buf.bytes_mut(padded)[filled..].fill(0);
            self.filled = padded;
        }
        self.flush()
    }
}

/// CRC-32 of a payload, and per-block CRCs when it is larger than one block (the whole CRC is
/// then combined from the blocks').
struct PayloadCrc {
    total: crc32fast::Hasher,
    /// Per-block hashing, for payloads larger than one block.
    blocks: Option<(BlockHasher, Vec<u32>)>,
}

impl PayloadCrc {
    fn new(len: u64) -> Self {
        PayloadCrc {
            total: crc32fast::Hasher::new(),
            blocks: (len > BLOCK_SIZE).then(|| (BlockHasher::new(BLOCK_SIZE), Vec::new())),
        }
    }
    fn update(&mut self, data: &[u8]) {
        match &mut self.blocks {
            None => self.total.update(data),
            Some((h, crcs)) => h.update(data, |_, done, _| {
                self.total.combine(&done);
                crcs.push(done.finalize());
            }),
        }
    }
    fn finish(self) -> (u32, Option<Vec<u32>>) {
        let mut total = self.total;
        let blocks = self.blocks.map(|(h, mut crcs)| {
            h.finish(|_, done, _| {
                total.combine(&done);
                crcs.push(done.finalize());
            });
            crcs
        });
        (total.finalize(), blocks)
    }
}

pub struct WriteOptions {
    pub direct: bool,
    pub buffer_bytes: usize,
}

/// Writes the files in parallel (one thread each), each synced; returns each file's length
/// and what its items became.
pub fn write_files(
    storage: &dyn Storage,
    files: &[FileLayout],
    opts: &WriteOptions,
    pool: &Mutex<StagingPool>,
) -> Result<Vec<(u64, Vec<ItemWritten>)>> {
    // A thread per file: parallel appends to separate files do not contend.
    for_each_parallel(files, files.len(), || Ok(()), |_, f| write_file(storage, f, opts, pool))
}

fn write_file(storage: &dyn Storage, file: &FileLayout, opts: &WriteOptions, pool: &Mutex<StagingPool>) -> Result<(u64, Vec<ItemWritten>)> {
    let in_file = |e: Error| e.with_file(file.name.as_str());
    let handle = storage.create(&file.name, opts.direct).map_err(in_file)?;
    let buffer_bytes = opts.buffer_bytes.max(ALIGN).next_multiple_of(ALIGN);
    let pinned = first_cuda_device(file.items.iter().filter_map(|i| match &i.body {
        ItemBody::Tensor { view, .. } => Some(*view),
        ItemBody::Object(_) => None,
    }));
    let positional = storage.capabilities().positional_writes;
    let written = write_items(handle.as_ref(), positional, &file.items, &file.name, buffer_bytes, pinned, pool).map_err(in_file)?;
    handle.set_len(file.len).map_err(in_file)?;
    handle.sync().map_err(in_file)?;
    Ok((file.len, written))
}

fn write_items(
    handle: &dyn WriteHandle,
    positional: bool,
    items: &[PlacedItem],
    file: &str,
    buffer_bytes: usize,
    pinned: Option<i32>,
    pool: &Mutex<StagingPool>,
) -> Result<Vec<ItemWritten>> {
    let mut w = FileWriter {
        handle,
        positional,
        cap: buffer_bytes,
        buf: PoolBuf::acquire(pool, buffer_bytes, pinned)?,
        start: 0,
        filled: 0,
    };
    let mut streams = DeviceStreams::default();
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let at_item = |e: Error| e.with_key(item.fqn).with_file(file).with_offset(item.offset);
        w.zeros_to(item.offset)?;
        let mut block = None;
        match &item.body {
            ItemBody::Object(bytes) => w.put(bytes).map_err(at_item)?,
            ItemBody::Tensor { view, layout } => {
                w.put(&layout.prefix).map_err(at_item)?;
                let payload_offset = w.pos();
                let (crc, blocks) = write_payload(&mut w, view, layout.payload_len, &mut streams, pool).map_err(at_item)?;
                w.put(&layout.trailer(crc)).map_err(at_item)?;
                block = blocks.map(|crcs| PayloadBlocks {
                    payload_offset,
                    payload_len: layout.payload_len,
                    crcs,
                });
            }
        }
        out.push(ItemWritten {
            fqn: item.fqn.to_string(),
            chunk_offsets: item.chunk_offsets.clone(),
            file: file.to_string(),
            offset: item.offset,
            length: item.len(),
            block,
        });
    }
    w.finish()?;
    Ok(out)
}

/// Pieces of a device payload copied and written at a time.
const DEVICE_PIECE: usize = 32 << 20;
/// Largest single write from host memory (several moderate requests keep the device queue
/// fuller than one huge one).
const WRITE_PIECE: usize = 32 << 20;

/// Streams a contiguous device payload to the file through two page-locked buffers: the copy
/// of the next piece runs on the DMA engine while the current one is checksummed and written.
fn write_device_payload(
    w: &mut FileWriter,
    stream: &cuda::Stream,
    src: u64,
    len: u64,
    crc: &mut PayloadCrc,
    ordinal: i32,
    pool: &Mutex<StagingPool>,
) -> Result<()> {
    // Small payloads, or a write position the file cannot take directly: through the buffer.
    let aligned = w.handle.direct_alignment().is_none_or(|a| w.pos() % a as u64 == 0);
    if len < (4 << 20) || !aligned {
        return w.produce(len, |off, dst| {
            // SAFETY: `src + off..src + off + dst.len()` lies in the contiguous device payload
            // `src..src + len` (`produce` hands out pieces of `0..len`), which `set_cuda`
            // checked lies in one allocation of the current device; `dst` is exclusively
            // borrowed from the writer's buffer until after the synchronize below.
            unsafe { stream.d2h(dst, src + off)? };
            stream.synchronize()?;
            crc.update(dst);
            Ok(())
        });
    }
    let mut bufs = [
        PoolBuf::acquire(pool, DEVICE_PIECE, Some(ordinal))?,
        PoolBuf::acquire(pool, DEVICE_PIECE, Some(ordinal))?,
    ];
    // Dropped before `bufs`: a write error must not return them to the pool under a copy.
    let _pending = SyncOnDrop(vec![stream.clone()]);
    w.flush()?;
    let piece = |i: u64| {
        (
            i * DEVICE_PIECE as u64,
            ((len - i * DEVICE_PIECE as u64) as usize).min(DEVICE_PIECE),
        )
    };
    let n = len.div_ceil(DEVICE_PIECE as u64);
    let (o0, l0) = piece(0);
    // SAFETY: (this copy and the one in the loop) piece `i` is bytes `i * DEVICE_PIECE..` (at most `len`) of the
    // contiguous device payload `src..src + len`, which `set_cuda` checked lies in one
    // allocation of device `ordinal` (current: the caller got `stream` from
    // `DeviceStreams::get`); each buffer gets one piece at a time and is read by the host only
    // after the synchronize at the top of the iteration that uses it, while the copy into the
    // other buffer runs; `_pending` synchronises on an early return before `bufs` go back.
    unsafe { stream.d2h(bufs[0].bytes_mut(l0), src + o0)? };
    for i in 0..n {
        stream.synchronize()?;
        let (_, li) = piece(i);
        let [even, odd] = &mut bufs;
        let (current, next) = if i % 2 == 0 { (even, odd) } else { (odd, even) };
        if i + 1 < n {
            let (on, ln) = piece(i + 1);
            // SAFETY: see above.
            unsafe { stream.d2h(next.bytes_mut(ln), src + on)? };
        }
        let data = current.bytes(li);
        crc.update(data);
        // Whole pieces go straight to the file (pool buffers are aligned, and so is the
        // position: checked above, then advanced by whole pieces); the last one's unaligned
        // tail, or a last piece too small to bother, is buffered.
        if !w.write_through(data)? {
            w.put(data)?;
        }
    }
    Ok(())
}

/// Writes a view's dense payload; returns its CRC-32 and, for large payloads, block CRCs.
fn write_payload(
    w: &mut FileWriter,
    view: &TensorView,
    len: u64,
    streams: &mut DeviceStreams,
    pool: &Mutex<StagingPool>,
) -> Result<(u32, Option<Vec<u32>>)> {
    let mut crc = PayloadCrc::new(len);
    match view.device() {
        Device::Cpu if view.is_contiguous() => {
            assert_eq!(len, view.data_bytes(), "payload length of a contiguous view");
            // SAFETY: a contiguous host view's `data_bytes()` (= `len`) payload bytes start at
            // its pointer and lie within the `nbytes` checked by `TensorView::from_raw`, whose
            // contract keeps them alive and unwritten by others while the view is saved from;
            // libdcp only reads a view during a save.
            let data = unsafe { std::slice::from_raw_parts(view.as_ptr() as *const u8, len as usize) };
            crc.update(data);
            if !w.write_through(data)? {
                w.put(data)?;
            }
        }
        Device::Cpu => {
            let mut g = HostGather::of_view(view);
            w.produce(len, |off, dst| {
                g.fill(off, dst);
                crc.update(dst);
                Ok(())
            })?;
        }
        Device::Cuda(ordinal) if view.is_contiguous() => {
            let stream = streams.get(ordinal, view.stream())?;
            write_device_payload(w, &stream, view.as_ptr() as u64, len, &mut crc, ordinal, pool)?;
        }
        Device::Cuda(ordinal) => {
            // Strided device memory: bring its whole extent over once, gather on the host.
            let stream = streams.get(ordinal, view.stream())?;
            with_host_extent(pool, &stream, view, ordinal, |host, extent| {
                let mut g = HostGather::of_extent(host.bytes(extent), view);
                w.produce(len, |off, dst| {
                    g.fill(off, dst);
                    crc.update(dst);
                    Ok(())
                })
            })?;
        }
    }
    Ok(crc.finish())
}
