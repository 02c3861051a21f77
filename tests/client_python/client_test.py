"""The Python client against a real blockd (CPU backend): error mapping, chunked LoadWeights and
DownloadTensors, bf16 on the wire, RemoteSpan autograd and handle release, RemoteAdamW with
learning-rate schedulers and clipping, checked against torch.optim.AdamW."""
import dataclasses
import gc
import math
import os
import shutil
import subprocess
import tempfile
import time
import unittest
import zlib
from concurrent import futures

import grpc
import numpy as np
import torch

import blockd
from blockd import tensors as T
from blockd.v1 import block_service_pb2 as pb
from blockd.v1 import block_service_pb2_grpc as pb_grpc
from blockd_testing import Daemon
from torch_reference import ReferenceBlock, ReferenceSpan

CFG = blockd.BlockConfig(hidden_size=32, num_attention_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48,
                         rms_norm_eps=1e-6, rope_theta=10000.0, qk_norm=True)


# Qwen2 (q/k/v biases) with Qwen2.5's yarn RoPE scaling.
QWEN2_YARN = blockd.BlockConfig(hidden_size=32, num_attention_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48,
                                rms_norm_eps=1e-6, rope_theta=1e6, attention_bias=True,
                                rope_scaling=blockd.RopeScaling(rope_type="yarn", factor=4.0,
                                                                original_max_position_embeddings=1024))


def reference_block(cfg, weights):
    rope = None if cfg.rope_scaling.is_default else dataclasses.asdict(cfg.rope_scaling)
    b = ReferenceBlock(cfg.hidden_size, cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim,
                       cfg.intermediate_size, cfg.rms_norm_eps, cfg.rope_theta, cfg.qk_norm, rope=rope,
                       bias=cfg.attention_bias)
    b.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
    return b


def random_weights(cfg, gen):
    return {name: (torch.rand(shape, generator=gen) * 2 - 1) / math.sqrt(shape[-1]) + (1.0 if len(shape) == 1 else 0)
            for name, shape in cfg.param_shapes().items()}


class TlsDaemon(Daemon):
    """Daemon waits for readiness over plaintext; a TLS server needs the handshake to succeed."""

    def __init__(self, cert, **kwargs):
        super().__init__(**kwargs)
        self.cert = cert

    def start(self, timeout=30.0):
        self.log = tempfile.NamedTemporaryFile(prefix="blockd-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([self.binary, f"--listen=127.0.0.1:{self.port}",
                                      f"--metrics_listen=127.0.0.1:{self.metrics_port}", f"--backend={self.backend}"]
                                     + self.extra_args, stdout=self.log, stderr=subprocess.STDOUT)
        with open(self.cert, "rb") as f:
            creds = grpc.ssl_channel_credentials(f.read())
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            with grpc.secure_channel(self.target, creds) as ch:
                try:
                    grpc.channel_ready_future(ch).result(timeout=0.5)
                    return self
                except grpc.FutureTimeoutError:
                    pass
        self.stop()
        raise RuntimeError(f"blockd with TLS did not start:\n{self.read_log()}")


