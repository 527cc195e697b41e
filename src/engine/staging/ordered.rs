//! Staging copies that finish after the save call returns. Device-to-host copies run on a
//! stream of libdcp's own, ordered after the work the caller queued on each tensor's stream
//! by an event (so the caller's forward and backward passes overlap them); optionally the
//! tensors are first snapshotted device to device, on the caller's streams, into a buffer
//! reused across saves (so the caller may change them as soon as the call returns).
//!
//! Until the copies that read the caller's memory are done the caller must not change that
//! memory: [`InFlightCopies::order_before`] makes a stream of the caller's wait for them on
//! the GPU, [`InFlightCopies::wait_caller_reads`] waits on the CPU.

use crate::cuda::{self, DeviceBuf, Event, Stream};
use crate::error::Result;
use std::sync::Arc;

/// One contiguous CUDA tensor to copy into its staging slot after the call returns.
pub(crate) struct DeferredCopy {
    pub(crate) ordinal: i32,
    /// The stream the caller registered with the tensor (0: the legacy default stream).
    pub(crate) caller_stream: usize,
    /// Device address of the tensor's payload.
    pub(crate) src: u64,
    /// Its staging slot (page-locked host memory).
    pub(crate) dst: *mut u8,
    pub(crate) len: usize,
    /// Bytes per element (a power of two).
    pub(crate) elem: usize,
}

/// How many bytes went which way.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct DeferredBytes {
    pub(crate) snapshot: u64,
    pub(crate) stream_ordered: u64,
}

/// Device buffers for snapshots, one per device, kept between saves.
#[derive(Default)]
pub(crate) struct SnapshotBuffers {
    bufs: Vec<Arc<DeviceBuf>>,
}

impl SnapshotBuffers {
    /// A buffer of at least `len` bytes on `ordinal`: the kept one when large enough, else a new
    /// one of exactly `len` (the old one is freed: no save uses it, the context settled first).
    fn get(&mut self, ordinal: i32, len: usize) -> Result<Arc<DeviceBuf>> {
        if let Some(b) = self.bufs.iter().find(|b| b.ordinal() == ordinal && b.len() >= len) {
            return Ok(b.clone());
        }
        self.bufs.retain(|b| b.ordinal() != ordinal);
        let b = Arc::new(DeviceBuf::new(len, ordinal)?);
        self.bufs.push(b.clone());
        Ok(b)
    }
    /// Device memory held, in bytes.
    pub(crate) fn bytes(&self) -> u64 {
        self.bufs.iter().map(|b| b.len() as u64).sum()
    }
    /// Frees the buffers no save is using.
    pub(crate) fn release(&mut self) {
        self.bufs.retain(|b| Arc::strong_count(b) > 1);
    }
}

/// The copies of one device, queued on libdcp's stream.
struct DeviceCopies {
    ordinal: i32,
    // Declared before the buffer: dropping the stream waits for its copies.
    _stream: Stream,
    /// Recorded after the copies that read the caller's memory (None: there were none).
    caller_reads_done: Option<Event>,
    all_done: Event,
    _snapshot: Option<Arc<DeviceBuf>>,
}

/// Staging copies still running on the GPU.
pub(crate) struct InFlightCopies {
    devices: Vec<DeviceCopies>,
    bytes: DeferredBytes,
}

impl InFlightCopies {
    /// How many bytes were snapshotted and how many are read from the caller's memory.
    pub(crate) fn bytes(&self) -> DeferredBytes {
        self.bytes
    }

    /// Whether some copies read the caller's tensors in place (then the caller must order its
    /// next writes after them).
    pub(crate) fn reads_caller_memory(&self) -> bool {
        self.devices.iter().any(|d| d.caller_reads_done.is_some())
    }

    /// Makes `stream` (a `CUstream` of the caller; 0: the legacy default stream of the first
    /// device) wait on the GPU until the copies reading the caller's tensors are done.
    pub(crate) fn order_before(&self, stream: usize) -> Result<()> {
        let Some(first) = self.devices.first() else { return Ok(()) };
        cuda::activate(first.ordinal)?;
        // SAFETY: the caller passes a live stream of its own (header contract of
        // `dcp_future_stream_wait`); it is only used for this one call.
        let caller = unsafe { Stream::borrowed(stream) };
        for d in &self.devices {
            if let Some(e) = &d.caller_reads_done {
                caller.wait(e)?;
            }
        }
        Ok(())
    }

