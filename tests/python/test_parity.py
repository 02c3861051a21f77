"""blockd's CPU backend against an independent PyTorch implementation of the decoder block.

The reference below is written from ARCHITECTURE.md ("The block") and Hugging Face's Llama/Qwen3
decoder layer, not from blockd's code: RMSNorm with its statistics in (at least) float32, per-head
QK-norm over head_dim before RoPE, rotate_half RoPE at positions offset..offset+seq-1, causal
softmax, GQA by repeat_interleave of the kv heads, SwiGLU MLP, both residuals. It runs in float64 on
exactly the fp32 inputs and weights that blockd sees; autograd gives the gradients and
torch.optim.AdamW (with torch.nn.utils.clip_grad_norm_) the optimizer steps.

Every tensor that blockd returns is compared as ||got - ref|| / ||ref|| <= 1e-5 (FP32). The same
reference run in float32 is reported beside it, to show what fp32 arithmetic alone costs.

    BLOCKD_BINARY=build/server/blockd PYTHONPATH=build/python:tests/python \
        /usr/bin/python3 -m unittest -v test_parity

BLOCKD_TEST_SEED=N repeats a run's random draws (the seed is printed).

On the GPU host the same test runs against a CUDA daemon: BLOCKD_BACKEND=cuda and
BLOCKD_PRECISION=fp32|tf32|bf16. FP32 keeps the 1e-5 bound. Reduced precisions are bounded
norm-wise from their unit roundoff u (bf16 2^-8, tf32 2^-11): each matrix product rounds both
operands (<= 2u), about four products lie between the input and the output and about eight
between the output gradient and a weight gradient, so outputs <= 8u and gradients <= 16u
(bf16: 3.1e-2 and 6.2e-2; tf32: 3.9e-3 and 7.8e-3). The optimizer step is then checked against
torch.optim.AdamW applied in float64 to blockd's own gradients and state (resync), which keeps the
fp32 bound for the update itself. Where CUDA is available the same reference also runs in PyTorch
on the GPU (fp32 without TF32, or bf16 autocast), and its error is reported beside blockd's.
"""
import math
import os
import random
import sys
import unittest

import grpc
import numpy as np
import torch

from blockd.v1 import block_service_pb2 as pb
from blockd.v1 import block_service_pb2_grpc as pb_grpc
from blockd_testing import Daemon

FP32_RTOL = 1e-5
BACKEND = os.environ.get("BLOCKD_BACKEND", "cpu")
PRECISION = os.environ.get("BLOCKD_PRECISION", "fp32")
PRECISION_PB = {"fp32": pb.PRECISION_FP32, "tf32": pb.PRECISION_TF32, "bf16": pb.PRECISION_BF16}[PRECISION]
VALUE_BOUND, GRAD_BOUND = {"fp32": (FP32_RTOL, FP32_RTOL), "tf32": (8 * 2.0 ** -11, 16 * 2.0 ** -11),
                           "bf16": (8 * 2.0 ** -8, 16 * 2.0 ** -8)}[PRECISION]
TORCH_CUDA = torch.cuda.is_available()
SEED = int(os.environ.get("BLOCKD_TEST_SEED", random.SystemRandom().randrange(1 << 31)))
torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------
# The reference decoder block (PyTorch, any float dtype)
# ----------------------------------------------------------------------------------------------
class Cfg:
    """rope: None (plain) or HF's rope_scaling dict with the fields the rope_type reads
    (rope_type, factor, low/high_freq_factor, original_max_position_embeddings, attention_factor,
    beta_fast, beta_slow); bias: Qwen2's q/k/v projection biases."""

    def __init__(self, hidden, heads, kv_heads, head_dim, inter, eps=1e-6, theta=10000.0, qk_norm=False, rope=None,
                 bias=False):
        self.hidden, self.heads, self.kv_heads, self.head_dim = hidden, heads, kv_heads, head_dim
        self.inter, self.eps, self.theta, self.qk_norm = inter, eps, theta, qk_norm
        self.rope, self.bias = rope, bias

    def proto(self):
        c = pb.BlockConfig(hidden_size=self.hidden, num_attention_heads=self.heads, num_kv_heads=self.kv_heads,
                           head_dim=self.head_dim, intermediate_size=self.inter, rms_norm_eps=self.eps,
                           rope_theta=self.theta, qk_norm=self.qk_norm, attention_bias=self.bias)
        if self.rope:
            c.rope_scaling.CopyFrom(pb.RopeScaling(**self.rope))
        return c

    def shapes(self):
        d, qd, kvd, f = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.inter
        s = {"input_layernorm.weight": (d,)}
        for part, rows in (("q", qd), ("k", kvd), ("v", kvd)):
            s[f"self_attn.{part}_proj.weight"] = (rows, d)
            if self.bias:
                s[f"self_attn.{part}_proj.bias"] = (rows,)
        s.update({
            "self_attn.o_proj.weight": (d, qd),
            "post_attention_layernorm.weight": (d,),
            "mlp.gate_proj.weight": (f, d),
            "mlp.up_proj.weight": (f, d),
            "mlp.down_proj.weight": (d, f),
        })
        if self.qk_norm:
            s["self_attn.q_norm.weight"] = (self.head_dim,)
            s["self_attn.k_norm.weight"] = (self.head_dim,)
        return s


