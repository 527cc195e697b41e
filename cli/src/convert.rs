//! `dcp convert DIR --to safetensors OUT_DIR`: consolidated full tensors as Hugging Face
//! safetensors shards plus `model.safetensors.index.json`. Every file's header (offsets) is
//! computed from the metadata first; tensors are then read and written one at a time.

use crate::cast::cast_float;
use crate::error::{CliError, CliResult};
use crate::json::quote;
use crate::progress::{human_bytes, parse_size, Progress};
use crate::safetensors_file::{dtype_name, encode_header};
use crate::stream::TensorStream;
use dcp::{Checkpoint, DType, KeyKind};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub const HELP: &str = "\
usage: dcp convert DIR --to safetensors OUT_DIR [--filter PREFIX]... [--strip-prefix PREFIX]
                   [--dtype bf16|f16|f32] [--max-shard-size SIZE] [--overwrite]
       dcp convert FILE|DIR... --from safetensors OUT_DIR [--prefix PREFIX] [--overwrite]

--to safetensors: writes the full (consolidated) tensors of the checkpoint in DIR as Hugging
Face safetensors files in OUT_DIR: model.safetensors, or model-00001-of-0000N.safetensors when
the tensors exceed SIZE, plus model.safetensors.index.json ({\"metadata\": {\"total_size\": N},
\"weight_map\": {name: file}}). Tensors are named by their key. Objects (non-tensors) and complex
tensors (safetensors has no dtype for them) are skipped with a note. Every tensor's size is
checked against the bytes its items really hold before it is read, and it is read in pieces of
at most 64 MiB (one CRC pass first for a large tensor without sidecar block checksums). Output
files are written to a new .NAME.partial (never through a symlink; removed on any error) and
renamed into place.
  --filter PREFIX        only keys starting with PREFIX (repeatable: any of them)
  --strip-prefix PREFIX  remove PREFIX from the start of tensor names (e.g. model.)
  --dtype bf16|f16|f32   cast floating tensors (round to nearest even, NaN kept; float64 goes
                         through float32, as in torch)
  --max-shard-size SIZE  largest file, e.g. 5GB (10^9 bytes), 500MiB, or bytes (default 5GB);
                         a larger tensor gets a file of its own

--from safetensors: writes a DCP checkpoint (loadable by torch.distributed.checkpoint) to
OUT_DIR from safetensors files, or directories of them, or a model.safetensors.index.json. The
files are memory-mapped read-only and saved from the mapping.
  --prefix PREFIX        prepend PREFIX to every tensor name (e.g. model.)

common:
  --overwrite            replace existing output (a committed checkpoint; model*.safetensors)
  -h, --help             show this help";

/// The command line of `dcp convert` (see [`HELP`]). Values may start with `-`
/// (`--strip-prefix -x`), as the option always takes the next argument.
#[derive(clap::Args)]
pub struct Args {
    /// DIR OUT_DIR (--to), or FILE|DIR... OUT_DIR (--from).
    #[arg(value_name = "PATH")]
    pub paths: Vec<String>,
    #[arg(long, value_name = "FORMAT", allow_hyphen_values = true)]
    pub to: Option<String>,
    #[arg(long, value_name = "FORMAT", allow_hyphen_values = true)]
    pub from: Option<String>,
    #[arg(long, value_name = "PREFIX", allow_hyphen_values = true)]
    pub filter: Vec<String>,
    #[arg(long, value_name = "PREFIX", allow_hyphen_values = true)]
    pub strip_prefix: Option<String>,
    #[arg(long, value_name = "DTYPE", allow_hyphen_values = true)]
    pub dtype: Option<String>,
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub max_shard_size: Option<String>,
    #[arg(long, value_name = "PREFIX", allow_hyphen_values = true)]
    pub prefix: Option<String>,
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: Args) -> CliResult {
    let fmt_ok = |v: Option<&str>| v.is_none_or(|f| f == "safetensors");
    let (to, from) = (args.to.as_deref(), args.from.as_deref());
    if !fmt_ok(to) || !fmt_ok(from) {
        return Err(CliError::usage(
            "convert",
            "the only format is safetensors (--to safetensors or --from safetensors)",
        ));
    }
    match (to, from) {
        (Some(_), None) => to_safetensors(&args),
        (None, Some(_)) => crate::from_safetensors::run(&args),
        (Some(_), Some(_)) => Err(CliError::usage("convert", "give either --to or --from, not both")),
        (None, None) => Err(CliError::usage("convert", "missing --to safetensors or --from safetensors")),
    }
}

fn parse_dtype(s: &str) -> Option<DType> {
    match s.to_ascii_lowercase().as_str() {
        "bf16" | "bfloat16" => Some(DType::BF16),
        "f16" | "fp16" | "float16" | "half" => Some(DType::F16),
        "f32" | "fp32" | "float32" | "float" => Some(DType::F32),
        _ => None,
    }
}

struct Planned<'c> {
    fqn: &'c str,
    name: String,
    src: DType,
    dst: DType,
    shape: Vec<u64>,
    bytes: u64,
}

/// `model.safetensors` or `model-00001-of-00003.safetensors`.
pub fn shard_name(i: usize, n: usize) -> String {
    if n == 1 {
        "model.safetensors".to_string()
    } else {
        format!("model-{:05}-of-{n:05}.safetensors", i + 1)
    }
}

fn is_model_file(name: &str) -> bool {
    name == "model.safetensors"
        || name == "model.safetensors.index.json"
        || (name.starts_with("model-") && name.contains("-of-") && name.ends_with(".safetensors"))
}

/// Greedy split in key order: a new shard when the next tensor would pass the limit.
fn split(sizes: &[u64], max: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut cur = 0u64;
    for (i, &s) in sizes.iter().enumerate() {
        match shards.last_mut() {
            Some(last) if cur + s <= max => {
                last.push(i);
                cur += s;
            }
            _ => {
                shards.push(vec![i]);
                cur = s;
            }
        }
    }
    shards
}

/// Refuses to clobber earlier output unless `overwrite`; with it, removes stale model files.
pub fn prepare_out_dir(cmd: &str, out: &Path, overwrite: bool, is_ours: fn(&str) -> bool) -> CliResult {
    std::fs::create_dir_all(out).map_err(|e| CliError::fail(cmd, format!("creating {}: {e}", out.display())))?;
    let entries = std::fs::read_dir(out).map_err(|e| CliError::fail(cmd, format!("listing {}: {e}", out.display())))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !is_ours(&name) {
            continue;
        }
        if !overwrite {
            return Err(CliError::fail(
                cmd,
                format!("{} already exists (use --overwrite to replace it)", out.join(&name).display()),
            ));
        }
        std::fs::remove_file(e.path()).map_err(|err| CliError::fail(cmd, format!("removing {}: {err}", e.path().display())))?;
    }
    Ok(())
}