    /// Blocks until the copies reading the caller's tensors are done.
    pub(crate) fn wait_caller_reads(&self) -> Result<()> {
        for d in &self.devices {
            if let Some(e) = &d.caller_reads_done {
                cuda::activate(d.ordinal)?;
                e.synchronize()?;
            }
        }
        Ok(())
    }

    /// Blocks until every copy is done: the staging slots then hold the payloads.
    pub(crate) fn wait_all(&self) -> Result<()> {
        for d in &self.devices {
            cuda::activate(d.ordinal)?;
            d.all_done.synchronize()?;
        }
        Ok(())
    }
}

/// Queues `copies` (see the module docs): with `snapshot_budget` > 0, tensors are snapshotted
/// into at most that many bytes of device memory per device, in order while they fit; the
/// rest are copied to the host straight from the caller's memory.
///
/// # Safety
/// Each copy's `src` is `len` bytes of CUDA memory of its `ordinal`, valid until the copies
/// reading it are done (see [`InFlightCopies`]); each `dst` is `len` bytes of page-locked host
/// memory, not overlapping another, that nothing reads or writes, and that stays allocated,
/// until [`InFlightCopies::wait_all`] has returned. `caller_stream` is a live stream of
/// `ordinal` (or 0).
pub(crate) unsafe fn launch(
    copies: &[DeferredCopy],
    snapshot_budget: u64,
    snapshots: &std::sync::Mutex<SnapshotBuffers>,
) -> Result<InFlightCopies> {
    let mut ordinals: Vec<i32> = copies.iter().map(|c| c.ordinal).collect();
    ordinals.sort_unstable();
    ordinals.dedup();
    let mut bytes = DeferredBytes::default();
    let mut devices = Vec::new();
    for ordinal in ordinals {
        let mine: Vec<&DeferredCopy> = copies.iter().filter(|c| c.ordinal == ordinal).collect();
        // SAFETY: forwarded from this function's contract.
        devices.push(unsafe { launch_device(ordinal, &mine, snapshot_budget, snapshots, &mut bytes)? });
    }
    Ok(InFlightCopies { devices, bytes })
}

/// Which copies of one device are snapshotted, and where in the snapshot buffer: in order
/// while their bytes fit in `budget` (empty ones never), then placed by decreasing element
/// size, so that every region is aligned to its element size with no padding (sizes are
/// powers of two and each region's length a multiple of its own): a budget of exactly the
/// state's bytes holds the whole state.
fn snapshot_offsets(copies: &[&DeferredCopy], budget: u64) -> (Vec<Option<usize>>, usize) {
    let mut taken = 0u64;
    let chosen: Vec<bool> = copies
        .iter()
        .map(|c| {
            let fits = c.len > 0 && taken + c.len as u64 <= budget;
            if fits {
                taken += c.len as u64;
            }
            fits
        })
        .collect();
    let mut order: Vec<usize> = (0..copies.len()).filter(|&i| chosen[i]).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(copies[i].elem));
    let mut offsets = vec![None; copies.len()];
    let mut used = 0usize;
    for i in order {
        offsets[i] = Some(used);
        used += copies[i].len;
    }
    (offsets, used)
}

