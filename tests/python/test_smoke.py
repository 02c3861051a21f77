"""Smoke test of a real blockd through clients that have NO copy of our proto.

Stubs for gRPC server reflection (v1alpha, what Debian's gRPC 1.51 serves) and health checking are
generated at test time from /usr/share/grpc-proto with protoc + grpc_python_plugin. The test
discovers blockd.v1.BlockService through reflection, builds its message classes from the
FileDescriptorProto the server sends, and drives CreateBlock / Forward / Backward / Step with those
dynamic messages. It also scrapes /metrics (checked by `promtool check metrics`) and checks that
SIGTERM makes the daemon exit 0.

    BLOCKD_BINARY=build/server/blockd PYTHONPATH=tests/python /usr/bin/python3 -m unittest -v test_smoke
"""
import importlib
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from blockd_testing import Daemon

GRPC_PROTO_DIR = "/usr/share/grpc-proto"
PROTOC = shutil.which("protoc", path="/usr/bin") or "protoc"
GRPC_PYTHON_PLUGIN = shutil.which("grpc_python_plugin", path="/usr/bin") or "grpc_python_plugin"
PROMTOOL = os.environ.get("PROMTOOL") or shutil.which("promtool", path="/usr/bin") or shutil.which("promtool")

# The families the dashboard and alerts rely on, with the labels each sample must carry.
REQUIRED_FAMILIES = {
    "blockd_requests_total": ("counter", {"method", "code"}),
    "blockd_request_duration_seconds": ("histogram", {"method"}),
    "blockd_inflight_requests": ("gauge", set()),
    "blockd_tokens_total": ("counter", {"pass"}),
    "blockd_optimizer_steps_total": ("counter", set()),
    "blockd_blocks": ("gauge", set()),
    "blockd_memory_used_bytes": ("gauge", {"device"}),
    "blockd_activations_held": ("gauge", set()),
    "blockd_bytes_received_total": ("counter", set()),
    "blockd_bytes_sent_total": ("counter", set()),
}
REQUIRED_RPCS = {"GetServerInfo", "CreateBlock", "LoadWeights", "ListBlocks", "GetBlock", "DeleteBlock", "Forward",
                 "Backward", "ReleaseActivations", "ZeroGrad", "Step", "DownloadTensors", "SaveCheckpoint",
                 "RestoreCheckpoint"}

_tmp = None
_daemon = None
refl_pb2 = refl_grpc = health_pb2 = health_grpc = None


def generate_stubs(out_root):
    """protoc the reflection and health protos into out_root/smokepb (a package of our own, so that
    nothing collides with the `grpc` package)."""
    src = os.path.join(out_root, "src")
    os.makedirs(os.path.join(src, "smokepb"))
    os.makedirs(os.path.join(out_root, "smokepb"))
    open(os.path.join(out_root, "smokepb", "__init__.py"), "w").close()
    shutil.copy(os.path.join(GRPC_PROTO_DIR, "grpc/reflection/v1alpha/reflection.proto"),
                os.path.join(src, "smokepb", "reflection.proto"))
    shutil.copy(os.path.join(GRPC_PROTO_DIR, "grpc/health/v1/health.proto"),
                os.path.join(src, "smokepb", "health.proto"))
    subprocess.run([PROTOC, f"--proto_path={src}", f"--python_out={out_root}", f"--grpc_out={out_root}",
                    f"--plugin=protoc-gen-grpc={GRPC_PYTHON_PLUGIN}", "smokepb/reflection.proto",
                    "smokepb/health.proto"], check=True)
    sys.path.insert(0, out_root)
    mods = [importlib.import_module(f"smokepb.{m}") for m in
            ("reflection_pb2", "reflection_pb2_grpc", "health_pb2", "health_pb2_grpc")]
    return mods


def setUpModule():
    global _tmp, _daemon, refl_pb2, refl_grpc, health_pb2, health_grpc
    _tmp = tempfile.mkdtemp(prefix="blockd-smoke-")
    refl_pb2, refl_grpc, health_pb2, health_grpc = generate_stubs(_tmp)
    _daemon = Daemon(extra_args=["--worker_threads=2"]).start()


