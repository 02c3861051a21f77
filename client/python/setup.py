"""Installs the blockd Python client from the repository; the gRPC stubs are generated from
proto/blockd/v1/block_service.proto at build time (nothing generated is kept in git).

    /usr/bin/python3 -m pip install --no-build-isolation ./client/python
    /usr/bin/python3 -m pip install --no-build-isolation -e ./client/python   # stubs land in blockd/v1/

Needs protoc and grpc_python_plugin on PATH (Debian: protobuf-compiler, protobuf-compiler-grpc),
or the grpcio-tools package. $PROTOC, $GRPC_PYTHON_PLUGIN and $BLOCKD_PROTO_DIR override them.
"""
import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO = "blockd/v1/block_service.proto"


def proto_root():
    for root in (os.environ.get("BLOCKD_PROTO_DIR"), os.path.join(HERE, "..", "..", "proto"),
                 os.path.join(HERE, "proto")):
        if root and os.path.isfile(os.path.join(root, PROTO)):
            return os.path.abspath(root)
    raise SystemExit(f"cannot find {PROTO}: build from the blockd repository or set BLOCKD_PROTO_DIR")


def generate_stubs(out):
    """blockd/v1/block_service_pb2{,_grpc}.py under `out`."""
    root = proto_root()
    protoc = os.environ.get("PROTOC") or shutil.which("protoc")
    plugin = os.environ.get("GRPC_PYTHON_PLUGIN") or shutil.which("grpc_python_plugin")
    os.makedirs(os.path.join(out, "blockd", "v1"), exist_ok=True)
    if protoc and plugin:
        subprocess.check_call([protoc, f"--proto_path={root}", f"--python_out={out}", f"--grpc_out={out}",
                               f"--plugin=protoc-gen-grpc={plugin}", os.path.join(root, PROTO)])
    else:
        try:
            from grpc_tools import protoc as grpc_protoc
        except ImportError:
            raise SystemExit("need protoc and grpc_python_plugin on PATH, or the grpcio-tools package") from None
        if grpc_protoc.main(["protoc", f"-I{root}", f"--python_out={out}", f"--grpc_python_out={out}",
                             os.path.join(root, PROTO)]) != 0:
            raise SystemExit("grpc_tools.protoc failed")
    open(os.path.join(out, "blockd", "v1", "__init__.py"), "a").close()


class BuildPyWithStubs(build_py):
    def run(self):
        super().run()
        # Editable installs import from the source tree, so the stubs go there (git ignores them).
        generate_stubs(HERE if getattr(self, "editable_mode", False) else self.build_lib)


setup(
    name="blockd",
    version="0.1.0",
    description="Python client for blockd: transformer blocks resident on a GPU, trained over gRPC from PyTorch",
    packages=["blockd"],
    python_requires=">=3.9",
    install_requires=["grpcio>=1.44", "protobuf>=3.19", "numpy>=1.19"],
    extras_require={"torch": ["torch>=1.13"]},
    cmdclass={"build_py": BuildPyWithStubs},
)
