//! Warm loads of many small tensors (scripts/bench.py's "small" case: 10,000 f32 tensors of
//! 4 KiB - 1 MiB, log-uniform): saves them once, then times loads from the page cache, split
//! into opening the checkpoint, planning and the whole load, next to a plain read of the same
//! files with THREADS readers into 64 MiB buffers (the page cache's limit, as scripts/bench.py's
//! `dd bs=64M` streams measure it).
//!
//!   cargo run --release --example small_load_bench [DIR] [THREADS] [LOADS]

use dcp::engine::load::open_local;
use dcp::plan::load::plan_load;
use dcp::storage::fs::FsStorage;
use dcp::{load, save, Context, DType, LoadOptions, SaveOptions, State, TensorView};
use std::io::Read;
use std::time::Instant;

const TENSORS: usize = 10_000;

/// Byte sizes log-uniform in 4 KiB - 1 MiB, whole f32 elements, from a fixed seed.
fn sizes() -> Vec<usize> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..TENSORS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f64 / (1u64 << 53) as f64;
            let bytes = (4096f64.ln() + u * ((1u64 << 20) as f64 / 4096.0).ln()).exp() as usize;
            bytes / 4 * 4
        })
        .collect()
}

fn state_of(bufs: &mut [Vec<u8>]) -> State<'_> {
    let mut st = State::new();
    for (i, b) in bufs.iter_mut().enumerate() {
        let n = b.len() as u64 / 4;
        st.add_tensor(&format!("model.s{i:05}"), TensorView::from_bytes(b, DType::F32, &[n]).unwrap())
            .unwrap();
    }
    st
}

/// Seconds to read every data file of `dir` with `threads` readers (64 MiB reads, files dealt
/// round-robin), and the bytes read.
fn plain_read(dir: &str, threads: usize) -> (f64, u64) {
    let files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "distcp"))
        .collect();
    let t0 = Instant::now();
    let bytes = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let mine: Vec<_> = files.iter().skip(t).step_by(threads).collect();
                s.spawn(move || {
                    let mut buf = vec![0u8; 64 << 20];
                    let mut n = 0u64;
                    for p in mine {
                        let mut f = std::fs::File::open(p).unwrap();
                        loop {
                            let k = f.read(&mut buf).unwrap();
                            if k == 0 {
                                break;
                            }
                            n += k as u64;
                        }
                    }
                    n
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    (t0.elapsed().as_secs_f64(), bytes)
}

/// CPU seconds this process has used, all threads, user and system.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes one `rusage` into the zeroed value it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = args.first().cloned().unwrap_or_else(|| "small-load-bench".into());
    let threads: usize = args.get(1).map_or(2, |a| a.parse().expect("THREADS is a number"));
    let loads: usize = args.get(2).map_or(7, |a| a.parse().expect("LOADS is a number"));
    let ctx = Context::local();
    let mut saved: Vec<Vec<u8>> = sizes().iter().enumerate().map(|(i, &n)| vec![i as u8; n]).collect();
    let total: u64 = saved.iter().map(|b| b.len() as u64).sum();
    let _ = std::fs::remove_dir_all(&dir);
    save(&ctx, &state_of(&mut saved), &dir, &SaveOptions::default().threads(threads)).unwrap();
    plain_read(&dir, threads);

    let (mut open_s, mut plan_s, mut load_s, mut read_s) = (vec![], vec![], vec![], vec![]);
    let (mut load_cpu, mut read_cpu) = (vec![], vec![]);
    let mut file_bytes = 0;
    let mut dst: Vec<Vec<u8>> = saved.iter().map(|b| vec![0xA5; b.len()]).collect();
    for _ in 0..loads {
        let c0 = cpu_seconds();
        let (s, n) = plain_read(&dir, threads);
        read_cpu.push(cpu_seconds() - c0);
        read_s.push(s);
        file_bytes = n;
        let mut st = state_of(&mut dst);
        let t0 = Instant::now();
        let opened = open_local(&FsStorage::new(&dir)).unwrap();
        open_s.push(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        plan_load(&st, &opened.metadata, &opened.lookup, true).unwrap();
        plan_s.push(t0.elapsed().as_secs_f64());
        let (t0, c0) = (Instant::now(), cpu_seconds());
        load(&ctx, &mut st, &dir, &LoadOptions::default().threads(threads)).unwrap();
        load_s.push(t0.elapsed().as_secs_f64());
        load_cpu.push(cpu_seconds() - c0);
    }
    assert!(dst == saved, "a loaded tensor differs from the saved one");
    let gbs = |bytes: u64, s: f64| bytes as f64 / s / 1e9;
    let (read, full) = (median(read_s), median(load_s));
    println!(
        "{TENSORS} tensors, {:.2} GiB in {:.2} GiB of files, {threads} threads, median of {loads}:",
        total as f64 / (1u64 << 30) as f64,
        file_bytes as f64 / (1u64 << 30) as f64
    );
    println!(
        "  plain read of the files: {:.2} GB/s ({:.1} ms, {:.1} CPU ms)",
        gbs(file_bytes, read),
        read * 1e3,
        median(read_cpu) * 1e3
    );
    println!(
        "  load: {:.2} GB/s of tensor bytes ({:.1} ms: open {:.1} ms, plan {:.1} ms; {:.1} CPU ms), {:.0}% of the plain read",
        gbs(total, full),
        full * 1e3,
        median(open_s) * 1e3,
        median(plan_s) * 1e3,
        median(load_cpu) * 1e3,
        100.0 * gbs(total, full) / gbs(file_bytes, read)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
