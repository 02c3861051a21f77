"""Export back to Hugging Face: import_hf -> train a few Steps -> export_hf, then the exported files are
read back (names, shapes, dtypes, values equal to the daemon's downloads), turned into a model by the
independent PyTorch reference (torch_reference.py: logits equal the daemon's forward, fp32 1e-5
relative) and imported again into fresh blocks (bitwise equal weights). Also: layers-only exports and
the config.json they write (Llama, Qwen2 with yarn, llama3 RoPE), bf16, `blockctl export-hf` and
`python3 -m blockd export-hf` against the Python export, the refusals (unknown block, mixed configs, a
non-empty directory, a base of another model), and the PEFT writer and the LoRA merge on synthetic
adapters, in Python and in blockctl, against a stand-in server whose blocks carry adapters (this
branch's daemon has no LoRA blocks yet)."""
import json
import os
import subprocess
import sys
import tempfile
import unittest

import grpc
import numpy as np
import torch

import blockd
from blockd import hf, hf_export
from blockd.safetensors import SafetensorsFile
from blockd.v1 import block_service_pb2 as pb
from blockd.v1 import block_service_pb2_grpc as pb_grpc
from blockd_testing import DaemonClientTest, relative_error
import hf_import_test as hfi
from torch_reference import RefRMSNorm, ReferenceBlock, ReferenceSpan

RTOL = 1e-5  # fp32 logits, relative to the largest


def read_export(d):
    """(config.json, index, {name: (dtype, array as stored)}) of an exported directory."""
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(d, hf_export.INDEX)) as f:
        index = json.load(f)
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        with SafetensorsFile(os.path.join(d, shard)) as st:
            for name in st.keys():
                a, dtype = st.raw(name)
                tensors[name] = (dtype, np.array(a))
                assert index["weight_map"][name] == shard, name
    return config, index, tensors



