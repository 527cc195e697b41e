//! Hostile pickles through every reader: a few kilobytes that share references
//! (`pickle.dumps([[[0] * 1000] * 1000] * 1000, protocol=2)`: 10^9 values as a tree) or repeat a
//! memoized value (a `.metadata` whose 512 KB key every storage entry fetches from the memo) must
//! never cost memory beyond a small multiple of their size. Each case runs the pickle VM, the
//! object and `.metadata` decoders, a load of a saved checkpoint, the `Checkpoint` reader,
//! `verify`, and the `dcp` command line (inspect, verify, diff), measuring the peak heap of this
//! process (a counting global allocator) and the peak RSS of each `dcp` process (`wait4`).
//!
//! The shared-reference pickle saved as an object item loads back byte for byte (kept opaque:
//! as a tree it would not fit); the hostile `.metadata` is refused with an error naming the file.
//! Run: `cargo test --release --test hostile_pickles -- --nocapture` (prints input vs peak).

use dcp::engine::verify;
use dcp::format::metadata::Metadata;
use dcp::format::pickle::{self, PickleWriter};
use dcp::{load, save, Checkpoint, Context, DType, ErrorKind, LoadOptions, ObjectValue, PyValue, SaveOptions, State, TensorView};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Mutex;

#[path = "common/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::{CURRENT, PEAK};

/// One measurement at a time: the counter is process-wide.
static SERIAL: Mutex<()> = Mutex::new(());

/// The most any hostile input of `input` bytes may cost above what was allocated before: the
/// decoders' budgets (64 bytes per input byte plus 1 MiB for values, 32 plus 4 MiB for
/// `.metadata`), the pickle VM's graph (at most one node per input byte), the input itself, and
/// what a load takes whatever its input (its 64 MiB staging buffer).
fn bound(input: usize) -> usize {
    128 * input + (72 << 20)
}

/// Runs `f`, returning its result and the peak heap growth while it ran; prints the figure.
fn measured<T>(label: &str, input: usize, f: impl FnOnce() -> T) -> T {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let t = std::time::Instant::now();
    let r = f();
    let peak = PEAK.load(Ordering::Relaxed) - base;
    println!(
        "{label:<58} input {input:>9} B  peak heap {peak:>11} B  ({:.1}x input, {:.2} s)",
        peak as f64 / input as f64,
        t.elapsed().as_secs_f64()
    );
    assert!(
        peak <= bound(input),
        "{label}: peak {peak} B from {input} B of input (bound {})",
        bound(input)
    );
    r
}

// ---------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------

/// `pickle.dumps(nested, protocol=2)` for `depth` levels of a list repeated `width` times:
/// (3, 1000) is `[[[0] * 1000] * 1000] * 1000`, 6014 bytes (the bytes Python writes).
fn nested_shared_lists(depth: u8, width: usize) -> Vec<u8> {
    let mut out = vec![0x80, 2];
    for level in 0..depth {
        out.extend_from_slice(&[b']', b'q', level, b'(']);
    }
    for _ in 0..width {
        out.extend_from_slice(&[b'K', 0]);
    }
    out.push(b'e');
    for level in (0..depth.saturating_sub(1)).rev() {
        for _ in 1..width {
            out.extend_from_slice(&[b'h', level + 1]);
        }
        out.push(b'e');
    }
    out.push(b'.');
    out
}

/// A list of `n` references to one memoized string of `len` bytes.
fn repeated_string(len: usize, n: usize) -> Vec<u8> {
    let mut w = PickleWriter::new(2);
    w.empty_list().mark();
    w.str(&"s".repeat(len));
    let idx = w.memoize();
    for _ in 0..n {
        w.get(idx);
    }
    w.appends();
    w.finish()
}

const MD_MODULE: &str = "torch.distributed.checkpoint.metadata";
const FS_MODULE: &str = "torch.distributed.checkpoint.filesystem";

