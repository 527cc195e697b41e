//! The bodies of the fuzz targets, shared by `fuzz/fuzz_targets/*.rs` (libFuzzer, through
//! `cargo fuzz`) and by `tests/fuzz_corpus.rs` (which replays every file of `fuzz/corpus/` on
//! stable Rust). Each function takes arbitrary bytes and must return without panicking: the
//! readers answer bad input with an error, never a crash.
//!
//! Where a reader accepts its input, a few invariants the engine relies on are asserted too
//! (a decoded value re-encodes to something that decodes to the same value; a tensor record
//! lies inside its item).

#![allow(dead_code)]

use dcp::format::metadata::{EntryMeta, Metadata, PathPart, StorageIndex, StorageInfo, TensorMeta};
use dcp::format::pickle;
use dcp::format::pyobj::ObjectValue;
use dcp::format::sidecar::Sidecar;
use dcp::format::zipitem::{self, ItemContent, ItemSource};
use dcp::mesh::{DeviceMesh, Placement};
use dcp::plan::load::plan_load;
use dcp::plan::save::{GlobalPlan, LocalItem, LocalKind, LocalPlan, Plans};
use dcp::region::Region;
use dcp::{DType, State, TensorView};

/// A fuzz target: its name and the function that runs one input.
pub type Target = (&'static str, fn(&[u8]));

/// The targets, by name (the names of `fuzz/fuzz_targets/*.rs` and of `fuzz/corpus/*`).
pub const TARGETS: &[Target] = &[
    ("pickle", pickle_parse),
    ("metadata", metadata_decode),
    ("zipitem", zip_item),
    ("sidecar", sidecar_decode),
    ("plan", plan),
];

/// The pickle VM, and the Python-value reader on top of it.
pub fn pickle_parse(data: &[u8]) {
    if let Ok(g) = pickle::parse(data, "fuzz") {
        assert!(g.root < g.nodes.len());
        for id in 0..g.nodes.len() {
            let _ = (
                g.as_str(id),
                g.as_int(id),
                g.as_seq(id),
                g.as_dict(id),
                g.as_global(id),
                g.as_call(id),
            );
            let _ = g.dict_get(id, "a");
        }
    }
    let _ = ObjectValue::from_pickle(data, "fuzz");
}

/// `.metadata`: the pickle VM, then the Metadata decoder; an accepted Metadata re-encodes to a
/// pickle that decodes to the same Metadata.
pub fn metadata_decode(data: &[u8]) {
    let Ok(md) = Metadata::decode(data, "fuzz") else {
        return;
    };
    let lookup = md.index();
    for (fqn, _) in &md.entries {
        let _ = lookup.entry(&md, fqn);
        let _ = lookup.storage(&md, fqn, None);
    }
    let again = Metadata::decode(&md.encode(), "re-encoded").expect("an encoded Metadata decodes");
    assert_eq!(again.entries, md.entries);
    assert_eq!(again.storage, md.storage);
}

/// An item's bytes in memory.
struct Mem<'a>(&'a [u8]);

impl ItemSource for Mem<'_> {
    fn read_item_range(&self, offset: u64, len: usize) -> dcp::Result<Vec<u8>> {
        let end = offset.checked_add(len as u64).filter(|&e| e <= self.0.len() as u64);
        match end {
            Some(e) => Ok(self.0[offset as usize..e as usize].to_vec()),
            None => Err(dcp::Error::corrupt(format!("fuzz item: {offset}+{len} out of range"))),
        }
    }
}

/// The zip item reader (a `torch.save` archive inside a data file). The first byte picks the
/// item length the reader is told (the real length, or shorter/longer than the bytes).
pub fn zip_item(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let len = match mode % 4 {
        0 | 1 => rest.len() as u64,
        2 => (rest.len() as u64).saturating_sub(mode as u64 / 4),
        _ => rest.len() as u64 + mode as u64 / 4,
    };
    let src = Mem(rest);
    match zipitem::read_item(&src, len, "fuzz") {
        Ok(ItemContent::Tensor(rec)) => {
            // The engine reads `data_len` bytes at `data_offset` of the item.
            let end = rec.data_offset.checked_add(rec.data_len);
            assert!(end.is_some_and(|e| e <= len), "tensor record {rec:?} outside the {len}-byte item");
            assert_eq!(rec.sizes.len(), rec.strides.len());
        }
        Ok(ItemContent::Object(_)) | Err(_) => {}
    }
    if rest.len() >= 22 {
        let _ = zipitem::locate_central_directory(rest, rest.len() as u64, "fuzz");
    }
}

