//! Replays the fuzz corpus (`fuzz/corpus/<target>/*`: seeds and a few minimised inputs the
//! fuzzers found), the crashes they found and we fixed (`fuzz/regressions/<target>/*`), and the
//! local working corpus (`fuzz/work/<target>/*`, not committed) when there is one, through the
//! fuzz targets' own bodies (`fuzz/harness.rs`), on stable Rust: every input must come back
//! without a panic. The fuzzers themselves run with `scripts/fuzz.sh` (cargo-fuzz, libFuzzer).

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::Path;

#[test]
fn every_corpus_file_runs_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut total = 0;
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
                let r = std::panic::catch_unwind(|| f(&data));
                assert!(r.is_ok(), "fuzz target {name} panicked on {}", p.display());
                n += 1;
            }
        }
        assert!(n > 0, "no corpus for fuzz target {name} under {}", root.display());
        println!("{name}: {n} inputs");
        total += n;
    }
    println!("{total} inputs replayed");
}
