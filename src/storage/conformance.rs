//! Checks every backend must pass: the write contract (sequential appends; positional writes and
//! direct I/O where declared, refused where not), exclusive creation, atomic and create-only
//! small files, listing, removal, names of one path component, `NotFound` for a missing file.
//! Run against the file system and memory in unit tests, and against a local S3 server by
//! `tests/python/test_s3.py` (see `s3::tests`).

use super::*;
use crate::error::ErrorKind;

/// Runs every check on `s`, a location that must start empty; leaves one small file (`m`).
pub fn run(s: &dyn Storage) {
    s.prepare().unwrap();
    assert_eq!(s.list().unwrap(), Vec::<String>::new(), "the location starts empty");
    missing_files_are_not_found(s);
    sequential_appends(s);
    positional_writes(s);
    direct_writes(s);
    small_files(s);
    exclusive_create(s);
    names_are_one_component(s);
    put_atomic_leaves_no_temp(s);
    put_new_is_create_only(s);
    s.sync_dir().unwrap();
}

/// Bytes that differ at every offset within a file (and between files, by `seed`).
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u64 * 131 + i as u64 / 251 + seed as u64) as u8).collect()
}

fn sorted_list(s: &dyn Storage) -> Vec<String> {
    let mut names = s.list().unwrap();
    names.sort();
    names
}

fn missing_files_are_not_found(s: &dyn Storage) {
    assert!(!s.exists("missing").unwrap());
    let err = s.open_read("missing").err().expect("open_read of a missing file fails");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(err.message().contains("missing"), "{err}");
    let err = s.read_all("missing").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    s.remove("missing").unwrap();
}

/// One writer appends pieces of uneven sizes (more than one 16 MiB upload part in all); the
/// file reads back exactly, and reads past its end name it.
fn sequential_appends(s: &dyn Storage) {
    let data = pattern(1, (17 << 20) + 12_345);
    let w = s.create("a", false).unwrap();
    let mut at = 0;
    for (i, size) in [1usize, 4095, (1 << 20) + 7, 0, 3 << 20].iter().cycle().enumerate() {
        if at == data.len() {
            break;
        }
        let end = (at + size + i).min(data.len());
        w.append(&data[at..end]).unwrap();
        at = end;
    }
    w.set_len(data.len() as u64).unwrap();
    w.sync().unwrap();
    drop(w);
    assert!(s.exists("a").unwrap());
    let r = s.open_read("a").unwrap();
    assert_eq!(r.len(), data.len() as u64);
    assert!(s.read_all("a").unwrap() == data, "the appended file reads back as written");
    assert_eq!(r.read_vec(16 << 20, 4096).unwrap(), &data[16 << 20..(16 << 20) + 4096]);
    let err = r.read_vec(data.len() as u64 - 2, 4).unwrap_err();
    assert!(err.message().contains(&s.describe("a")), "{err}");
    drop(r);
    assert_eq!(sorted_list(s), ["a"]);
    s.remove("a").unwrap();
    s.remove("a").unwrap();
    assert!(!s.exists("a").unwrap());
    assert_eq!(s.open_read("a").err().map(|e| e.kind()), Some(ErrorKind::NotFound));
}

/// Where declared, several threads write disjoint ranges in any order; elsewhere `write_at` is
/// refused and the abandoned file never appears.
fn positional_writes(s: &dyn Storage) {
    let w = s.create("p", false).unwrap();
    if !s.capabilities().positional_writes {
        let err = w.write_at(0, b"1234").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
        drop(w);
        s.remove("p").unwrap();
        return;
    }
    let piece = 64 << 10;
    let data = pattern(2, 8 * piece);
    std::thread::scope(|t| {
        for k in 0..4 {
            let (w, data) = (&w, &data);
            // Thread k writes pieces k + 4, then k: out of order, beside the others.
            t.spawn(move || {
                for i in [k + 4, k] {
                    w.write_at((i * piece) as u64, &data[i * piece..(i + 1) * piece]).unwrap();
                }
            });
        }
    });
    w.set_len(data.len() as u64).unwrap();
    w.sync().unwrap();
    drop(w);
    assert!(s.read_all("p").unwrap() == data, "positional writes read back as written");
    s.remove("p").unwrap();
}

