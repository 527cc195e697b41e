//! The async save's staging copy: this rank's items copied into one host arena (page-locked
//! when CUDA tensors are involved), and a state of views into it, so the caller may change its
//! tensors once the save call returns.

use super::my_entries;
use super::{SaveOptions, StagingReport};
use crate::engine::staging::{
    self, copy_contiguous_piece, copy_dense, first_cuda_device, launch_deferred, sync_devices, with_host_extent, DeferredBytes, DeferredCopy, DeviceStreams,
    HostBuf, HostGather, InFlightCopies, PoolBuf, SyncOnDrop,
};
use crate::engine::workers::{cpu_count, for_each_parallel};
use crate::engine::Context;
use crate::error::{lock, Error, Result};
use crate::plan::save::GlobalPlan;
use crate::state::{EntryValue, State, TensorEntry};
use crate::tensor::{Device, TensorView};
use std::sync::{Arc, Mutex};

/// This rank's written items, copied into one staging buffer (page-locked when CUDA tensors
/// are involved), and a state of views into it.
pub(super) struct Staged {
    // Declared before `arena`: its views point into it.
    pub(super) state: State<'static>,
    /// Device copies into the arena still running (stream-ordered and snapshot saves); shared
    /// with the save's future. Declared before `arena`: the last owner's drop waits for them.
    pub(super) in_flight: Option<Arc<InFlightCopies>>,
    arena: HostBuf,
    pub(super) report: StagingReport,
}

impl Staged {
    pub(super) fn into_arena(self) -> HostBuf {
        drop(self.state);
        // The future may keep the handle longer; the copies are done (the writer waited).
        drop(self.in_flight);
        self.arena
    }
}

pub(super) fn stage(ctx: &Context, state: &State, plan: &GlobalPlan, rank: usize, opts: &SaveOptions) -> Result<Staged> {
    let mut tensors = Vec::new();
    let mut objects = Vec::new();
    for entry in my_entries(state, plan, rank)? {
        match &entry.value {
            EntryValue::Tensor(t) => tensors.push((entry, t)),
            EntryValue::Object(v) => objects.push((entry.fqn.clone(), v.clone())),
        }
    }
    let align = staging::ALIGN;
    let lens: Vec<usize> = tensors
        .iter()
        .map(|(_, t)| (t.view.numel() * t.view.dtype().size() as u64) as usize)
        .collect();
    let total: usize = lens.iter().map(|n| n.next_multiple_of(align)).sum();
    let mut arena = PoolBuf::acquire(&ctx.inner.pool, total, first_cuda_device(tensors.iter().map(|(_, t)| &t.view)))?;
    // Each tensor's dense bytes, at aligned offsets: pieces of `n` bytes, each followed by its
    // padding.
    let pieces = lens.iter().flat_map(|&n| [n, n.next_multiple_of(align) - n]);
    let mut slots = arena.split(pieces).into_iter().step_by(2).collect::<Vec<_>>();
    // Declared after `arena`: on an error return it is dropped first, waiting for its copies.
    let (in_flight, deferred) = copy_into_arena(ctx, &tensors, &mut slots, opts)?;
    drop(slots);
    // Dropped before `arena` (back to the pool) on an error: its views point into it.
    let mut staged = State::new();
    let mut off = 0usize;
    for ((entry, t), n) in tensors.iter().zip(&lens) {
        // SAFETY: bytes `off..off + n` of the arena hold this tensor's dense payload (its slot,
        // written above, or by device copies still in flight that nothing reads before
        // `InFlightCopies::wait_all`; the slices are gone). The views live only in `staged`,
        // which is dropped before the arena is (declaration order in `Staged`, `into_arena`,
        // and the `?`s here drop `staged` before `arena`), and the state is only saved from
        // (read), after the copies are done.
        let view = unsafe { arena.detached_view(off, *n, t.view.dtype(), t.view.sizes())? };
        staged.add_tensor_chunk(&entry.fqn, view, &t.global_shape, &t.region.offsets)?;
        off += n.next_multiple_of(align);
    }
    for (fqn, v) in objects {
        staged.add_object(&fqn, v)?;
    }
    Ok(Staged {
        state: staged,
        in_flight: in_flight.map(Arc::new),
        arena: arena.into_inner(),
        report: StagingReport {
            device_snapshot_bytes: deferred.snapshot,
            stream_ordered_bytes: deferred.stream_ordered,
            copied_bytes: lens.iter().sum::<usize>() as u64,
            blocked_seconds: 0.0,
        },
    })
}

/// Whether a tensor's staging copy may finish after the call returns.
fn deferrable(view: &TensorView, opts: &SaveOptions) -> bool {
    opts.defers_device_copies() && matches!(view.device(), Device::Cuda(_)) && view.is_contiguous()
}