/// A `.metadata` as torch or libdcp writes it for one tensor of `chunks` one-element chunks,
/// except that its key is `fqn_len` bytes long: written once, every storage entry fetches it
/// from the memo (5 bytes), so decoding copies it `chunks` times (512 KiB x 4000: 2 GiB).
fn memo_repeat_metadata(fqn_len: usize, chunks: u64) -> Vec<u8> {
    let mut w = PickleWriter::new(4);
    let obj = |w: &mut PickleWriter, module: &str, class: &str| {
        w.global(module, class);
        w.empty_tuple().newobj();
    };
    let size = |w: &mut PickleWriter, v: u64| {
        w.global("torch", "Size");
        w.int_tuple(&[v]).tuple(1).reduce();
    };
    obj(&mut w, MD_MODULE, "Metadata");
    w.empty_dict().mark();
    w.str_memo("state_dict_metadata").empty_dict().mark();
    w.str(&"k".repeat(fqn_len));
    let key = w.memoize();
    obj(&mut w, MD_MODULE, "TensorStorageMetadata");
    w.empty_dict().mark();
    w.str_memo("properties");
    obj(&mut w, MD_MODULE, "TensorProperties");
    w.mark()
        .global("torch", "float32")
        .none()
        .bool(false)
        .none()
        .bool(false)
        .tuple(5)
        .build();
    w.str_memo("size");
    size(&mut w, chunks);
    w.str_memo("chunks").empty_list().mark();
    for i in 0..chunks {
        obj(&mut w, MD_MODULE, "ChunkStorageMetadata");
        w.empty_dict().mark().str_memo("offsets");
        size(&mut w, i);
        w.str_memo("sizes");
        size(&mut w, 1);
        w.setitems().build();
    }
    w.appends().setitems().build();
    w.setitems();
    w.str_memo("storage_data").empty_dict().mark();
    for i in 0..chunks {
        obj(&mut w, MD_MODULE, "MetadataIndex");
        w.empty_dict().mark();
        w.str_memo("fqn").get(key).str_memo("index").int(0).str_memo("offset");
        size(&mut w, i);
        w.setitems().build();
        obj(&mut w, FS_MODULE, "_StorageInfo");
        w.empty_dict().mark();
        w.str_memo("relative_path").str_memo("__0_0.distcp");
        w.str_memo("offset").int(i as i64 * 1024).str_memo("length").int(1000);
        w.setitems().build();
    }
    w.setitems();
    w.setitems().build();
    w.finish()
}

/// A `.metadata` with one tensor of rank `rank` whose `chunks` chunks are one memoized object,
/// its offsets and sizes one memoized `torch.Size`: (4096, 20000) is 110 KB that decodes to
/// 1.3 GB of chunk lists.
fn shared_chunks_metadata(rank: usize, chunks: usize) -> Vec<u8> {
    let mut w = PickleWriter::new(4);
    let obj = |w: &mut PickleWriter, class: &str| {
        w.global(MD_MODULE, class);
        w.empty_tuple().newobj();
    };
    obj(&mut w, "Metadata");
    w.empty_dict().mark();
    w.str_memo("state_dict_metadata").empty_dict().mark();
    w.str("w");
    obj(&mut w, "TensorStorageMetadata");
    w.empty_dict().mark();
    w.str_memo("properties");
    obj(&mut w, "TensorProperties");
    w.mark()
        .global("torch", "float32")
        .none()
        .bool(false)
        .none()
        .bool(false)
        .tuple(5)
        .build();
    w.str_memo("size").global("torch", "Size");
    w.int_tuple(&vec![1; rank]).tuple(1).reduce();
    let size = w.memoize();
    w.str_memo("chunks").empty_list().mark();
    obj(&mut w, "ChunkStorageMetadata");
    w.empty_dict().mark();
    w.str_memo("offsets").get(size).str_memo("sizes").get(size).setitems().build();
    let chunk = w.memoize();
    for _ in 1..chunks {
        w.get(chunk);
    }
    w.appends().setitems().build();
    w.setitems();
    w.setitems().build();
    w.finish()
}

fn hostile_metadata() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("512 KiB key x 4000 memo references", memo_repeat_metadata(512 << 10, 4000)),
        ("rank-4096 chunk x 20000 memo references", shared_chunks_metadata(4096, 20_000)),
    ]
}

