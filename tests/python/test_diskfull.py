"""Disk full: saves onto small file systems (a 64 MiB tmpfs, and a 64 MiB ext4 image mounted
through a loop device, where O_DIRECT is used) run out of space at each step of a save — a data
file, the sidecar, `.metadata` — chosen by filling the file system to leave just so much room.

Each time: dcp_save fails with DCP_ERROR_NO_SPACE and a message naming ENOSPC and the file; the
previous checkpoint on the same file system still loads bit-exact; the new directory is refused
as not committed and holds none of the failed save's files; and the next save of the same
state, to a file system with room, works.
Also an async save (dcp_save_async: the error comes from dcp_future_wait) and overwrites
(overwrite=true onto the previous checkpoint, running out of space in a data file, and on tmpfs
in the sidecar and in the staged `.metadata`): the old checkpoint still loads bit-exact, and
the failed save removed its own files (the directory holds exactly the old checkpoint's).

Needs root (mount); skips with a message when mounting is impossible.

    .venv/bin/python tests/python/test_diskfull.py [-v]    (after `cargo build --release`)
    env: DCP_FIGURES=FILE appends the table of outcomes.
"""
import fnmatch
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import libdcp as L  # noqa: E402

torch.set_num_threads(1)
NO_SPACE, NOT_FOUND = 15, 6
PAGE = 4096
ROWS = []  # (file system, free space left, failing file, status, outcome)


