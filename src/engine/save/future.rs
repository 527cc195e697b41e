//! The handle of an async save: wait for it or poll it.

use super::SaveReport;
use crate::error::Result;
use std::sync::{Arc, Condvar, Mutex};

#[derive(Default)]
struct Shared {
    result: Mutex<Option<Result<SaveReport>>>,
    done: Condvar,
}

/// Completes when the background writer has written, and the job has committed, the checkpoint.
#[derive(Clone, Default)]
pub struct SaveFuture {
    shared: Arc<Shared>,
}

impl SaveFuture {
    pub(crate) fn new() -> SaveFuture {
        SaveFuture::default()
    }

    pub(crate) fn complete(&self, r: Result<SaveReport>) {
        *crate::error::lock(&self.shared.result) = Some(r);
        self.shared.done.notify_all();
    }

    /// Whether the save has finished (committed or failed); [`wait`](Self::wait) then returns at once.
    pub fn is_done(&self) -> bool {
        crate::error::lock(&self.shared.result).is_some()
    }

    /// Blocks until the save completes; returns its outcome (every call returns the same).
    pub fn wait(&self) -> Result<SaveReport> {
        let mut g = crate::error::lock(&self.shared.result);
        while g.is_none() {
            g = self.shared.done.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.clone().expect("result is set")
    }
}
