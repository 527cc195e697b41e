//! Replays the fuzz corpus (`fuzz/corpus/<target>/*`: seeds and a few minimised inputs the
//! fuzzers found), the crashes they found and we fixed (`fuzz/regressions/<target>/*`, among
//! them the amplification inputs: pickles of shared references and `.metadata` files repeating
//! memo references, kilobytes that decoded to gigabytes), and the local working corpus
//! (`fuzz/work/<target>/*`, not committed) when there is one, through the fuzz targets' own
//! bodies (`fuzz/harness.rs`), on stable Rust: every input must come back without a panic, and
//! without allocating more than [`bound`] at its peak (a counting global allocator measures it),
//! so an amplification fails here as it crashes the fuzzers (`scripts/fuzz.sh` runs them with an
//! RSS and a malloc limit). The fuzzers themselves run with `scripts/fuzz.sh` (cargo-fuzz,
//! libFuzzer).

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::Path;
use std::sync::atomic::Ordering;

#[path = "common/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::{CURRENT, PEAK};

/// The most one input of `len` bytes may allocate at its peak: the readers charge what they
/// materialise against budgets of at most 64 bytes per input byte plus a few MiB, and the pickle
/// VM makes at most one node per input byte.
fn bound(len: usize) -> usize {
    128 * len + (64 << 20)
}

#[test]
fn every_corpus_file_runs_without_a_panic_within_bounded_memory() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut total = 0;
    // (peak bytes, input bytes, file) of the input with the highest peak over its bound's slope.
    let mut worst: Option<(usize, usize, String)> = None;
    for (name, f) in harness::TARGETS {
        let mut n = 0;
        for dir in ["corpus", "regressions", "work"] {
            let Ok(rd) = std::fs::read_dir(root.join(dir).join(name)) else {
                continue;
            };
            let mut files: Vec<_> = rd.map(|e| e.unwrap().path()).collect();
            files.sort();
            for p in files {
                let data = std::fs::read(&p).unwrap();
                let base = CURRENT.load(Ordering::Relaxed);
                PEAK.store(base, Ordering::Relaxed);
                let r = std::panic::catch_unwind(|| f(&data));
                let peak = PEAK.load(Ordering::Relaxed) - base;
                assert!(r.is_ok(), "fuzz target {name} panicked on {}", p.display());
                assert!(
                    peak <= bound(data.len()),
                    "fuzz target {name} allocated {peak} bytes at its peak on {} ({} bytes; bound {})",
                    p.display(),
                    data.len(),
                    bound(data.len())
                );
                if worst.as_ref().is_none_or(|w| peak > w.0) {
                    worst = Some((peak, data.len(), p.display().to_string()));
                }
                n += 1;
            }
        }
        assert!(n > 0, "no corpus for fuzz target {name} under {}", root.display());
        println!("{name}: {n} inputs");
        total += n;
    }
    println!("{total} inputs replayed");
    if let Some((peak, len, file)) = worst {
        println!("highest peak: {peak} bytes allocated for the {len}-byte input {file}");
    }
}
