"""blockd.hf.export_hf and `blockctl export-hf` against Hugging Face transformers, for the GPU host, which
has transformers beside PyTorch (this machine's CI has no transformers: tests/client_python/hf_export_test.py
checks the same export there against the independent PyTorch reference).

Tiny Qwen3, Qwen2 and Llama (llama3 RoPE scaling) models are made with transformers (random init,
fp32), saved with save_pretrained, imported into a blockd daemon, trained for a few AdamW steps,
exported with the checkpoint as base, and loaded with transformers.AutoModelForCausalLM.from_pretrained:
its logits must equal the daemon's (the exported embedding, norm and head around the blocks'
Forward) within 1e-5 relative (fp32), and differ from the untrained model's (the export carries the
training). Where PEFT is installed, a synthetic adapter written by export_peft's writer loads with
PeftModel.from_pretrained and its weights come back by name.

    bash bench/device/run_checks.sh generate       # from a bundle (bench/device/bundle.sh)
    BLOCKD_BINARY=build/server/blockd PYTHONPATH=build/python:tests/python \\
        python3 -m unittest -v hf_export_test          # in tests/gpu, by hand
"""
import json
import os
import subprocess
import unittest

import numpy as np
import torch

from blockd import hf, hf_export
from blockd_testing import DaemonClientTest, relative_error

try:
    import transformers
except ImportError:  # pragma: no cover - the CI machine
    transformers = None
try:
    import peft
except ImportError:  # pragma: no cover
    peft = None

RTOL = 1e-5


def tiny_model(kind):
    torch.manual_seed({"qwen3": 11, "qwen2": 12, "llama": 13}[kind])
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  torch_dtype="float32", bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=24, rope_theta=1e6, **common))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(rope_theta=1e6, **common))
    else:
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32}
        config = transformers.LlamaConfig(rope_theta=5e5, **common)
        if getattr(config, "rope_parameters", None) is not None:  # transformers 5: rope_theta lives in it
            config.rope_parameters = dict(rope, rope_theta=5e5)
        else:
            config.rope_scaling = rope
        model = transformers.LlamaForCausalLM(config)
    return model.float().eval()



