//! Writing one rank's data files: items laid out at known offsets, split into segments that
//! writer threads fill in parallel through aligned buffers (O_DIRECT where possible), payload
//! CRC-32s computed on the way.

use crate::error::{Error, Result};
use crate::format::pyobj::ObjectValue;
use crate::format::sidecar::{BlockRecord, BLOCK_SIZE};
use crate::format::zipitem::{self, TensorItemLayout, RECORD_ALIGN};
use crate::plan::runs::{dense_byte_strides, BoxRuns, Run};
use crate::storage::{Storage, WriteHandle};
use crate::tensor::{Device, TensorView};
use serde::{Deserialize, Serialize};
use std::alloc::Layout;

pub const SEGMENT_ALIGN: u64 = 4096;

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

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
    /// Item index ranges, each written by one thread, each starting SEGMENT_ALIGN-aligned.
    pub segments: Vec<std::ops::Range<usize>>,
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
    /// Per-block payload CRCs of large tensor items (file index filled in by the committer).
    pub block: Option<BlockRecord>,
}

/// Places items back to back (64-byte aligned; tensor payloads of 4 KiB or more 4096-aligned in
/// the file) and cuts the sequence into at most `threads` segments of similar size.
pub fn layout_file<'s, 'a>(name: String, sources: Vec<ItemSource<'s, 'a>>, threads: usize, seed: u64) -> FileLayout<'s, 'a> {
    let total: u64 = sources
        .iter()
        .map(|s| match s {
            ItemSource::Tensor { view, .. } => view.numel() * view.dtype().size() as u64 + 2048,
            ItemSource::Object { .. } => 2048,
        })
        .sum();
    let target = total / threads.max(1) as u64;
    let mut items = Vec::with_capacity(sources.len());
    let mut segments = Vec::new();
    let mut seg_start = 0usize;
    let mut seg_bytes = 0u64;
    let mut pos = 0u64;
    for (i, src) in sources.into_iter().enumerate() {
        if i > seg_start && seg_bytes >= target && segments.len() + 1 < threads {
            segments.push(seg_start..i);
            seg_start = i;
            seg_bytes = 0;
            pos = align_up(pos, SEGMENT_ALIGN);
        }
        let offset = align_up(pos, RECORD_ALIGN);
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
        pos = offset + item.len();
        seg_bytes += item.len();
        items.push(item);
    }
    if seg_start < items.len() || segments.is_empty() {
        segments.push(seg_start..items.len());
    }
    FileLayout {
        name,
        items,
        segments,
        len: pos,
    }
}

/// A 4096-aligned heap buffer (O_DIRECT needs aligned memory).
struct AlignedBuf {
    ptr: *mut u8,
    cap: usize,
}

unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn new(cap: usize) -> Result<AlignedBuf> {
        let layout = Layout::from_size_align(cap, SEGMENT_ALIGN as usize).map_err(|e| Error::invalid(format!("buffer size {cap}: {e}")))?;
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(Error::new(
                crate::error::ErrorKind::NoSpace,
                format!("cannot allocate a {cap}-byte write buffer"),
            ));
        }
        Ok(AlignedBuf { ptr, cap })
    }
    fn slice(&mut self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.cap) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        unsafe { std::alloc::dealloc(self.ptr, Layout::from_size_align_unchecked(self.cap, SEGMENT_ALIGN as usize)) }
    }
}

/// Sequential writer of one segment through an aligned buffer.
struct SegmentWriter<'h> {
    handle: &'h dyn WriteHandle,
    buf: AlignedBuf,
    start: u64,
    filled: usize,
}

