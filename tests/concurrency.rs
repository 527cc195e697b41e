//! Concurrency inside one process: two contexts saving to different directories at once (local
//! contexts, and two 2-rank jobs over TCP as threads), and an async save in flight while the
//! caller loads another checkpoint, on the same context (the load waits for the save) and on
//! another context (they proceed side by side). Every value is compared bit for bit.

use dcp::comm::tcp::TcpComm;
use dcp::{load, save, save_async, Context, ErrorKind, LoadOptions, SaveOptions, State, TensorView};
use std::time::Duration;

#[path = "common/tempdir.rs"]
mod tempdir;
use tempdir::TempDir;

fn tmp(name: &str) -> TempDir {
    TempDir::new(&format!("conc-{name}"))
}

/// Deterministic f32 values of a key and version.
fn values(key: u32, version: u32, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2654435761).wrapping_add(key * 1000 + version) as f32)
        .collect()
}

const KEYS: u32 = 4;
const N: usize = 3 << 20; // 12 MiB per key, 48 MiB per state

fn state_of(bufs: &mut [Vec<f32>]) -> State<'_> {
    let mut st = State::new();
    for (k, b) in bufs.iter_mut().enumerate() {
        let n = b.len() as u64;
        st.add_tensor(&format!("w{k}"), TensorView::from_slice_mut(b.as_mut_slice(), &[n]).unwrap())
            .unwrap();
    }
    st
}

fn version_bufs(version: u32) -> Vec<Vec<f32>> {
    (0..KEYS).map(|k| values(k, version, N)).collect()
}

