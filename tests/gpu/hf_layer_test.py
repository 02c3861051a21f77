"""Blocks against Hugging Face transformers' own decoder layers, for the GPU host, which has
transformers beside PyTorch (the CI machine has none: there the CPU backend is checked against the
independent float64 reference in tests/engine and tests/client_python).

Tiny Llama models with `linear`, `llama3` and `yarn` RoPE scaling (LlamaDecoderLayer), a Qwen2
model (Qwen2DecoderLayer, q/k/v biases) and a Qwen3 model (QK-norm) are made with transformers,
saved, and imported into a daemon (BLOCKD_BACKEND, fp32 blocks). Layer 0 through blockd and the
same transformers layer in float64 on the CPU (its model's rotary embedding, a causal mask) get the
same input and output gradient: the output, the input gradient and every weight gradient must
agree within 1e-5 relative (max |got - want| / max |want|), the bound of the fp32 parity tests.

    bash bench/device/run_checks.sh generate       # from a bundle (bench/device/bundle.sh)
"""
import unittest

import numpy as np
import torch

from blockd import hf
from blockd_testing import DaemonClientTest, relative_error

try:
    import transformers
except ImportError:  # pragma: no cover - the CI machine
    transformers = None

RTOL = 1e-5
HIDDEN, SEQ, BATCH = 64, 40, 2
ROPES = {
    "llama-linear": {"rope_type": "linear", "factor": 2.0},
    "llama-llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 32},
    # max_position_embeddings / original_max_position_embeddings = factor: transformers versions that
    # derive yarn's attention factor from that ratio and those that use `factor` agree.
    "llama-yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
}


def tiny_model(kind, seed):
    torch.manual_seed(seed)
    common = dict(vocab_size=96, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "qwen3":
        config = transformers.Qwen3Config(head_dim=24, rope_theta=1e6, **common)
    elif kind == "qwen2":
        config = transformers.Qwen2Config(rope_theta=1e6, **common)
    else:
        config = transformers.LlamaConfig(rope_theta=5e5, **common)
        rope = ROPES[kind]
        if getattr(config, "rope_parameters", None) is not None:  # transformers 5: rope_theta lives in it
            config.rope_parameters = dict(rope, rope_theta=5e5)
        else:
            config.rope_scaling = rope
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.float().eval()


@unittest.skipIf(transformers is None, "needs Hugging Face transformers (the GPU host has it)")
class HfDecoderLayerTest(DaemonClientTest):
    client_timeout = 120
    backend_from_env = True

    def test_layer_zero_matches_transformers_forward_and_every_gradient(self):
        for seed, kind in enumerate(("llama-linear", "llama-llama3", "llama-yarn", "qwen2", "qwen3")):
            with self.subTest(kind):
                model = tiny_model(kind, 20 + seed)
                d = f"{self.tmp.name}/{kind}"
                model.save_pretrained(d, safe_serialization=True)
                ids = hf.import_hf(self.client, d, prefix=f"{kind}/layer", precision="fp32", progress=False)
                g = torch.Generator().manual_seed(seed)
                x = torch.randn(BATCH, SEQ, HIDDEN, generator=g)
                dy = torch.randn(BATCH, SEQ, HIDDEN, generator=g)

                r = self.client.forward([ids[0]], x.numpy(), keep_activations=True)
                dx = self.client.backward(r.activation_id, dy.numpy())
                grads = self.client.download_tensors(ids[0], kind="gradients")

                ref = model.double().model
                layer = ref.layers[0]
                x64 = x.double().requires_grad_(True)
                pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
                cos_sin = ref.rotary_emb(x64, pos)
                mask = torch.full((SEQ, SEQ), float("-inf"), dtype=torch.float64).triu(1)
                out = layer(x64, attention_mask=mask[None, None].expand(BATCH, 1, SEQ, SEQ), position_ids=pos,
                            position_embeddings=cos_sin)
                out = out[0] if isinstance(out, tuple) else out
                out.backward(dy.double())

                errors = {"output": relative_error(torch.from_numpy(np.asarray(r.output)), out.detach()),
                          "input gradient": relative_error(torch.from_numpy(np.asarray(dx)), x64.grad)}
                hf_grads = dict(layer.named_parameters())
                self.assertEqual(sorted(grads), sorted(hf_grads), f"{kind}: the block's tensors are the layer's")
                for name, p in hf_grads.items():
                    errors[f"gradient {name}"] = relative_error(torch.from_numpy(np.asarray(grads[name])), p.grad)
                worst = max(errors, key=errors.get)
                print(f"\n{kind}: worst {worst} {errors[worst]:.2e} over {len(errors)} tensors", flush=True)
                for what, err in errors.items():
                    self.assertLess(err, RTOL, f"{kind}: {what} differs from transformers' by {err:.2e}")


if __name__ == "__main__":
    unittest.main()
