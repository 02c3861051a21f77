"""The PyTorch baseline for bench/: the same decoder block, timed the same way as bench_engine.

    python3 bench/torch_baseline.py [--shapes qwen,llama,span8] [--modes eager-bf16,compile-bf16,eager-fp32]
                                    [--iters 20] [--check-target HOST:PORT] [--json out.json]

The block is Hugging Face's Llama/Qwen3 decoder layer as ARCHITECTURE.md writes it: RMSNorm with fp32
statistics, per-head QK-norm, rotate_half RoPE, F.scaled_dot_product_attention (causal, GQA),
SwiGLU, both residuals. Modes: eager-bf16 (fp32 master weights under bf16 autocast),
compile-bf16 (the same through torch.compile), eager-fp32 (fp32 without TF32). The optimizer is
torch.optim.AdamW(fused=True) over fp32 masters, weight decay on matrices only. A mode ending in
-loraR (compile-bf16-lora16) is PEFT's LoRA on a frozen base: the base weights in bf16 without
gradients (as a frozen blockd block holds them), rank-R adapters (alpha 2R) on all seven
projections in fp32 under the same autocast, y = x W^T + (alpha / R) (x A^T) B^T, AdamW over the
adapters only; the input gradient is computed in every mode, as blockd computes it.

Timing matches bench_engine: warm-up, then per-iteration CUDA events around forward, backward and
step, the median of --iters, inputs rotated among 3 random sets. FLOPs per sequence:
fwd = 2 S d (H + 2 Hkv) dh + 2 S H dh d + 6 S d f + 2 S^2 H dh, bwd = 2 fwd.

--check-target: before timing, create the same block on a running blockd (CUDA), copy its seeded
weights into the PyTorch block, and compare both outputs on one input (bf16 on the wire): the two
must compute the same function (norm-wise within the bf16 bound 3.1e-2, and fp32 within 1e-5).
"""
import argparse
import json
import math
import statistics
import sys

import torch
import torch.nn.functional as F

PEAK_BF16 = 790e12
SHAPES = {
    "qwen": dict(name="qwen3-0.6b-like 8x2048", d=1024, H=16, Hkv=8, dh=128, f=3072, qk_norm=True, B=8, S=2048,
                 span=1),
    "llama": dict(name="llama3-8b-like 1x4096", d=4096, H=32, Hkv=8, dh=128, f=14336, qk_norm=False, B=1, S=4096,
                  span=1),
    "span8": dict(name="span of 8 x qwen 8x2048", d=1024, H=16, Hkv=8, dh=128, f=3072, qk_norm=True, B=8, S=2048,
                  span=8),
}


def fwd_flops(s):
    S, d, H, Hkv, dh, f = s["S"], s["d"], s["H"], s["Hkv"], s["dh"], s["f"]
    return s["B"] * (2 * S * d * (H + 2 * Hkv) * dh + 2 * S * H * dh * d + 6 * S * d * f + 2 * S * S * H * dh)


