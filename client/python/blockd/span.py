"""RemoteSpan: a span of blockd blocks as a torch.nn.Module, with autograd through the server.

    span = RemoteSpan.create(client, cfg, num_blocks=4, prefix="lm/layer", seed=0)
    h = span(embed(tokens))                 # Forward(keep_activations) while grad is enabled
    loss = F.cross_entropy(head(norm(h)).flatten(0, 1), targets.flatten())
    loss.backward()                         # Backward: weight gradients accumulate on the server
    opt.step(); opt.zero_grad()             # RemoteAdamW: Step / ZeroGrad on the server

Under torch.no_grad() (or inference_mode) forward is a plain Forward that keeps nothing on the
server. A forward whose graph is dropped without a backward has its activation handle freed by
the client's background thread, so abandoned graphs do not pile up on the server.
"""
import torch
from torch.autograd.function import once_differentiable

from blockd.config import BlockConfig
from blockd.errors import NotFoundError, BlockdError


class _Activation:
    """One open server-side activation handle. Freed when garbage-collected unused."""

    __slots__ = ("client", "activation_id", "consumed")

    def __init__(self, client, activation_id):
        self.client = client
        self.activation_id = activation_id
        self.consumed = False

    def take(self):
        if self.consumed:
            raise RuntimeError(
                "RemoteSpan: a second backward through the same forward; blockd frees a span's activations at "
                "its first backward (retain_graph=True is not supported: run the forward again)")
        self.consumed = True
        return self.activation_id

    def __del__(self):
        if not self.consumed:
            self.consumed = True
            self.client.release_later(self.activation_id)


def forward_keeping(span, x, position_offset):
    """Forward(keep_activations) of `span` on x: (output, the _Activation to give backward_through)."""
    out, activation_id = span.client.forward(span.block_ids, x, keep_activations=True, position_offset=position_offset,
                                             dtype=span.wire_dtype, transport=span.transport)
    return out, _Activation(span.client, activation_id)


def backward_through(span, activation, grad_output, group_id=""):
    """Backward of the forward that opened `activation`: the input's gradient. The weight gradients
    accumulate on the server (and start being averaged over `group_id`, when given)."""
    activation_id = activation.take()
    try:
        return span.client.backward(activation_id, grad_output, dtype=span.wire_dtype, transport=span.transport,
                                    group_id=group_id)
    except NotFoundError:
        raise  # expired (--activation_ttl) or its blocks were deleted: nothing left to free
    except BlockdError:
        span.client.release_later(activation_id)  # a refused Backward leaves the handle open
        raise


class _SpanFunction(torch.autograd.Function):
    # `anchor` is an empty tensor that requires grad, so that the output needs a backward even when
    # x does not (the remote weights always want their gradients).
    @staticmethod
    def forward(ctx, anchor, x, span, position_offset):
        out, ctx.activation = forward_keeping(span, x, position_offset)
        ctx.span = span
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        return None, backward_through(ctx.span, ctx.activation, grad_output), None, None


class RemoteSpan(torch.nn.Module):
    """Blocks `block_ids` on the server of `client`, run in order as one span.

    wire_dtype: "fp32" or "bf16", the dtype of activations and their gradients on the wire (the
    module's output has its input's dtype either way).
    transport: None (the client's: by default CUDA IPC for CUDA tensors when the daemon is on the
    same GPU, shared memory when it is on this host and allows it, else gRPC), "grpc" to force
    activations inside the messages, "shared_memory" or "cuda_ipc"."""

    def __init__(self, client, block_ids, wire_dtype="fp32", transport=None):
        super().__init__()
        if isinstance(block_ids, str):
            block_ids = [block_ids]
        if not block_ids:
            raise ValueError("RemoteSpan needs at least one block id")
        self.client = client
        self.block_ids = list(block_ids)
        self.wire_dtype = wire_dtype
        self.transport = transport
        self._anchor = torch.empty(0, requires_grad=True)  # not a Parameter: it is never trained

    @classmethod
    def create(cls, client, config, num_blocks, prefix="block", seed=0, precision=None, max_seq_len=0,
               max_batch_size=0, wire_dtype="fp32", first_layer=0, frozen=False, transport=None, lora=None):
        """Creates `num_blocks` blocks "{prefix}{i}" with seeded random weights (block i gets
        seed + i) and returns them as one span. frozen=True: weights only (Client.create_block);
        lora=LoraConfig(rank=16, alpha=32, target_modules=[...]): LoRA adapters on every block,
        trained by RemoteAdamW (the adapters alone when frozen)."""
        config = BlockConfig.coerce(config)
        ids = []
        try:
            for i in range(first_layer, first_layer + num_blocks):
                ids.append(client.create_block(f"{prefix}{i}", config, layer_index=i, seed=seed + i,
                                               precision=precision, max_seq_len=max_seq_len,
                                               max_batch_size=max_batch_size, frozen=frozen,
                                               lora=lora).block_id)
        except BlockdError:
            for block_id in ids:  # all or nothing
                try:
                    client.delete_block(block_id)
                except BlockdError:
                    pass
            raise
        return cls(client, ids, wire_dtype=wire_dtype, transport=transport)

    def forward(self, x, position_offset=0):
        if torch.is_grad_enabled():
            return _SpanFunction.apply(self._anchor, x, self, position_offset)
        out, _ = self.client.forward(self.block_ids, x, keep_activations=False, position_offset=position_offset,
                                     dtype=self.wire_dtype, transport=self.transport)
        return out

    def zero_grad(self, set_to_none=True):
        """Clears the remote gradients (and the local ones of any submodules)."""
        super().zero_grad(set_to_none=set_to_none)
        self.client.zero_grad(self.block_ids)

    def download(self, kind="weights", dtype="fp32", as_torch=True):
        """[{name: tensor}] of every block, in span order."""
        return [self.client.download_tensors(b, kind=kind, dtype=dtype, as_torch=as_torch) for b in self.block_ids]

    def delete(self):
        """Deletes the span's blocks on the server."""
        for b in self.block_ids:
            self.client.delete_block(b)

    def extra_repr(self):
        return f"target={self.client.target!r}, block_ids={self.block_ids}, wire_dtype={self.wire_dtype!r}"


class RMSNorm(torch.nn.Module):
    """Hugging Face Llama/Qwen RMSNorm, for the client-side final norm: statistics in fp32."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"
