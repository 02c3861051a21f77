"""Shared-memory tensors for a client on the daemon's host (blockd --allow_shared_memory).

A region is a POSIX shared-memory object (/dev/shm/blockd-<32 hex digits>) mapped here and
registered with the daemon, which holds it open; its name is unlinked right after registering, so
a client that dies leaves nothing in /dev/shm, and the daemon lets go at unregister or after the
region's TTL. Forward, Backward and InferStep then carry a reference to a slice instead of bytes,
and the daemon writes the reply into the region (in place: the input's slice).

    region = SharedMemoryRegion(client, 64 << 20)      # raises if the daemon cannot use it
    client.register_shared_memory / unregister_shared_memory / list_shared_memory

`Client(transport="auto")` (the default) uses such regions by itself (a RegionPool: one per call
in flight) when the daemon allows shared memory and can open the client's object (same host);
`transport="grpc"` never does, and `transport="shared_memory"` raises instead of falling back.
"""
import concurrent.futures
import mmap
import os
import secrets
import threading

import numpy as np

from blockd.v1 import block_service_pb2 as pb

SHM_DIR = "/dev/shm"
TRANSPORTS = ("auto", "grpc", "shared_memory", "cuda_ipc")


# Copies of tens of MB over a few threads (numpy lets go of the GIL while it copies): one core
# copies a 34 MB activation in ~6 ms on the GPU host, four in ~1.5-1.8 ms (bench/probe/copy_probe.py;
# the C++ side is base/parallel_copy.h).
_COPY_THREADS = 4
_COPY_MIN_SLICE = 2 << 20
_copy_pool = None  # made on first use
_copy_pool_lock = threading.Lock()


def _forget_copy_pool():  # a forked child has none of its parent's threads: it makes its own
    global _copy_pool, _copy_pool_lock
    _copy_pool, _copy_pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_copy_pool)


def parallel_copy(dst, src):
    """Copies the uint8 array src into dst (same length), in up to _COPY_THREADS slices."""
    global _copy_pool
    n = len(src)
    slices = min(_COPY_THREADS, n // _COPY_MIN_SLICE)
    if slices <= 1:
        np.copyto(dst, src)
        return
    with _copy_pool_lock:
        if _copy_pool is None:
            _copy_pool = concurrent.futures.ThreadPoolExecutor(_COPY_THREADS - 1, thread_name_prefix="blockd-copy")
        pool = _copy_pool
    step = -(-n // slices)
    helped = [pool.submit(np.copyto, dst[i:i + step], src[i:i + step]) for i in range(step, n, step)]
    np.copyto(dst[:step], src[:step])
    for f in helped:
        f.result()


def unregister_quietly(client, name):
    try:
        client.unregister_shared_memory(name)
    except Exception:  # the daemon may be gone; its TTL frees the region then
        pass


class SharedMemoryRegion:
    """byte_size bytes of a new POSIX shared-memory object, mapped and registered as `name`."""

    def __init__(self, client, byte_size, name=None):
        if byte_size <= 0:
            raise ValueError(f"byte_size = {byte_size}, expected > 0")
        self.client = client
        self.key = "/blockd-" + secrets.token_hex(16)
        self.name = name or "region-" + secrets.token_hex(8)
        self.size = int(byte_size)
        self._mm = None
        self._registered = False
        path = SHM_DIR + self.key
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, self.size)
            self._mm = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            client.register_shared_memory(self.name, self.key, self.size)
            self._registered = True
        finally:
            os.close(fd)
            os.unlink(path)  # the daemon holds the object open: nothing is left should we die
            if not self._registered and self._mm is not None:
                self._mm.close()
                self._mm = None

    def ref(self, offset, byte_size):
        return pb.SharedMemoryRef(region=self.name, offset=offset, byte_size=byte_size)

    def write(self, offset, data):
        """Copies `data` (bytes, or a C-contiguous numpy array's bytes) to `offset`."""
        src = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
        if offset < 0 or offset + src.nbytes > self.size:
            raise ValueError(f"{src.nbytes} bytes at {offset} do not fit region {self.name} of {self.size} bytes")
        dst = np.frombuffer(self._mm, dtype=np.uint8, count=src.nbytes, offset=offset)
        parallel_copy(dst, src)
        del dst  # the mapping cannot close while a view of it lives

    def _check(self, ref):
        if ref.region != self.name or ref.offset < 0 or ref.byte_size < 0 or ref.offset + ref.byte_size > self.size:
            raise ValueError(f"the reply names region {ref.region!r} [{ref.offset}, +{ref.byte_size}), "
                             f"not a slice of region {self.name!r} of {self.size} bytes")

    def read(self, ref):
        """The bytes of a slice of this region that a reply names (one copy)."""
        self._check(ref)
        return self._mm[ref.offset:ref.offset + ref.byte_size]

    def read_array(self, ref):
        """As read, into a new uint8 array (copied over several threads when large)."""
        self._check(ref)
        out = np.empty(ref.byte_size, dtype=np.uint8)
        src = np.frombuffer(self._mm, dtype=np.uint8, count=ref.byte_size, offset=ref.offset)
        parallel_copy(out, src)
        del src  # the mapping cannot close while a view of it lives
        return out

    def close(self):
        if self._registered:
            self._registered = False
            unregister_quietly(self.client, self.name)
        if self._mm is not None:
            self._mm.close()
            self._mm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


class RegionPool:
    """Regions for activation calls, one per call in flight: a call leases one (`lease`), uses it
    alone and gives it back, so calls from several threads move their tensors at once. At most
    `most` regions; a lease waits for one beyond that. A region too small for a call is replaced by
    one of twice its size (at least the call's, at least 1 MiB). `make(byte_size)` creates and
    registers a region (it raises when the daemon cannot use it); closed regions are unregistered."""

    def __init__(self, make, most=8):
        self._make = make
        self._most = most
        self._cv = threading.Condition()
        self._idle = []
        self._count = 0  # regions leased or idle, and leases about to make one
        self._closed = False

    def lease(self, nbytes):
        with self._cv:
            while not self._closed and not self._idle and self._count >= self._most:
                self._cv.wait()
            if self._closed:
                raise ValueError("the client is closed")
            region = self._idle.pop() if self._idle else None
            if region is None:
                self._count += 1
        return _Lease(self, region, nbytes)

    def _give_back(self, region):
        with self._cv:
            if region is None or self._closed:
                self._count -= 1
            else:
                self._idle.append(region)
                region = None
            self._cv.notify()
        if region is not None:
            region.close()

    def close(self):
        with self._cv:
            self._closed = True
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            self._cv.notify_all()
        for region in idle:
            region.close()


class _Lease:
    """A region of a RegionPool held by one call (a context manager); `region` fits nbytes."""

    def __init__(self, pool, region, nbytes):
        self._pool = pool
        self.region = region
        self._nbytes = nbytes

    def __enter__(self):
        try:
            if self.region is None or self.region.size < self._nbytes:
                self.renew()
        except BaseException:
            self._pool._give_back(None)
            raise
        return self

    def renew(self):
        """Replaces the region by a new one (grown, or after the daemon forgot it past its TTL)."""
        old, self.region = self.region, None
        if old is not None:
            old.close()
        grown = 0 if old is None else 2 * old.size if old.size < self._nbytes else old.size
        self.region = self._pool._make(max(self._nbytes, 1 << 20, grown))

    def __exit__(self, *exc):
        self._pool._give_back(self.region)
