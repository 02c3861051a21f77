"""Block hyperparameters and enums by name.

    cfg = BlockConfig(hidden_size=128, num_attention_heads=4, num_kv_heads=2, intermediate_size=384,
                      qk_norm=True)                 # head_dim defaults to hidden_size / heads
    cfg = BlockConfig.from_hf(json.load(open("config.json")))   # refuses what a block cannot compute
    cfg = BlockConfig.from_hf_file("/models/Qwen3-0.6B/config.json")
"""
import dataclasses
import json
import math

from blockd.v1 import block_service_pb2 as pb

_PRECISIONS = {
    None: pb.PRECISION_UNSPECIFIED, "": pb.PRECISION_UNSPECIFIED, "default": pb.PRECISION_UNSPECIFIED,
    "fp32": pb.PRECISION_FP32, "float32": pb.PRECISION_FP32,
    "tf32": pb.PRECISION_TF32,
    "bf16": pb.PRECISION_BF16, "bfloat16": pb.PRECISION_BF16,
}
_KINDS = {
    "weights": pb.TENSOR_KIND_WEIGHTS,
    "gradients": pb.TENSOR_KIND_GRADIENTS, "grads": pb.TENSOR_KIND_GRADIENTS,
    "adam_m": pb.TENSOR_KIND_ADAM_M, "exp_avg": pb.TENSOR_KIND_ADAM_M,
    "adam_v": pb.TENSOR_KIND_ADAM_V, "exp_avg_sq": pb.TENSOR_KIND_ADAM_V,
}


# The model types whose decoder layer a blockd block computes (proto/hf_config.h, kHfModelTypes).
HF_MODEL_TYPES = ("llama", "qwen2", "qwen3")


class UnsupportedConfigError(ValueError):
    """A Hugging Face config.json that describes a model a blockd block cannot compute, or lacks a
    field. The messages are proto/hf_config.cc's, word for word: blockctl create --config,
    blockctl import-hf, BlockConfig.from_hf and python3 -m blockd import-hf refuse alike."""


def _shown(v):
    """A config value in messages, as nlohmann::json::dump writes it in blockctl: compact, keys sorted."""
    return json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _text_config(c):
    return c["text_config"] if isinstance(c.get("text_config"), dict) else c


def _check_supported(c):
    model_type = c.get("model_type")
    if not isinstance(model_type, str) or model_type not in HF_MODEL_TYPES:
        raise UnsupportedConfigError(f"model_type {_shown(model_type)}: blockd blocks are llama, qwen2 or qwen3 "
                                     f"decoder layers")
    act = c["hidden_act"] if "hidden_act" in c else c.get("hidden_activation", "silu")
    if act != "silu":
        raise UnsupportedConfigError(f"hidden_act {_shown(act)}: blockd blocks compute a SiLU-gated MLP")
    # Qwen2's q/k/v biases are blockd's attention_bias; Llama's and Qwen3's attention_bias also
    # puts a bias on o_proj, which blocks do not have.
    if c.get("attention_bias") and model_type != "qwen2":
        raise UnsupportedConfigError("attention_bias is true: blockd blocks have q/k/v biases only (qwen2), "
                                     "not an o_proj bias")
    if c.get("mlp_bias"):
        raise UnsupportedConfigError("mlp_bias is true: blockd blocks have no MLP bias terms")
    if c.get("use_sliding_window") and c.get("sliding_window"):
        raise UnsupportedConfigError("use_sliding_window is true: blockd blocks compute full causal attention")


_REQUIRED = object()


def _positive_int(c, key, fallback=_REQUIRED):
    """A positive integer field; absent or null (and 0, where there is a fallback) takes the fallback."""
    v = c.get(key)
    if v is None:
        if fallback is _REQUIRED:
            raise UnsupportedConfigError(f"config.json has no {key}")
        return fallback
    if isinstance(v, int) and not isinstance(v, bool):
        if v == 0 and fallback is not _REQUIRED:
            return fallback
        if v > 0:
            return v
    raise UnsupportedConfigError(f"{key} is {_shown(v)}, expected a positive integer")


def _number(v, what, fallback):
    if v is None:
        return fallback
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UnsupportedConfigError(f"{what} is {_shown(v)}, expected a number")
    return float(v)


