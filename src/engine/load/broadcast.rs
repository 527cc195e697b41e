//! Read once, broadcast to the replicas: when several ranks load the same box of a key into GPU
//! memory (replicated tensors), one of them reads it from storage and NCCL sends it to the
//! others, instead of every rank reading the same bytes. Used when every rank can (NCCL loads,
//! each rank loads into CUDA tensors); otherwise every rank reads for itself.

use crate::comm::Communicator;
use crate::cuda::{self, nccl};
use crate::engine::wire::Wire;
use crate::error::{Error, Result};
use crate::plan::load::LoadPlan;
use crate::plan::stable_hash;
use crate::region::Region;
use crate::state::{EntryValue, State};
use crate::tensor::Device;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A box several ranks load identically.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct SharedBox {
    fqn: String,
    region: Region,
    nbytes: u64,
}

#[derive(Serialize, Deserialize)]
struct Offer {
    /// The CUDA device this rank loads into, when it can take part.
    device: Option<i32>,
    /// Host and PCI bus of that device: NCCL cannot put two ranks on one GPU.
    physical: String,
    boxes: Vec<SharedBox>,
}

/// What this rank does for one shared box: read it and send it, or receive it.
pub(crate) struct Transfer {
    entry: usize,
    nbytes: u64,
    reader: usize,
    members: Vec<usize>,
}

pub(crate) struct Broadcasts {
    pub transfers: Vec<Transfer>,
    pub device: i32,
    /// The reads this rank skipped (to receive them instead); done locally if NCCL fails.
    pub skipped: LoadPlan,
}

impl Broadcasts {
    /// Entries this rank received rather than read.
    pub fn received_entries(&self, me: usize) -> Vec<usize> {
        received(&self.transfers, me).collect()
    }
}

/// Entries of `transfers` that rank `me` receives rather than reads.
fn received(transfers: &[Transfer], me: usize) -> impl Iterator<Item = usize> + '_ {
    transfers.iter().filter(move |t| t.reader != me).map(|t| t.entry)
}

/// Collective (when the job has several ranks): agrees on the shared boxes and their readers,
/// and drops from `plan` the reads this rank will receive instead. `plan` is `None` on a rank
/// whose planning failed (it takes no part).
pub(crate) fn arrange(comm: &dyn Communicator, state: &State, plan: Option<&mut LoadPlan>, enabled: bool) -> Result<Option<Broadcasts>> {
    if comm.world_size() < 2 {
        return Ok(None);
    }
    let mut offer = Offer {
        device: None,
        physical: String::new(),
        boxes: Vec::new(),
    };
    let mut index: BTreeMap<SharedBox, usize> = BTreeMap::new();
    if let (true, Some(plan)) = (enabled, plan.as_ref()) {
        let planned: std::collections::HashSet<usize> = plan.chunks.iter().flat_map(|c| c.targets.iter().map(|t| t.0)).collect();
        for (ei, e) in state.entries().iter().enumerate() {
            let EntryValue::Tensor(t) = &e.value else { continue };
            let Device::Cuda(o) = t.view.device() else { continue };
            // One device per rank: the communicator's (NCCL copies only from and to its memory).
            if !planned.contains(&ei) || !t.view.is_contiguous() || t.region.is_empty() || offer.device.is_some_and(|d| d != o) {
                continue;
            }
            offer.device.get_or_insert(o);
            let b = SharedBox {
                fqn: e.fqn.clone(),
                region: t.region.clone(),
                nbytes: t.view.numel() * t.view.dtype().size() as u64,
            };
            index.insert(b.clone(), ei);
            offer.boxes.push(b);
        }
        if let Some(o) = offer.device {
            match (nccl::available(), cuda::physical_id(o)) {
                (true, Ok(id)) => offer.physical = id,
                _ => offer.device = None,
            }
        }
    }
    let all = comm.all_gather(&Wire::Ok(offer).encode())?;
    let mut offers = Vec::with_capacity(all.len());
    for (r, bytes) in all.iter().enumerate() {
        match Wire::<Offer>::decode(bytes, r)? {
            Wire::Ok(o) => offers.push(o),
            Wire::Err { .. } => return Err(Error::comm(format!("rank {r} sent an error instead of its broadcast offer"))),
        }
    }
    // Only when every rank can: a world NCCL communicator needs all of them.
    let Some(device) = offers[comm.rank()].device else {
        return Ok(None);
    };
    if offers.iter().any(|o| o.device.is_none()) {
        return Ok(None);
    }
    let mut physical: Vec<&str> = offers.iter().map(|o| o.physical.as_str()).collect();
    physical.sort_unstable();
    if physical.windows(2).any(|w| w[0] == w[1]) {
        return Ok(None);
    }
    let mut groups: BTreeMap<&SharedBox, Vec<usize>> = BTreeMap::new();
    for (r, o) in offers.iter().enumerate() {
        for b in &o.boxes {
            groups.entry(b).or_default().push(r);
        }
    }
    let me = comm.rank();
    let mut transfers = Vec::new();
    for (b, members) in groups {
        if members.len() < 2 || !members.contains(&me) {
            continue;
        }
        let key = postcard::to_allocvec(b).expect("box serialises");
        let reader = members[(stable_hash(&key) % members.len() as u64) as usize];
        transfers.push(Transfer {
            entry: index[b],
            nbytes: b.nbytes,
            reader,
            members,
        });
    }
    let mut skipped = LoadPlan::default();
    if let Some(plan) = plan {
        let receive: std::collections::HashSet<usize> = received(&transfers, me).collect();
        for c in &mut plan.chunks {
            let (mine, kept): (Vec<_>, Vec<_>) = c.targets.drain(..).partition(|(ei, _)| receive.contains(ei));
            c.targets = kept;
            if !mine.is_empty() {
                skipped.chunks.push(crate::plan::load::ChunkRead {
                    targets: mine,
                    ..c.clone()
                });
            }
        }
        plan.chunks.retain(|c| !c.targets.is_empty());
    }
    Ok(Some(Broadcasts {
        transfers,
        device,
        skipped,
    }))
}