class ClientTestBase(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.daemon = Daemon().start()
        cls.client = blockd.Client(cls.daemon.target, timeout=60)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.daemon.stop()

    def setUp(self):
        self.gen = torch.Generator().manual_seed(zlib.crc32(self.id().encode()))

    def tearDown(self):
        for b in self.client.list_blocks():
            self.client.delete_block(b.block_id)

    def held(self):
        return self.client.server_info().activations_held


class ErrorMappingTest(ClientTestBase):
    def assertRaisesCode(self, cls, code, fn, *contains):
        with self.assertRaises(cls) as cm:
            fn()
        e = cm.exception
        self.assertIsInstance(e, blockd.BlockdError)
        self.assertEqual(e.code, code, str(e))
        for text in contains:
            self.assertIn(text, e.details)
        return e

    def test_codes_map_to_classes_with_the_servers_message(self):
        c = self.client
        e = self.assertRaisesCode(blockd.NotFoundError, grpc.StatusCode.NOT_FOUND, lambda: c.get_block("nope"),
                                  "block nope not found")
        self.assertEqual(e.method, "GetBlock")
        self.assertIn("GetBlock", str(e))
        c.create_block("e0", CFG, seed=1)
        self.assertRaisesCode(blockd.AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS,
                              lambda: c.create_block("e0", CFG, seed=1), "e0")
        x = np.random.default_rng(0).standard_normal((1, 3, CFG.hidden_size + 1)).astype(np.float32)
        self.assertRaisesCode(blockd.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT,
                              lambda: c.forward(["e0"], x), "[1,3,33]", "e0", "[batch>=1,seq>=1,32]")
        self.assertRaisesCode(blockd.NotFoundError, grpc.StatusCode.NOT_FOUND,
                              lambda: c.backward("no-such-handle", x[..., :-1]))
        c.create_block("e1", CFG)  # no seed: weights must be loaded first
        self.assertRaisesCode(blockd.FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION,
                              lambda: c.forward(["e1"], x[..., :-1]), "not loaded")
        self.assertRaisesCode(blockd.FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION,
                              lambda: c.step(["e0"]), "no gradients")
        self.assertRaisesCode(blockd.UnimplementedError, grpc.StatusCode.UNIMPLEMENTED,
                              lambda: c.create_block("e2", CFG, seed=1, precision="bf16"), "fp32")
        self.assertRaisesCode(blockd.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT,
                              lambda: c.load_weights("e1", {"mlp.bogus.weight": np.ones(4, np.float32)}),
                              "mlp.bogus.weight")
        self.assertRaisesCode(blockd.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT,
                              lambda: c.download_tensors("e0", chunk_bytes=10), "chunk_bytes")
        self.assertRaisesCode(blockd.NotFoundError, grpc.StatusCode.NOT_FOUND,
                              lambda: c.download_tensors("nope"))
        # A 1 ms deadline on a Forward that takes far longer (8 x 1024 tokens of causal attention).
        long_x = np.random.default_rng(1).standard_normal((8, 1024, CFG.hidden_size)).astype(np.float32)
        self.assertRaisesCode(blockd.DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED,
                              lambda: c.forward(["e0"], long_x, timeout=1e-3))
        self.assertEqual(blockd.errors.error_class(grpc.StatusCode.ABORTED), blockd.AbortedError)  # a failed collective
        self.assertEqual(blockd.errors.error_class(grpc.StatusCode.UNKNOWN), blockd.BlockdError)

    def test_local_argument_errors(self):
        with self.assertRaises(ValueError):
            self.client.create_block("e3", CFG, precision="fp8")
        with self.assertRaises(ValueError):
            self.client.load_weights("e3", {})
        with self.assertRaises(ValueError):
            T.encode(np.ones(3, np.int32))

    def test_a_request_over_the_message_limit_says_which_limit_and_what_to_do(self):
        self.client.create_block("m0", CFG, seed=1)
        x = np.random.default_rng(2).standard_normal((8, 128, CFG.hidden_size)).astype(np.float32)  # 128 KiB
        with blockd.Client(self.daemon.target, timeout=60, max_message_bytes=64 << 10) as small:
            e = self.assertRaisesCode(blockd.ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                      lambda: small.forward(["m0"], x))
            self.assertEqual(e.details, "Forward input [8,128,32] float32 is 128.0 KiB, over the 64 KiB message limit "
                                        "(--max_message_bytes on the server / Client(max_message_bytes=...)): split "
                                        "the batch")
            self.assertRaisesCode(blockd.ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  lambda: small.backward("no-such-handle", x),
                                  "Backward grad_output [8,128,32] float32 is 128.0 KiB, over the 64 KiB")
            self.assertEqual(small.forward(["m0"], x[:1, :16]).output.shape, (1, 16, CFG.hidden_size))

    def test_the_servers_smaller_message_limit_gets_the_same_advice(self):
        x = np.random.default_rng(3).standard_normal((8, 128, CFG.hidden_size)).astype(np.float32)
        with Daemon(extra_args=["--max_message_bytes=65536"]) as d, blockd.Client(d.target, timeout=60) as c:
            c.create_block("m1", CFG, seed=1)
            e = self.assertRaisesCode(blockd.ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                      lambda: c.forward(["m1"], x),
                                      "Forward input [8,128,32] float32 is 128.0 KiB, over the server's message "
                                      "limit (Received message larger than max")
            self.assertTrue(e.details.endswith("split the batch, or raise --max_message_bytes on the server"),
                            e.details)

    def test_unreachable_server_is_unavailable(self):
        with blockd.Client("127.0.0.1:1", timeout=5) as c:
            with self.assertRaises(blockd.UnavailableError) as cm:
                c.server_info()
            self.assertEqual(cm.exception.code, grpc.StatusCode.UNAVAILABLE)


class FakeLeaseServicer(pb_grpc.BlockServiceServicer):
    """Records CreateBlock and ListBlocks requests and answers with blocks of chosen idle times (the
    server on this branch keeps no leases; the lease itself is tested where the server has it)."""

    def __init__(self):
        self.creates, self.lists = [], []

    def CreateBlock(self, request, context):
        self.creates.append(request)
        return pb.BlockInfo(block_id=request.block_id, ttl_seconds=request.ttl_seconds)

    def ListBlocks(self, request, context):
        self.lists.append(request)
        return pb.ListBlocksResponse(blocks=[pb.BlockInfo(block_id="fresh", idle_seconds=5),
                                             pb.BlockInfo(block_id="stale", idle_seconds=7200)])


class LeaseRequestTest(unittest.TestCase):
    def test_ttl_and_min_idle_reach_the_request(self):
        fake = FakeLeaseServicer()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_BlockServiceServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            with blockd.Client(f"127.0.0.1:{port}", timeout=30) as c:
                self.assertEqual(c.create_block("b", CFG, ttl=1.5).ttl_seconds, 2)  # rounds up, never to 0
                self.assertEqual(fake.creates[-1].ttl_seconds, 2)
                c.create_block("c", CFG)
                self.assertEqual(fake.creates[-1].ttl_seconds, 0)
                for bad in (0.5, 0, float("inf")):
                    with self.assertRaisesRegex(ValueError, "expected a number of seconds >= 1"):
                        c.create_block("d", CFG, ttl=bad)
                self.assertEqual([b.block_id for b in c.list_blocks(min_idle=3600)], ["stale"])
                self.assertEqual(fake.lists[-1].min_idle_seconds, 3600)
                self.assertEqual([b.block_id for b in c.list_blocks()], ["fresh", "stale"])
                self.assertEqual(fake.lists[-1].min_idle_seconds, 0)
                with self.assertRaisesRegex(ValueError, "min_idle = 0"):
                    c.list_blocks(min_idle=0)
        finally:
            server.stop(None)


class AuthTest(unittest.TestCase):
    def test_tokens(self):
        with tempfile.TemporaryDirectory() as tmp:
            users, admins = os.path.join(tmp, "users"), os.path.join(tmp, "admins")
            with open(users, "w") as f:
                f.write("user-token-0123456789\n")
            with open(admins, "w") as f:
                f.write("admin-token-0123456789\n")
            with Daemon(extra_args=[f"--auth_token_file={users}", f"--admin_token_file={admins}"]) as d:
                with blockd.Client(d.target, timeout=30) as anon:
                    with self.assertRaises(blockd.UnauthenticatedError):
                        anon.list_blocks()
                with blockd.Client(d.target, token="wrong", timeout=30) as wrong:
                    with self.assertRaises(blockd.UnauthenticatedError):
                        wrong.list_blocks()
                with blockd.Client(d.target, token="user-token-0123456789", timeout=30) as user:
                    self.assertEqual(user.list_blocks(), [])
                    with self.assertRaises(blockd.PermissionDeniedError) as cm:
                        user.create_block("a0", CFG, seed=1)
                    self.assertEqual(cm.exception.code, grpc.StatusCode.PERMISSION_DENIED)
                with blockd.Client(d.target, token="admin-token-0123456789", timeout=30) as admin:
                    self.assertEqual(admin.create_block("a0", CFG, seed=1).block_id, "a0")
                    self.assertEqual(len(admin.download_tensors("a0")), len(CFG.param_shapes()))


    @unittest.skipUnless(shutil.which("openssl"), "needs the openssl command to make a certificate")
    def test_tls_with_a_token(self):
        with tempfile.TemporaryDirectory() as tmp:
            cert, key, tokens = (os.path.join(tmp, n) for n in ("cert.pem", "key.pem", "tokens"))
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                            "-days", "1", "-subj", "/CN=localhost", "-addext",
                            "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
            with open(tokens, "w") as f:
                f.write("tls-token-0123456789\n")
            with TlsDaemon(cert, extra_args=[f"--tls_cert={cert}", f"--tls_key={key}",
                                             f"--auth_token_file={tokens}"]) as d:
                with blockd.Client(d.target, token="tls-token-0123456789", root_certificates=cert, timeout=30) as c:
                    self.assertEqual(c.server_info().backend, "cpu")
                with blockd.Client(d.target, token="tls-token-0123456789", timeout=5) as plain:
                    with self.assertRaises(blockd.UnavailableError):  # no TLS: the handshake fails
                        plain.server_info()


class TensorTransferTest(ClientTestBase):
    def test_bf16_rounding_matches_torch(self):
        x = torch.randn(10000, generator=self.gen) * torch.exp(torch.randn(10000, generator=self.gen) * 10)
        # Exact ties between two bf16 values, both parities, plus the special values.
        ties = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8), 3.0e38, 1e-40, -1e-45,
                             float("inf"), float("-inf"), 0.0, -0.0], dtype=torch.float32)
        x = torch.cat([x, ties])
        ours = T.float32_to_bfloat16_bits(x.numpy())
        theirs = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        np.testing.assert_array_equal(ours, theirs)
        nan = T.float32_to_bfloat16_bits(np.array([np.nan], np.float32))
        self.assertTrue(np.isnan(T.bfloat16_bits_to_float32(nan))[0])
        back = T.bfloat16_bits_to_float32(ours)
        np.testing.assert_array_equal(back, x.to(torch.bfloat16).float().numpy())

    def test_load_and_download_in_chunks(self):
        cfg = blockd.BlockConfig(hidden_size=256, num_attention_heads=4, intermediate_size=1152)
        self.client.create_block("big", cfg)
        w = {k: v.numpy() for k, v in random_weights(cfg, self.gen).items()}
        sent = []
        loaded = self.client.load_weights("big", w, chunk_bytes=1000, on_chunk=sent.append)
        self.assertEqual(sorted(loaded), sorted(w))
        self.assertEqual(len(sent), sum(math.ceil(a.nbytes / 1000) for a in w.values()))
        self.assertEqual(sum(sent), sum(a.nbytes for a in w.values()))
        self.assertTrue(self.client.get_block("big").weights_loaded)
        got = self.client.download_tensors("big", chunk_bytes=1024)
        self.assertEqual(list(got), list(cfg.param_shapes()))
        for name in w:
            np.testing.assert_array_equal(got[name], w[name], err_msg=name)
        # The default chunking splits the 1.2 MB MLP matrices into two chunks on the way in.
        sent.clear()
        self.client.load_weights("big", {"mlp.up_proj.weight": w["mlp.up_proj.weight"] * 2}, on_chunk=sent.append)
        self.assertEqual(len(sent), 2)
        got = self.client.download_tensors("big", names=["mlp.up_proj.weight"])
        np.testing.assert_array_equal(got["mlp.up_proj.weight"], w["mlp.up_proj.weight"] * 2)

    def test_bf16_weights_round_trip(self):
        self.client.create_block("b16", CFG)
        w = {k: v.to(torch.bfloat16) for k, v in random_weights(CFG, self.gen).items()}
        self.client.load_weights("b16", w, chunk_bytes=64)
        as_bf16 = self.client.download_tensors("b16", dtype="bf16", as_torch=True)
        as_f32 = self.client.download_tensors("b16")
        for name, v in w.items():
            self.assertEqual(as_bf16[name].dtype, torch.bfloat16)
            self.assertTrue(torch.equal(as_bf16[name].view(torch.int16), v.view(torch.int16)), name)
            np.testing.assert_array_equal(as_f32[name], v.float().numpy(), err_msg=name)

    def test_bf16_activations_on_the_wire(self):
        self.client.create_block("w0", CFG, seed=5)
        x = torch.randn(2, 5, CFG.hidden_size, generator=self.gen)
        y16, _ = self.client.forward("w0", x, dtype="bf16")
        self.assertEqual(y16.dtype, torch.float32)  # decoded back to the input's dtype
        # The server widens bf16 exactly, computes in fp32 and rounds the output to nearest even.
        y32, _ = self.client.forward("w0", x.to(torch.bfloat16).float())
        self.assertTrue(torch.equal(y16, y32.to(torch.bfloat16).float()))
        yb, _ = self.client.forward("w0", x.to(torch.bfloat16))  # a bf16 tensor travels as bf16
        self.assertEqual(yb.dtype, torch.bfloat16)
        self.assertTrue(torch.equal(yb.float(), y16))
        yn, _ = self.client.forward("w0", x.numpy())  # numpy in, numpy out
        self.assertIsInstance(yn, np.ndarray)
        np.testing.assert_array_equal(yn, self.client.forward("w0", x)[0].numpy())


