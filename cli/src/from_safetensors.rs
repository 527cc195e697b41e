//! `dcp convert FILES... --from safetensors OUT_DIR`: a DCP checkpoint from safetensors files.
//! Each file is memory-mapped read-only and its tensors are registered as views into the
//! mapping, so the save reads them straight from the page cache (nothing is copied up front).

use crate::convert::Args;
use crate::error::{CliError, CliResult};
use crate::progress::{human_bytes, stderr_is_terminal, Progress};
use crate::safetensors_file::{header_len, read_tensors};
use dcp::{Context, Device, ErrorKind, SaveOptions, State, TensorView};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn fail(m: impl std::fmt::Display) -> CliError {
    CliError::fail("convert", m)
}

/// A read-only private mapping of a whole file.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn open(path: &Path) -> Result<Mapping, String> {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
        let len = f
            .metadata()
            .map_err(|e| format!("reading the size of {}: {e}", path.display()))?
            .len();
        let mut first = [0u8; 8];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut first, 0)
            .map_err(|_| format!("{}: too short for a safetensors file", path.display()))?;
        header_len(&first, len, &path.display().to_string())?;
        // SAFETY: a fresh private read-only mapping of `len` bytes of an open file (at least 8:
        // `header_len` read them), at an address the kernel picks, so no existing memory is
        // touched; unmapped in Drop. Like any file mapping it assumes nobody truncates or
        // rewrites the input file while `dcp` runs.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!("mmap of {}: {}", path.display(), std::io::Error::last_os_error()));
        }
        // SAFETY: only advice on the mapping just made (`len` bytes from `ptr`).
        unsafe { libc::madvise(ptr, len as usize, libc::MADV_SEQUENTIAL) };
        Ok(Mapping { ptr, len: len as usize })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is readable for `len` bytes while `self` lives (unmapped only in
        // Drop) and read-only, so nothing in this process writes it.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `open`, unmapped once; slices and views of it
        // borrow `self` or are dropped first (the state goes before the mappings).
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// Files named on the command line: safetensors files, directories of them, or an index.json.
fn expand(inputs: &[String]) -> CliResult<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = Vec::new();
    for i in inputs {
        let p = Path::new(i);
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| fail(format!("listing {i}: {e}")))?
                .flatten()
                .map(|e| e.path())
                .filter(|f| f.extension().is_some_and(|x| x == "safetensors") && f.is_file())
                .collect();
            if found.is_empty() {
                return Err(fail(format!("{i} holds no .safetensors files")));
            }
            found.sort();
            out.extend(found);
        } else if i.ends_with(".json") {
            let text = std::fs::read_to_string(p).map_err(|e| fail(format!("reading {i}: {e}")))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| fail(format!("{i}: invalid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(serde_json::Value::as_object)
                .ok_or_else(|| fail(format!("{i}: no weight_map object")))?;
            let base = p.parent().unwrap_or(Path::new("."));
            let mut files: Vec<PathBuf> = Vec::new();
            for (_, f) in map {
                let f = base.join(
                    f.as_str()
                        .ok_or_else(|| fail(format!("{i}: weight_map values must be file names")))?,
                );
                if !files.contains(&f) {
                    files.push(f);
                }
            }
            files.sort();
            out.extend(files);
        } else {
            out.push(p.to_path_buf());
        }
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(p.clone()));
    Ok(out)
}

/// Bytes this process has written so far (`wchar` of /proc/self/io), for the progress bar.
fn bytes_written() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/io").ok()?;
    s.lines().find_map(|l| l.strip_prefix("wchar:")).and_then(|v| v.trim().parse().ok())
}

pub fn run(args: &Args) -> CliResult {
    let (inputs, out) = match args.paths.as_slice() {
        [inputs @ .., out] if !inputs.is_empty() => (inputs, out),
        _ => return Err(CliError::usage("convert", "--from safetensors expects FILE... and OUT_DIR")),
    };
    let prefix = args.prefix.as_deref().unwrap_or("");
    let files = expand(inputs)?;
    let maps: Vec<Mapping> = files.iter().map(|f| Mapping::open(f).map_err(fail)).collect::<CliResult<_>>()?;
    let mut state = State::new();
    let mut owner: HashMap<String, usize> = HashMap::new();
    let mut total = 0u64;
    for (fi, (path, m)) in files.iter().zip(&maps).enumerate() {
        let what = path.display().to_string();
        for t in &read_tensors(m.bytes(), &what).map_err(fail)? {
            let name = format!("{prefix}{}", t.name);
            if let Some(&other) = owner.get(&name) {
                return Err(fail(format!("tensor {name:?} is in both {} and {what}", files[other].display())));
            }
            owner.insert(name.clone(), fi);
            let start = t.start as usize;
            // SAFETY: read_tensors checked the range lies inside the mapping, which outlives
            // `state`; the save only reads through the view (the mapping is read-only).
            let view = unsafe {
                TensorView::from_raw(
                    (m.ptr as *mut u8).add(start),
                    t.len() as usize,
                    t.dtype,
                    &t.shape,
                    None,
                    Device::Cpu,
                )
            }
            .map_err(|e| fail(format!("{what}: tensor {:?}: {e}", t.name)))?;
            state.add_tensor(&name, view).map_err(fail)?;
            total += t.len();
        }
    }
    if state.is_empty() {
        return Err(fail("the input files hold no tensors"));
    }
    let overwrite = args.overwrite;
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = (stderr_is_terminal() && bytes_written().is_some()).then(|| {
        let stop = stop.clone();
        let base = bytes_written().unwrap_or(0);
        std::thread::spawn(move || {
            let mut bar = Progress::new("convert", total);
            while !stop.load(Ordering::Relaxed) {
                bar.update(bytes_written().unwrap_or(base).saturating_sub(base).min(total));
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    });
    let opts = SaveOptions::default().overwrite(overwrite);
    let saved = dcp::save(&Context::local(), &state, out, &opts);
    stop.store(true, Ordering::Relaxed);
    if let Some(w) = watcher {
        let _ = w.join();
    }
    saved.map_err(|e| match e.kind() {
        // Without overwrite the engine refuses a committed checkpoint at `out`.
        ErrorKind::AlreadyExists => fail(format!("a checkpoint already exists at {out} (use --overwrite to replace it)")),
        _ => fail(e),
    })?;
    drop(state);
    drop(maps);
    println!(
        "wrote {} tensors ({}) from {} file{} to {out}",
        owner.len(),
        human_bytes(total),
        files.len(),
        if files.len() == 1 { "" } else { "s" }
    );
    Ok(())
}
