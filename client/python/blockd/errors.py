"""Exceptions of the blockd client: one class per gRPC status code, all under `BlockdError`.

    try:
        client.get_block("layer0")
    except blockd.NotFoundError as e:
        print(e.code, e.details)   # grpc.StatusCode.NOT_FOUND  "block layer0 not found"
"""
import grpc


class BlockdError(Exception):
    """A failed blockd call: `code` is the grpc.StatusCode, `details` the server's message and
    `method` the RPC ("Forward")."""

    def __init__(self, code, details, method=""):
        self.code = code
        self.details = details or ""
        self.method = method
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        where = f"{method}: " if method else ""
        super().__init__(f"{where}{name}: {self.details}")


class InvalidArgumentError(BlockdError):
    """Bad shape, dtype, config, name or value."""


class NotFoundError(BlockdError):
    """Unknown block or activation handle."""


class AlreadyExistsError(BlockdError):
    """A block id in use."""


class FailedPreconditionError(BlockdError):
    """Weights not loaded, no gradients to step, checkpoints disabled."""


class ResourceExhaustedError(BlockdError):
    """Memory budget, message size or a per-client limit."""


class UnauthenticatedError(BlockdError):
    """No token, or an unknown one."""


class PermissionDeniedError(BlockdError):
    """A user token on an admin RPC."""


class UnavailableError(BlockdError):
    """The server is draining or cannot be reached."""


class DeadlineExceededError(BlockdError):
    """The call's deadline passed."""


class CancelledError(BlockdError):
    """The call was cancelled."""


class UnimplementedError(BlockdError):
    """The backend lacks what was asked (precision bf16 on the cpu backend)."""


class AbortedError(BlockdError):
    """A replica group's collective failed (a member died or stalled): nothing was applied, and the
    group is failed; leave it and form a new one."""


class InternalError(BlockdError):
    """A bug in blockd."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.DATA_LOSS: InternalError,
}


def error_class(code):
    """The BlockdError subclass raised for a grpc.StatusCode."""
    return _BY_CODE.get(code, BlockdError)


def from_rpc_error(err, method=""):
    """Turns a grpc.RpcError into the matching BlockdError."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    return error_class(code)(code, details, method)
