//! Corruption: one byte of a checkpoint changed at a time (XOR with a random non-zero value), in
//! every kind of place — tensor payloads (checked by zip CRC-32s and by the sidecar's per-4 MiB
//! block CRCs), zip structure of tensor items, object items, the padding between items,
//! `.metadata`, the `.libdcp_{token}` sidecar — then a full load in this process through the safe Rust
//! API (checksums on) and `dcp verify`'s checks (`dcp::verify`).
//!
//! Every outcome must be one of: an error with a message (never a panic: a panic fails this
//! test), or a load that is bit-exact (the byte was irrelevant: zip padding, an unread record, a
//! serialization id). A changed payload byte must always be an error (CHECKSUM or CORRUPT): a
//! load that succeeds with other values is a silent wrong load and fails the test.
//!
//! Two checkpoints: one written by libdcp (with its sidecar), and the same without the sidecar
//! (as torch writes them: only the zip CRCs and the metadata itself to go by).
//!
//! `DCP_CORRUPTION_TRIALS` (default 45) flips per class; `DCP_FIGURES` names a file the table is
//! appended to. Run: `cargo test --release --test corruption -- --nocapture`.

use dcp::comm::tcp::TcpComm;
use dcp::format::metadata::{EntryMeta, Metadata};
use dcp::format::sidecar::BLOCK_SIZE;
use dcp::format::zipitem::{read_item, ItemContent, ItemSource};
use dcp::{load, save, Context, DType, ErrorKind, LoadOptions, ObjectValue, SaveOptions, State, TensorView};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

#[path = "common/tempdir.rs"]
mod tempdir;
use tempdir::TempDir;

/// splitmix64: a deterministic generator (the seed is printed, and `DCP_CORRUPTION_SEED` replays it).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Key {
    fqn: &'static str,
    dtype: DType,
    shape: Vec<u64>,
    /// The tensor dim split between the two saving ranks (None: both hold it all; written once).
    split: Option<usize>,
    data: Vec<u8>,
}

fn keys(rng: &mut Rng) -> Vec<Key> {
    let mut k = |fqn, dtype: DType, shape: Vec<u64>, split| {
        let n = shape.iter().product::<u64>() as usize * dtype.size();
        let mut data: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
        if dtype == DType::Bool {
            data.iter_mut().for_each(|b| *b &= 1);
        }
        Key {
            fqn,
            dtype,
            shape,
            split,
            data,
        }
    };
    vec![
        // 10 MiB of f32, 5 MiB per rank: payloads larger than a block, checked per 4 MiB block.
        k("model.big", DType::F32, vec![2560, 1024], Some(0)),
        k("model.small", DType::F32, vec![64, 48], Some(0)),
        k("model.cols", DType::F16, vec![16, 40], Some(1)),
        k("model.tiny", DType::BF16, vec![7, 3], None),
        k("model.ids", DType::I64, vec![100], None),
        k("model.mask", DType::Bool, vec![33], Some(0)),
        k("model.scalar", DType::F64, vec![], None),
    ]
}

fn objects() -> Vec<(&'static str, ObjectValue)> {
    vec![
        ("train.step", ObjectValue::Int(1234)),
        ("optim.lr", ObjectValue::Float(3e-4)),
        ("train.blob", ObjectValue::Bytes((0..600u32).map(|i| (i * 7) as u8).collect())),
        (
            "optim.betas",
            ObjectValue::Py(dcp::PyValue::Tuple(vec![dcp::PyValue::Float(0.9), dcp::PyValue::Float(0.999)])),
        ),
    ]
}

/// The sub-box `offsets`/`sizes` of a row-major tensor, densely.
fn sub_box(data: &[u8], shape: &[u64], elem: usize, offsets: &[u64], sizes: &[u64]) -> Vec<u8> {
    let mut out = Vec::new();
    let n: u64 = sizes.iter().product();
    let strides = dcp::tensor::contiguous_strides(shape);
    for i in 0..n {
        let (mut rem, mut at) = (i, 0u64);
        for d in (0..sizes.len()).rev() {
            at += (offsets[d] + rem % sizes[d]) * strides[d];
            rem /= sizes[d];
        }
        out.extend_from_slice(&data[at as usize * elem..(at as usize + 1) * elem]);
    }
    out
}

