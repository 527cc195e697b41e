//! `dcp ls ROOT [--json] [--verify]`: the steps a checkpoint manager keeps under ROOT, each
//! with its status, size and age, and the one a resume would pick (`CheckpointManager::list`).

use crate::error::{CliError, CliResult};
use crate::json::quote;
use crate::progress::human_bytes;
use dcp::{CheckpointManager, Context, Damage, ManagerPolicy, StepHealth, StepStatus};
use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

pub const HELP: &str = "\
usage: dcp ls ROOT [--json] [--verify]

Lists the steps of a checkpoint series under ROOT (a directory or s3://bucket/prefix, with the
step-NNNNNNNN checkpoints a libdcp CheckpointManager saves), oldest first: the step, its size,
its age (local roots only) and its status:
  whole        committed, and the cheap check holds (.metadata matches its sidecar, every
               data file is there with the recorded length)
  uncommitted  no .metadata: a save that did not finish, or a deletion that did not
  damaged      committed, but a file is missing or torn, or a checksum or .metadata is bad;
               the reason names the file
The step marked '*' is the one a resume (CheckpointManager::latest) would pick: the newest
whole step. Nothing is claimed or changed: this works while a job is saving under ROOT.
S3 settings come from the AWS environment variables, as for the other commands.

options:
  --json     print one JSON document instead of the table
  --verify   also check every CRC-32 of every whole step (reads it all), as a resume with
             full_verify_on_resume does; a mismatch makes the step damaged (checksum)
  -h, --help show this help";

/// The command line of `dcp ls` (see [`HELP`]).
#[derive(clap::Args)]
pub struct Args {
    #[arg(value_name = "ROOT")]
    pub roots: Vec<String>,
    #[arg(long)]
    pub json: bool,
    #[arg(long)]
    pub verify: bool,
}

/// The one ROOT of `cmd`'s positional arguments.
pub fn one_root<'a>(cmd: &str, roots: &'a [String]) -> CliResult<&'a str> {
    match roots {
        [root] => Ok(root),
        [] => Err(CliError::usage(cmd, "missing ROOT")),
        _ => Err(CliError::usage(cmd, "expects exactly one ROOT")),
    }
}

/// `cmd`'s failure at `root`, in one line that names the root.
pub fn fail_at(cmd: &str, root: &str, e: dcp::Error) -> CliError {
    let mut message = e.message().to_string();
    if !message.contains(root.trim_end_matches('/')) {
        message = format!("{root}: {message}");
    }
    if e.kind() == dcp::ErrorKind::Busy {
        message.push_str(" (busy: run it again once that manager finished or its claim expired)");
    }
    CliError::fail(cmd, message)
}

/// Opens the series at `root`. A local root must be an existing directory: opening a manager
/// would otherwise create it.
pub fn open(cmd: &str, root: &str, policy: ManagerPolicy) -> CliResult<CheckpointManager> {
    if !root.starts_with("s3://") && !std::path::Path::new(root).is_dir() {
        return Err(CliError::fail(cmd, format!("{root}: no such directory")));
    }
    CheckpointManager::open(&Context::local(), root, policy).map_err(|e| fail_at(cmd, root, e))
}

/// Lists the steps under `root` without claiming it.
pub fn list(cmd: &str, root: &str, full_verify: bool) -> CliResult<Vec<StepStatus>> {
    let policy = ManagerPolicy::default().read_only(true).full_verify_on_resume(full_verify);
    let manager = open(cmd, root, policy)?;
    manager.list().map_err(|e| fail_at(cmd, root, e))
}

pub fn run(args: Args) -> CliResult {
    let root = one_root("ls", &args.roots)?;
    let steps = list("ls", root, args.verify)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let out = if args.json {
        to_json(root, &steps)
    } else {
        to_text(root, &steps, now)
    };
    print!("{out}");
    Ok(())
}

/// A damage kind as one word (JSON) and as the text's short reason.
fn damage_name(d: Damage) -> (&'static str, &'static str) {
    match d {
        Damage::MissingFile => ("missing_file", "missing file"),
        Damage::SizeMismatch => ("size_mismatch", "torn"),
        Damage::Checksum => ("checksum", "checksum"),
        Damage::UnreadableMetadata => ("unreadable_metadata", "unreadable metadata"),
        _ => ("other", "damaged"),
    }
}

