//! `dcp`: inspect, verify, diff and convert PyTorch Distributed Checkpoint directories with
//! libdcp; list and prune the checkpoint series a `CheckpointManager` keeps.

#![warn(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

mod cast;
mod convert;
mod diff;
mod error;
mod from_safetensors;
mod gc;
mod inspect;
mod json;
mod ls;
mod progress;
mod safetensors_file;
mod stream;
mod verify;

use clap::{error::ErrorKind, Parser, Subcommand};
use error::{CliError, CliResult};

const HELP: &str = "\
usage: dcp <command> [options]

Inspects, verifies, compares and converts PyTorch Distributed Checkpoint (DCP) directories,
written by torch.distributed.checkpoint or by libdcp; lists and prunes the series of them a
libdcp CheckpointManager saves under one root.

commands:
  inspect DIR [--json]             keys, dtypes, shapes, chunks, bytes; totals per file and rank
  verify DIR [--strict-pickles]    integrity: commit, sidecar, files, tiling, every zip CRC-32,
                                   what load refuses, pickles naming code to run
  diff A B                         keys and values that differ between two checkpoints
  convert DIR --to safetensors OUT_DIR
  convert FILE... --from safetensors OUT_DIR
                                   to and from Hugging Face safetensors
  ls ROOT [--json] [--verify]      the steps of a checkpoint series (CheckpointManager): status
                                   (whole / uncommitted / damaged and why), size, age, latest
  gc ROOT --keep-last K [--keep-every M] [--dry-run]
                                   deletes the steps a retention policy does not keep

Run 'dcp <command> --help' for a command's options. Exit status: 0 success, 1 failure (or, for
verify and diff, a problem or difference found), 2 usage error.";

/// The command line. The help texts are written by hand (`override_help`); positional
/// arguments are counted by each command, which names what is missing.
#[derive(Parser)]
#[command(name = "dcp", override_help = HELP, disable_version_flag = true, disable_help_subcommand = true)]
struct Cli {
    #[arg(short = 'V', long)]
    version: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    #[command(override_help = inspect::HELP, args_override_self = true)]
    Inspect(inspect::Args),
    #[command(override_help = verify::HELP, args_override_self = true)]
    Verify(verify::Args),
    #[command(override_help = diff::HELP, args_override_self = true)]
    Diff(diff::Args),
    #[command(override_help = convert::HELP, args_override_self = true)]
    Convert(convert::Args),
    #[command(override_help = ls::HELP, args_override_self = true)]
    Ls(ls::Args),
    #[command(override_help = gc::HELP, args_override_self = true)]
    Gc(gc::Args),
    /// `dcp help [COMMAND]`: a command's help, or the overview.
    #[command(hide = true)]
    Help { command: Option<String>, rest: Vec<String> },
}

const COMMANDS: [(&str, &str); 6] = [
    ("inspect", inspect::HELP),
    ("verify", verify::HELP),
    ("diff", diff::HELP),
    ("convert", convert::HELP),
    ("ls", ls::HELP),
    ("gc", gc::HELP),
];

/// A clap error as one line naming the command, or help printed (exit 0).
fn parse_error(e: clap::Error, argv: &[String]) -> CliError {
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return CliError {
            code: 0,
            message: String::new(),
        };
    }
    let rendered = e.render().to_string();
    let first = rendered.lines().next().unwrap_or("invalid arguments");
    let msg = first.strip_prefix("error: ").unwrap_or(first);
    match argv.get(1).filter(|a| COMMANDS.iter().any(|(n, _)| n == a)) {
        Some(cmd) => CliError::usage(cmd, msg),
        None => CliError {
            code: 2,
            message: format!("dcp: {msg} (see 'dcp --help')"),
        },
    }
}

fn run(argv: Vec<String>) -> CliResult {
    let cli = Cli::try_parse_from(&argv).map_err(|e| parse_error(e, &argv))?;
    if cli.version {
        println!("dcp ({})", dcp::writer_version());
        return Ok(());
    }
    match cli.command {
        None => Err(CliError {
            code: 2,
            message: "dcp: missing command (see 'dcp --help')".into(),
        }),
        Some(Command::Help { command, .. }) => {
            let help = COMMANDS.iter().find(|(n, _)| Some(*n) == command.as_deref());
            println!("{}", help.map_or(HELP, |(_, h)| h));
            Ok(())
        }
        Some(Command::Inspect(a)) => inspect::run(a),
        Some(Command::Verify(a)) => verify::run(a),
        Some(Command::Diff(a)) => diff::run(a),
        Some(Command::Convert(a)) => convert::run(a),
        Some(Command::Ls(a)) => ls::run(a),
        Some(Command::Gc(a)) => gc::run(a),
    }
}

fn main() {
    // Die quietly on a closed pipe (`dcp inspect DIR | head`), as other Unix tools do.
    // SAFETY: restores the default action of one signal, before any other thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let mut argv = vec!["dcp".to_string()];
    for a in std::env::args_os().skip(1) {
        match a.into_string() {
            Ok(s) => argv.push(s),
            Err(a) => {
                eprintln!("dcp: argument {a:?} is not valid UTF-8");
                std::process::exit(2);
            }
        }
    }
    let code = match run(argv) {
        Ok(()) => 0,
        Err(e) => {
            if !e.message.is_empty() {
                eprintln!("{}", e.message.replace(['\n', '\r'], " "));
            }
            e.code
        }
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &[&str]) -> Vec<String> {
        std::iter::once("dcp").chain(s.iter().copied()).map(String::from).collect()
    }

    fn parse(s: &[&str]) -> Result<Cli, CliError> {
        let a = argv(s);
        Cli::try_parse_from(&a).map_err(|e| parse_error(e, &a))
    }

    #[test]
    fn options_between_positionals_repeated_and_after_dashdash() {
        let Ok(Cli {
            command: Some(Command::Convert(c)),
            ..
        }) = parse(&[
            "convert",
            "a",
            "--to",
            "safetensors",
            "--filter",
            "x",
            "--filter=y",
            "--dtype",
            "f16",
            "--dtype=bf16",
            "--",
            "--prefix",
        ])
        else {
            panic!("convert parses")
        };
        assert_eq!(c.paths, ["a", "--prefix"]);
        assert_eq!(c.filter, ["x", "y"]);
        assert_eq!(c.dtype.as_deref(), Some("bf16"));
        assert_eq!(c.prefix, None);
        assert_eq!(parse(&["inspect", "--nope"]).err().unwrap().code, 2);
        assert_eq!(parse(&["convert", "--filter"]).err().unwrap().code, 2);
        assert_eq!(parse(&["inspect", "--json=1"]).err().unwrap().code, 2);
        let e = parse(&["inspect", "d", "--bogus"]).err().unwrap();
        assert!(
            e.message.starts_with("dcp inspect: ") && e.message.contains("--bogus"),
            "{}",
            e.message
        );
        let e = parse(&["frobnicate"]).err().unwrap();
        assert!(e.message.starts_with("dcp: ") && e.message.contains("frobnicate"), "{}", e.message);
    }
}