/// Saves the checkpoint with two ranks (threads over the TCP rendezvous), so tensors have
/// several chunks in two files.
/// A rank's part of a key: the key's index, the part's offsets and sizes, and its bytes.
type Piece = (usize, Vec<u64>, Vec<u64>, Vec<u8>);

fn save_fixture(dir: &Path, keys: &[Key]) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    std::thread::scope(|s| {
        for rank in 0..2usize {
            s.spawn(move || {
                let ctx = Context::with_communicator(Box::new(
                    TcpComm::connect(rank, 2, "127.0.0.1", port, Duration::from_secs(30)).unwrap(),
                ));
                let mut pieces: Vec<Piece> = keys
                    .iter()
                    .enumerate()
                    .map(|(i, k)| {
                        let mut offsets = vec![0; k.shape.len()];
                        let mut sizes = k.shape.clone();
                        if let Some(d) = k.split {
                            let half = k.shape[d].div_ceil(2);
                            offsets[d] = rank as u64 * half;
                            sizes[d] = if rank == 0 { half } else { k.shape[d] - half };
                        }
                        let b = sub_box(&k.data, &k.shape, k.dtype.size(), &offsets, &sizes);
                        (i, offsets, sizes, b)
                    })
                    .collect();
                let mut st = State::new();
                for (i, offsets, sizes, b) in pieces.iter_mut() {
                    let k = &keys[*i];
                    st.add_tensor_chunk(k.fqn, TensorView::from_bytes(b, k.dtype, sizes).unwrap(), &k.shape, offsets)
                        .unwrap();
                }
                for (fqn, v) in objects() {
                    st.add_object(fqn, v).unwrap();
                }
                save(&ctx, &st, dir.to_str().unwrap(), &SaveOptions::default()).unwrap();
            });
        }
    });
}

/// Loads everything in this process; `Ok(true)` when every value is exactly what was saved.
fn load_all(dir: &Path, keys: &[Key]) -> dcp::Result<bool> {
    let ctx = Context::local();
    let mut bufs: Vec<Vec<u8>> = keys.iter().map(|k| vec![0xA5; k.data.len()]).collect();
    let mut st = State::new();
    for (k, b) in keys.iter().zip(bufs.iter_mut()) {
        st.add_tensor(k.fqn, TensorView::from_bytes(b, k.dtype, &k.shape).unwrap()).unwrap();
    }
    for (fqn, _) in objects() {
        st.add_int(fqn, -1).unwrap();
    }
    load(&ctx, &mut st, dir.to_str().unwrap(), &LoadOptions::default())?;
    let objects_same = objects().iter().all(|(fqn, v)| st.object(fqn).ok() == Some(v));
    drop(st);
    Ok(objects_same && keys.iter().zip(&bufs).all(|(k, b)| *b == k.data))
}

/// Where a changed byte lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    /// Tensor payload of an item of up to one block: checked by its zip CRC-32.
    PayloadZipCrc,
    /// Tensor payload larger than a block: checked by the sidecar's block CRCs.
    PayloadBlockCrc,
    /// Zip structure (headers, data.pkl, other records, padding) of a small tensor item.
    ZipSmall,
    /// Zip structure of a large tensor item (with a sidecar, its payload is found from the
    /// sidecar and this structure is not read by a load).
    ZipLarge,
    /// An object item (a torch.save of a Python value).
    Object,
    /// Bytes between items (alignment).
    Padding,
    Metadata,
    Sidecar,
}

impl Class {
    fn label(self) -> &'static str {
        match self {
            Class::PayloadZipCrc => "tensor payload (zip CRC-32)",
            Class::PayloadBlockCrc => "tensor payload (> 4 MiB: sidecar block CRCs)",
            Class::ZipSmall => "zip structure of a small tensor item",
            Class::ZipLarge => "zip structure of a large tensor item",
            Class::Object => "object item (int, float, bytes, tuple)",
            Class::Padding => "padding between items",
            Class::Metadata => ".metadata",
            Class::Sidecar => ".libdcp sidecar",
        }
    }
    fn is_payload(self) -> bool {
        matches!(self, Class::PayloadZipCrc | Class::PayloadBlockCrc)
    }
}

struct FileBytes<'a>(&'a [u8], u64);
impl ItemSource for FileBytes<'_> {
    fn read_item_range(&self, offset: u64, len: usize) -> dcp::Result<Vec<u8>> {
        let s = (self.1 + offset) as usize;
        Ok(self.0[s..s + len].to_vec())
    }
}

