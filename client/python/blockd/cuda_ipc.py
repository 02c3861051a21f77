"""CUDA IPC tensors for a PyTorch client whose tensors live on the daemon's GPU (blockd on the CUDA
backend with --allow_shared_memory).

The client registers a CUDA tensor's memory once (its storage's cudaIpcMemHandle, from
`untyped_storage()._share_cuda_()`) with an interprocess event; Forward and Backward then name a
slice of it, the daemon copies the activation device to device after waiting on the event (which
the client records on its current stream before each call), writes the reply into the same slice
and synchronises before answering. Activations never cross PCIe or the gRPC message.

    region = CudaRegion(client, torch.device("cuda:0"), 64 << 20)  # raises if the daemon cannot open it
    client.register_cuda_tensor(name, tensor)                     # the bare registration

`Client(transport="auto")` (the default) uses such regions by itself for CUDA tensors (one per
call in flight on a device, so calls from several threads overlap) when the daemon opens them
(same host, same GPU), else falls back to shared memory or messages; `transport="cuda_ipc"`
raises instead of falling back, `"grpc"` never uses them.
"""
import secrets
import threading

from blockd.shared_memory import RegionPool, unregister_quietly
from blockd.v1 import block_service_pb2 as pb


def share_cuda_tensor(tensor):
    """(device, cudaIpcMemHandle bytes, offset of the tensor in the allocation, its byte size)."""
    import torch
    if not isinstance(tensor, torch.Tensor) or not tensor.is_cuda:
        raise ValueError("register_cuda_tensor takes a CUDA torch.Tensor")
    if not tensor.is_contiguous():
        raise ValueError("register_cuda_tensor takes a contiguous tensor")
    shared = tensor.untyped_storage()._share_cuda_()
    device, handle, storage_offset_bytes = shared[0], _ipc_mem_handle(bytes(shared[1])), shared[3]
    offset = int(storage_offset_bytes) + tensor.storage_offset() * tensor.element_size()
    return int(device), handle, offset, tensor.numel() * tensor.element_size()


def _ipc_mem_handle(handle):
    """The 64-byte cudaIpcMemHandle_t in what `_share_cuda_` gives: the handle itself (older
    PyTorch), or PyTorch's versioned shareable handle, a version byte and a kind byte before it
    ('c': memory from cudaMalloc, whose handle follows; 'e': an expandable segment, which a
    cudaIpcMemHandle cannot name)."""
    if len(handle) == 64:
        return handle
    if len(handle) == 66 and handle[1:2] == b"c":
        return handle[2:]
    if len(handle) >= 2 and handle[1:2] == b"e":
        raise ValueError("this tensor lives in an expandable segment (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True), "
                         "which CUDA IPC by cudaIpcMemHandle cannot share")
    raise ValueError(f"unknown CUDA IPC handle from PyTorch: {len(handle)} bytes, expected 64, or 66 of kind 'c'")


class CudaRegion:
    """byte_size bytes of device memory on `device`, registered with the daemon as `name`, with the
    interprocess event the daemon waits on before it reads or writes the region."""

    def __init__(self, client, device, byte_size, name=None):
        import torch
        if byte_size <= 0:
            raise ValueError(f"byte_size = {byte_size}, expected > 0")
        self.client = client
        self.device = torch.device(device)
        self.name = name or "cuda-" + secrets.token_hex(8)
        self.size = int(byte_size)
        self._registered = False
        self.buffer = torch.empty(self.size, dtype=torch.uint8, device=self.device)
        self.event = torch.cuda.Event(interprocess=True)
        self.event.record()  # an IPC event has a handle once recorded
        client.register_cuda_tensor(self.name, self.buffer, event=self.event)
        self._registered = True

    def ref(self, offset, byte_size):
        return pb.SharedMemoryRef(region=self.name, offset=offset, byte_size=byte_size)

    def put(self, x):
        """Copies x's bytes (on the current stream, after the last take's copy) to the region's
        start; records the event."""
        n = x.numel() * x.element_size()
        self.event.wait()
        self.buffer[:n].view(x.dtype).view(x.shape).copy_(x)
        self.event.record()
        return n

    def take(self, dtype, shape, like):
        """The reply's slice as a new tensor of like's dtype (the region is reused by the next call)."""
        import torch
        n = 1
        for s in shape:
            n *= int(s)
        t = self.buffer[:n * (torch.finfo(dtype).bits // 8)].view(dtype).view(tuple(shape))
        t = t.to(dtype=like.dtype, copy=True)
        self.event.record()  # the next put, on whichever stream, waits for this copy
        return t

    def close(self):
        if self._registered:
            self._registered = False
            unregister_quietly(self.client, self.name)

    def __del__(self):
        self.close()


class CudaArenas:
    """The client's CUDA IPC regions by device: a RegionPool each (one region per call in flight,
    grown on demand), or False for a device whose region the daemon refused. `lock` guards `pools`."""

    def __init__(self, client):
        self.client = client
        self.lock = threading.Lock()
        self.pools = {}  # device index -> RegionPool, or False when refused

    def pool(self, device):
        return RegionPool(lambda size: CudaRegion(self.client, device, size))

    def close(self):
        with self.lock:
            pools, self.pools = list(self.pools.values()), {}
        for p in pools:
            if p:
                p.close()
