//! Hostile directories: a FIFO or a symbolic link in place of `.metadata`, the `.libdcp_{token}` sidecar or
//! a data file makes load, `Checkpoint::open` + a read, and verify fail promptly with an error
//! naming the file (never hang, never read through the link); links pre-placed where a save
//! writes are never written through.

use dcp::{load, save, Checkpoint, Context, DType, LoadOptions, SaveOptions, State, TensorView};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

const ELEMS: usize = 64;
const OUTSIDE_BYTES: &[u8] = b"bytes outside the checkpoint that no save may touch";

#[path = "common/tempdir.rs"]
mod tempdir;
use tempdir::TempDir as Scratch;

fn pattern() -> Vec<u8> {
    (0..ELEMS * 4).map(|i| (i as u8).wrapping_mul(37).wrapping_add(11)).collect()
}

fn save_sample(dir: &Path, overwrite: bool) -> dcp::Result<()> {
    let mut bytes = pattern();
    let mut st = State::new();
    st.add_tensor("w", TensorView::from_bytes(&mut bytes, DType::F32, &[ELEMS as u64]).unwrap())
        .unwrap();
    st.add_int("step", 5).unwrap();
    let opts = SaveOptions::default().overwrite(overwrite);
    save(&Context::local(), &st, dir.to_str().unwrap(), &opts).map(drop)
}

/// Loads "w" into a poisoned buffer; the bytes on success.
fn load_sample(location: &str) -> dcp::Result<Vec<u8>> {
    let mut buf = vec![0xA5u8; ELEMS * 4];
    let mut st = State::new();
    st.add_tensor("w", TensorView::from_bytes(&mut buf, DType::F32, &[ELEMS as u64]).unwrap())
        .unwrap();
    st.add_int("step", 0).unwrap();
    load(&Context::local(), &mut st, location, &LoadOptions::default())?;
    drop(st);
    Ok(buf)
}

/// Runs `f` on its own thread; fails the test when it has not returned after 5 s (a hang).
fn within_5s<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(5))
        .unwrap_or_else(|_| panic!("{what} hung (no answer within 5 s)"))
}

/// The data file of rank 0 (`__0_0*.distcp`: the name may carry a save-specific suffix).
fn data_file(dir: &Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("__0_0") && n.ends_with(".distcp"))
        .collect();
    assert_eq!(names.len(), 1, "one data file of rank 0 in {}: {names:?}", dir.display());
    names.pop().unwrap()
}

/// The one file of `dir` whose name starts with `prefix`.
fn file_starting(dir: &Path, prefix: &str) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    assert_eq!(names.len(), 1, "files starting with {prefix:?} in {}: {names:?}", dir.display());
    names.pop().unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Replacement {
    Fifo,
    /// A symbolic link to an intact copy outside the directory.
    LinkToCopy,
}

impl Replacement {
    /// What the error must say the file is.
    fn described_as(self) -> &'static str {
        match self {
            Replacement::Fifo => "is not a regular file (a FIFO)",
            Replacement::LinkToCopy => "is a symbolic link",
        }
    }
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo {}", path.display());
}

fn replace(dir: &Path, name: &str, with: Replacement, copy: &Path) {
    let path = dir.join(name);
    std::fs::copy(&path, copy).unwrap();
    std::fs::remove_file(&path).unwrap();
    match with {
        Replacement::Fifo => mkfifo(&path),
        Replacement::LinkToCopy => std::os::unix::fs::symlink(copy, &path).unwrap(),
    }
}

fn assert_names(what: &str, err: &str, name: &str, with: Replacement) {
    assert!(
        err.contains(name) && err.contains(with.described_as()),
        "{what} with {with:?} at {name}: the error must name the file and say {:?}; got: {err}",
        with.described_as()
    );
}

