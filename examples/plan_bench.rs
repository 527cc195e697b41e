//! Planning at scale, in one process with simulated ranks: an FSDP+TP job of RANKS ranks
//! (dp x tp = RANKS/8 x 8) saving TENSORS tensors. Prints what each rank spends planning, what
//! rank 0 spends building `.metadata`, and the sizes exchanged and written.
//!
//!   cargo run --release --example plan_bench [RANKS] [TENSORS]

use dcp::format::metadata::{default_path, StorageInfo};
use dcp::mesh::{DeviceMesh, Placement};
use dcp::plan::save::{GlobalPlan, LocalItem, LocalKind, LocalPlan, Plans};
use dcp::plan::stable_hash;
use dcp::DType;
use std::time::Instant;

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).map(|a| a.parse().expect("numbers")).collect();
    let ranks = *args.first().unwrap_or(&4096) as u32;
    let tensors = *args.get(1).unwrap_or(&2000) as usize;
    let tp = 8u32.min(ranks);
    let dp = ranks / tp;
    let mesh = DeviceMesh::new(&[dp, tp], None, Some(&["dp".to_string(), "tp".to_string()])).unwrap();

    // An LLM-like mix: attention/MLP weights colwise or rowwise on tp, norms replicated on tp;
    // FSDP shards dim 0 over dp everywhere.
    let items: Vec<LocalItem> = (0..tensors)
        .map(|i| {
            let (shape, placements) = match i % 4 {
                0 => (vec![4096, 4096], vec![Placement::StridedShard(0), Placement::Shard(0)]),
                1 => (vec![4096, 4096], vec![Placement::Shard(0), Placement::Shard(1)]),
                2 => (vec![11008, 4096], vec![Placement::StridedShard(0), Placement::Shard(0)]),
                _ => (vec![4096], vec![Placement::Shard(0), Placement::Replicate]),
            };
            let fqn = format!("model.layers.{}.w{}", i / 4, i % 4);
            LocalItem {
                path: default_path(&fqn),
                fqn,
                kind: LocalKind::Sharded {
                    dtype: DType::BF16,
                    global_shape: shape,
                    mesh: 0,
                    placements,
                },
            }
        })
        .collect();
    let local = LocalPlan {
        meshes: vec![mesh.clone()],
        items,
    };

    // What every rank does before writing.
    let t = Instant::now();
    let encoded = local.encode();
    let hash = stable_hash(&encoded);
    let t_encode = t.elapsed();
    let t = Instant::now();
    let plan = GlobalPlan::build(Plans::Uniform(&local, ranks)).unwrap();
    let t_build = t.elapsed();
    let t = Instant::now();
    let mut my_chunks = 0usize;
    for e in &plan.entries {
        my_chunks += plan.chunks_written_by(e, ranks - 1).len();
    }
    let t_mine = t.elapsed();

    // Rank 0 after the writes: every chunk into `.metadata` (as the commit does it).
    let t = Instant::now();
    let mut chunks_total = 0usize;
    let md = dcp::engine::save::metadata_of(&plan, "/bench", "bench", |_, _| {
        chunks_total += 1;
        Some(StorageInfo {
            relative_path: format!("__{}_0.distcp", chunks_total % ranks as usize),
            offset: (chunks_total as u64) << 20,
            length: 1 << 20,
        })
    })
    .unwrap();
    let t_md = t.elapsed();
    let t = Instant::now();
    let bytes = md.encode();
    let t_pickle = t.elapsed();

    println!("planning benchmark: {ranks} ranks (dp {dp} x tp {tp}), {tensors} tensors, FSDP+TP placements");
    println!("| step | time | size |");
    println!("|---|---|---|");
    println!(
        "| every rank: local plan, encode + hash (exchanged: 8-byte hash) | {:.1} ms | plan {} B, hash {hash:016x} |",
        t_encode.as_secs_f64() * 1e3,
        encoded.len()
    );
    println!(
        "| every rank: global plan from its own (uniform layout) | {:.1} ms | |",
        t_build.as_secs_f64() * 1e3
    );
    println!(
        "| every rank: its own writes | {:.1} ms | {my_chunks} chunks |",
        t_mine.as_secs_f64() * 1e3
    );
    println!(
        "| per-rank planning total | {:.1} ms | |",
        (t_encode + t_build + t_mine).as_secs_f64() * 1e3
    );
    println!(
        "| rank 0 at commit: all chunks into Metadata | {:.2} s | {chunks_total} chunks |",
        t_md.as_secs_f64()
    );
    println!(
        "| rank 0 at commit: pickle `.metadata` | {:.2} s | {:.1} MiB ({:.1} B/chunk) |",
        t_pickle.as_secs_f64(),
        bytes.len() as f64 / (1 << 20) as f64,
        bytes.len() as f64 / chunks_total as f64
    );
}
