//! The checkpoint manager: retention by policy, resume from the newest whole step past damaged
//! newer ones (flipped byte, truncated file, missing `.metadata`), crash-safe deletion, the
//! claim on a root, async saves, several ranks over TCP agreeing, and SIGKILL at random points
//! of a save loop. Every load goes into poisoned buffers and is compared bit for bit.

use dcp::comm::tcp::TcpComm;
use dcp::{CheckpointManager, Context, Damage, ErrorKind, ManagerPolicy, State, StepHealth, TensorView};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[path = "common/tempdir.rs"]
mod tempdir;
use tempdir::TempDir;

const N: usize = 64 << 10;

/// The values of `step` on `rank`: distinct for every step and rank.
fn values(step: u64, rank: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| f32::from_bits(((i as u32).wrapping_mul(2654435761) ^ (step as u32 * 7919 + rank as u32)) & 0x3fff_ffff))
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn save_step(m: &mut CheckpointManager, step: u64, rank: usize) {
    let v = values(step, rank, N);
    let mut st = State::new();
    st.add_tensor(&format!("w{rank}"), TensorView::from_slice(&v, &[N as u64]).unwrap())
        .unwrap();
    m.save(step, &st).unwrap();
}

/// Loads the latest step into a poisoned buffer; checks it holds that step's values.
fn load_latest_checked(m: &CheckpointManager, rank: usize) -> Option<dcp::Resume> {
    let mut back = vec![f32::NAN; N];
    let mut st = State::new();
    st.add_tensor(&format!("w{rank}"), TensorView::from_slice_mut(&mut back, &[N as u64]).unwrap())
        .unwrap();
    let resume = m.load_latest(&mut st).unwrap();
    drop(st);
    if let Some(r) = &resume {
        assert!(bits(&back) == bits(&values(r.step, rank, N)), "step {} loaded other values", r.step);
    }
    resume
}

fn steps_on_disk(root: &Path) -> Vec<u64> {
    let mut s: Vec<u64> = std::fs::read_dir(root)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
        .collect();
    s.sort();
    s
}

fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step-{step:08}"))
}

/// The largest data file of a step.
fn data_file(root: &Path, step: u64) -> PathBuf {
    std::fs::read_dir(step_dir(root, step))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "distcp"))
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap()
}

fn open(root: &TempDir, policy: ManagerPolicy) -> CheckpointManager {
    CheckpointManager::open(&Context::local(), root.s(), policy).unwrap()
}

#[test]
fn retention_keeps_the_last_and_every_mth_and_resume_is_bit_exact() {
    let root = TempDir::new("mgr-retention");
    let policy = ManagerPolicy::default()
        .save_interval_steps(2)
        .keep_last(2)
        .keep_every_steps(Some(4));
    let mut m = open(&root, policy);
    for step in 0..=10 {
        if m.should_save(step) {
            save_step(&mut m, step, 0);
        }
    }
    assert_eq!(steps_on_disk(&root), [0, 4, 8, 10]);
    let listed = m.list().unwrap();
    assert_eq!(listed.iter().map(|s| s.step).collect::<Vec<_>>(), [0, 4, 8, 10]);
    assert!(listed.iter().all(|s| s.health == StepHealth::Whole && s.bytes > (N * 4) as u64));
    assert_eq!(listed.iter().filter(|s| s.latest).map(|s| s.step).collect::<Vec<_>>(), [10]);
    let r = load_latest_checked(&m, 0).unwrap();
    assert_eq!((r.step, r.skipped.len()), (10, 0));
    m.finish().unwrap();
    assert!(!root.join(".libdcp_manager").exists(), "finish gives the root up");
}

/// Saves steps 1..=3 under a fresh root and damages step 3 with `damage`.
fn damaged_root(tag: &str, damage: impl FnOnce(&Path)) -> TempDir {
    let root = TempDir::new(tag);
    let mut m = open(&root, ManagerPolicy::default().keep_last(5));
    for step in 1..=3 {
        save_step(&mut m, step, 0);
    }
    m.finish().unwrap();
    damage(&root);
    root
}