fn check_refused(target: &str) {
    for with in [Replacement::Fifo, Replacement::LinkToCopy] {
        let scratch = Scratch::new(&format!("special-{}-{with:?}", target.trim_start_matches('.')));
        let dir = scratch.join("ck");
        save_sample(&dir, false).unwrap();
        let location = dir.to_str().unwrap().to_string();
        assert_eq!(load_sample(&location).unwrap(), pattern(), "the intact checkpoint loads");
        let name = match target {
            "data" => data_file(&dir),
            "sidecar" => {
                // The save's own sidecar, `.libdcp_{token}` (the only one in a fresh directory).
                file_starting(&dir, ".libdcp_")
            }
            _ => target.to_string(),
        };
        let copy = scratch.join("copy-outside");
        replace(&dir, &name, with, &copy);
        let copied = std::fs::read(&copy).unwrap();

        let loc = location.clone();
        let err = within_5s("load", move || load_sample(&loc)).expect_err("load refuses the checkpoint");
        assert_names("load", err.message(), &name, with);

        let loc = location.clone();
        let read = within_5s("open + read", move || {
            Checkpoint::open(&loc).and_then(|ck| ck.read_tensor("w")).map(drop)
        });
        let err = read.expect_err("Checkpoint::open or its read refuses the checkpoint");
        assert_names("Checkpoint::open + read_tensor", err.message(), &name, with);

        let loc = location.clone();
        let report = within_5s("verify", move || dcp::verify(&loc)).unwrap();
        assert!(!report.is_ok(), "verify with {with:?} at {name} passes");
        let problems: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
        assert!(
            problems.iter().any(|p| p.contains(&name) && p.contains(with.described_as())),
            "verify with {with:?} at {name} must name it: {problems:?}"
        );
        assert_eq!(std::fs::read(&copy).unwrap(), copied, "the copy outside is untouched");
    }
}

#[test]
fn metadata_fifo_or_link_is_refused() {
    check_refused(".metadata");
}

#[test]
fn sidecar_fifo_or_link_is_refused() {
    check_refused("sidecar");
}

#[test]
fn data_file_fifo_or_link_is_refused() {
    check_refused("data");
}

/// Names a save writes or stages under (fixed data-file names of ranks 0 and 1, the fixed
/// temporary names older versions used), each a link to a file outside.
const BAIT: [&str; 5] = ["__0_0.distcp", "__1_0.distcp", ".metadata.tmp", ".libdcp.tmp", "__0_0.distcp.tmp"];

fn plant_links(scratch: &Scratch, dir: &Path) -> Vec<PathBuf> {
    BAIT.iter()
        .enumerate()
        .map(|(i, name)| {
            let target = scratch.join(format!("outside-{i}"));
            std::fs::write(&target, OUTSIDE_BYTES).unwrap();
            let link = dir.join(name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&target, &link).unwrap();
            target
        })
        .collect()
}

/// A save may refuse the directory or succeed beside the links; it never writes through them,
/// and a save it reports done loads exactly.
fn check_not_written_through(scratch: &Scratch, dir: &Path, targets: &[PathBuf], overwrite: bool) {
    let d = dir.to_path_buf();
    let saved = within_5s("save", move || save_sample(&d, overwrite));
    for t in targets {
        assert_eq!(
            std::fs::read(t).unwrap(),
            OUTSIDE_BYTES,
            "{} was written through a link",
            t.display()
        );
    }
    let entries: Vec<String> = std::fs::read_dir(scratch.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        entries.len(),
        targets.len() + 1,
        "nothing was created outside the checkpoint: {entries:?}"
    );
    match saved {
        Ok(()) => assert_eq!(load_sample(dir.to_str().unwrap()).unwrap(), pattern()),
        Err(e) => {
            let named = BAIT.iter().any(|b| e.message().contains(b));
            assert!(named, "a refused save names the file in its way: {e}");
        }
    }
}

#[test]
fn save_into_a_directory_of_links_does_not_write_through_them() {
    let scratch = Scratch::new("special-links-new");
    let dir = scratch.join("ck");
    std::fs::create_dir_all(&dir).unwrap();
    let targets = plant_links(&scratch, &dir);
    check_not_written_through(&scratch, &dir, &targets, false);
}

#[test]
fn overwrite_beside_links_does_not_write_through_them() {
    let scratch = Scratch::new("special-links-over");
    let dir = scratch.join("ck");
    save_sample(&dir, false).unwrap();
    let mut targets = Vec::new();
    for (i, name) in BAIT.iter().enumerate().skip(1) {
        let target = scratch.join(format!("outside-{i}"));
        std::fs::write(&target, OUTSIDE_BYTES).unwrap();
        std::os::unix::fs::symlink(&target, dir.join(name)).unwrap();
        targets.push(target);
    }
    check_not_written_through(&scratch, &dir, &targets, true);
}