/// [`launch`] for the copies of one device.
///
/// # Safety
/// As for [`launch`].
unsafe fn launch_device(
    ordinal: i32,
    copies: &[&DeferredCopy],
    budget: u64,
    snapshots: &std::sync::Mutex<SnapshotBuffers>,
    bytes: &mut DeferredBytes,
) -> Result<DeviceCopies> {
    let (offsets, snapshot_len) = snapshot_offsets(copies, budget);
    let snapshot = match snapshot_len {
        0 => None,
        n => Some(crate::error::lock(snapshots).get(ordinal, n)?),
    };
    let borrowed = |c: &DeferredCopy| {
        // SAFETY: `caller_stream` is a live stream of `ordinal` or 0 (contract of `launch`),
        // used only while this call queues work on it.
        unsafe { Stream::borrowed(c.caller_stream) }
    };
    // 1. Snapshots, on the caller's streams: ordered before whatever the caller queues next.
    if let Some(buf) = &snapshot {
        for (c, off) in copies.iter().zip(&offsets) {
            if let Some(off) = off {
                // SAFETY: `src` is `len` bytes of this device's memory (contract); the
                // destination lies in the snapshot buffer (offsets sum to at most its length),
                // which no other save uses (the context runs one at a time).
                unsafe { borrowed(c).d2d(buf.ptr() + *off as u64, c.src, c.len)? };
                bytes.snapshot += c.len as u64;
            }
        }
    }
    // 2. libdcp's stream waits for the caller's streams as they are now.
    let own = Stream::new(ordinal)?;
    let mut streams: Vec<usize> = copies.iter().map(|c| c.caller_stream).collect();
    streams.sort_unstable();
    streams.dedup();
    for s in streams {
        let ready = Event::new(ordinal)?;
        // SAFETY: a caller stream of this device (see `borrowed`).
        ready.record(&unsafe { Stream::borrowed(s) })?;
        own.wait(&ready)?;
    }
    // 3. Tensors not snapshotted, from the caller's memory; 4. then the snapshots.
    let mut reads_caller = false;
    for (c, off) in copies.iter().zip(&offsets) {
        if off.is_none() && c.len > 0 {
            // SAFETY: contract of `launch`: `dst` is `len` bytes of page-locked memory nobody
            // touches until `wait_all`; `src` stays valid until the caller's reads are done.
            unsafe { own.d2h(std::slice::from_raw_parts_mut(c.dst, c.len), c.src)? };
            bytes.stream_ordered += c.len as u64;
            reads_caller = true;
        }
    }
    let caller_reads_done = if reads_caller {
        let e = Event::new(ordinal)?;
        e.record(&own)?;
        Some(e)
    } else {
        None
    };
    if let Some(buf) = &snapshot {
        for (c, off) in copies.iter().zip(&offsets) {
            if let Some(off) = off {
                // SAFETY: as above for `dst`; the source is this copy's region of the snapshot
                // buffer, written by step 1, which `own` waited for in step 2.
                unsafe { own.d2h(std::slice::from_raw_parts_mut(c.dst, c.len), buf.ptr() + *off as u64)? };
            }
        }
    }
    let all_done = Event::new(ordinal)?;
    all_done.record(&own)?;
    Ok(DeviceCopies {
        ordinal,
        _stream: own,
        caller_reads_done,
        all_done,
        _snapshot: snapshot,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(len: usize, elem: usize) -> DeferredCopy {
        DeferredCopy {
            ordinal: 0,
            caller_stream: 0,
            src: 0,
            dst: std::ptr::null_mut(),
            len,
            elem,
        }
    }

    #[test]
    fn snapshot_takes_what_fits_in_order_and_packs_it_aligned_without_padding() {
        let copies = [copy(100, 4), copy(1000, 8), copy(0, 4), copy(6, 2), copy(300, 4), copy(64, 8), copy(50, 1)];
        let refs: Vec<&DeferredCopy> = copies.iter().collect();
        let (offsets, used) = snapshot_offsets(&refs, 480);
        // 100 fits; 1000 does not; empty tensors are never snapshotted; 6, 300 and 64 fit
        // (470 bytes); 50 would make 520. Placed by element size: 64 (8), 100 and 300 (4), 6 (2).
        assert_eq!(offsets, vec![Some(64), None, None, Some(464), Some(164), Some(0), None]);
        assert_eq!(used, 470);
        for (c, off) in copies.iter().zip(&offsets) {
            if let Some(off) = off {
                assert_eq!(off % c.elem, 0, "a region of {}-byte elements at {off}", c.elem);
            }
        }
        // A budget of exactly the state's bytes takes everything.
        let all: u64 = copies.iter().map(|c| c.len as u64).sum();
        let (offsets, used) = snapshot_offsets(&refs, all);
        assert_eq!(used as u64, all);
        assert_eq!(offsets.iter().filter(|o| o.is_some()).count(), 6);
        let (none, zero) = snapshot_offsets(&refs, 0);
        assert!(none.iter().all(Option::is_none));
        assert_eq!(zero, 0);
    }
}
