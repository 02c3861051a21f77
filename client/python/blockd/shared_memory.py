"""Shared-memory tensors for a client on the daemon's host (blockd --allow_shared_memory).

A region is a POSIX shared-memory object (/dev/shm/blockd-<32 hex digits>) mapped here and
registered with the daemon, which holds it open; its name is unlinked right after registering, so
a client that dies leaves nothing in /dev/shm, and the daemon lets go at unregister or after the
region's TTL. Forward, Backward and InferStep then carry a reference to a slice instead of bytes,
and the daemon writes the reply into the region (in place: the input's slice).

    region = SharedMemoryRegion(client, 64 << 20)      # raises if the daemon cannot use it
    client.register_shared_memory / unregister_shared_memory / list_shared_memory

`Client(transport="auto")` (the default) uses one such region by itself when the daemon allows
shared memory and can open the client's object (same host); `transport="grpc"` never does, and
`transport="shared_memory"` raises instead of falling back.
"""
import mmap
import os
import secrets
import threading

from blockd.v1 import block_service_pb2 as pb

SHM_DIR = "/dev/shm"
TRANSPORTS = ("auto", "grpc", "shared_memory", "cuda_ipc")


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
        if offset < 0 or offset + len(data) > self.size:
            raise ValueError(f"{len(data)} bytes at {offset} do not fit region {self.name} of {self.size} bytes")
        self._mm[offset:offset + len(data)] = data

    def read(self, ref):
        """The bytes of a slice of this region that a reply names."""
        if ref.region != self.name or ref.offset < 0 or ref.byte_size < 0 or ref.offset + ref.byte_size > self.size:
            raise ValueError(f"the reply names region {ref.region!r} [{ref.offset}, +{ref.byte_size}), "
                             f"not a slice of region {self.name!r} of {self.size} bytes")
        return bytearray(self._mm[ref.offset:ref.offset + ref.byte_size])

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


class Arena:
    """The client's one region for activation calls, grown on demand. Calls through it are
    serialised by `lock` (one slice, reused in place for input and output)."""

    def __init__(self, client):
        self.client = client
        self.lock = threading.Lock()
        self.region = None

    def ensure(self, nbytes):
        if self.region is None or self.region.size < nbytes:
            size = max(nbytes, 1 << 20, 0 if self.region is None else 2 * self.region.size)
            old, self.region = self.region, None
            if old is not None:
                old.close()
            self.region = SharedMemoryRegion(self.client, size)
        return self.region

    def close(self):
        if self.region is not None:
            self.region.close()
            self.region = None
