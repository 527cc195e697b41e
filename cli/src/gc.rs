//! `dcp gc ROOT --keep-last K [--keep-every M] [--dry-run]`: applies a retention policy to a
//! checkpoint series by hand (`CheckpointManager::apply_retention`).

use crate::error::{CliError, CliResult};
use crate::ls;
use dcp::{ManagerPolicy, StepStatus};
use std::collections::BTreeSet;

pub const HELP: &str = "\
usage: dcp gc ROOT --keep-last K [--keep-every M] [--dry-run]

Deletes the steps of the checkpoint series under ROOT (a directory or s3://bucket/prefix) that
the retention policy does not keep, as a libdcp CheckpointManager does after each save, and
prints each step deleted. Kept:
  - the newest whole step (the one a resume picks), always;
  - the K newest whole steps;
  - whole steps that are multiples of M (--keep-every);
  - damaged steps newer than the newest whole one (left for inspection).
Deleted: every other step, uncommitted ones included. Each deletion is crash-safe: .metadata
goes first, so a step cut short looks uncommitted, never whole.
gc claims ROOT as a manager does: while another live manager (a job saving under ROOT) holds
it, gc fails with 'busy' and deletes nothing.

options:
  --keep-last K   whole steps to keep, newest first (at least 1)
  --keep-every M  also keep whole steps that are multiples of M, forever
  --dry-run       print what would be deleted, delete nothing (claims nothing)
  -h, --help      show this help";

/// The command line of `dcp gc` (see [`HELP`]).
#[derive(clap::Args)]
pub struct Args {
    #[arg(value_name = "ROOT")]
    pub roots: Vec<String>,
    #[arg(long, value_name = "K")]
    pub keep_last: Option<usize>,
    #[arg(long, value_name = "M")]
    pub keep_every: Option<u64>,
    #[arg(long)]
    pub dry_run: bool,
}

fn policy(args: &Args) -> CliResult<ManagerPolicy> {
    let keep_last = match args.keep_last {
        None => return Err(CliError::usage("gc", "missing --keep-last K")),
        Some(0) => return Err(CliError::usage("gc", "--keep-last is 0: the newest whole step is always kept")),
        Some(k) => k,
    };
    if args.keep_every == Some(0) {
        return Err(CliError::usage("gc", "--keep-every must be at least 1"));
    }
    Ok(ManagerPolicy::default().keep_last(keep_last).keep_every_steps(args.keep_every))
}

pub fn run(args: Args) -> CliResult {
    let root = ls::one_root("gc", &args.roots)?;
    let policy = policy(&args)?;
    if args.dry_run {
        return dry_run(root, &policy);
    }
    let manager = ls::open("gc", root, policy.clone())?;
    let fail = |e| ls::fail_at("gc", root, e);
    let before = manager.list().map_err(fail)?;
    let deleted = manager.apply_retention(&policy).map_err(fail)?;
    let after = manager.list().map_err(fail)?;
    manager.finish().map_err(fail)?;
    for step in &deleted {
        let health = before.iter().find(|s| s.step == *step).map(|s| s.health);
        println!(
            "deleted step {step}{}",
            health.map(|h| format!(" ({})", ls::short_status(h))).unwrap_or_default()
        );
    }
    println!("{}", summary("deleted", deleted.len(), &after));
    Ok(())
}

fn dry_run(root: &str, policy: &ManagerPolicy) -> CliResult {
    let manager = ls::open("gc", root, policy.clone().read_only(true))?;
    let fail = |e| ls::fail_at("gc", root, e);
    let steps = manager.list().map_err(fail)?;
    let doomed: BTreeSet<u64> = manager.retention_preview(policy).map_err(fail)?.into_iter().collect();
    for s in steps.iter().filter(|s| doomed.contains(&s.step)) {
        println!("would delete step {} ({})", s.step, ls::short_status(s.health));
    }
    let kept: Vec<StepStatus> = steps.into_iter().filter(|s| !doomed.contains(&s.step)).collect();
    println!("{} (dry run: nothing deleted)", summary("would delete", doomed.len(), &kept));
    Ok(())
}

/// `deleted 2 steps, kept 3 (1, 4, 6); latest: step 6`.
fn summary(verb: &str, deleted: usize, kept: &[StepStatus]) -> String {
    let steps: Vec<String> = kept.iter().map(|s| s.step.to_string()).collect();
    let latest = kept
        .iter()
        .find(|s| s.latest)
        .map_or("none".to_string(), |s| format!("step {}", s.step));
    format!(
        "{verb} {deleted} step{}, kept {} ({}); latest: {latest}",
        if deleted == 1 { "" } else { "s" },
        kept.len(),
        steps.join(", ")
    )
}