/// (file, byte ranges) of every class, from the checkpoint's own metadata and items.
fn classify(dir: &Path, with_sidecar: bool) -> BTreeMap<Class, Vec<(String, u64, u64)>> {
    let md = Metadata::decode(&std::fs::read(dir.join(".metadata")).unwrap(), "md").unwrap();
    let mut out: BTreeMap<Class, Vec<(String, u64, u64)>> = BTreeMap::new();
    let mut covered: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for (idx, info) in &md.storage {
        let data = std::fs::read(dir.join(&info.relative_path)).unwrap();
        let file = info.relative_path.clone();
        let (a, b) = (info.offset, info.offset + info.length);
        covered.entry(file.clone()).or_default().push((a, b));
        let is_tensor = matches!(md.entries.iter().find(|(k, _)| *k == idx.fqn), Some((_, EntryMeta::Tensor(_))));
        if !is_tensor {
            out.entry(Class::Object).or_default().push((file, a, b));
            continue;
        }
        let ItemContent::Tensor(rec) = read_item(&FileBytes(&data, a), info.length, "item").unwrap() else {
            panic!("a tensor item holds an object")
        };
        let (p0, p1) = (a + rec.data_offset, a + rec.data_offset + rec.data_len);
        let large = rec.data_len > BLOCK_SIZE;
        let payload = if large && with_sidecar {
            Class::PayloadBlockCrc
        } else {
            Class::PayloadZipCrc
        };
        let zip = if large { Class::ZipLarge } else { Class::ZipSmall };
        if p1 > p0 {
            out.entry(payload).or_default().push((file.clone(), p0, p1));
        }
        out.entry(zip).or_default().push((file.clone(), a, p0));
        out.entry(zip).or_default().push((file, p1, b));
    }
    for (file, mut ranges) in covered {
        let len = std::fs::metadata(dir.join(&file)).unwrap().len();
        ranges.sort();
        let mut at = 0;
        for (a, b) in ranges.into_iter().chain([(len, len)]) {
            if a > at {
                out.entry(Class::Padding).or_default().push((file.clone(), at, a));
            }
            at = at.max(b);
        }
    }
    let len = |n: &str| std::fs::metadata(dir.join(n)).map(|m| m.len()).unwrap_or(0);
    out.entry(Class::Metadata)
        .or_default()
        .push((".metadata".into(), 0, len(".metadata")));
    if with_sidecar {
        let sc = sidecar_of(dir);
        out.entry(Class::Sidecar).or_default().push((sc.clone(), 0, len(&sc)));
    }
    out.retain(|_, r| {
        r.retain(|(_, a, b)| b > a);
        !r.is_empty()
    });
    out
}

fn pick(rng: &mut Rng, ranges: &[(String, u64, u64)]) -> (String, u64) {
    let total: u64 = ranges.iter().map(|(_, a, b)| b - a).sum();
    let mut at = rng.below(total);
    for (f, a, b) in ranges {
        if at < b - a {
            return (f.clone(), a + at);
        }
        at -= b - a;
    }
    unreachable!()
}

fn xor_byte(path: &Path, at: u64, mask: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= mask;
    f.write_all_at(&b, at).unwrap();
}

#[derive(Default)]
struct Tally {
    trials: usize,
    /// Error kinds of failed loads.
    errors: BTreeMap<String, usize>,
    exact: usize,
    /// `dcp verify` reported a problem.
    verify_flagged: usize,
}