class RemoteSpanTest(ClientTestBase):
    def make_span(self, n=2, prefix="s"):
        return blockd.RemoteSpan.create(self.client, CFG, n, prefix=prefix, seed=3, max_batch_size=4, max_seq_len=16)

    def reference_of(self, span):
        return ReferenceSpan([reference_block(CFG, w) for w in span.download()])

    def test_gradients_match_pytorch(self):
        span = self.make_span()
        ref = self.reference_of(span)
        x = torch.randn(3, 7, CFG.hidden_size, generator=self.gen)
        w = torch.randn(3, 7, CFG.hidden_size, generator=self.gen)
        xr, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
        (span(xr) * w).sum().backward()
        (ref(xl) * w).sum().backward()
        self.assertLess((xr.grad - xl.grad).abs().max().item(), 1e-5 * xl.grad.abs().max().item() + 1e-6)
        for block_id, block in zip(span.block_ids, ref.blocks):
            grads = self.client.download_tensors(block_id, kind="gradients", as_torch=True)
            for name, p in block.named_parameters():
                err = (grads[name] - p.grad).abs().max().item()
                self.assertLess(err, 1e-5 * p.grad.abs().max().item() + 1e-6, f"{block_id} {name}")

    def test_qwen2_yarn_gradients_match_pytorch(self):
        span = blockd.RemoteSpan.create(self.client, QWEN2_YARN, 1, prefix="q2y", seed=5, max_batch_size=4,
                                        max_seq_len=16)
        self.assertTrue(self.client.get_block(span.block_ids[0]).config.attention_bias)
        weights = span.download()[0]
        for part in "qkv":  # seeded biases are zero (HF's init); give them values the output depends on
            name = f"self_attn.{part}_proj.bias"
            weights[name] = torch.randn(weights[name].shape, generator=self.gen) * 0.5
        self.client.load_weights(span.block_ids[0], {n: t.numpy() for n, t in weights.items()})
        ref = ReferenceSpan([reference_block(QWEN2_YARN, weights)])
        x = torch.randn(2, 9, QWEN2_YARN.hidden_size, generator=self.gen)
        w = torch.randn(2, 9, QWEN2_YARN.hidden_size, generator=self.gen)
        xr, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, yl = span(xr, position_offset=5), ref(xl, position_offset=5)
        self.assertLess((yr - yl).abs().max().item(), 1e-5 * yl.abs().max().item())
        (yr * w).sum().backward()
        (yl * w).sum().backward()
        self.assertLess((xr.grad - xl.grad).abs().max().item(), 1e-5 * xl.grad.abs().max().item() + 1e-6)
        grads = self.client.download_tensors(span.block_ids[0], kind="gradients", as_torch=True)
        for name, p in ref.blocks[0].named_parameters():
            err = (grads[name] - p.grad).abs().max().item()
            self.assertLess(err, 1e-5 * p.grad.abs().max().item() + 1e-6, name)

    def test_weight_gradients_without_input_gradients(self):
        span = self.make_span(1)
        x = torch.randn(2, 4, CFG.hidden_size, generator=self.gen)  # requires_grad False
        span(x).sum().backward()
        self.assertTrue(self.client.get_block(span.block_ids[0]).has_gradients)
        span.zero_grad()
        self.assertFalse(self.client.get_block(span.block_ids[0]).has_gradients)

    def test_no_grad_keeps_nothing_and_dropped_graphs_are_released(self):
        span = self.make_span()
        x = torch.randn(2, 4, CFG.hidden_size, generator=self.gen, requires_grad=True)
        with torch.no_grad():
            y0 = span(x)
        self.assertFalse(y0.requires_grad)
        self.assertEqual(self.held(), 0)
        y1 = span(x)
        y2 = span(x)
        self.assertEqual(self.held(), 2)
        del y1
        gc.collect()
        self.client.flush_releases()
        self.assertEqual(self.held(), 1)
        y2.sum().backward()
        self.assertEqual(self.held(), 0)
        torch.testing.assert_close(y0, y2.detach(), rtol=0, atol=0)

    def test_second_backward_is_refused(self):
        span = self.make_span(1)
        x = torch.randn(2, 4, CFG.hidden_size, generator=self.gen, requires_grad=True)
        y = span(x).sum()
        y.backward(retain_graph=True)
        with self.assertRaisesRegex(RuntimeError, "retain_graph"):
            y.backward()

    def test_a_refused_backward_releases_its_handle(self):
        span = self.make_span(1)
        x = torch.randn(2, 4, CFG.hidden_size, generator=self.gen, requires_grad=True)
        y = span(x)
        self.assertEqual(self.held(), 1)
        with self.assertRaises(blockd.InvalidArgumentError):
            y.backward(torch.full_like(y, float("nan")))  # the server refuses non-finite gradients
        self.client.flush_releases()
        self.assertEqual(self.held(), 0)


