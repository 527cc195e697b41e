"""A rank that dies or freezes in the middle of a collective save or load (3 ranks over the TCP
rendezvous, in forked processes, through the C API): every other rank must return an error —
DCP_ERROR_COMM when the rank's connection closes (killed), DCP_ERROR_TIMEOUT when it stops
answering (SIGSTOP) — naming that rank, within the collective timeout; and a save must not
commit.

    .venv/bin/python tests/python/test_rank_death.py [-v]     (after `cargo build --release`)
    env: DCP_FIGURES=FILE appends the table.
"""
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import libdcp as L  # noqa: E402
from multirank import free_port  # noqa: E402
from test_crash import Inotify, fork, read, reap, rows  # noqa: E402

torch.set_num_threads(1)
TIMEOUT_S = 3
WORLD = 3
COMM, TIMEOUT, NOT_FOUND = 9, 10, 6
ROWS = []


def tensors():
    g = torch.Generator().manual_seed(5)
    return {f"w{i}": torch.randn(3072, 1024, generator=g) for i in range(8)}  # 96 MiB


def register(st, ts, rank, fresh=False):
    keep = []
    for k, t in ts.items():
        piece, lo = rows(t, rank, WORLD)
        if fresh:
            piece = torch.empty_like(piece)
        keep.append(piece)
        st.add_tensor(k, piece, global_shape=list(t.shape), offsets=[lo, 0])
    return keep