def _rope_number(r, key, field, fallback=_REQUIRED):
    """A positive number of a rope dict; absent or null is the fallback when given."""
    v = r.get(field)
    if v is None:
        if fallback is _REQUIRED:
            raise UnsupportedConfigError(f"{key} has no {field}")
        return fallback
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
        raise UnsupportedConfigError(f"{key}.{field} is {_shown(v)}, expected a positive number")
    return float(v)


def _get_mscale(scale, mscale):
    """HF's get_mscale of _compute_yarn_parameters."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _rope_from_hf(c):
    """rope_scaling (or transformers 5's rope_parameters) as HF's modeling_rope_utils.py reads it,
    with HF's config-level defaults resolved (proto/hf_config.cc, RopeFromHf, word for word)."""
    key = "rope_scaling" if c.get("rope_scaling") else "rope_parameters"
    r = c.get(key)
    if not r:
        return RopeScaling()
    if not isinstance(r, dict):
        raise UnsupportedConfigError(f"{key} {_shown(r)}: expected an object with a rope_type")
    kind = r.get("rope_type") or r.get("type")
    if not kind or kind == "default":
        return RopeScaling()
    t = kind if isinstance(kind, str) else ""
    if t not in ("linear", "llama3", "yarn"):
        raise UnsupportedConfigError(f"{key} {_shown(r)}: blockd blocks compute default, linear, llama3 or yarn RoPE")
    out = {"rope_type": t}
    if t == "llama3":
        out["low_freq_factor"] = _rope_number(r, key, "low_freq_factor")
        out["high_freq_factor"] = _rope_number(r, key, "high_freq_factor")
        if out["high_freq_factor"] <= out["low_freq_factor"]:  # HF's smooth factor divides by their difference
            raise UnsupportedConfigError(f"{key}.high_freq_factor is {_shown(r['high_freq_factor'])}, expected more "
                                         f"than low_freq_factor {_shown(r['low_freq_factor'])}")
    if t in ("llama3", "yarn"):
        own = r.get("original_max_position_embeddings") is not None
        v = r["original_max_position_embeddings"] if own else (c.get("max_position_embeddings") if t == "yarn" else None)
        if v is None:
            raise UnsupportedConfigError(f"{key} has no original_max_position_embeddings")
        if not _is_int(v) or v <= 0:
            name = f"{key}.original_max_position_embeddings" if own else "max_position_embeddings"
            raise UnsupportedConfigError(f"{name} is {_shown(v)}, expected a positive integer")
        out["original_max_position_embeddings"] = v
    factor_fallback = _REQUIRED
    max_pos = c.get("max_position_embeddings")
    if t == "yarn" and _is_int(max_pos) and max_pos > 0:
        # HF: a yarn config without factor takes max_position_embeddings / original_max_position_embeddings.
        factor_fallback = max_pos / out["original_max_position_embeddings"]
    out["factor"] = _rope_number(r, key, "factor", factor_fallback)
    if t == "yarn":
        out["beta_fast"] = _rope_number(r, key, "beta_fast", 32.0)
        out["beta_slow"] = _rope_number(r, key, "beta_slow", 1.0)
        if r.get("attention_factor") is not None:
            out["attention_factor"] = _rope_number(r, key, "attention_factor")
        elif r.get("mscale") and r.get("mscale_all_dim"):
            mscale = _rope_number(r, key, "mscale")
            mscale_all_dim = _rope_number(r, key, "mscale_all_dim")
            out["attention_factor"] = _get_mscale(out["factor"], mscale) / _get_mscale(out["factor"], mscale_all_dim)
        else:
            out["attention_factor"] = _get_mscale(out["factor"], 1.0)
        if "truncate" in r and not r["truncate"]:
            raise UnsupportedConfigError(f"{key}.truncate is {_shown(r['truncate'])}: blockd blocks compute yarn "
                                         f"with truncate true")
    return RopeScaling(**out)


def hf_num_layers(config):
    """num_hidden_layers of a config.json (dict), as blockctl's HfNumLayers reads it."""
    return _positive_int(_text_config(config), "num_hidden_layers")


def precision_value(p):
    """PRECISION_* for "fp32" / "tf32" / "bf16" / None (the backend's default) or an enum value."""
    if isinstance(p, int) and p in pb.Precision.values():
        return p
    key = p.lower() if isinstance(p, str) else p
    if key in _PRECISIONS:
        return _PRECISIONS[key]
    if isinstance(p, str) and p.upper() in pb.Precision.keys():
        return pb.Precision.Value(p.upper())
    raise ValueError(f"precision {p!r}: expected fp32, tf32, bf16 or None")


def kind_value(k):
    """TENSOR_KIND_* for "weights" / "gradients" / "adam_m" / "adam_v" or an enum value."""
    if isinstance(k, int) and k in pb.TensorKind.values():
        return k
    if isinstance(k, str):
        if k.lower() in _KINDS:
            return _KINDS[k.lower()]
        if k.upper() in pb.TensorKind.keys():
            return pb.TensorKind.Value(k.upper())
    raise ValueError(f"tensor kind {k!r}: expected one of weights, gradients, adam_m, adam_v")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Hugging Face's rope_scaling (blockd.v1.RopeScaling): rope_type "" or "default" is plain RoPE;
    "linear", "llama3" and "yarn" read the fields their HF functions read (0: unset)."""
    rope_type: str = ""
    factor: float = 0.0
    low_freq_factor: float = 0.0
    high_freq_factor: float = 0.0
    original_max_position_embeddings: int = 0
    attention_factor: float = 0.0
    beta_fast: float = 0.0
    beta_slow: float = 0.0

    @property
    def is_default(self):
        return self.rope_type in ("", "default")


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LORA_STEMS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
               "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
               "down_proj": "mlp.down_proj"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on a block's projections (blockd.v1.LoraConfig), PEFT's math: for a target W,
    y = x W^T + (alpha / rank) (x A^T) B^T with A [rank, in] (seeded like PEFT) and B [out, rank]
    (zero), named like W: "self_attn.q_proj.lora_A.weight", "self_attn.q_proj.lora_B.weight".
    The server checks it (rank 1..min(in, out), alpha finite > 0, targets among LORA_TARGETS, once)."""
    rank: int
    alpha: float
    target_modules: tuple = LORA_TARGETS

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(t for t in self.target_modules.split(",") if t))
        else:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def scale(self):
        return self.alpha / self.rank

    def to_proto(self):
        return pb.LoraConfig(rank=int(self.rank), alpha=float(self.alpha), target_modules=list(self.target_modules))

    @classmethod
    def from_proto(cls, l):
        return cls(rank=l.rank, alpha=l.alpha, target_modules=tuple(l.target_modules))

    @classmethod
    def coerce(cls, l):
        """A LoraConfig from a LoraConfig, a blockd.v1.LoraConfig or a dict of its fields; None stays None."""
        if l is None or isinstance(l, cls):
            return l
        if isinstance(l, pb.LoraConfig):
            return cls.from_proto(l)
        if isinstance(l, dict):
            return cls(**l)
        raise TypeError(f"lora of type {type(l).__name__}: expected LoraConfig, blockd.v1.LoraConfig or dict")

    def param_shapes(self, config):
        """{name: shape} of the adapters on a block of `config`, in the server's order (after the
        base parameters; targets in LORA_TARGETS order, A before B)."""
        base = BlockConfig.coerce(config).param_shapes()
        shapes = {}
        for t in LORA_TARGETS:
            if t not in self.target_modules:
                continue
            stem = _LORA_STEMS[t]
            out, inp = base[f"{stem}.weight"]
            shapes[f"{stem}.lora_A.weight"] = (self.rank, inp)
            shapes[f"{stem}.lora_B.weight"] = (out, self.rank)
        return shapes


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Hugging Face Llama / Qwen2 / Qwen3 decoder-layer hyperparameters (ARCHITECTURE.md, "The block")."""
    hidden_size: int
    num_attention_heads: int
    intermediate_size: int
    num_kv_heads: int = 0        # 0: num_attention_heads (no GQA)
    head_dim: int = 0            # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    qk_norm: bool = False
    rope_scaling: RopeScaling = RopeScaling()   # plain RoPE; also a dict of RopeScaling's fields
    attention_bias: bool = False                # Qwen2: self_attn.{q,k,v}_proj.bias

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        elif isinstance(self.rope_scaling, pb.RopeScaling):
            object.__setattr__(self, "rope_scaling", RopeScaling(
                **{f.name: getattr(self.rope_scaling, f.name) for f in dataclasses.fields(RopeScaling)}))
        # Fill the derived defaults once so every copy of a config compares equal.
        if self.num_kv_heads == 0:
            object.__setattr__(self, "num_kv_heads", self.num_attention_heads)
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    def to_proto(self):
        fields = dataclasses.asdict(self)
        rope = fields.pop("rope_scaling")
        out = pb.BlockConfig(**fields)
        if not self.rope_scaling.is_default:  # plain RoPE leaves the message unset, as the server does
            out.rope_scaling.CopyFrom(pb.RopeScaling(**rope))
        return out

    @classmethod
    def from_proto(cls, c):
        return cls(**{f.name: getattr(c, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def coerce(cls, c):
        """A BlockConfig from a BlockConfig, a blockd.v1.BlockConfig or a dict of its fields."""
        if isinstance(c, cls):
            return c
        if isinstance(c, pb.BlockConfig):
            return cls.from_proto(c)
        if isinstance(c, dict):
            return cls(**c)
        raise TypeError(f"config of type {type(c).__name__}: expected BlockConfig, blockd.v1.BlockConfig or dict")

    @classmethod
    def from_hf(cls, config):
        """The block config of one layer of a Hugging Face `config.json` (a dict; its "text_config"
        when it has one). Raises UnsupportedConfigError for what a block cannot compute (another
        model_type, a non-SiLU MLP, a RoPE other than default/linear/llama3/yarn, MLP or o_proj
        biases, sliding-window attention) and for a field that is missing or mistyped, with
        blockctl's words. Qwen2 always gets its q/k/v biases (attention_bias), as in HF."""
        if not isinstance(config, dict):
            raise UnsupportedConfigError("config.json is not a JSON object")
        c = _text_config(config)
        _check_supported(c)
        hidden = _positive_int(c, "hidden_size")
        heads = _positive_int(c, "num_attention_heads")
        kv = _positive_int(c, "num_key_value_heads", heads)
        head_dim = _positive_int(c, "head_dim", hidden // heads)
        intermediate = _positive_int(c, "intermediate_size")
        eps = _number(c.get("rms_norm_eps"), "rms_norm_eps", 1e-6)
        theta = 10000.0
        if c.get("rope_theta") is not None:
            theta = _number(c["rope_theta"], "rope_theta", 10000.0)
        elif isinstance(c.get("rope_parameters"), dict):  # transformers >= 5
            theta = _number(c["rope_parameters"].get("rope_theta"), "rope_parameters.rope_theta", 10000.0)
        rope = _rope_from_hf(c)
        bias = c["model_type"] == "qwen2"  # HF's Qwen2Attention has bias=True whatever the config says
        return cls(hidden_size=hidden, num_attention_heads=heads, num_kv_heads=kv, head_dim=head_dim,
                   intermediate_size=intermediate, rms_norm_eps=eps, rope_theta=theta,
                   qk_norm=c["model_type"] == "qwen3", rope_scaling=rope, attention_bias=bias)

    @classmethod
    def from_hf_file(cls, path):
        """BlockConfig.from_hf of the config.json at `path`."""
        with open(path) as f:
            try:
                config = json.load(f)
            except ValueError as e:
                raise UnsupportedConfigError(f"{path} is not JSON: {e}") from None
        return cls.from_hf(config)

    @property
    def q_dim(self):
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self):
        return self.num_kv_heads * self.head_dim

    def param_shapes(self):
        """{name: shape} of one block's tensors, in the server's order."""
        d, f = self.hidden_size, self.intermediate_size
        shapes = {"input_layernorm.weight": (d,)}
        for part, rows in (("q", self.q_dim), ("k", self.kv_dim), ("v", self.kv_dim)):
            shapes[f"self_attn.{part}_proj.weight"] = (rows, d)
            if self.attention_bias:
                shapes[f"self_attn.{part}_proj.bias"] = (rows,)
        shapes["self_attn.o_proj.weight"] = (d, self.q_dim)
        if self.qk_norm:
            shapes["self_attn.q_norm.weight"] = (self.head_dim,)
            shapes["self_attn.k_norm.weight"] = (self.head_dim,)
        shapes.update({
            "post_attention_layernorm.weight": (d,),
            "mlp.gate_proj.weight": (f, d),
            "mlp.up_proj.weight": (f, d),
            "mlp.down_proj.weight": (d, f),
        })
        return shapes
