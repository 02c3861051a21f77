"""Test support: start a real `blockd` on free loopback ports and stop it.

    with Daemon() as d:                  # BLOCKD_BINARY from the environment (set by ctest)
        channel = grpc.insecure_channel(d.target)
        ...  d.metrics_url ...

The daemon runs on the CPU backend unless `backend=` says otherwise; its log goes to a temporary
file that is printed if it fails to start. BLOCKD_LD_LIBRARY_PATH, when set, becomes the daemon's
LD_LIBRARY_PATH (the GPU host's bundled libraries), leaving this process's own untouched.
"""
import os
import socket
import subprocess
import tempfile
import time
import unittest

import grpc


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    def __init__(self, backend="cpu", extra_args=(), binary=None, env=None):
        self.binary = binary or os.environ.get("BLOCKD_BINARY", "blockd")
        self.backend = backend
        self.extra_args = list(extra_args)
        self.env = env
        self.port = free_port()
        self.metrics_port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.proc = None
        self.log = None

    def start(self, timeout=30.0):
        self.log = tempfile.NamedTemporaryFile(prefix="blockd-", suffix=".log", delete=False)
        args = [self.binary, f"--listen=127.0.0.1:{self.port}",
                f"--metrics_listen=127.0.0.1:{self.metrics_port}", f"--backend={self.backend}"] + self.extra_args
        env = self.env
        if env is None and os.environ.get("BLOCKD_LD_LIBRARY_PATH"):
            # Libraries bundled for the GPU host reach blockd only, never this Python process.
            env = dict(os.environ, LD_LIBRARY_PATH=os.environ["BLOCKD_LD_LIBRARY_PATH"])
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"blockd exited with {self.proc.returncode}:\n{self.read_log()}")
            try:
                with grpc.insecure_channel(self.target) as ch:
                    grpc.channel_ready_future(ch).result(timeout=0.5)
                return self
            except grpc.FutureTimeoutError:
                continue
        self.stop()
        raise RuntimeError(f"blockd did not start within {timeout}s:\n{self.read_log()}")

    def read_log(self):
        if self.log is None:
            return ""
        with open(self.log.name, "r", errors="replace") as f:
            return f.read()

    def stop(self, timeout=30.0):
        """SIGTERM, then wait; returns the exit code (SIGKILL after `timeout`)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self):
        """SIGKILL: the crash that checkpoints must survive."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        if self.log is not None:
            os.unlink(self.log.name)


def relative_error(got, want):
    """max |got - want| / max |want| of two torch tensors, as a float."""
    return ((got - want).abs().max() / want.abs().max()).item()


class DaemonClientTest(unittest.TestCase):
    """For the whole class: a daemon (`cls.daemon`; the CPU backend, or BLOCKD_BACKEND where
    `backend_from_env`), a blockd.Client to it (`cls.client`, `client_timeout` seconds) and a
    temporary directory (`cls.tmp`). A subclass extends setUpClass through super()."""
    client_timeout = 60
    backend_from_env = False

    @classmethod
    def setUpClass(cls):
        import blockd
        backend = os.environ.get("BLOCKD_BACKEND", "cpu") if cls.backend_from_env else "cpu"
        cls.daemon = Daemon(backend=backend).start()
        cls.client = blockd.Client(cls.daemon.target, timeout=cls.client_timeout)
        cls.tmp = tempfile.TemporaryDirectory()

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.daemon.stop()
        cls.tmp.cleanup()