/// `whole`, `uncommitted` or `damaged`, and the damage kind's JSON name.
pub fn status_name(h: StepHealth) -> (&'static str, Option<&'static str>) {
    match h {
        StepHealth::Whole => ("whole", None),
        StepHealth::Uncommitted => ("uncommitted", None),
        StepHealth::Damaged(d) => ("damaged", Some(damage_name(d).0)),
    }
}

/// `whole`, `uncommitted` or `damaged (kind)`.
pub fn short_status(h: StepHealth) -> String {
    match h {
        StepHealth::Damaged(d) => format!("damaged ({})", damage_name(d).1),
        other => status_name(other).0.to_string(),
    }
}

/// The status column: `whole`, `uncommitted: why` or `damaged (kind): why`.
fn status_text(s: &StepStatus) -> String {
    match (s.health, s.message.strip_prefix("not committed (")) {
        (StepHealth::Whole, _) => short_status(s.health),
        (StepHealth::Uncommitted, Some(why)) => format!("uncommitted ({why}"),
        _ => format!("{}: {}", short_status(s.health), s.message),
    }
}

/// `45s`, `12m`, `3h`, `5d`; `-` when unknown (S3 roots).
fn human_age(modified: Option<u64>, now: u64) -> String {
    let Some(t) = modified else { return "-".to_string() };
    let secs = now.saturating_sub(t);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 120 * 60 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn latest_line(steps: &[StepStatus]) -> String {
    match steps.iter().find(|s| s.latest) {
        Some(s) => format!("latest: step {} ({})", s.step, s.location),
        None => "latest: none (no whole step)".to_string(),
    }
}

fn to_text(root: &str, steps: &[StepStatus], now: u64) -> String {
    let mut o = String::new();
    let n = steps.len();
    let _ = writeln!(o, "root  {root} ({n} step{})", if n == 1 { "" } else { "s" });
    if n == 0 {
        let _ = writeln!(o, "{}", latest_line(steps));
        return o;
    }
    let rows: Vec<[String; 4]> = steps
        .iter()
        .map(|s| {
            [
                s.step.to_string(),
                human_bytes(s.bytes),
                human_age(s.modified_unix_seconds, now),
                status_text(s),
            ]
        })
        .collect();
    let width = |i: usize, head: &str| rows.iter().map(|r| r[i].len()).chain([head.len()]).max().unwrap_or(0);
    let (ws, wb, wa) = (width(0, "STEP"), width(1, "SIZE"), width(2, "AGE"));
    let _ = writeln!(o, "\n  {:<ws$}  {:>wb$}  {:>wa$}  STATUS", "STEP", "SIZE", "AGE");
    for (s, r) in steps.iter().zip(&rows) {
        let mark = if s.latest { '*' } else { ' ' };
        let _ = writeln!(o, "{mark} {:<ws$}  {:>wb$}  {:>wa$}  {}", r[0], r[1], r[2], r[3]);
    }
    let _ = writeln!(o, "\n{}", latest_line(steps));
    o
}

fn to_json(root: &str, steps: &[StepStatus]) -> String {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "null".into());
    let mut o = String::new();
    let _ = writeln!(o, "{{");
    let _ = writeln!(o, "  \"root\": {},", quote(root));
    let _ = writeln!(
        o,
        "  \"latest\": {},",
        opt(steps.iter().find(|s| s.latest).map(|s| s.step.to_string()))
    );
    let _ = writeln!(o, "  \"steps\": [");
    for (i, s) in steps.iter().enumerate() {
        let (status, damage) = status_name(s.health);
        let _ = writeln!(
            o,
            "    {{\"step\": {}, \"status\": \"{status}\", \"damage\": {}, \"message\": {}, \"bytes\": {}, \"modified_unix_seconds\": {}, \"latest\": {}, \"location\": {}}}{}",
            s.step,
            opt(damage.map(quote)),
            quote(&s.message),
            s.bytes,
            opt(s.modified_unix_seconds.map(|t| t.to_string())),
            s.latest,
            quote(&s.location),
            if i + 1 < steps.len() { "," } else { "" }
        );
    }
    let _ = writeln!(o, "  ]");
    let _ = writeln!(o, "}}");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages() {
        assert_eq!(human_age(None, 10), "-");
        assert_eq!(human_age(Some(100), 145), "45s");
        assert_eq!(human_age(Some(0), 12 * 60), "12m");
        assert_eq!(human_age(Some(0), 3 * 3600), "3h");
        assert_eq!(human_age(Some(0), 5 * 86400), "5d");
        assert_eq!(human_age(Some(50), 10), "0s");
    }
}