fn expect_fallback(root: &TempDir, full_verify: bool, reason: StepHealth, says: &str) {
    let m = open(root, ManagerPolicy::default().full_verify_on_resume(full_verify));
    let r = m.latest().unwrap().unwrap();
    assert_eq!(r.step, 2, "{r:?}");
    assert_eq!(r.skipped.len(), 1, "{r:?}");
    assert_eq!((r.skipped[0].step, r.skipped[0].reason), (3, reason), "{r:?}");
    assert!(r.skipped[0].message.contains(says), "{r:?}");
    assert_eq!(load_latest_checked(&m, 0).unwrap().step, 2);
}

#[test]
fn a_flipped_byte_passes_the_cheap_check_and_fails_a_full_verify_or_the_load() {
    let root = damaged_root("mgr-flip", |root| {
        let f = data_file(root, 3);
        let mut bytes = std::fs::read(&f).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        std::fs::write(&f, bytes).unwrap();
    });
    // The cheap check sees nothing: latest names step 3, but loading it fails its checksum and
    // the load falls back to step 2, naming step 3 and why.
    let m = open(&root, ManagerPolicy::default());
    assert_eq!(m.latest().unwrap().unwrap().step, 3);
    let r = load_latest_checked(&m, 0).unwrap();
    assert_eq!(r.step, 2);
    assert_eq!((r.skipped[0].step, r.skipped[0].reason), (3, StepHealth::Damaged(Damage::Checksum)));
    drop(m);
    expect_fallback(&root, true, StepHealth::Damaged(Damage::Checksum), "full verify failed");
}

#[test]
fn a_truncated_data_file_is_skipped() {
    let root = damaged_root("mgr-trunc", |root| {
        let f = data_file(root, 3);
        let len = std::fs::metadata(&f).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .unwrap()
            .set_len(len - 100)
            .unwrap();
    });
    for full in [false, true] {
        expect_fallback(&root, full, StepHealth::Damaged(Damage::SizeMismatch), "sidecar records");
    }
}

#[test]
fn a_missing_metadata_is_skipped_as_uncommitted() {
    let root = damaged_root("mgr-nometa", |root| {
        std::fs::remove_file(step_dir(root, 3).join(".metadata")).unwrap()
    });
    expect_fallback(&root, false, StepHealth::Uncommitted, "no .metadata");
}

