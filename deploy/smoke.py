"""Smoke test of a running blockd, as grpcurl would do it, with no copy of blockd's proto.

    /usr/bin/python3 deploy/smoke.py HOST:PORT [--tls] [--cacert CA.pem] [--token TOKEN]
    deploy/smoke.sh HOST:PORT ...                      # the same

It learns blockd.v1.BlockService from the server's reflection service, builds request messages
from the descriptors it sends, and runs: list services, describe blockd.v1.BlockService, health
check, GetServerInfo, CreateBlock (seeded), Forward (keeping activations), Backward, Step,
DeleteBlock, and GetBlock (which must now say NOT_FOUND). Every step prints the grpcurl command that
does the same and the reply as grpcurl prints it (long base64 strings shortened). It checks each
reply (shapes, finite values, SERVING, a step taken) and exits 1 at the first failure, after
deleting the block it made.

Needs python3-grpcio and python3-protobuf, and the reflection and health protos: by default they
are compiled at start with protoc from /usr/share/grpc-proto (Debian's protobuf-compiler and
grpc-proto); where pip's grpcio-reflection and grpcio-health-checking are installed instead, those
are used.
"""
import argparse
import base64
import importlib
import json
import math
import os
import secrets
import shutil
import struct
import subprocess
import sys
import tempfile

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

SERVICE = "blockd.v1.BlockService"
HEALTH = "grpc.health.v1.Health"
# A small Qwen3-like block: hidden 32, 4 query heads and 2 KV heads of 8, QK-norm.
BLOCK_CONFIG = {"hiddenSize": "32", "numAttentionHeads": "4", "numKvHeads": "2", "headDim": "8",
                "intermediateSize": "64", "rmsNormEps": 1e-6, "ropeTheta": 10000.0, "qkNorm": True}
SHAPE = [1, 4, 32]


class SmokeFailure(Exception):
    pass


def load_protos(proto_dir, workdir):
    """(reflection v1 pb2, reflection v1alpha pb2, health pb2), compiled from proto_dir with protoc
    into a package of our own (so nothing collides with the `grpc` package), or pip's modules."""
    protoc = shutil.which("protoc")
    if protoc and os.path.isdir(proto_dir):
        src = os.path.join(workdir, "src", "blockd_smoke_pb")
        os.makedirs(src)
        os.makedirs(os.path.join(workdir, "blockd_smoke_pb"))
        open(os.path.join(workdir, "blockd_smoke_pb", "__init__.py"), "w").close()
        names = {"reflection_v1": "grpc/reflection/v1/reflection.proto",
                 "reflection_v1alpha": "grpc/reflection/v1alpha/reflection.proto",
                 "health": "grpc/health/v1/health.proto"}
        have = {}
        for mod, rel in names.items():
            if os.path.exists(os.path.join(proto_dir, rel)):
                shutil.copy(os.path.join(proto_dir, rel), os.path.join(src, f"{mod}.proto"))
                have[mod] = f"blockd_smoke_pb/{mod}.proto"
        if "health" not in have or "reflection_v1alpha" not in have:
            raise SmokeFailure(f"{proto_dir} lacks the health or reflection protos (Debian package grpc-proto)")
        subprocess.run([protoc, f"--proto_path={os.path.join(workdir, 'src')}", f"--python_out={workdir}",
                        *have.values()], check=True)
        sys.path.insert(0, workdir)
        mods = {m: importlib.import_module(f"blockd_smoke_pb.{m}_pb2") for m in have}
        return mods.get("reflection_v1"), mods["reflection_v1alpha"], mods["health"]
    try:
        from grpc_health.v1 import health_pb2
        from grpc_reflection.v1alpha import reflection_pb2
    except ImportError:
        raise SmokeFailure("need protoc and /usr/share/grpc-proto (Debian: protobuf-compiler grpc-proto), "
                           "or pip's grpcio-reflection and grpcio-health-checking") from None
    return None, reflection_pb2, health_pb2


