"""deploy/smoke.sh against a real blockd, started with the flags that the cpu overlay deploys.

The cpu overlay is rendered with `kubectl kustomize`, and its ConfigMap's flagfiles are given to
blockd as they are, except the addresses and the checkpoint folder (loopback ports and a temporary
folder here), so a flag the daemon does not know fails this test. Then deploy/smoke.sh must pass
against it, and SIGTERM must drain and exit 0 with the deployed --drain_grace. The smoke script must
also fail: with no server, and with missing or too weak bearer tokens.

    BLOCKD_BINARY=build/server/blockd PYTHONPATH=tests/python /usr/bin/python3 -m unittest -v smoke_test
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

import yaml

from blockd_testing import Daemon, free_port

SOURCE_DIR = os.environ.get("BLOCKD_SOURCE_DIR") or os.path.abspath(os.path.join(os.path.dirname(__file__), "../.."))
SMOKE = os.path.join(SOURCE_DIR, "deploy/smoke.sh")
# Set per environment, not by the deployment: the test's own ports and folder.
LOCAL_FLAGS = ("listen", "metrics_listen", "checkpoint_dir")


def run_smoke(target, *args, timeout=120):
    r = subprocess.run(["bash", SMOKE, target, *args], capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def rendered_flagfiles(overlay, out_dir):
    """The overlay's ConfigMap flagfiles in blockd's --flagfile order, written under out_dir with
    LOCAL_FLAGS removed; returns (paths, the flags they set)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise AssertionError("kubectl not found (it renders deploy/overlays; see deploy/ci.sh)")
    text = subprocess.run([kubectl, "kustomize", os.path.join(SOURCE_DIR, "deploy/overlays", overlay)],
                          check=True, capture_output=True, text=True).stdout
    objects = [o for o in yaml.safe_load_all(text) if o]
    sts = next(o for o in objects if o["kind"] == "StatefulSet")
    container = next(c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "blockd")
    flagfile = next(a for a in container["args"] if a.startswith("--flagfile="))
    mount = next(m for m in container["volumeMounts"] if m["name"] == "flags")
    volume = next(v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "flags")
    cm = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == volume["configMap"]["name"])
    paths, flags = [], {}
    for path in flagfile[len("--flagfile="):].split(","):
        key = os.path.relpath(path, mount["mountPath"])
        kept = []
        for line in cm["data"][key].splitlines():
            name = line.strip().lstrip("-").split("=", 1)[0]
            if line.strip().startswith("--") and name in LOCAL_FLAGS:
                continue
            kept.append(line)
            if line.strip().startswith("--"):
                flags[name] = line.strip().split("=", 1)[1] if "=" in line else "true"
        local = os.path.join(out_dir, key)
        with open(local, "w") as f:
            f.write("\n".join(kept) + "\n")
        paths.append(local)
    return paths, flags


class SmokeAgainstDeployedFlags(unittest.TestCase):
    def test_smoke_passes_and_sigterm_drains(self):
        with tempfile.TemporaryDirectory(prefix="blockd-deploy-") as tmp:
            paths, flags = rendered_flagfiles("cpu", tmp)
            self.assertEqual(flags.get("backend"), "cpu")
            self.assertEqual(flags.get("restore_on_start"), "true")
            d = Daemon(extra_args=[f"--flagfile={','.join(paths)}",
                                   f"--checkpoint_dir={os.path.join(tmp, 'checkpoints')}"])
            d.start()
            try:
                code, out, err = run_smoke(d.target)
                print(f"\n--- deploy/smoke.sh {d.target} (exit {code})\n{out}{err}", file=sys.stderr)
                self.assertEqual(code, 0, f"smoke failed:\n{out}\n{err}\n--- blockd log:\n{d.read_log()}")
                for step in (" list", " describe blockd.v1.BlockService", "grpc.health.v1.Health/Check",
                             "BlockService/CreateBlock", "BlockService/Forward", "BlockService/Backward",
                             "BlockService/Step", "BlockService/DeleteBlock"):
                    self.assertIn(step, out)
                self.assertIn('"status": "SERVING"', out)
                self.assertIn("smoke: OK", out)
                self.assertIn("Code: NotFound", out)  # GetBlock after DeleteBlock

                # SIGTERM with the deployed drain: NOT_SERVING for --drain_grace, then exit 0.
                start = time.monotonic()
                exit_code = d.stop(timeout=60)
                took = time.monotonic() - start
                log = d.read_log()
                self.assertEqual(exit_code, 0, f"blockd exited {exit_code} after SIGTERM:\n{log}")
                self.assertIn("draining", log)
                self.assertIn("no checkpoint to restore", log)  # --restore_on_start looked at the folder
                drain = float(flags["drain_grace"].rstrip("s"))
                self.assertGreaterEqual(took, drain - 0.5, f"exited {took:.1f}s after SIGTERM, drain_grace is {drain}s")
            finally:
                d.kill()
                os.unlink(d.log.name)


class SmokeFails(unittest.TestCase):
    def test_no_server(self):
        code, out, err = run_smoke(f"127.0.0.1:{free_port()}", "--timeout=5")
        self.assertNotEqual(code, 0, out)
        self.assertIn("smoke: FAILED", err)

    def test_tokens(self):
        with tempfile.TemporaryDirectory(prefix="blockd-deploy-") as tmp:
            users, admins = os.path.join(tmp, "tokens"), os.path.join(tmp, "admin")
            with open(users, "w") as f:
                f.write("user-token-0123456789abcdef\n")
            with open(admins, "w") as f:
                f.write("admin-token-0123456789abcdef\n")
            with Daemon(extra_args=[f"--auth_token_file={users}", f"--admin_token_file={admins}"]) as d:
                code, out, err = run_smoke(d.target)
                self.assertNotEqual(code, 0)
                self.assertIn("UNAUTHENTICATED", err)
                code, out, err = run_smoke(d.target, "--token=user-token-0123456789abcdef")
                self.assertNotEqual(code, 0)
                self.assertIn("CreateBlock: PERMISSION_DENIED", err)
                code, out, err = run_smoke(d.target, "--token=admin-token-0123456789abcdef")
                self.assertEqual(code, 0, f"{out}\n{err}")
                self.assertIn("-H 'authorization: Bearer $TOKEN'", out)
                self.assertNotIn("admin-token-0123456789abcdef", out)


if __name__ == "__main__":
    unittest.main()
