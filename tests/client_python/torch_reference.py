"""An independent PyTorch decoder block with Hugging Face Qwen3/Llama semantics (ARCHITECTURE.md,
"The block"), for checking blockd against. It shares no code with blockd or its Python client.

    block = ReferenceBlock(hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=384,
                           eps=1e-6, theta=1e4, qk_norm=True)
    block.load_state_dict({name: tensor, ...})   # the HF names of one layer
    y = block(x)                                 # x: [batch, seq, hidden]

RoPE angles are computed in float64 (as blockd does) and then rounded to fp32.
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


def rope_tables(seq, head_dim, theta, offset=0):
    half = head_dim // 2
    inv_freq = theta ** (-(2.0 * torch.arange(half, dtype=torch.float64)) / head_dim)
    angles = torch.arange(offset, offset + seq, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)  # HF: emb = cat(freqs, freqs)
    return angles.cos().float(), angles.sin().float()


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class RefAttention(nn.Module):
    def __init__(self, hidden, heads, kv_heads, head_dim, eps, theta, qk_norm):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.theta = heads, kv_heads, head_dim, theta
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        if qk_norm:
            self.q_norm = RefRMSNorm(head_dim, eps)
            self.k_norm = RefRMSNorm(head_dim, eps)
        self.qk_norm = qk_norm

    def forward(self, x, offset=0):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, heads, s, dh]
        cos, sin = rope_tables(s, self.head_dim, self.theta, offset)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        group = self.heads // self.kv_heads
        k = k.repeat_interleave(group, dim=1)  # query head h reads kv head h // group
        v = v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        causal = torch.ones(s, s, dtype=torch.bool).triu(1)
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
    def __init__(self, hidden, heads, kv_heads, head_dim, intermediate, eps, theta, qk_norm):
        super().__init__()
        self.input_layernorm = RefRMSNorm(hidden, eps)
        self.self_attn = RefAttention(hidden, heads, kv_heads, head_dim, eps, theta, qk_norm)
        self.post_attention_layernorm = RefRMSNorm(hidden, eps)
        self.mlp = RefMLP(hidden, intermediate)

    def forward(self, x, offset=0):
        r1 = x + self.self_attn(self.input_layernorm(x), offset)
        return r1 + self.mlp(self.post_attention_layernorm(r1))


class ReferenceSpan(nn.Module):
    """Blocks run in order, like a RemoteSpan."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x, position_offset=0):
        for b in self.blocks:
            x = b(x, position_offset)
        return x