/// The `.libdcp` sidecar; an accepted one re-encodes to the same bytes' meaning.
pub fn sidecar_decode(data: &[u8]) {
    if let Ok(s) = Sidecar::decode(data, "fuzz") {
        assert_eq!(Sidecar::decode(&s.encode(), "re-encoded").expect("an encoded sidecar decodes"), s);
    }
}

/// Reads fuzz bytes as small numbers; zeros once exhausted.
struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn small(&mut self, n: u8) -> u64 {
        (self.u8() % n) as u64
    }
    /// Mostly small, sometimes huge (overflow hunting).
    fn dim(&mut self) -> u64 {
        match self.u8() {
            250 => u64::MAX,
            251 => u64::MAX / 2 + 1,
            252 => 1 << 32,
            253 => (1 << 32) + 1,
            b => (b % 9) as u64,
        }
    }
    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
}

fn placement(b: &mut Bytes, ndim: u64) -> Placement {
    match b.small(3) {
        0 => Placement::Replicate,
        1 => Placement::Shard((b.small(5) as usize).min(ndim as usize + 1)),
        _ => Placement::StridedShard((b.small(5) as usize).min(ndim as usize + 1)),
    }
}

fn mesh(b: &mut Bytes, world: u32) -> DeviceMesh {
    let ndim = 1 + b.small(2) as usize;
    let mut shape = vec![1u32; ndim];
    let mut n = 1u32;
    for s in shape.iter_mut() {
        *s = 1 + b.small(3) as u32;
        n *= *s;
    }
    if n != world && b.u8() % 2 == 0 {
        shape = vec![world];
        n = world;
    }
    let ranks: Vec<u32> = (0..n).map(|r| (r + b.small(2) as u32) % n.max(1)).collect();
    DeviceMesh::new(&shape, Some(&ranks), None)
        .or_else(|_| DeviceMesh::new(&shape, None, None))
        .expect("a small mesh")
}