fn hostile_pickles() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("[[[0]*1000]*1000]*1000 (protocol 2)", nested_shared_lists(3, 1000)),
        ("[[[[0]*100]*100]*100]*100", nested_shared_lists(4, 100)),
        ("1 MiB str memoized, 200000 references", repeated_string(1 << 20, 200_000)),
        (
            "list containing itself twice",
            vec![0x80, 2, b']', b'q', 0, b'h', 0, b'a', b'h', 0, b'a', b'.'],
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// Checkpoints
// ---------------------------------------------------------------------------------------------

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dcp-hostile-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

const WEIGHTS: [f32; 6] = [1.0, -2.0, 3.5, 0.25, 8.0, -0.5];

/// Saves a checkpoint with a small tensor `w` and the pickle `blob` (`dcp_state_add_pickle`).
fn save_with_pickle(dir: &Path, blob: &[u8]) {
    let mut data: Vec<u8> = WEIGHTS.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut st = State::new();
    st.add_tensor("w", TensorView::from_bytes(&mut data, DType::F32, &[2, 3]).unwrap())
        .unwrap();
    st.add_pickle("blob", blob).unwrap();
    save(&Context::local(), &st, dir.to_str().unwrap(), &SaveOptions::default()).unwrap();
}

/// Loads `w` (into a poisoned buffer) and `blob`; returns the blob's value.
fn load_blob(dir: &Path) -> dcp::Result<ObjectValue> {
    let mut buf = vec![0xA5u8; 24];
    let mut st = State::new();
    st.add_tensor("w", TensorView::from_bytes(&mut buf, DType::F32, &[2, 3]).unwrap())
        .unwrap();
    st.add_int("blob", -1).unwrap();
    load(&Context::local(), &mut st, dir.to_str().unwrap(), &LoadOptions::default())?;
    let v = st.object("blob")?.clone();
    drop(st);
    let want: Vec<u8> = WEIGHTS.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(buf, want, "tensor w loaded exactly");
    Ok(v)
}

/// Runs `dcp ARGS`, returning (exit code, stdout + stderr, peak RSS in bytes of that process).
/// The `dcp` process is started by a fresh copy of this test binary ([`rss_reaper`]): a process
/// inherits the peak RSS of whatever it was spawned from, and this one's holds earlier tests'.
fn dcp_cli(args: &[&str], scratch: &Path) -> (i32, String, usize) {
    let out_path = scratch.with_extension("out");
    let o = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["rss_reaper", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env("DCP_RSS_REAPER", args.join("\u{1f}"))
        .env("DCP_RSS_REAPER_OUT", &out_path)
        .output()
        .expect("runs the reaper");
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    let line = stdout
        .lines()
        .find_map(|l| l.split("rss-reaper: ").nth(1))
        .unwrap_or_else(|| panic!("dcp {args:?}: no reaper report: {stdout} {}", String::from_utf8_lossy(&o.stderr)));
    let mut f = line.split(' ').map(|x| x.parse::<i64>().unwrap());
    let (code, kib) = (f.next().unwrap(), f.next().unwrap());
    assert!(code >= 0, "dcp {args:?} died of signal {}: {text}", -code);
    (code as i32, text, kib as usize * 1024)
}

/// Not a test: [`dcp_cli`] runs this binary with `rss_reaper --exact --ignored` and the
/// arguments in `DCP_RSS_REAPER`; it runs `dcp` with them and prints its exit code (minus the
/// signal number if killed) and peak RSS in KiB, from `wait4`.
#[test]
#[ignore = "a helper that dcp_cli runs in a fresh process"]
fn rss_reaper() {
    use std::process::{Command, Stdio};
    let (Ok(args), Ok(out_path)) = (std::env::var("DCP_RSS_REAPER"), std::env::var("DCP_RSS_REAPER_OUT")) else {
        return;
    };
    let out = std::fs::File::create(&out_path).unwrap();
    // Reaped by `wait4` below, which also gives its resource usage.
    #[allow(clippy::zombie_processes)]
    let child = Command::new(env!("CARGO_BIN_EXE_dcp"))
        .args(args.split('\u{1f}'))
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("runs dcp");
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of the plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child by pid; `status` and `ru` are valid for writes.
    let r = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut ru) };
    assert_eq!(r, child.id() as libc::pid_t, "wait4: {}", std::io::Error::last_os_error());
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -libc::WTERMSIG(status)
    };
    println!("rss-reaper: {code} {}", ru.ru_maxrss);
}

