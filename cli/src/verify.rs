//! `dcp verify DIR`: prints the library's integrity report (`dcp::verify_with_options`).

use crate::error::{CliError, CliResult};
use crate::progress::{human_bytes, Progress};
use dcp::{verify_with_options, VerifyOptions};

pub const HELP: &str = "\
usage: dcp verify DIR [--strict-pickles]

Checks the checkpoint in DIR and lists every problem with its key, file and offset:
  - committed: .metadata is present and parses;
  - the .libdcp sidecar (when present) matches .metadata's length and CRC-32, and every data
    file exists with the length the sidecar records;
  - every storage entry lies inside its file, items do not overlap;
  - the chunks of every tensor tile its global shape exactly (no gap, no overlap);
  - every item is a torch.save zip archive whose records all match the CRC-32 of their
    central-directory entries (torch's own loader never checks these), the item holds what
    .metadata says (tensor dtype and shape, or an object), and the sidecar's per-4 MiB-block
    CRC-32s of large tensors match;
  - everything load refuses is a problem: compressed records, dtypes or storage types libdcp
    does not read, items that do not parse (tensor or object), items sharing bytes;
  - every pickle (.metadata, each item's data.pkl) is scanned, without running it, for the
    globals it names: any outside torch's own checkpoint classes (DCP metadata, tensor rebuild
    functions, storages, dtypes, torch.Size, plain containers) is reported as a note, since
    Python's pickle.load imports and may call it when torch opens the checkpoint without
    weights_only=True (os.system, builtins.eval, ...).
Data is read in 8 MiB pieces. Exit status: 0 when everything holds, 1 otherwise.

options:
  --strict-pickles  a pickle naming anything outside that allowlist is a failure
  -h, --help        show this help";

/// The command line of `dcp verify` (see [`HELP`]).
#[derive(clap::Args)]
pub struct Args {
    #[arg(value_name = "DIR")]
    pub dirs: Vec<String>,
    #[arg(long)]
    pub strict_pickles: bool,
}

pub fn run(args: Args) -> CliResult {
    let [dir] = args.dirs.as_slice() else {
        return Err(CliError::usage(
            "verify",
            if args.dirs.is_empty() {
                "missing DIR"
            } else {
                "expects exactly one DIR"
            },
        ));
    };
    let mut bar = Progress::new("verify", 0);
    let opts = VerifyOptions::default().strict_pickles(args.strict_pickles);
    let report = verify_with_options(dir, &opts, &mut |done, total| {
        bar.set_total(total);
        bar.update(done);
    })
    .map_err(|e| CliError::fail("verify", e))?;
    bar.clear();
    for n in &report.notes {
        println!("note: {n}");
    }
    for p in &report.problems {
        println!("FAIL: {p}");
    }
    if report.is_ok() {
        println!(
            "ok: {dir}: {} keys, {} items in {} file{}; {} zip records, {} sidecar blocks and {} pickles checked ({}){}",
            report.keys,
            report.items,
            report.files,
            if report.files == 1 { "" } else { "s" },
            report.records,
            report.blocks,
            report.pickles,
            human_bytes(report.bytes_checked),
            if report.sidecar {
                "; sidecar matches"
            } else {
                "; no sidecar (written by torch)"
            }
        );
        Ok(())
    } else {
        let n = report.problems.len();
        Err(CliError::fail(
            "verify",
            format!("{n} problem{} found in {dir}", if n == 1 { "" } else { "s" }),
        ))
    }
}
