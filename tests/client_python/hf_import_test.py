"""Hugging Face import: the test writes small checkpoints in the Hugging Face layout itself (its own
safetensors writer, several shards, model.safetensors.index.json, config.json, bf16 / fp16 weights),
imports them with blockd.hf.import_hf and `python3 -m blockd import-hf`, and checks the blocks'
configs and weights and the client-side modules."""
import json
import os
import struct
import subprocess
import sys
import unittest

import numpy as np
import torch

import blockd
from blockd import hf
from blockd_testing import DaemonClientTest

QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 64, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 24,  # Qwen3 sets head_dim explicitly; here it is not 64 / 4
    "intermediate_size": 96, "num_hidden_layers": 3, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
    "vocab_size": 50, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "rope_scaling": None, "attention_bias": False,
}
LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 48, "num_attention_heads": 3,
    "num_key_value_heads": 3, "intermediate_size": 80, "num_hidden_layers": 2, "rms_norm_eps": 1e-6,
    "vocab_size": 40, "hidden_act": "silu", "tie_word_embeddings": True, "torch_dtype": "float16",
}


def write_safetensors(path, tensors):
    """tensors: {name: torch.Tensor} (bf16 / f16 / f32), in the safetensors layout."""
    codes = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        t = t.contiguous()
        data = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the header is padded to 8 bytes, as the safetensors library does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def layer_shapes(c):
    h, f = c["hidden_size"], c["intermediate_size"]
    dh = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * dh, c["num_key_value_heads"] * dh
    shapes = {"input_layernorm.weight": [h], "self_attn.q_proj.weight": [q, h], "self_attn.k_proj.weight": [kv, h],
              "self_attn.v_proj.weight": [kv, h], "self_attn.o_proj.weight": [h, q],
              "post_attention_layernorm.weight": [h], "mlp.gate_proj.weight": [f, h], "mlp.up_proj.weight": [f, h],
              "mlp.down_proj.weight": [h, f]}
    if c["model_type"] == "qwen3":
        shapes["self_attn.q_norm.weight"] = [dh]
        shapes["self_attn.k_norm.weight"] = [dh]
    if c["model_type"] == "qwen2":  # HF's Qwen2Attention always has q/k/v biases
        shapes.update({"self_attn.q_proj.bias": [q], "self_attn.k_proj.bias": [kv], "self_attn.v_proj.bias": [kv]})
    return shapes


def make_checkpoint(directory, config, dtype, shards, gen, extra=None):
    """Random weights for every tensor of the model, written in `shards` files (with an index when
    there are several). Returns {name: tensor}."""
    os.makedirs(directory, exist_ok=True)
    h, v = config["hidden_size"], config["vocab_size"]
    tensors = {"model.embed_tokens.weight": torch.randn(v, h, generator=gen)}
    for i in range(config["num_hidden_layers"]):
        for name, shape in layer_shapes(config).items():
            if len(shape) == 1:
                w = 1 + 0.1 * torch.randn(shape, generator=gen)
            else:
                w = torch.randn(shape, generator=gen) / shape[1] ** 0.5
            tensors[f"model.layers.{i}.{name}"] = w
    tensors["model.norm.weight"] = 1 + 0.1 * torch.randn(h, generator=gen)
    if not config["tie_word_embeddings"]:
        tensors["lm_head.weight"] = torch.randn(v, h, generator=gen) / h ** 0.5
    tensors.update(extra or {})
    tensors = {k: t.to(dtype) for k, t in tensors.items()}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    names = list(tensors)
    if shards == 1:
        write_safetensors(os.path.join(directory, "model.safetensors"), tensors)
        return tensors
    # Split the names in order, so that a layer straddles two shards.
    weight_map = {}
    per = -(-len(names) // shards)
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s * per:(s + 1) * per]
        write_safetensors(os.path.join(directory, file), {n: tensors[n] for n in part})
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return tensors


