//! The one worker pool of saves and loads: items handed out in order from a shared queue to a
//! fixed number of scoped threads, each with its own state; the first error stops the handing
//! out, and a panicking worker is an error, not a crash.

use crate::error::{Error, Result};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// The most threads a save or load may run per rank.
pub(crate) const MAX_THREADS: usize = 1024;

/// Checks a thread count against `1..=MAX_THREADS`; `what` names it in the error ("writer
/// threads", "reader threads", ...).
pub(crate) fn check_thread_count(what: &str, n: usize) -> Result<()> {
    if n == 0 || n > MAX_THREADS {
        return Err(Error::invalid(format!("{what} must be 1..={MAX_THREADS}, not {n}")));
    }
    Ok(())
}

/// The CPUs this process may run on, read once (`available_parallelism` reads cgroup files on
/// every call); 4 when unknown.
pub(crate) fn cpu_count() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(4, |n| n.get()))
}

/// Runs `work(&mut state, item)` for every item of `items` on `threads` threads (at most one
/// per item), each thread's `state` made by `init`. Returns the results in item order, or the
/// first error (by item order among those that failed).
pub(crate) fn for_each_parallel<T, S, R>(
    items: &[T],
    threads: usize,
    init: impl Fn() -> Result<S> + Sync,
    work: impl Fn(&mut S, &T) -> Result<R> + Sync,
) -> Result<Vec<R>>
where
    T: Sync,
    R: Send,
{
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: Mutex<Vec<Option<Result<R>>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    let threads = threads.min(items.len()).max(1);
    let worker = || -> Result<()> {
        let mut state = init()?;
        while !failed.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(item) = items.get(i) else { break };
            let r = work(&mut state, item);
            if r.is_err() {
                failed.store(true, Ordering::Relaxed);
            }
            crate::error::lock(&results)[i] = Some(r);
        }
        Ok(())
    };
    let started: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|_| s.spawn(worker)).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::internal("a worker thread panicked (a bug in libdcp)")))
            })
            .collect()
    });
    for r in started {
        r?;
    }
    let results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut out = Vec::with_capacity(items.len());
    for r in results {
        match r {
            Some(r) => out.push(r?),
            // Never handed out: an earlier item failed (its error came first above).
            None => return Err(Error::internal("a work item was never run")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_count_bounds_and_message() {
        assert!(check_thread_count("reader threads", 1).is_ok());
        assert!(check_thread_count("reader threads", MAX_THREADS).is_ok());
        let e = check_thread_count("reader threads", 0).unwrap_err();
        assert_eq!(e.message(), "reader threads must be 1..=1024, not 0");
        assert_eq!(e.kind(), crate::error::ErrorKind::InvalidArgument);
        let e = check_thread_count("writer threads", MAX_THREADS + 1).unwrap_err();
        assert_eq!(e.message(), "writer threads must be 1..=1024, not 1025");
    }

    #[test]
    fn results_in_order_and_first_error_wins() {
        let items: Vec<u32> = (0..100).collect();
        let got = for_each_parallel(
            &items,
            4,
            || Ok(0u32),
            |n, x| {
                *n += 1;
                Ok(x * 2)
            },
        )
        .unwrap();
        assert_eq!(got, items.iter().map(|x| x * 2).collect::<Vec<_>>());
        let e = for_each_parallel(
            &items,
            3,
            || Ok(()),
            |_, x| if *x == 7 { Err(Error::invalid("seven")) } else { Ok(*x) },
        )
        .unwrap_err();
        assert!(e.message().contains("seven"), "{e}");
        let e = for_each_parallel(&items, 2, || Err::<(), _>(Error::invalid("no state")), |_, x| Ok(*x)).unwrap_err();
        assert!(e.message().contains("no state"), "{e}");
        let e = for_each_parallel(&items[..3], 2, || Ok(()), |_, x| if *x == 1 { panic!("boom") } else { Ok(*x) });
        assert!(e.is_err());
        assert!(for_each_parallel(&items[..0], 4, || Ok(()), |_, x: &u32| Ok(*x))
            .unwrap()
            .is_empty());
    }
}