class Block(torch.nn.Module):
    def __init__(self, s, eps=1e-6, theta=1e6, lora_rank=0):
        super().__init__()
        d, H, Hkv, dh, f = s["d"], s["H"], s["Hkv"], s["dh"], s["f"]
        self.H, self.Hkv, self.dh, self.eps, self.qk_norm = H, Hkv, dh, eps, s["qk_norm"]
        lin = lambda o, i: torch.nn.Parameter(torch.empty(o, i).uniform_(-i ** -0.5, i ** -0.5))
        self.input_layernorm = torch.nn.Parameter(torch.ones(d))
        self.q_proj, self.k_proj, self.v_proj = lin(H * dh, d), lin(Hkv * dh, d), lin(Hkv * dh, d)
        self.o_proj = lin(d, H * dh)
        if self.qk_norm:
            self.q_norm, self.k_norm = torch.nn.Parameter(torch.ones(dh)), torch.nn.Parameter(torch.ones(dh))
        self.post_attention_layernorm = torch.nn.Parameter(torch.ones(d))
        self.gate_proj, self.up_proj, self.down_proj = lin(f, d), lin(f, d), lin(d, f)
        inv_freq = 1.0 / (theta ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh))
        ang = torch.outer(torch.arange(s["S"], dtype=torch.float64), inv_freq)
        emb = torch.cat((ang, ang), dim=-1)
        self.register_buffer("cos", emb.cos().float(), persistent=False)
        self.register_buffer("sin", emb.sin().float(), persistent=False)
        self.lora, self.lora_scale = torch.nn.ParameterDict(), 2.0
        if lora_rank:
            for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                w = getattr(self, p)
                w.requires_grad_(False)
                w.data = w.data.bfloat16()
                out, inp = w.shape
                self.lora[p + "_A"] = torch.nn.Parameter(torch.empty(lora_rank, inp).uniform_(-inp ** -0.5, inp ** -0.5))
                self.lora[p + "_B"] = torch.nn.Parameter(torch.randn(out, lora_rank) * 0.01)
            for p in self.parameters():
                if p.dim() == 1:
                    p.requires_grad_(False)

    def linear(self, x, name):
        y = F.linear(x, getattr(self, name))
        if name + "_A" in self.lora:
            y = y + self.lora_scale * F.linear(F.linear(x, self.lora[name + "_A"]), self.lora[name + "_B"])
        return y

    def names(self):
        m = {"input_layernorm.weight": "input_layernorm", "post_attention_layernorm.weight": "post_attention_layernorm"}
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            m[f"self_attn.{p}.weight"] = p
        if self.qk_norm:
            m["self_attn.q_norm.weight"], m["self_attn.k_norm.weight"] = "q_norm", "k_norm"
        for p in ("gate_proj", "up_proj", "down_proj"):
            m[f"mlp.{p}.weight"] = p
        return m

    def rms(self, x, w):
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    @staticmethod
    def rotate_half(x):
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)

    def forward(self, x):
        b, s, _ = x.shape
        h = self.rms(x, self.input_layernorm)
        q = self.linear(h, "q_proj").view(b, s, self.H, self.dh)
        k = self.linear(h, "k_proj").view(b, s, self.Hkv, self.dh)
        v = self.linear(h, "v_proj").view(b, s, self.Hkv, self.dh)
        if self.qk_norm:
            q, k = self.rms(q, self.q_norm), self.rms(k, self.k_norm)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = self.cos[:s].to(q.dtype), self.sin[:s].to(q.dtype)
        q = q * cos + self.rotate_half(q) * sin
        k = k * cos + self.rotate_half(k) * sin
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        r1 = x + self.linear(a.transpose(1, 2).reshape(b, s, -1), "o_proj")
        n2 = self.rms(r1, self.post_attention_layernorm)
        return r1 + self.linear(F.silu(self.linear(n2, "gate_proj")) * self.linear(n2, "up_proj"), "down_proj")


def make_optimizer(blocks):
    decay = [p for b in blocks for p in b.parameters() if p.dim() == 2 and p.requires_grad]
    plain = [p for b in blocks for p in b.parameters() if p.dim() == 1 and p.requires_grad]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=1e-3, fused=True)


def time_mode(s, mode, iters):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    torch.manual_seed(0)
    lora_rank = int(mode.split("-lora")[1]) if "-lora" in mode else 0
    blocks = [Block(s, lora_rank=lora_rank).to(dev) for _ in range(s["span"])]
    span = torch.nn.Sequential(*blocks)
    fn = torch.compile(span) if mode.startswith("compile") else span
    opt = make_optimizer(blocks)
    bf16 = "-bf16" in mode
    xs = [torch.randn(s["B"], s["S"], s["d"], device=dev) for _ in range(3)]
    gs = [torch.randn(s["B"], s["S"], s["d"], device=dev) for _ in range(3)]
    torch.cuda.reset_peak_memory_stats()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
    fwd, bwd, step = [], [], []
    for it in range(iters + (8 if mode.startswith("compile") else 3)):
        x, g = xs[it % 3].requires_grad_(True), gs[it % 3]
        ev[0].record()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            y = fn(x)
        ev[1].record()
        y.backward(g)
        ev[2].record()
        opt.step()
        opt.zero_grad(set_to_none=False)
        ev[3].record()
        torch.cuda.synchronize()
        x.grad = None
        if it >= (8 if mode.startswith("compile") else 3):
            fwd.append(ev[0].elapsed_time(ev[1]))
            bwd.append(ev[1].elapsed_time(ev[2]))
            step.append(ev[2].elapsed_time(ev[3]))
    f, b, st = statistics.median(fwd), statistics.median(bwd), statistics.median(step)
    flops = 3 * fwd_flops(s) * s["span"]
    tflops = flops / ((f + b) * 1e-3) / 1e12
    return dict(shape=s["name"], mode=mode, fwd_ms=f, bwd_ms=b, step_ms=st, tokens_per_s=s["B"] * s["S"] / ((f + b) * 1e-3),
                tflops=tflops, mfu=tflops * 1e12 / PEAK_BF16, peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30)