class FrozenSpanTest(ClientTestBase):
    def test_frozen_span_matches_a_trainable_one_and_refuses_steps(self):
        frozen = blockd.RemoteSpan.create(self.client, CFG, 2, prefix="fz", seed=3, max_batch_size=4,
                                          max_seq_len=16, frozen=True)
        trainable = blockd.RemoteSpan.create(self.client, CFG, 2, prefix="tr", seed=3, max_batch_size=4,
                                             max_seq_len=16)
        params = sum(int(np.prod(t.shape)) for t in frozen.download()[0].values())
        for fid, tid in zip(frozen.block_ids, trainable.block_ids):
            fi, ti = self.client.get_block(fid), self.client.get_block(tid)
            self.assertTrue(fi.frozen)
            self.assertFalse(ti.frozen)
            self.assertEqual(fi.memory_bytes, 4 * params)  # fp32 weights only on the CPU backend
            self.assertEqual(ti.memory_bytes, 16 * params)
        x = torch.randn(3, 7, CFG.hidden_size, generator=self.gen)
        w = torch.randn(3, 7, CFG.hidden_size, generator=self.gen)
        xf, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        yf, yt = frozen(xf), trainable(xt)
        self.assertTrue(torch.equal(yf, yt))
        (yf * w).sum().backward()
        (yt * w).sum().backward()
        self.assertTrue(torch.equal(xf.grad, xt.grad))
        before = frozen.download()
        with self.assertRaisesRegex(blockd.FailedPreconditionError, "is frozen"):
            self.client.step(frozen.block_ids)
        with self.assertRaisesRegex(blockd.FailedPreconditionError, "is frozen"):
            self.client.download_tensors(frozen.block_ids[0], kind="gradients")
        for b, a in zip(before, frozen.download()):
            for name in b:
                self.assertTrue(torch.equal(b[name], a[name]), name)


