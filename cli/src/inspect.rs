//! `dcp inspect DIR [--json] [--chunks]`: keys, dtypes, shapes, chunks, bytes; totals per data
//! file and per writing rank; which writer produced the checkpoint.

use crate::error::{CliError, CliResult};
use crate::json::quote;
use crate::progress::human_bytes;
use dcp::{Checkpoint, KeyKind};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

pub const HELP: &str = "\
usage: dcp inspect DIR [--json] [--chunks]

Lists every key of the checkpoint in DIR: kind (tensor or object), dtype, global shape, number
of chunks and bytes (a tensor's element bytes; an object's stored item), then totals per data
file and per writing rank (the N of __N_M.distcp), and which writer produced the checkpoint
(the libdcp version from its .libdcp sidecar, or torch when there is none).

options:
  --json     print one JSON document instead of tables
  --chunks   also list every chunk: offsets, sizes, file, offset and length of its item
  -h, --help show this help";

/// The writing rank from a `__{rank}_{n}.distcp` name.
pub fn rank_of(file: &str) -> Option<u64> {
    file.strip_prefix("__")?.strip_suffix(".distcp")?.split_once('_')?.0.parse().ok()
}

struct KeyRow<'c> {
    fqn: &'c str,
    kind: KeyKind,
    dtype: &'c str,
    shape: &'c [u64],
    chunks: &'c [dcp::Region],
    /// Element bytes of a tensor; `None` when its dtype is unknown.
    bytes: Option<u64>,
    stored: u64,
}

#[derive(Default)]
struct FileRow {
    items: u64,
    stored: u64,
    size: Option<u64>,
}

fn json_list(s: &[u64]) -> String {
    let parts: Vec<String> = s.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(","))
}

/// The command line of `dcp inspect` (see [`HELP`]).
#[derive(clap::Args)]
pub struct Args {
    #[arg(value_name = "DIR")]
    pub dirs: Vec<String>,
    #[arg(long)]
    pub json: bool,
    #[arg(long)]
    pub chunks: bool,
}

pub fn run(args: Args) -> CliResult {
    let [dir] = args.dirs.as_slice() else {
        return Err(CliError::usage(
            "inspect",
            if args.dirs.is_empty() {
                "missing DIR"
            } else {
                "expects exactly one DIR"
            },
        ));
    };
    let ck = Checkpoint::open(dir).map_err(|e| CliError::fail("inspect", e))?;
    let md = ck.metadata();
    let mut per_key: HashMap<&str, u64> = HashMap::new();
    let mut files: BTreeMap<&str, FileRow> = BTreeMap::new();
    for (idx, info) in &md.storage {
        *per_key.entry(&idx.fqn).or_default() += info.length;
        let f = files.entry(&info.relative_path).or_default();
        f.items += 1;
        f.stored += info.length;
    }
    if let Some(sc) = ck.sidecar() {
        for f in &sc.files {
            files.entry(&f.name).or_default();
        }
    }
    for (name, row) in files.iter_mut() {
        row.size = ck.storage().open_read(name).ok().map(|h| h.len());
    }
    let rows: Vec<KeyRow> = ck
        .keys()
        .map(|k| KeyRow {
            fqn: k.fqn,
            kind: k.kind,
            dtype: k.dtype_name,
            shape: k.shape,
            chunks: k.chunks,
            bytes: match k.kind {
                KeyKind::Tensor => k.nbytes(),
                KeyKind::Object => per_key.get(k.fqn).copied(),
            },
            stored: per_key.get(k.fqn).copied().unwrap_or(0),
        })
        .collect();
    let mut ranks: BTreeMap<Option<u64>, (u64, u64, u64)> = BTreeMap::new();
    for (name, f) in &files {
        let r = ranks.entry(rank_of(name)).or_default();
        r.0 += 1;
        r.1 += f.items;
        r.2 += f.stored;
    }
    let tensors = rows.iter().filter(|r| r.kind == KeyKind::Tensor).count();
    let report = Report {
        ck: &ck,
        dir,
        writer: ck.sidecar().map(|s| s.writer.clone()).unwrap_or_else(|| "torch".to_string()),
        tensors,
        tensor_bytes: rows.iter().filter(|r| r.kind == KeyKind::Tensor).filter_map(|r| r.bytes).sum(),
        stored: files.values().map(|f| f.stored).sum(),
        rows,
        files,
        ranks,
        chunks: args.chunks,
    };
    let out = if args.json { to_json(&report) } else { to_text(&report) };
    print!("{out}");
    Ok(())
}

