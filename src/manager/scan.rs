//! The root of a manager and what is in it: which steps exist, and whether each is whole.
//!
//! Steps are found two ways, so that the listing works on every backend: a marker object
//! `.libdcp_step-{step:08}` that the manager writes at the root before a step's save starts
//! (and removes last when it deletes the step), and, on a local root, the `step-*`
//! directories themselves (steps copied in by hand).

use super::{Damage, StepHealth};
use crate::engine::layout::{self, METADATA_FILE};
use crate::error::{Error, ErrorKind, Result};
use crate::storage::Storage;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

const STEP_PREFIX: &str = "step-";
const MARKER_PREFIX: &str = ".libdcp_step-";

/// `step-{step:08}`: the directory (or prefix) of a step under the root.
pub fn step_dir_name(step: u64) -> String {
    format!("{STEP_PREFIX}{step:08}")
}

/// The root-level marker of a step.
pub fn marker_name(step: u64) -> String {
    format!("{MARKER_PREFIX}{step:08}")
}

fn parse_step(digits: &str) -> Option<u64> {
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// The step a root-level name stands for (a marker), if any.
fn step_of_marker(name: &str) -> Option<u64> {
    parse_step(name.strip_prefix(MARKER_PREFIX)?)
}

/// The step a directory name stands for, if any.
fn step_of_dir(name: &str) -> Option<u64> {
    parse_step(name.strip_prefix(STEP_PREFIX)?)
}

/// A manager's root: a local directory or an `s3://` prefix.
pub struct Root {
    /// The root as given, without a trailing `/`.
    pub url: String,
    /// The root itself (the claim and the step markers live here).
    pub storage: Arc<dyn Storage>,
    /// The directory, for a local root.
    pub local: Option<PathBuf>,
}

impl Root {
    pub fn open(ctx: &crate::engine::Context, root: &str) -> Result<Root> {
        let url = if root.len() > 1 { root.trim_end_matches('/') } else { root };
        if url.is_empty() {
            return Err(Error::invalid("checkpoint root is empty"));
        }
        let storage = ctx.open_storage(url)?;
        let local = (!url.starts_with("s3://")).then(|| PathBuf::from(url));
        Ok(Root {
            url: url.to_string(),
            storage,
            local,
        })
    }

    /// The location of a step, as save and load take it.
    pub fn step_location(&self, step: u64) -> String {
        match &self.local {
            Some(dir) => dir.join(step_dir_name(step)).to_string_lossy().into_owned(),
            None => format!("{}/{}", self.url, step_dir_name(step)),
        }
    }

    /// The local directory of a step.
    pub fn step_dir(&self, step: u64) -> Option<PathBuf> {
        self.local.as_ref().map(|d| d.join(step_dir_name(step)))
    }

    /// Every step that has a marker or (local roots) a directory, ascending.
    pub fn steps(&self) -> Result<Vec<u64>> {
        let mut steps: Vec<u64> = match self.storage.list() {
            Ok(names) => names.iter().filter_map(|n| step_of_marker(n)).collect(),
            // A local root that does not exist yet has no steps.
            Err(_) if self.local.as_ref().is_some_and(|d| !d.exists()) => return Ok(Vec::new()),
            Err(e) => return Err(e.context("listing the checkpoint root")),
        };
        if let Some(dir) = &self.local {
            let rd = std::fs::read_dir(dir).map_err(|e| Error::io("listing", dir, e))?;
            for entry in rd {
                let entry = entry.map_err(|e| Error::io("listing", dir, e))?;
                let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
                if let (true, Some(step)) = (is_dir, step_of_dir(&entry.file_name().to_string_lossy())) {
                    steps.push(step);
                }
            }
        }
        steps.sort_unstable();
        steps.dedup();
        Ok(steps)
    }
}

/// Whether a step is whole, and if not why (the message says which file and what is wrong).
/// An error means the step could not be looked at (the storage failed), not that it is damaged:
/// a job must not restart from scratch because a bucket was briefly unreachable.
pub fn check_step(storage: &dyn Storage, location: &str, full_verify: bool) -> Result<(StepHealth, String)> {
    let cheap = cheap_check(storage)?;
    if cheap.0 != StepHealth::Whole || !full_verify {
        return Ok(cheap);
    }
    let report = crate::engine::verify::verify_storage_with(storage, location, &Default::default(), &mut |_, _| {});
    if report.is_ok() {
        return Ok(cheap);
    }
    let shown: Vec<String> = report.problems.iter().take(3).map(|p| p.to_string()).collect();
    let more = report.problems.len().saturating_sub(shown.len());
    let mut message = format!("full verify failed: {}", shown.join("; "));
    if more > 0 {
        message.push_str(&format!(" (and {more} more problems)"));
    }
    Ok((StepHealth::Damaged(Damage::Checksum), message))
}

fn damaged(damage: Damage, message: String) -> Result<(StepHealth, String)> {
    Ok((StepHealth::Damaged(damage), message))
}

/// `.metadata` parses and matches its sidecar, and every data file is there with the length
/// the sidecar records (or, without a sidecar, long enough for every item in it).
fn cheap_check(storage: &dyn Storage) -> Result<(StepHealth, String)> {
    if !storage.exists(METADATA_FILE)? {
        // A step whose directory is gone (only its marker is left) lists nothing.
        let empty = storage.list().map(|l| l.is_empty()).unwrap_or(true);
        let what = if empty { "empty" } else { "files but no .metadata" };
        return Ok((
            StepHealth::Uncommitted,
            format!("not committed ({what}: a save that did not finish, or a deletion that did not)"),
        ));
    }
    let opened = match layout::open(storage) {
        Ok(o) => o,
        Err(e) => return classify_open_error(e),
    };
    let mut needed: BTreeMap<&str, u64> = BTreeMap::new();
    for (_, info) in &opened.metadata.storage {
        let end = info.offset.saturating_add(info.length);
        let n = needed.entry(info.relative_path.as_str()).or_insert(0);
        *n = (*n).max(end);
    }
    let tokened = needed.keys().any(|n| layout::parse_data_file(n).is_some_and(|p| p.2.is_some()));
    let exact: BTreeMap<&str, u64> = match &opened.sidecar {
        Some(sc) => sc.files.iter().map(|f| (f.name.as_str(), f.len)).collect(),
        None if tokened => {
            let name = layout::sidecar_candidates(&opened.metadata).remove(0);
            if !storage.exists(&name)? {
                return damaged(
                    Damage::MissingFile,
                    format!("{} is missing (the sidecar that records the data files)", storage.describe(&name)),
                );
            }
            BTreeMap::new()
        }
        None => BTreeMap::new(),
    };
    for (name, at_least) in &needed {
        let len = match storage.open_read(name) {
            Ok(h) => h.len(),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return damaged(Damage::MissingFile, format!("data file {} is missing", storage.describe(name)));
            }
            Err(e) => return Err(e),
        };
        if let Some(&want) = exact.get(name) {
            if len != want {
                return damaged(
                    Damage::SizeMismatch,
                    format!("data file {} has {len} bytes, its sidecar records {want}", storage.describe(name)),
                );
            }
        } else if len < *at_least {
            return damaged(
                Damage::SizeMismatch,
                format!(
                    "data file {} has {len} bytes, but .metadata places items up to byte {at_least}",
                    storage.describe(name)
                ),
            );
        }
    }
    Ok((StepHealth::Whole, String::new()))
}

