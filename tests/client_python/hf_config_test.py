"""Every path from a Hugging Face config.json refuses the same things with the same words.

BlockConfig.from_hf is held to tests/proto/hf_configs.json, the cases blockctl's BlockConfigFromHf
(C++) is held to; then the Python import-hf (blockd.hf.import_hf and `python3 -m blockd import-hf`)
refuses the refused ones with those exact messages, before it touches a server."""
import json
import os
import struct
import subprocess
import sys
import tempfile
import unittest

import blockd
from blockd import hf
from blockd.config import BlockConfig, UnsupportedConfigError

CASES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "proto", "hf_configs.json")


def load_cases():
    with open(CASES) as f:
        return json.load(f)


def config_of(all_cases, case):
    """`base` with the case's `set` applied (None deletes), wrapped in text_config when asked."""
    config = dict(all_cases["base"])
    for key, value in case["set"].items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    if case.get("wrap_in_text_config"):
        return {"model_type": "llava", "text_config": config}
    return config


def write_checkpoint_dir(directory, config):
    """config.json and a one-tensor model.safetensors: enough for the config checks, which come
    before any tensor is looked at."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    header = json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(os.path.join(directory, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + struct.pack("<2f", 1.0, 1.0))


class SharedCases(unittest.TestCase):
    def setUp(self):
        self.all = load_cases()
        self.assertGreaterEqual(len(self.all["cases"]), 10, CASES)

    def test_from_hf_maps_and_refuses_as_blockctl_does(self):
        for case in self.all["cases"]:
            with self.subTest(case["name"]):
                config = config_of(self.all, case)
                if "error" in case:
                    with self.assertRaises(UnsupportedConfigError) as e:
                        BlockConfig.from_hf(config)
                    self.assertEqual(str(e.exception), case["error"])
                    continue
                got = BlockConfig.from_hf(config)
                self.assertEqual(got, BlockConfig(**case["config"]))

    def test_from_hf_file(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "config.json")
            case = next(c for c in self.all["cases"] if c["name"] == "gelu")
            with open(path, "w") as f:
                json.dump(config_of(self.all, case), f)
            with self.assertRaisesRegex(UnsupportedConfigError, "^hidden_act \"gelu\""):
                BlockConfig.from_hf_file(path)
            with open(path, "w") as f:
                f.write("{not json")
            with self.assertRaisesRegex(UnsupportedConfigError, "is not JSON"):
                BlockConfig.from_hf_file(path)
        self.assertIs(blockd.UnsupportedConfigError, UnsupportedConfigError)

    def test_import_hf_refuses_with_the_same_message(self):
        refused = [c for c in self.all["cases"] if "error" in c]
        names = {c["name"] for c in refused}
        for must in ("gelu", "rope-dynamic", "llama3-no-low-freq-factor", "mlp-bias"):
            self.assertIn(must, names)
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        with tempfile.TemporaryDirectory() as tmp:
            for case in refused:
                with self.subTest(case["name"]):
                    d = os.path.join(tmp, case["name"])
                    write_checkpoint_dir(d, config_of(self.all, case))
                    # The function: refused before the (unreachable) server is dialled.
                    with blockd.Client("127.0.0.1:1", timeout=2) as client:
                        with self.assertRaises(hf.CheckpointError) as e:
                            hf.import_hf(client, d, progress=False)
                    self.assertEqual(str(e.exception), case["error"])
                    # The command line.
                    r = subprocess.run([sys.executable, "-m", "blockd", "import-hf", d, "--target", "127.0.0.1:1"],
                                       env=env, capture_output=True, text=True, timeout=60)
                    self.assertEqual(r.returncode, 1, r.stderr)
                    self.assertEqual(r.stderr.strip(), f"blockd import-hf: {case['error']}")


if __name__ == "__main__":
    unittest.main()
