//! The commit protocol under adversity, through the safe Rust API: racing writers on one
//! location, overwrites that fail part-way (the previous checkpoint must stay loadable),
//! checkpoints from libdcp 0.1 (single `.libdcp`, torch's file names), and forged sidecars.

use dcp::engine::layout;
use dcp::engine::load::load_from;
use dcp::engine::save::save_to;
use dcp::error::Result;
use dcp::format::metadata::Metadata;
use dcp::format::sidecar::Sidecar;
use dcp::storage::fault::{FaultStorage, Faults};
use dcp::storage::fs::FsStorage;
use dcp::{load, save, Context, ErrorKind, LoadOptions, SaveOptions, State, TensorView};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};

/// A temporary directory removed on drop.
struct TmpDir(PathBuf);

impl TmpDir {
    fn new(name: &str) -> TmpDir {
        let d = std::env::temp_dir().join(format!("libdcp-commit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TmpDir(d)
    }
    fn join(&self, n: &str) -> PathBuf {
        self.0.join(n)
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// Values that tell writers apart: writer `w`, element `i`.
fn values(w: u32, n: usize) -> Vec<f32> {
    (0..n).map(|i| (w * 1_000_000 + i as u32) as f32).collect()
}

const N: usize = 3 << 20; // 12 MiB of f32: several sidecar blocks, several writes.

fn save_values(ctx: &Context, loc: &str, w: u32, overwrite: bool) -> Result<()> {
    let mut v = values(w, N);
    let mut st = State::new();
    st.add_tensor("w", TensorView::from_slice_mut(&mut v, &[N as u64]).unwrap())?;
    st.add_int("writer", w as i64)?;
    let opts = SaveOptions::default().overwrite(overwrite);
    save(ctx, &st, loc, &opts).map(|_| ())
}

/// Loads into a poisoned buffer; returns the values.
fn load_values(loc: &str) -> Result<Vec<f32>> {
    let mut out = vec![f32::from_bits(0xA5A5_A5A5); N];
    let mut st = State::new();
    st.add_tensor("w", TensorView::from_slice_mut(&mut out, &[N as u64]).unwrap())?;
    st.add_int("writer", -1)?;
    load(&Context::local(), &mut st, loc, &LoadOptions::default())?;
    drop(st);
    Ok(out)
}

fn writer_of(loaded: &[f32]) -> u32 {
    let w = (loaded[0] as u32) / 1_000_000;
    assert!(loaded == values(w, N).as_slice(), "the loaded tensor is not entirely writer {w}'s");
    w
}

#[test]
fn racing_writers_at_most_one_commits_and_nobody_loses_files() {
    for racers in [2u32, 3, 4] {
        for trial in 0..4 {
            let dir = TmpDir::new(&format!("race-{racers}-{trial}"));
            let loc = dir.join("ckpt").to_str().unwrap().to_string();
            let barrier = Arc::new(Barrier::new(racers as usize));
            let results: Vec<Result<()>> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..racers)
                    .map(|w| {
                        let (barrier, loc) = (barrier.clone(), loc.clone());
                        s.spawn(move || {
                            let ctx = Context::local();
                            barrier.wait();
                            save_values(&ctx, &loc, w, false)
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let winners: Vec<u32> = (0..racers).filter(|w| results[*w as usize].is_ok()).collect();
            assert_eq!(winners.len(), 1, "{racers} racers, trial {trial}: {results:?}");
            for r in results.iter().filter_map(|r| r.as_ref().err()) {
                assert_eq!(r.kind(), ErrorKind::AlreadyExists, "{r}");
                assert!(r.message().contains(&loc), "{r}");
            }
            assert_eq!(writer_of(&load_values(&loc).unwrap()), winners[0]);
            // Only the winner's files remain: losers removed theirs and nobody removed the
            // winner's.
            let md = Metadata::decode(&std::fs::read(Path::new(&loc).join(".metadata")).unwrap(), "md").unwrap();
            let mut expected: Vec<String> = md.storage.iter().map(|(_, i)| i.relative_path.clone()).collect();
            expected.extend(layout::sidecar_candidates(&md).into_iter().take(1));
            expected.push(".metadata".into());
            expected.sort();
            expected.dedup();
            assert_eq!(names(Path::new(&loc)), expected);
        }
    }
}

#[test]
fn a_failed_overwrite_keeps_the_previous_checkpoint() {
    let dir = TmpDir::new("overwrite-fail");
    let loc = dir.join("ckpt").to_str().unwrap().to_string();
    let ctx = Context::local();
    save_values(&ctx, &loc, 1, false).unwrap();
    let before = names(Path::new(&loc));
    // A disk filling up during the overwrite: at its first data byte, 5 MiB in, at the commit.
    for (fail_after, fail_commit) in [(Some(0), false), (Some(5 << 20), false), (None, true)] {
        let faults = Faults {
            write: fail_after.map(|n| (String::new(), n)),
            put: fail_commit.then(|| ".metadata".to_string()),
            kind: ErrorKind::NoSpace,
        };
        let storage = Arc::new(FaultStorage::new(Arc::new(FsStorage::new(&loc)), faults));
        let mut v = values(2, N);
        let mut st = State::new();
        st.add_tensor("w", TensorView::from_slice_mut(&mut v, &[N as u64]).unwrap())
            .unwrap();
        st.add_int("writer", 2).unwrap();
        let opts = SaveOptions::default().overwrite(true);
        let e = save_to(&ctx, &st, storage, &loc, &opts).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
        // The previous checkpoint loads, bit for bit, and the failed save left nothing behind.
        assert_eq!(writer_of(&load_values(&loc).unwrap()), 1);
        assert_eq!(
            names(Path::new(&loc)),
            before,
            "after a failed overwrite ({fail_after:?}, {fail_commit})"
        );
    }
    // A successful overwrite replaces it and removes the old files.
    save_values(&ctx, &loc, 3, true).unwrap();
    assert_eq!(writer_of(&load_values(&loc).unwrap()), 3);
    let after = names(Path::new(&loc));
    assert!(
        before.iter().all(|n| n == ".metadata" || !after.contains(n)),
        "{before:?} -> {after:?}"
    );
    assert_eq!(after.len(), before.len(), "{after:?}");
}

#[test]
fn checkpoints_of_libdcp_0_1_still_load() {
    // Rename the files to the 0.1 layout (torch's data-file names, one `.libdcp`) and rewrite
    // .metadata and the sidecar to match, as libdcp 0.1 wrote them.
    let dir = TmpDir::new("legacy");
    let loc = dir.join("ckpt").to_str().unwrap().to_string();
    let ctx = Context::local();
    save_values(&ctx, &loc, 4, false).unwrap();
    let p = Path::new(&loc);
    let mut md = Metadata::decode(&std::fs::read(p.join(".metadata")).unwrap(), "md").unwrap();
    let sc_name = layout::sidecar_candidates(&md)[0].clone();
    let mut sc = Sidecar::decode(&std::fs::read(p.join(&sc_name)).unwrap(), "sc").unwrap();
    let legacy = |n: &str| {
        let (r, k, _) = layout::parse_data_file(n).unwrap();
        format!("__{r}_{k}.distcp")
    };
    for f in &mut sc.files {
        std::fs::rename(p.join(&f.name), p.join(legacy(&f.name))).unwrap();
        f.name = legacy(&f.name);
    }
    for (_, info) in &mut md.storage {
        info.relative_path = legacy(&info.relative_path);
    }
    let md_bytes = md.encode();
    sc.metadata_len = md_bytes.len() as u64;
    sc.metadata_crc32 = crc32fast::hash(&md_bytes);
    std::fs::write(p.join(".metadata"), &md_bytes).unwrap();
    std::fs::remove_file(p.join(&sc_name)).unwrap();
    std::fs::write(p.join(".libdcp"), sc.encode()).unwrap();
    assert_eq!(writer_of(&load_values(&loc).unwrap()), 4);
    // Its sidecar is used: a damaged .metadata is a checksum error.
    let mut bad = md_bytes.clone();
    let at = bad.len() - 20;
    bad[at] ^= 1;
    std::fs::write(p.join(".metadata"), &bad).unwrap();
    let e = load_values(&loc).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Checksum, "{e}");
    std::fs::write(p.join(".metadata"), &md_bytes).unwrap();
    // Overwriting it removes the 0.1 files after the commit.
    save_values(&ctx, &loc, 5, true).unwrap();
    assert_eq!(writer_of(&load_values(&loc).unwrap()), 5);
    let left = names(p);
    assert!(!left.iter().any(|n| n == ".libdcp" || n == "__0_0.distcp"), "{left:?}");
}

/// Rewrites the checkpoint's sidecar with `edit` applied (a forger who recomputes its CRC).
fn forge_sidecar(loc: &str, edit: impl FnOnce(&mut Sidecar)) -> Vec<u8> {
    let p = Path::new(loc);
    let md = Metadata::decode(&std::fs::read(p.join(".metadata")).unwrap(), "md").unwrap();
    let name = layout::sidecar_candidates(&md)[0].clone();
    let pristine = std::fs::read(p.join(&name)).unwrap();
    let mut sc = Sidecar::decode(&pristine, "sc").unwrap();
    edit(&mut sc);
    std::fs::write(p.join(&name), sc.encode()).unwrap();
    pristine
}

fn restore_sidecar(loc: &str, pristine: &[u8]) {
    let p = Path::new(loc);
    let md = Metadata::decode(&std::fs::read(p.join(".metadata")).unwrap(), "md").unwrap();
    std::fs::write(p.join(&layout::sidecar_candidates(&md)[0]), pristine).unwrap();
}

#[test]
fn forged_sidecars_are_refused() {
    let dir = TmpDir::new("forged");
    let loc = dir.join("ckpt").to_str().unwrap().to_string();
    save_values(&Context::local(), &loc, 6, false).unwrap();
    assert!(!layout::sidecar_candidates(&Metadata::decode(&std::fs::read(dir.join("ckpt/.metadata")).unwrap(), "md").unwrap()).is_empty());
    type Forgery = Box<dyn FnOnce(&mut Sidecar)>;
    let forgeries: Vec<(&str, Forgery)> = vec![
        // A block record claiming an empty payload: the buffer would be left unwritten.
        (
            "empty payload",
            Box::new(|s| {
                s.blocks[0].payload_len = 0;
                s.blocks[0].crcs.clear();
            }),
        ),
        // A payload moved by one block: CRCs of other bytes.
        ("moved payload", Box::new(|s| s.blocks[0].payload_offset += 4096)),
        // A file outside the directory.
        ("path", Box::new(|s| s.files[0].name = "../../etc/passwd".into())),
        // A file the metadata does not reference.
        (
            "extra file",
            Box::new(|s| {
                s.files.push(dcp::format::sidecar::FileRecord {
                    name: "__9_9.distcp".into(),
                    len: 1,
                    rank: 9,
                })
            }),
        ),
    ];
    for (what, edit) in forgeries {
        let pristine = forge_sidecar(&loc, edit);
        let e = load_values(&loc).unwrap_err();
        assert!(matches!(e.kind(), ErrorKind::Corrupt), "{what}: {e}");
        restore_sidecar(&loc, &pristine);
        assert_eq!(writer_of(&load_values(&loc).unwrap()), 6);
    }
    // Also through a storage the test controls (no path-based lookups).
    let mut out = vec![0f32; N];
    let mut st = State::new();
    st.add_tensor("w", TensorView::from_slice_mut(&mut out, &[N as u64]).unwrap())
        .unwrap();
    st.add_int("writer", 0).unwrap();
    load_from(&Context::local(), &mut st, Arc::new(FsStorage::new(&loc)), &LoadOptions::default()).unwrap();
}

/// A store that takes appends only (as an object store does) gets whole checkpoints: the save
/// path writes every file front to back without positional writes, over several files and
/// buffer flushes, and the load reads back every byte.
#[test]
fn a_storage_without_positional_writes_is_written_by_appends() {
    use dcp::storage::mem::MemStorage;
    use dcp::storage::Storage;
    let storage = Arc::new(MemStorage::sequential_only());
    assert!(!storage.capabilities().positional_writes);
    let big_len = (40 << 20) / 4 + 3;
    let mut big: Vec<f32> = (0..big_len).map(|i| (i as f32) * 0.5 - 7.0).collect();
    let mut odd: Vec<u8> = (0..1001u32).map(|i| (i * 7 + 3) as u8).collect();
    let mid_len = (30 << 20) / 4 + 1;
    let mut mid = values(7, mid_len);
    let mut st = State::new();
    st.add_tensor("big", TensorView::from_slice_mut(&mut big, &[big_len as u64]).unwrap())
        .unwrap();
    st.add_tensor("odd", TensorView::from_slice_mut(&mut odd, &[7, 11, 13]).unwrap())
        .unwrap();
    st.add_tensor("mid", TensorView::from_slice_mut(&mut mid, &[mid_len as u64]).unwrap())
        .unwrap();
    st.add_int("step", 1234).unwrap();
    let opts = SaveOptions::default().threads(4).buffer_bytes(1 << 20);
    let ctx = Context::local();
    save_to(&ctx, &st, storage.clone(), "mem://sequential", &opts).unwrap();
    drop(st);
    let data_files = storage.list().unwrap().into_iter().filter(|n| n.ends_with(".distcp")).count();
    assert!(data_files >= 2, "{data_files} data files: the save spreads over several");

    let mut big_out = vec![f32::from_bits(0xA5A5_A5A5); big_len];
    let mut odd_out = vec![0xA5u8; 1001];
    let mut mid_out = vec![f32::from_bits(0xA5A5_A5A5); mid_len];
    let mut st = State::new();
    st.add_tensor("big", TensorView::from_slice_mut(&mut big_out, &[big_len as u64]).unwrap())
        .unwrap();
    st.add_tensor("odd", TensorView::from_slice_mut(&mut odd_out, &[7, 11, 13]).unwrap())
        .unwrap();
    st.add_tensor("mid", TensorView::from_slice_mut(&mut mid_out, &[mid_len as u64]).unwrap())
        .unwrap();
    st.add_int("step", -1).unwrap();
    load_from(&ctx, &mut st, storage, &LoadOptions::default()).unwrap();
    assert_eq!(st.object("step").unwrap(), &dcp::ObjectValue::Int(1234));
    drop(st);
    assert!(big_out.iter().map(|v| v.to_bits()).eq(big.iter().map(|v| v.to_bits())), "big");
    assert_eq!(odd_out, odd);
    assert!(mid_out.iter().map(|v| v.to_bits()).eq(mid.iter().map(|v| v.to_bits())), "mid");
}