/// The `dcp` process's peak RSS must stay within `bound(input)` plus what any run of it takes
/// (its code and a baseline measured on a clean checkpoint).
fn check_cli_rss(label: &str, input: usize, rss: usize, baseline: usize) {
    println!("{label:<58} input {input:>9} B  peak RSS  {rss:>11} B  (baseline {baseline} B)");
    assert!(
        rss <= baseline + bound(input),
        "{label}: peak RSS {rss} B (baseline {baseline} B, input {input} B)"
    );
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn pickle_readers_stay_bounded() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for (label, data) in hostile_pickles() {
        let g = measured(&format!("pickle::parse: {label}"), data.len(), || {
            pickle::parse(&data, "t").unwrap()
        });
        assert!(g.nodes.len() <= data.len(), "{label}: one node per input byte at most");
        drop(g);
        measured(
            &format!("PyValue::from_pickle: {label}"),
            data.len(),
            || match PyValue::from_pickle(&data, "key \"blob\"") {
                Ok(None) => {}
                Ok(Some(v)) => panic!("{label}: decoded to {}", v.to_string().len()),
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::Corrupt);
                    assert!(e.to_string().starts_with("key \"blob\": pickle expands past"), "{e}");
                }
            },
        );
        let v = measured(&format!("ObjectValue::from_pickle: {label}"), data.len(), || {
            ObjectValue::from_pickle(&data, "t").unwrap()
        });
        assert_eq!(v, ObjectValue::Pickle(data.clone()), "{label}: kept byte for byte");
    }
}

#[test]
fn the_densest_plain_pickle_still_decodes_within_the_bound() {
    // `pickle.dumps([None] * 1_000_000, protocol=2)`: one byte per value, the most values per
    // input byte a pickle without shared references can hold (each a 32-byte `PyValue`).
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut data = vec![0x80, 2, b']', b'q', 0];
    for _ in 0..1000 {
        data.push(b'(');
        data.extend(std::iter::repeat_n(b'N', 1000));
        data.push(b'e');
    }
    data.push(b'.');
    let v = measured("PyValue::from_pickle: [None] * 1000000 (not hostile)", data.len(), || {
        PyValue::from_pickle(&data, "t").unwrap()
    });
    assert_eq!(v, Some(PyValue::List(vec![PyValue::None; 1_000_000])));
}

#[test]
fn metadata_decoder_refuses_memo_repetition() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for (label, data) in hostile_metadata() {
        let e = measured(&format!("Metadata::decode: {label}"), data.len(), || {
            Metadata::decode(&data, "/ckpt/.metadata").unwrap_err()
        });
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.to_string().starts_with("/ckpt/.metadata: pickle expands past"), "{e}");
    }
}