fn load_and_compare(ctx: &Context, dir: &std::path::Path, version: u32) {
    let mut bufs: Vec<Vec<f32>> = (0..KEYS).map(|_| vec![f32::NAN; N]).collect();
    let mut st = state_of(&mut bufs);
    load(ctx, &mut st, dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    drop(st);
    for (k, b) in bufs.iter().enumerate() {
        assert!(
            *b == values(k as u32, version, N),
            "{}: key w{k} is not version {version}",
            dir.display()
        );
    }
}

#[test]
fn two_contexts_save_to_different_directories_at_once() {
    let dirs = [tmp("two-a"), tmp("two-b")];
    std::thread::scope(|s| {
        for (i, dir) in dirs.iter().enumerate() {
            s.spawn(move || {
                let ctx = Context::local();
                for round in 0..3u32 {
                    let v = 10 * i as u32 + round;
                    let mut bufs = version_bufs(v);
                    let st = state_of(&mut bufs);
                    let opts = SaveOptions::default().overwrite(true);
                    save(&ctx, &st, dir.to_str().unwrap(), &opts).unwrap();
                    drop(st);
                    load_and_compare(&ctx, dir, v);
                }
            });
        }
    });
    let ctx = Context::local();
    load_and_compare(&ctx, &dirs[0], 2);
    load_and_compare(&ctx, &dirs[1], 12);
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn two_multi_rank_jobs_in_one_process_at_once() {
    // Two jobs of 2 ranks each (4 threads), each rank holding half of every row block.
    let dirs = [tmp("jobs-a"), tmp("jobs-b")];
    let ports: Vec<u16> = (0..2)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port())
        .collect();
    std::thread::scope(|s| {
        for job in 0..2usize {
            for rank in 0..2usize {
                let (dir, port) = (&dirs[job], ports[job]);
                s.spawn(move || {
                    let ctx = Context::with_communicator(Box::new(
                        TcpComm::connect(rank, 2, "127.0.0.1", port, Duration::from_secs(60)).unwrap(),
                    ));
                    let v = 100 + job as u32;
                    let full = version_bufs(v);
                    let mut halves: Vec<Vec<f32>> = full.iter().map(|b| b[rank * N / 2..(rank + 1) * N / 2].to_vec()).collect();
                    let mut st = State::new();
                    for (k, h) in halves.iter_mut().enumerate() {
                        let n = h.len() as u64;
                        st.add_tensor_chunk(
                            &format!("w{k}"),
                            TensorView::from_slice(h.as_slice(), &[n]).unwrap(),
                            &[N as u64],
                            &[rank as u64 * n],
                        )
                        .unwrap();
                    }
                    save(&ctx, &st, dir.to_str().unwrap(), &SaveOptions::default()).unwrap();
                    drop(st);
                    // Every rank loads the whole tensors back (resharded), through its job.
                    load_and_compare(&ctx, dir, v);
                });
            }
        }
    });
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn async_save_in_flight_while_loading_another_checkpoint() {
    let (dir_a, dir_b, dir_c) = (tmp("async-a"), tmp("async-b"), tmp("async-c"));
    let ctx = Context::local();
    // B: a checkpoint to load while A is being saved.
    {
        let mut bufs = version_bufs(2);
        save(&ctx, &state_of(&mut bufs), dir_b.to_str().unwrap(), &SaveOptions::default()).unwrap();
    }
    for round in 0..3 {
        let _ = std::fs::remove_dir_all(&dir_a);
        // A is saved in the background; its buffers are overwritten as soon as the call returns.
        let mut bufs = version_bufs(1);
        let fut = {
            let st = state_of(&mut bufs);
            save_async(&ctx, &st, dir_a.to_str().unwrap(), &SaveOptions::default()).unwrap()
        };
        for b in bufs.iter_mut() {
            b.iter_mut().for_each(|x| *x = -7.0);
        }
        match round {
            // The same context: the load first waits for the save in flight.
            0 => load_and_compare(&ctx, &dir_b, 2),
            // Another context: the load runs beside the background save.
            1 => {
                let other = Context::local();
                load_and_compare(&other, &dir_b, 2);
            }
            // A second save on the same context, told not to wait: BUSY while A is in flight,
            // or it runs after A finished.
            _ => {
                let mut c = version_bufs(3);
                let opts = SaveOptions::default().wait_if_busy(false);
                match save(&ctx, &state_of(&mut c), dir_c.to_str().unwrap(), &opts) {
                    Ok(_) => load_and_compare(&ctx, &dir_c, 3),
                    Err(e) => {
                        assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
                        assert!(!dir_c.join(".metadata").exists());
                    }
                }
            }
        }
        fut.wait().unwrap();
        assert!(fut.is_done());
        // A holds the values of the call, not what the buffers held afterwards.
        load_and_compare(&ctx, &dir_a, 1);
    }
    for d in [dir_a, dir_b, dir_c] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// A communicator of one rank that garbles what the save gathers for its commit: the list of
/// data files a rank reports no longer names the file its large item went to (as a message
/// from a peer of another version, or damaged in transit, could).
struct Garbling;

impl dcp::comm::Communicator for Garbling {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_gather(&self, data: &[u8]) -> dcp::Result<Vec<Vec<u8>>> {
        let mut d = data.to_vec();
        if let Some(at) = d.windows(6).position(|w| w == b"__0_0_") {
            d[at + 4] = b'9';
        }
        Ok(vec![d])
    }
    fn broadcast(&self, data: &[u8], _root: usize) -> dcp::Result<Vec<u8>> {
        Ok(data.to_vec())
    }
    fn barrier(&self) -> dcp::Result<()> {
        Ok(())
    }
}

#[test]
fn a_garbled_commit_message_is_an_error_and_the_async_future_completes() {
    let dir = tmp("garbled");
    let ctx = Context::with_communicator(Box::new(Garbling));
    // Larger than a 4 MiB block: its item has block CRCs that name its file.
    let w = values(0, 0, 3 << 20);
    let n = w.len() as u64;
    let mut st = State::new();
    st.add_tensor("w", TensorView::from_slice(&w, &[n]).unwrap()).unwrap();
    // Synchronously: an error naming the file, not a panic.
    let sync = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        save(&ctx, &st, dir.to_str().unwrap(), &SaveOptions::default()).map(|_| ())
    }));
    match sync {
        Ok(Err(e)) => assert!(e.message().contains("data file \"__0_"), "{e}"),
        Ok(Ok(())) => panic!("a save with a garbled commit message succeeded"),
        Err(_) => panic!("save panicked on a garbled commit message"),
    }
    let fut = save_async(&ctx, &st, dir.to_str().unwrap(), &SaveOptions::default()).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = fut.clone();
    std::thread::spawn(move || tx.send(waiter.wait().map(|_| ())).unwrap());
    let r = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the async save's future never completed (its thread died?)");
    assert!(
        r.is_err_and(|e| e.kind() == ErrorKind::Comm),
        "the garbled message must be reported as such"
    );
    assert!(!dir.join(".metadata").exists());
    let _ = std::fs::remove_dir_all(dir);
}