#[test]
fn retention_never_deletes_the_newest_whole_step_and_a_damaged_step_is_saved_again() {
    let root = TempDir::new("mgr-newest");
    let policy = ManagerPolicy::default().keep_last(1);
    let mut m = open(&root, policy.clone());
    for step in 1..=3 {
        save_step(&mut m, step, 0);
    }
    assert_eq!(steps_on_disk(&root), [3]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(data_file(&root, 3))
        .unwrap()
        .set_len(10)
        .unwrap();
    // Step 3 is damaged and nothing is whole: nothing is deleted.
    assert_eq!(m.apply_retention(&policy).unwrap(), Vec::<u64>::new());
    assert_eq!(m.latest().unwrap(), None);
    // A resumed job saves step 2 again: the damaged step 3, newer, stays for inspection.
    save_step(&mut m, 2, 0);
    assert_eq!(steps_on_disk(&root), [2, 3]);
    let r = m.latest().unwrap().unwrap();
    assert_eq!((r.step, r.skipped[0].reason), (2, StepHealth::Damaged(Damage::SizeMismatch)));
    // Saving step 3 again replaces the damaged one; then step 2 goes.
    save_step(&mut m, 3, 0);
    assert_eq!(steps_on_disk(&root), [3]);
    // A newer step damaged after its save: the newest whole one (3) stays whatever the policy.
    drop(m);
    let mut m = open(&root, ManagerPolicy::default().keep_last(2));
    save_step(&mut m, 4, 0);
    std::fs::remove_file(data_file(&root, 4)).unwrap();
    assert_eq!(m.apply_retention(&policy).unwrap(), Vec::<u64>::new());
    let r = load_latest_checked(&m, 0).unwrap();
    assert_eq!(
        (r.step, r.skipped[0].step, r.skipped[0].reason),
        (3, 4, StepHealth::Damaged(Damage::MissingFile))
    );
    // A whole step is not saved over.
    let v = values(3, 0, N);
    let mut st = State::new();
    st.add_tensor("w0", TensorView::from_slice(&v, &[N as u64]).unwrap()).unwrap();
    assert_eq!(m.save(3, &st).unwrap_err().kind(), ErrorKind::AlreadyExists);
    drop(st);
    save_step(&mut m, 5, 0);
    assert_eq!(
        steps_on_disk(&root),
        [3, 5],
        "the damaged step 4, now older than the newest whole one, goes"
    );
}

#[test]
fn a_deletion_cut_short_leaves_an_uncommitted_step_that_is_collected_later() {
    let root = TempDir::new("mgr-crashdel");
    let mut m = open(&root, ManagerPolicy::default().keep_last(3));
    for step in 1..=3 {
        save_step(&mut m, step, 0);
    }
    // A crash right after the first act of deleting step 1.
    std::fs::remove_file(step_dir(&root, 1).join(".metadata")).unwrap();
    let listed = m.list().unwrap();
    assert_eq!(listed[0].health, StepHealth::Uncommitted);
    assert_eq!(m.latest().unwrap().unwrap().step, 3);
    assert_eq!(m.apply_retention(&ManagerPolicy::default().keep_last(3)).unwrap(), [1]);
    assert_eq!(steps_on_disk(&root), [2, 3]);
    assert!(!root.join(".libdcp_step-00000001").exists());
}

#[test]
fn a_second_manager_on_a_root_is_busy_and_an_expired_claim_is_taken_over() {
    let root = TempDir::new("mgr-claim");
    let mut first = open(&root, ManagerPolicy::default().lease_seconds(1));
    save_step(&mut first, 1, 0);
    let e = CheckpointManager::open(&Context::local(), root.s(), ManagerPolicy::default())
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::Busy);
    assert!(e.message().contains(&format!("pid {}", std::process::id())), "{e}");
    // A reader needs no claim.
    let reader = open(&root, ManagerPolicy::default().read_only(true));
    assert_eq!(reader.latest().unwrap().unwrap().step, 1);
    std::thread::sleep(Duration::from_millis(1300));
    let mut second = open(&root, ManagerPolicy::default());
    let v = values(2, 0, N);
    let mut st = State::new();
    st.add_tensor("w0", TensorView::from_slice(&v, &[N as u64]).unwrap()).unwrap();
    let e = first.save(2, &st).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy);
    assert!(e.message().contains("taken over"), "{e}");
    assert!(first.apply_retention(&ManagerPolicy::default()).is_err());
    drop(first);
    save_step(&mut second, 2, 0);
    assert_eq!(load_latest_checked(&second, 0).unwrap().step, 2);
}

#[test]
fn a_hostile_lease_file_is_neither_read_whole_nor_followed_outside_the_root() {
    let lease = |root: &TempDir| root.path().join(".libdcp_manager");
    // A 16 GiB (sparse) lease and a garbled one name no holder: taken over, not read into
    // memory, and replaced by a real lease.
    for tag in ["huge", "garbage"] {
        let root = TempDir::new(&format!("mgr-lease-{tag}"));
        std::fs::create_dir_all(root.path()).unwrap();
        let f = std::fs::File::create(lease(&root)).unwrap();
        match tag {
            "huge" => f.set_len(16 << 30).unwrap(),
            _ => std::fs::write(lease(&root), b"\x00\xffnot a lease\nowner=").unwrap(),
        }
        let mut m = open(&root, ManagerPolicy::default());
        save_step(&mut m, 1, 0);
        assert!(
            std::fs::metadata(lease(&root)).unwrap().len() < 4096,
            "{tag}: the lease was not replaced"
        );
        m.finish().unwrap();
    }
    // A lease that is a symlink to a file outside the root: that file is never written.
    let root = TempDir::new("mgr-lease-link");
    let outside = TempDir::new("mgr-lease-outside");
    std::fs::create_dir_all(root.path()).unwrap();
    std::fs::create_dir_all(outside.path()).unwrap();
    let target = outside.path().join("precious");
    std::fs::write(&target, b"keep me").unwrap();
    std::os::unix::fs::symlink(&target, lease(&root)).unwrap();
    if let Ok(mut m) = CheckpointManager::open(&Context::local(), root.s(), ManagerPolicy::default()) {
        save_step(&mut m, 1, 0);
        m.finish().unwrap();
    }
    assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
}

/// A 16 MiB tmpfs mounted on a fresh directory (root only); `None`, with a message, otherwise.
fn small_file_system(tag: &str) -> Option<(impl Drop, TempDir)> {
    // (Unmounted before the directory is removed: tuple fields drop in order.)
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let dir = TempDir::new(tag);
    std::fs::create_dir_all(dir.path()).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(dir.path())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs (needs root)");
        return None;
    }
    let guard = Unmount(dir.path().to_path_buf());
    Some((guard, dir))
}