class HFExportTest(DaemonClientTest):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.gen = torch.Generator().manual_seed(20261129)
        cls.qwen_dir = os.path.join(cls.tmp.name, "Qwen3-tiny")
        cls.qwen = hfi.make_checkpoint(cls.qwen_dir, hfi.QWEN3, torch.float32, shards=2, gen=cls.gen)

    def tearDown(self):
        for b in self.client.list_blocks():
            self.client.delete_block(b.block_id)

    def out(self, name):
        return os.path.join(self.tmp.name, "out", name)

    def train(self, ids, steps=3, seed=0):
        """A few optimizer steps from random activation gradients, so the weights differ from the import."""
        g = torch.Generator().manual_seed(seed)
        hidden = self.client.get_block(ids[0]).config.hidden_size
        for _ in range(steps):
            x = torch.randn(2, 5, hidden, generator=g)
            r = self.client.forward(ids, x.numpy(), keep_activations=True)
            self.client.backward(r.activation_id, torch.randn(2, 5, hidden, generator=g).numpy())
            self.client.step(ids, lr=1e-2)

    def assertExportHolds(self, d, ids, first_layer=0, dtype="F32"):
        """Every exported layer tensor is the daemon's download, as `dtype`, bit for bit."""
        _, _, tensors = read_export(d)
        for k, block_id in enumerate(ids):
            wire = "bf16" if dtype == "BF16" else "float32"
            got = self.client.download_tensors(block_id, dtype=wire, as_torch=True)
            for name, t in got.items():
                key = f"model.layers.{first_layer + k}.{name}"
                self.assertIn(key, tensors)
                st_dtype, a = tensors[key]
                self.assertEqual(st_dtype, dtype, key)
                self.assertEqual(list(a.shape), list(t.shape), key)
                want = t.view(torch.int16).numpy().view(np.uint16) if dtype == "BF16" else t.numpy()
                np.testing.assert_array_equal(a, want, err_msg=f"{key} differs from block {block_id}'s {name}")
        return tensors

    def assertReferenceMatches(self, c, tensors, d, ids):
        """The independent PyTorch reference built from an exported model (config.json `c`, its
        tensors) gives the daemon's logits for the blocks `ids` (fp32, RTOL relative)."""
        blocks = []
        for i in range(c["num_hidden_layers"]):
            b = ReferenceBlock(c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"],
                               c["intermediate_size"], c["rms_norm_eps"], c["rope_theta"], True)
            b.load_state_dict({n: torch.from_numpy(tensors[f"model.layers.{i}.{n}"][1])
                               for n in hfi.layer_shapes(c)})
            blocks.append(b)
        span = ReferenceSpan(blocks)
        norm = RefRMSNorm(c["hidden_size"], c["rms_norm_eps"])
        norm.weight.data = torch.from_numpy(tensors["model.norm.weight"][1])
        embed = torch.from_numpy(tensors["model.embed_tokens.weight"][1])
        head = torch.from_numpy(tensors["lm_head.weight"][1])
        tokens = torch.randint(0, c["vocab_size"], (2, 9), generator=self.gen)
        with torch.no_grad():
            want = norm(span(embed[tokens])) @ head.T
            e, n, h = hf.client_modules(d)
            remote = torch.from_numpy(self.client.forward(ids, e(tokens).numpy()).output)
            got = h(n(remote))
        err = relative_error(got, want)
        self.assertLess(err, RTOL, f"logits of the exported model (reference) and the daemon differ by {err:.2e}")

    # -- the round trip -------------------------------------------------------------------------
    def test_round_trip_through_training_reference_and_reimport(self):
        ids = hf.import_hf(self.client, self.qwen_dir, prefix="q/layer", precision="fp32", progress=False)
        self.train(ids)
        d = self.out("qwen3-tuned")
        # Small shards, so that the index and several files are exercised.
        result = hf.export_hf(self.client, ids, d, base=self.qwen_dir, max_shard_bytes=40_000)
        self.assertTrue(result["complete"])
        config, index, tensors = read_export(d)
        self.assertGreater(len(set(index["weight_map"].values())), 2)
        self.assertIn("complete model", index["metadata"]["blockd_export"])
        self.assertEqual(index["metadata"]["total_size"], sum(a.nbytes for _, a in tensors.values()))
        self.assertEqual(config, dict(hfi.QWEN3, torch_dtype="float32"))
        self.assertEqual(sorted(tensors), sorted(self.qwen))  # the model's names, nothing more or less
        self.assertExportHolds(d, ids)
        for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            np.testing.assert_array_equal(tensors[name][1], self.qwen[name].numpy(), err_msg=name)
        moved = np.abs(tensors["model.layers.1.mlp.up_proj.weight"][1]
                       - self.qwen["model.layers.1.mlp.up_proj.weight"].numpy()).max()
        self.assertGreater(moved, 1e-4, "training changed nothing: the export would not show it")

        # The independent reference, built from the exported directory alone, against the daemon.
        self.assertReferenceMatches(config, tensors, d, ids)

        # Import the export into fresh blocks: the same weights, bit for bit.
        again = hf.import_hf(self.client, d, prefix="again/layer", progress=False)
        for a, b in zip(ids, again):
            wa, wb = self.client.download_tensors(a), self.client.download_tensors(b)
            self.assertEqual(list(wa), list(wb))
            for name in wa:
                np.testing.assert_array_equal(wb[name], wa[name], err_msg=f"{b} {name}")

    def test_lora_blocks_export_peft_and_merged(self):
        """Real LoRA blocks (frozen base, adapters trained): export-peft takes rank, alpha and targets
        from BlockInfo.lora and writes the daemon's adapters bit for bit; export-hf --merge folds them
        into the base so that the reference, which knows nothing of LoRA, gives the daemon's logits."""
        lora = blockd.LoraConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj"))
        ids = hf.import_hf(self.client, self.qwen_dir, prefix="lora/layer", precision="fp32", frozen=True,
                           lora=lora, progress=False)
        self.train(ids)
        d = self.out("qwen3-peft")
        result = hf.export_peft(self.client, ids, d, base_model_name_or_path=self.qwen_dir)
        self.assertEqual((result["r"], result["lora_alpha"], sorted(result["target_modules"])),
                         (4, 8.0, ["down_proj", "q_proj", "v_proj"]))
        with open(os.path.join(d, "adapter_config.json")) as f:
            config = json.load(f)
        self.assertEqual((config["peft_type"], config["r"], config["lora_alpha"]), ("LORA", 4, 8.0))
        with SafetensorsFile(os.path.join(d, "adapter_model.safetensors")) as st:
            adapters = {name: np.array(st.raw(name)[0]) for name in st.keys()}
        expected = set()
        for k, block_id in enumerate(ids):
            for name, t in self.client.download_tensors(block_id, as_torch=True).items():
                if ".lora_" not in name:
                    continue
                key = f"base_model.model.model.layers.{k}.{name}"
                expected.add(key)
                np.testing.assert_array_equal(adapters[key], t.numpy(), err_msg=key)
        self.assertEqual(set(adapters), expected)
        self.assertEqual(len(expected), len(ids) * 3 * 2)
        moved = np.abs(adapters["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]).max()
        self.assertGreater(moved, 1e-4, "training left lora_B at zero: the merge below would prove nothing")

        merged = self.out("qwen3-merged")
        hf.export_hf(self.client, ids, merged, base=self.qwen_dir, merge=True)
        config, _, tensors = read_export(merged)
        self.assertFalse([n for n in tensors if ".lora_" in n])
        self.assertEqual(sorted(tensors), sorted(self.qwen))
        # The frozen base is untouched, so the merged weights differ from the source exactly where adapters are.
        np.testing.assert_array_equal(tensors["model.layers.0.self_attn.k_proj.weight"][1],
                                      self.qwen["model.layers.0.self_attn.k_proj.weight"].numpy())
        self.assertReferenceMatches(config, tensors, merged, ids)

    def test_layers_only_bf16_with_first_layer(self):
        llama = dict(hfi.LLAMA, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        config = blockd.BlockConfig.from_hf(llama)
        ids = []
        for k in range(2):
            self.client.create_block(f"l/{k}", config, layer_index=k, seed=7 + k)
            ids.append(f"l/{k}")
        self.train(ids, steps=2, seed=1)
        d = self.out("llama-layers")
        result = hf.export_hf(self.client, ids, d, dtype="bf16", first_layer=3)
        self.assertFalse(result["complete"])
        self.assertEqual(result["layers"], [3, 4])
        exported, index, tensors = read_export(d)
        self.assertIn("layers only", index["metadata"]["blockd_export"])
        self.assertEqual(sorted(tensors), sorted(f"model.layers.{i}.{n}" for i in (3, 4) for n in config.param_shapes()))
        self.assertExportHolds(d, ids, first_layer=3, dtype="BF16")
        self.assertEqual(exported["architectures"], ["LlamaForCausalLM"])
        self.assertEqual(exported["model_type"], "llama")
        self.assertEqual(exported["num_hidden_layers"], 5)
        self.assertEqual(exported["torch_dtype"], "bfloat16")
        self.assertEqual(exported["rope_scaling"]["rope_type"], "llama3")
        self.assertEqual(blockd.BlockConfig.from_hf(exported), config)
        # import-hf takes the layers back (as bf16 weights: the export's values exactly).
        again = hf.import_hf(self.client, d, layers="3:5", prefix="b/layer", progress=False)
        for k, block_id in enumerate(again):
            got = self.client.download_tensors(block_id)
            for name, a in got.items():
                np.testing.assert_array_equal(
                    a, blockd.tensors.bfloat16_bits_to_float32(tensors[f"model.layers.{3 + k}.{name}"][1]).reshape(a.shape),
                    err_msg=f"{block_id} {name}")

    def test_config_json_of_every_block_kind_maps_back(self):
        cases = {
            "llama": blockd.BlockConfig(hidden_size=48, num_attention_heads=3, intermediate_size=80),
            "qwen2-yarn": blockd.BlockConfig(hidden_size=64, num_attention_heads=4, num_kv_heads=2,
                                             intermediate_size=96, rms_norm_eps=1e-5, rope_theta=1e6,
                                             attention_bias=True,
                                             rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                           "original_max_position_embeddings": 32,
                                                           "attention_factor": 1.1386, "beta_fast": 32.0,
                                                           "beta_slow": 1.0}),
            "qwen3-linear": blockd.BlockConfig(hidden_size=64, num_attention_heads=4, num_kv_heads=2, head_dim=24,
                                               intermediate_size=96, qk_norm=True,
                                               rope_scaling={"rope_type": "linear", "factor": 2.0}),
        }
        arch = {"llama": "LlamaForCausalLM", "qwen2-yarn": "Qwen2ForCausalLM", "qwen3-linear": "Qwen3ForCausalLM"}
        for name, config in cases.items():
            with self.subTest(name):
                c = hf_export.hf_config(config, 4, "float32", 512)
                self.assertEqual(c["architectures"], [arch[name]])
                self.assertEqual(blockd.BlockConfig.from_hf(c), config)
        # Through the daemon too: a Qwen2 block with biases and yarn, exported and imported back.
        config = cases["qwen2-yarn"]
        self.client.create_block("y/0", config, seed=3)
        self.train(["y/0"], steps=2, seed=2)
        d = self.out("qwen2-yarn")
        hf.export_hf(self.client, ["y/0"], d)
        self.assertExportHolds(d, ["y/0"])
        (again,) = hf.import_hf(self.client, d, prefix="y2/layer", progress=False)
        self.assertEqual(blockd.BlockConfig.from_proto(self.client.get_block(again).config), config)
        wa, wb = self.client.download_tensors("y/0"), self.client.download_tensors(again)
        for name in wa:
            np.testing.assert_array_equal(wb[name], wa[name], err_msg=name)
        with self.assertRaisesRegex(hf_export.ExportError, "both QK-norm and q/k/v biases"):
            hf_export.hf_config(blockd.BlockConfig(hidden_size=64, num_attention_heads=4, intermediate_size=96,
                                                   qk_norm=True, attention_bias=True), 1, "float32", 64)

    # -- refusals -------------------------------------------------------------------------------
    def test_refusals_leave_nothing_behind(self):
        ids = hf.import_hf(self.client, self.qwen_dir, prefix="r/layer", progress=False)
        d = self.out("refused")
        with self.assertRaises(blockd.NotFoundError) as e:
            hf.export_hf(self.client, [ids[0], "no/such/block"], d)
        self.assertIn("no/such/block", str(e.exception))
        llama = blockd.BlockConfig.from_hf(hfi.LLAMA)
        self.client.create_block("other", llama, seed=1)
        with self.assertRaisesRegex(hf_export.ExportError, "block other has another config than block r/layer0 "
                                                           r"\(hidden_size 48 vs 64"):
            hf.export_hf(self.client, [ids[0], "other"], d)
        with self.assertRaisesRegex(hf_export.ExportError, "named twice"):
            hf.export_hf(self.client, [ids[0], ids[0]], d)
        with self.assertRaisesRegex(hf_export.ExportError, "another config"):
            hf.export_hf(self.client, ["other"], d, base=self.qwen_dir)
        with self.assertRaisesRegex(hf_export.ExportError, "do not fit base"):
            hf.export_hf(self.client, ids, d, base=self.qwen_dir, first_layer=1)
        with self.assertRaisesRegex(hf_export.ExportError, "expected bf16 or fp32"):
            hf.export_hf(self.client, ids, d, dtype="fp16")
        self.assertFalse(os.path.exists(d), "a refused export created its directory")
        os.makedirs(d)
        with open(os.path.join(d, "notes.txt"), "w") as f:
            f.write("mine")
        with self.assertRaisesRegex(hf_export.ExportError, "exists and is not empty"):
            hf.export_hf(self.client, ids, d)
        self.assertEqual(os.listdir(d), ["notes.txt"])
        hf.export_hf(self.client, ids, d, force=True)
        self.assertEqual(sorted(os.listdir(d)), ["config.json", "model-00001-of-00001.safetensors", hf_export.INDEX,
                                                 "notes.txt"])
        with self.assertRaisesRegex(hf_export.ExportError, "has no LoRA adapters"):
            hf.export_peft(self.client, ids, self.out("peft-refused"))
        with self.assertRaisesRegex(hf_export.ExportError, "no LoRA adapters to merge"):
            hf.export_hf(self.client, ids, self.out("merge-refused"), merge=True)
        self.assertFalse(os.path.exists(self.out("peft-refused")))
        self.assertFalse(os.path.exists(self.out("merge-refused")))

    # -- PEFT and merge on synthetic adapters (no LoRA blocks in this daemon yet) ---------------
    def test_peft_writer_and_merge_on_synthetic_adapters(self):
        g = torch.Generator().manual_seed(3)
        rank, alpha = 4, 8.0
        shapes = {"self_attn.q_proj": (96, 64), "self_attn.v_proj": (48, 64), "mlp.down_proj": (64, 96)}
        layers = {i: {m: {"A": torch.randn(rank, inp, generator=g).numpy(), "B": torch.randn(out, rank, generator=g).numpy()}
                      for m, (out, inp) in shapes.items()} for i in (5, 6)}
        d = self.out("peft-synthetic")
        os.makedirs(d)
        from blockd.safetensors import write_safetensors
        write_safetensors(os.path.join(d, "adapter_model.safetensors"), hf_export.peft_tensors(layers), {"format": "pt"})
        with SafetensorsFile(os.path.join(d, "adapter_model.safetensors")) as st:
            self.assertEqual(st.keys()[:4], ["base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight",
                                             "base_model.model.model.layers.5.self_attn.q_proj.lora_B.weight",
                                             "base_model.model.model.layers.5.self_attn.v_proj.lora_A.weight",
                                             "base_model.model.model.layers.5.self_attn.v_proj.lora_B.weight"])
            self.assertEqual(len(st.keys()), 2 * 3 * 2)
            for i, mods in layers.items():
                for m, ab in mods.items():
                    for part in "AB":
                        name = f"base_model.model.model.layers.{i}.{m}.lora_{part}.weight"
                        self.assertEqual(st.info(name), ("F32", ab[part].shape))
                        np.testing.assert_array_equal(st.get(name), ab[part], err_msg=name)
        cfg = hf_export.peft_config(rank, alpha, ["q_proj", "v_proj", "down_proj"], [5, 6], "Qwen/Qwen3-0.6B")
        for k, v in {"peft_type": "LORA", "r": 4, "lora_alpha": 8.0, "task_type": "CAUSAL_LM", "bias": "none",
                     "fan_in_fan_out": False, "lora_dropout": 0.0, "base_model_name_or_path": "Qwen/Qwen3-0.6B",
                     "target_modules": ["q_proj", "v_proj", "down_proj"], "layers_to_transform": [5, 6]}.items():
            self.assertEqual(cfg[k], v, k)
        # Downloaded names -> (base, adapters), and the merge against PEFT's formula in torch.
        base = {f"{m}.weight": torch.randn(*s, generator=g).numpy() for m, s in shapes.items()}
        downloaded = dict(base, **{f"{m}.lora_{p}.weight": layers[5][m][p] for m in shapes for p in "AB"})
        got_base, got_lora = hf_export.split_lora(downloaded)
        self.assertEqual(sorted(got_base), sorted(base))
        self.assertEqual(sorted(got_lora), sorted(shapes))
        merged = hf_export.merge_lora(got_base, got_lora, alpha / rank)
        for m in shapes:
            w, a, b = (torch.from_numpy(x) for x in (base[f"{m}.weight"], layers[5][m]["A"], layers[5][m]["B"]))
            want = (w.double() + (alpha / rank) * (b.double() @ a.double()))
            err = relative_error(torch.from_numpy(merged[f"{m}.weight"]).double(), want)
            self.assertLess(err, 1e-6, f"merged {m}.weight differs from W + alpha/r B A by {err:.2e}")
        with self.assertRaisesRegex(hf_export.ExportError, "lora_A only"):
            hf_export.split_lora({"mlp.up_proj.lora_A.weight": layers[5]["mlp.down_proj"]["A"]})

    # -- the command lines ----------------------------------------------------------------------
    def test_blockctl_and_python_cli_write_what_export_hf_writes(self):
        ids = hf.import_hf(self.client, self.qwen_dir, prefix="c/layer", progress=False)
        self.train(ids, steps=2, seed=4)
        want_dir = self.out("cli-python-api")
        hf.export_hf(self.client, ids, want_dir, base=self.qwen_dir, dtype="bf16", max_shard_bytes=30_000)
        want = read_export(want_dir)
        runs = {
            "blockctl": [os.environ["BLOCKCTL_BINARY"], f"--target={self.daemon.target}", "export-hf", *ids,
                         "-o", self.out("cli-blockctl"), f"--base={self.qwen_dir}", "--dtype=bf16",
                         "--max_shard_bytes=30000"],
            "python": [sys.executable, "-m", "blockd", "export-hf", *ids, "-o", self.out("cli-python"),
                       "--target", self.daemon.target, "--base", self.qwen_dir, "--dtype", "bf16",
                       "--max-shard-bytes", "30000"],
        }
        for name, argv in runs.items():
            with self.subTest(name):
                r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
                self.assertEqual(r.returncode, 0, r.stderr)
                got = read_export(argv[argv.index("-o") + 1])
                self.assertEqual(got[0], want[0])  # config.json
                self.assertEqual(got[1]["weight_map"], want[1]["weight_map"])
                self.assertEqual(got[1]["metadata"]["total_size"], want[1]["metadata"]["total_size"])
                self.assertEqual(sorted(got[2]), sorted(want[2]))
                for t, (dtype, a) in want[2].items():
                    self.assertEqual(got[2][t][0], dtype, t)
                    np.testing.assert_array_equal(got[2][t][1], a, err_msg=f"{name}: {t}")
                # The same refusals, with the same words.
                r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
                self.assertEqual(r.returncode, 1, r.stderr)
                self.assertIn("exists and is not empty", r.stderr)
                bad = [a if a != ids[1] else "no/such" for a in argv]
                bad[bad.index("-o") + 1] = self.out(f"cli-{name}-refused")
                r = subprocess.run(bad, capture_output=True, text=True, timeout=120)
                self.assertEqual(r.returncode, 1, r.stderr)
                self.assertIn("no/such", r.stderr)
                self.assertIn("NOT_FOUND" if name == "blockctl" else "not found", r.stderr)
                self.assertFalse(os.path.exists(self.out(f"cli-{name}-refused")))
        # Mixed configs: both name the first field that differs, with both values.
        self.client.create_block("cli-other", blockd.BlockConfig.from_hf(hfi.LLAMA), seed=1)
        for name, argv in runs.items():
            with self.subTest(f"{name} mixed configs"):
                at = argv.index(ids[0])
                mixed = argv[:at] + [ids[0], "cli-other"] + argv[at + len(ids):]
                mixed[mixed.index("-o") + 1] = self.out(f"cli-{name}-mixed")
                r = subprocess.run(mixed, capture_output=True, text=True, timeout=120)
                self.assertEqual(r.returncode, 1, r.stderr)
                self.assertIn("block cli-other has another config than block c/layer0 (hidden_size 48 vs 64", r.stderr)
                self.assertFalse(os.path.exists(self.out(f"cli-{name}-mixed")))


class FakeLoraServer(pb_grpc.BlockServiceServicer):
    """GetBlock and DownloadTensors of blocks carrying LoRA adapters (self_attn.q_proj.lora_A.weight,
    ...), as the LoRA work's daemon will serve them: this branch's daemon has none, so the LoRA
    paths of both exports run against this stand-in. BlockInfo.lora is not sent (this proto has
    no such field), so rank and targets come from the tensors and alpha from lora_alpha."""

    def __init__(self, config, blocks):
        self.config, self.blocks = config, blocks

    def GetBlock(self, request, context):
        if request.block_id not in self.blocks:
            context.abort(grpc.StatusCode.NOT_FOUND, f"block {request.block_id} not found")
        return pb.BlockInfo(block_id=request.block_id, config=self.config.to_proto(), precision=pb.PRECISION_FP32,
                            weights_loaded=True, max_seq_len=128)

    def DownloadTensors(self, request, context):
        for name, a in self.blocks[request.block_id].items():
            yield pb.TensorChunk(block_id=request.block_id, name=name, dtype=pb.DTYPE_FLOAT32, shape=list(a.shape),
                                 offset=0, data=np.ascontiguousarray(a, dtype="<f4").tobytes())


class LoraExportTest(unittest.TestCase):
    RANK, ALPHA = 4, 8.0
    TARGETS = {"self_attn.q_proj": "q_proj", "self_attn.v_proj": "v_proj", "mlp.down_proj": "down_proj"}

    @classmethod
    def setUpClass(cls):
        from concurrent import futures
        cls.config = blockd.BlockConfig(hidden_size=32, num_attention_heads=4, num_kv_heads=2, intermediate_size=48,
                                        qk_norm=True)
        g = torch.Generator().manual_seed(77)
        cls.blocks = {}
        for b in ("lora/0", "lora/1"):
            t = {n: torch.randn(*s, generator=g).numpy() for n, s in cls.config.param_shapes().items()}
            for module in cls.TARGETS:
                out, inp = cls.config.param_shapes()[f"{module}.weight"]
                t[f"{module}.lora_A.weight"] = torch.randn(cls.RANK, inp, generator=g).numpy()
                t[f"{module}.lora_B.weight"] = torch.randn(out, cls.RANK, generator=g).numpy()
            cls.blocks[b] = t
        cls.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_BlockServiceServicer_to_server(FakeLoraServer(cls.config, cls.blocks), cls.server)
        port = cls.server.add_insecure_port("127.0.0.1:0")
        cls.server.start()
        cls.target = f"127.0.0.1:{port}"
        cls.client = blockd.Client(cls.target, timeout=60, transport="grpc")
        cls.tmp = tempfile.TemporaryDirectory()

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.server.stop(None)
        cls.tmp.cleanup()

    def blockctl(self, *args):
        return subprocess.run([os.environ["BLOCKCTL_BINARY"], f"--target={self.target}", *args],
                              capture_output=True, text=True, timeout=120)

    def test_export_peft_in_python_and_blockctl(self):
        ids = list(self.blocks)
        py, cc = os.path.join(self.tmp.name, "peft-py"), os.path.join(self.tmp.name, "peft-cc")
        with self.assertRaisesRegex(hf_export.ExportError, r"pass lora_alpha \(--lora_alpha\)"):
            hf.export_peft(self.client, ids, py)
        r = self.blockctl("export-peft", *ids, "-o", cc)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("pass lora_alpha (--lora_alpha)", r.stderr)
        self.assertFalse(os.path.exists(py) or os.path.exists(cc))
        got = hf.export_peft(self.client, ids, py, base_model_name_or_path="tiny/qwen3", first_layer=2,
                             lora_alpha=self.ALPHA)
        self.assertEqual(got["target_modules"], ["q_proj", "v_proj", "down_proj"])
        r = self.blockctl("export-peft", *ids, "-o", cc, "--base_model=tiny/qwen3", "--first_layer=2",
                          f"--lora_alpha={self.ALPHA}")
        self.assertEqual(r.returncode, 0, r.stderr)
        for d in (py, cc):
            with self.subTest(d):
                self.assertEqual(sorted(os.listdir(d)), ["adapter_config.json", "adapter_model.safetensors"])
                with open(os.path.join(d, "adapter_config.json")) as f:
                    cfg = json.load(f)
                self.assertEqual(cfg, hf_export.peft_config(self.RANK, self.ALPHA, ["q_proj", "v_proj", "down_proj"],
                                                            [2, 3], "tiny/qwen3"))
                with SafetensorsFile(os.path.join(d, "adapter_model.safetensors")) as st:
                    self.assertEqual(len(st.keys()), 2 * 3 * 2)
                    for k, b in enumerate(ids):
                        for module in self.TARGETS:
                            for part in "AB":
                                name = f"base_model.model.model.layers.{2 + k}.{module}.lora_{part}.weight"
                                want = self.blocks[b][f"{module}.lora_{part}.weight"]
                                self.assertEqual(st.info(name), ("F32", want.shape), name)
                                np.testing.assert_array_equal(st.get(name), want, err_msg=f"{d}: {name}")

    def test_merge_in_python_and_blockctl(self):
        ids = list(self.blocks)
        py, cc = os.path.join(self.tmp.name, "merged-py"), os.path.join(self.tmp.name, "merged-cc")
        hf.export_hf(self.client, ids, py, merge=True, lora_alpha=self.ALPHA)
        r = self.blockctl("export-hf", *ids, "-o", cc, "--merge", f"--lora_alpha={self.ALPHA}")
        self.assertEqual(r.returncode, 0, r.stderr)
        plain = os.path.join(self.tmp.name, "unmerged")
        hf.export_hf(self.client, ids, plain)
        _, _, unmerged = read_export(plain)
        self.assertEqual(sorted(unmerged), sorted(f"model.layers.{i}.{n}" for i in (0, 1)
                                                  for n in self.config.param_shapes()))  # no adapters
        self.assertEqual(read_export(cc)[0], read_export(py)[0])  # the config.json both build from a BlockConfig
        self.assertEqual(read_export(cc)[1]["metadata"], read_export(py)[1]["metadata"])
        for d in (py, cc):
            _, _, tensors = read_export(d)
            self.assertEqual(sorted(tensors), sorted(unmerged))
            for k, b in enumerate(ids):
                w = self.blocks[b]
                for name in self.config.param_shapes():
                    got = torch.from_numpy(tensors[f"model.layers.{k}.{name}"][1]).double()
                    module = name[:-len(".weight")]
                    if module in self.TARGETS:
                        a, bb = (torch.from_numpy(w[f"{module}.lora_{p}.weight"]).double() for p in "AB")
                        want = torch.from_numpy(w[name]).double() + self.ALPHA / self.RANK * (bb @ a)
                        err = relative_error(got, want)
                        self.assertLess(err, 1e-6, f"{d}: merged {b} {name} differs from W + alpha/r B A by {err:.2e}")
                    else:
                        np.testing.assert_array_equal(got.float().numpy(), w[name], err_msg=f"{d}: {b} {name}")


if __name__ == "__main__":
    unittest.main()
