//! The `dcp` command-line tool on small checkpoints written by libdcp (and by hand, for
//! layouts libdcp refuses to write): inspect (text and JSON), verify (a good checkpoint and
//! each planted fault), diff, convert to safetensors and back, ls and gc on a checkpoint series,
//! help and usage errors.

use dcp::comm::tcp::TcpComm;
use dcp::format::metadata::{default_path, EntryMeta, Metadata, StorageIndex, StorageInfo, TensorMeta};
use dcp::format::zipitem::{self, TensorItemLayout};
use dcp::{save, Checkpoint, CheckpointManager, Context, DType, ManagerPolicy, Region, SaveOptions, State, TensorView};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const BIG: usize = 5 * 1024 * 1024 + 100;

fn parse_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("invalid JSON: {e}: {text}"))
}

/// A safetensors file read through the `safetensors` crate, its dtypes as libdcp's.
mod safetensors {
    use ::safetensors::{Dtype, SafeTensors};
    use dcp::DType;

    pub struct TensorInfo {
        pub name: String,
        pub dtype: DType,
        pub shape: Vec<u64>,
        /// Byte range relative to the start of the data (after the header).
        pub start: u64,
        pub end: u64,
    }

    pub struct Header {
        pub tensors: Vec<TensorInfo>,
        pub metadata: Vec<(String, String)>,
        /// File offset of the data: 8 + the JSON's length.
        pub data_start: u64,
    }

    /// The JSON header's length.
    pub fn header_len(data: &[u8]) -> u64 {
        u64::from_le_bytes(data[..8].try_into().unwrap())
    }

    pub fn parse_header(data: &[u8]) -> Header {
        let (n, md) = SafeTensors::read_metadata(data).expect("a valid safetensors file");
        assert_eq!(n as u64, header_len(data));
        let dtype = |d: Dtype| match d {
            Dtype::F32 => DType::F32,
            Dtype::BF16 => DType::BF16,
            Dtype::I64 => DType::I64,
            Dtype::U8 => DType::U8,
            other => panic!("dtype {other} is not in the samples"),
        };
        let tensors = md
            .offset_keys()
            .into_iter()
            .map(|name| {
                let info = md.info(&name).unwrap();
                TensorInfo {
                    dtype: dtype(info.dtype),
                    shape: info.shape.iter().map(|&d| d as u64).collect(),
                    start: info.data_offsets.0 as u64,
                    end: info.data_offsets.1 as u64,
                    name,
                }
            })
            .collect();
        let mut metadata: Vec<(String, String)> = md.metadata().clone().unwrap_or_default().into_iter().collect();
        metadata.sort();
        Header {
            tensors,
            metadata,
            data_start: 8 + n as u64,
        }
    }
}