#[test]
fn a_save_that_fills_the_disk_fails_and_deletes_nothing() {
    let Some((_mount, root)) = small_file_system("mgr-full") else {
        return;
    };
    let mut m = open(&root, ManagerPolicy::default().keep_last(1));
    save_step(&mut m, 1, 0);
    save_step(&mut m, 2, 0);
    // 24 MiB does not fit in the 16 MiB file system.
    let big = vec![1.5f32; 6 << 20];
    let mut st = State::new();
    st.add_tensor("w0", TensorView::from_slice(&big, &[big.len() as u64]).unwrap())
        .unwrap();
    assert!(m.save(3, &st).is_err(), "a save larger than the disk succeeded");
    // Step 2 (the last one kept) is still whole and resumes bit-exact; step 3 never counts.
    let resume = load_latest_checked(&m, 0).unwrap();
    assert_eq!(resume.step, 2);
    assert!(steps_on_disk(root.path()).contains(&2));
    m.finish().unwrap();
}

#[test]
fn async_retention_runs_only_after_the_save_committed() {
    let root = TempDir::new("mgr-async");
    let mut m = open(&root, ManagerPolicy::default().keep_last(1).async_save(true));
    for step in 1..=3u64 {
        let v = values(step, 0, N);
        let mut st = State::new();
        st.add_tensor("w0", TensorView::from_slice(&v, &[N as u64]).unwrap()).unwrap();
        let _future = m.save_async(step, &st).unwrap();
        drop(st);
        // The previous step stays until this one committed.
        if step > 1 {
            assert!(step_dir(&root, step - 1).join(".metadata").exists(), "step {}", step - 1);
        }
    }
    assert!(m.wait().unwrap().is_some());
    assert_eq!(steps_on_disk(&root), [3]);
    assert_eq!(load_latest_checked(&m, 0).unwrap().step, 3);
}

/// Three ranks over TCP save steps 1..=3 under `root` (keeping 2) and agree on step 3; with a
/// data file of step 3 removed, they all resume from step 2, bit-exact.
fn ranks_over_tcp_agree(root: &str) {
    const WORLD: usize = 3;
    let run = |phase: u32| {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        std::thread::scope(|s| {
            for rank in 0..WORLD {
                s.spawn(move || {
                    let comm = TcpComm::connect(rank, WORLD, "127.0.0.1", port, Duration::from_secs(60)).unwrap();
                    let ctx = Context::with_communicator(Box::new(comm));
                    let mut m = CheckpointManager::open(&ctx, root, ManagerPolicy::default().keep_last(2)).unwrap();
                    if phase == 0 {
                        for step in 1..=3 {
                            save_step(&mut m, step, rank);
                        }
                        assert_eq!(m.latest().unwrap().unwrap().step, 3);
                    } else {
                        let r = load_latest_checked(&m, rank).unwrap();
                        assert_eq!((r.step, r.skipped[0].step), (2, 3));
                    }
                    m.finish().unwrap();
                });
            }
        });
    };
    run(0);
    let reader = CheckpointManager::open(&Context::local(), root, ManagerPolicy::default().read_only(true)).unwrap();
    assert_eq!(reader.list().unwrap().iter().map(|s| s.step).collect::<Vec<_>>(), [2, 3]);
    let step3 = Context::local().open_storage(&reader.step_location(3)).unwrap();
    let data = step3.list().unwrap().into_iter().find(|n| n.ends_with(".distcp")).unwrap();
    step3.remove(&data).unwrap();
    run(1);
}

#[test]
fn ranks_over_tcp_agree_on_the_step_to_resume_from() {
    let root = TempDir::new("mgr-tcp");
    ranks_over_tcp_agree(root.s());
}

const CHILD_ENV: &str = "DCP_TEST_MANAGER_CHILD_ROOT";

/// In a child process (the SIGKILL test): resumes from the latest step and saves every step
/// after it, until killed.
#[test]
fn sigkill_child_helper() {
    let Ok(root) = std::env::var(CHILD_ENV) else { return };
    let ctx = Context::local();
    let mut m = CheckpointManager::open(&ctx, &root, ManagerPolicy::default().keep_last(2)).unwrap();
    let mut step = load_latest_checked(&m, 0).map_or(0, |r| r.step + 1);
    loop {
        save_step(&mut m, step, 0);
        step += 1;
    }
}