/// A direct handle only where declared, with the declared alignment; aligned appends, then a
/// shorter final length (the padded last block cut off), read back exactly.
fn direct_writes(s: &dyn Storage) {
    let declared = s.capabilities().direct_alignment;
    let w = s.create("d", true).unwrap();
    let data = match w.direct_alignment() {
        Some(a) => {
            assert_eq!(declared, Some(a), "a direct handle from a backend that declares {declared:?}");
            let mut mem = vec![0u8; 4 * a];
            let skip = mem.as_ptr().align_offset(a);
            let buf = &mut mem[skip..skip + 2 * a];
            buf.copy_from_slice(&pattern(3, 2 * a));
            w.append(buf).unwrap();
            w.set_len(2 * a as u64 - 100).unwrap();
            buf[..2 * a - 100].to_vec()
        }
        None => {
            let data = pattern(3, 10_000);
            w.append(&data).unwrap();
            w.set_len(data.len() as u64).unwrap();
            data
        }
    };
    w.sync().unwrap();
    drop(w);
    assert!(
        s.read_all("d").unwrap() == data,
        "a file created for direct writes reads back as written"
    );
    s.remove("d").unwrap();
}

fn small_files(s: &dyn Storage) {
    s.put_atomic("m", b"meta").unwrap();
    assert_eq!(s.read_all("m").unwrap(), b"meta");
    s.put_atomic("m", b"meta2").unwrap();
    assert_eq!(s.read_all("m").unwrap(), b"meta2");
    assert_eq!(s.open_read("m").unwrap().len(), 5);
    assert_eq!(sorted_list(s), ["m"]);
}

/// `create` never replaces a file: the name is `AlreadyExists` and the file keeps its bytes.
fn exclusive_create(s: &dyn Storage) {
    let w = s.create("x", false).unwrap();
    w.append(b"first").unwrap();
    w.set_len(5).unwrap();
    w.sync().unwrap();
    drop(w);
    let err = s.create("x", false).err().expect("a second create of one name fails");
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
    assert!(err.message().contains(&s.describe("x")), "{err}");
    assert_eq!(s.read_all("x").unwrap(), b"first");
    s.put_atomic("y", b"small").unwrap();
    let err = s.create("y", true).err().expect("create over a put file fails");
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
    assert_eq!(s.read_all("y").unwrap(), b"small");
    s.remove("x").unwrap();
    s.remove("y").unwrap();
}

fn names_are_one_component(s: &dyn Storage) {
    for bad in ["", ".", "..", "a/b", "../x", "/abs", "x/", "nul\0byte"] {
        let refused = |what: &str, r: Result<()>| {
            let err = r.err().unwrap_or_else(|| panic!("{what}({bad:?}) is refused"));
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{what}({bad:?}): {err}");
        };
        refused("create", s.create(bad, false).map(drop));
        refused("put_atomic", s.put_atomic(bad, b"z"));
        refused("put_new", s.put_new(bad, b"z"));
        refused("open_read", s.open_read(bad).map(drop));
        refused("read_all", s.read_all(bad).map(drop));
        refused("exists", s.exists(bad).map(drop));
        refused("remove", s.remove(bad));
    }
}

/// Several writers of one small file each stage under their own temporary name; none is left.
fn put_atomic_leaves_no_temp(s: &dyn Storage) {
    std::thread::scope(|t| {
        for i in 0..4u8 {
            t.spawn(move || {
                for j in 0..8u8 {
                    s.put_atomic("q", &[i, j]).unwrap();
                }
            });
        }
    });
    let got = s.read_all("q").unwrap();
    assert!(got.len() == 2 && got[0] < 4 && got[1] == 7, "{got:?}");
    assert_eq!(sorted_list(s), ["m", "q"]);
    s.remove("q").unwrap();
}

fn put_new_is_create_only(s: &dyn Storage) {
    s.put_new("n", b"one").unwrap();
    let err = s.put_new("n", b"two").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
    assert_eq!(s.read_all("n").unwrap(), b"one");
    s.remove("n").unwrap();
    assert_eq!(sorted_list(s), ["m"], "no temporary is left behind");
}
