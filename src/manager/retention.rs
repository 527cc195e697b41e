//! Which steps a policy deletes, and deleting one so that a crash at any point never leaves
//! something that looks whole: `.metadata` first (the step is uncommitted from then on), then
//! the sidecar and data files, then the directory, then the step's marker at the root.

use super::policy::ManagerPolicy;
use super::scan::{self, Root};
use super::StepHealth;
use crate::engine::layout::METADATA_FILE;
use crate::error::{Error, Result};
use std::collections::BTreeSet;

/// The steps to delete, given every step's health (ascending), the newest whole step, and
/// the steps that must stay (being loaded or saved in this process). Kept: the newest whole
/// step, the `keep_last` newest whole steps, whole steps that are multiples of
/// `keep_every_steps`, and damaged steps newer than the newest whole one (for inspection;
/// saving that step again replaces them). Deleted: every other step, uncommitted ones
/// included (a save that did not finish, or a deletion that did not).
pub fn to_delete(steps: &[(u64, StepHealth)], newest_whole: Option<u64>, policy: &ManagerPolicy, protected: &BTreeSet<u64>) -> Vec<u64> {
    let recent_whole: BTreeSet<u64> = steps
        .iter()
        .rev()
        .filter(|(_, h)| *h == StepHealth::Whole)
        .take(policy.keep_last.max(1))
        .map(|(s, _)| *s)
        .collect();
    let keep = |step: u64, health: StepHealth| -> bool {
        if protected.contains(&step) || Some(step) == newest_whole {
            return true;
        }
        match health {
            StepHealth::Whole => recent_whole.contains(&step) || policy.keeps_forever(step),
            StepHealth::Uncommitted => false,
            StepHealth::Damaged(_) => newest_whole.is_none_or(|n| step > n),
        }
    };
    steps.iter().filter(|(s, h)| !keep(*s, *h)).map(|(s, _)| *s).collect()
}

/// Deletes one step, crash-safely (see the module documentation).
pub fn delete_step(ctx: &crate::engine::Context, root: &Root, step: u64) -> Result<()> {
    let location = root.step_location(step);
    let dir_gone = root.step_dir(step).is_some_and(|d| !d.exists());
    if !dir_gone {
        let storage = ctx.open_storage(&location)?;
        let failed = |e: Error| e.context(format!("deleting step {step} ({location})"));
        storage.remove(METADATA_FILE).map_err(failed)?;
        storage.sync_dir().map_err(failed)?;
        for name in storage.list().map_err(failed)? {
            storage.remove(&name).map_err(failed)?;
        }
        storage.sync_dir().map_err(failed)?;
        if let Some(dir) = root.step_dir(step) {
            match std::fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(failed(Error::io("removing directory", &dir, e))),
            }
        }
    }
    root.storage.remove(&scan::marker_name(step))?;
    root.storage.sync_dir()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::Damage;

    fn whole(steps: &[u64]) -> Vec<(u64, StepHealth)> {
        steps.iter().map(|&s| (s, StepHealth::Whole)).collect()
    }

    #[test]
    fn keeps_the_last_and_every_mth() {
        let policy = ManagerPolicy::default().keep_last(2).keep_every_steps(Some(4));
        let steps = whole(&[0, 2, 4, 6, 8, 10]);
        assert_eq!(to_delete(&steps, Some(10), &policy, &BTreeSet::new()), vec![2, 6]);
        assert_eq!(to_delete(&steps, Some(10), &policy, &BTreeSet::from([6])), vec![2]);
    }

    #[test]
    fn the_newest_whole_step_stays_whatever_is_newer() {
        let policy = ManagerPolicy::default().keep_last(1);
        let mut steps = whole(&[1, 2]);
        steps.push((3, StepHealth::Damaged(Damage::Checksum)));
        steps.push((4, StepHealth::Uncommitted));
        assert_eq!(to_delete(&steps, Some(2), &policy, &BTreeSet::new()), vec![1, 4]);
        let broken = [(1, StepHealth::Damaged(Damage::MissingFile)), (2, StepHealth::Uncommitted)];
        assert_eq!(to_delete(&broken, None, &policy, &BTreeSet::new()), vec![2]);
    }
}