def check_same_function(target, s):
    """blockd (CUDA) and this PyTorch block, same weights, same input: same output."""
    import numpy as np  # the blockd package comes from PYTHONPATH (build/python)
    from blockd import Client
    from blockd.config import BlockConfig
    dev = torch.device("cuda")
    cfg = BlockConfig(hidden_size=s["d"], num_attention_heads=s["H"], num_kv_heads=s["Hkv"], head_dim=s["dh"],
                      intermediate_size=s["f"], rms_norm_eps=1e-6, rope_theta=1e6, qk_norm=s["qk_norm"])
    block = Block(s).to(dev)
    x = torch.randn(2, 256, s["d"])
    results = {}
    with Client(target, timeout=120) as c:
        for precision in ("bf16", "fp32"):
            bid = f"check-{precision}"
            c.create_block(bid, cfg, seed=5, precision=precision, max_seq_len=256, max_batch_size=2)
            weights = c.download_tensors(bid)
            with torch.no_grad():
                for name, attr in block.names().items():
                    getattr(block, attr).copy_(torch.from_numpy(np.asarray(weights[name])))
            got = c.forward([bid], x, dtype="float32" if precision == "fp32" else "bf16")
            got = torch.as_tensor(np.asarray(got.output if hasattr(got, "output") else got)).float()
            c.delete_block(bid)
            with torch.no_grad():
                block64 = Block(s).to(dev).double()
                block64.load_state_dict(block.state_dict())
                block64.cos, block64.sin = block.cos.double(), block.sin.double()
                ref = block64(x.to(dev).double()).cpu()
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    mine = block(x.to(dev)).float().cpu()
            rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
            results[precision] = dict(blockd_vs_fp64=rel(got, ref), torch_vs_fp64=rel(mine, ref),
                                      blockd_vs_torch=rel(got, mine.double()))
            bound = 3.1e-2 if precision == "bf16" else 1e-5
            ok = results[precision]["blockd_vs_fp64"] <= bound
            print(f"same function ({precision}): blockd vs float64 {results[precision]['blockd_vs_fp64']:.2e}, "
                  f"torch vs float64 {results[precision]['torch_vs_fp64']:.2e}, blockd vs torch "
                  f"{results[precision]['blockd_vs_torch']:.2e} (bound {bound:g}) {'OK' if ok else 'FAIL'}",
                  flush=True)
            if not ok:
                raise SystemExit(1)
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="qwen,llama,span8")
    ap.add_argument("--modes", default="eager-bf16,compile-bf16,eager-fp32")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--check-target", default="")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    out = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "rows": []}
    if args.check_target:
        out["check"] = check_same_function(args.check_target, SHAPES["qwen"])
    print(f"{'shape':26s} {'mode':13s} {'fwd ms':>9s} {'bwd ms':>9s} {'step ms':>9s} {'tok/s':>10s} "
          f"{'TFLOP/s':>8s} {'MFU':>6s} {'peak GiB':>9s}", flush=True)
    for sh in args.shapes.split(","):
        for mode in args.modes.split(","):
            try:
                r = time_mode(SHAPES[sh], mode, args.iters)
            except Exception as e:  # e.g. out of memory: report, keep going
                print(f"{SHAPES[sh]['name']:26s} {mode:13s} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                torch.cuda.empty_cache()
                continue
            out["rows"].append(r)
            print(f"{r['shape']:26s} {mode:13s} {r['fwd_ms']:9.3f} {r['bwd_ms']:9.3f} {r['step_ms']:9.3f} "
                  f"{r['tokens_per_s']:10.0f} {r['tflops']:8.1f} {100 * r['mfu']:5.1f}% {r['peak_gib']:9.2f}", flush=True)
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