fn run_mode(name: &str, dir: &Path, keys: &[Key], with_sidecar: bool, per_class: usize, rng: &mut Rng, report: &mut String) {
    let classes = classify(dir, with_sidecar);
    let mut tallies: BTreeMap<Class, Tally> = BTreeMap::new();
    let mut failures = Vec::new();
    for (&class, ranges) in &classes {
        for _ in 0..per_class {
            let (file, at) = pick(rng, ranges);
            let mask = 1 + rng.below(255) as u8;
            let path = dir.join(&file);
            xor_byte(&path, at, mask);
            let loaded = load_all(dir, keys);
            let report_v = dcp::verify(dir.to_str().unwrap()).unwrap();
            xor_byte(&path, at, mask);
            let t = tallies.entry(class).or_default();
            t.trials += 1;
            t.verify_flagged += !report_v.is_ok() as usize;
            let what = format!("{name}: {} byte {at} of {file} ^= {mask:#04x}", class.label());
            if class.is_payload() && report_v.is_ok() {
                failures.push(format!("{what}: dcp verify passes it"));
            }
            match loaded {
                Ok(true) => {
                    t.exact += 1;
                    if class.is_payload() {
                        failures.push(format!("{what}: loaded without an error"));
                    }
                }
                Ok(false) => failures.push(format!("{what}: SILENT WRONG LOAD")),
                Err(e) => {
                    *t.errors.entry(format!("{:?}", e.kind())).or_default() += 1;
                    if e.kind() == ErrorKind::Internal || e.message().is_empty() {
                        failures.push(format!("{what}: internal error: {e}"));
                    }
                    if class.is_payload() && !matches!(e.kind(), ErrorKind::Checksum | ErrorKind::Corrupt) {
                        failures.push(format!("{what}: payload change reported as {:?}: {e}", e.kind()));
                    }
                    let names_key = keys.iter().any(|k| e.message().contains(k.fqn)) || objects().iter().any(|o| e.message().contains(o.0));
                    if !e.message().contains(dir.to_str().unwrap()) && !names_key {
                        failures.push(format!("{what}: the message names neither the file nor a key: {e}"));
                    }
                }
            }
        }
    }
    // The checkpoint is intact again.
    assert!(load_all(dir, keys).unwrap());
    report.push_str(&format!("\n{name}\n"));
    report.push_str(&format!(
        "{:<46} {:>6} {:>9} {:>8}  {:>7}  {}\n",
        "where", "flips", "detected", "exact", "verify", "errors"
    ));
    let (mut n, mut det, mut ex, mut ver) = (0, 0, 0, 0);
    for (class, t) in &tallies {
        let detected: usize = t.errors.values().sum();
        let kinds: Vec<String> = t.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
        report.push_str(&format!(
            "{:<46} {:>6} {:>9} {:>8}  {:>7}  {}\n",
            class.label(),
            t.trials,
            detected,
            t.exact,
            t.verify_flagged,
            kinds.join(", ")
        ));
        n += t.trials;
        det += detected;
        ex += t.exact;
        ver += t.verify_flagged;
    }
    report.push_str(&format!(
        "{:<46} {:>6} {:>9} {:>8}  {:>7}  silent wrong loads: {}, crashes: 0\n",
        "total",
        n,
        det,
        ex,
        ver,
        failures.iter().filter(|f| f.contains("SILENT")).count()
    ));
    assert!(failures.is_empty(), "{} bad outcomes:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn one_changed_byte_is_an_error_or_irrelevant() {
    let seed = std::env::var("DCP_CORRUPTION_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0001u64);
    let per_class: usize = std::env::var("DCP_CORRUPTION_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(45);
    let mut rng = Rng(seed);
    let keys = keys(&mut rng);
    let dir = TempDir::new("corruption");
    save_fixture(&dir, &keys);
    assert!(load_all(&dir, &keys).unwrap(), "the fixture does not load bit-exact");
    assert!(dcp::verify(dir.to_str().unwrap()).unwrap().is_ok());

    let mut report = format!("corruption: seed {seed}, {per_class} flips per class\n");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_mode(
            "libdcp checkpoint (with its sidecar)",
            &dir,
            &keys,
            true,
            per_class,
            &mut rng,
            &mut report,
        );
        std::fs::remove_file(dir.join(sidecar_of(&dir))).unwrap();
        assert!(load_all(&dir, &keys).unwrap());
        run_mode(
            "the same without its sidecar (as torch writes them)",
            &dir,
            &keys,
            false,
            per_class,
            &mut rng,
            &mut report,
        );
    }));
    println!("{report}");
    if let Ok(p) = std::env::var("DCP_FIGURES") {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(p).unwrap();
        f.write_all(report.as_bytes()).unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// Single-byte edits of `.metadata` that keep it a valid pickle and point a load at the wrong
/// bytes, in a checkpoint without a sidecar (torch writes none): the zip CRCs cannot catch them,
/// since every item read is intact. Found by reasoning about where random flips could be
/// silent; each must be an error.
#[test]
fn metadata_edits_that_keep_crcs_valid_are_errors() {
    let dir = TempDir::new("corruption-md");
    let mut rng = Rng(7);
    // Only evenly split tensors: both ranks' files have the same layout.
    let keys: Vec<Key> = keys(&mut rng)
        .into_iter()
        .filter(|k| k.fqn == "model.big" || k.fqn == "model.small")
        .collect();
    save_fixture_tensors_only(&dir, &keys);
    std::fs::remove_file(dir.join(sidecar_of(&dir))).unwrap();
    let md = std::fs::read(dir.join(".metadata")).unwrap();
    let load = |dir: &Path| load_tensors(dir, &keys);
    assert!(load(&dir).unwrap());

    // (a) The second chunk of "model.big" starts at row 1280 (BININT2 00 05); one byte makes it
    //     row 1024: the chunks overlap in rows 1024..1280 and leave rows 2304..2560 unwritten,
    //     with the same element count as before.
    let at = find(&md, b"M\x00\x05K\x00").expect("offsets (1280, 0) in .metadata");
    let mut edited = md.clone();
    edited[at + 2] = 0x04;
    std::fs::write(dir.join(".metadata"), &edited).unwrap();
    let r = load(&dir);
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::Corrupt),
        "overlapping chunks: {:?}",
        r.map_err(|e| e.to_string())
    );
    println!("overlapping chunks: {}", r.unwrap_err());

    // (b) "__1_0_{token}.distcp" -> "__0_0_{token}.distcp": rank 1's chunks now point into rank 0's file, at
    //     offsets where rank 0 stored its own chunks of the same shapes (intact items, good CRCs).
    let at = find(&md, b"__1_0_").expect("rank 1's file name in .metadata");
    let mut edited = md.clone();
    edited[at + 2] = b'0';
    std::fs::write(dir.join(".metadata"), &edited).unwrap();
    let r = load(&dir);
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::Corrupt),
        "items read twice: {:?}",
        r.map_err(|e| e.to_string())
    );
    println!("two chunks in one item: {}", r.unwrap_err());

    std::fs::write(dir.join(".metadata"), &md).unwrap();
    assert!(load(&dir).unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The sidecar of the checkpoint in `dir` (its name carries the save's token).
fn sidecar_of(dir: &Path) -> String {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .find(|n| n.starts_with(".libdcp_"))
        .expect("a sidecar")
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn save_fixture_tensors_only(dir: &Path, keys: &[Key]) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    std::thread::scope(|s| {
        for rank in 0..2u64 {
            s.spawn(move || {
                let ctx = Context::with_communicator(Box::new(
                    TcpComm::connect(rank as usize, 2, "127.0.0.1", port, Duration::from_secs(30)).unwrap(),
                ));
                let mut pieces: Vec<(Vec<u64>, Vec<u64>, Vec<u8>)> = keys
                    .iter()
                    .map(|k| {
                        let mut offsets = vec![0; k.shape.len()];
                        let mut sizes = k.shape.clone();
                        sizes[0] = k.shape[0] / 2;
                        offsets[0] = rank * sizes[0];
                        let b = sub_box(&k.data, &k.shape, k.dtype.size(), &offsets, &sizes);
                        (offsets, sizes, b)
                    })
                    .collect();
                let mut st = State::new();
                for (k, (offsets, sizes, b)) in keys.iter().zip(pieces.iter_mut()) {
                    st.add_tensor_chunk(k.fqn, TensorView::from_bytes(b, k.dtype, sizes).unwrap(), &k.shape, offsets)
                        .unwrap();
                }
                save(&ctx, &st, dir.to_str().unwrap(), &SaveOptions::default()).unwrap();
            });
        }
    });
}

fn load_tensors(dir: &Path, keys: &[Key]) -> dcp::Result<bool> {
    let ctx = Context::local();
    let mut bufs: Vec<Vec<u8>> = keys.iter().map(|k| vec![0xA5; k.data.len()]).collect();
    let mut st = State::new();
    for (k, b) in keys.iter().zip(bufs.iter_mut()) {
        st.add_tensor(k.fqn, TensorView::from_bytes(b, k.dtype, &k.shape).unwrap()).unwrap();
    }
    load(&ctx, &mut st, dir.to_str().unwrap(), &LoadOptions::default())?;
    drop(st);
    Ok(keys.iter().zip(&bufs).all(|(k, b)| *b == k.data))
}