def rms_norm(x, weight, eps):
    # Hugging Face LlamaRMSNorm / Qwen3RMSNorm: statistics in float32 (or wider), then * weight.
    xs = x if x.dtype == torch.float64 else x.to(torch.float32)
    variance = xs.pow(2).mean(-1, keepdim=True)
    return weight * (xs * torch.rsqrt(variance + eps)).to(x.dtype)


def rope_parameters(head_dim, theta, rope):
    """(inv_freq, attention_scaling) as transformers' modeling_rope_utils.py computes them
    (_compute_default_rope_parameters, _compute_linear_scaling_rope_parameters,
    _compute_llama3_parameters, _compute_yarn_parameters with truncate=True), in float64."""
    dim, base = head_dim, theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    kind = (rope or {}).get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    factor = rope["factor"]
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        low_freq_factor, high_freq_factor = rope["low_freq_factor"], rope["high_freq_factor"]
        old_context_len = rope["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
        is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama), 1.0
    assert kind == "yarn", kind
    attention_factor = rope.get("attention_factor") or 0.1 * math.log(factor) + 1.0  # get_mscale(factor)
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1
    max_pos = rope["original_max_position_embeddings"]

    def find_correction_dim(num_rotations):
        return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(find_correction_dim(beta_fast)), 0)
    high = min(math.ceil(find_correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    inv_freq_extrapolation, inv_freq_interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = inv_freq_interpolation * (1 - extrapolation_factor) + inv_freq_extrapolation * extrapolation_factor
    return inv_freq, attention_factor


def rope_cos_sin(seq, head_dim, offset, theta, dtype, rope=None):
    # Angles in float64 (blockd computes them in double), then cast: exact positions even at large offsets.
    inv_freq, scaling = rope_parameters(head_dim, theta, rope)
    pos = torch.arange(offset, offset + seq, dtype=torch.float64)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # [seq, head_dim]
    # HF multiplies cos and sin by attention_scaling (yarn's attention factor).
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)  # (moved to the input's device by the caller)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def decoder_block(x, p, c, offset):
    """x: [b, s, hidden]; p: name -> tensor (HF names, nn.Linear [out, in] layout)."""
    b, s, _ = x.shape
    H, Hkv, dh = c.heads, c.kv_heads, c.head_dim
    h = rms_norm(x, p["input_layernorm.weight"], c.eps)
    q, k, v = (h @ p[f"self_attn.{n}_proj.weight"].T for n in "qkv")
    if c.bias:  # Qwen2: nn.Linear(bias=True) on q, k and v
        q, k, v = q + p["self_attn.q_proj.bias"], k + p["self_attn.k_proj.bias"], v + p["self_attn.v_proj.bias"]
    q, k, v = q.view(b, s, H, dh), k.view(b, s, Hkv, dh), v.view(b, s, Hkv, dh)
    if c.qk_norm:  # Qwen3: per head, over head_dim, before RoPE
        q = rms_norm(q, p["self_attn.q_norm.weight"], c.eps)
        k = rms_norm(k, p["self_attn.k_norm.weight"], c.eps)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, heads, s, dh]
    cos, sin = (t.to(x.device) for t in rope_cos_sin(s, dh, offset, c.theta, x.dtype, c.rope))
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    k = k.repeat_interleave(H // Hkv, dim=1)  # GQA: query head i reads kv head i // (H / Hkv)
    v = v.repeat_interleave(H // Hkv, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (dh ** -0.5)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool, device=x.device), diagonal=1)
    scores = scores.masked_fill(causal, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    attn = (probs @ v).transpose(1, 2).reshape(b, s, H * dh)
    r1 = x + attn @ p["self_attn.o_proj.weight"].T
    n2 = rms_norm(r1, p["post_attention_layernorm.weight"], c.eps)
    mlp = (torch.nn.functional.silu(n2 @ p["mlp.gate_proj.weight"].T) * (n2 @ p["mlp.up_proj.weight"].T))
    return r1 + mlp @ p["mlp.down_proj.weight"].T


def span_forward(x, params, cfgs, offset):
    for p, c in zip(params, cfgs):
        x = decoder_block(x, p, c, offset)
    return x


# ----------------------------------------------------------------------------------------------
# Wire helpers
# ----------------------------------------------------------------------------------------------
def f32_to_bf16_bits(a):
    """Round-to-nearest-even float32 -> bfloat16 bit patterns (finite inputs)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def bf16_bits_to_f32(h):
    return (np.asarray(h, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def tensor_msg(a, dtype=pb.DTYPE_FLOAT32):
    a = np.asarray(a)
    if dtype == pb.DTYPE_FLOAT32:
        data = np.ascontiguousarray(a, dtype="<f4").tobytes()
    elif dtype == pb.DTYPE_BFLOAT16:
        data = f32_to_bf16_bits(a).astype("<u2").tobytes()
    else:
        raise ValueError(dtype)
    return pb.Tensor(dtype=dtype, shape=list(a.shape), data=data)


def from_tensor_msg(t):
    shape = tuple(t.shape)
    if t.dtype == pb.DTYPE_FLOAT32:
        return np.frombuffer(t.data, dtype="<f4").reshape(shape).astype(np.float32)
    if t.dtype == pb.DTYPE_BFLOAT16:
        return bf16_bits_to_f32(np.frombuffer(t.data, dtype="<u2")).reshape(shape)
    raise ValueError(f"unexpected dtype {t.dtype}")


def download(stub, block_id, kind):
    """DownloadTensors (fp32) -> {name: np.float32 array}, assembled from chunks by byte offset."""
    bufs, shapes = {}, {}
    for ch in stub.DownloadTensors(pb.DownloadTensorsRequest(block_id=block_id, kind=kind,
                                                             dtype=pb.DTYPE_FLOAT32, chunk_bytes=4096)):
        assert ch.dtype == pb.DTYPE_FLOAT32, ch.dtype
        shape = tuple(ch.shape)
        if ch.name not in bufs:
            bufs[ch.name] = bytearray(4 * int(np.prod(shape)))
            shapes[ch.name] = shape
        bufs[ch.name][ch.offset:ch.offset + len(ch.data)] = ch.data
    return {n: np.frombuffer(bytes(b), dtype="<f4").reshape(shapes[n]).astype(np.float32) for n, b in bufs.items()}


def load_weights(stub, block_id, weights, chunk_bytes=3000):
    def chunks():
        for name, w in weights.items():
            data = np.ascontiguousarray(w, dtype="<f4").tobytes()
            for off in range(0, len(data), chunk_bytes):
                yield pb.TensorChunk(block_id=block_id, name=name, dtype=pb.DTYPE_FLOAT32, shape=list(w.shape),
                                     offset=off, data=data[off:off + chunk_bytes])
    return stub.LoadWeights(chunks())


def rel_err(got, ref):
    got = torch.as_tensor(np.asarray(got), dtype=torch.float64) if not torch.is_tensor(got) else got.double()
    ref = torch.as_tensor(np.asarray(ref), dtype=torch.float64) if not torch.is_tensor(ref) else ref.double()
    assert got.shape == ref.shape, (tuple(got.shape), tuple(ref.shape))
    den = ref.norm().item()
    assert den > 0, "reference is zero: the test would check nothing"
    return (got - ref).norm().item() / den


# ----------------------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------------------
_daemon = None


def setUpModule():
    global _daemon
    print(f"\n[parity] random seed {SEED} (BLOCKD_TEST_SEED={SEED} repeats this run)", file=sys.stderr)
    print(f"[parity] backend {BACKEND}, precision {PRECISION}, torch {torch.__version__}"
          f"{' with CUDA' if TORCH_CUDA else ''}", file=sys.stderr)
    # BLOCKD_ATTENTION=cudnn|native pins the CUDA daemon's attention (cudnn: it refuses to start
    # without cuDNN, so a pass is a pass of cuDNN's attention).
    extra = ["--worker_threads=2"]
    if os.environ.get("BLOCKD_ATTENTION"):
        extra.append(f"--attention={os.environ['BLOCKD_ATTENTION']}")
        print(f"[parity] --attention={os.environ['BLOCKD_ATTENTION']}", file=sys.stderr)
    _daemon = Daemon(backend=BACKEND, extra_args=extra).start()


def tearDownModule():
    if _daemon is not None:
        code = _daemon.stop()
        log = _daemon.read_log()
        os.unlink(_daemon.log.name)
        if code != 0:
            raise RuntimeError(f"blockd exited with {code}:\n{log}")


class ErrorTable:
    """Max relative error per (tensor, what), over steps and micro-batches; printed after each test."""
    COLUMNS = ("value", "torch-f32", "torch-cuda", "grad", "torch-f32 grad", "weight", "update", "adam_m",
               "adam_v")

    def __init__(self, title):
        self.title, self.rows = title, {}

    def add(self, row, col, err):
        cols = self.rows.setdefault(row, {})
        cols[col] = max(err, cols.get(col, 0.0))

    def print(self):
        cols = [c for c in self.COLUMNS if any(c in r for r in self.rows.values())]
        lines = [f"\n[parity] {self.title}", "  max ||got-ref||/||ref|| over the steps (got: blockd; ref: float64 "
                 "torch; torch-f32: the same torch code in float32 vs float64, for scale)",
                 f"  {'':44s}" + "".join(f"{c:>15s}" for c in cols)]
        for row, r in self.rows.items():
            lines.append(f"  {row:44s}" + "".join(f"{r[c]:15.2e}" if c in r else f"{'':15s}" for c in cols))
        print("\n".join(lines), file=sys.stderr)


class ParityTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.channel = grpc.insecure_channel(_daemon.target)
        cls.stub = pb_grpc.BlockServiceStub(cls.channel)

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()

    def setUp(self):
        self.gen = torch.Generator().manual_seed(SEED + sum(map(ord, self.id())))

    def randn(self, *shape, scale=1.0):
        return (torch.randn(*shape, generator=self.gen, dtype=torch.float64) * scale).to(torch.float32)

    def random_weights(self, cfg):
        w = {}
        for name, shape in cfg.shapes().items():
            if name.endswith(".bias"):  # both signs, the size of the projections' outputs
                w[name] = self.randn(*shape, scale=0.5).numpy()
            elif len(shape) == 1:  # norm weights: around 1, never all ones (their gradients must matter)
                w[name] = (1.0 + self.randn(*shape, scale=0.2)).numpy()
            else:
                w[name] = self.randn(*shape, scale=1.0 / math.sqrt(shape[1])).numpy()
        return w

    def create(self, block_id, cfg, seed=None, weights=None, max_seq_len=64):
        req = pb.CreateBlockRequest(block_id=block_id, config=cfg.proto(), max_seq_len=max_seq_len,
                                    precision=PRECISION_PB)
        if seed is not None:
            req.seed = seed
        info = self.stub.CreateBlock(req)
        self.addCleanup(lambda: self.stub.DeleteBlock(pb.DeleteBlockRequest(block_id=block_id)))
        if weights is not None:
            resp = load_weights(self.stub, block_id, weights)
            self.assertEqual(sorted(resp.loaded), sorted(weights))
        got = download(self.stub, block_id, pb.TENSOR_KIND_WEIGHTS)
        self.assertEqual({n: tuple(s) for n, s in cfg.shapes().items()}, {n: w.shape for n, w in got.items()})
        if weights is not None:  # fp32 round trip: bit-exact
            for n, w in weights.items():
                np.testing.assert_array_equal(got[n], w, err_msg=n)
        if seed is not None:  # ARCHITECTURE.md: norm weights 1, biases 0, matrices in +-1/sqrt(in)
            for n, w in got.items():
                if n.endswith(".bias"):
                    np.testing.assert_array_equal(w, np.zeros_like(w), err_msg=n)
                elif w.ndim == 1:
                    np.testing.assert_array_equal(w, np.ones_like(w), err_msg=n)
                else:
                    self.assertLessEqual(np.abs(w).max(), 1.0 / math.sqrt(w.shape[1]) * (1 + 1e-6), n)
                    self.assertGreater(np.std(w), 0.3 / math.sqrt(w.shape[1]), n)
        self.assertTrue(self.stub.GetBlock(pb.GetBlockRequest(block_id=block_id)).weights_loaded)
        return got

    def check(self, table, row, col, got, ref, ref32=None, bound=FP32_RTOL):
        err = rel_err(got, ref)
        table.add(row, col, err)
        if ref32 is not None:
            table.add(row, "torch-f32" if col == "value" else f"torch-f32 {col}", rel_err(ref32, ref))
        self.assertLessEqual(err, bound, f"{row} {col}: ||got-ref||/||ref|| = {err:.3e} > {bound:.3g}")

    def torch_cuda_reference(self, table, x, gy, params, cfgs, offset, y64, gx64):
        """The reference on the GPU in PyTorch (fp32 without TF32, or bf16 autocast for reduced
        precisions): its own error against float64, reported beside blockd's for scale."""
        torch.backends.cuda.matmul.allow_tf32 = PRECISION == "tf32"
        dev = torch.device("cuda")
        p = [{n: t.detach().float().to(dev).requires_grad_(True) for n, t in ps.items()} for ps in params]
        xc = x.to(dev).requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=PRECISION == "bf16"):
            y = span_forward(xc, p, cfgs, offset)
        y.float().backward(gy.to(dev))
        table.add("output", "torch-cuda", rel_err(y.detach().float().cpu(), y64.detach()))
        table.add("grad_input", "torch-cuda", rel_err(xc.grad.float().cpu(), gx64))

    # -- the training scenario --------------------------------------------------------------------
    def run_scenario(self, name, cfgs, batch, seq, offset, init, adamw, clip, micro_batches=1, steps=2,
                     resync=False):
        """Creates the span, then `steps` times: micro_batches x (Forward+Backward), compare
        output/grad_input/every gradient, Step, compare grad_norm, weights and Adam moments.

        Two ways to follow the weights over the Steps:
        - trajectory (resync=False): the float64 reference trains on its own from the same start,
          and blockd's weights after each Step must match it. Adam divides by sqrt(v) ~ |g|, so an
          element whose gradient is within fp32 noise of zero gets an update of either sign
          (up to 2 lr on one element): that comparison is well conditioned only when eps is large
          against the gradients' fp32 error, lr * err(g) / eps << 1e-5 ||w||. These scenarios use
          eps = 1e-2 for gradients of RMS 0.5..10 (elements with |g| < 1e-2 are a small fraction).
        - resync=True (any eps, e.g. PyTorch's 1e-8): each Step is checked against
          torch.optim.AdamW applied in float64 to blockd's own pre-Step weights, moments and
          gradients (the gradients having been checked against the float64 reference just
          before), then the reference continues from blockd's state.
        The "update" column (weights after minus before, against that shadow step) is checked in
        both modes. Reduced precisions always resync: their gradients carry the precision's error."""
        resync = resync or PRECISION != "fp32"
        adam_bound = FP32_RTOL if PRECISION == "fp32" else GRAD_BOUND
        table = ErrorTable(f"{name}: batch={batch} seq={seq} offset={offset} blocks={len(cfgs)} "
                           f"GQA={[c.heads // c.kv_heads for c in cfgs]} qk_norm={[c.qk_norm for c in cfgs]} "
                           f"micro_batches={micro_batches} clip={clip} adamw={adamw} "
                           f"{'resync' if resync else 'trajectory'}")
        ids = [f"{name}-{i}" for i in range(len(cfgs))]
        w0 = []
        for i, (bid, c) in enumerate(zip(ids, cfgs)):
            if init == "seed":
                w0.append(self.create(bid, c, seed=1000 + i + SEED % 1000))
            else:
                w0.append(self.create(bid, c, weights=self.random_weights(c)))

        # float64 reference parameters and an optimizer set up as blockd's Step.
        decay_norms = adamw.get("decay_norm_weights", False)

        def make_adamw(blocks):
            """torch.optim.AdamW over the blocks' tensors; weight decay on 2-D matrices only."""
            decayed = [t for p in blocks for t in p.values() if t.dim() == 2 or decay_norms]
            plain = [t for p in blocks for t in p.values() if not (t.dim() == 2 or decay_norms)]
            groups = [{"params": decayed, "weight_decay": adamw["weight_decay"]}]
            if plain:
                groups.append({"params": plain, "weight_decay": 0.0})
            return torch.optim.AdamW(groups, lr=adamw["lr"], betas=(adamw["beta1"], adamw["beta2"]),
                                     eps=adamw["eps"])

        ref = [{n: torch.tensor(w, dtype=torch.float64, requires_grad=True) for n, w in ws.items()} for ws in w0]
        opt = make_adamw(ref)
        all_params = [t for p in ref for t in p.values()]

        for step in range(1, steps + 1):
            # Output and gradients are checked against the reference at blockd's current fp32
            # weights (`cur`, float64; `c32`, the same in float32 for scale); the trajectory `ref`
            # runs beside them to feed its optimizer.
            cur = [{n: torch.tensor(w, dtype=torch.float64, requires_grad=True) for n, w in ws.items()} for ws in w0]
            c32 = [{n: torch.tensor(w, requires_grad=True) for n, w in ws.items()} for ws in w0]
            for mb in range(micro_batches):
                x = self.randn(batch, seq, cfgs[0].hidden)
                gy = self.randn(batch, seq, cfgs[0].hidden)
                fwd = self.stub.Forward(pb.ForwardRequest(block_ids=ids, input=tensor_msg(x.numpy()),
                                                          keep_activations=True, position_offset=offset))
                self.assertEqual(fwd.output.dtype, pb.DTYPE_FLOAT32)
                self.assertEqual(list(fwd.output.shape), [batch, seq, cfgs[0].hidden])
                self.assertTrue(fwd.activation_id)
                bwd = self.stub.Backward(pb.BackwardRequest(activation_id=fwd.activation_id,
                                                            grad_output=tensor_msg(gy.numpy())))
                self.assertEqual(bwd.grad_input.dtype, pb.DTYPE_FLOAT32)
                self.assertEqual(list(bwd.grad_input.shape), [batch, seq, cfgs[0].hidden])
                if mb == 0:  # inference (no activations kept) computes the same bits
                    inf = self.stub.Forward(pb.ForwardRequest(block_ids=ids, input=tensor_msg(x.numpy()),
                                                              position_offset=offset))
                    self.assertEqual(inf.activation_id, "")
                    self.assertEqual(inf.output.data, fwd.output.data)

                x64 = x.double().requires_grad_(True)
                y64 = span_forward(x64, cur, cfgs, offset)
                y64.backward(gy.double())
                x32 = x.clone().requires_grad_(True)
                y32 = span_forward(x32, c32, cfgs, offset)
                y32.backward(gy)
                span_forward(x.double(), ref, cfgs, offset).backward(gy.double())
                self.check(table, "output", "value", from_tensor_msg(fwd.output), y64.detach(), y32.detach(),
                           bound=VALUE_BOUND)
                self.check(table, "grad_input", "value", from_tensor_msg(bwd.grad_input), x64.grad, x32.grad,
                           bound=GRAD_BOUND)
                if TORCH_CUDA:
                    self.torch_cuda_reference(table, x, gy, cur, cfgs, offset, y64, x64.grad)

            # Every weight gradient (accumulated over the micro-batches), before the Step.
            pre = []  # blockd's own state before the Step: weights, gradients, Adam moments
            for i, bid in enumerate(ids):
                grads = download(self.stub, bid, pb.TENSOR_KIND_GRADIENTS)
                pre.append(dict(w=w0[i], g=grads, m=download(self.stub, bid, pb.TENSOR_KIND_ADAM_M),
                                v=download(self.stub, bid, pb.TENSOR_KIND_ADAM_V)))
                self.assertEqual(set(grads), set(ref[i]))
                for n, g in grads.items():
                    self.check(table, f"{bid} {n}", "grad", g, cur[i][n].grad, c32[i][n].grad, bound=GRAD_BOUND)

            # Step: clip over all named blocks as clip_grad_norm_, then AdamW.
            max_norm = 0.0
            if clip == "active":  # half the current norm: the clip really scales
                max_norm = 0.5 * torch.norm(torch.stack([t.grad.norm() for t in all_params])).item()
            elif clip == "inactive":
                max_norm = 1e6
            req = pb.StepRequest(block_ids=ids, max_grad_norm=max_norm,
                                 adamw=pb.AdamW(lr=adamw["lr"], beta1=adamw["beta1"], beta2=adamw["beta2"],
                                                eps=adamw["eps"], weight_decay=adamw["weight_decay"],
                                                decay_norm_weights=decay_norms))
            resp = self.stub.Step(req)
            if max_norm > 0:
                total = torch.nn.utils.clip_grad_norm_(all_params, max_norm).item()
                coef = min(1.0, max_norm / (total + 1e-6))
            else:
                total = torch.norm(torch.stack([t.grad.norm() for t in all_params])).item()
                coef = 0.0
            opt.step()
            opt.zero_grad(set_to_none=False)

            # The same Step applied in float64 to blockd's own pre-Step weights, gradients and
            # moments. Its update isolates blockd's clip + AdamW arithmetic from the gradients'
            # fp32 error, which Adam's division by sqrt(v) magnifies on elements whose gradient is
            # tiny (the trajectory's update differs there by lr * (relative error of that element)).
            shadow = [{n: torch.tensor(st["w"][n], dtype=torch.float64, requires_grad=True) for n in st["w"]}
                      for st in pre]
            sopt = make_adamw(shadow)
            for p, st in zip(shadow, pre):
                for n, t in p.items():
                    t.grad = torch.tensor(st["g"][n], dtype=torch.float64)
                    if step > 1:
                        sopt.state[t] = {"step": torch.tensor(float(step - 1)),
                                         "exp_avg": torch.tensor(st["m"][n], dtype=torch.float64),
                                         "exp_avg_sq": torch.tensor(st["v"][n], dtype=torch.float64)}
            shadow_params = [t for p in shadow for t in p.values()]
            own_total = torch.norm(torch.stack([t.grad.norm() for t in shadow_params])).item()
            if max_norm > 0:
                torch.nn.utils.clip_grad_norm_(shadow_params, max_norm)
            sopt.step()
            self.assertFalse(resp.skipped)
            self.assertEqual([(s.block_id, s.step) for s in resp.steps], [(b, step) for b in ids])
            e = abs(resp.grad_norm - total) / total
            table.add("Step.grad_norm (pre-clip)", "value", e)
            self.assertLessEqual(e, GRAD_BOUND, f"grad_norm {resp.grad_norm} vs torch {total}")
            # blockd's grad_norm is the norm of its own fp32 gradients, summed in double: the only
            # error is double rounding, at most ~n * 2^-53 ~ 1e-11 for n < 1e5 terms.
            e = abs(resp.grad_norm - own_total) / own_total
            table.add("Step.grad_norm vs its own grads", "value", e)
            self.assertLessEqual(e, 1e-10, f"grad_norm {resp.grad_norm} vs the norm of the gradients {own_total}")
            if max_norm > 0:
                e = abs(resp.clip_coefficient - coef) / coef
                table.add("Step.clip_coefficient", "value", e)
                self.assertLessEqual(e, GRAD_BOUND, f"clip_coefficient {resp.clip_coefficient} vs {coef}")
                if clip == "active":
                    self.assertLess(resp.clip_coefficient, 0.9)

            for i, bid in enumerate(ids):
                w = download(self.stub, bid, pb.TENSOR_KIND_WEIGHTS)
                m = download(self.stub, bid, pb.TENSOR_KIND_ADAM_M)
                v = download(self.stub, bid, pb.TENSOR_KIND_ADAM_V)
                g = download(self.stub, bid, pb.TENSOR_KIND_GRADIENTS)
                for n, t in ref[i].items():
                    row = f"{bid} {n}"
                    self.check(table, row, "weight", w[n], (shadow[i][n] if resync else t).detach())
                    # The update alone (weights after minus before) against the shadow step: a
                    # finer check of clip + AdamW than the weights. It is a difference of fp32
                    # tensors, so besides fp32 arithmetic (FP32_RTOL) it carries blockd's two
                    # roundings of each weight per step (decay multiply, then add; each at most
                    # 2^-24 |w| to nearest), i.e. up to 2 * 2^-24 * ||w|| absolute.
                    upd_ref = shadow[i][n].detach() - torch.from_numpy(pre[i]["w"][n]).double()
                    wnorm = max(np.linalg.norm(w[n]), np.linalg.norm(pre[i]["w"][n]))
                    self.check(table, row, "update", w[n].astype(np.float64) - pre[i]["w"][n].astype(np.float64),
                               upd_ref, bound=FP32_RTOL + 2 * 2.0 ** -24 * wnorm / upd_ref.norm().item())
                    st = opt.state[t]
                    self.check(table, row, "adam_m", m[n], st["exp_avg"], bound=adam_bound)
                    self.check(table, row, "adam_v", v[n], st["exp_avg_sq"], bound=2 * adam_bound)
                    self.assertFalse(np.any(g[n]), f"{bid}/{n}: Step must clear the gradients")
                    self.assertTrue(np.any(w[n] != w0[i][n]), f"{bid}/{n}: Step changed nothing")
                    if resync:  # go on from blockd's state
                        with torch.no_grad():
                            t.copy_(torch.from_numpy(w[n]))
                        st["exp_avg"].copy_(torch.from_numpy(m[n]))
                        st["exp_avg_sq"].copy_(torch.from_numpy(v[n]))
                w0[i] = w
        table.print()
        return table

    # -- configurations --------------------------------------------------------------------------
    ADAM = dict(lr=5e-3, beta1=0.9, beta2=0.95, eps=1e-2, weight_decay=0.1)  # see run_scenario on eps
    TORCH_DEFAULT_ADAMW = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)

    def test_qknorm_mha_loaded_weights_clipped(self):
        # GQA ratio 1, QK-norm, random loaded weights (norm weights != 1), batch 2, active clipping,
        # PyTorch's default AdamW (eps 1e-8: checked step by step, see run_scenario).
        c = Cfg(hidden=64, heads=4, kv_heads=4, head_dim=16, inter=96, eps=1e-6, theta=1e6, qk_norm=True)
        self.run_scenario("qkn-mha", [c], batch=2, seq=9, offset=0, init="load", adamw=self.TORCH_DEFAULT_ADAMW,
                          clip="active", resync=True)

    def test_gqa2_no_qknorm_seeded_offset(self):
        # GQA ratio 2, no QK-norm, seeded init, batch 3, nonzero offset, no clipping, norm weights decayed.
        c = Cfg(hidden=64, heads=4, kv_heads=2, head_dim=16, inter=128, eps=1e-5, theta=10000.0, qk_norm=False)
        adam = dict(self.ADAM, lr=3e-3, beta2=0.999, weight_decay=0.05, decay_norm_weights=True)
        self.run_scenario("gqa2", [c], batch=3, seq=7, offset=37, init="seed", adamw=adam, clip="none")

    def test_span_gqa4_qknorm_offset_microbatches(self):
        # A span of two blocks, GQA ratio 4, QK-norm, head_dim * heads != hidden, a large offset,
        # two micro-batches accumulated before each Step, active clipping over both blocks.
        # Without a KV cache, RoPE makes q.k depend on position differences only, so the offset
        # cannot change the block's output; what a large one does test is the angles' precision
        # (HF-style fp32 angles at position 1e5 are off by ~5e-4 in cos/sin, which moves the
        # output by ~3e-5, above the bound).
        c = Cfg(hidden=48, heads=4, kv_heads=1, head_dim=16, inter=80, eps=1e-6, theta=1e6, qk_norm=True)
        self.run_scenario("span4", [c, c], batch=2, seq=11, offset=100003, init="load", adamw=self.ADAM,
                          clip="active", micro_batches=2)

    def test_span_gqa4_no_qknorm_mixed(self):
        # A span of two blocks with different configs (QK-norm on one only), GQA 4 and 2, batch 2.
        c1 = Cfg(hidden=64, heads=8, kv_heads=2, head_dim=8, inter=96, eps=1e-6, theta=10000.0, qk_norm=False)
        c2 = Cfg(hidden=64, heads=4, kv_heads=2, head_dim=16, inter=64, eps=1e-6, theta=5e5, qk_norm=True)
        self.run_scenario("mixed", [c1, c2], batch=2, seq=6, offset=5, init="load", adamw=self.ADAM,
                          clip="inactive")

    # Scaled RoPE and Qwen2's biases. head_dim 16 puts dimensions in every band of each formula:
    # Llama 3.2's llama3 values at theta 5e5 give wavelengths 6 .. 6e5 around its bands at 2048 and
    # 8192; Qwen2.5's yarn at theta 1e6 with a 4096 context ramps over dimensions 1..4.
    LLAMA32_ROPE = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=8192)
    YARN_ROPE = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=4096)

    def test_llama32_rope_gqa2_offset(self):
        c = Cfg(hidden=64, heads=4, kv_heads=2, head_dim=16, inter=96, eps=1e-5, theta=5e5, rope=self.LLAMA32_ROPE)
        self.run_scenario("llama3", [c], batch=2, seq=9, offset=5000, init="load", adamw=self.ADAM, clip="inactive")

    def test_yarn_rope_qknorm_and_linear_span(self):
        # Yarn's attention factor (0.1 ln 4 + 1) scales q and k alike; a linear block follows it.
        c1 = Cfg(hidden=64, heads=4, kv_heads=2, head_dim=16, inter=96, eps=1e-6, theta=1e6, qk_norm=True,
                 rope=self.YARN_ROPE)
        c2 = Cfg(hidden=64, heads=4, kv_heads=4, head_dim=16, inter=64, eps=1e-6, theta=1e4,
                 rope=dict(rope_type="linear", factor=2.5))
        self.run_scenario("yarn-linear", [c1, c2], batch=2, seq=7, offset=3, init="load", adamw=self.ADAM,
                          clip="active")

    def test_qwen2_biases_loaded_and_seeded(self):
        c = Cfg(hidden=64, heads=4, kv_heads=2, head_dim=16, inter=96, eps=1e-6, theta=1e6, bias=True)
        self.run_scenario("qwen2-bias", [c], batch=3, seq=8, offset=11, init="load", adamw=self.TORCH_DEFAULT_ADAMW,
                          clip="active", resync=True)
        c2 = Cfg(hidden=64, heads=4, kv_heads=2, head_dim=16, inter=96, eps=1e-6, theta=1e6, bias=True,
                 rope=dict(self.YARN_ROPE, attention_factor=1.2, beta_fast=16.0, beta_slow=2.0))
        # Seeded biases start at zero, so after a Step their norm is ~lr and the trajectory comparison
        # (relative to ||w||) is ill-conditioned; the k bias gradient is also small (RoPE is all that
        # keeps q.bk from being constant per row, which softmax would ignore). Checked step by step.
        self.run_scenario("qwen2-bias-yarn-seeded", [c2], batch=2, seq=6, offset=0, init="seed", adamw=self.ADAM,
                          clip="none", resync=True)

    def test_bf16_on_the_wire(self):
        """BFLOAT16 in -> BFLOAT16 out, for Forward and for Backward.

        The input and grad_output are bf16 values, which are exact in fp32 and float64, so the
        reference is fed exactly what blockd computes on. blockd computes in fp32 (error <= 1e-5,
        the bound above) and rounds the result to bf16 once, to nearest even: bf16 keeps 8
        significant bits, so each element is off by at most half an ulp, |fl(y) - y| <= 2^-8 |y|,
        hence ||fl(y) - y|| <= 2^-8 ||y||. With the fp32 error: ||got - ref|| / ||ref|| <=
        2^-8 * (1 + 1e-5) + 1e-5. The same holds element by element (plus fp32 noise), which a
        truncating conversion (up to 2^-7) would fail. The weight gradients never pass through
        bf16, so they keep the fp32 bound."""
        c = Cfg(hidden=64, heads=4, kv_heads=2, head_dim=16, inter=96, eps=1e-6, theta=1e6, qk_norm=True)
        w = self.create("bf16-0", c, weights=self.random_weights(c))
        table = ErrorTable("bf16 on the wire: batch=2 seq=8 offset=3 GQA=2 qk_norm=True")
        x = torch.from_numpy(bf16_bits_to_f32(f32_to_bf16_bits(self.randn(2, 8, 64).numpy())))
        gy = torch.from_numpy(bf16_bits_to_f32(f32_to_bf16_bits(self.randn(2, 8, 64).numpy())))
        fwd = self.stub.Forward(pb.ForwardRequest(block_ids=["bf16-0"], input=tensor_msg(x.numpy(), pb.DTYPE_BFLOAT16),
                                                  keep_activations=True, position_offset=3))
        self.assertEqual(fwd.output.dtype, pb.DTYPE_BFLOAT16)
        self.assertEqual(len(fwd.output.data), 2 * 2 * 8 * 64)
        bwd = self.stub.Backward(pb.BackwardRequest(activation_id=fwd.activation_id,
                                                    grad_output=tensor_msg(gy.numpy(), pb.DTYPE_BFLOAT16)))
        self.assertEqual(bwd.grad_input.dtype, pb.DTYPE_BFLOAT16)
        self.assertEqual(len(bwd.grad_input.data), 2 * 2 * 8 * 64)

        p = {n: torch.tensor(a, dtype=torch.float64, requires_grad=True) for n, a in w.items()}
        x64 = x.double().requires_grad_(True)
        y64 = decoder_block(x64, p, c, 3)
        y64.backward(gy.double())
        bound = 2.0 ** -8 * (1 + VALUE_BOUND) + GRAD_BOUND
        for key, got, ref in (("output (bf16)", from_tensor_msg(fwd.output), y64.detach()),
                              ("grad_input (bf16)", from_tensor_msg(bwd.grad_input), x64.grad)):
            err = rel_err(got, ref)
            table.add(key, "value", err)
            self.assertLessEqual(err, bound, f"{key}: {err:.3e} > {bound:.3e}")
            if PRECISION != "fp32":
                continue  # elementwise half-ulp checks hold only for an fp32 computation
            got64 = torch.from_numpy(got).double()
            elem = (got64 - ref).abs() - (2.0 ** -8 * ref.abs() + FP32_RTOL * ref.abs().max())
            self.assertLessEqual(elem.max().item(), 0.0, f"{key}: an element is off by more than half a bf16 ulp")
            # Most elements must be exactly the bf16 rounding of the reference.
            exact = np.mean(f32_to_bf16_bits(ref.float().numpy()) == f32_to_bf16_bits(got))
            self.assertGreater(exact, 0.98, f"{key}: only {exact:.3f} of the elements are the nearest bf16")
        grads = download(self.stub, "bf16-0", pb.TENSOR_KIND_GRADIENTS)
        for n, g in grads.items():
            self.check(table, f"bf16-0 {n}", "grad", g, p[n].grad, bound=GRAD_BOUND)
        table.print()


if __name__ == "__main__":
    unittest.main()