class RemoteAdamWTest(ClientTestBase):
    def test_matches_torch_adamw_with_schedulers_and_clipping(self):
        span = blockd.RemoteSpan.create(self.client, CFG, 2, prefix="opt", seed=9, max_batch_size=4, max_seq_len=8)
        # Local copies of the weights, stepped by torch.optim.AdamW with the gradients blockd computed.
        local = [{k: torch.nn.Parameter(v) for k, v in w.items()} for w in span.download()]
        params = [p for w in local for p in w.values()]
        lr, wd, clip = 2e-2, 0.1, 0.05
        torch_opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() == 2], "weight_decay": wd},
                                       {"params": [p for p in params if p.dim() == 1], "weight_decay": 0.0}],
                                      lr=lr, betas=(0.8, 0.95), eps=1e-7)
        opt = blockd.RemoteAdamW(span, lr=lr, betas=(0.8, 0.95), eps=1e-7, weight_decay=wd, max_grad_norm=clip)
        scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt, torch_opt)]
        lrs, clipped = [], 0
        for step in range(6):
            x = torch.randn(2, 8, CFG.hidden_size, generator=self.gen)
            span(x).pow(2).mean().backward()
            grads = [self.client.download_tensors(b, kind="gradients", as_torch=True) for b in span.block_ids]
            for w, g in zip(local, grads):
                for k, p in w.items():
                    p.grad = g[k].clone()
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
            lrs.append(opt.param_groups[0]["lr"])
            reported = opt.step()
            self.assertAlmostEqual(reported, norm.item(), delta=1e-6 * norm.item())
            self.assertEqual(opt.last_results[0].steps, {b: step + 1 for b in span.block_ids})
            clipped += opt.last_results[0].clip_coefficient < 1
            torch_opt.step()
            opt.zero_grad()
            torch_opt.zero_grad()
            self.assertFalse(self.client.get_block(span.block_ids[0]).has_gradients)
            for s in scheds:
                s.step()
            for b, w in zip(span.block_ids, local):
                got = self.client.download_tensors(b, as_torch=True)
                for k, p in w.items():
                    torch.testing.assert_close(got[k], p.detach(), rtol=1e-6, atol=1e-7, msg=f"step {step} {b} {k}")
        self.assertEqual(lrs, [lr, lr, lr / 2, lr / 2, lr / 4, lr / 4])
        self.assertGreater(clipped, 0)
        # Moments on the server equal torch's.
        m = self.client.download_tensors(span.block_ids[0], kind="adam_m", as_torch=True)
        for k, p in local[0].items():
            torch.testing.assert_close(m[k], torch_opt.state[p]["exp_avg"], rtol=1e-5, atol=1e-8, msg=k)

    def test_param_groups_and_state_dict(self):
        a = blockd.RemoteSpan.create(self.client, CFG, 1, prefix="ga", seed=1)
        b = blockd.RemoteSpan.create(self.client, CFG, 1, prefix="gb", seed=2)
        opt = blockd.RemoteAdamW([{"span": a, "lr": 1e-2}, {"span": b}], lr=1e-3)
        self.assertEqual([g["lr"] for g in opt.param_groups], [1e-2, 1e-3])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 0.5 ** s, lambda s: 1.0])
        x = torch.randn(1, 4, CFG.hidden_size, generator=self.gen)
        b(a(x)).sum().backward()
        norm = opt.step()  # two Steps (different lr), one global norm
        parts = [r.grad_norm for r in opt.last_results]
        self.assertEqual(len(parts), 2)
        self.assertAlmostEqual(norm, math.sqrt(sum(p * p for p in parts)))
        opt.zero_grad()
        sched.step()
        self.assertEqual([g["lr"] for g in opt.param_groups], [5e-3, 1e-3])
        sd = opt.state_dict()
        self.assertNotIn("client", sd["param_groups"][0])
        self.assertEqual(sd["param_groups"][0]["block_ids"], a.block_ids)
        torch.save(sd, os.devnull)  # serialisable: no channel inside
        opt.param_groups[0]["lr"] = 1.0
        opt.load_state_dict(sd)
        self.assertEqual(opt.param_groups[0]["lr"], 5e-3)
        self.assertIs(opt.param_groups[0]["client"], self.client)
        with self.assertRaisesRegex(ValueError, "global norm"):
            blockd.RemoteAdamW([{"span": a, "lr": 1e-2}, {"span": b}], max_grad_norm=1.0).step()
        with self.assertRaisesRegex(ValueError, "more than one"):
            blockd.RemoteAdamW([a, a])
        with self.assertRaises(ValueError):
            blockd.RemoteAdamW(a, lr=-1)


if __name__ == "__main__":
    unittest.main()