def state(v, mib=40):
    g = torch.Generator().manual_seed(v)
    ts = {f"model.w{i}": torch.randn(mib * 2**18 // 4, generator=g) for i in range(4)}
    ts["model.small"] = torch.arange(1000, dtype=torch.int64) * (v + 1)
    return ts


def register(ts, objects=True):
    st = L.State()
    for k, t in ts.items():
        st.add_tensor(k, t)
    if objects:
        st.add_int("train.step", 7)
        st.add_bytes("train.blob", b"x" * 3000)
    return st


def load_equal(ctx, path, ts):
    out = {k: torch.full_like(t, 0) for k, t in ts.items()}
    st = register(out)
    L.load(ctx, st, path)
    return all(torch.equal(out[k], ts[k]) for k in ts) and st.get_int("train.step") == 7


def free_bytes(path):
    s = os.statvfs(path)
    return s.f_bavail * s.f_frsize


def fill_to(fs, leave):
    """Grows fs/filler until `leave` bytes are free (tmpfs counts pages; ext4 blocks)."""
    filler = os.path.join(fs, "filler")
    with open(filler, "ab") as f:
        chunk = b"\0" * (1 << 20)
        while free_bytes(fs) > leave:
            n = min(len(chunk), free_bytes(fs) - leave)
            try:
                f.write(chunk[:max(n, 1)])
                f.flush()
                os.fsync(f.fileno())
            except OSError:
                break
    return free_bytes(fs)


class Mounted:
    """A small file system mounted on a temporary directory."""

    def __init__(self, kind, size_mib=64):
        self.kind = kind
        self.dir = tempfile.mkdtemp(prefix=f"libdcp-full-{kind}-")
        self.image = None
        if kind == "tmpfs":
            cmd = ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", self.dir]
        else:
            if shutil.which("mkfs.ext4") is None:
                self.cleanup()
                raise unittest.SkipTest("mkfs.ext4 is not installed (e2fsprogs)")
            self.image = self.dir + ".img"
            with open(self.image, "wb") as f:
                f.truncate(size_mib << 20)
            r = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", self.image], capture_output=True, text=True)
            if r.returncode != 0:
                self.cleanup()
                raise unittest.SkipTest(f"mkfs.ext4 failed: {r.stderr.strip()}")
            cmd = ["mount", "-o", "loop", self.image, self.dir]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            self.cleanup()
            raise unittest.SkipTest(f"cannot mount a {kind} ({' '.join(cmd)}): {r.stderr.strip() or r.returncode}")

    def cleanup(self):
        if os.path.ismount(self.dir):
            subprocess.run(["umount", self.dir], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.image and os.path.exists(self.image):
            os.remove(self.image)


class DiskFull(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.ctx = L.Context()
        cls.good = tempfile.mkdtemp(prefix="libdcp-full-good-")
        cls.prev_ts = state(1, mib=2)
        cls.ts = state(2)
        # Sizes of what a save writes, from a save with room.
        probe = os.path.join(cls.good, "probe")
        L.save(cls.ctx, register(cls.ts), probe)
        names = os.listdir(probe)
        cls.data_pages = sum(-(-os.path.getsize(os.path.join(probe, n)) // PAGE) for n in names if n.endswith(".distcp"))
        sidecar = [n for n in names if fnmatch.fnmatchcase(n, ".libdcp*")]
        assert len(sidecar) == 1, names
        cls.sidecar_pages = -(-os.path.getsize(os.path.join(probe, sidecar[0])) // PAGE)
        shutil.rmtree(probe)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.good, ignore_errors=True)
        if ROWS:
            lines = ["", "disk full (64 MiB file systems; the save writes %d MiB)" % (cls.data_pages * PAGE >> 20),
                     f"{'file system':<12} {'room left':>10}  {'ENOSPC on':<27} {'status':<20} outcome"]
            for r in ROWS:
                lines.append(f"{r[0]:<12} {r[1]:>10}  {r[2]:<27} {r[3]:<20} {r[4]}")
            L.append_figures(lines)

    def one_case(self, fs, kind, leave, label, mode="sync"):
        prev = os.path.join(fs.dir, f"prev-{label}")
        L.save(self.ctx, register(self.prev_ts), prev)
        self.assertTrue(load_equal(self.ctx, prev, self.prev_ts))
        target = prev if mode == "overwrite" else os.path.join(fs.dir, f"new-{label}")
        before = sorted(os.listdir(prev))
        room = fill_to(fs.dir, leave)
        st = register(self.ts)
        with self.assertRaises(L.DcpError, msg=f"{kind} {label}: the save did not fail") as cm:
            if mode == "async":
                L.save_async(self.ctx, st, target).wait()
            else:
                L.save(self.ctx, st, target, overwrite=(mode == "overwrite"))
        e = cm.exception
        self.assertEqual(e.status, NO_SPACE, f"{kind} {label}: {e}")
        self.assertIn("ENOSPC", e.message)
        self.assertIn(target, e.message, "the message does not name the file")
        failing = os.path.basename(e.message.split(target + "/", 1)[1].split(":")[0].split()[0])
        # Nothing else damaged: the previous checkpoint (same file system) loads bit-exact, also
        # when it was the target of the overwrite (the new `.metadata` never replaced it).
        if mode == "overwrite":
            lost = None
            try:
                kept = load_equal(self.ctx, prev, self.prev_ts)
            except L.DcpError as e2:
                kept, lost = False, e2
            self.assertIsNone(lost, f"{kind} {label}: ENOSPC during an overwrite lost the old checkpoint")
            self.assertTrue(kept, f"{kind} {label}: the old checkpoint loads, but not bit-exact")
            self.assertEqual(sorted(os.listdir(prev)), before,
                             f"{kind} {label}: the failed overwrite did not leave exactly the old checkpoint's files")
            outcome = "old checkpoint loads bit-exact, failed save's files removed"
        else:
            self.assertTrue(load_equal(self.ctx, prev, self.prev_ts), "the previous checkpoint was damaged")
            with self.assertRaises(L.DcpError) as cm2:
                load_equal(self.ctx, target, self.ts)
            self.assertEqual(cm2.exception.status, NOT_FOUND, cm2.exception.message)
            msg = cm2.exception.message
            self.assertTrue("not a committed checkpoint" in msg or "no checkpoint at" in msg, msg)
            # The failed save removed the files it wrote (they would hold the space).
            left = sorted(os.listdir(target)) if os.path.isdir(target) else []
            self.assertEqual(left, [], f"{kind} {label}: the failed save left files behind")
            outcome = "previous loads; new refused, its files removed"
        # The next save, to a file system with room, works (same context and state).
        good = os.path.join(self.good, f"{kind}-{label}")
        L.save(self.ctx, st, good)
        self.assertTrue(load_equal(self.ctx, good, self.ts))
        shutil.rmtree(good)
        outcome += "; next save elsewhere ok"
        ROWS.append((kind, f"{room >> 10} KiB", failing, "DCP_ERROR_NO_SPACE", outcome + (" (async)" if mode == "async" else "")))
        # Clean the file system for the next case.
        for n in os.listdir(fs.dir):
            p = os.path.join(fs.dir, n)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
        return failing

    def run_fs(self, kind):
        fs = Mounted(kind)
        try:
            d, s = self.data_pages * PAGE, self.sidecar_pages * PAGE
            cases = [(d // 2, "half-data"), (d - 2 * PAGE, "data-tail")]
            if kind == "tmpfs":
                # tmpfs counts pages exactly: room for the data files, not the sidecar; room
                # for data and sidecar, not .metadata.
                cases += [(d, "sidecar"), (d + s, "metadata")]
            seen = set()
            for leave, label in cases:
                seen.add(self.one_case(fs, kind, leave, label))
            self.one_case(fs, kind, d // 3, "async", mode="async")
            ow = [(d // 3, "overwrite")]
            if kind == "tmpfs":
                ow += [(d, "overwrite-sidecar"), (d + s, "overwrite-metadata")]
            ow_seen = set()
            for leave, label in ow:
                ow_seen.add(self.one_case(fs, kind, leave, label, mode="overwrite"))
            for names in (seen, ow_seen):
                self.assertTrue(any(fnmatch.fnmatchcase(n, "__*_*_*.distcp") for n in names), names)
                if kind == "tmpfs":
                    self.assertTrue(any(fnmatch.fnmatchcase(n, ".libdcp_*") for n in names), names)
                    self.assertTrue(any(fnmatch.fnmatchcase(n, ".metadata.*.tmp") for n in names), names)
        finally:
            fs.cleanup()

    def test_tmpfs(self):
        self.run_fs("tmpfs")

    def test_ext4_loop(self):
        self.run_fs("ext4")


if __name__ == "__main__":
    unittest.main(verbosity=2)