fn tmp(name: &str) -> PathBuf {
    // Under target/tmp, with fixed names: a rerun replaces what the last run left.
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    d
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn dcp(args: &[&str]) -> Out {
    let o = Command::new(env!("CARGO_BIN_EXE_dcp")).args(args).output().expect("runs dcp");
    Out {
        code: o.status.code().expect("exit code"),
        stdout: String::from_utf8(o.stdout).unwrap(),
        stderr: String::from_utf8(o.stderr).unwrap(),
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The sample: two ranks (threads over TCP). Rank 0 writes model.w (f32 4x3), model.b (bf16 5),
/// step (0-d i64), objects epoch and blob, and rows 0..2 of model.sharded (f32 4x6); rank 1 rows
/// 2..4 of model.sharded and model.big (u8, > 4 MiB: sidecar block checksums).
fn write_sample(dir: &Path) {
    let port = free_port();
    let handles: Vec<_> = (0..2)
        .map(|rank| {
            let dir = dir.to_path_buf();
            std::thread::spawn(move || {
                let comm = TcpComm::connect(rank, 2, "127.0.0.1", port, Duration::from_secs(30)).unwrap();
                let ctx = Context::with_communicator(Box::new(comm));
                let mut rows = f32_bytes(&(0..12).map(|i| (rank * 12 + i) as f32).collect::<Vec<_>>());
                let mut w = f32_bytes(&(0..12).map(|i| i as f32 * 0.5).collect::<Vec<_>>());
                let mut b = pattern(10, 3);
                let mut step = 42i64.to_le_bytes().to_vec();
                let mut big = pattern(BIG, 9);
                let mut st = State::new();
                st.add_tensor_chunk(
                    "model.sharded",
                    TensorView::from_bytes(&mut rows, DType::F32, &[2, 6]).unwrap(),
                    &[4, 6],
                    &[2 * rank as u64, 0],
                )
                .unwrap();
                if rank == 0 {
                    st.add_tensor("model.w", TensorView::from_bytes(&mut w, DType::F32, &[4, 3]).unwrap())
                        .unwrap();
                    st.add_tensor("model.b", TensorView::from_bytes(&mut b, DType::BF16, &[5]).unwrap())
                        .unwrap();
                    st.add_tensor("step", TensorView::from_bytes(&mut step, DType::I64, &[]).unwrap())
                        .unwrap();
                    st.add_int("epoch", 7).unwrap();
                    st.add_bytes("blob", b"\x00\x01payload\xff").unwrap();
                } else {
                    st.add_tensor("model.big", TensorView::from_bytes(&mut big, DType::U8, &[BIG as u64]).unwrap())
                        .unwrap();
                }
                save(&ctx, &st, dir.to_str().unwrap(), &SaveOptions::default()).unwrap();
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// The tensors write_sample writes, whole: (fqn, dtype, shape, bytes).
fn sample_tensors() -> Vec<(&'static str, DType, Vec<u64>, Vec<u8>)> {
    vec![
        (
            "model.sharded",
            DType::F32,
            vec![4, 6],
            f32_bytes(&(0..24).map(|i| i as f32).collect::<Vec<_>>()),
        ),
        (
            "model.w",
            DType::F32,
            vec![4, 3],
            f32_bytes(&(0..12).map(|i| i as f32 * 0.5).collect::<Vec<_>>()),
        ),
        ("model.b", DType::BF16, vec![5], pattern(10, 3)),
        ("step", DType::I64, vec![], 42i64.to_le_bytes().to_vec()),
        ("model.big", DType::U8, vec![BIG as u64], pattern(BIG, 9)),
    ]
}

/// A single-process checkpoint of the given tensors and int objects.
fn save_simple(dir: &Path, tensors: &mut [(&str, DType, Vec<u64>, Vec<u8>)], ints: &[(&str, i64)]) {
    let mut st = State::new();
    for (name, dtype, shape, data) in tensors.iter_mut() {
        st.add_tensor(name, TensorView::from_bytes(data, *dtype, shape).unwrap()).unwrap();
    }
    for (name, v) in ints {
        st.add_int(name, *v).unwrap();
    }
    save(&Context::local(), &st, s(dir), &SaveOptions::default()).unwrap();
}

/// Where a key's item is: (file name, item offset, item length).
fn item_of(dir: &Path, fqn: &str, chunk: Option<&[u64]>) -> (String, u64, u64) {
    let ck = Checkpoint::open(s(dir)).unwrap();
    let (_, info) = ck
        .metadata()
        .storage
        .iter()
        .find(|(i, _)| i.fqn == fqn && i.offset.as_deref() == chunk)
        .unwrap();
    (info.relative_path.clone(), info.offset, info.length)
}

/// Absolute file offset of a record's data inside a key's item.
fn record_offset(dir: &Path, fqn: &str, chunk: Option<&[u64]>, record_suffix: &str) -> (String, u64) {
    let (file, off, len) = item_of(dir, fqn, chunk);
    let all = std::fs::read(dir.join(&file)).unwrap();
    let item = &all[off as usize..(off + len) as usize];
    let loc = zipitem::locate_central_directory(item, len, "t").unwrap();
    let cd = &item[loc.offset as usize..(loc.offset + loc.size) as usize];
    let entries = zipitem::parse_central_directory(cd, loc, len, "t").unwrap();
    let e = entries.iter().find(|e| e.name.ends_with(record_suffix)).unwrap();
    let lh = &item[e.header_offset as usize..];
    (file, off + zipitem::local_data_offset(lh, e, len, "t").unwrap())
}

fn flip(path: &Path, at: u64) {
    let mut b = std::fs::read(path).unwrap();
    b[at as usize] ^= 0x40;
    std::fs::write(path, b).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn sample() -> PathBuf {
    // One sample per test binary run, copied by tests that damage it.
    static ONCE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let d = tmp("sample");
        write_sample(&d);
        d
    })
    .clone()
}

fn damaged(name: &str) -> PathBuf {
    let d = tmp(name);
    copy_dir(&sample(), &d);
    d
}

fn assert_fails_naming(out: &Out, needles: &[&str]) {
    assert_eq!(out.code, 1, "stdout: {}\nstderr: {}", out.stdout, out.stderr);
    let fail_lines: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert!(
        fail_lines.iter().any(|l| needles.iter().all(|n| l.contains(n))),
        "no FAIL line names all of {needles:?}:\n{}",
        out.stdout
    );
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(out.stderr.contains("problem"), "{}", out.stderr);
}

// ---------------------------------------------------------------------------------------------
// inspect
// ---------------------------------------------------------------------------------------------

#[test]
fn inspect_text() {
    let d = sample();
    let out = dcp(&["inspect", s(&d)]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.is_empty());
    let o = &out.stdout;
    assert!(
        o.contains(&format!(
            "writer      {} (metadata version 1.0.0, world size 2)",
            dcp::writer_version()
        )),
        "{o}"
    );
    assert!(o.contains("keys        7 (5 tensors of "), "{o}");
    let row = |key: &str| -> Vec<String> {
        let l = o
            .lines()
            .find(|l| l.split_whitespace().next() == Some(key))
            .unwrap_or_else(|| panic!("no row {key}: {o}"));
        l.split("  ").map(str::trim).filter(|c| !c.is_empty()).map(String::from).collect()
    };
    assert_eq!(row("model.sharded"), ["model.sharded", "tensor", "float32", "[4, 6]", "2", "96 B"]);
    assert_eq!(row("model.w"), ["model.w", "tensor", "float32", "[4, 3]", "1", "48 B"]);
    assert_eq!(row("model.b"), ["model.b", "tensor", "bfloat16", "[5]", "1", "10 B"]);
    assert_eq!(row("step"), ["step", "tensor", "int64", "[]", "1", "8 B"]);
    assert_eq!(
        row("model.big"),
        ["model.big", "tensor", "uint8", &format!("[{BIG}]"), "1", "5.0 MiB"]
    );
    assert_eq!(&row("epoch")[..5], ["epoch", "object", "-", "-", "-"]);
    // Per file and per rank.
    let file0 = o.lines().find(|l| l.starts_with("__0_0_")).unwrap();
    assert_eq!(file0.split_whitespace().nth(1), Some("0"));
    assert_eq!(file0.split_whitespace().nth(2), Some("6"), "{file0}"); // 5 keys + 1 chunk
    let file1 = o.lines().find(|l| l.starts_with("__1_0_")).unwrap();
    assert_eq!(file1.split_whitespace().nth(2), Some("2"), "{file1}");
    assert!(o.lines().any(|l| l.split_whitespace().take(3).eq(["1", "1", "2"])), "{o}");

    let out = dcp(&["inspect", s(&d), "--chunks"]);
    assert!(
        out.stdout.contains("    chunk offsets [2, 0] sizes [2, 6]: __1_0_"),
        "{}",
        out.stdout
    );
}

#[test]
fn inspect_json() {
    let d = sample();
    let out = dcp(&["inspect", "--json", s(&d), "--chunks"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v = parse_json(&out.stdout);
    assert_eq!(v.get("writer").unwrap().as_str(), Some(dcp::writer_version().as_str()));
    assert_eq!(v.get("metadata_version").unwrap().as_str(), Some("1.0.0"));
    assert_eq!(v.get("world_size").unwrap().as_u64(), Some(2));
    let keys = v.get("keys").unwrap().as_array().unwrap();
    let names: Vec<&str> = keys.iter().map(|k| k.get("key").unwrap().as_str().unwrap()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        ["blob", "epoch", "model.b", "model.big", "model.sharded", "model.w", "step"]
    );
    let key = |n: &str| keys.iter().find(|k| k.get("key").unwrap().as_str() == Some(n)).unwrap();
    let shape = |k: &Value| -> Vec<u64> {
        k.get("shape")
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect()
    };
    let sh = key("model.sharded");
    assert_eq!(sh.get("kind").unwrap().as_str(), Some("tensor"));
    assert_eq!(sh.get("dtype").unwrap().as_str(), Some("float32"));
    assert_eq!(shape(sh), [4, 6]);
    assert_eq!(sh.get("chunks").unwrap().as_u64(), Some(2));
    assert_eq!(sh.get("bytes").unwrap().as_u64(), Some(96));
    let chunks = sh.get("chunk_list").unwrap().as_array().unwrap();
    let files: Vec<&str> = chunks.iter().map(|c| c.get("file").unwrap().as_str().unwrap()).collect();
    assert_eq!(files.iter().map(|f| &f[..6]).collect::<Vec<_>>(), ["__0_0_", "__1_0_"]);
    assert_eq!(shape(key("step")), Vec::<u64>::new());
    assert_eq!(key("model.b").get("dtype").unwrap().as_str(), Some("bfloat16"));
    assert_eq!(key("epoch").get("kind").unwrap().as_str(), Some("object"));
    assert_eq!(key("epoch").get("dtype"), Some(&Value::Null));
    let fs = v.get("files").unwrap().as_array().unwrap();
    assert_eq!(fs.len(), 2);
    for f in fs {
        let name = f.get("name").unwrap().as_str().unwrap();
        let len = std::fs::metadata(d.join(name)).unwrap().len();
        assert_eq!(f.get("size").unwrap().as_u64(), Some(len));
    }
    let ranks = v.get("ranks").unwrap().as_array().unwrap();
    assert_eq!(
        ranks.iter().map(|r| r.get("rank").unwrap().as_u64().unwrap()).collect::<Vec<_>>(),
        [0, 1]
    );
    let totals = v.get("totals").unwrap();
    assert_eq!(totals.get("keys").unwrap().as_u64(), Some(7));
    assert_eq!(totals.get("objects").unwrap().as_u64(), Some(2));
}

#[test]
fn inspect_json_escapes_names() {
    let d = tmp("escape");
    let name = "we\"ird\\key\n\t\u{1}é";
    save_simple(&d, &mut [(name, DType::U8, vec![2], vec![1, 2])], &[]);
    let out = dcp(&["inspect", s(&d), "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v = parse_json(&out.stdout);
    assert_eq!(
        v.get("keys").unwrap().as_array().unwrap()[0].get("key").unwrap().as_str(),
        Some(name)
    );
}

// ---------------------------------------------------------------------------------------------
// verify
// ---------------------------------------------------------------------------------------------

#[test]
fn verify_good_checkpoint() {
    let out = dcp(&["verify", s(&sample())]);
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.starts_with("ok: "), "{}", out.stdout);
    assert!(out.stdout.contains("2 sidecar blocks and 9 pickles checked"), "{}", out.stdout);
    assert!(out.stderr.is_empty(), "progress must be silent in pipes: {:?}", out.stderr);
}

#[test]
fn verify_missing_data_file() {
    let d = damaged("missing-file");
    let name = named(&d, "__1_0_");
    std::fs::remove_file(d.join(&name)).unwrap();
    let out = dcp(&["verify", s(&d)]);
    assert_fails_naming(&out, &[&name, "missing", "model.sharded"]);
}

#[test]
fn verify_truncated_data_file() {
    let d = damaged("truncated");
    let name = named(&d, "__0_0_");
    let path = d.join(&name);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let out = dcp(&["verify", s(&d)]);
    assert_fails_naming(&out, &[&name, "truncated", &format!("{}", len - 100)]);
    // The last item of the file runs past its end: named with key and offset.
    let ck = Checkpoint::open(s(&d)).unwrap();
    let (idx, info) = ck
        .metadata()
        .storage
        .iter()
        .filter(|(_, i)| i.relative_path == name)
        .max_by_key(|(_, i)| i.offset)
        .unwrap();
    assert_fails_naming(
        &out,
        &[
            &format!("key {:?}", idx.fqn),
            &format!("{name} at offset {}", info.offset),
            "runs past the end",
        ],
    );
}

#[test]
fn verify_flipped_payload_byte() {
    let d = damaged("flip-payload");
    let (file, at) = record_offset(&d, "model.w", Some(&[0, 0]), "data/0");
    flip(&d.join(&file), at + 5);
    let out = dcp(&["verify", s(&d)]);
    assert_fails_naming(&out, &["key \"model.w\"", &format!("{file} at offset {at}"), "data/0", "CRC-32"]);
    // A block of a large tensor: the sidecar's block CRC names the 4 MiB block.
    let (file, at) = record_offset(&d, "model.big", Some(&[0]), "data/0");
    flip(&d.join(&file), at + (4 << 20) + 3);
    let out = dcp(&["verify", s(&d)]);
    assert_fails_naming(
        &out,
        &[
            "key \"model.big\"",
            &format!("{file} at offset {}", at + (4 << 20)),
            "sidecar block 1",
        ],
    );
    assert_fails_naming(&out, &["key \"model.big\"", &format!("{file} at offset {at}"), "data/0"]);
}

#[test]
fn verify_flipped_small_record() {
    let d = damaged("flip-pkl");
    let (file, at) = record_offset(&d, "epoch", None, "data.pkl");
    flip(&d.join(&file), at + 2);
    let out = dcp(&["verify", s(&d)]);
    assert_fails_naming(&out, &["key \"epoch\"", &format!("{file} at offset {at}"), "data.pkl", "CRC-32"]);
    // A tensor item's data.pkl too.
    let (file, at) = record_offset(&d, "model.sharded", Some(&[2, 0]), "data.pkl");
    flip(&d.join(&file), at + 10);
    let out = dcp(&["verify", s(&d)]);
    assert_fails_naming(&out, &["key \"model.sharded\"", &format!("{file} at offset {at}"), "data.pkl"]);
}

#[test]
fn verify_without_metadata() {
    let d = damaged("no-metadata");
    std::fs::remove_file(d.join(".metadata")).unwrap();
    let out = dcp(&["verify", s(&d)]);
    assert_fails_naming(&out, &[".metadata", "not committed"]);
    let empty = tmp("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_fails_naming(&dcp(&["verify", s(&empty)]), &[".metadata", "not a checkpoint"]);
}

#[test]
fn verify_damaged_metadata_against_sidecar() {
    let d = damaged("bad-metadata");
    let md = d.join(".metadata");
    let len = std::fs::metadata(&md).unwrap().len();
    flip(&md, len / 2);
    let out = dcp(&["verify", s(&d)]);
    assert_eq!(out.code, 1);
    assert!(
        out.stdout.lines().any(|l| l.starts_with("FAIL: .metadata"))
            && (out.stdout.contains("sidecar records") || out.stdout.contains("does not match sidecar .libdcp_")),
        "{}",
        out.stdout
    );
}

/// Writes a torch-like checkpoint (no sidecar) by hand: one tensor `w` of f32 [4, 3] with the
/// given chunks (values: the global row-major index), all in `__0_0.distcp`.
fn write_by_hand(dir: &Path, chunks: &[Region]) {
    std::fs::create_dir_all(dir).unwrap();
    let shape = [4u64, 3];
    let mut file = Vec::new();
    let mut md = Metadata {
        version: Some("1.0.0".into()),
        ..Default::default()
    };
    for (i, c) in chunks.iter().enumerate() {
        while file.len() % 64 != 0 {
            file.push(0);
        }
        let start = file.len() as u64;
        let mut payload = Vec::new();
        for r in c.offsets[0]..c.offsets[0] + c.sizes[0] {
            for col in c.offsets[1]..c.offsets[1] + c.sizes[1] {
                payload.extend_from_slice(&((r * 3 + col) as f32).to_le_bytes());
            }
        }
        let l = TensorItemLayout::new(DType::F32, &c.sizes, start, 64, i as u64);
        file.extend_from_slice(&l.prefix);
        file.extend_from_slice(&payload);
        file.extend_from_slice(&l.trailer(crc32fast_hash(&payload)));
        md.storage.push((
            StorageIndex {
                fqn: "w".into(),
                offset: Some(c.offsets.clone()),
                index: Some(i as u64),
            },
            StorageInfo {
                relative_path: "__0_0.distcp".into(),
                offset: start,
                length: l.len(),
            },
        ));
    }
    md.entries.push((
        "w".into(),
        EntryMeta::Tensor(TensorMeta {
            dtype: Some(DType::F32),
            dtype_name: "float32".into(),
            size: shape.to_vec(),
            chunks: chunks.to_vec(),
        }),
    ));
    md.planner_data.push(("w".into(), default_path("w")));
    std::fs::write(dir.join("__0_0.distcp"), file).unwrap();
    std::fs::write(dir.join(".metadata"), md.encode()).unwrap();
}

/// CRC-32 (IEEE), bitwise: the test does not depend on the crate's checksum code.
fn crc32fast_hash(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn region(o: [u64; 2], s: [u64; 2]) -> Region {
    Region::new(o.to_vec(), s.to_vec()).unwrap()
}

#[test]
fn verify_hand_written_chunks() {
    // Well tiled, in two chunks: passes, and reads back whole.
    let good = tmp("hand-good");
    write_by_hand(&good, &[region([0, 0], [2, 3]), region([2, 0], [2, 3])]);
    let out = dcp(&["verify", s(&good)]);
    assert_eq!(out.code, 0, "{}", out.stdout);
    assert!(out.stdout.contains("no sidecar"), "{}", out.stdout);
    let (_, _, bytes) = Checkpoint::open(s(&good)).unwrap().read_tensor("w").unwrap();
    assert_eq!(bytes, f32_bytes(&(0..12).map(|i| i as f32).collect::<Vec<_>>()));

    let overlap = tmp("hand-overlap");
    write_by_hand(&overlap, &[region([0, 0], [3, 3]), region([2, 0], [2, 3])]);
    let out = dcp(&["verify", s(&overlap)]);
    assert_fails_naming(
        &out,
        &[
            "key \"w\"",
            "chunks 0 (offsets [0, 0], sizes [3, 3]) and 1 (offsets [2, 0], sizes [2, 3]) overlap",
        ],
    );

    let gap = tmp("hand-gap");
    write_by_hand(&gap, &[region([0, 0], [2, 3]), region([2, 0], [2, 2])]);
    let out = dcp(&["verify", s(&gap)]);
    assert_fails_naming(&out, &["key \"w\"", "gap", "[2, 2]"]);
}

// ---------------------------------------------------------------------------------------------
// diff
// ---------------------------------------------------------------------------------------------

fn diff_sample(dir: &Path, w0: f32, extra: Option<&str>, b_dtype: DType) {
    let mut tensors = vec![
        ("w", DType::F32, vec![2, 2], f32_bytes(&[w0, 1.0, 2.0, 3.0])),
        ("b", b_dtype, vec![2], vec![0x80, 0x3f, 0x00, 0x40]),
        (
            "i",
            DType::I32,
            vec![3],
            [1i32, -5, 9].iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
    ];
    if let Some(e) = extra {
        tensors.push((e, DType::U8, vec![1], vec![1]));
    }
    save_simple(dir, &mut tensors, &[("epoch", 3)]);
}

#[test]
fn diff_equal_and_different() {
    let a = tmp("diff-a");
    let a2 = tmp("diff-a2");
    let b = tmp("diff-b");
    diff_sample(&a, 0.0, Some("only_a"), DType::BF16);
    diff_sample(&a2, 0.0, Some("only_a"), DType::BF16);
    diff_sample(&b, 0.25, Some("only_b"), DType::F16);

    let out = dcp(&["diff", s(&a), s(&a2)]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(out.stdout.trim(), "identical: 5 keys");

    let out = dcp(&["diff", s(&a), s(&b)]);
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    let o = &out.stdout;
    assert!(o.contains("only in A: only_a"), "{o}");
    assert!(o.contains("only in B: only_b"), "{o}");
    assert!(o.contains("differs: w: 1 of 4 elements differ, max abs diff 0.25"), "{o}");
    assert!(o.contains("differs: b: dtype bfloat16 (A) vs float16 (B)"), "{o}");
    assert!(
        o.lines().last().unwrap().contains("2 equal, 2 differ, 1 only in A, 1 only in B"),
        "{o}"
    );
    assert!(out.stderr.is_empty(), "{}", out.stderr);

    // A damaged key is reported and the comparison goes on.
    let bad = damaged("diff-damaged");
    let (file, at) = record_offset(&bad, "model.w", Some(&[0, 0]), "data/0");
    flip(&bad.join(&file), at + 1);
    let out = dcp(&["diff", s(&sample()), s(&bad)]);
    assert_eq!(out.code, 1);
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("cannot compare: key \"model.w\"") && l.contains("checksum")),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.ends_with("6 equal, 1 differ, 0 only in A, 0 only in B\n"),
        "{}",
        out.stdout
    );

    // The same values chunked differently are equal; the diff compares values, not layout.
    let hand = tmp("diff-hand");
    write_by_hand(&hand, &[region([0, 0], [2, 3]), region([2, 0], [2, 3])]);
    let whole = tmp("diff-whole");
    save_simple(
        &whole,
        &mut [(
            "w",
            DType::F32,
            vec![4, 3],
            f32_bytes(&(0..12).map(|i| i as f32).collect::<Vec<_>>()),
        )],
        &[],
    );
    let out = dcp(&["diff", s(&hand), s(&whole)]);
    assert_eq!(out.code, 0, "{}", out.stdout);
}

// ---------------------------------------------------------------------------------------------
// convert
// ---------------------------------------------------------------------------------------------

#[test]
fn convert_roundtrip_is_byte_exact() {
    let src = sample();
    let st = tmp("st");
    let out = dcp(&["convert", s(&src), "--to", "safetensors", s(&st), "--max-shard-size", "1MB"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("note: skipped 2 objects"), "{}", out.stderr);
    // model.big (5 MiB) alone in a file; the small tensors share the others.
    let index = parse_json(&std::fs::read_to_string(st.join("model.safetensors.index.json")).unwrap());
    let map = index.get("weight_map").unwrap().as_object().unwrap();
    assert_eq!(map.len(), 5);
    let file_of = |name: &str| map.iter().find(|(k, _)| *k == name).unwrap().1.as_str().unwrap();
    assert_eq!(map.iter().filter(|(_, f)| f.as_str() == Some(file_of("model.big"))).count(), 1);
    let mut files: Vec<&str> = map.iter().map(|(_, f)| f.as_str().unwrap()).collect();
    files.sort();
    files.dedup();
    assert!(files.len() >= 2);
    for (i, f) in files.iter().enumerate() {
        assert_eq!(*f, format!("model-{:05}-of-{:05}.safetensors", i + 1, files.len()));
    }
    let written = sample_tensors();
    let mut total = 0;
    for (name, file) in map {
        let data = std::fs::read(st.join(file.as_str().unwrap())).unwrap();
        let n = safetensors::header_len(&data);
        assert_eq!((8 + n) % 8, 0);
        let h = safetensors::parse_header(&data);
        let t = h.tensors.iter().find(|t| &t.name == name).unwrap();
        let (_, dtype, shape, want) = written.iter().find(|w| w.0 == name).unwrap();
        assert_eq!((t.dtype, &t.shape), (*dtype, shape));
        assert_eq!(
            &data[(h.data_start + t.start) as usize..(h.data_start + t.end) as usize],
            &want[..],
            "{name}"
        );
        assert_eq!(h.metadata, [("format".to_string(), "pt".to_string())]);
        total += want.len() as u64;
    }
    assert_eq!(index.get("metadata").unwrap().get("total_size").unwrap().as_u64(), Some(total));

    // Back to DCP: every tensor byte for byte.
    let back = tmp("st-back");
    let out = dcp(&[
        "convert",
        &st.join("model.safetensors.index.json").to_string_lossy(),
        "--from",
        "safetensors",
        s(&back),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let cb = Checkpoint::open(s(&back)).unwrap();
    assert_eq!(cb.len(), 5);
    for (name, dtype, shape, bytes) in &written {
        assert_eq!(cb.read_tensor(name).unwrap(), (*dtype, shape.clone(), bytes.clone()), "{name}");
    }
    assert_eq!(dcp(&["verify", s(&back)]).code, 0);
    // A second conversion into the same place needs --overwrite.
    let again = dcp(&["convert", s(&st), "--from", "safetensors", s(&back)]);
    assert_eq!(again.code, 1);
    assert!(again.stderr.contains("--overwrite"), "{}", again.stderr);
    assert_eq!(dcp(&["convert", s(&st), "--from", "safetensors", s(&back), "--overwrite"]).code, 0);
}

#[test]
fn convert_filter_strip_and_cast() {
    let src = sample();
    let st = tmp("st-cast");
    let out = dcp(&[
        "convert",
        s(&src),
        "--to=safetensors",
        s(&st),
        "--filter",
        "model.",
        "--strip-prefix",
        "model.",
        "--dtype",
        "bf16",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let data = std::fs::read(st.join("model.safetensors")).unwrap();
    let h = safetensors::parse_header(&data);
    let mut names: Vec<&str> = h.tensors.iter().map(|t| t.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["b", "big", "sharded", "w"]);
    // The f32 values (0.5 * i, and the integers 0..24 of the two chunks of model.sharded) are
    // exact in bf16: the top halves of the f32 values. bf16 and integer tensors are not cast.
    for (name, dtype, shape, bytes) in sample_tensors() {
        let Some(short) = name.strip_prefix("model.") else { continue };
        let t = h.tensors.iter().find(|t| t.name == short).unwrap();
        let got = &data[(h.data_start + t.start) as usize..(h.data_start + t.end) as usize];
        let (want_dtype, want) = if dtype == DType::F32 {
            let top: Vec<u8> = bytes
                .chunks(4)
                .flat_map(|c| ((u32::from_le_bytes(c.try_into().unwrap()) >> 16) as u16).to_le_bytes())
                .collect();
            (DType::BF16, top)
        } else {
            (dtype, bytes)
        };
        assert_eq!((t.dtype, &t.shape), (want_dtype, &shape), "{name}");
        assert!(got == &want[..], "{name}: converted bytes differ");
    }
    // Offsets are aligned to the element size.
    for t in &h.tensors {
        assert_eq!((h.data_start + t.start) % t.dtype.size() as u64, 0, "{}", t.name);
    }
    // Existing output is not replaced without --overwrite.
    let out = dcp(&["convert", s(&src), "--to", "safetensors", s(&st)]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("--overwrite"), "{}", out.stderr);
    assert_eq!(dcp(&["convert", s(&src), "--to", "safetensors", s(&st), "--overwrite"]).code, 0);
    let names: Vec<String> = std::fs::read_dir(&st)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

// ---------------------------------------------------------------------------------------------
// help and usage
// ---------------------------------------------------------------------------------------------

#[test]
fn help_on_every_subcommand() {
    for cmd in ["inspect", "verify", "diff", "convert", "ls", "gc"] {
        for flag in ["--help", "-h"] {
            let out = dcp(&[cmd, flag]);
            assert_eq!(out.code, 0, "{cmd} {flag}");
            assert!(out.stdout.starts_with(&format!("usage: dcp {cmd}")), "{}", out.stdout);
        }
    }
    for top in [&["--help"][..], &["help"], &["help", "verify"]] {
        let out = dcp(top);
        assert_eq!(out.code, 0);
        assert!(out.stdout.starts_with("usage: dcp"), "{}", out.stdout);
    }
}

#[test]
fn usage_errors_exit_2_with_one_line() {
    let d = sample();
    let cases: Vec<Vec<&str>> = vec![
        vec![],
        vec!["frobnicate"],
        vec!["inspect"],
        vec!["inspect", "a", "b"],
        vec!["inspect", s(&d), "--bogus"],
        vec!["verify"],
        vec!["diff", s(&d)],
        vec!["convert", s(&d), "out"],
        vec!["convert", s(&d), "--to", "onnx", "out"],
        vec!["convert", s(&d), "--to", "safetensors", "out", "--dtype", "int4"],
        vec!["convert", s(&d), "--to", "safetensors", "out", "--max-shard-size", "lots"],
        vec!["convert", s(&d), "--to", "safetensors"],
        vec!["convert", "--from", "safetensors", "out"],
        vec!["convert", s(&d), "--to", "safetensors", "out", "--filter"],
        vec!["ls"],
        vec!["ls", "a", "b"],
        vec!["gc", s(&d)],
        vec!["gc", s(&d), "--keep-last", "0"],
        vec!["gc", s(&d), "--keep-last", "-1"],
        vec!["gc", s(&d), "--keep-last", "1", "--keep-every", "0"],
    ];
    for args in cases {
        let out = dcp(&args);
        assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
        assert_eq!(out.stderr.lines().count(), 1, "{args:?}: {}", out.stderr);
        assert!(out.stderr.starts_with("dcp"), "{}", out.stderr);
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn failures_exit_1_with_one_line() {
    let missing = tmp("nothing-here");
    for args in [
        vec!["inspect", s(&missing)],
        vec!["diff", s(&missing), s(&missing)],
        vec!["convert", s(&missing), "--to", "safetensors", "/tmp/x"],
        vec!["convert", "/nonexistent.safetensors", "--from", "safetensors", s(&missing)],
        vec!["ls", s(&missing)],
        vec!["gc", s(&missing), "--keep-last", "1"],
    ] {
        let out = dcp(&args);
        assert_eq!(out.code, 1, "{args:?}");
        assert_eq!(out.stderr.lines().count(), 1, "{args:?}: {}", out.stderr);
    }
    // A tensor-only item damaged: read errors from diff/convert name the key.
    let d = damaged("flip-for-convert");
    let (file, at) = record_offset(&d, "model.w", Some(&[0, 0]), "data/0");
    flip(&d.join(&file), at);
    let out = dcp(&["convert", s(&d), "--to", "safetensors", s(&tmp("st-bad"))]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("model.w") && out.stderr.contains("checksum"), "{}", out.stderr);
}

// ---------------------------------------------------------------------------------------------
// hostile sizes, small pieces, output files
// ---------------------------------------------------------------------------------------------

/// `dcp` with its address space limited to `bytes` (an allocation from a claimed size fails).
fn dcp_limited(args: &[&str], env: &[(&str, &str)], bytes: u64) -> Out {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dcp"));
    cmd.args(args).envs(env.iter().copied());
    // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else of the parent.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = cmd.output().expect("runs dcp");
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8(o.stdout).unwrap(),
        stderr: String::from_utf8(o.stderr).unwrap(),
    }
}

/// The hand-written checkpoint of `w`, its `.metadata` then edited to claim `shape` for `w` with
/// one chunk of that shape (300 bytes claiming 256 GiB, say).
fn write_claiming(dir: &Path, shape: &[u64]) {
    write_by_hand(dir, &[region([0, 0], [4, 3])]);
    let mut md = Metadata::decode(&std::fs::read(dir.join(".metadata")).unwrap(), "md").unwrap();
    let EntryMeta::Tensor(t) = &mut md.entries[0].1 else {
        panic!("w is a tensor")
    };
    t.size = shape.to_vec();
    t.chunks = vec![Region::full(shape)];
    md.storage[0].0.offset = Some(vec![0; shape.len()]);
    std::fs::write(dir.join(".metadata"), md.encode()).unwrap();
}

const LIMIT: u64 = 1 << 30;

#[test]
fn convert_and_diff_refuse_sizes_the_files_do_not_hold() {
    let huge = tmp("claim-huge");
    write_claiming(&huge, &[1 << 18, 1 << 16]); // f32: 64 GiB
    assert!(std::fs::metadata(huge.join(".metadata")).unwrap().len() < 1000);
    let st = tmp("claim-huge-st");
    let out = dcp_limited(&["convert", s(&huge), "--to", "safetensors", s(&st)], &[], LIMIT);
    assert_eq!(out.code, 1, "{} {}", out.stdout, out.stderr);
    for needle in ["key \"w\"", "__0_0.distcp", "needs 68719476736 bytes"] {
        assert!(out.stderr.contains(needle), "{needle}: {}", out.stderr);
    }
    // Nothing left behind: no output, no .partial.
    let left: Vec<_> = std::fs::read_dir(&st)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");

    let good = tmp("claim-good");
    write_by_hand(&good, &[region([0, 0], [4, 3])]);
    let out = dcp_limited(&["diff", s(&good), s(&huge)], &[], LIMIT);
    assert_eq!(out.code, 1, "{} {}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("differs: w: shape [4, 3] (A) vs [262144, 65536] (B)"),
        "{}",
        out.stdout
    );
    let out = dcp_limited(&["diff", s(&huge), s(&huge)], &[], LIMIT);
    assert_eq!(out.code, 1, "{} {}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("cannot compare") && out.stdout.contains("__0_0.distcp"),
        "{}",
        out.stdout
    );

    // An item claimed past the end of its file: named with the file.
    let past = tmp("claim-past");
    write_by_hand(&past, &[region([0, 0], [4, 3])]);
    let mut md = Metadata::decode(&std::fs::read(past.join(".metadata")).unwrap(), "md").unwrap();
    md.storage[0].1.length = 1 << 40;
    std::fs::write(past.join(".metadata"), md.encode()).unwrap();
    let st2 = tmp("claim-past-st");
    let out = dcp_limited(&["convert", s(&past), "--to", "safetensors", s(&st2)], &[], LIMIT);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("runs past the end"), "{}", out.stderr);
    for d in [huge, st, good, past, st2] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn convert_and_diff_in_small_pieces_are_exact() {
    // 1000-byte pieces: model.big (5 MiB, sidecar blocks) and the sharded tensor in many pieces.
    let env = [("DCP_CLI_PIECE_BYTES", "1000")];
    let src = sample();
    let st = tmp("st-pieces");
    let out = dcp_limited(&["convert", s(&src), "--to", "safetensors", s(&st)], &env, LIMIT);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let data = std::fs::read(st.join("model.safetensors")).unwrap();
    let h = safetensors::parse_header(&data);
    for (name, _, _, want) in sample_tensors() {
        let t = h.tensors.iter().find(|t| t.name == name).unwrap();
        assert_eq!(
            &data[(h.data_start + t.start) as usize..(h.data_start + t.end) as usize],
            &want[..],
            "{name}"
        );
    }
    // Torch-like (no sidecar): large tensors are checked whole first, then read in pieces.
    let hand = tmp("hand-pieces");
    write_by_hand(&hand, &[region([0, 0], [1, 3]), region([1, 0], [3, 3])]);
    let st_hand = tmp("hand-pieces-st");
    let out = dcp_limited(
        &["convert", s(&hand), "--to", "safetensors", s(&st_hand)],
        &[("DCP_CLI_PIECE_BYTES", "8")],
        LIMIT,
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let data = std::fs::read(st_hand.join("model.safetensors")).unwrap();
    assert!(data.ends_with(&f32_bytes(&(0..12).map(|i| i as f32).collect::<Vec<_>>())));
    // A flipped payload byte is caught by that check.
    let (file, at) = record_offset(&hand, "w", Some(&[1, 0]), "/data/0");
    flip(&hand.join(file), at + 5);
    let st_bad = tmp("hand-pieces-bad");
    let out = dcp_limited(
        &["convert", s(&hand), "--to", "safetensors", s(&st_bad)],
        &[("DCP_CLI_PIECE_BYTES", "8")],
        LIMIT,
    );
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("CRC-32"), "{}", out.stderr);
    assert!(
        std::fs::read_dir(&st_bad).map_or(true, |mut d| d.next().is_none()),
        "a .partial was left"
    );

    // diff in 4-byte pieces: one element per piece.
    let (a, a2, b) = (tmp("diff-pieces-a"), tmp("diff-pieces-a2"), tmp("diff-pieces-b"));
    diff_sample(&a, 0.0, None, DType::BF16);
    diff_sample(&a2, 0.0, None, DType::BF16);
    diff_sample(&b, 0.25, None, DType::BF16);
    let env = [("DCP_CLI_PIECE_BYTES", "4")];
    let out = dcp_limited(&["diff", s(&a), s(&a2)], &env, LIMIT);
    assert_eq!((out.code, out.stdout.trim()), (0, "identical: 4 keys"), "{}", out.stderr);
    let out = dcp_limited(&["diff", s(&a), s(&b)], &env, LIMIT);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stdout.contains("differs: w: 1 of 4 elements differ, max abs diff 0.25"),
        "{}",
        out.stdout
    );
    let _ = std::fs::remove_dir_all(a2);
    for d in [st, hand, st_hand, st_bad, a, b] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn convert_output_is_created_exclusively() {
    let src = sample();
    let st = tmp("st-partials");
    std::fs::create_dir_all(&st).unwrap();
    // A stale .partial that is a symlink to a file outside: refused, the file untouched.
    let victim = tmp("st-partials-victim");
    std::fs::create_dir_all(&victim).unwrap();
    std::fs::write(victim.join("precious"), b"keep me").unwrap();
    let partial = st.join(".model.safetensors.partial");
    std::os::unix::fs::symlink(victim.join("precious"), &partial).unwrap();
    let out = dcp(&["convert", s(&src), "--to", "safetensors", s(&st)]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains(".model.safetensors.partial exists and is not a regular file"),
        "{}",
        out.stderr
    );
    assert_eq!(std::fs::read(victim.join("precious")).unwrap(), b"keep me");
    assert!(std::fs::symlink_metadata(&partial).unwrap().file_type().is_symlink());
    // A stale regular .partial (a crash) is replaced; the output appears, no .partial stays.
    std::fs::remove_file(&partial).unwrap();
    std::fs::write(&partial, b"stale").unwrap();
    let out = dcp(&["convert", s(&src), "--to", "safetensors", s(&st)]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let mut names: Vec<String> = std::fs::read_dir(&st)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["model.safetensors", "model.safetensors.index.json"]);
    for d in [st, victim] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// The one file of `dir` whose name starts with `prefix` (file names carry a per-save token).
fn named(dir: &std::path::Path, prefix: &str) -> String {
    let names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(prefix))
        .collect();
    assert_eq!(names.len(), 1, "{prefix}: {names:?}");
    names.into_iter().next().unwrap()
}

/// A safetensors file of `header` (JSON text) with `data` after it; `claimed_len` replaces the
/// header's true length in the 8-byte prefix when given.
fn write_safetensors(path: &Path, header: &str, data: &[u8], claimed_len: Option<u64>) {
    let mut bytes = claimed_len.unwrap_or(header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

/// Hostile safetensors inputs to `dcp convert --from safetensors` (the reader is the
/// safetensors crate behind our own header-length check): each fails promptly with one line
/// naming the file, under a 1 GiB address-space limit (a claimed size that were allocated would
/// fail as a crash, not as this error), and leaves no checkpoint behind.
#[test]
fn convert_from_safetensors_refuses_hostile_files() {
    let dir = tmp("st-hostile");
    std::fs::create_dir_all(&dir).unwrap();
    let w = r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#;
    let cases: [(&str, String, Vec<u8>, Option<u64>); 7] = [
        ("header-claims-2^60", w.into(), vec![0; 16], Some(1 << 60)),
        ("header-past-the-file", w.into(), vec![0; 16], Some(w.len() as u64 + 17)),
        ("not-json", "{\"w\": [".into(), vec![0; 16], None),
        (
            "offsets-past-the-data",
            r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#.into(),
            vec![0; 8],
            None,
        ),
        (
            "size-not-shape",
            r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}}"#.into(),
            vec![0; 12],
            None,
        ),
        (
            "overlapping",
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#.into(),
            vec![0; 24],
            None,
        ),
        (
            "shape-overflows",
            r#"{"w":{"dtype":"F32","shape":[4611686018427387904,4611686018427387904],"data_offsets":[0,16]}}"#.into(),
            vec![0; 16],
            None,
        ),
    ];
    for (name, header, data, claimed) in cases {
        let file = dir.join(format!("{name}.safetensors"));
        write_safetensors(&file, &header, &data, claimed);
        let out_dir = dir.join(format!("{name}-out"));
        let t0 = std::time::Instant::now();
        let out = dcp_limited(&["convert", s(&file), "--from", "safetensors", s(&out_dir)], &[], LIMIT);
        assert_eq!(out.code, 1, "{name}: {} {}", out.stdout, out.stderr);
        assert!(out.stderr.contains(&format!("{name}.safetensors")), "{name}: {}", out.stderr);
        assert_eq!(out.stderr.trim_end().lines().count(), 1, "{name}: {}", out.stderr);
        assert!(t0.elapsed().as_secs() < 10, "{name}: took {:?}", t0.elapsed());
        assert!(!out_dir.join(".metadata").exists(), "{name}: a checkpoint was committed");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// ls and gc: a checkpoint series saved by CheckpointManager
// ---------------------------------------------------------------------------------------------

fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step-{step:08}"))
}

/// The data files of a step.
fn data_files(root: &Path, step: u64) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(step_dir(root, step))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "distcp"))
        .collect();
    files.sort();
    files
}

/// Steps 0..=4 saved by a manager (which then gives the root up): 0, 1 and 2 whole, 3 with a
/// truncated data file (damaged), 4 without `.metadata` (uncommitted).
fn series(name: &str) -> PathBuf {
    let root = tmp(name);
    let ctx = Context::local();
    let mut manager = CheckpointManager::open(&ctx, s(&root), ManagerPolicy::default().keep_last(10)).unwrap();
    for step in 0..5u64 {
        let mut weights = vec![step as f32; 64];
        let mut st = State::new();
        st.add_tensor("w", TensorView::from_slice_mut(&mut weights, &[8, 8]).unwrap())
            .unwrap();
        st.add_int("step", step as i64).unwrap();
        manager.save(step, &st).unwrap();
    }
    manager.finish().unwrap();
    let torn = &data_files(&root, 3)[0];
    let len = std::fs::metadata(torn).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(torn)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    std::fs::remove_file(step_dir(&root, 4).join(".metadata")).unwrap();
    root
}

/// `(step, status column, latest mark)` of each row of `dcp ls`.
fn ls_rows(stdout: &str) -> Vec<(u64, String, bool)> {
    stdout
        .lines()
        .filter_map(|l| {
            let mark = l.starts_with('*');
            let cols: Vec<&str> = l.get(1..)?.split_whitespace().collect();
            let step = cols.first()?.parse().ok()?;
            // step, size (number and unit), age, then the status.
            Some((step, cols[4..].join(" "), mark))
        })
        .collect()
}

fn ls_steps(root: &Path) -> Vec<u64> {
    let out = dcp(&["ls", s(root)]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    ls_rows(&out.stdout).iter().map(|r| r.0).collect()
}

#[test]
fn ls_names_each_status_and_the_latest() {
    let root = series("ls-series");
    let out = dcp(&["ls", s(&root)]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let rows = ls_rows(&out.stdout);
    assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), [0, 1, 2, 3, 4], "{}", out.stdout);
    for (step, status, _) in &rows[..3] {
        assert_eq!(status, "whole", "step {step}: {}", out.stdout);
    }
    assert!(rows[3].1.starts_with("damaged (torn): data file"), "{}", out.stdout);
    assert!(rows[3].1.contains("bytes"), "{}", out.stdout);
    assert!(rows[4].1.starts_with("uncommitted (files but no .metadata"), "{}", out.stdout);
    assert_eq!(rows.iter().filter(|r| r.2).map(|r| r.0).collect::<Vec<_>>(), [2], "{}", out.stdout);
    assert!(out.stdout.contains("latest: step 2 ("), "{}", out.stdout);

    let out = dcp(&["ls", s(&root), "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v = parse_json(&out.stdout);
    assert_eq!(v["root"], s(&root));
    assert_eq!(v["latest"], 2);
    let steps = v["steps"].as_array().unwrap();
    let field = |k: &str| steps.iter().map(|s| s[k].clone()).collect::<Vec<Value>>();
    assert_eq!(field("step"), [0, 1, 2, 3, 4].map(Value::from));
    assert_eq!(
        field("status"),
        ["whole", "whole", "whole", "damaged", "uncommitted"].map(Value::from)
    );
    assert_eq!(
        field("damage"),
        [Value::Null, Value::Null, Value::Null, "size_mismatch".into(), Value::Null]
    );
    assert_eq!(field("latest"), [false, false, true, false, false].map(Value::from));
    for st in steps {
        assert!(st["bytes"].as_u64().unwrap() > 0, "{st}");
        assert!(st["modified_unix_seconds"].as_u64().is_some(), "{st}");
        assert_eq!(st["message"].as_str().unwrap().is_empty(), st["status"] == "whole", "{st}");
    }
    assert_eq!(steps[2]["location"], s(&step_dir(&root, 2)));
}

#[test]
fn ls_verify_checks_every_crc() {
    let root = series("ls-verify");
    // A flipped payload byte in step 2: the cheap check passes it, the CRCs do not.
    let dir = step_dir(&root, 2);
    let (file, at) = record_offset(&dir, "w", Some(&[0, 0]), "data/0");
    flip(&dir.join(file), at);
    let cheap = ls_rows(&dcp(&["ls", s(&root)]).stdout);
    assert_eq!((cheap[2].1.as_str(), cheap[2].2), ("whole", true));
    let out = dcp(&["ls", s(&root), "--verify"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let full = ls_rows(&out.stdout);
    assert!(full[2].1.starts_with("damaged (checksum): full verify failed"), "{}", out.stdout);
    assert_eq!(full.iter().filter(|r| r.2).map(|r| r.0).collect::<Vec<_>>(), [1], "{}", out.stdout);
}

#[test]
fn gc_keeps_the_newest_whole_step() {
    let root = series("gc-series");
    let dry = dcp(&["gc", s(&root), "--keep-last", "1", "--dry-run"]);
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    assert_eq!(ls_steps(&root), [0, 1, 2, 3, 4], "the dry run deleted something");
    let would: Vec<&str> = dry.stdout.lines().filter(|l| l.starts_with("would delete step")).collect();
    assert_eq!(
        would,
        [
            "would delete step 0 (whole)",
            "would delete step 1 (whole)",
            "would delete step 4 (uncommitted)"
        ],
        "{}",
        dry.stdout
    );
    assert!(
        dry.stdout.contains("kept 2 (2, 3); latest: step 2 (dry run: nothing deleted)"),
        "{}",
        dry.stdout
    );

    let out = dcp(&["gc", s(&root), "--keep-last", "1"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let deleted: Vec<String> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("deleted step"))
        .map(String::from)
        .collect();
    let predicted: Vec<String> = would.iter().map(|l| l.replacen("would delete", "deleted", 1)).collect();
    assert_eq!(deleted, predicted, "{}", out.stdout);
    assert!(
        out.stdout.contains("deleted 3 steps, kept 2 (2, 3); latest: step 2"),
        "{}",
        out.stdout
    );
    assert_eq!(ls_steps(&root), [2, 3]);
    for gone in [0, 1, 4] {
        assert!(!step_dir(&root, gone).exists(), "step {gone}");
    }
    // Resuming still works from the step kept.
    let manager = CheckpointManager::open(&Context::local(), s(&root), ManagerPolicy::default().read_only(true)).unwrap();
    assert_eq!(manager.latest().unwrap().unwrap().step, 2);
}

#[test]
fn gc_keep_every_keeps_multiples() {
    let root = series("gc-every");
    let out = dcp(&["gc", s(&root), "--keep-last", "1", "--keep-every", "2"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(ls_steps(&root), [0, 2, 3], "{}", out.stdout);
}

#[test]
fn gc_fails_busy_while_a_manager_holds_the_root() {
    let root = series("gc-busy");
    let holder = CheckpointManager::open(&Context::local(), s(&root), ManagerPolicy::default()).unwrap();
    let out = dcp(&["gc", s(&root), "--keep-last", "1"]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(out.stderr.starts_with("dcp gc: "), "{}", out.stderr);
    assert!(out.stderr.contains(s(&root)) && out.stderr.contains("busy"), "{}", out.stderr);
    assert_eq!(ls_steps(&root), [0, 1, 2, 3, 4], "gc deleted while busy");
    // Reading needs no claim: ls and a dry run work while the holder is there.
    let dry = dcp(&["gc", s(&root), "--keep-last", "1", "--dry-run"]);
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    holder.finish().unwrap();
    assert_eq!(dcp(&["gc", s(&root), "--keep-last", "1"]).code, 0);
    assert_eq!(ls_steps(&root), [2, 3]);
}