#[test]
fn sigkill_during_saves_and_retention_always_leaves_a_whole_latest_step() {
    let root = TempDir::new("mgr-kill");
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    let mut last = None;
    for round in 0..6 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let delay = Duration::from_millis(150 + (seed >> 33) % 500);
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "sigkill_child_helper", "--nocapture", "--test-threads", "1"])
            .env(CHILD_ENV, root.s())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(status.code().is_none(), "round {round}: the child stopped by itself: {status}");
        let reader = open(&root, ManagerPolicy::default().read_only(true));
        let resume = load_latest_checked(&reader, 0);
        if let Some(r) = &resume {
            assert!(
                last.is_none_or(|l| r.step >= l),
                "round {round}: went back from {last:?} to {}",
                r.step
            );
            last = Some(r.step);
        }
        eprintln!("round {round}: killed after {delay:?}, latest {:?}", resume.map(|r| r.step));
    }
    assert!(last.is_some(), "no round saved anything");
}

/// The manager over an S3 root, when `DCP_TEST_S3_URL` names a bucket prefix on a server (with
/// the AWS settings in the environment); skipped otherwise. Steps are found through the root
/// markers, damage is made through the storage API.
#[test]
fn an_s3_root_when_a_server_is_given() {
    let Ok(base) = std::env::var("DCP_TEST_S3_URL") else {
        eprintln!("skipped: DCP_TEST_S3_URL is not set");
        return;
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let root = format!("{}/manager-{}-{nanos}", base.trim_end_matches('/'), std::process::id());
    let ctx = Context::local();
    let mut m = CheckpointManager::open(&ctx, &root, ManagerPolicy::default().keep_last(2)).unwrap();
    assert_eq!(m.latest().unwrap(), None);
    for step in 1..=4 {
        save_step(&mut m, step, 0);
    }
    let listed = m.list().unwrap();
    assert_eq!(
        listed.iter().map(|s| (s.step, s.health, s.latest)).collect::<Vec<_>>(),
        [(3, StepHealth::Whole, false), (4, StepHealth::Whole, true)]
    );
    let e = CheckpointManager::open(&ctx, &root, ManagerPolicy::default()).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    // Step 4 torn: a data file rewritten shorter.
    let step4 = ctx.open_storage(&m.step_location(4)).unwrap();
    let name = step4.list().unwrap().into_iter().find(|n| n.ends_with(".distcp")).unwrap();
    let bytes = step4.read_all(&name).unwrap();
    step4.put_atomic(&name, &bytes[..bytes.len() - 1]).unwrap();
    let r = load_latest_checked(&m, 0).unwrap();
    assert_eq!(
        (r.step, r.skipped[0].step, r.skipped[0].reason),
        (3, 4, StepHealth::Damaged(Damage::SizeMismatch))
    );
    // Step 5 saved: the damaged step 4 goes (older than the newest whole one).
    save_step(&mut m, 5, 0);
    assert_eq!(m.list().unwrap().iter().map(|s| s.step).collect::<Vec<_>>(), [3, 5]);
    assert!(ctx.open_storage(&m.step_location(4)).unwrap().list().unwrap().is_empty());
    // A deletion cut short after .metadata: skipped, then collected.
    save_step(&mut m, 6, 0);
    ctx.open_storage(&m.step_location(6)).unwrap().remove(".metadata").unwrap();
    assert_eq!(m.latest().unwrap().unwrap().step, 5);
    assert_eq!(m.apply_retention(&ManagerPolicy::default()).unwrap(), [6]);
    m.finish().unwrap();
    let m = CheckpointManager::open(&ctx, &root, ManagerPolicy::default()).unwrap();
    assert_eq!(load_latest_checked(&m, 0).unwrap().step, 5);
    m.apply_retention(&ManagerPolicy::default().keep_last(1)).unwrap();
    drop(m);
    let left = ctx.open_storage(&root).unwrap().list().unwrap();
    assert_eq!(left, [".libdcp_step-00000005"], "the claim is given up, one step is left");
    ranks_over_tcp_agree(&format!("{root}-tcp"));
    eprintln!("manager on an S3 root passed against {base}");
}
