"""Crash consistency: saves (through the C API) killed with SIGKILL at random points.

Every trial saves version v of a ~100 MB state (11 float32 tensors, a bf16 one, an int64 one,
objects) in forked processes and kills them: after a random delay drawn over the whole save
(calibrated from a complete save), or right after a file-system event of the commit protocol
(inotify, names matched by pattern: every save writes fresh names, data files
`__{rank}_{n}_{token}.distcp` and the sidecar `.libdcp_{token}`; a data file created or closed,
the sidecar created or closed, `.metadata.<hex>.tmp` created, closed or removed, `.metadata`
hard-linked into a new directory or, when overwriting, renamed into place, and the old
version's files removed after that; a trial whose event never comes fails). Then, in this
process:

- the previous checkpoint (another directory, saved before the trials) loads bit-exact;
- the new directory either loads bit-exact as version v and `dcp verify` passes ("committed"),
  or the load is refused with DCP_ERROR_NOT_FOUND saying it is not a committed checkpoint
  ("refused"); anything else (a checksum error, a partial or mixed load) fails the test.

Scenarios: one process into a new directory; one process overwriting a committed checkpoint
(afterwards the directory loads bit-exact as the old version or the new one — never neither,
never a mix; and the events of a complete overwrite come in the safe order: `.metadata` is
never removed, it is renamed into place after the new data and sidecar are closed, and the old
files are removed only after that); 2 and 3 ranks (TCP rendezvous) all killed at once; 3 ranks of which one is
killed (the others must return an error, COMM or TIMEOUT naming the rank, within the timeout).

    .venv/bin/python tests/python/test_crash.py [-v]      (after `cargo build --release`)
    env: DCP_CRASH_SCALE=2 doubles the trials; DCP_CRASH_SEED; DCP_FIGURES=FILE appends the table.
"""
import ctypes
import fnmatch
import os
import random
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import libdcp as L  # noqa: E402
from multirank import free_port  # noqa: E402

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DCP = os.environ.get("DCP_BIN") or os.path.join(ROOT, "target", "release", "dcp")
SCALE = float(os.environ.get("DCP_CRASH_SCALE", "1"))
SEED = int(os.environ.get("DCP_CRASH_SEED", "20261124"))
TIMEOUT_S = 6  # collective timeout of the multi-rank saves
NOT_FOUND, COMM, TIMEOUT = 6, 9, 10

# ---------------------------------------------------------------------------------------------
# State: version v of every tensor is base + v (cheap to make, every element differs per v).

N_BIG, BIG = 11, 9 << 18  # 11 x 9 MiB of float32 (2.36 M elements each)
_base = None


