//! The claim on a root: a lease file `.libdcp_manager` that one manager holds at a time, so
//! that two jobs saving under one root (a restarted job racing its predecessor) do not delete
//! each other's checkpoints.
//!
//! The lease is a few lines of text: an owner id (random, per manager), the host and process
//! that hold it, and when it expires (milliseconds since the epoch). It is taken create-only
//! (`put_new`), renewed by the holder before each save and retention (`put_atomic`), and
//! released when the manager finishes. A lease past its expiry, or one whose holder is a
//! process of this host that no longer exists, may be taken over; a holder checks the lease is
//! still its own before each save and retention, so a stale holder stops with `Busy`.

use crate::error::{Error, ErrorKind, Result};
use crate::storage::Storage;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The lease's name at the root.
pub const LEASE_FILE: &str = ".libdcp_manager";
const HEADER: &str = "libdcp manager lease 1";
/// A lease file larger than this is not one.
const MAX_LEASE_BYTES: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub owner: String,
    pub host: String,
    pub pid: u32,
    pub expires_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn random_owner() -> String {
    format!("{:016x}", crate::host::random_u64())
}

/// Whether process `pid` of this host exists (a process that exists but is not ours counts).
fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: signal 0 sends nothing; kill only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

impl Lease {
    fn encode(&self) -> Vec<u8> {
        format!(
            "{HEADER}\nowner={}\nhost={}\npid={}\nexpires_ms={}\n",
            self.owner, self.host, self.pid, self.expires_ms
        )
        .into_bytes()
    }

    fn decode(bytes: &[u8]) -> Option<Lease> {
        if bytes.len() > MAX_LEASE_BYTES {
            return None;
        }
        let text = std::str::from_utf8(bytes).ok()?;
        let mut lines = text.lines();
        if lines.next()? != HEADER {
            return None;
        }
        let (mut owner, mut host, mut pid, mut expires_ms) = (None, None, None, None);
        for line in lines {
            let (k, v) = line.split_once('=')?;
            match k {
                "owner" => owner = Some(v.to_string()),
                "host" => host = Some(v.to_string()),
                "pid" => pid = v.parse().ok(),
                "expires_ms" => expires_ms = v.parse().ok(),
                _ => {}
            }
        }
        Some(Lease {
            owner: owner?,
            host: host?,
            pid: pid?,
            expires_ms: expires_ms?,
        })
    }

    /// Whether the holder may still be at work: not expired, and not a process of this host
    /// that is gone.
    fn is_live(&self, now_ms: u64) -> bool {
        let gone = self.host == crate::host::hostname() && self.pid != std::process::id() && !process_exists(self.pid);
        now_ms < self.expires_ms && !gone
    }

    fn describe(&self, now_ms: u64) -> String {
        let left = self.expires_ms.saturating_sub(now_ms) / 1000;
        format!(
            "manager {} (host {}, pid {}), whose claim expires in {left} s unless renewed",
            self.owner, self.host, self.pid
        )
    }
}

/// This manager's claim (held by rank 0).
pub struct Claim {
    storage: Arc<dyn Storage>,
    mine: Lease,
    lease_ms: u64,
}

impl Claim {
    /// Takes the root's lease: a new one, or one that expired or whose holder is gone.
    pub fn acquire(storage: Arc<dyn Storage>, lease_seconds: u64) -> Result<Claim> {
        storage.prepare()?;
        let lease_ms = lease_seconds.saturating_mul(1000);
        let mut claim = Claim {
            storage,
            mine: Lease {
                owner: random_owner(),
                host: crate::host::hostname(),
                pid: std::process::id(),
                expires_ms: 0,
            },
            lease_ms,
        };
        claim.mine.expires_ms = now_ms().saturating_add(lease_ms);
        match claim.storage.put_new(LEASE_FILE, &claim.mine.encode()) {
            Ok(()) => return Ok(claim),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e.context("taking the claim on the checkpoint root")),
        }
        let held = claim.read()?;
        let now = now_ms();
        if let Some(h) = held.as_ref().filter(|h| h.is_live(now)) {
            return Err(claim.busy(&format!("it is claimed by {}", h.describe(now))));
        }
        // Expired, or its holder is gone: take it over, then read it back (two managers
        // taking over at once: the last write wins and the other one sees it).
        claim.storage.put_atomic(LEASE_FILE, &claim.mine.encode())?;
        std::thread::sleep(Duration::from_millis(50));
        claim.confirm()?;
        Ok(claim)
    }

    /// The lease as stored (`None`: missing or unreadable).
    /// A lease file larger than any lease is unreadable, and is not read into memory.
    fn read(&self) -> Result<Option<Lease>> {
        let file = match self.storage.open_read(LEASE_FILE) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.context("reading the claim on the checkpoint root")),
        };
        if file.len() > MAX_LEASE_BYTES as u64 {
            return Ok(None);
        }
        let bytes = file
            .read_vec(0, file.len() as usize)
            .map_err(|e| e.context("reading the claim on the checkpoint root"))?;
        Ok(Lease::decode(&bytes))
    }

    fn busy(&self, why: &str) -> Error {
        Error::new(
            ErrorKind::Busy,
            format!(
                "checkpoint root {} is not this manager's: {why}",
                self.storage.describe("").trim_end_matches('/')
            ),
        )
        .with_file(LEASE_FILE)
    }

    /// Fails with `Busy` unless the lease is still this manager's.
    fn confirm(&self) -> Result<()> {
        match self.read()? {
            Some(l) if l.owner == self.mine.owner => Ok(()),
            Some(l) => Err(self.busy(&format!("it was taken over by {}", l.describe(now_ms())))),
            None => Err(self.busy(&format!(
                "its claim {} is missing or unreadable (removed by hand?)",
                self.storage.describe(LEASE_FILE)
            ))),
        }
    }

    /// Before a save or retention: checks the lease is still ours and extends it.
    pub fn confirm_and_renew(&mut self) -> Result<()> {
        self.confirm()?;
        self.mine.expires_ms = now_ms().saturating_add(self.lease_ms);
        self.storage.put_atomic(LEASE_FILE, &self.mine.encode())
    }

    /// Gives the root up, if it is still ours.
    pub fn release(&self) -> Result<()> {
        self.confirm()?;
        self.storage.remove(LEASE_FILE)?;
        self.storage.sync_dir()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_round_trip_and_liveness() {
        let l = Lease {
            owner: "00ff".into(),
            host: "h".into(),
            pid: 7,
            expires_ms: 123,
        };
        assert_eq!(Lease::decode(&l.encode()), Some(l.clone()));
        assert_eq!(Lease::decode(b"garbage"), None);
        assert_eq!(Lease::decode(format!("{HEADER}\nowner=1\n").as_bytes()), None);
        let now = now_ms();
        let here = Lease {
            host: crate::host::hostname(),
            pid: std::process::id(),
            expires_ms: now + 10_000,
            ..l
        };
        assert!(here.is_live(now));
        assert!(!here.is_live(now + 20_000));
        // A process of this host that does not exist holds nothing.
        let gone = Lease { pid: u32::MAX - 1, ..here };
        assert!(!gone.is_live(now));
    }
}