/// What `inspect` prints, as text or JSON.
struct Report<'c> {
    ck: &'c Checkpoint,
    dir: &'c str,
    writer: String,
    rows: Vec<KeyRow<'c>>,
    files: BTreeMap<&'c str, FileRow>,
    ranks: BTreeMap<Option<u64>, (u64, u64, u64)>,
    /// List every chunk with where it is stored (`--chunks`).
    chunks: bool,
    tensors: usize,
    tensor_bytes: u64,
    stored: u64,
}

fn to_text(report: &Report) -> String {
    let Report {
        ck,
        dir,
        ref writer,
        ref rows,
        ref files,
        ref ranks,
        chunks,
        tensors,
        tensor_bytes,
        stored,
    } = *report;
    let md = ck.metadata();
    let mut o = String::new();
    let _ = writeln!(o, "checkpoint  {dir}");
    let mut w = format!("{writer} (metadata version {}", md.version.as_deref().unwrap_or("unknown"));
    if let Some(sc) = ck.sidecar() {
        let _ = write!(w, ", world size {}", sc.world_size);
    }
    let _ = writeln!(o, "writer      {w})");
    let _ = writeln!(
        o,
        "keys        {} ({tensors} tensors of {}, {} objects)",
        rows.len(),
        human_bytes(tensor_bytes),
        rows.len() - tensors
    );
    let nf = files.len();
    let _ = writeln!(
        o,
        "stored      {} in {nf} data file{}",
        human_bytes(stored),
        if nf == 1 { "" } else { "s" }
    );
    let _ = writeln!(o);

    let table: Vec<[String; 6]> = rows
        .iter()
        .map(|r| match r.kind {
            KeyKind::Tensor => [
                r.fqn.to_string(),
                "tensor".into(),
                r.dtype.to_string(),
                format!("{:?}", r.shape),
                r.chunks.len().to_string(),
                r.bytes.map(human_bytes).unwrap_or_else(|| "?".into()),
            ],
            KeyKind::Object => [
                r.fqn.to_string(),
                "object".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                human_bytes(r.stored),
            ],
        })
        .collect();
    let head = ["KEY", "KIND", "DTYPE", "SHAPE", "CHUNKS", "BYTES"];
    let right = [false, false, false, false, true, true];
    let mut width = head.map(str::len);
    for row in &table {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = width[i] - c.chars().count();
            if i > 0 {
                s.push_str("  ");
            }
            if right[i] {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            } else {
                s.push_str(c);
                if i + 1 < cells.len() {
                    s.push_str(&" ".repeat(pad));
                }
            }
        }
        s
    };
    let _ = writeln!(o, "{}", line(&head));
    for (row, r) in table.iter().zip(rows) {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        let _ = writeln!(o, "{}", line(&cells));
        if chunks {
            for c in r.chunks {
                let at = ck
                    .storage_info(r.fqn, Some(&c.offsets))
                    .map(|s| format!("{} at {} (+{})", s.relative_path, s.offset, s.length))
                    .unwrap_or_else(|| "no storage entry".into());
                let _ = writeln!(o, "    chunk offsets {:?} sizes {:?}: {at}", c.offsets, c.sizes);
            }
        }
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "{:<16} {:>4} {:>7} {:>11} {:>11}", "FILE", "RANK", "ITEMS", "STORED", "SIZE");
    for (name, f) in files {
        let _ = writeln!(
            o,
            "{:<16} {:>4} {:>7} {:>11} {:>11}",
            name,
            rank_of(name).map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
            f.items,
            human_bytes(f.stored),
            f.size.map(human_bytes).unwrap_or_else(|| "missing".into())
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "{:<6} {:>5} {:>7} {:>11}", "RANK", "FILES", "ITEMS", "STORED");
    for (rank, (nf, items, st)) in ranks {
        let r = rank.map(|r| r.to_string()).unwrap_or_else(|| "-".into());
        let _ = writeln!(o, "{r:<6} {nf:>5} {items:>7} {:>11}", human_bytes(*st));
    }
    o
}