/// Copies tensors (dense, row-major) into their slots of the arena: device tensors by
/// asynchronous copies (those `opts` defers are still running when this returns: the
/// returned copies), host tensors by several threads.
fn copy_into_arena(
    ctx: &Context,
    tensors: &[(&crate::state::Entry, &TensorEntry)],
    slots: &mut [&mut [u8]],
    opts: &SaveOptions,
) -> Result<(Option<InFlightCopies>, DeferredBytes)> {
    // Deferred copies wait for the caller's streams on the GPU; the others need the work of
    // tensors registered without a stream finished now.
    sync_devices(tensors.iter().map(|(_, t)| &t.view).filter(|v| !deferrable(v, opts)))?;
    let mut deferred = Vec::new();
    for ((_, t), dst) in tensors.iter().zip(slots.iter_mut()) {
        if let (Device::Cuda(ordinal), true, false) = (t.view.device(), deferrable(&t.view, opts), dst.is_empty()) {
            deferred.push(DeferredCopy {
                ordinal,
                caller_stream: t.view.stream(),
                src: t.view.as_ptr() as u64,
                dst: dst.as_mut_ptr(),
                len: dst.len(),
                elem: t.view.dtype().size(),
            });
        }
    }
    // Queued first, so the GPU works while the host copies run.
    let in_flight = match deferred.is_empty() {
        true => None,
        // SAFETY: each source is a contiguous CUDA view's `len` payload bytes, checked by
        // `set_cuda` to lie in one allocation of its device, registered with its stream; the
        // caller keeps them valid and unchanged until it orders its writes after the copies
        // (the `stream_ordered` contract) or, snapshotted, until the call returns. Each `dst`
        // is the tensor's own slot of the page-locked arena (acquired pinned: there are CUDA
        // tensors), which `stage` keeps, unread, until `wait_all` (the returned copies are
        // dropped, waiting for them, before the arena on every path).
        false => Some(unsafe { launch_deferred(&deferred, opts.device_snapshot_bytes, &ctx.inner.snapshots) }?),
    };
    let bytes = in_flight.as_ref().map(InFlightCopies::bytes).unwrap_or_default();
    let mut streams = DeviceStreams::default();
    // Synchronised on every return: the arena must not go back to the pool under a copy.
    let mut used = SyncOnDrop::default();
    let mut host = Vec::new();
    for ((entry, t), dst) in tensors.iter().zip(slots.iter_mut()) {
        let key = |e: Error| e.context(format!("key {:?}", entry.fqn)).with_key(entry.fqn.as_str());
        match t.view.device() {
            Device::Cuda(_) if deferrable(&t.view, opts) => {}
            Device::Cuda(ordinal) if t.view.is_contiguous() => {
                let s = streams.get(ordinal, t.view.stream())?;
                // SAFETY: the contiguous view's `dst.len()` payload bytes are CUDA memory of
                // device `ordinal` (made current by `get`), checked by `set_cuda` to lie in one
                // allocation; `dst` is this tensor's own slot of the arena, not touched again
                // before its stream is synchronised (below, or by `used` on an early return).
                unsafe { s.d2h(dst, t.view.as_ptr() as u64) }.map_err(key)?;
                used.0.push(s);
            }
            Device::Cuda(ordinal) => {
                // Strided device memory: its whole extent to the host, then gathered densely.
                let s = streams.get(ordinal, t.view.stream())?;
                with_host_extent(&ctx.inner.pool, &s, &t.view, ordinal, |extent_buf, extent| {
                    HostGather::of_extent(extent_buf.bytes(extent), &t.view).fill(0, dst);
                    Ok(())
                })
                .map_err(key)?;
            }
            Device::Cpu => host.push((*t, &mut **dst)),
        }
    }
    copy_host(host)?;
    for s in &used.0 {
        s.synchronize()?;
    }
    Ok((in_flight, bytes))
}

/// Host copies are cut into pieces of at most this many bytes, so that one large tensor is
/// copied by every staging thread: memory bandwidth, not one core, is then the limit.
const HOST_PIECE: usize = 4 << 20;

/// The most threads the host staging copy uses (memory bandwidth is saturated before this).
const MAX_HOST_COPY_THREADS: usize = 8;

/// One piece of a host staging copy: `dst` gets the tensor's dense payload bytes from `start`
/// (a contiguous tensor's piece), or its whole payload (`start` `None`: a strided tensor,
/// gathered in one go).
struct HostPiece<'v, 'd> {
    view: &'v TensorView<'v>,
    start: Option<u64>,
    dst: Mutex<&'d mut [u8]>,
}

/// Copies host tensors (dense, row-major) into their slots, in pieces spread over threads.
fn copy_host(host: Vec<(&TensorEntry, &mut [u8])>) -> Result<()> {
    let mut pieces = Vec::new();
    for (t, dst) in host {
        if t.view.is_contiguous() {
            for (i, piece) in dst.chunks_mut(HOST_PIECE).enumerate() {
                pieces.push(HostPiece {
                    view: &t.view,
                    start: Some((i * HOST_PIECE) as u64),
                    dst: Mutex::new(piece),
                });
            }
        } else {
            pieces.push(HostPiece {
                view: &t.view,
                start: None,
                dst: Mutex::new(dst),
            });
        }
    }
    let threads = cpu_count().min(MAX_HOST_COPY_THREADS);
    for_each_parallel(
        &pieces,
        threads,
        || Ok(()),
        |_, p| {
            let mut dst = lock(&p.dst);
            match p.start {
                Some(start) => copy_contiguous_piece(p.view, start, &mut dst),
                None => copy_dense(p.view, &mut dst),
            }
            Ok(())
        },
    )?;
    Ok(())
}
