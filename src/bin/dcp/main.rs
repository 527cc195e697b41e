//! `dcp`: inspect, verify, diff and convert PyTorch Distributed Checkpoint directories with
//! libdcp.

mod args;
mod cast;
mod convert;
mod diff;
mod from_safetensors;
mod inspect;
mod progress;
mod stream;
mod verify;

use args::{CliError, CliResult, Parsed, Spec};

const HELP: &str = "\
usage: dcp <command> [options]

Inspects, verifies, compares and converts PyTorch Distributed Checkpoint (DCP) directories,
written by torch.distributed.checkpoint or by libdcp.

commands:
  inspect DIR [--json]             keys, dtypes, shapes, chunks, bytes; totals per file and rank
  verify DIR [--strict-pickles]    integrity: commit, sidecar, files, tiling, every zip CRC-32,
                                   what load refuses, pickles naming code to run
  diff A B                         keys and values that differ between two checkpoints
  convert DIR --to safetensors OUT_DIR
  convert FILE... --from safetensors OUT_DIR
                                   to and from Hugging Face safetensors

Run 'dcp <command> --help' for a command's options. Exit status: 0 success, 1 failure (or, for
verify and diff, a problem or difference found), 2 usage error.";

struct Command {
    spec: Spec,
    help: &'static str,
    run: fn(args::Args) -> CliResult,
}

const COMMANDS: [Command; 4] = [
    Command {
        spec: Spec {
            name: "inspect",
            flags: &["json", "chunks"],
            options: &[],
        },
        help: inspect::HELP,
        run: inspect::run,
    },
    Command {
        spec: Spec {
            name: "verify",
            flags: &["strict-pickles"],
            options: &[],
        },
        help: verify::HELP,
        run: verify::run,
    },
    Command {
        spec: Spec {
            name: "diff",
            flags: &[],
            options: &[],
        },
        help: diff::HELP,
        run: diff::run,
    },
    Command {
        spec: Spec {
            name: "convert",
            flags: &["overwrite"],
            options: &["to", "from", "filter", "strip-prefix", "dtype", "max-shard-size", "prefix"],
        },
        help: convert::HELP,
        run: convert::run,
    },
];

fn run(argv: Vec<String>) -> CliResult {
    let Some(cmd) = argv.first() else {
        return Err(CliError {
            code: 2,
            message: "dcp: missing command (see 'dcp --help')".into(),
        });
    };
    match cmd.as_str() {
        "-h" | "--help" => {
            println!("{HELP}");
            return Ok(());
        }
        "-V" | "--version" => {
            println!("dcp ({})", dcp::engine::writer_version());
            return Ok(());
        }
        "help" => {
            match argv.get(1).and_then(|n| COMMANDS.iter().find(|c| c.spec.name == n)) {
                Some(c) => println!("{}", c.help),
                None => println!("{HELP}"),
            }
            return Ok(());
        }
        _ => {}
    }
    let c = COMMANDS.iter().find(|c| c.spec.name == cmd).ok_or_else(|| CliError {
        code: 2,
        message: format!("dcp: unknown command {cmd:?} (see 'dcp --help')"),
    })?;
    match args::parse(&c.spec, &argv[1..])? {
        Parsed::Help => {
            println!("{}", c.help);
            Ok(())
        }
        Parsed::Args(a) => (c.run)(a),
    }
}

fn main() {
    // Die quietly on a closed pipe (`dcp inspect DIR | head`), as other Unix tools do.
    // SAFETY: restores the default disposition (no handler function involved), before any
    // thread is started.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let mut argv = Vec::new();
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