impl<'h> SegmentWriter<'h> {
    fn pos(&self) -> u64 {
        self.start + self.filled as u64
    }
    fn flush(&mut self) -> Result<()> {
        if self.filled > 0 {
            let n = self.filled;
            let data = &self.buf.slice()[..n];
            self.handle.write_at(self.start, data)?;
            self.start += n as u64;
            self.filled = 0;
        }
        Ok(())
    }
    /// Produces `n` bytes with `f(offset within these n, destination)`.
    fn produce(&mut self, n: u64, mut f: impl FnMut(u64, &mut [u8]) -> Result<()>) -> Result<()> {
        let mut done = 0u64;
        while done < n {
            let room = self.buf.cap - self.filled;
            let k = room.min((n - done) as usize);
            let filled = self.filled;
            f(done, &mut self.buf.slice()[filled..filled + k])?;
            self.filled += k;
            done += k as u64;
            if self.filled == self.buf.cap {
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
    /// Writes what is left; with O_DIRECT the last block is padded (the caller sets the file's
    /// final length afterwards).
    fn finish(mut self) -> Result<()> {
        if let Some(a) = self.handle.direct_alignment() {
            let padded = align_up(self.filled as u64, a as u64) as usize;
            let filled = self.filled;
            self.buf.slice()[filled..padded].fill(0);
            self.filled = padded;
        }
        self.flush()
    }
}

/// Copies a local tensor view into its dense row-major payload, piece by piece.
struct Gather<'v> {
    base: *const u8,
    elem: u64,
    contiguous: bool,
    runs: Vec<Run>,
    next: usize,
    _view: std::marker::PhantomData<&'v ()>,
}

impl<'v> Gather<'v> {
    fn new(view: &'v TensorView<'_>) -> Result<Self> {
        if view.device() != Device::Cpu {
            return Err(Error::unsupported(
                "saving CUDA tensors needs the GPU data path, which this build does not have",
            ));
        }
        let elem = view.dtype().size() as u64;
        let contiguous = view.is_contiguous();
        let mut runs = Vec::new();
        if !contiguous {
            let a = crate::tensor::byte_strides(view.strides(), elem as usize)
                .into_iter()
                .map(|s| s as u64)
                .collect::<Vec<_>>();
            let b = dense_byte_strides(view.sizes(), elem);
            BoxRuns::new(view.sizes(), &a, &b, 0, 0, elem).for_each(|r| runs.push(r));
        }
        Ok(Gather {
            base: view.as_ptr(),
            elem,
            contiguous,
            runs,
            next: 0,
            _view: std::marker::PhantomData,
        })
    }

    /// Fills `dst` with payload bytes starting at `off`; calls come in increasing `off`.
    fn fill(&mut self, off: u64, dst: &mut [u8]) {
        if self.contiguous {
            unsafe { std::ptr::copy_nonoverlapping(self.base.add(off as usize), dst.as_mut_ptr(), dst.len()) };
            return;
        }
        let end = off + dst.len() as u64;
        while self.next < self.runs.len() {
            let run = self.runs[self.next];
            if run.b >= end {
                break;
            }
            let (head, tail) = run.split(end, false);
            if let Some(h) = head {
                // `h` starts at or after `off`: pieces before `off` were written by earlier calls.
                unsafe { h.copy(self.base, dst.as_mut_ptr(), self.elem, 0, off) };
            }
            match tail {
                Some(t) => {
                    self.runs[self.next] = t;
                    break;
                }
                None => self.next += 1,
            }
        }
    }
}

/// Writes one file; returns its length and what each item became.
pub fn write_file(storage: &dyn Storage, file: &FileLayout, direct: bool, buffer_bytes: usize) -> Result<(u64, Vec<ItemWritten>)> {
    let handle = storage.create(&file.name, direct)?;
    let buffer_bytes = align_up(buffer_bytes.max(SEGMENT_ALIGN as usize) as u64, SEGMENT_ALIGN) as usize;
    let results: Vec<Result<Vec<ItemWritten>>> = std::thread::scope(|s| {
        let workers: Vec<_> = file
            .segments
            .iter()
            .map(|seg| {
                let handle = handle.as_ref();
                let items = &file.items[seg.clone()];
                s.spawn(move || write_segment(handle, items, &file.name, buffer_bytes))
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| Err(Error::internal("a writer thread panicked"))))
            .collect()
    });
    let mut written = Vec::with_capacity(file.items.len());
    for r in results {
        written.extend(r?);
    }
    handle.set_len(file.len)?;
    handle.sync()?;
    Ok((file.len, written))
}

fn write_segment(handle: &dyn WriteHandle, items: &[PlacedItem], file: &str, buffer_bytes: usize) -> Result<Vec<ItemWritten>> {
    let Some(first) = items.first() else {
        return Ok(vec![]);
    };
    let start = first.offset / SEGMENT_ALIGN * SEGMENT_ALIGN;
    let mut w = SegmentWriter {
        handle,
        buf: AlignedBuf::new(buffer_bytes)?,
        start,
        filled: 0,
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        w.zeros_to(item.offset)?;
        let mut block = None;
        match &item.body {
            ItemBody::Object(bytes) => w.put(bytes)?,
            ItemBody::Tensor { view, layout } => {
                w.put(&layout.prefix)?;
                let payload_offset = w.pos();
                let mut gather = Gather::new(view)?;
                let mut total = crc32fast::Hasher::new();
                let big = layout.payload_len > BLOCK_SIZE;
                let mut blocks = Vec::new();
                let mut cur = crc32fast::Hasher::new();
                let mut in_block = 0u64;
                w.produce(layout.payload_len, |off, dst| {
                    gather.fill(off, dst);
                    if big {
                        let mut rest: &[u8] = dst;
                        while !rest.is_empty() {
                            let k = ((BLOCK_SIZE - in_block) as usize).min(rest.len());
                            cur.update(&rest[..k]);
                            in_block += k as u64;
                            rest = &rest[k..];
                            if in_block == BLOCK_SIZE {
                                let done = std::mem::replace(&mut cur, crc32fast::Hasher::new());
                                total.combine(&done);
                                blocks.push(done.finalize());
                                in_block = 0;
                            }
                        }
                    } else {
                        total.update(dst);
                    }
                    Ok(())
                })?;
                if big && in_block > 0 {
                    total.combine(&cur);
                    blocks.push(cur.finalize());
                }
                let crc = total.finalize();
                w.put(&layout.trailer(crc))?;
                if big {
                    block = Some(BlockRecord {
                        fqn: item.fqn.to_string(),
                        chunk_offsets: item.chunk_offsets.clone().unwrap_or_default(),
                        file: 0,
                        payload_offset,
                        payload_len: layout.payload_len,
                        crcs: blocks,
                    });
                }
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
