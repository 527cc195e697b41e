//! `dcp verify` reports everything load refuses: one hand-built bad checkpoint per class of
//! refusal, shown to be refused by the load path (`Checkpoint::read_tensor` / `read_object` run
//! the same planning and item reading as `dcp_load`) and reported by `verify`. Then pickles that
//! name callables outside torch's checkpoint classes: notes, failures under `strict_pickles`.

use dcp::format::metadata::{default_path, EntryMeta, Metadata, StorageIndex, StorageInfo, TensorMeta};
use dcp::format::zipitem::{self, TensorItemLayout};
use dcp::{verify, verify_with_options, VerifyOptions, VerifyReport};
use dcp::{Checkpoint, DType, ErrorKind, ObjectValue, Region};
use std::path::{Path, PathBuf};

#[path = "common/dcp_bin.rs"]
mod dcp_bin;
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("refusals-{name}"));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
    fn s(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A torch-like checkpoint (no sidecar) in `__0_0.distcp`, built item by item.
#[derive(Default)]
struct Builder {
    file: Vec<u8>,
    md: Metadata,
}

const FILE: &str = "__0_0.distcp";

impl Builder {
    fn new() -> Self {
        Builder {
            md: Metadata {
                version: Some("1.0.0".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn align(&mut self) -> u64 {
        while self.file.len() % 64 != 0 {
            self.file.push(0);
        }
        self.file.len() as u64
    }

    /// Tensor `fqn` of f32 `shape` in the given chunks (values: the global row-major index).
    fn tensor(&mut self, fqn: &str, shape: &[u64], chunks: &[Region]) -> &mut Self {
        for (i, c) in chunks.iter().enumerate() {
            let start = self.align();
            let strides = dcp::tensor::contiguous_strides(shape);
            let mut payload = Vec::new();
            let n = c.numel();
            for e in 0..n {
                // e-th element of the chunk, as a global index.
                let mut rem = e;
                let mut global = 0;
                for d in (0..shape.len()).rev() {
                    global += (c.offsets[d] + rem % c.sizes[d]) * strides[d];
                    rem /= c.sizes[d];
                }
                payload.extend_from_slice(&(global as f32).to_le_bytes());
            }
            let l = TensorItemLayout::new(DType::F32, &c.sizes, start, 64, i as u64);
            self.file.extend_from_slice(&l.prefix);
            self.file.extend_from_slice(&payload);
            self.file.extend_from_slice(&l.trailer(crc32fast::hash(&payload)));
            self.md.storage.push((
                StorageIndex {
                    fqn: fqn.into(),
                    offset: Some(c.offsets.clone()),
                    index: Some(i as u64),
                },
                StorageInfo {
                    relative_path: FILE.into(),
                    offset: start,
                    length: l.len(),
                },
            ));
        }
        self.md.entries.push((
            fqn.into(),
            EntryMeta::Tensor(TensorMeta {
                dtype: Some(DType::F32),
                dtype_name: "float32".into(),
                size: shape.to_vec(),
                chunks: chunks.to_vec(),
            }),
        ));
        self.md.planner_data.push((fqn.into(), default_path(fqn)));
        self
    }

    /// Object `fqn` whose item's data.pkl is `pickle`.
    fn object(&mut self, fqn: &str, pickle: &[u8]) -> &mut Self {
        let start = self.align();
        let item = zipitem::object_item(&ObjectValue::Pickle(pickle.to_vec()), 9);
        self.file.extend_from_slice(&item);
        self.md.storage.push((
            StorageIndex {
                fqn: fqn.into(),
                offset: None,
                index: None,
            },
            StorageInfo {
                relative_path: FILE.into(),
                offset: start,
                length: item.len() as u64,
            },
        ));
        self.md.entries.push((fqn.into(), EntryMeta::Bytes));
        self.md.planner_data.push((fqn.into(), default_path(fqn)));
        self
    }

    fn write(&self, dir: &Dir) {
        std::fs::write(dir.0.join(FILE), &self.file).unwrap();
        std::fs::write(dir.0.join(".metadata"), self.md.encode()).unwrap();
    }
}

fn r(o: &[u64], s: &[u64]) -> Region {
    Region::new(o.to_vec(), s.to_vec()).unwrap()
}

/// A plain int object, pickled as torch.save does (protocol 2).
fn int_pickle(v: i64) -> Vec<u8> {
    ObjectValue::Int(v).to_pickle()
}

fn good() -> Builder {
    let mut b = Builder::new();
    b.tensor("w", &[4, 3], &[r(&[0, 0], &[2, 3]), r(&[2, 0], &[2, 3])])
        .object("step", &int_pickle(7));
    b
}

/// verify fails with a problem about `key` whose text contains every needle.
fn assert_reported(report: &VerifyReport, key: &str, needles: &[&str]) {
    assert!(!report.is_ok(), "verify passed: notes {:?}", report.notes);
    let hit = report
        .problems
        .iter()
        .any(|p| p.key.as_deref() == Some(key) && needles.iter().all(|n| p.to_string().contains(n)));
    assert!(hit, "no problem about {key:?} with {needles:?}: {:#?}", report.problems);
}

/// Sets the compression method of every zip record named `*{suffix}` of the item at `at`
/// (central directory and local header) to deflate, leaving the bytes stored.
fn mark_compressed(file: &mut [u8], at: u64, len: u64, suffix: &str) {
    let item = &file[at as usize..(at + len) as usize];
    let loc = zipitem::locate_central_directory(item, len, "t").unwrap();
    let cd_start = loc.offset as usize;
    let entries = zipitem::parse_central_directory(&item[cd_start..cd_start + loc.size as usize], loc, len, "t").unwrap();
    let e = entries.iter().find(|e| e.name.ends_with(suffix)).unwrap();
    // The central-directory header of the record: scan for its signature with this name.
    let mut p = cd_start;
    let abs = at as usize;
    loop {
        assert_eq!(&item[p..p + 4], b"PK\x01\x02");
        let n = u16::from_le_bytes([item[p + 28], item[p + 29]]) as usize;
        let m = u16::from_le_bytes([item[p + 30], item[p + 31]]) as usize;
        let k = u16::from_le_bytes([item[p + 32], item[p + 33]]) as usize;
        if &item[p + 46..p + 46 + n] == e.name.as_bytes() {
            file[abs + p + 10] = 8;
            break;
        }
        p += 46 + n + m + k;
    }
    file[abs + e.header_offset as usize + 8] = 8;
}

#[test]
fn good_checkpoint_loads_and_verifies() {
    let d = Dir::new("good");
    good().write(&d);
    let ck = Checkpoint::open(d.s()).unwrap();
    let (_, _, bytes) = ck.read_tensor("w").unwrap();
    let want: Vec<u8> = (0..12).flat_map(|i| (i as f32).to_le_bytes()).collect();
    assert_eq!(bytes, want);
    assert_eq!(ck.read_object("step").unwrap(), ObjectValue::Int(7));
    let rep = verify(d.s()).unwrap();
    assert!(rep.is_ok() && rep.notes.is_empty(), "{:?} {:?}", rep.problems, rep.notes);
    assert_eq!(rep.pickles, 4);
}

#[test]
fn compressed_tensor_record() {
    let d = Dir::new("compressed-tensor");
    let mut b = good();
    let info = b.md.storage[1].1.clone();
    mark_compressed(&mut b.file, info.offset, info.length, "/data/0");
    b.write(&d);
    let e = Checkpoint::open(d.s()).unwrap().read_tensor("w").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("compressed"), "{e}");
    assert_reported(&verify(d.s()).unwrap(), "w", &[FILE, "load refuses it", "compressed"]);
}

#[test]
fn compressed_object_pickle() {
    let d = Dir::new("compressed-object");
    let mut b = good();
    let info = b.md.storage[2].1.clone();
    mark_compressed(&mut b.file, info.offset, info.length, "data.pkl");
    b.write(&d);
    let e = Checkpoint::open(d.s()).unwrap().read_object("step").unwrap_err();
    assert!(e.to_string().contains("compressed"), "{e}");
    assert_reported(&verify(d.s()).unwrap(), "step", &["compressed"]);
}

#[test]
fn dtype_differs_from_metadata() {
    let d = Dir::new("dtype");
    let mut b = good();
    if let EntryMeta::Tensor(t) = &mut b.md.entries[0].1 {
        t.dtype = Some(DType::I32);
        t.dtype_name = "int32".into();
    }
    b.write(&d);
    let e = Checkpoint::open(d.s()).unwrap().read_tensor("w").unwrap_err();
    assert!(e.to_string().contains("holds a float32 tensor"), "{e}");
    assert_reported(&verify(d.s()).unwrap(), "w", &["holds a float32 tensor", "int32"]);
}

#[test]
fn shape_differs_from_metadata() {
    let d = Dir::new("shape");
    let mut b = good();
    // Each 2x3 item described as a 1x6 chunk of a 2x6 tensor: the tiling holds, the items do not.
    if let EntryMeta::Tensor(t) = &mut b.md.entries[0].1 {
        t.size = vec![2, 6];
        t.chunks = vec![r(&[0, 0], &[1, 6]), r(&[1, 0], &[1, 6])];
    }
    b.md.storage[1].0.offset = Some(vec![1, 0]);
    b.write(&d);
    let e = Checkpoint::open(d.s()).unwrap().read_tensor("w").unwrap_err();
    assert!(e.to_string().contains("shape [2, 3]"), "{e}");
    assert_reported(&verify(d.s()).unwrap(), "w", &["shape [2, 3]", "[1, 6]"]);
}

#[test]
fn unsupported_dtype_in_metadata() {
    let d = Dir::new("unknown-dtype");
    let mut b = good();
    if let EntryMeta::Tensor(t) = &mut b.md.entries[0].1 {
        t.dtype = None;
        t.dtype_name = "float8_e8m0fnu".into();
    }
    b.write(&d);
    let ck = Checkpoint::open(d.s()).unwrap();
    assert_eq!(ck.find("w").unwrap().dtype_name, "float8_e8m0fnu");
    let e = ck.read_tensor("w").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert_reported(&verify(d.s()).unwrap(), "w", &["float8_e8m0fnu", "load refuses"]);
}

#[test]
fn items_share_bytes() {
    let d = Dir::new("shared-bytes");
    let mut b = good();
    // The second chunk's entry points at the first chunk's intact item (same sizes, good CRCs).
    b.md.storage[1].1 = b.md.storage[0].1.clone();
    b.write(&d);
    let e = Checkpoint::open(d.s()).unwrap().read_tensor("w").unwrap_err();
    assert!(e.to_string().contains("overlapping bytes"), "{e}");
    assert_reported(&verify(d.s()).unwrap(), "w", &["overlaps the item of key \"w\""]);
}

#[test]
fn item_inside_another_item() {
    let d = Dir::new("nested-bytes");
    let mut b = Builder::new();
    b.tensor("w", &[4, 3], &[r(&[0, 0], &[4, 3])])
        .object("a", &int_pickle(1))
        .object("c", &int_pickle(2));
    // "w"'s entry claims the whole file: items a and c lie inside it, not next to each other.
    b.md.storage[0].1.length = b.file.len() as u64;
    b.write(&d);
    let rep = verify(d.s()).unwrap();
    assert_reported(&rep, "a", &["overlaps the item of key \"w\""]);
    assert_reported(&rep, "c", &["overlaps the item of key \"w\""]);
}

#[test]
fn object_pickle_does_not_parse() {
    let d = Dir::new("bad-pickle");
    let mut b = good();
    b.object("junk", b"\x80\x02K\x01K\x02R\x00garbage");
    b.write(&d);
    let e = Checkpoint::open(d.s()).unwrap().read_object("junk").unwrap_err();
    println!("load: {e}");
    assert_reported(&verify(d.s()).unwrap(), "junk", &["pickle"]);
}

#[test]
fn object_item_holds_a_tensor() {
    let d = Dir::new("kind");
    let mut b = good();
    // "step"'s entry points at a tensor chunk's item.
    b.md.storage[2].1 = b.md.storage[0].1.clone();
    b.md.storage[0].1.offset = 0;
    b.write(&d);
    let e = Checkpoint::open(d.s()).unwrap().read_object("step").unwrap_err();
    assert!(e.to_string().contains("holds a tensor"), "{e}");
    assert_reported(&verify(d.s()).unwrap(), "step", &["holds a tensor"]);
}

// ---------------------------------------------------------------------------------------------
// pickles that would run code
// ---------------------------------------------------------------------------------------------

/// `os.system("echo pwned")`, protocol 0 as Python writes it for `__reduce__`.
const OS_SYSTEM: &[u8] = b"cos\nsystem\n(S'echo pwned'\ntR.";
/// `builtins.eval("1+1")` through STACK_GLOBAL, the module name memoized (protocol 4).
const EVAL: &[u8] =
    b"\x80\x04\x95\x1f\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94\x8c\x04eval\x94\x93\x94\x8c\x031+1\x94\x85\x94R\x94.";

#[test]
fn pickles_naming_callables_are_reported() {
    for (name, pickle, callable) in [("os-system", OS_SYSTEM, "os.system"), ("eval", EVAL, "builtins.eval")] {
        let d = Dir::new(name);
        let mut b = good();
        b.object("evil", pickle);
        b.write(&d);
        let rep = verify(d.s()).unwrap();
        assert!(rep.is_ok(), "{:?}", rep.problems);
        let notes: Vec<&String> = rep.notes.iter().filter(|n| n.contains(callable)).collect();
        assert_eq!(notes.len(), 1, "{:?}", rep.notes);
        assert!(notes[0].contains("key \"evil\"") && notes[0].contains(FILE), "{}", notes[0]);
        assert_eq!(rep.notes.len(), 1, "{:?}", rep.notes);

        let strict = verify_with_options(d.s(), &VerifyOptions::default().strict_pickles(true), &mut |_, _| {}).unwrap();
        assert_reported(&strict, "evil", &[callable, "pickle.load"]);
        assert_eq!(strict.problems.len(), 1, "{:?}", strict.problems);
    }
}

/// The dcp binary's flag, on the same checkpoint.
#[test]
fn strict_pickles_flag() {
    let d = Dir::new("flag");
    let mut b = good();
    b.object("evil", OS_SYSTEM);
    b.write(&d);
    let run = |args: &[&str]| std::process::Command::new(dcp_bin::dcp_bin()).args(args).output().unwrap();
    let o = run(&["verify", d.s()]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("note: key \"evil\""));
    let o = run(&["verify", d.s(), "--strict-pickles"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("FAIL: key \"evil\""));
}

// ---------------------------------------------------------------------------------------------
// scale
// ---------------------------------------------------------------------------------------------

/// A `.metadata` of one tensor in 200k chunks (about 20 MB pickled), its data file absent:
/// verify's structure checks (storage entries, tiling, chunk lookups) on it, valid and with one
/// chunk moved onto its neighbour, each in well under the 17 s the pairwise check took.
#[test]
fn two_hundred_thousand_chunks() {
    let (rows, cols) = (500u64, 400u64);
    let chunks: Vec<Region> = (0..rows * cols).map(|i| r(&[(i / cols) * 2, (i % cols) * 2], &[2, 2])).collect();
    let mut b = Builder::new();
    b.md.entries.push((
        "w".into(),
        EntryMeta::Tensor(TensorMeta {
            dtype: Some(DType::F32),
            dtype_name: "float32".into(),
            size: vec![rows * 2, cols * 2],
            chunks: chunks.clone(),
        }),
    ));
    for (i, c) in chunks.iter().enumerate() {
        b.md.storage.push((
            StorageIndex {
                fqn: "w".into(),
                offset: Some(c.offsets.clone()),
                index: Some(i as u64),
            },
            StorageInfo {
                relative_path: "__9_0.distcp".into(),
                offset: i as u64 * 1000,
                length: 1000,
            },
        ));
    }
    b.md.planner_data.push(("w".into(), default_path("w")));
    let d = Dir::new("200k");
    b.write(&d);
    std::fs::remove_file(d.0.join(FILE)).unwrap();
    let md = std::fs::read(d.0.join(".metadata")).unwrap();
    let t = std::time::Instant::now();
    Metadata::decode(&md, "md").unwrap();
    let decode = t.elapsed();
    let t = std::time::Instant::now();
    let rep = verify(d.s()).unwrap();
    let valid = t.elapsed();
    assert_eq!(rep.problems.len(), 1, "{:?}", &rep.problems[..rep.problems.len().min(3)]);
    assert!(
        rep.problems[0].to_string().contains("__9_0.distcp: data file is missing"),
        "{}",
        rep.problems[0]
    );

    if let EntryMeta::Tensor(t) = &mut b.md.entries[0].1 {
        t.chunks[123_456].offsets[1] += 2;
        b.md.storage[123_456].0.offset = Some(t.chunks[123_456].offsets.clone());
    }
    b.write(&d);
    std::fs::remove_file(d.0.join(FILE)).unwrap();
    let t = std::time::Instant::now();
    let rep = verify(d.s()).unwrap();
    let bad = t.elapsed();
    assert!(
        rep.problems
            .iter()
            .any(|p| p.to_string().contains("overlap") || p.to_string().contains("gap")),
        "{:?}",
        rep.problems
    );
    println!(
        "verify of 200k chunks ({} byte .metadata, decoded alone in {decode:?}): valid {valid:?}, one moved {bad:?}",
        md.len()
    );
    if !cfg!(debug_assertions) {
        assert!(valid.as_secs_f64() < 3.0 && bad.as_secs_f64() < 3.0, "{valid:?} {bad:?}");
    }
}