fn classify_open_error(e: Error) -> Result<(StepHealth, String)> {
    let message = e.message().to_string();
    match e.kind() {
        ErrorKind::NotFound => Ok((StepHealth::Uncommitted, message)),
        ErrorKind::Checksum => damaged(Damage::Checksum, message),
        ErrorKind::Corrupt | ErrorKind::Unsupported | ErrorKind::InvalidArgument => damaged(Damage::UnreadableMetadata, message),
        _ => Err(e),
    }
}

/// Bytes a step holds (its files) and when it was committed, in seconds since the epoch
/// (local roots only).
pub fn usage(storage: &dyn Storage, dir: Option<&std::path::Path>) -> Result<(u64, Option<u64>)> {
    let mut bytes = 0u64;
    for name in storage.list().unwrap_or_default() {
        match storage.open_read(&name) {
            Ok(h) => bytes += h.len(),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let modified = dir.and_then(|d| {
        let m = std::fs::metadata(d.join(METADATA_FILE)).or_else(|_| std::fs::metadata(d)).ok()?;
        let t = m.modified().ok()?;
        t.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs())
    });
    Ok((bytes, modified))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_names() {
        assert_eq!(step_dir_name(10), "step-00000010");
        assert_eq!(step_of_dir("step-00000010"), Some(10));
        assert_eq!(step_of_dir("step-123456789"), Some(123_456_789));
        assert_eq!(step_of_marker(&marker_name(7)), Some(7));
        for bad in ["step-", "step-1a", "steps-1", "step--1", ".libdcp_step-"] {
            assert_eq!(step_of_dir(bad).or(step_of_marker(bad)), None, "{bad}");
        }
    }
}