fn to_json(report: &Report) -> String {
    let Report {
        ck,
        dir,
        ref writer,
        ref rows,
        ref files,
        ref ranks,
        chunks,
        tensors,
        tensor_bytes,
        stored,
    } = *report;
    let md = ck.metadata();
    let opt_str = |s: Option<&str>| s.map(quote).unwrap_or_else(|| "null".into());
    let opt_num = |n: Option<u64>| n.map(|v| v.to_string()).unwrap_or_else(|| "null".into());
    let mut o = String::from("{\n");
    let _ = writeln!(o, "  \"path\": {},", quote(dir));
    let _ = writeln!(o, "  \"writer\": {},", quote(writer));
    let _ = writeln!(o, "  \"metadata_version\": {},", opt_str(md.version.as_deref()));
    let _ = writeln!(o, "  \"save_id\": {},", opt_str(md.save_id.as_deref()));
    let _ = writeln!(o, "  \"sidecar\": {},", ck.sidecar().is_some());
    let _ = writeln!(o, "  \"world_size\": {},", opt_num(ck.sidecar().map(|s| s.world_size as u64)));
    o.push_str("  \"keys\": [");
    for (i, r) in rows.iter().enumerate() {
        o.push_str(if i == 0 { "\n" } else { ",\n" });
        let kind = if r.kind == KeyKind::Tensor { "tensor" } else { "object" };
        let _ = write!(o, "    {{\"key\": {}, \"kind\": \"{kind}\"", quote(r.fqn));
        if r.kind == KeyKind::Tensor {
            let _ = write!(
                o,
                ", \"dtype\": {}, \"shape\": {}, \"chunks\": {}",
                quote(r.dtype),
                json_list(r.shape),
                r.chunks.len()
            );
        } else {
            o.push_str(", \"dtype\": null, \"shape\": null, \"chunks\": null");
        }
        let _ = write!(o, ", \"bytes\": {}, \"stored_bytes\": {}", opt_num(r.bytes), r.stored);
        if chunks && r.kind == KeyKind::Tensor {
            o.push_str(", \"chunk_list\": [");
            for (j, c) in r.chunks.iter().enumerate() {
                if j > 0 {
                    o.push_str(", ");
                }
                let _ = write!(o, "{{\"offsets\": {}, \"sizes\": {}", json_list(&c.offsets), json_list(&c.sizes));
                match ck.storage_info(r.fqn, Some(&c.offsets)) {
                    Some(s) => {
                        let _ = write!(
                            o,
                            ", \"file\": {}, \"offset\": {}, \"length\": {}}}",
                            quote(&s.relative_path),
                            s.offset,
                            s.length
                        );
                    }
                    None => o.push_str(", \"file\": null, \"offset\": null, \"length\": null}"),
                }
            }
            o.push(']');
        }
        o.push('}');
    }
    o.push_str("\n  ],\n  \"files\": [");
    for (i, (name, f)) in files.iter().enumerate() {
        o.push_str(if i == 0 { "\n" } else { ",\n" });
        let _ = write!(
            o,
            "    {{\"name\": {}, \"rank\": {}, \"items\": {}, \"stored_bytes\": {}, \"size\": {}}}",
            quote(name),
            opt_num(rank_of(name)),
            f.items,
            f.stored,
            opt_num(f.size)
        );
    }
    o.push_str("\n  ],\n  \"ranks\": [");
    for (i, (rank, (nf, items, st))) in ranks.iter().enumerate() {
        o.push_str(if i == 0 { "\n" } else { ",\n" });
        let _ = write!(
            o,
            "    {{\"rank\": {}, \"files\": {nf}, \"items\": {items}, \"stored_bytes\": {st}}}",
            opt_num(*rank)
        );
    }
    let _ = write!(
        o,
        "\n  ],\n  \"totals\": {{\"keys\": {}, \"tensors\": {tensors}, \"objects\": {}, \"tensor_bytes\": {}, \"stored_bytes\": {}, \"files\": {}}}\n}}\n",
        rows.len(),
        rows.len() - tensors,
        tensor_bytes,
        stored,
        files.len()
    );
    o
}

#[cfg(test)]
mod tests {
    #[test]
    fn ranks_from_names() {
        assert_eq!(super::rank_of("__3_0.distcp"), Some(3));
        assert_eq!(super::rank_of("__12_5.distcp"), Some(12));
        assert_eq!(super::rank_of("other.bin"), None);
    }
}
