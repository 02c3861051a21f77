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
raises instead of falling back, `"grpc"` never uses them. A contiguous tensor already in the wire
dtype skips the region: the caching allocator's segment it lives in is registered (CudaSegments)
and the daemon reads it, and writes the reply into a new tensor, where they are.
"""
import collections
import ctypes
import secrets
import threading
import time

from blockd.errors import BlockdError, ResourceExhaustedError
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


_driver_lib = None


def _driver():
    """The CUDA driver library (libcuda.so.1, present wherever a CUDA tensor is), for the two calls
    torch does not expose: an allocation's range and its IPC handle."""
    global _driver_lib
    if _driver_lib is None:
        lib = ctypes.CDLL("libcuda.so.1")
        lib.cuMemGetAddressRange_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t),
                                                ctypes.c_uint64]
        lib.cuIpcGetMemHandle.argtypes = [ctypes.c_char_p, ctypes.c_uint64]
        _driver_lib = lib
    return _driver_lib


def segment_of(tensor):
    """(base address, byte size, cudaIpcMemHandle bytes) of the allocation (the caching
    allocator's segment) holding a CUDA tensor's memory, or None when CUDA IPC cannot name it (an
    expandable segment, or no driver library)."""
    import torch
    try:
        lib = _driver()
    except OSError:
        return None
    with torch.cuda.device(tensor.device):  # the device's primary context, current for the driver calls
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        if lib.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), tensor.data_ptr()) != 0:
            return None
        handle = ctypes.create_string_buffer(64)
        if lib.cuIpcGetMemHandle(handle, base.value) != 0:
            return None
    return base.value, size.value, handle.raw


class CudaSegments:
    """The caching allocator's segments that calls' tensors live in, registered with the daemon as
    regions (no event: a call synchronises its stream first), so a contiguous tensor already in
    the wire dtype is read where it is and the reply written into a new tensor where it is: no
    copy into or out of a region. At most `most` registrations (the daemon allows 16 regions per
    identity by default; the copying regions take the rest). When full, only a registration idle
    for `idle_s` (a freed segment, or tensors no longer used) is unregistered to make room, never
    one a call in flight names: a working set of more segments than that copies the rest through
    regions instead of registering and unregistering every call. A segment freed and allocated
    again (another handle at the same address) is registered anew. `refs` returns None whenever it
    cannot name every tensor, and the caller copies through a CudaRegion instead."""

    def __init__(self, client, most=12, idle_s=1.0):
        self.client = client
        self.most = most
        self.idle_s = idle_s
        self.lock = threading.Lock()
        self.entries = collections.OrderedDict()  # (device, base) -> _Segment, least recently used first
        self.off = False  # the daemon refused a segment for good

    def refs(self, tensors):
        """SharedMemoryRefs naming each tensor's bytes, their segments pinned against eviction
        until `release(refs)`; None when some tensor cannot be named."""
        found = []
        for t in tensors:
            seg = segment_of(t)
            if seg is None:
                return None
            found.append((t, seg))
        taken, refs = [], []
        with self.lock:
            for t, (base, size, handle) in found:
                entry = self._entry(t.device.index, base, size, handle)
                if entry is None:
                    self._release(taken)
                    return None
                entry.users += 1
                taken.append(entry)
                refs.append(pb.SharedMemoryRef(region=entry.name, offset=t.data_ptr() - base,
                                               byte_size=t.numel() * t.element_size()))
        return refs, taken

    def release(self, taken):
        with self.lock:
            self._release(taken)

    @staticmethod
    def _release(taken):
        now = time.monotonic()
        for entry in taken:
            entry.users -= 1
            entry.last_used = now

    def forget(self, names):
        """Drops registrations the daemon no longer has (expired by its --shared_memory_ttl)."""
        with self.lock:
            for key in [k for k, e in self.entries.items() if e.name in names]:
                del self.entries[key]

    def _entry(self, device, base, size, handle):
        key = (device, base)
        entry = self.entries.get(key)
        if entry is not None and entry.handle == handle and entry.size == size:
            self.entries.move_to_end(key)
            return entry
        if self.off:
            return None
        if entry is not None:  # freed and allocated again: the old registration names dead memory
            if entry.users:
                return None
            self._unregister(key)
        while len(self.entries) >= self.most:
            stale = time.monotonic() - self.idle_s
            idle = next((k for k, e in self.entries.items() if not e.users and e.last_used < stale), None)
            if idle is None:
                return None
            self._unregister(idle)
        entry = _Segment("seg-" + secrets.token_hex(8), size, handle)
        req = pb.RegisterSharedMemoryRequest(name=entry.name, cuda_ipc_handle=handle, device=device, byte_size=size)
        try:
            self.client._unary("RegisterSharedMemory", req, None)
        except ResourceExhaustedError:
            return None  # the identity's region limit: copy through a region this time
        except BlockdError:
            self.off = True
            return None
        self.entries[key] = entry
        return entry

    def _unregister(self, key):
        unregister_quietly(self.client, self.entries.pop(key).name)

    def close(self):
        with self.lock:
            keys = list(self.entries)
            for k in keys:
                self._unregister(k)


class _Segment:
    __slots__ = ("name", "size", "handle", "users", "last_used")

    def __init__(self, name, size, handle):
        self.name, self.size, self.handle, self.users = name, size, handle, 0
        self.last_used = time.monotonic()


class CudaArenas:
    """The client's CUDA IPC regions by device: a RegionPool each (one region per call in flight,
    grown on demand), or False for a device whose region the daemon refused; and the segments its
    tensors are read and written in place from. `lock` guards `pools`."""

    def __init__(self, client):
        self.client = client
        self.lock = threading.Lock()
        self.pools = {}  # device index -> RegionPool, or False when refused
        self.segments = CudaSegments(client)

    def pool(self, device):
        return RegionPool(lambda size: CudaRegion(self.client, device, size))

    def close(self):
        with self.lock:
            pools, self.pools = list(self.pools.values()), {}
        for p in pools:
            if p:
                p.close()
        self.segments.close()
