"""Block hyperparameters and enums by name.

    cfg = BlockConfig(hidden_size=128, num_attention_heads=4, num_kv_heads=2, intermediate_size=384,
                      qk_norm=True)                 # head_dim defaults to hidden_size / heads
    cfg = BlockConfig.from_hf(json.load(open("config.json")))
"""
import dataclasses

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
        """The block config of one layer of a Hugging Face `config.json` (a dict)."""
        model_type = config.get("model_type", "")
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        head_dim = config.get("head_dim") or hidden // heads
        theta = config.get("rope_theta")
        if theta is None:
            theta = (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            hidden_size=hidden,
            num_attention_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            intermediate_size=int(config["intermediate_size"]),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            qk_norm=model_type == "qwen3",
        )

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