fn to_safetensors(args: &Args) -> CliResult {
    let usage = |m: &str| CliError::usage("convert", m);
    let fail = |m: String| CliError::fail("convert", m);
    let [dir, out] = args.paths.as_slice() else {
        return Err(usage("--to safetensors expects DIR and OUT_DIR"));
    };
    let cast = match args.dtype.as_deref() {
        Some(s) => Some(parse_dtype(s).ok_or_else(|| usage(&format!("--dtype {s}: expected bf16, f16 or f32")))?),
        None => None,
    };
    let max_shard = match args.max_shard_size.as_deref() {
        Some(s) => parse_size(s).ok_or_else(|| usage(&format!("--max-shard-size {s}: expected a size such as 5GB, 500MiB or 1000000")))?,
        None => 5_000_000_000,
    };
    let filters = &args.filter;
    let strip = args.strip_prefix.as_deref().unwrap_or("");

    let ck = Checkpoint::open(dir).map_err(|e| fail(e.to_string()))?;
    let mut plan: Vec<Planned> = Vec::new();
    let (mut objects, mut skipped) = (Vec::new(), Vec::new());
    for k in ck.keys() {
        if !filters.is_empty() && !filters.iter().any(|p| k.fqn.starts_with(p)) {
            continue;
        }
        if k.kind == KeyKind::Object {
            objects.push(k.fqn);
            continue;
        }
        let Some(src) = k.dtype.filter(|d| dtype_name(*d).is_some()) else {
            skipped.push(format!("{} ({})", k.fqn, k.dtype_name));
            continue;
        };
        let dst = match cast {
            Some(c) if src.is_floating_point() => c,
            _ => src,
        };
        let name = k.fqn.strip_prefix(strip).unwrap_or(k.fqn).to_string();
        if name.is_empty() || name == "__metadata__" {
            return Err(fail(format!("key {:?} would be named {name:?} after --strip-prefix", k.fqn)));
        }
        let bytes = dst
            .nbytes(k.shape)
            .ok_or_else(|| fail(format!("key {:?}: shape {:?} of {dst} is too large to address", k.fqn, k.shape)))?;
        plan.push(Planned {
            fqn: k.fqn,
            name,
            src,
            dst,
            shape: k.shape.to_vec(),
            bytes,
        });
    }
    let mut seen: HashMap<&str, &str> = HashMap::new();
    for p in &plan {
        if let Some(other) = seen.insert(&p.name, p.fqn) {
            return Err(fail(format!("keys {other:?} and {:?} both become tensor {:?}", p.fqn, p.name)));
        }
    }
    let note = |what: &str, list: &[String]| {
        if !list.is_empty() {
            let shown: Vec<&str> = list.iter().take(5).map(String::as_str).collect();
            let more = if list.len() > 5 {
                format!(", ... ({} more)", list.len() - 5)
            } else {
                String::new()
            };
            eprintln!("note: skipped {} {what}: {}{more}", list.len(), shown.join(", "));
        }
    };
    note(
        "objects (safetensors holds tensors only)",
        &objects.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    );
    note("tensors with no safetensors dtype", &skipped);
    if plan.is_empty() {
        return Err(fail(format!(
            "no tensors to convert in {dir}{}",
            if filters.is_empty() {
                String::new()
            } else {
                format!(" with keys starting with {}", filters.join(" or "))
            }
        )));
    }

    // Every tensor backed by real bytes before any output is written.
    let mut file_lens = HashMap::new();
    let mut streams = Vec::with_capacity(plan.len());
    for p in &plan {
        let k = ck.find(p.fqn).ok_or_else(|| fail(format!("key {:?} vanished", p.fqn)))?;
        streams.push(TensorStream::open(&ck, &k, &mut file_lens).map_err(fail)?);
    }
    let shards = split(&plan.iter().map(|p| p.bytes).collect::<Vec<_>>(), max_shard);
    let out_dir = Path::new(out);
    prepare_out_dir("convert", out_dir, args.overwrite, is_model_file)?;
    let total: u64 = plan.iter().map(|p| p.bytes).fold(0, u64::saturating_add);
    let mut bar = Progress::new("convert", total);
    let mut weight_map: Vec<(&str, String)> = Vec::new();
    for (si, shard) in shards.iter().enumerate() {
        let fname = shard_name(si, shards.len());
        // Larger elements first keeps every tensor aligned to its element size.
        let mut order = shard.clone();
        order.sort_by_key(|&i| std::cmp::Reverse(plan[i].dst.size()));
        let specs: Vec<(String, DType, Vec<u64>, u64)> = order
            .iter()
            .map(|&i| (plan[i].name.clone(), plan[i].dst, plan[i].shape.clone(), plan[i].bytes))
            .collect();
        let header = encode_header(&specs, &[("format", "pt")]).map_err(fail)?;
        let final_path = out_dir.join(&fname);
        let tmp = Partial::create(out_dir.join(format!(".{fname}.partial"))).map_err(fail)?;
        let io_err = |e: std::io::Error| fail(format!("writing {}: {e}", tmp.path.display()));
        let mut w = BufWriter::with_capacity(8 << 20, tmp.file.try_clone().map_err(io_err)?);
        w.write_all(&header).map_err(io_err)?;
        let mut buf = Vec::new();
        for &i in &order {
            let p = &plan[i];
            let st = &streams[i];
            debug_assert!(st.dtype == p.src && st.shape == p.shape.as_slice());
            st.for_each_piece(&mut buf, |piece| {
                let r = if p.dst == p.src {
                    w.write_all(piece)
                } else {
                    piece
                        .chunks(p.src.size() << 16)
                        .try_for_each(|part| w.write_all(&cast_float(p.src, part, p.dst)))
                };
                r.map_err(|e| format!("writing {}: {e}", tmp.path.display()))?;
                bar.add(piece.len() as u64 / p.src.size() as u64 * p.dst.size() as u64);
                Ok(())
            })
            .map_err(fail)?;
            weight_map.push((&p.name, fname.clone()));
        }
        w.flush().map_err(io_err)?;
        drop(w);
        tmp.commit(&final_path).map_err(fail)?;
    }
    bar.clear();

    weight_map.sort();
    let mut index = format!("{{\n  \"metadata\": {{\"total_size\": {total}}},\n  \"weight_map\": {{");
    for (i, (name, file)) in weight_map.iter().enumerate() {
        index.push_str(if i == 0 { "\n" } else { ",\n" });
        index.push_str(&format!("    {}: {}", quote(name), quote(file)));
    }
    index.push_str("\n  }\n}\n");
    let index_path = out_dir.join("model.safetensors.index.json");
    let mut tmp = Partial::create(out_dir.join(".model.safetensors.index.json.partial")).map_err(fail)?;
    tmp.file
        .write_all(index.as_bytes())
        .map_err(|e| fail(format!("writing {}: {e}", tmp.path.display())))?;
    tmp.commit(&index_path).map_err(fail)?;
    println!(
        "wrote {} tensors ({}) in {} file{} to {out}",
        plan.len(),
        human_bytes(total),
        shards.len(),
        if shards.len() == 1 { "" } else { "s" }
    );
    Ok(())
}