def shorten(obj):
    """The JSON with base64 strings over 64 characters cut, for printing."""
    if isinstance(obj, dict):
        return {k: shorten(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [shorten(v) for v in obj]
    if isinstance(obj, str) and len(obj) > 64:
        return f"{obj[:24]}...({len(obj)} chars)"
    return obj


class Smoke:
    def __init__(self, args, refl_v1, refl_v1alpha, health_pb2):
        self.args = args
        self.refl = [r for r in (refl_v1, refl_v1alpha) if r is not None]
        self.health_pb2 = health_pb2
        self.metadata = (("authorization", f"Bearer {args.token}"),) if args.token else ()
        if args.tls or args.cacert:
            root = open(args.cacert, "rb").read() if args.cacert else None
            key = open(args.key, "rb").read() if args.key else None
            cert = open(args.cert, "rb").read() if args.cert else None
            creds = grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert)
            options = (("grpc.ssl_target_name_override", args.authority),) if args.authority else ()
            self.channel = grpc.secure_channel(args.target, creds, options=options)
            self.grpcurl = ["grpcurl"] + ([f"-cacert {args.cacert}"] if args.cacert else [])
        else:
            self.channel = grpc.insecure_channel(args.target)
            self.grpcurl = ["grpcurl", "-plaintext"]
        if args.token:
            self.grpcurl.append("-H 'authorization: Bearer $TOKEN'")
        self.pool = descriptor_pool.DescriptorPool()
        self.service = None
        self.block_id = args.block_id or f"smoke-{secrets.token_hex(4)}"
        self.created = False

    # --- printing -------------------------------------------------------------------------------
    def show(self, args, data=None):
        cmd = list(self.grpcurl)
        if data is not None:
            cmd.append("-d '" + json.dumps(shorten(data), separators=(", ", ": ")) + "'")
        print(f"\n$ {' '.join(cmd + [self.args.target] + args)}", flush=True)

    @staticmethod
    def reply(msg):
        text = json_format.MessageToJson(msg, indent=2)
        print(json.dumps(shorten(json.loads(text)), indent=2), flush=True)

    # --- reflection -----------------------------------------------------------------------------
    def reflect(self, **request):
        """One ServerReflectionInfo exchange: v1 first, v1alpha when the server lacks v1."""
        last = None
        for pb2 in self.refl:
            package = pb2.DESCRIPTOR.package
            call = self.channel.stream_stream(f"/{package}.ServerReflection/ServerReflectionInfo",
                                              request_serializer=lambda m: m.SerializeToString(),
                                              response_deserializer=pb2.ServerReflectionResponse.FromString)
            try:
                replies = list(call(iter([pb2.ServerReflectionRequest(**request)]), timeout=self.args.timeout,
                                    metadata=self.metadata))
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    last = e
                    continue
                raise
            if len(replies) != 1:
                raise SmokeFailure(f"reflection: expected one reply, got {len(replies)}")
            r = replies[0]
            if r.WhichOneof("message_response") == "error_response":
                raise SmokeFailure(f"reflection error {r.error_response.error_code}: {r.error_response.error_message}")
            return r
        raise SmokeFailure(f"the server serves no reflection service: {last.details() if last else ''}")

    def load_service(self):
        files = {}
        pending = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in
                   self.reflect(file_containing_symbol=SERVICE).file_descriptor_response.file_descriptor_proto]
        while pending:
            f = pending.pop()
            if f.name in files:
                continue
            files[f.name] = f
            for dep in f.dependency:
                if dep not in files:
                    pending += [descriptor_pb2.FileDescriptorProto.FromString(b) for b in
                                self.reflect(file_by_filename=dep).file_descriptor_response.file_descriptor_proto]
        added = set()
        while len(added) < len(files):  # add files after their dependencies
            ready = [f for n, f in files.items() if n not in added and all(d in added for d in f.dependency)]
            if not ready:
                raise SmokeFailure(f"cannot order the service's files: {sorted(set(files) - added)}")
            for f in ready:
                self.pool.Add(f)
                added.add(f.name)
        self.service = self.pool.FindServiceByName(SERVICE)

    def message_class(self, descriptor):
        get = getattr(message_factory, "GetMessageClass", None)
        if get is not None:
            return get(descriptor)
        return message_factory.MessageFactory(self.pool).GetPrototype(descriptor)

    def call(self, method, data, expect=grpc.StatusCode.OK):
        """Unary BlockService call from a JSON request, as `grpcurl -d JSON ... Service/Method`."""
        m = self.service.methods_by_name.get(method)
        if m is None:
            raise SmokeFailure(f"{SERVICE} has no method {method}")
        req = json_format.Parse(json.dumps(data), self.message_class(m.input_type)())
        resp_cls = self.message_class(m.output_type)
        self.show([f"{SERVICE}/{method}"], data)
        rpc = self.channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=lambda x: x.SerializeToString(),
                                       response_deserializer=resp_cls.FromString)
        try:
            resp = rpc(req, timeout=self.args.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            # grpcurl prints Go's code names: NotFound, Unauthenticated, ...
            code = "".join(w.capitalize() for w in e.code().name.split("_"))
            print(f"ERROR:\n  Code: {code}\n  Message: {e.details()}", flush=True)
            if e.code() == expect:
                return None
            raise SmokeFailure(f"{method}: {e.code().name}: {e.details()}") from None
        self.reply(resp)
        if expect != grpc.StatusCode.OK:
            raise SmokeFailure(f"{method}: expected {expect.name}, got OK")
        return resp

    # --- the steps ------------------------------------------------------------------------------
    def list_services(self):
        self.show(["list"])
        names = sorted(s.name for s in self.reflect(list_services="").list_services_response.service)
        print("\n".join(names), flush=True)
        for want in (SERVICE, HEALTH):
            if want not in names:
                raise SmokeFailure(f"list: {want} is not served")

    def describe(self):
        self.show(["describe", SERVICE])
        self.load_service()
        print(f"{SERVICE} is a service:\nservice {self.service.name} {{")
        fdp = descriptor_pb2.FileDescriptorProto()
        self.service.file.CopyToProto(fdp)
        svc = next(s for s in fdp.service if s.name == self.service.name)
        for m in svc.method:
            cs = "stream " if m.client_streaming else ""
            ss = "stream " if m.server_streaming else ""
            print(f"  rpc {m.name} ( {cs}{m.input_type} ) returns ( {ss}{m.output_type} );")
        print("}", flush=True)
        needed = {"GetServerInfo", "CreateBlock", "Forward", "Backward", "Step", "DeleteBlock", "GetBlock"}
        missing = needed - set(self.service.methods_by_name)
        if missing:
            raise SmokeFailure(f"describe: {SERVICE} lacks {sorted(missing)}")

    def health(self):
        pb2 = self.health_pb2
        check = self.channel.unary_unary(f"/{HEALTH}/Check", request_serializer=lambda m: m.SerializeToString(),
                                         response_deserializer=pb2.HealthCheckResponse.FromString)
        for service in ("", SERVICE):
            self.show([f"{HEALTH}/Check"], {"service": service} if service else None)
            resp = check(pb2.HealthCheckRequest(service=service), timeout=self.args.timeout, metadata=self.metadata)
            self.reply(resp)
            if resp.status != pb2.HealthCheckResponse.SERVING:
                raise SmokeFailure(f"health of {service or 'the server'}: "
                                   f"{pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}")

    def run(self):
        self.list_services()
        self.describe()
        self.health()
        info = self.call("GetServerInfo", {})
        n = SHAPE[0] * SHAPE[1] * SHAPE[2]
        trained = False
        try:
            block = self.call("CreateBlock", {"blockId": self.block_id, "config": BLOCK_CONFIG, "maxSeqLen": "16",
                                              "seed": "7"})
            self.created = True
            if block.block_id != self.block_id or not block.weights_loaded or block.parameter_count <= 0:
                raise SmokeFailure(f"CreateBlock: unexpected BlockInfo (weights_loaded {block.weights_loaded}, "
                                   f"parameter_count {block.parameter_count})")
            xs = [((i * 7919) % 1009) / 504.5 - 1.0 + 1e-3 for i in range(n)]  # deterministic, never zero
            x_bytes = struct.pack(f"<{n}f", *xs)
            out = self.call("Forward", {"blockIds": [self.block_id], "keepActivations": True,
                                        "input": {"dtype": "DTYPE_FLOAT32", "shape": [str(d) for d in SHAPE],
                                                  "data": base64.b64encode(x_bytes).decode()}})
            self.check_tensor("Forward output", out.output, n)
            if out.output.data == x_bytes:
                raise SmokeFailure("Forward returned its input unchanged")
            if not out.activation_id:
                raise SmokeFailure("Forward kept no activations (empty activation_id)")
            g_bytes = struct.pack(f"<{n}f", *reversed(xs))
            grad = self.call("Backward", {"activationId": out.activation_id,
                                          "gradOutput": {"dtype": "DTYPE_FLOAT32", "shape": [str(d) for d in SHAPE],
                                                         "data": base64.b64encode(g_bytes).decode()}})
            self.check_tensor("Backward grad_input", grad.grad_input, n)
            step = self.call("Step", {"blockIds": [self.block_id], "adamw": {"lr": 1e-3}, "maxGradNorm": 1.0})
            if step.skipped or not (step.grad_norm > 0 and math.isfinite(step.grad_norm)):
                raise SmokeFailure(f"Step: skipped {step.skipped}, grad_norm {step.grad_norm}")
            if [(s.block_id, s.step) for s in step.steps] != [(self.block_id, 1)]:
                raise SmokeFailure(f"Step: expected {self.block_id} at step 1, got {list(step.steps)}")
            trained = True
        finally:
            if self.created:
                self.created = False
                if trained:
                    self.call("DeleteBlock", {"blockId": self.block_id})
                else:  # a step failed: still leave nothing behind, but report that failure
                    try:
                        self.call("DeleteBlock", {"blockId": self.block_id})
                    except (SmokeFailure, grpc.RpcError) as e:
                        print(f"(cleanup: {e})", file=sys.stderr)
        self.call("GetBlock", {"blockId": self.block_id}, expect=grpc.StatusCode.NOT_FOUND)
        return info

    @staticmethod
    def check_tensor(what, t, n):
        if list(t.shape) != SHAPE:
            raise SmokeFailure(f"{what}: shape {list(t.shape)}, expected {SHAPE}")
        if len(t.data) != 4 * n:
            raise SmokeFailure(f"{what}: {len(t.data)} bytes, expected {4 * n} (float32)")
        values = struct.unpack(f"<{n}f", t.data)
        if not all(math.isfinite(v) for v in values):
            raise SmokeFailure(f"{what}: non-finite values")
        if not any(values):
            raise SmokeFailure(f"{what}: all zeros")


def main(argv=None):
    p = argparse.ArgumentParser(description="grpcurl-style smoke test of a running blockd (no proto needed)")
    p.add_argument("target", metavar="HOST:PORT")
    p.add_argument("--tls", action="store_true", help="TLS with the system's roots (default: plaintext)")
    p.add_argument("--cacert", help="PEM CA for the server's certificate (implies --tls)")
    p.add_argument("--cert", help="PEM client certificate (mutual TLS)")
    p.add_argument("--key", help="PEM key of --cert")
    p.add_argument("--authority", help="server name to verify (TLS)")
    p.add_argument("--token", default=os.environ.get("BLOCKD_TOKEN"),
                   help="bearer token sent as `authorization` (default: $BLOCKD_TOKEN); CreateBlock and "
                        "DeleteBlock need an admin token when the server has --admin_token_file")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline of each call, seconds")
    p.add_argument("--block-id", help="id of the block to create and delete (default: smoke-<random>)")
    p.add_argument("--proto-dir", default="/usr/share/grpc-proto", help="where grpc/health and grpc/reflection are")
    args = p.parse_args(argv)

    workdir = tempfile.mkdtemp(prefix="blockd-smoke-")
    smoke = None
    try:
        smoke = Smoke(args, *load_protos(args.proto_dir, workdir))
        info = smoke.run()
        print(f"\nsmoke: OK: {args.target} serves {SERVICE} (blockd {info.version}, backend {info.backend}); "
              f"block {smoke.block_id} created, trained one step and deleted", flush=True)
        return 0
    except SmokeFailure as e:
        print(f"\nsmoke: FAILED: {e}", file=sys.stderr, flush=True)
        return 1
    except grpc.RpcError as e:
        print(f"\nsmoke: FAILED: {e.code().name}: {e.details()}", file=sys.stderr, flush=True)
        return 1
    finally:
        if smoke is not None:
            smoke.channel.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