/// Save planning (`GlobalPlan::build`, uniform and per rank) over random local plans, and load
/// planning (`plan_load`) of a random registered box against random saved chunks. The first
/// byte's low bit picks postcard-decoded local plans (what a peer sends) instead.
pub fn plan(data: &[u8]) {
    let mut b = Bytes { data, pos: 0 };
    if b.u8() % 2 == 1 {
        plan_from_wire(&data[1..]);
        return;
    }
    let ndim = b.small(4);
    let shape: Vec<u64> = (0..ndim).map(|_| b.dim()).collect();
    let world = 1 + b.small(4) as u32;
    let dtype = [DType::F32, DType::U8, DType::BF16, DType::C128][b.small(4) as usize];
    let mut plans = Vec::new();
    for _ in 0..world {
        let mut p = LocalPlan::default();
        let nitems = b.small(3);
        for i in 0..nitems {
            let fqn = format!("k{}", b.small(3).min(i + 1));
            let kind = match b.small(4) {
                0 => LocalKind::Object,
                1 => {
                    p.meshes.push(mesh(&mut b, world));
                    let m = (p.meshes.len() - 1) as u32;
                    let mdim = p.meshes[m as usize].ndim() as u64;
                    let np = if b.u8() % 8 == 0 { mdim + 1 } else { mdim };
                    LocalKind::Sharded {
                        dtype,
                        global_shape: shape.clone(),
                        mesh: m + (b.u8() % 16 == 0) as u32,
                        placements: (0..np).map(|_| placement(&mut b, ndim)).collect(),
                    }
                }
                _ => LocalKind::Tensor {
                    dtype,
                    global_shape: shape.clone(),
                    region: Region {
                        offsets: (0..ndim).map(|_| b.dim()).collect(),
                        sizes: (0..ndim).map(|_| b.dim()).collect(),
                    },
                },
            };
            let path = vec![PathPart::Key(fqn.clone())];
            p.items.push(LocalItem { fqn, path, kind });
        }
        p.items.sort_by(|a, c| a.fqn.cmp(&c.fqn));
        p.items.dedup_by(|a, c| a.fqn == c.fqn);
        plans.push(p);
    }
    exercise_global(GlobalPlan::build(Plans::PerRank(&plans)));
    exercise_global(GlobalPlan::build(Plans::Uniform(&plans[0], world)));

    // Load planning: random saved chunks (some outside the shape, overlapping, missing storage)
    // against a registered box.
    let nchunks = b.small(5);
    let mut md = Metadata::default();
    let mut chunks = Vec::new();
    for i in 0..nchunks {
        let r = Region {
            offsets: (0..ndim).map(|_| b.dim()).collect(),
            sizes: (0..ndim).map(|_| b.dim()).collect(),
        };
        if b.u8() % 8 != 0 {
            md.storage.push((
                StorageIndex {
                    fqn: "w".into(),
                    offset: Some(r.offsets.clone()),
                    index: Some(i),
                },
                StorageInfo {
                    relative_path: "__0_0.distcp".into(),
                    offset: b.dim(),
                    length: b.dim(),
                },
            ));
        }
        chunks.push(r);
    }
    let saved_shape = if b.u8() % 8 == 0 {
        shape.iter().map(|s| s.wrapping_add(1)).collect()
    } else {
        shape.clone()
    };
    md.entries.push((
        "w".into(),
        EntryMeta::Tensor(TensorMeta {
            dtype: Some(dtype),
            dtype_name: dtype.torch_name().into(),
            size: saved_shape,
            chunks,
        }),
    ));
    md.entries.push(("o".into(), EntryMeta::Bytes));
    let sizes: Vec<u64> = (0..ndim).map(|_| b.small(4)).collect();
    let offsets: Vec<u64> = (0..ndim).map(|_| b.dim()).collect();
    let n: u64 = sizes.iter().product::<u64>() * dtype.size() as u64;
    let mut buf = vec![0u8; n as usize];
    let mut st = State::new();
    let Ok(view) = TensorView::from_bytes(&mut buf, dtype, &sizes) else {
        return;
    };
    if st.add_tensor_chunk("w", view, &shape, &offsets).is_err() {
        return;
    }
    if b.u8() % 2 == 0 {
        let _ = st.add_int("o", 1);
    }
    let strict = !b.done() && b.u8() % 2 == 0;
    if let Ok(p) = plan_load(&st, &md, &md.index(), strict) {
        let _ = p.bytes_to_read(&md, &md.index());
        // Every planned overlap lies inside both its chunk and the registered box.
        for c in &p.chunks {
            for (_, o) in &c.targets {
                assert!(
                    c.chunk.intersect(o).as_ref() == Some(o) || o.is_empty(),
                    "overlap {o:?} outside chunk {:?}",
                    c.chunk
                );
            }
        }
    }
}

/// Local plans as a peer sends them (postcard), then both ways of building the global plan.
fn plan_from_wire(data: &[u8]) {
    let Some((&w, rest)) = data.split_first() else {
        return;
    };
    let world = 1 + (w % 4) as usize;
    let Ok(p) = LocalPlan::decode(rest, 1) else {
        return;
    };
    let plans = vec![p.clone(); world];
    exercise_global(GlobalPlan::build(Plans::PerRank(&plans)));
    exercise_global(GlobalPlan::build(Plans::Uniform(&p, world as u32)));
}

fn exercise_global(r: dcp::Result<GlobalPlan>) {
    let Ok(plan) = r else {
        return;
    };
    let _ = plan.hash();
    let _ = plan.bytes_per_rank();
    for e in &plan.entries {
        for c in plan.chunks_of(e) {
            assert!(
                c.writer < plan.world_size,
                "chunk writer {} outside the world of {}",
                c.writer,
                plan.world_size
            );
        }
        for r in 0..plan.world_size {
            let _ = plan.chunks_written_by(e, r);
        }
    }
}