def tearDownModule():
    if _daemon is not None:
        _daemon.stop()
        os.unlink(_daemon.log.name)
    if _tmp is not None:
        shutil.rmtree(_tmp, ignore_errors=True)
        sys.path.remove(_tmp)


def reflect(channel, **request):
    """One ServerReflectionInfo exchange."""
    stub = refl_grpc.ServerReflectionStub(channel)
    responses = list(stub.ServerReflectionInfo(iter([refl_pb2.ServerReflectionRequest(**request)]), timeout=10))
    assert len(responses) == 1, responses
    r = responses[0]
    if r.WhichOneof("message_response") == "error_response":
        raise AssertionError(f"reflection error {r.error_response.error_code}: {r.error_response.error_message}")
    return r


def service_files(channel):
    """blockd.v1.BlockService's FileDescriptorProto(s), through reflection only."""
    r = reflect(channel, file_containing_symbol="blockd.v1.BlockService")
    return [descriptor_pb2.FileDescriptorProto.FromString(b) for b in r.file_descriptor_response.file_descriptor_proto]


def parse_exposition(text):
    """Prometheus text format -> ({family: type}, [(sample name, {label: value}, value)])."""
    types, samples = {}, []
    label_re = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, typ = line.split(None, 3)
            types[name] = typ.strip()
        elif line and not line.startswith("#"):
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)", line)
            assert m, f"unparsable metrics line: {line!r}"
            samples.append((m.group(1), dict(label_re.findall(m.group(3) or "")), float(m.group(4))))
    return types, samples


class DynamicClient:
    """blockd.v1.BlockService driven with message classes built from what reflection returned."""

    def __init__(self, channel):
        self.channel = channel
        self.pool = descriptor_pool.DescriptorPool()
        pending = service_files(channel)
        added = set()
        for _ in range(100):  # add files after their dependencies (block_service.proto imports none today)
            if not pending:
                break
            ready = [f for f in pending if all(dep in added for dep in f.dependency)]
            if not ready:
                missing = {d for f in pending for d in f.dependency} - added - {f.name for f in pending}
                assert missing, f"circular imports among {[f.name for f in pending]}"
                for dep in missing:
                    r = reflect(channel, file_by_filename=dep)
                    pending += [descriptor_pb2.FileDescriptorProto.FromString(b)
                                for b in r.file_descriptor_response.file_descriptor_proto]
                continue
            for f in ready:
                if f.name not in added:
                    self.pool.Add(f)
                    added.add(f.name)
                pending.remove(f)
        assert not pending, f"could not resolve {[f.name for f in pending]}"
        self.factory = message_factory.MessageFactory(self.pool)
        self.service = self.pool.FindServiceByName("blockd.v1.BlockService")
        self.dtype = {n: v.number for n, v in self.pool.FindEnumTypeByName("blockd.v1.DType").values_by_name.items()}

    def method(self, name):
        """(request class, callable) for a unary RPC."""
        m = self.service.methods_by_name[name]
        req_cls = self.factory.GetPrototype(m.input_type)
        resp_cls = self.factory.GetPrototype(m.output_type)
        call = self.channel.unary_unary(f"/{self.service.full_name}/{name}",
                                        request_serializer=lambda msg: msg.SerializeToString(),
                                        response_deserializer=resp_cls.FromString)
        return req_cls, lambda req: call(req, timeout=30)

    def create_block(self, block_id):
        req_cls, create = self.method("CreateBlock")
        req = req_cls(block_id=block_id, seed=7, max_seq_len=16)
        c = req.config
        c.hidden_size, c.num_attention_heads, c.num_kv_heads, c.head_dim = 32, 4, 2, 8
        c.intermediate_size, c.rms_norm_eps, c.rope_theta, c.qk_norm = 64, 1e-6, 10000.0, True
        return create(req)

    def forward(self, block_id, values, shape, keep=True):
        req_cls, forward = self.method("Forward")
        req = req_cls(block_ids=[block_id], keep_activations=keep, position_offset=3)
        req.input.dtype = self.dtype["DTYPE_FLOAT32"]
        req.input.shape.extend(shape)
        req.input.data = struct.pack(f"<{len(values)}f", *values)
        return forward(req)

    def backward(self, activation_id, values, shape):
        req_cls, backward = self.method("Backward")
        req = req_cls(activation_id=activation_id)
        req.grad_output.dtype = self.dtype["DTYPE_FLOAT32"]
        req.grad_output.shape.extend(shape)
        req.grad_output.data = struct.pack(f"<{len(values)}f", *values)
        return backward(req)

    def step(self, block_id):
        req_cls, step = self.method("Step")
        req = req_cls(block_ids=[block_id], max_grad_norm=1.0)
        req.adamw.lr = 1e-3
        return step(req)

    def train_once(self, test, block_id):
        """CreateBlock (seeded), Forward, Backward, Step, checking each reply."""
        info = self.create_block(block_id)
        test.assertEqual(info.block_id, block_id)
        test.assertTrue(info.weights_loaded)
        test.assertGreater(info.parameter_count, 0)
        shape = [2, 5, 32]
        n = 2 * 5 * 32
        xs = [((i * 7919) % 1009) / 504.5 - 1.0 + 1e-3 for i in range(n)]  # deterministic, never zero
        out = self.forward(block_id, xs, shape)
        test.assertEqual(list(out.output.shape), shape)
        test.assertEqual(out.output.dtype, self.dtype["DTYPE_FLOAT32"])
        ys = struct.unpack(f"<{n}f", out.output.data)
        test.assertTrue(all(math.isfinite(y) for y in ys), "non-finite output")
        test.assertNotEqual(out.output.data, struct.pack(f"<{n}f", *xs), "Forward returned its input")
        test.assertTrue(out.activation_id)
        g = self.backward(out.activation_id, list(reversed(xs)), shape)
        test.assertEqual(len(g.grad_input.data), 4 * n)
        test.assertTrue(all(math.isfinite(v) for v in struct.unpack(f"<{n}f", g.grad_input.data)))
        r = self.step(block_id)
        test.assertFalse(r.skipped)
        test.assertGreater(r.grad_norm, 0)
        test.assertEqual([(s.block_id, s.step) for s in r.steps], [(block_id, 1)])
        return r


class SmokeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.channel = grpc.insecure_channel(_daemon.target)

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()

    def test_1_reflection_lists_and_describes(self):
        r = reflect(self.channel, list_services="")
        services = {s.name for s in r.list_services_response.service}
        self.assertIn("blockd.v1.BlockService", services)
        self.assertIn("grpc.health.v1.Health", services)

        files = service_files(self.channel)
        main = [f for f in files if any(s.name == "BlockService" for s in f.service)]
        self.assertEqual(len(main), 1)
        fd = main[0]
        self.assertEqual(fd.package, "blockd.v1")
        self.assertEqual(fd.name, "blockd/v1/block_service.proto")
        svc = [s for s in fd.service if s.name == "BlockService"][0]
        methods = {m.name: m for m in svc.method}
        self.assertLessEqual(REQUIRED_RPCS, set(methods), f"missing RPCs: {REQUIRED_RPCS - set(methods)}")
        self.assertTrue(methods["LoadWeights"].client_streaming)
        self.assertFalse(methods["LoadWeights"].server_streaming)
        self.assertTrue(methods["DownloadTensors"].server_streaming)
        self.assertFalse(methods["DownloadTensors"].client_streaming)
        self.assertEqual(methods["Forward"].input_type, ".blockd.v1.ForwardRequest")
        self.assertEqual(methods["Forward"].output_type, ".blockd.v1.ForwardResponse")
        self.assertEqual(methods["CreateBlock"].output_type, ".blockd.v1.BlockInfo")
        self.assertEqual(methods["GetBlock"].output_type, ".blockd.v1.BlockInfo")
        self.assertEqual(methods["LoadWeights"].input_type, ".blockd.v1.TensorChunk")
        self.assertEqual(methods["DownloadTensors"].output_type, ".blockd.v1.TensorChunk")
        enums = {e.name: {v.name for v in e.value} for e in fd.enum_type}
        self.assertLessEqual({"DTYPE_FLOAT32", "DTYPE_BFLOAT16", "DTYPE_FLOAT16"}, enums["DType"])
        self.assertLessEqual({"TENSOR_KIND_WEIGHTS", "TENSOR_KIND_GRADIENTS", "TENSOR_KIND_ADAM_M",
                              "TENSOR_KIND_ADAM_V"}, enums["TensorKind"])
        print(f"\n[smoke] reflection: {sorted(services)}; BlockService has {len(methods)} RPCs", file=sys.stderr)

    def test_2_health(self):
        stub = health_grpc.HealthStub(self.channel)
        for service in ("", "blockd.v1.BlockService"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            self.assertEqual(resp.status, health_pb2.HealthCheckResponse.SERVING, f"service {service!r}")

    def test_3_dynamic_client_drives_a_block(self):
        r = DynamicClient(self.channel).train_once(self, "smoke-dynamic")
        print(f"\n[smoke] dynamic client: CreateBlock/Forward/Backward/Step ok, grad_norm {r.grad_norm:.4g}",
              file=sys.stderr)

    def test_4_metrics(self):
        # Traffic of our own first, so the counters have something to count whatever ran before.
        DynamicClient(self.channel).train_once(self, "smoke-metrics")
        # The engine gauges (blocks, memory, activations) are refreshed by blockd's housekeeping
        # every second, so poll until they show the block just made.
        deadline = time.monotonic() + 10
        while True:
            with urllib.request.urlopen(_daemon.metrics_url, timeout=10) as resp:
                self.assertEqual(resp.status, 200)
                self.assertIn("text/plain", resp.headers.get("Content-Type", ""))
                text = resp.read().decode()
            types, samples = parse_exposition(text)
            if any(n == "blockd_blocks" and v >= 1 for n, _, v in samples) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if PROMTOOL is None:
            self.fail("promtool not found (Debian package `prometheus`); set PROMTOOL=/path/to/promtool")
        check = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True)
        self.assertEqual(check.returncode, 0, f"promtool check metrics:\n{check.stdout}{check.stderr}")

        for family, (typ, labels) in REQUIRED_FAMILIES.items():
            self.assertEqual(types.get(family), typ, f"family {family}: TYPE {types.get(family)}, expected {typ}")
            names = {family} if typ != "histogram" else {family + "_bucket", family + "_sum", family + "_count"}
            got = [(n, l) for n, l, _ in samples if n in names]
            self.assertTrue(got, f"family {family} has no samples")
            for n, l in got:
                self.assertLessEqual(labels, set(l), f"{n}{l} lacks labels {labels - set(l)}")
        values = {(n, tuple(sorted(l.items()))): v for n, l, v in samples}
        self.assertEqual(len(values), len(samples), "the exposition repeats a series")
        self.assertIn(("blockd_request_duration_seconds_bucket", (("le", "+Inf"), ("method", "Forward"))), values)
        self.assertGreaterEqual(values[("blockd_requests_total", (("code", "OK"), ("method", "Forward")))], 1)
        self.assertGreaterEqual(values[("blockd_tokens_total", (("pass", "forward"),))], 1)
        self.assertGreaterEqual(values[("blockd_tokens_total", (("pass", "backward"),))], 1)
        self.assertGreaterEqual(values[("blockd_optimizer_steps_total", ())], 1)
        self.assertGreaterEqual(values[("blockd_blocks", ())], 1)
        self.assertGreater(values[("blockd_bytes_received_total", ())], 0)
        self.assertGreater(values[("blockd_bytes_sent_total", ())], 0)
        self.assertTrue(any(n == "blockd_memory_used_bytes" and v > 0 for n, _, v in samples))

    def test_5_sigterm_exits_zero(self):
        # A daemon of its own, holding a block and an open activation handle when SIGTERM comes.
        d = Daemon(extra_args=["--worker_threads=2"]).start()
        try:
            with grpc.insecure_channel(d.target) as ch:
                stub = health_grpc.HealthStub(ch)
                self.assertEqual(stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status,
                                 health_pb2.HealthCheckResponse.SERVING)
                client = DynamicClient(ch)
                client.create_block("held")
                held = client.forward("held", [0.25 + i / 640 for i in range(320)], [2, 5, 32])
                self.assertTrue(held.activation_id)
            code = d.stop()
            self.assertEqual(code, 0, f"blockd exited with {code} after SIGTERM:\n{d.read_log()}")
        finally:
            d.kill()
            os.unlink(d.log.name)


if __name__ == "__main__":
    unittest.main()