class HFImportTest(DaemonClientTest):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.gen = torch.Generator().manual_seed(20240605)
        cls.qwen_dir = os.path.join(cls.tmp.name, "Qwen3-tiny")
        cls.qwen = make_checkpoint(cls.qwen_dir, QWEN3, torch.bfloat16, shards=3, gen=cls.gen)

    def tearDown(self):
        for b in self.client.list_blocks():
            self.client.delete_block(b.block_id)

    def assertBlocksHold(self, ids, tensors, config, layers):
        for block_id, layer in zip(ids, layers):
            info = self.client.get_block(block_id)
            self.assertEqual(info.layer_index, layer)
            self.assertTrue(info.weights_loaded, block_id)
            c = info.config
            self.assertEqual(c.hidden_size, config["hidden_size"])
            self.assertEqual(c.num_attention_heads, config["num_attention_heads"])
            self.assertEqual(c.num_kv_heads, config["num_key_value_heads"])
            self.assertEqual(c.head_dim, config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
            self.assertEqual(c.intermediate_size, config["intermediate_size"])
            self.assertEqual(c.rms_norm_eps, config["rms_norm_eps"])
            self.assertEqual(c.rope_theta, config.get("rope_theta", 10000.0))
            self.assertEqual(c.qk_norm, config["model_type"] == "qwen3")
            self.assertEqual(c.attention_bias, config["model_type"] == "qwen2")
            got = self.client.download_tensors(block_id)
            expected = {n: tensors[f"model.layers.{layer}.{n}"] for n in layer_shapes(config)}
            self.assertEqual(sorted(got), sorted(expected))
            for name, t in expected.items():
                np.testing.assert_array_equal(got[name], t.float().numpy(), err_msg=f"{block_id} {name}")

    def test_sharded_bf16_qwen3(self):
        ids = hf.import_hf(self.client, self.qwen_dir, prefix="q3/layer", progress=False)
        self.assertEqual(ids, ["q3/layer0", "q3/layer1", "q3/layer2"])
        self.assertBlocksHold(ids, self.qwen, QWEN3, [0, 1, 2])
        # bf16 out of the server is the checkpoint's bits exactly.
        got = self.client.download_tensors("q3/layer1", dtype="bf16", as_torch=True)
        for name, t in got.items():
            self.assertTrue(torch.equal(t.view(torch.int16), self.qwen[f"model.layers.1.{name}"].view(torch.int16)))

    def test_client_side_modules(self):
        embed, norm, head = hf.client_modules(self.qwen_dir)
        self.assertTrue(torch.equal(embed.weight, self.qwen["model.embed_tokens.weight"].float()))
        self.assertTrue(torch.equal(norm.weight, self.qwen["model.norm.weight"].float()))
        self.assertEqual(norm.eps, QWEN3["rms_norm_eps"])
        self.assertTrue(torch.equal(head.weight, self.qwen["lm_head.weight"].float()))
        self.assertIsNot(head.weight, embed.weight)

    def test_the_imported_model_runs_like_pytorch(self):
        from torch_reference import ReferenceBlock, ReferenceSpan
        ids = hf.import_hf(self.client, self.qwen_dir, prefix="run/layer", progress=False)
        c = QWEN3
        blocks = []
        for i in range(c["num_hidden_layers"]):
            b = ReferenceBlock(c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"],
                               c["intermediate_size"], c["rms_norm_eps"], c["rope_theta"], True)
            b.load_state_dict({n: self.qwen[f"model.layers.{i}.{n}"].float() for n in layer_shapes(c)})
            blocks.append(b)
        embed, norm, head = hf.client_modules(self.qwen_dir)
        tokens = torch.randint(0, c["vocab_size"], (2, 9), generator=self.gen)
        span = blockd.RemoteSpan(self.client, ids)
        with torch.no_grad():
            remote = head(norm(span(embed(tokens))))
            local = head(norm(ReferenceSpan(blocks)(embed(tokens))))
        err = (remote - local).abs().max().item()
        self.assertLess(err, 1e-4 * local.abs().max().item(), f"logits differ by {err}")

    def test_cli_layers_and_replace(self):
        env = dict(os.environ)
        cmd = [sys.executable, "-m", "blockd", "import-hf", self.qwen_dir, "--target", self.daemon.target,
               "--prefix", "cli/layer", "--layers", "1:3"]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.split(), ["cli/layer1", "cli/layer2"])
        self.assertNotIn("|", r.stderr)  # no progress bar when stderr is not a terminal
        self.assertBlocksHold(["cli/layer1", "cli/layer2"], self.qwen, QWEN3, [1, 2])
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 1)
        self.assertIn("already exists", r.stderr)
        self.assertIn("--replace", r.stderr)
        r = subprocess.run(cmd + ["--replace", "--progress"], env=env, capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("100%", r.stderr)
        self.assertEqual(sorted(b.block_id for b in self.client.list_blocks()), ["cli/layer1", "cli/layer2"])
        r = subprocess.run([sys.executable, "-m", "blockd", "list", "--target", self.daemon.target], env=env,
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("cli/layer2", r.stdout)

    def test_single_file_fp16_llama_with_tied_head(self):
        d = os.path.join(self.tmp.name, "llama-tiny")
        tensors = make_checkpoint(d, LLAMA, torch.float16, shards=1, gen=self.gen)
        ids = hf.import_hf(self.client, d, progress=False)
        self.assertEqual(ids, ["llama-tiny/layer0", "llama-tiny/layer1"])
        self.assertBlocksHold(ids, tensors, LLAMA, [0, 1])
        embed, _, head = hf.client_modules(d)
        self.assertIs(head.weight, embed.weight)

    def test_qwen2_biases_and_llama32_rope_scaling(self):
        qwen2 = dict(QWEN3, model_type="qwen2", head_dim=None)
        del qwen2["attention_bias"]  # Qwen2 configs do not say
        d = os.path.join(self.tmp.name, "qwen2")
        tensors = make_checkpoint(d, qwen2, torch.bfloat16, shards=2, gen=self.gen)
        ids = hf.import_hf(self.client, d, progress=False)
        self.assertBlocksHold(ids, tensors, qwen2, [0, 1, 2])
        llama32 = dict(LLAMA, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
        d = os.path.join(self.tmp.name, "llama32")
        tensors = make_checkpoint(d, llama32, torch.float16, shards=1, gen=self.gen)
        ids = hf.import_hf(self.client, d, progress=False)
        self.assertBlocksHold(ids, tensors, llama32, [0, 1])
        rope = self.client.get_block(ids[1]).config.rope_scaling
        self.assertEqual((rope.rope_type, rope.factor, rope.low_freq_factor, rope.high_freq_factor,
                          rope.original_max_position_embeddings), ("llama3", 32.0, 1.0, 4.0, 8192))

    def test_refusals_leave_no_blocks(self):
        cases = {
            "qwen3-bias": (QWEN3, {"model.layers.0.self_attn.q_proj.bias": torch.zeros(96)},
                           "cannot hold: self_attn.q_proj.bias$"),
            "rope-scaling": (dict(QWEN3, rope_scaling={"rope_type": "llama3", "factor": 8.0}), {},
                             "rope_scaling has no low_freq_factor"),
            "rope-parameters": (dict(QWEN3, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e6, "factor": 4.0}),
                                {}, "rope_parameters .*: blockd blocks compute default, linear, llama3 or yarn RoPE"),
            "gelu": (dict(QWEN3, hidden_act="gelu"), {}, "hidden_act"),
            "moe": (dict(QWEN3, model_type="qwen3_moe"), {}, "model_type"),
        }
        for name, (config, extra, message) in cases.items():
            with self.subTest(name):
                d = os.path.join(self.tmp.name, name)
                make_checkpoint(d, config, torch.bfloat16, shards=2, gen=self.gen, extra=extra)
                with self.assertRaisesRegex(hf.CheckpointError, message):
                    hf.import_hf(self.client, d, progress=False)
                self.assertEqual(self.client.list_blocks(), [])
        # A tensor missing from the last layer is found before any block is created.
        d = os.path.join(self.tmp.name, "missing")
        make_checkpoint(d, QWEN3, torch.bfloat16, shards=1, gen=self.gen)
        path = os.path.join(d, "model.safetensors")
        with hf.HFCheckpoint(d) as ckpt:
            keep = {n: ckpt.get(n) for n in ckpt.names() if n != "model.layers.2.mlp.up_proj.weight"}
        write_safetensors(path, {n: torch.from_numpy(a) for n, a in keep.items()})
        with self.assertRaisesRegex(hf.CheckpointError, "layer 2 lacks model.layers.2.mlp.up_proj.weight"):
            hf.import_hf(self.client, d, progress=False)
        self.assertEqual(self.client.list_blocks(), [])

    def test_a_server_refusal_midway_deletes_what_the_import_created(self):
        self.client.create_block("mid/layer2", blockd.BlockConfig(hidden_size=8, num_attention_heads=2,
                                                                  intermediate_size=8), seed=0)
        with self.assertRaisesRegex(blockd.AlreadyExistsError, "mid/layer2 already exists.*replace"):
            hf.import_hf(self.client, self.qwen_dir, prefix="mid/layer", progress=False)
        self.assertEqual([b.block_id for b in self.client.list_blocks()], ["mid/layer2"])
        self.assertEqual(self.client.get_block("mid/layer2").config.hidden_size, 8)  # untouched

    def test_malformed_safetensors(self):
        d = os.path.join(self.tmp.name, "broken")
        os.makedirs(d)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(QWEN3, f)
        raw = json.dumps({"x": {"dtype": "BF16", "shape": [4, 4], "data_offsets": [0, 30]}}).encode()
        with open(os.path.join(d, "model.safetensors"), "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw + b"\0" * 32)
        with self.assertRaisesRegex(ValueError, "data_offsets"):
            hf.HFCheckpoint(d)


if __name__ == "__main__":
    unittest.main()
