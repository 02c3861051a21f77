"""Hugging Face transformers' decode beside bench_decode: 8 Llama-3-8B-shaped LlamaDecoderLayers in
bf16 on the GPU with a StaticCache, a 512-token prompt then 64 tokens decoded one at a time, at
batch 1 and 64: ms per layer per decode step (median step / layers), as bench_decode prints it.

    python3 bench/hf_decode.py [--batches 1,64] [--layers 8] [--prompt 512] [--new 64]
"""
import argparse
import statistics
import time

import torch
from transformers import LlamaConfig
from transformers.cache_utils import StaticCache
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=64)
    a = ap.parse_args()
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, num_hidden_layers=a.layers, rope_theta=500000.0, max_position_embeddings=8192,
                      rms_norm_eps=1e-5)
    cfg._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        layers = [LlamaDecoderLayer(cfg, i).eval() for i in range(a.layers)]
        rope = LlamaRotaryEmbedding(cfg)
    total = a.prompt + a.new
    for batch in [int(b) for b in a.batches.split(",")]:
        try:
            cache = StaticCache(config=cfg, max_cache_len=total)
        except TypeError:  # transformers 4.x
            cache = StaticCache(config=cfg, max_batch_size=batch, max_cache_len=total, device="cuda",
                                dtype=torch.bfloat16)
        keys = torch.arange(total, device="cuda")

        def step(h, pos):
            position_ids = pos.unsqueeze(0).expand(batch, -1)
            pe = rope(h, position_ids)
            mask = (keys[None, :] <= pos[:, None])[None, None].expand(batch, 1, -1, -1)
            for layer in layers:
                out = layer(h, attention_mask=mask, position_ids=position_ids, past_key_values=cache, use_cache=True,
                            cache_position=pos, position_embeddings=pe)
                h = out[0] if isinstance(out, tuple) else out
            return h

        with torch.inference_mode():
            x = torch.randn(batch, a.prompt, 4096, device="cuda")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(x, torch.arange(a.prompt, device="cuda"))
            torch.cuda.synchronize()
            prefill = time.perf_counter() - t0
            times = []
            for i in range(a.new):
                x = torch.randn(batch, 1, 4096, device="cuda")
                pos = torch.tensor([a.prompt + i], device="cuda")
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                step(x, pos)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        print(f"hf static-cache decode  batch {batch:3d}  {a.layers} layers  prompt {a.prompt}  new {a.new}: "
              f"{med * 1e3 / a.layers:.4f} ms/layer/step (median step {med * 1e3:.3f} ms, {batch / med:.0f} tokens/s)  "
              f"prefill {prefill * 1e3:.1f} ms (first call)", flush=True)


if __name__ == "__main__":
    main()