#[test]
fn checkpoint_with_a_shared_reference_pickle_loads_it_byte_for_byte() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let clean = tmpdir("clean");
    save_with_pickle(&clean, b"\x80\x02K\x07.");
    let (_, _, baseline) = dcp_cli(&["verify", clean.to_str().unwrap()], &clean);
    // What the same readers take on a checkpoint with a 5-byte pickle, for comparison.
    measured("load: clean checkpoint (baseline)", 5, || load_blob(&clean).unwrap());
    measured("Checkpoint::open + read_object: clean (baseline)", 5, || {
        Checkpoint::open(clean.to_str().unwrap()).unwrap().read_object("blob").unwrap()
    });
    measured("verify: clean (baseline)", 5, || verify::verify(clean.to_str().unwrap()).unwrap());
    println!("{:<58} peak RSS  {baseline:>11} B", "dcp verify: clean (baseline)");
    for (i, (label, blob)) in hostile_pickles().into_iter().enumerate() {
        let dir = tmpdir(&format!("shared{i}"));
        save_with_pickle(&dir, &blob);
        let n = blob.len();
        let v = measured(&format!("load: object item {label}"), n, || load_blob(&dir).unwrap());
        assert_eq!(v, ObjectValue::Pickle(blob.clone()), "{label}");
        let v = measured(&format!("Checkpoint::open + read_object: {label}"), n, || {
            let ck = Checkpoint::open(dir.to_str().unwrap()).unwrap();
            ck.read_object("blob").unwrap()
        });
        assert_eq!(v, ObjectValue::Pickle(blob.clone()), "{label}");
        let report = measured(&format!("verify: {label}"), n, || verify::verify(dir.to_str().unwrap()).unwrap());
        assert!(report.is_ok(), "{label}: {:?}", report.problems);
        let d = dir.to_str().unwrap();
        for args in [vec!["inspect", d], vec!["verify", d], vec!["diff", d, clean.to_str().unwrap()]] {
            let (code, text, rss) = dcp_cli(&args, &dir);
            assert!(code == 0 || (args[0] == "diff" && code == 1), "dcp {args:?}: exit {code}: {text}");
            check_cli_rss(&format!("dcp {}: {label}", args[0]), n, rss, baseline);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::remove_dir_all(&clean).unwrap();
}

#[test]
fn checkpoint_with_a_memo_repeat_metadata_is_refused() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let clean = tmpdir("md-clean");
    save_with_pickle(&clean, b"\x80\x02K\x07.");
    let (_, _, baseline) = dcp_cli(&["verify", clean.to_str().unwrap()], &clean);
    for (i, (label, md)) in hostile_metadata().into_iter().enumerate() {
        let dir = tmpdir(&format!("md{i}"));
        save_with_pickle(&dir, b"\x80\x02K\x07.");
        std::fs::write(dir.join(".metadata"), &md).unwrap();
        // Without the sidecar (which holds the CRC of the `.metadata` it was saved with), as
        // torch writes checkpoints: the decoder is what stands between the file and memory.
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            if e.file_name().to_string_lossy().starts_with(".libdcp") {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
        let n = md.len();
        let expands = |e: &dcp::Error| e.to_string().contains(".metadata: pickle expands past");
        let e = measured(&format!("load: .metadata {label}"), n, || load_blob(&dir).unwrap_err());
        assert!(expands(&e), "{e}");
        let e = measured(&format!("Checkpoint::open: .metadata {label}"), n, || {
            Checkpoint::open(dir.to_str().unwrap()).err().expect("refused")
        });
        assert!(expands(&e), "{e}");
        let report = measured(&format!("verify: .metadata {label}"), n, || verify::verify(dir.to_str().unwrap()));
        match report {
            Ok(r) => {
                assert!(!r.is_ok());
                assert!(
                    r.problems.iter().any(|p| p.to_string().contains("pickle expands past")),
                    "{:?}",
                    r.problems
                );
            }
            Err(e) => assert!(expands(&e), "{e}"),
        }
        let d = dir.to_str().unwrap();
        for args in [vec!["inspect", d], vec!["verify", d], vec!["diff", d, clean.to_str().unwrap()]] {
            let (code, text, rss) = dcp_cli(&args, &dir);
            assert!(
                code != 0 && text.contains("pickle expands past"),
                "dcp {args:?}: exit {code}: {text}"
            );
            check_cli_rss(&format!("dcp {}: .metadata {label}", args[0]), n, rss, baseline);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::remove_dir_all(&clean).unwrap();
}

/// Not a test: writes the hostile inputs above into `DCP_WRITE_CORPUS`/<target>/ (the fuzz
/// regressions, `fuzz/regressions/`), as `amplification-*` files, for `tests/fuzz_corpus.rs` to
/// replay with its bound on peak memory. The small pickle and zip ones are also fuzzer seeds
/// (`fuzz/corpus/<target>/seed-amplification-*`), for the fuzzers to mutate.
/// Run: `DCP_WRITE_CORPUS=fuzz/regressions cargo test --release --test hostile_pickles
/// write_hostile_corpus -- --ignored --exact`.
#[test]
#[ignore = "a helper that writes the hostile inputs into the fuzz regressions"]
fn write_hostile_corpus() {
    let Ok(root) = std::env::var("DCP_WRITE_CORPUS") else {
        return;
    };
    let root = PathBuf::from(root);
    let write = |target: &str, name: &str, data: &[u8]| {
        std::fs::create_dir_all(root.join(target)).unwrap();
        std::fs::write(root.join(target).join(format!("amplification-{name}")), data).unwrap();
    };
    write("pickle", "shared-lists-3x1000", &nested_shared_lists(3, 1000));
    write("pickle", "shared-lists-4x100", &nested_shared_lists(4, 100));
    write("pickle", "memo-string-64k-x20000", &repeated_string(64 << 10, 20_000));
    write("pickle", "self-list", &[0x80, 2, b']', b'q', 0, b'h', 0, b'a', b'h', 0, b'a', b'.']);
    write("metadata", "memo-key-128k-x1500", &memo_repeat_metadata(128 << 10, 1500));
    write("metadata", "shared-chunks-4096x20000", &shared_chunks_metadata(4096, 20_000));
    let item = dcp::format::zipitem::object_item(&ObjectValue::Pickle(nested_shared_lists(3, 1000)), 1);
    write("zipitem", "shared-lists-3x1000", &[&[0u8][..], &item].concat());
}
