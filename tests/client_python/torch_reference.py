"""An independent PyTorch decoder block with Hugging Face Qwen3/Llama semantics (ARCHITECTURE.md,
"The block"), for checking blockd against. It shares no code with blockd or its Python client.

    block = ReferenceBlock(hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=384,
                           eps=1e-6, theta=1e4, qk_norm=True)
    block.load_state_dict({name: tensor, ...})   # the HF names of one layer
    y = block(x)                                 # x: [batch, seq, hidden]

RoPE angles are computed in float64 (as blockd does) and then rounded to fp32. `rope` is HF's
rope_scaling dict (linear / llama3 / yarn, computed from modeling_rope_utils.py's formulas) and
`bias` gives q/k/v projections biases, as Qwen2 has:

    ReferenceBlock(..., rope={"rope_type": "yarn", "factor": 4.0,
                              "original_max_position_embeddings": 4096}, bias=True)

Generation keeps its own KV cache, as Hugging Face's DynamicCache does (a dict per block holding
the rotated keys and the values, [batch, kv_heads, tokens, head_dim]; reorder rows for beam search
with KvCache.reorder):

    cache = KvCache(len(span.blocks))
    y = span(x_prompt, 0, cache); y = span(x_next, prompt_len, cache)
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


class RefRMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def inv_freq_and_scaling(head_dim, theta, rope=None):
    """HF's (inv_freq, attention_scaling) for rope_type default / linear / llama3 / yarn."""
    half = head_dim // 2
    inv_freq = theta ** (-(2.0 * torch.arange(half, dtype=torch.float64)) / head_dim)
    kind = (rope or {}).get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    factor = rope["factor"]
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        old = rope["original_max_position_embeddings"]
        low, high = rope["low_freq_factor"], rope["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return torch.where(medium, smoothed, scaled), 1.0
    assert kind == "yarn", kind
    scaling = rope.get("attention_factor") or 0.1 * math.log(factor) + 1.0
    max_pos = rope["original_max_position_embeddings"]

    def correction_dim(rotations):
        return head_dim * math.log(max_pos / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo = max(math.floor(correction_dim(rope.get("beta_fast") or 32)), 0)
    hi = min(math.ceil(correction_dim(rope.get("beta_slow") or 1)), head_dim - 1)
    hi = hi + 0.001 if lo == hi else hi
    ramp = ((torch.arange(half, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp), scaling


def rope_tables(seq, head_dim, theta, offset=0, rope=None):
    inv_freq, scaling = inv_freq_and_scaling(head_dim, theta, rope)
    angles = torch.arange(offset, offset + seq, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)  # HF: emb = cat(freqs, freqs)
    return (angles.cos() * scaling).float(), (angles.sin() * scaling).float()


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class RefAttention(nn.Module):
    def __init__(self, hidden, heads, kv_heads, head_dim, eps, theta, qk_norm, rope=None, bias=False):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.theta, self.rope = heads, kv_heads, head_dim, theta, rope
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        if qk_norm:
            self.q_norm = RefRMSNorm(head_dim, eps)
            self.k_norm = RefRMSNorm(head_dim, eps)
        self.qk_norm = qk_norm

    def forward(self, x, offset=0, cache=None):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, heads, s, dh]
        cos, sin = rope_tables(s, self.head_dim, self.theta, offset, self.rope)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        past = 0
        if cache is not None:
            if "k" in cache:
                past = cache["k"].shape[2]
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        group = self.heads // self.kv_heads
        k = k.repeat_interleave(group, dim=1)  # query head h reads kv head h // group
        v = v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        causal = torch.ones(s, past + s, dtype=torch.bool).triu(past + 1)  # new token i sees 0 .. past+i
        scores = scores.masked_fill(causal, float("-inf"))
        attn = torch.softmax(scores, dim=-1) @ v
        return self.o_proj(attn.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class RefMLP(nn.Module):
    def __init__(self, hidden, intermediate):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ReferenceBlock(nn.Module):
    def __init__(self, hidden, heads, kv_heads, head_dim, intermediate, eps, theta, qk_norm, rope=None, bias=False):
        super().__init__()
        self.input_layernorm = RefRMSNorm(hidden, eps)
        self.self_attn = RefAttention(hidden, heads, kv_heads, head_dim, eps, theta, qk_norm, rope, bias)
        self.post_attention_layernorm = RefRMSNorm(hidden, eps)
        self.mlp = RefMLP(hidden, intermediate)

    def forward(self, x, offset=0, cache=None):
        r1 = x + self.self_attn(self.input_layernorm(x), offset, cache)
        return r1 + self.mlp(self.post_attention_layernorm(r1))


class ReferenceSpan(nn.Module):
    """Blocks run in order, like a RemoteSpan."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x, position_offset=0, cache=None):
        for i, b in enumerate(self.blocks):
            x = b(x, position_offset, None if cache is None else cache.layers[i])
        return x


class KvCache:
    """The keys and values of every block of a ReferenceSpan, for generation."""

    def __init__(self, num_blocks):
        self.layers = [{} for _ in range(num_blocks)]

    def length(self):
        return self.layers[0]["k"].shape[2] if "k" in self.layers[0] else 0

    def reorder(self, rows):
        """Row i continues from row rows[i] (beam search)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        for layer in self.layers:
            layer["k"], layer["v"] = layer["k"][rows], layer["v"][rows]
