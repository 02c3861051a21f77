"""blockd: Python client for blockd, the daemon that keeps transformer decoder blocks on a GPU and
trains them over gRPC.

    import blockd
    client = blockd.Client("localhost:50051")
    span = blockd.RemoteSpan.create(client, blockd.BlockConfig(hidden_size=128, num_attention_heads=4,
                                    num_kv_heads=2, intermediate_size=384, qk_norm=True), num_blocks=4)
    # or LoRA on a frozen base: RemoteSpan.create(..., frozen=True, lora=blockd.LoraConfig(rank=16, alpha=32))
    opt = blockd.RemoteAdamW(span, lr=1e-3)
    loss = head(span(embed(tokens))).loss; loss.backward(); opt.step(); opt.zero_grad()

    model = blockd.RemoteCausalLM.from_hf("/models/Qwen3-0.6B", "localhost:50051")  # layers imported
    tokens = model.generate(prompt_ids, max_new_tokens=64)          # KV-cache sessions on blockd

    group = blockd.ReplicaGroup.form([c0, c1, c2], "dp", block_ids)   # data parallelism (Gloo)
    model = blockd.RemoteModel([[span_a0, span_a1], [span_b]])          # stages on several daemons

`Client` needs numpy and grpcio only; `RemoteSpan`, `RemoteAdamW`, `RMSNorm`, `RemoteModel`,
`ReplicaGroup`, `RemoteCausalLM` and `TokenStreamer` load torch when first used.
"""
from blockd.client import Client, ForwardResult, GradNormResult, InferStepResult, InferStream, StepResult
from blockd.config import BlockConfig, LoraConfig, RopeScaling, UnsupportedConfigError
from blockd.errors import (AbortedError, AlreadyExistsError, BlockdError, CancelledError, DeadlineExceededError,
                           FailedPreconditionError, InternalError, InvalidArgumentError, NotFoundError,
                           PermissionDeniedError, ResourceExhaustedError, UnauthenticatedError, UnavailableError,
                           UnimplementedError)

__version__ = "0.1.0"
__all__ = ["Client", "ForwardResult", "StepResult", "InferStepResult", "InferStream", "RemoteCausalLM",
           "TokenStreamer", "GenerateOutput", "BlockConfig", "LoraConfig", "RopeScaling", "UnsupportedConfigError", "RemoteSpan",
           "RemoteAdamW", "RMSNorm",
           "RemoteModel", "ReplicaGroup", "GradNormResult",
           "BlockdError", "AbortedError", "AlreadyExistsError", "CancelledError", "DeadlineExceededError", "FailedPreconditionError",
           "InternalError", "InvalidArgumentError", "NotFoundError", "PermissionDeniedError", "ResourceExhaustedError",
           "UnauthenticatedError", "UnavailableError", "UnimplementedError"]

_LAZY = {"RemoteSpan": "blockd.span", "RMSNorm": "blockd.span", "RemoteAdamW": "blockd.optim",
         "RemoteModel": "blockd.model", "ReplicaGroup": "blockd.model",
         "RemoteCausalLM": "blockd.generation", "TokenStreamer": "blockd.generation",
         "GenerateOutput": "blockd.generation"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'blockd' has no attribute {name!r}")
