//! The handle of an async save: order the caller's writes after its staging copies, wait for
//! it, or poll it.

use super::{SaveReport, StagingReport};
use crate::engine::staging::InFlightCopies;
use crate::error::{lock, Error, Result};
use std::sync::{Arc, Condvar, Mutex};

/// Where a stream-ordered save stands with the caller's promise not to change its tensors
/// before the copies reading them are done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
enum Order {
    /// Nothing reads the caller's memory after the call returned.
    #[default]
    NotNeeded,
    /// Copies read the caller's tensors; the caller has not yet ordered its writes after them.
    Pending,
    /// The caller made a stream wait for the copies, or waited for them.
    Ordered,
    /// The caller did something else with the save (or the context) first: the checkpoint
    /// could hold values written after the call, so it is not committed.
    Forgotten,
}

#[derive(Default)]
struct Staging {
    copies: Option<Arc<InFlightCopies>>,
    order: Order,
    report: StagingReport,
}

#[derive(Default)]
struct Shared {
    result: Mutex<Option<Result<SaveReport>>>,
    done: Condvar,
    staging: Mutex<Staging>,
    ordered: Condvar,
}

/// Completes when the background writer has written, and the job has committed, the checkpoint.
///
/// With [`SaveOptions::stream_ordered`](super::SaveOptions::stream_ordered) (or a device
/// snapshot that did not hold every tensor), the first thing the caller does with the future
/// must be [`order_before`](Self::order_before) or [`wait_staged`](Self::wait_staged), before
/// it changes the saved tensors. Calling [`wait`](Self::wait) or [`is_done`](Self::is_done)
/// first, or starting the next save or load on the context, means the order was forgotten: the
/// save then fails (nothing is committed) rather than commit values the caller may have
/// changed meanwhile.
#[derive(Clone, Default)]
pub struct SaveFuture {
    shared: Arc<Shared>,
}

impl SaveFuture {
    pub(crate) fn new(report: StagingReport, copies: Option<Arc<InFlightCopies>>) -> SaveFuture {
        let order = match &copies {
            Some(c) if c.reads_caller_memory() => Order::Pending,
            _ => Order::NotNeeded,
        };
        let f = SaveFuture::default();
        *lock(&f.shared.staging) = Staging { copies, order, report };
        f
    }

    pub(crate) fn complete(&self, r: Result<SaveReport>) {
        lock(&self.shared.staging).copies = None;
        *lock(&self.shared.result) = Some(r);
        self.shared.done.notify_all();
    }

    /// What staging did on this rank.
    pub fn staging_report(&self) -> StagingReport {
        lock(&self.shared.staging).report
    }

    /// Makes the caller's CUDA stream `stream` (a `CUstream`/`cudaStream_t`; 0: the legacy
    /// default stream) wait, on the GPU, for the staging copies that read the caller's
    /// tensors; the CPU does not wait. Work the caller queues on `stream` afterwards (the
    /// optimizer step) may change the tensors. A no-op when no copy reads them.
    ///
    /// `stream` must be a live stream of the tensors' device (or 0).
    pub fn order_before(&self, stream: usize) -> Result<()> {
        let copies = self.copies_to_order()?;
        if let Some(c) = copies {
            c.order_before(stream)?;
        }
        self.mark(Order::Ordered);
        Ok(())
    }

    /// Blocks until the staging copies that read the caller's tensors are done; the caller
    /// may then change them.
    pub fn wait_staged(&self) -> Result<()> {
        let copies = self.copies_to_order()?;
        if let Some(c) = copies {
            c.wait_caller_reads()?;
        }
        self.mark(Order::Ordered);
        Ok(())
    }

    fn copies_to_order(&self) -> Result<Option<Arc<InFlightCopies>>> {
        let s = lock(&self.shared.staging);
        if s.order == Order::Forgotten {
            return Err(Error::invalid(
                "too late to order writes after this save's staging copies: the save was waited on, polled or followed by another operation first (see dcp_future_stream_wait)",
            ));
        }
        Ok(s.copies.clone())
    }

    fn mark(&self, order: Order) {
        let mut s = lock(&self.shared.staging);
        if s.order == Order::Pending {
            s.order = order;
            self.shared.ordered.notify_all();
        }
    }

    /// A pending order is now forgotten (see the type's docs).
    pub(crate) fn forget_order(&self) {
        self.mark(Order::Forgotten);
    }

    /// The background writer: waits until the caller ordered its writes after the copies (or
    /// forgot to: then the error that stops the commit).
    pub(crate) fn await_order(&self) -> Result<()> {
        let mut s = lock(&self.shared.staging);
        while s.order == Order::Pending {
            s = self.shared.ordered.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        match s.order {
            Order::Forgotten => Err(Error::invalid(
                "stream-ordered save not committed: the caller neither made its stream wait for the staging copies (dcp_future_stream_wait / SaveFuture::order_before) nor waited for them (dcp_future_wait_staged) before waiting on, polling, or following the save with another operation, so the checkpoint could hold values changed after the call",
            )),
            _ => Ok(()),
        }
    }

    /// Whether the save has finished (committed or failed); [`wait`](Self::wait) then returns at
    /// once. A pending order is forgotten (see the type's docs).
    pub fn is_done(&self) -> bool {
        self.forget_order();
        self.finished()
    }

    /// Whether the save has finished, leaving a pending order alone.
    pub(crate) fn finished(&self) -> bool {
        lock(&self.shared.result).is_some()
    }

    /// Blocks until the save completes; returns its outcome (every call returns the same). A
    /// pending order is forgotten (see the type's docs).
    pub fn wait(&self) -> Result<SaveReport> {
        self.forget_order();
        let mut g = lock(&self.shared.result);
        while g.is_none() {
            g = self.shared.done.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.clone().expect("result is set")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A future whose copies read the caller's memory (without a GPU: no copies to wait for).
    fn pending() -> SaveFuture {
        let f = SaveFuture::default();
        lock(&f.shared.staging).order = Order::Pending;
        f
    }

    #[test]
    fn an_order_before_anything_else_lets_the_commit_go_on() {
        for order in [SaveFuture::order_before as fn(&SaveFuture, usize) -> Result<()>, |f, _| f.wait_staged()] {
            let f = pending();
            order(&f, 0).unwrap();
            f.await_order().unwrap();
            // Waiting afterwards forgets nothing.
            assert!(!f.is_done());
            f.await_order().unwrap();
        }
    }

    #[test]
    fn polling_or_waiting_first_forgets_the_order_and_stops_the_commit() {
        for first in [|f: &SaveFuture| assert!(!f.is_done()), |f: &SaveFuture| f.forget_order()] {
            let f = pending();
            first(&f);
            let e = f.await_order().unwrap_err();
            assert!(e.message().contains("not committed"), "{e}");
            let late = f.order_before(0).unwrap_err();
            assert!(late.message().contains("too late"), "{late}");
            assert!(f.wait_staged().is_err());
        }
    }

    #[test]
    fn the_writer_waits_for_an_order_given_later_on_another_thread() {
        let f = pending();
        let writer = {
            let f = f.clone();
            std::thread::spawn(move || f.await_order())
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!writer.is_finished(), "the writer went on before the order");
        f.wait_staged().unwrap();
        writer.join().unwrap().unwrap();
    }

    #[test]
    fn without_copies_reading_caller_memory_nothing_needs_ordering() {
        let f = SaveFuture::new(StagingReport::default(), None);
        assert!(!f.is_done());
        f.await_order().unwrap();
        f.order_before(0).unwrap();
    }
}