def base():
    global _base
    if _base is None:
        g = torch.Generator().manual_seed(SEED)
        _base = {f"model.layers.{i}.weight": torch.randn(BIG // 1024, 1024, generator=g) for i in range(N_BIG)}
        _base["model.embed"] = torch.randn(1000, 64, generator=g).to(torch.bfloat16)
        _base["model.ids"] = torch.randint(-(2**40), 2**40, (4096,), generator=g)
    return _base


def version(v):
    """(tensors, objects) of version v."""
    ts = {k: (t + v) if t.dtype != torch.int64 else t + v * 7 for k, t in base().items()}
    objs = {"train.step": v, "optim.lr": 1e-3 * (v + 1), "train.tag": f"version {v}".encode()}
    return ts, objs


def rows(t, rank, world):
    """Rank's row block (torch.chunk-style) and its first row."""
    n = -(-t.shape[0] // world)
    lo = min(rank * n, t.shape[0])
    hi = min(lo + n, t.shape[0])
    return t[lo:hi].contiguous(), lo


def fill_state(st, ts, objs, rank=0, world=1):
    for k, t in ts.items():
        if world == 1:
            st.add_tensor(k, t)
        else:
            piece, lo = rows(t, rank, world)
            st.add_tensor(k, piece, global_shape=list(t.shape), offsets=[lo] + [0] * (t.dim() - 1))
    st.add_int("train.step", objs["train.step"])
    st.add_double("optim.lr", objs["optim.lr"])
    st.add_bytes("train.tag", objs["train.tag"])


def load_version(ctx, path):
    """Loads the whole checkpoint at `path` in this process: (tensors, objects) or DcpError."""
    ts = {k: torch.empty_like(t) for k, t in base().items()}
    for t in ts.values():
        t.view(torch.uint8).fill_(0xA5) if t.numel() else None
    st = L.State()
    for k, t in ts.items():
        st.add_tensor(k, t)
    st.add_int("train.step", -1)
    st.add_double("optim.lr", -1.0)
    st.add_bytes("train.tag", b"")
    L.load(ctx, st, path)
    return ts, {"train.step": st.get_int("train.step"), "optim.lr": st.get_double("optim.lr"), "train.tag": st.get_bytes("train.tag")[1]}


def same(loaded, v):
    ts, objs = version(v)
    lts, lobjs = loaded
    return all(torch.equal(lts[k], ts[k]) for k in ts) and lobjs == objs


def which_version(loaded, candidates):
    """The candidate version `loaded` equals bit-exact, or None (a mix or garbage)."""
    step = loaded[1]["train.step"]
    if step in candidates and same(loaded, step):
        return step
    return None


def verify_ok(path):
    r = subprocess.run([DCP, "verify", path], capture_output=True, text=True, timeout=120)
    return r.returncode == 0, (r.stdout + r.stderr).strip()


# ---------------------------------------------------------------------------------------------
# Processes and kills.

class Inotify:
    """Events in one directory (ctypes inotify; Linux)."""
    IN_CLOSE_WRITE, IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x8, 0x40, 0x80, 0x100, 0x200
    NAMES = {"close": IN_CLOSE_WRITE, "moved_from": IN_MOVED_FROM, "moved_to": IN_MOVED_TO, "create": IN_CREATE, "delete": IN_DELETE}

    def __init__(self, path):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        mask = self.IN_CLOSE_WRITE | self.IN_MOVED_FROM | self.IN_MOVED_TO | self.IN_CREATE | self.IN_DELETE
        if self.libc.inotify_add_watch(self.fd, path.encode(), mask) < 0:
            raise OSError(ctypes.get_errno(), "inotify_add_watch " + path)

    def events(self, timeout):
        """The events that arrive within `timeout` seconds: [(kind, name)] (empty: none came)."""
        r, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not r:
            return []
        try:
            buf = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        out, at = [], 0
        while at + 16 <= len(buf):
            _, mask, _, n = struct.unpack_from("iIII", buf, at)
            ev_name = buf[at + 16:at + 16 + n].rstrip(b"\0").decode()
            at += 16 + n
            out += [(kind, ev_name) for kind, bit in self.NAMES.items() if mask & bit]
        return out

    def wait_for(self, kind, pattern, deadline):
        """True once event `kind` happens to a name matching the glob `pattern` (before the
        monotonic `deadline`)."""
        while time.monotonic() < deadline:
            for k, name in self.events(deadline - time.monotonic()):
                if k == kind and fnmatch.fnmatchcase(name, pattern):
                    return True
        return False

    def close(self):
        os.close(self.fd)


def fork(fn):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            code = fn() or 0
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 70
        finally:
            os._exit(code)
    return pid


def save_proc(path, v, overwrite, result_file, rank=0, world=1, port=None):
    """A forked process that saves version v (rank `rank` of `world`) and records the outcome."""
    ts, objs = version(v)

    def run():
        t0 = time.monotonic()
        try:
            ctx = L.Context() if world == 1 else L.Context.tcp(rank, world, port, timeout_s=TIMEOUT_S)
            st = L.State()
            fill_state(st, ts, objs, rank, world)
            t0 = time.monotonic()
            L.save(ctx, st, path, overwrite=overwrite)
            out = f"ok {t0} {time.monotonic()}"
        except L.DcpError as e:
            out = f"err {e.status} {time.monotonic() - t0:.2f} {e.message}"
        with open(result_file, "w") as f:
            f.write(out)
        return 0
    return fork(run)


def read(path):
    with open(path) as f:
        return f.read()


def reap(pids, deadline):
    """Waits for every pid; returns {pid: status}; kills what is still there at the deadline."""
    out = {}
    while len(out) < len(pids) and time.monotonic() < deadline:
        for p in pids:
            if p not in out:
                r, st = os.waitpid(p, os.WNOHANG)
                if r:
                    out[p] = st
        time.sleep(0.005)
    for p in pids:
        if p not in out:
            os.kill(p, signal.SIGKILL)
            out[p] = os.waitpid(p, 0)[1]
            out[p] = "hung"
    return out


# ---------------------------------------------------------------------------------------------

TABLE = []  # (scenario, trials, committed, refused/uncommitted, old, neither, extra)


class CrashConsistency(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="libdcp-crash-")
        cls.rng = random.Random(SEED)
        cls.ctx = L.Context()
        version(0)
        # The previous checkpoints: one written by one process, one by 3 ranks.
        cls.prev = os.path.join(cls.tmp, "prev")
        cls.prev3 = os.path.join(cls.tmp, "prev3")
        cls.run_save(cls.prev, 0)
        cls.run_save(cls.prev3, 1000, world=3)
        # When dcp_save runs, counted from the fork (medians of 3): kill delays span it.
        scratch = os.path.join(cls.tmp, "calibrate")
        cls.span = {}
        for world in (1, 3):
            spans = sorted(cls.run_save(scratch, 1, overwrite=True, world=world) for _ in range(3))
            cls.span[world] = (sorted(s[0] for s in spans)[1], sorted(s[1] for s in spans)[1])
        shutil.rmtree(scratch)
        assert same(load_version(cls.ctx, cls.prev), 0)
        assert same(load_version(cls.ctx, cls.prev3), 1000)
        print(f"\nsaves of {sum(t.numel() * t.element_size() for t in base().values()) / 2**20:.0f} MiB: dcp_save runs "
              f"{cls.span[1][0]:.2f}..{cls.span[1][1]:.2f} s after the fork (1 process), "
              f"{cls.span[3][0]:.2f}..{cls.span[3][1]:.2f} s (3 ranks)", flush=True)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        if TABLE:
            lines = ["", "crash consistency (SIGKILL during saves of ~100 MiB; seed %d)" % SEED,
                     f"{'scenario':<44} {'trials':>6} {'committed':>9} {'refused':>8} {'old':>5} {'neither':>7}  notes"]
            for row in TABLE:
                lines.append(f"{row[0]:<44} {row[1]:>6} {row[2]:>9} {row[3]:>8} {row[4]:>5} {row[5]:>7}  {row[6]}")
            total = sum(r[1] for r in TABLE)
            lines.append(f"{'total':<44} {total:>6} {sum(r[2] for r in TABLE):>9} {sum(r[3] for r in TABLE):>8} "
                         f"{sum(r[4] for r in TABLE):>5} {sum(r[5] for r in TABLE):>7}  "
                         "no mixed or broken loads; neither (overwrite left no loadable version) must be 0")
            L.append_figures(lines)

    @classmethod
    def run_save(cls, path, v, overwrite=False, world=1):
        """A complete save in forked processes (no kill)."""
        port = free_port() if world > 1 else None
        res = [os.path.join(cls.tmp, f"res-{r}") for r in range(world)]
        t_fork = time.monotonic()
        pids = [save_proc(path, v, overwrite, res[r], r, world, port) for r in range(world)]
        reap(pids, time.monotonic() + 120)
        span = (float("inf"), 0.0)
        for f in res:
            text = read(f)
            assert text.startswith("ok"), text
            _, a, b = text.split()
            span = (min(span[0], float(a) - t_fork), max(span[1], float(b) - t_fork))
            os.remove(f)
        return span

    def killed_save(self, path, v, overwrite, world, kill, result_prefix):
        """Starts a save and kills per `kill`: ("delay", seconds, ranks) or ("event", kind,
        name, ranks). Returns {rank: outcome text or None} for ranks not killed."""
        port = free_port() if world > 1 else None
        os.makedirs(path, exist_ok=True)
        watch = Inotify(path) if kill[0] == "event" else None
        res = [f"{result_prefix}-{r}" for r in range(world)]
        for f in res:
            if os.path.exists(f):
                os.remove(f)
        t0 = time.monotonic()
        pids = [save_proc(path, v, overwrite, res[r], r, world, port) for r in range(world)]
        victims = kill[-1]
        seen = True
        try:
            if kill[0] == "delay":
                time.sleep(max(0.0, t0 + kill[1] - time.monotonic()))
            else:
                seen = watch.wait_for(kill[1], kill[2], t0 + 60)
            for r in victims:
                try:
                    os.kill(pids[r], signal.SIGKILL)
                except ProcessLookupError:
                    pass
        finally:
            if watch:
                watch.close()
        statuses = reap(pids, time.monotonic() + TIMEOUT_S + 15)
        # Without the event, the kill came after the save and the trial tested nothing.
        self.assertTrue(seen, f"no {kill[1]} event for {kill[2]} within 60 s of the save's start")
        out = {}
        for r in range(world):
            if r in victims:
                continue
            self.assertNotEqual(statuses[pids[r]], "hung", f"rank {r} did not return within the timeout after rank(s) {victims} died")
            self.assertEqual(statuses[pids[r]], 0, f"rank {r} exited abnormally")
            out[r] = read(res[r]) if os.path.exists(res[r]) else None
        return out, time.monotonic() - t0

    def check_prev(self):
        self.assertTrue(same(load_version(self.ctx, self.prev), 0), "the previous checkpoint changed")
        self.assertTrue(same(load_version(self.ctx, self.prev3), 1000), "the previous 3-rank checkpoint changed")

    def outcome(self, path, candidates, what):
        """'committed' (version, verified), 'refused', or a test failure."""
        try:
            loaded = load_version(self.ctx, path)
        except L.DcpError as e:
            self.assertEqual(e.status, NOT_FOUND, f"{what}: {path} neither loads nor is refused as uncommitted: {e}")
            self.assertTrue("not a committed checkpoint" in e.message or "no checkpoint at" in e.message, f"{what}: {e.message}")
            ok, _ = verify_ok(path)
            self.assertFalse(ok, f"{what}: dcp verify passes an uncommitted directory")
            return "refused", None
        got = which_version(loaded, candidates)
        self.assertIsNotNone(got, f"{what}: {path} loads, but as none of versions {candidates} (a mix)")
        ok, msg = verify_ok(path)
        self.assertTrue(ok, f"{what}: {path} loads as version {got} but dcp verify fails: {msg}")
        return "committed", got

    def delay(self, world):
        """A kill time from the fork: uniform from the fork to 10% past the usual end of the save
        (the child starts working before fork() returns in this process)."""
        return self.rng.uniform(0.0, 1.1 * self.span[world][1])

    def plan(self, n_delay, world, events, victims):
        kills = [("delay", self.delay(world), victims) for _ in range(n_delay)]
        kills += [("event", kind, name, victims) for kind, name in events]
        return kills

    # --- scenarios ----------------------------------------------------------------------------
    def test_1_new_directory(self):
        events = [("create", "__0_0_*.distcp"), ("close", "__0_0_*.distcp"), ("create", ".libdcp_*"), ("close", ".libdcp_*"),
                  ("create", ".metadata.*.tmp"), ("close", ".metadata.*.tmp"), ("create", ".metadata"),
                  ("delete", ".metadata.*.tmp")]
        kills = self.plan(int(24 * SCALE), 1, events, [0])
        counts = {"committed": 0, "refused": 0}
        for i, kill in enumerate(kills):
            path = os.path.join(self.tmp, f"new-{i}")
            v = 1 + i
            self.killed_save(path, v, False, 1, kill, os.path.join(self.tmp, "r"))
            self.check_prev()
            kind, _ = self.outcome(path, [v], f"trial {i} ({kill[:3]})")
            counts[kind] += 1
            shutil.rmtree(path)
        TABLE.append(("1 process, new directory", len(kills), counts["committed"], counts["refused"], 0, 0,
                      f"{len(events)} of them killed at commit-protocol events"))

    def overwrite_events(self, path, v):
        """The inotify events of a complete (not killed) overwrite=true save of version v onto
        `path`, in order: [(kind, name)]."""
        watch = Inotify(path)
        res = os.path.join(self.tmp, "r-order")
        events = []
        try:
            pid = save_proc(path, v, True, res)
            deadline = time.monotonic() + 120
            while not os.waitpid(pid, os.WNOHANG)[0]:
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    self.fail("a complete overwrite did not finish in 120 s")
                events += watch.events(0.02)
            while True:
                more = watch.events(0.05)
                if not more:
                    break
                events += more
        finally:
            watch.close()
        self.assertTrue(read(res).startswith("ok"), read(res))
        return events

    def check_overwrite_order(self, path, v):
        """A complete overwrite of the checkpoint at `path` never removes `.metadata`; renames the
        new one into place after the new data files and sidecar are closed; removes the old
        version's files only after that, and all of them."""
        old = set(os.listdir(path)) - {".metadata"}
        self.assertTrue(old, path)
        events = self.overwrite_events(path, v)
        for gone in (("delete", ".metadata"), ("moved_from", ".metadata")):
            self.assertNotIn(gone, events, "an overwrite removes .metadata (uncommits the old checkpoint)")
        self.assertIn(("moved_to", ".metadata"), events, f"an overwrite did not rename .metadata into place: {events}")
        commit = events.index(("moved_to", ".metadata"))
        new_closed = [(i, n) for i, (k, n) in enumerate(events) if k == "close" and n not in old and
                      (fnmatch.fnmatchcase(n, "__*_*_*.distcp") or fnmatch.fnmatchcase(n, ".libdcp_*"))]
        self.assertTrue(any(n.endswith(".distcp") for _, n in new_closed), f"no new data file was written: {events}")
        self.assertTrue(any(n.startswith(".libdcp_") for _, n in new_closed), f"no new sidecar was written: {events}")
        late = [n for i, n in new_closed if i > commit]
        self.assertEqual(late, [], "new files closed after .metadata was renamed into place")
        removed = [(i, n) for i, (k, n) in enumerate(events) if k in ("delete", "moved_from") and n in old]
        early = [n for i, n in removed if i < commit]
        self.assertEqual(early, [], "old files removed before the new .metadata was renamed into place")
        left = sorted(old & set(os.listdir(path)))
        self.assertEqual(left, [], "a complete overwrite left the old version's files behind")
        stray = sorted(n for n in os.listdir(path) if n.endswith(".tmp"))
        self.assertEqual(stray, [], "a complete overwrite left temporary files behind")
        self.assertTrue(same(load_version(self.ctx, path), v))

    def overwrite_outcome(self, path, old, new, what):
        """("old" | "new", version) when `path` loads bit-exact as one of them (and verifies), or
        ("neither", the load error); a mix fails the test."""
        try:
            loaded = load_version(self.ctx, path)
        except L.DcpError as e:
            return "neither", str(e)
        got = which_version(loaded, [old, new])
        self.assertIsNotNone(got, f"{what}: {path} loads, but as neither version {old} nor {new} (a mix)")
        ok, msg = verify_ok(path)
        self.assertTrue(ok, f"{what}: {path} loads as version {got} but dcp verify fails: {msg}")
        return ("old" if got == old else "new"), got

    def test_2_overwrite(self):
        events = [("create", "__0_0_*.distcp"), ("close", "__0_0_*.distcp"), ("create", ".libdcp_*"),
                  ("create", ".metadata.*.tmp"), ("close", ".metadata.*.tmp"), ("moved_to", ".metadata"),
                  ("delete", "__0_0_*.distcp"), ("delete", ".libdcp_*")]
        kills = self.plan(int(14 * SCALE), 1, events, [0])
        path = os.path.join(self.tmp, "ow")
        self.run_save(path, 4999)
        self.check_overwrite_order(path, 5000)
        current = 5000
        counts = {"new": 0, "old": 0, "neither": 0}
        neither = []
        for i, kill in enumerate(kills):
            v = 5001 + i
            self.killed_save(path, v, True, 1, kill, os.path.join(self.tmp, "r"))
            self.check_prev()
            kind, got = self.overwrite_outcome(path, current, v, f"overwrite trial {i} ({kill[:3]})")
            counts[kind] += 1
            if kind == "neither":
                neither.append(f"trial {i} ({kill[:3]}): neither version {current} nor {v} loads: {got}")
                current = 9000 + i
                self.run_save(path, current, overwrite=True)
            else:
                current = got
        TABLE.append(("1 process, overwrite=true of a checkpoint", len(kills), counts["new"], 0, counts["old"], counts["neither"],
                      "committed = the new version loads, old = the previous one still does"))
        self.assertEqual(neither, [], "overwrite trials left no loadable version:\n" + "\n".join(neither))

    def test_3_multirank_all_killed(self):
        events = [("create", "__1_0_*.distcp"), ("create", ".libdcp_*"), ("create", ".metadata.*.tmp"), ("create", ".metadata")]
        counts = {"committed": 0, "refused": 0}
        n = 0
        for world, n_delay in ((2, int(6 * SCALE)), (3, int(6 * SCALE))):
            kills = self.plan(n_delay, 3, events if world == 3 else [], list(range(world)))
            for i, kill in enumerate(kills):
                path = os.path.join(self.tmp, f"mr-{world}-{i}")
                v = 2000 + 100 * world + i
                self.killed_save(path, v, False, world, kill, os.path.join(self.tmp, "r"))
                self.check_prev()
                kind, _ = self.outcome(path, [v], f"{world} ranks, trial {i} ({kill[:3]})")
                counts[kind] += 1
                n += 1
                shutil.rmtree(path)
        TABLE.append(("2 and 3 ranks, all killed", n, counts["committed"], counts["refused"], 0, 0,
                      f"{len(events)} killed at commit events"))

    def test_4_multirank_one_killed(self):
        kills = [("delay", self.delay(3), [self.rng.randrange(3)]) for _ in range(int(8 * SCALE))]
        kills += [("event", "create", "__1_0_*.distcp", [1]), ("event", "create", "__0_0_*.distcp", [0]),
                  ("event", "create", ".libdcp_*", [2])]
        counts = {"committed": 0, "refused": 0}
        survivor_errors = 0
        worst = 0.0
        for i, kill in enumerate(kills):
            path = os.path.join(self.tmp, f"one-{i}")
            v = 3000 + i
            outs, _ = self.killed_save(path, v, False, 3, kill, os.path.join(self.tmp, "r"))
            dead = kill[-1][0]
            for r, text in outs.items():
                self.assertIsNotNone(text, f"trial {i}: rank {r} exited without an outcome")
                if not text.startswith("ok"):
                    _, status, secs, msg = text.split(" ", 3)
                    self.assertIn(int(status), (COMM, TIMEOUT), f"trial {i}: rank {r}: {text}")
                    names_dead = re.search(rf"\brank {dead}\b|\branks \[[0-9, ]*\b{dead}\b", msg) is not None
                    if msg.startswith("dcp_context_new_tcp"):
                        # Killed during the rendezvous: rank 0 gives up and closes, the others
                        # learn that from rank 0.
                        self.assertTrue(names_dead or "rank 0 closed" in msg, f"trial {i}: rank {r}: {msg}")
                    else:
                        self.assertTrue(names_dead, f"trial {i}: rank {r}'s error does not name rank {dead}: {msg}")
                    self.assertLess(float(secs), TIMEOUT_S + 5)
                    worst = max(worst, float(secs))
                    survivor_errors += 1
            self.check_prev()
            kind, _ = self.outcome(path, [v], f"one rank killed, trial {i} ({kill[:3]})")
            counts[kind] += 1
            shutil.rmtree(path)
        TABLE.append(("3 ranks, one rank killed", len(kills), counts["committed"], counts["refused"], 0, 0,
                      f"{survivor_errors} survivor errors (COMM/TIMEOUT naming the rank), slowest {worst:.1f} s"))


if __name__ == "__main__":
    unittest.main(verbosity=2)
