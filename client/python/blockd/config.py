"""Block hyperparameters and enums by name.

    cfg = BlockConfig(hidden_size=128, num_attention_heads=4, num_kv_heads=2, intermediate_size=384,
                      qk_norm=True)                 # head_dim defaults to hidden_size / heads
    cfg = BlockConfig.from_hf(json.load(open("config.json")))   # refuses what a block cannot compute
    cfg = BlockConfig.from_hf_file("/models/Qwen3-0.6B/config.json")
"""
import dataclasses
import json

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


def _scaled_rope(r):
    """Whether a rope_scaling / rope_parameters value asks for a RoPE other than plain rope_theta."""
    if not r:
        return False
    if not isinstance(r, dict):
        return True
    kind = r.get("rope_type") or r.get("type")
    return kind not in (None, "default")


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
    for key in ("rope_scaling", "rope_parameters"):  # transformers >= 5 names it rope_parameters
        if _scaled_rope(c.get(key)):
            raise UnsupportedConfigError(f"{key} {_shown(c[key])}: blockd blocks compute plain RoPE (rope_theta only)")
    for flag in ("attention_bias", "mlp_bias"):
        if c.get(flag):
            raise UnsupportedConfigError(f"{flag} is true: blockd blocks have no bias terms")
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

    def __post_init__(self):
        # Fill the derived defaults once so every copy of a config compares equal.
        if self.num_kv_heads == 0:
            object.__setattr__(self, "num_kv_heads", self.num_attention_heads)
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    def to_proto(self):
        return pb.BlockConfig(**dataclasses.asdict(self))

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
        model_type, a non-SiLU MLP, a scaled RoPE, biases, sliding-window attention) and for a field
        that is missing or mistyped, with blockctl's words."""
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
        return cls(hidden_size=hidden, num_attention_heads=heads, num_kv_heads=kv, head_dim=head_dim,
                   intermediate_size=intermediate, rms_norm_eps=eps, rope_theta=theta,
                   qk_norm=c["model_type"] == "qwen3")

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
        shapes = {
            "input_layernorm.weight": (d,),
            "self_attn.q_proj.weight": (self.q_dim, d),
            "self_attn.k_proj.weight": (self.kv_dim, d),
            "self_attn.v_proj.weight": (self.kv_dim, d),
            "self_attn.o_proj.weight": (d, self.q_dim),
        }
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