@unittest.skipIf(transformers is None, "needs Hugging Face transformers (the GPU host has it)")
class HfExportTest(DaemonClientTest):
    client_timeout = 120
    backend_from_env = True

    def trained_blocks(self, kind):
        model = tiny_model(kind)
        d = os.path.join(self.tmp.name, kind)
        model.save_pretrained(d, safe_serialization=True)
        ids = hf.import_hf(self.client, d, prefix=f"{kind}/layer", precision="fp32", progress=False)
        g = torch.Generator().manual_seed(3)
        for _ in range(3):
            r = self.client.forward(ids, torch.randn(2, 6, 64, generator=g).numpy(), keep_activations=True)
            self.client.backward(r.activation_id, torch.randn(2, 6, 64, generator=g).numpy())
            self.client.step(ids, lr=1e-2)
        return model, d, ids

    def daemon_logits(self, export_dir, ids, tokens):
        embed, norm, head = hf.client_modules(export_dir)
        with torch.no_grad():
            hidden = torch.from_numpy(self.client.forward(ids, embed(tokens).numpy()).output)
            return head(norm(hidden))

    def test_transformers_loads_the_export_with_the_daemons_logits(self):
        for kind in ("qwen3", "qwen2", "llama"):
            with self.subTest(kind):
                before, base, ids = self.trained_blocks(kind)
                out = os.path.join(self.tmp.name, f"{kind}-export")
                hf.export_hf(self.client, ids, out, base=base, max_shard_bytes=100_000)
                loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
                self.assertEqual(type(loaded).__name__, type(before).__name__)
                tokens = torch.randint(3, 96, (2, 11), generator=torch.Generator().manual_seed(5))
                with torch.no_grad():
                    got = loaded(tokens).logits
                    untrained = before(tokens).logits
                want = self.daemon_logits(out, ids, tokens)
                err = relative_error(got, want)
                self.assertLess(err, RTOL, f"{kind}: transformers' logits of the export differ from the daemon's "
                                           f"by {err:.2e}")
                self.assertGreater(relative_error(untrained, want), 100 * RTOL,
                                   f"{kind}: the export's logits equal the untrained model's: training is not in it")
                # blockctl writes what export_hf writes (tensors compared by the CI test); transformers loads it too.
                blockctl = os.environ.get("BLOCKCTL_BINARY")
                if blockctl:
                    out2 = os.path.join(self.tmp.name, f"{kind}-blockctl")
                    env = dict(os.environ)
                    if os.environ.get("BLOCKD_LD_LIBRARY_PATH"):  # the bundle's libraries, for blockctl only
                        env["LD_LIBRARY_PATH"] = os.environ["BLOCKD_LD_LIBRARY_PATH"]
                    r = subprocess.run([blockctl, f"--target={self.daemon.target}", "export-hf", *ids, "-o", out2,
                                        f"--base={base}"], capture_output=True, text=True, timeout=120, env=env)
                    self.assertEqual(r.returncode, 0, r.stderr)
                    again = transformers.AutoModelForCausalLM.from_pretrained(out2).eval()
                    with torch.no_grad():
                        err = relative_error(again(tokens).logits, want)
                    self.assertLess(err, RTOL, f"{kind}: blockctl's export differs from the daemon by {err:.2e}")

    @unittest.skipIf(peft is None, "needs PEFT")
    def test_peft_loads_an_adapter_in_exports_layout(self):
        model = tiny_model("qwen3")
        g = torch.Generator().manual_seed(9)
        rank, alpha = 4, 8.0
        shapes = {"self_attn.q_proj": (96, 64), "self_attn.v_proj": (48, 64), "mlp.down_proj": (64, 128)}
        layers = {i: {m: {"A": torch.randn(rank, inp, generator=g).numpy(),
                          "B": torch.randn(out, rank, generator=g).numpy()} for m, (out, inp) in shapes.items()}
                  for i in range(3)}
        d = os.path.join(self.tmp.name, "adapter")
        os.makedirs(d)
        from blockd.safetensors import write_safetensors
        write_safetensors(os.path.join(d, "adapter_model.safetensors"), hf_export.peft_tensors(layers), {"format": "pt"})
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            json.dump(hf_export.peft_config(rank, alpha, ["q_proj", "v_proj", "down_proj"], [0, 1, 2]), f)
        with torch.no_grad():
            base_logits = model(torch.arange(3, 12)[None]).logits
        loaded = peft.PeftModel.from_pretrained(model, d).eval()
        state = loaded.state_dict()
        for i, mods in layers.items():
            for m, ab in mods.items():
                for part in "AB":
                    key = f"base_model.model.model.layers.{i}.{m}.lora_{part}.default.weight"
                    self.assertIn(key, state)
                    np.testing.assert_array_equal(state[key].numpy(), ab[part], err_msg=key)
        # And PEFT's merge is the export's merge_lora: the merged model's logits agree.
        merged = loaded.merge_and_unload()
        sd = {k: v.numpy() for k, v in tiny_model("qwen3").state_dict().items()}
        for i in range(3):
            prefix = f"model.layers.{i}."
            base = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            ours = hf_export.merge_lora(base, layers[i], alpha / rank)
            for m in shapes:
                err = relative_error(torch.from_numpy(ours[f"{m}.weight"]), merged.state_dict()[f"{prefix}{m}.weight"])
                self.assertLess(err, 1e-6, f"layer {i} {m}: merge_lora differs from PEFT's merge by {err:.2e}")
        self.assertGreater(relative_error(merged(torch.arange(3, 12)[None]).logits.detach(), base_logits), 1e-4)


if __name__ == "__main__":
    unittest.main()
