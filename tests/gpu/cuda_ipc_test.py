"""CUDA IPC and pinned POSIX shared memory against a CUDA daemon on this GPU (needs torch with
CUDA: the GPU host).

Forward and Backward with the client's activations in its own device memory, which the daemon
opens by CUDA IPC, must give bitwise what the inline gRPC path gives for the same blocks and
inputs (fp32 and bf16 on the wire); hostile registrations and
slices are refused with state unchanged; unregistering and the client's exit free the regions.
POSIX shared memory, which a CUDA daemon maps and pins for DMA, gives bitwise the inline path
too, and an object truncated under the pinned mapping is refused without harm to the daemon.

    BLOCKD_BINARY=.../blockd BLOCKD_LD_LIBRARY_PATH=... PYTHONPATH=<python>:tests/python \\
        python3 -m unittest -v cuda_ipc_test
"""
import os
import threading
import unittest
import urllib.request
from multiprocessing import shared_memory

import torch

import blockd
from blockd.v1 import block_service_pb2 as pb
from blockd_testing import Daemon

HAVE_CUDA = torch.cuda.is_available()


@unittest.skipUnless(HAVE_CUDA, "needs a CUDA GPU and torch with CUDA (the GPU host)")
class CudaIpcTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.daemon = Daemon(backend="cuda", extra_args=["--allow_shared_memory"]).start()
        cls.ipc = blockd.Client(cls.daemon.target, timeout=120, transport="cuda_ipc")
        cls.grpc = blockd.Client(cls.daemon.target, timeout=120, transport="grpc")
        cls.shm = blockd.Client(cls.daemon.target, timeout=120, transport="shared_memory")
        cfg = blockd.BlockConfig(hidden_size=256, num_attention_heads=4, num_kv_heads=2, head_dim=64,
                                 intermediate_size=512, qk_norm=True)
        for i in range(2):
            cls.grpc.create_block(f"a{i}", cfg, layer_index=i, seed=7 + i, precision="fp32", max_seq_len=64)
        cls.span_a = ["a0", "a1"]

    @classmethod
    def tearDownClass(cls):
        cls.ipc.close()
        cls.grpc.close()
        cls.shm.close()
        cls.daemon.stop()

    def test_forward_backward_bitwise_equal_to_inline(self):
        gen = torch.Generator(device="cuda").manual_seed(11)
        for dtype in (torch.float32, torch.bfloat16):
            with self.subTest(dtype=str(dtype)):
                x = torch.randn(2, 16, 256, device="cuda", generator=gen).to(dtype)
                dy = torch.randn(2, 16, 256, device="cuda", generator=gen).to(dtype)
                y_ipc, h_ipc = self.ipc.forward(self.span_a, x, keep_activations=True)
                y_msg, h_msg = self.grpc.forward(self.span_a, x, keep_activations=True)
                self.assertTrue(y_ipc.is_cuda)
                self.assertEqual(y_ipc.dtype, dtype)
                self.assertTrue(torch.equal(y_ipc, y_msg), f"Forward output differs, max |d| "
                                f"{(y_ipc.float() - y_msg.float()).abs().max().item()}")
                dx_ipc = self.ipc.backward(h_ipc, dy)
                dx_msg = self.grpc.backward(h_msg, dy)
                self.assertTrue(torch.equal(dx_ipc, dx_msg), f"grad_input differs, max |d| "
                                f"{(dx_ipc.float() - dx_msg.float()).abs().max().item()}")
        with urllib.request.urlopen(self.daemon.metrics_url, timeout=30) as r:
            text = r.read().decode()
        moved = [line for line in text.splitlines()
                 if line.startswith("blockd_tensor_bytes_total") and 'transport="cuda_ipc"' in line]
        self.assertEqual(len(moved), 2, text)
        self.assertTrue(all(float(line.split()[-1]) > 0 for line in moved), moved)

    def test_calls_in_flight_from_threads_each_take_a_region(self):
        gen = torch.Generator(device="cuda").manual_seed(13)
        xs = [torch.randn(2, 16, 256, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(4)]
        dys = [torch.randn(2, 16, 256, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(4)]
        got, errors = [None] * 4, []
        start = threading.Barrier(4)

        def call(i):
            try:
                start.wait()
                y, h = self.ipc.forward(self.span_a, xs[i], keep_activations=True)
                got[i] = (y, self.ipc.backward(h, dys[i]))
            except BaseException as e:  # noqa: B902 - failed on the main thread below
                errors.append(e)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        for i in range(4):
            y, h = self.grpc.forward(self.span_a, xs[i], keep_activations=True)
            dx = self.grpc.backward(h, dys[i])
            self.assertTrue(torch.equal(got[i][0], y), f"call {i}: Forward output differs from the inline path")
            self.assertTrue(torch.equal(got[i][1], dx), f"call {i}: grad_input differs from the inline path")
        regions = self.ipc.list_shared_memory()
        copying = [r for r in regions if r.cuda_ipc and r.name.startswith("cuda-")]
        segments = [r for r in regions if r.cuda_ipc and r.name.startswith("seg-")]
        self.assertTrue(len(copying) <= 4, regions)
        self.assertTrue(1 <= len(segments) <= 4, regions)  # bf16 contiguous tensors: read in place

    def test_tensors_in_the_wire_dtype_are_read_and_written_where_they_are(self):
        """A contiguous CUDA tensor in the wire dtype goes by its caching-allocator segment (no copy
        into a region): bitwise the inline path, through new segments after the cache is emptied,
        with at most 4 segments registered; a transposed tensor is copied through a region."""
        gen = torch.Generator(device="cuda").manual_seed(17)
        client = blockd.Client(self.daemon.target, timeout=120, transport="auto")
        try:
            for i in range(10):
                seq = (16, 32, 8, 24, 16)[i % 5]
                x = torch.randn(2, seq, 256, device="cuda", generator=gen).to(torch.bfloat16)
                dy = torch.randn(2, seq, 256, device="cuda", generator=gen).to(torch.bfloat16)
                y, h = client.forward(self.span_a, x, keep_activations=True)
                dx = client.backward(h, dy)
                y_msg, h_msg = self.grpc.forward(self.span_a, x, keep_activations=True)
                dx_msg = self.grpc.backward(h_msg, dy)
                self.assertTrue(torch.equal(y, y_msg), f"call {i}: Forward output differs from the inline path")
                self.assertTrue(torch.equal(dx, dx_msg), f"call {i}: grad_input differs from the inline path")
                segments = [r for r in client.list_shared_memory() if r.name.startswith("seg-")]
                self.assertTrue(1 <= len(segments) <= 4, segments)
                del x, dy, y, dx, y_msg, dx_msg
                if i % 3 == 2:
                    torch.cuda.empty_cache()  # segments freed: their next tensors are in new ones
            xt = torch.randn(256, 16, 2, device="cuda", generator=gen).to(torch.bfloat16).transpose(0, 2)
            yt, _ = client.forward(self.span_a, xt)
            y_msg, _ = self.grpc.forward(self.span_a, xt)
            self.assertTrue(torch.equal(yt, y_msg), "a transposed tensor's Forward differs from the inline path")
        finally:
            client.close()

    def metric(self, transport):
        with urllib.request.urlopen(self.daemon.metrics_url, timeout=30) as r:
            text = r.read().decode()
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("blockd_tensor_bytes_total") and f'transport="{transport}"' in line)

    def test_pinned_posix_regions_are_bitwise_the_inline_path(self):
        gen = torch.Generator().manual_seed(12)
        before = self.metric("shared_memory")
        for dtype in (torch.float32, torch.bfloat16):
            with self.subTest(dtype=str(dtype)):
                x = torch.randn(2, 16, 256, generator=gen).to(dtype)
                dy = torch.randn(2, 16, 256, generator=gen).to(dtype)
                y_shm, h_shm = self.shm.forward(self.span_a, x, keep_activations=True)
                y_msg, h_msg = self.grpc.forward(self.span_a, x, keep_activations=True)
                self.assertTrue(torch.equal(y_shm, y_msg), "Forward output differs")
                dx_shm = self.shm.backward(h_shm, dy)
                dx_msg = self.grpc.backward(h_msg, dy)
                self.assertTrue(torch.equal(dx_shm, dx_msg), "grad_input differs")
        # input, output, grad_output, grad_input of both dtypes went through regions.
        self.assertEqual(self.metric("shared_memory") - before, 4 * 2 * 16 * 256 * (4 + 2))

    def test_an_object_truncated_under_its_pinned_mapping_is_refused(self):
        obj = shared_memory.SharedMemory(name=f"blockd-pin-test-{os.getpid()}", create=True, size=1 << 20)
        try:
            self.grpc.register_shared_memory("pinned", "/" + obj.name, 1 << 20)
            x = torch.randn(1, 4, 256)
            obj.buf[:4096] = x.numpy().tobytes()
            req = pb.ForwardRequest(block_ids=self.span_a, input=pb.Tensor(
                dtype=pb.DTYPE_FLOAT32, shape=(1, 4, 256),
                shared_memory=pb.SharedMemoryRef(region="pinned", offset=0, byte_size=4096)),
                output_shared_memory=pb.SharedMemoryRef(region="pinned", offset=4096, byte_size=4096))
            self.grpc._unary("Forward", req, None)
            y_msg, _ = self.grpc.forward(self.span_a, x)
            y_shm = torch.frombuffer(bytearray(obj.buf[4096:8192]), dtype=torch.float32).reshape(1, 4, 256)
            self.assertTrue(torch.equal(y_shm, y_msg))
            os.ftruncate(obj._fd, 100)
            with self.assertRaises(blockd.BlockdError) as cm:
                self.grpc._unary("Forward", req, None)
            self.assertIn("truncated", str(cm.exception))
            y_again, _ = self.grpc.forward(self.span_a, x)  # the daemon computes on
            self.assertTrue(torch.equal(y_again, y_msg))
        finally:
            self.grpc.unregister_shared_memory("pinned")
            obj.close()
            obj.unlink()

    def test_hostile_slices_and_registrations_are_refused(self):
        buf = torch.zeros(4096, dtype=torch.uint8, device="cuda")
        event = torch.cuda.Event(interprocess=True)
        event.record()
        region = self.ipc.register_cuda_tensor("hostile", buf, event=event)
        self.assertTrue(region.cuda_ipc)
        try:
            before = self.grpc.download_tensors("a0", kind="weights")
            shape = (1, 4, 256)  # 4096 bytes of fp32
            for offset, size, words in [(-1, 4096, "outside region"), (1, 4096, "outside region"),
                                        (0, 4097, "outside region"), (2**62, 16, "outside region"),
                                        (0, 2048, "bytes of data")]:
                req = pb.ForwardRequest(block_ids=self.span_a, input=pb.Tensor(
                    dtype=pb.DTYPE_FLOAT32, shape=shape,
                    shared_memory=pb.SharedMemoryRef(region="hostile", offset=offset, byte_size=size)))
                with self.assertRaises(blockd.BlockdError) as cm:
                    self.ipc._unary("Forward", req, None)
                self.assertIn(words, str(cm.exception))
            # A window past the allocation's end, and a malformed handle, at registration.
            from blockd.cuda_ipc import share_cuda_tensor
            device, handle, offset, size = share_cuda_tensor(buf)
            for h, n, words in [(handle, size + (1 << 30), "allocation holds"), (handle[:63], size, "63 bytes"),
                                (bytes(64), size, "does not open")]:
                req = pb.RegisterSharedMemoryRequest(name="bad", cuda_ipc_handle=h, device=device, byte_size=n,
                                                     offset=offset)
                with self.assertRaises(blockd.BlockdError) as cm:
                    self.ipc._unary("RegisterSharedMemory", req, None)
                self.assertIn(words, str(cm.exception))
            names = [r.name for r in self.ipc.list_shared_memory()]
            self.assertNotIn("bad", names)
            after = self.grpc.download_tensors("a0", kind="weights")
            self.assertTrue(all((before[n] == after[n]).all() for n in before), "a refused call changed weights")
            # The daemon still computes (no sticky error from the refused handles).
            x = torch.randn(1, 4, 256, device="cuda")
            y1, _ = self.ipc.forward(self.span_a, x)
            y2, _ = self.grpc.forward(self.span_a, x)
            self.assertTrue(torch.equal(y1, y2))
        finally:
            self.ipc.unregister_shared_memory("hostile")
        self.assertNotIn("hostile", [r.name for r in self.ipc.list_shared_memory()])


if __name__ == "__main__":
    unittest.main()
