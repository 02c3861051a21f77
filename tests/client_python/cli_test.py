"""What a new user meets first, as behaviour: the README's Python snippet runs and trains both the
remote blocks and the local modules, the example run without a daemon says what to do (no
traceback), its --help shows the defaults, and the progress bar's rate is rounded sensibly."""
import io
import os
import re
import subprocess
import sys
import time
import unittest

import torch

import blockd
from blockd.progress import Progress
from blockd_testing import Daemon, free_port

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "README.md")

EXAMPLE = os.path.join(os.environ.get("BLOCKD_EXAMPLES", os.path.join(os.path.dirname(__file__), "..", "..",
                                                                      "examples")), "train_tiny_lm.py")


def run_example(*args, env=None):
    return subprocess.run([sys.executable, EXAMPLE, *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **(env or {})))


def readme_snippet():
    """The first ```python block of README.md's "A first training loop"."""
    with open(README) as f:
        text = f.read()
    section = text[text.index("## A first training loop"):]
    start = section.index("```python\n") + len("```python\n")
    return section[start:section.index("```", start)]


class ReadmeTest(unittest.TestCase):
    def test_the_python_snippet_trains_remote_and_local_weights(self):
        code = readme_snippet()
        self.assertIn("torch.optim.AdamW", code)
        self.assertIn("blockd.RemoteAdamW", code)
        with Daemon() as d:
            ns = {}
            exec(compile(code.replace("localhost:50051", d.target), "README.md", "exec"), ns)
            # The last remote step stepped all four blocks a tenth time, and was not skipped.
            steps = {b: s for r in ns["remote_opt"].last_results for b, s in r.steps.items()}
            self.assertEqual(steps, {f"demo/layer{i}": 10 for i in range(4)})
            self.assertFalse(ns["remote_opt"].skipped)
            # The local optimizer stepped every local parameter (embedding, norm weight, head) ten times.
            self.assertEqual(len(ns["local_opt"].state), 3)
            self.assertTrue(all(int(s["step"]) == 10 for s in ns["local_opt"].state.values()))
            self.assertEqual(ns["client"].list_blocks(), [], "span.delete() leaves nothing behind")
            ns["client"].close()


class ExampleTest(unittest.TestCase):
    def test_no_daemon_says_where_it_looked_and_exits_non_zero(self):
        target = f"127.0.0.1:{free_port()}"  # nothing listens here
        r = run_example("--target", target, "--steps", "1")
        self.assertNotEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn(f"is blockd running at {target}?", r.stderr)
        self.assertNotIn("Traceback", r.stderr)
        # $BLOCKD_TARGET is where it looks without --target.
        r = run_example("--steps", "1", env={"BLOCKD_TARGET": target})
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn(f"is blockd running at {target}?", r.stderr)

    def test_help_shows_the_defaults(self):
        r = run_example("--help")
        self.assertEqual(r.returncode, 0, r.stderr)
        text = " ".join(r.stdout.split())  # argparse wraps lines
        for flag, default in (("--steps", "300"), ("--batch", "16"), ("--seq", "64"), ("--lr", "0.003"),
                              ("--eval-every", "50")):
            self.assertRegex(text, re.escape(flag) + r" \S+ [^()]*\(default: " + re.escape(default) + r"\)")


class ProgressRateTest(unittest.TestCase):
    def render(self, done, elapsed, unit="it"):
        out = io.StringIO()
        bar = Progress(10 ** 9, "t", unit=unit, stream=out, enabled=True)
        bar.start = time.monotonic() - elapsed
        bar.update(done)
        bar.close()
        return out.getvalue()

    def test_rates_have_the_digits_they_are_worth(self):
        self.assertIn("12.3 it/s]", self.render(1000, 81.0))       # 12.345...
        self.assertIn("0.12 it/s]", self.render(10, 81.0))         # 0.1234...
        line = self.render(1234567, 0.5)                           # ~2.5e6 per second
        self.assertRegex(line, r"\[\ds, 2\d{6} it/s\]")
        self.assertNotRegex(line, r"e\+\d")
        self.assertIn("1234567/1000000000", line)                   # counts stay whole numbers
        self.assertRegex(self.render(3 << 20, 2.0, unit="B"), r"1\.5 MiB/s\]")


if __name__ == "__main__":
    unittest.main()