class RankDeath(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="libdcp-death-")
        cls.ts = tensors()
        # A checkpoint for the load scenarios, saved by 3 ranks.
        cls.ckpt = os.path.join(cls.tmp, "ckpt")
        port = free_port()
        res = [os.path.join(cls.tmp, f"fixture-{r}") for r in range(WORLD)]
        pids = [fork(lambda r=r: cls.save_rank(r, port, cls.ckpt, res[r])) for r in range(WORLD)]
        st = reap(pids, time.monotonic() + 120)
        assert all(v == 0 for v in st.values()), st
        for f in res:
            text = read(f) if os.path.exists(f) else "no result"
            assert text == "ok", f"the fixture save failed: {text}"
            os.remove(f)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        if ROWS:
            lines = ["", f"a rank dies mid-collective (3 ranks over TCP, timeout {TIMEOUT_S} s)",
                     f"{'operation':<8} {'victim':<16} {'survivors':<22} {'slowest':>8}  message (one survivor)"]
            for r in ROWS:
                lines.append(f"{r[0]:<8} {r[1]:<16} {r[2]:<22} {r[3]:>7.1f}s  {r[4]}")
            L.append_figures(lines)

    @classmethod
    def save_rank(cls, rank, port, path, result):
        ctx = L.Context.tcp(rank, WORLD, port, timeout_s=TIMEOUT_S)
        st = L.State()
        keep = register(st, cls.ts, rank)
        t0 = time.monotonic()
        try:
            L.save(ctx, st, path)
            out = "ok"
        except L.DcpError as e:
            out = f"err {e.status} {time.monotonic() - t0:.2f} {e.message}"
        del keep
        if result:
            with open(result, "w") as f:
                f.write(out)

    @classmethod
    def load_rank(cls, rank, port, path, result, ready_fd):
        ctx = L.Context.tcp(rank, WORLD, port, timeout_s=TIMEOUT_S)
        st = L.State()
        keep = register(st, cls.ts, rank, fresh=True)
        os.write(ready_fd, bytes([rank]))
        t0 = time.monotonic()
        try:
            L.load(ctx, st, path)
            out = "ok"
        except L.DcpError as e:
            out = f"err {e.status} {time.monotonic() - t0:.2f} {e.message}"
        del keep
        with open(result, "w") as f:
            f.write(out)

    def survivors(self, op, victim, how, res, pids, retry_ok=False):
        statuses = reap([p for r, p in enumerate(pids) if r != victim], time.monotonic() + 3 * TIMEOUT_S + 15)
        try:
            os.kill(pids[victim], signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pids[victim], 0)
        outs = {}
        for r in range(WORLD):
            if r == victim:
                continue
            self.assertNotEqual(statuses[pids[r]], "hung", f"{op}: rank {r} hung after rank {victim} was {how}")
            outs[r] = read(res[r])
        errors = {r: o for r, o in outs.items() if o != "ok"}
        if not errors and retry_ok:
            return False  # the victim was hit after the collective had finished: try earlier
        self.assertTrue(errors, f"{op}: every survivor succeeded although rank {victim} was {how} mid-{op}: {outs}")
        slowest, sample = 0.0, ""
        want = TIMEOUT if how == "stopped" else COMM
        for r, o in errors.items():
            _, status, secs, msg = o.split(" ", 3)
            self.assertIn(int(status), (COMM, TIMEOUT), f"{op}: rank {r}: {o}")
            if r == 0 or victim == 0:
                self.assertEqual(int(status), want, f"{op}: rank {r}: {o}")
            self.assertTrue(re.search(rf"\brank {victim}\b", msg), f"{op}: rank {r}'s error does not name rank {victim}: {msg}")
            # Rank 0 gives up after the timeout; the others wait that long plus a margin for
            # rank 0's explanation (timeout + timeout/10 + 2 s).
            self.assertLess(float(secs), TIMEOUT_S * 1.1 + 2 + 1.5, f"{op}: rank {r} took {secs} s")
            slowest = max(slowest, float(secs))
            sample = sample or msg
        ROWS.append((op, f"rank {victim} {how}", f"{len(errors)} errors " + "/".join(
            sorted({"TIMEOUT" if o.split()[1] == str(TIMEOUT) else "COMM" for o in errors.values()})), slowest,
            sample[:110]))
        return True

    def save_case(self, victim, how):
        path = os.path.join(self.tmp, f"save-{victim}-{how}")
        os.makedirs(path)
        res = [os.path.join(self.tmp, f"res-{r}") for r in range(WORLD)]
        for f in res:
            if os.path.exists(f):
                os.remove(f)
        watch = Inotify(path)
        port = free_port()
        pids = [fork(lambda r=r: self.save_rank(r, port, path, res[r])) for r in range(WORLD)]
        # Strike while the victim writes its data file (its own first write).
        self.assertTrue(watch.wait_for("create", f"__{victim}_0_*.distcp", time.monotonic() + 60))
        os.kill(pids[victim], signal.SIGSTOP if how == "stopped" else signal.SIGKILL)
        watch.close()
        self.survivors("save", victim, how, res, pids)
        ctx = L.Context()
        with self.assertRaises(L.DcpError) as cm:
            L.load(ctx, L.State(), path)
        self.assertEqual(cm.exception.status, NOT_FOUND, "a save with a dead rank committed")

    def load_case(self, victim, how):
        # Strike 30 ms into the load (each rank reads 32 MiB); on a machine fast enough to finish
        # by then, strike earlier.
        for delay in (0.03, 0.01, 0.0):
            if self.load_attempt(victim, how, delay, retry_ok=delay > 0):
                return

    def load_attempt(self, victim, how, delay, retry_ok):
        res = [os.path.join(self.tmp, f"res-{r}") for r in range(WORLD)]
        for f in res:
            if os.path.exists(f):
                os.remove(f)
        rfd, wfd = os.pipe()
        port = free_port()
        pids = [fork(lambda r=r: self.load_rank(r, port, self.ckpt, res[r], wfd)) for r in range(WORLD)]
        os.close(wfd)
        ready = set()
        while len(ready) < WORLD:
            ready |= set(os.read(rfd, 16))
        os.close(rfd)
        time.sleep(delay)
        os.kill(pids[victim], signal.SIGSTOP if how == "stopped" else signal.SIGKILL)
        return self.survivors("load", victim, how, res, pids, retry_ok)

    def test_save_rank_killed(self):
        for victim in (1, 0):
            self.save_case(victim, "killed")

    def test_save_rank_stopped(self):
        for victim in (2, 0):
            self.save_case(victim, "stopped")

    def test_load_rank_killed(self):
        for victim in (2, 0):
            self.load_case(victim, "killed")

    def test_load_rank_stopped(self):
        for victim in (1, 0):
            self.load_case(victim, "stopped")


if __name__ == "__main__":
    unittest.main(verbosity=2)
