"""Shared-memory tensors from the Python client against a real blockd (CPU backend): RemoteSpan and
infer_step through shared memory give bitwise the results of the gRPC path; "auto" falls back to
gRPC where the daemon does not allow it and "shared_memory" then raises; the metrics count bytes
by transport; a client killed with a region registered leaves nothing behind after the TTL."""
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import unittest
import urllib.request

import numpy as np
import torch

import blockd
from blockd.shared_memory import RegionPool, SharedMemoryRegion, parallel_copy
from blockd.v1 import block_service_pb2 as pb
from blockd_testing import Daemon

CFG = blockd.BlockConfig(hidden_size=32, num_attention_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48,
                         qk_norm=True)


def region_fds(pid):
    """The daemon's open descriptors of blockd shared-memory objects."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if "/dev/shm/blockd-" in target:
            out.append(target)
    return out


def tensor_bytes(daemon, transport, direction):
    text = urllib.request.urlopen(daemon.metrics_url, timeout=10).read().decode()
    m = re.search(r'blockd_tensor_bytes_total\{(?=[^}]*transport="%s")(?=[^}]*direction="%s")[^}]*\} (\S+)'
                  % (transport, direction), text)
    return float(m.group(1)) if m else None


class SharedMemoryTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.daemon = Daemon(extra_args=["--allow_shared_memory", "--shared_memory_ttl=2s"]).start()

    @classmethod
    def tearDownClass(cls):
        cls.daemon.stop()

    def test_span_and_infer_steps_are_bitwise_the_grpc_path(self):
        with blockd.Client(self.daemon.target) as c:
            shm = blockd.RemoteSpan.create(c, CFG, num_blocks=2, prefix="shm", seed=3)
            ref = blockd.RemoteSpan.create(c, CFG, num_blocks=2, prefix="grpc", seed=3, transport="grpc")
            gen = torch.Generator().manual_seed(1234)
            x = torch.randn(2, 6, 32, generator=gen)
            dy = torch.randn(2, 6, 32, generator=gen)
            outs = []
            for span in (shm, ref):
                xi = x.clone().requires_grad_(True)
                y = span(xi)
                y.backward(dy)
                outs.append((y.detach(), xi.grad))
            self.assertTrue(c._arena, "the client did not take shared memory on a daemon that allows it")
            self.assertEqual(len(c.list_shared_memory()), 1)
            self.assertTrue(torch.equal(outs[0][0], outs[1][0]), "span output differs from the gRPC path")
            self.assertTrue(torch.equal(outs[0][1], outs[1][1]), "grad_input differs from the gRPC path")
            for a, b in zip(shm.download("gradients"), ref.download("gradients")):
                for name in a:
                    self.assertTrue(torch.equal(a[name], b[name]), f"gradient {name} differs")
            s1 = c.open_session(shm.block_ids, batch_size=2, max_length=8).session_id
            s2 = c.open_session(ref.block_ids, batch_size=2, max_length=8).session_id
            for step in range(3):
                h = np.random.default_rng(step).standard_normal((2, 3 if step == 0 else 1, 32)).astype(np.float32)
                got = c.infer_step(s1, h)
                want = c.infer_step(s2, h, transport="grpc")
                self.assertEqual(got.length, want.length)
                np.testing.assert_array_equal(got.hidden_states, want.hidden_states,
                                              err_msg=f"step {step} differs from the gRPC path")
            self.assertGreater(tensor_bytes(self.daemon, "shared_memory", "in"), 0)
            self.assertGreater(tensor_bytes(self.daemon, "shared_memory", "out"), 0)
            self.assertGreater(tensor_bytes(self.daemon, "inline", "in"), 0)
        with blockd.Client(self.daemon.target) as c:
            self.assertNotIn("g", [r.name for r in c.list_shared_memory()])  # close() unregistered it (same identity)

    def test_a_killed_client_leaves_nothing_after_the_ttl(self):
        script = textwrap.dedent(f"""
            import os, signal, numpy as np, blockd
            c = blockd.Client({self.daemon.target!r}, client_name="doomed")
            c.create_block("doomed0", blockd.BlockConfig(hidden_size=32, num_attention_heads=4, intermediate_size=48),
                           seed=1)
            c.forward(["doomed0"], np.ones((1, 2, 32), np.float32))
            assert c._arena, "no shared memory"
            os.kill(os.getpid(), signal.SIGKILL)
        """)
        p = subprocess.run([sys.executable, "-c", script], env=os.environ, timeout=120, capture_output=True)
        self.assertEqual(p.returncode, -9, p.stderr.decode())
        # Its object's name went at registration: what the daemon still holds is unlinked.
        for target in region_fds(self.daemon.proc.pid):
            self.assertTrue(target.endswith("(deleted)"), target)
        deadline = time.time() + 30
        while region_fds(self.daemon.proc.pid) and time.time() < deadline:
            time.sleep(0.1)
        self.assertEqual(region_fds(self.daemon.proc.pid), [],
                         "the daemon still holds the killed client's region 30 s after its 2 s TTL")
        with blockd.Client(self.daemon.target, client_name="doomed") as c:
            self.assertNotIn("g", [r.name for r in c.list_shared_memory()])

    def test_a_region_expired_while_idle_is_registered_again(self):
        with blockd.Client(self.daemon.target, client_name="idler") as c:
            c.create_block("idle0", CFG, seed=2)
            x = np.random.default_rng(5).standard_normal((1, 3, 32)).astype(np.float32)
            first, _ = c.forward(["idle0"], x)
            deadline = time.time() + 30
            while c.list_shared_memory() and time.time() < deadline:
                time.sleep(0.1)
            self.assertEqual(c.list_shared_memory(), [], "the idle region did not expire within 30 s of its 2 s TTL")
            again, _ = c.forward(["idle0"], x)
            np.testing.assert_array_equal(first, again)
            self.assertEqual(len(c.list_shared_memory()), 1)

    def test_calls_from_threads_each_take_a_region_and_match_the_grpc_path(self):
        with blockd.Client(self.daemon.target, client_name="threads") as c:
            c.create_block("thr0", CFG, seed=4)
            inputs = [np.random.default_rng(40 + i).standard_normal((2, 5, 32)).astype(np.float32) for i in range(6)]
            want = [c.forward(["thr0"], x, transport="grpc")[0] for x in inputs]
            got = [None] * len(inputs)
            start = threading.Barrier(len(inputs))

            def call(i):
                start.wait()
                got[i] = c.forward(["thr0"], inputs[i])[0]

            threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for i, (g, w) in enumerate(zip(got, want)):
                np.testing.assert_array_equal(g, w, err_msg=f"call {i} differs from the gRPC path")
            self.assertTrue(1 <= len(c.list_shared_memory()) <= len(inputs), c.list_shared_memory())

    def test_large_writes_and_reads_move_every_byte(self):
        with blockd.Client(self.daemon.target, client_name="large") as c:
            region = SharedMemoryRegion(c, 12 << 20)
            try:
                for n in (5, (4 << 20) - 1, (9 << 20) + 5):  # one copy, and slices with a ragged last one
                    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
                    region.write(3, data)
                    self.assertEqual(region.read(region.ref(3, n)), data, f"{n} bytes")
                with self.assertRaises(ValueError):
                    region.write((12 << 20) - 4, bytes(5))
            finally:
                region.close()

    def test_cuda_ipc_needs_cuda_tensors_and_a_cuda_daemon(self):
        with blockd.Client(self.daemon.target) as c:
            span = blockd.RemoteSpan.create(c, CFG, num_blocks=1, prefix="ipc", seed=3)
            with self.assertRaises(ValueError) as e:  # forcing CUDA IPC with a host tensor
                c.forward(span.block_ids, torch.randn(1, 4, 32), transport="cuda_ipc")
            self.assertIn("CUDA torch tensors", str(e.exception))
            if not torch.cuda.is_available():
                with self.assertRaises(ValueError) as e:
                    c.register_cuda_tensor("g", torch.zeros(16))
                self.assertIn("CUDA torch.Tensor", str(e.exception))
            # The CPU daemon refuses a well-formed CUDA IPC registration, naming the backend.
            req = pb.RegisterSharedMemoryRequest(name="g", cuda_ipc_handle=bytes(64), byte_size=4096)
            with self.assertRaises(blockd.FailedPreconditionError) as e:
                c._unary("RegisterSharedMemory", req, None)
            self.assertIn("CUDA backend", str(e.exception))
            self.assertNotIn("g", [r.name for r in c.list_shared_memory()])



class FakeRegion:
    def __init__(self, made, size):
        self.size, self.closed = size, False
        made.append(self)

    def close(self):
        self.closed = True


class RegionPoolTest(unittest.TestCase):
    """The pool that gives each activation call in flight a region of its own (no daemon)."""

    def test_leases_overlap_grow_and_stop_at_the_limit(self):
        made = []
        pool = RegionPool(lambda size: FakeRegion(made, size), most=2)
        with pool.lease(10) as a, pool.lease(3 << 20) as b:
            self.assertIsNot(a.region, b.region)
            self.assertEqual((a.region.size, b.region.size), (1 << 20, 3 << 20))
            third = threading.Thread(target=lambda: pool.lease(5).__enter__().__exit__())
            third.start()
            third.join(0.2)
            self.assertTrue(third.is_alive(), "a third lease did not wait for one of the two regions")
        third.join(10)
        self.assertFalse(third.is_alive())
        self.assertEqual(len(made), 2, "an idle region was not reused")
        with pool.lease(4 << 20) as c:  # more than either idle region holds: one is replaced
            self.assertGreaterEqual(c.region.size, 4 << 20)
            self.assertEqual(sum(r.closed for r in made), 1)
            size = c.region.size
            c.renew()  # as after a region expired on the daemon: the same size again, the old one closed
            self.assertEqual(c.region.size, size)
        self.assertEqual((len(made), sum(r.closed for r in made)), (4, 2))
        pool.close()
        self.assertTrue(all(r.closed for r in made), "close() left a region registered")
        with self.assertRaises(ValueError):
            pool.lease(1)

    def test_parallel_copy_moves_every_byte(self):
        for n in (0, 1, (2 << 20) - 1, 4 << 20, (8 << 20) + 3, (17 << 20) + 1):
            src = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
            dst = np.full(n + 8, 7, dtype=np.uint8)
            parallel_copy(dst[4:4 + n], src)
            np.testing.assert_array_equal(dst[4:4 + n], src, err_msg=f"{n} bytes")
            self.assertTrue((dst[:4] == 7).all() and (dst[4 + n:] == 7).all(), f"{n} bytes: wrote outside")

    def test_a_region_that_cannot_be_made_frees_its_place(self):
        def refuse(size):
            raise OSError("refused")
        pool = RegionPool(refuse, most=1)
        for _ in range(3):  # would wait forever had the failed lease kept the only place
            with self.assertRaises(OSError):
                with pool.lease(1):
                    pass



class MallocTuningTest(unittest.TestCase):
    """blockd.malloc_tuning: glibc takes the settings for large buffers once per process, unless
    BLOCKD_MALLOC_TUNING=0 (a fresh interpreter each, as a client process would be)."""

    def run_tuning(self, env):
        code = ("import blockd.malloc_tuning as m; a = m.tune_malloc_for_large_buffers(); "
                "print(a, m.tune_malloc_for_large_buffers() is a)")
        p = subprocess.run([sys.executable, "-c", code], env=env, timeout=60, capture_output=True, text=True)
        self.assertEqual(p.returncode, 0, p.stderr)
        return p.stdout.split()

    def test_applied_once_unless_turned_off(self):
        env = {k: v for k, v in os.environ.items() if k != "BLOCKD_MALLOC_TUNING"}
        self.assertEqual(self.run_tuning(env), ["True", "True"])
        self.assertEqual(self.run_tuning(dict(env, BLOCKD_MALLOC_TUNING="0")), ["False", "True"])


class WithoutSharedMemoryTest(unittest.TestCase):
    def test_auto_falls_back_and_forcing_raises(self):
        with Daemon() as daemon, blockd.Client(daemon.target) as c:
            span = blockd.RemoteSpan.create(c, CFG, num_blocks=1, prefix="b", seed=3)
            x = torch.randn(1, 4, 32)
            y = span(x)
            self.assertEqual(tuple(y.shape), (1, 4, 32))
            self.assertIs(c._arena, False)
            with self.assertRaises(blockd.FailedPreconditionError) as e:
                c.forward(span.block_ids, x, transport="shared_memory")
            self.assertIn("--allow_shared_memory", str(e.exception))
            with self.assertRaises(ValueError):
                blockd.Client(daemon.target, transport="carrier-pigeon")


if __name__ == "__main__":
    unittest.main()