/// An output file being written: created exclusively (never through a symlink), removed on drop
/// unless renamed into place by [`Partial::commit`].
pub struct Partial {
    pub path: PathBuf,
    pub file: File,
    done: bool,
}

impl Partial {
    /// Creates `path` new. A stale one left by a crash is removed first if it is a regular file;
    /// anything else there (a symlink, a directory, a FIFO) is refused, never followed.
    pub fn create(path: PathBuf) -> Result<Partial, String> {
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_file() => {
                std::fs::remove_file(&path).map_err(|e| format!("removing the stale {}: {e}", path.display()))?
            }
            Ok(m) => {
                return Err(format!(
                    "{} exists and is not a regular file ({:?}); remove it yourself",
                    path.display(),
                    m.file_type()
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("checking {}: {e}", path.display())),
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(0o644)
            .open(&path)
            .map_err(|e| format!("creating {}: {e}", path.display()))?;
        Ok(Partial { path, file, done: false })
    }

    /// Flushes to disk and renames over `to` (rename replaces a symlink there, never follows it).
    pub fn commit(mut self, to: &Path) -> Result<(), String> {
        self.file.sync_all().map_err(|e| format!("writing {}: {e}", self.path.display()))?;
        std::fs::rename(&self.path, to).map_err(|e| format!("renaming {} to {}: {e}", self.path.display(), to.display()))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards() {
        assert_eq!(split(&[4, 4, 4], 8), vec![vec![0, 1], vec![2]]);
        assert_eq!(split(&[10, 1, 1], 8), vec![vec![0], vec![1, 2]]);
        assert_eq!(split(&[1, 10, 1], 8), vec![vec![0], vec![1], vec![2]]);
        assert_eq!(shard_name(0, 1), "model.safetensors");
        assert_eq!(shard_name(1, 3), "model-00002-of-00003.safetensors");
        assert!(is_model_file("model-00002-of-00003.safetensors"));
        assert!(!is_model_file("config.json"));
    }
}
