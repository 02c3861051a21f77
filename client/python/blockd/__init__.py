"""blockd: Python client for blockd, the daemon that keeps transformer decoder blocks on a GPU and
trains them over gRPC.

    import blockd
    client = blockd.Client("localhost:50051")
    span = blockd.RemoteSpan.create(client, blockd.BlockConfig(hidden_size=128, num_attention_heads=4,
                                    num_kv_heads=2, intermediate_size=384, qk_norm=True), num_blocks=4)
    opt = blockd.RemoteAdamW(span, lr=1e-3)
    loss = head(span(embed(tokens))).loss; loss.backward(); opt.step(); opt.zero_grad()

`Client` needs numpy and grpcio only; `RemoteSpan`, `RemoteAdamW` and `RMSNorm` load torch when
first used.
"""
from blockd.client import Client, ForwardResult, StepResult
from blockd.config import BlockConfig, RopeScaling, UnsupportedConfigError
from blockd.errors import (AlreadyExistsError, BlockdError, CancelledError, DeadlineExceededError,
                           FailedPreconditionError, InternalError, InvalidArgumentError, NotFoundError,
                           PermissionDeniedError, ResourceExhaustedError, UnauthenticatedError, UnavailableError,
                           UnimplementedError)

__version__ = "0.1.0"
__all__ = ["Client", "ForwardResult", "StepResult", "BlockConfig", "RopeScaling", "UnsupportedConfigError", "RemoteSpan",
           "RemoteAdamW", "RMSNorm",
           "BlockdError", "AlreadyExistsError", "CancelledError", "DeadlineExceededError", "FailedPreconditionError",
           "InternalError", "InvalidArgumentError", "NotFoundError", "PermissionDeniedError", "ResourceExhaustedError",
           "UnauthenticatedError", "UnavailableError", "UnimplementedError"]

_LAZY = {"RemoteSpan": "blockd.span", "RMSNorm": "blockd.span", "RemoteAdamW": "blockd.optim"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'blockd' has no attribute {name!r}")
