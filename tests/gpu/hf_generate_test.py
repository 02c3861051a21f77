"""blockd.RemoteCausalLM.generate against Hugging Face transformers' generate (with its KV cache), for
the GPU host, which has transformers (5.17) beside PyTorch; this machine's CI has no transformers.

Tiny Qwen3 and Llama models are made with transformers itself (random init, fp32), saved with
save_pretrained, imported into a blockd daemon with blockd.hf.import_hf and run with
RemoteCausalLM.from_hf. Checks: greedy tokens equal and every step's logits within 1e-5 relative
(fp32) of HF's output_logits; beam search (3 beams, an eos that is reached) equal sequences; sampling
(temperature, top-k, top-p) from the same global torch seed equal tokens, as both draw with
torch.multinomial from the same warped distribution.

    bash bench/device/run_checks.sh generate       # from a bundle (bench/device/bundle.sh)
    BLOCKD_BINARY=build/server/blockd PYTHONPATH=build/python:tests/python \\
        python3 -m unittest -v hf_generate_test     # in tests/gpu, by hand

BLOCKD_BACKEND (default cpu) picks the daemon's backend (run_checks.sh runs both); the blocks are
fp32 on either (BLOCKD_PRECISION overrides), and the HF model always runs on the CPU in fp32, so the
comparison is exact arithmetic against exact: on CUDA, cuBLASLt's fp32 products (no TF32), the
CUDA-core paged attention, each step's logits within the same 1e-5.
"""
import os
import unittest

import torch

import blockd
from blockd import hf
from blockd_testing import DaemonClientTest, relative_error

try:
    import transformers
except ImportError:  # pragma: no cover - the CI machine
    transformers = None

RTOL = 1e-5
PRECISION = os.environ.get("BLOCKD_PRECISION", "fp32")


def tiny_model(kind):
    torch.manual_seed(1234 if kind == "qwen3" else 4321)
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  torch_dtype="float32", bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "qwen3":
        config = transformers.Qwen3Config(head_dim=24, rope_theta=1e6, **common)
        model = transformers.Qwen3ForCausalLM(config)
    else:
        config = transformers.LlamaConfig(rope_theta=1e4, **common)
        model = transformers.LlamaForCausalLM(config)
    return model.float().eval()



@unittest.skipIf(transformers is None, "needs Hugging Face transformers (the GPU host has it)")
class HfGenerateTest(DaemonClientTest):
    client_timeout = 120
    backend_from_env = True

    def pair(self, kind):
        model = tiny_model(kind)
        d = os.path.join(self.tmp.name, kind)
        if not os.path.isdir(d):
            model.save_pretrained(d, safe_serialization=True)
            hf.import_hf(self.client, d, prefix=f"{kind}/layer", precision=PRECISION, progress=False)
        return model, blockd.RemoteCausalLM.from_hf(d, self.client, prefix=f"{kind}/layer")

    def hf_generate(self, model, prompt, **kw):
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), return_dict_in_generate=True,
                              output_logits=True, pad_token_id=0, **kw)

    def test_greedy_tokens_and_logits_match_hf(self):
        for kind in ("qwen3", "llama"):
            with self.subTest(kind):
                model, remote = self.pair(kind)
                prompt = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(5))
                want = self.hf_generate(model, prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)
                got = remote.generate(prompt, max_new_tokens=12, return_dict_in_generate=True, output_logits=True)
                self.assertEqual(got.sequences.tolist(), want.sequences.tolist())
                for step, (g, w) in enumerate(zip(got.logits, want.logits)):
                    err = relative_error(g, w.float())
                    self.assertLess(err, RTOL, f"{kind} step {step}: logits differ from HF by {err:.2e}")

    def test_beam_search_matches_hf(self):
        for kind in ("qwen3", "llama"):
            with self.subTest(kind):
                model, remote = self.pair(kind)
                prompt = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(6))
                eos = int(remote.generate(prompt[:1], max_new_tokens=3)[0, -1])
                # pad 3, not 0: HF's beam search fills finished rows with `pad_token_id or eos_token_id[0]`,
                # so a pad of 0 (falsy) comes out as the eos; blockd pads with the pad_token_id it is given
                want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, num_beams=3,
                                      do_sample=False, eos_token_id=eos, pad_token_id=3, length_penalty=1.0,
                                      early_stopping=False)
                got = remote.generate(prompt, max_new_tokens=8, num_beams=3, eos_token_id=eos, pad_token_id=3)
                self.assertEqual(got.tolist(), want.tolist())

    def test_sampling_matches_hf_from_the_same_seed(self):
        model, remote = self.pair("qwen3")
        prompt = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(7))
        settings = dict(max_new_tokens=10, do_sample=True, temperature=0.7, top_k=20, top_p=0.9)
        torch.manual_seed(11)
        want = self.hf_generate(model, prompt, eos_token_id=None, **settings).sequences
        torch.manual_seed(11)
        got = remote.generate(prompt, **settings)
        self.assertEqual(got.tolist(), want.tolist())


if __name__ == "__main__":
    unittest.main()