/// The context's NCCL communicator over the whole job, made on first use (collective).
pub(crate) fn world_comm(cell: &Mutex<Option<Arc<nccl::Comm>>>, comm: &dyn Communicator, device: i32) -> Result<Arc<nccl::Comm>> {
    let mut g = crate::error::lock(cell);
    if let Some(c) = g.as_ref() {
        return Ok(c.clone());
    }
    let id = crate::engine::wire::broadcast_result(comm, 0, if comm.rank() == 0 { nccl::unique_id() } else { Ok(Vec::new()) })?;
    let c = Arc::new(nccl::Comm::init(&id, comm.rank(), comm.world_size(), device)?);
    *g = Some(c.clone());
    Ok(c)
}

/// Sends and receives the shared boxes (after every rank has read its part). Returns the bytes
/// this rank received.
pub(crate) fn run(b: &Broadcasts, nccl_comm: &nccl::Comm, state: &State) -> Result<u64> {
    cuda::activate(b.device)?;
    let stream = cuda::Stream::new(b.device)?;
    let me = nccl_comm.rank;
    let mut received = 0u64;
    nccl_comm.group(|| {
        for t in &b.transfers {
            let EntryValue::Tensor(e) = &state.entries()[t.entry].value else {
                continue;
            };
            let ptr = e.view.as_ptr() as u64;
            // Why the transfers below are sound: the entry is a contiguous view on `b.device` (`arrange`
            // offers no other), so `ptr..ptr + nbytes` is its payload, checked by `set_cuda` to
            // lie in one allocation of that device, which is current; the caller's buffer is
            // ours during the load, and the readers of this rank (which write the sent boxes)
            // finished before `run`; the stream is synchronised below before the load returns.
            // This load is the communicator's only user: a context runs one collective at a time.
            if t.reader == me {
                for &m in t.members.iter().filter(|&&m| m != me) {
                    // SAFETY: as explained above (the device range, its users, the stream).
                    unsafe { nccl_comm.send(ptr, t.nbytes as usize, m, &stream)? };
                }
            } else {
                // SAFETY: as explained above (the device range, its users, the stream).
                unsafe { nccl_comm.recv(ptr, t.nbytes as usize, t.reader, &stream)? };
                received += t.nbytes;
            }
        }
        Ok(())
    })?;
    stream.synchronize()?;
    Ok(received)
}
