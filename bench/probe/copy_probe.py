# Probe: how fast a client on the GPU host (gVisor) copies a 34 MB activation into, and out of, a
# mapped POSIX shared-memory object, with 1, 2, 4 and 8 threads each copying a slice (numpy
# releases the GIL for the copy). Says whether the shared-memory client should copy in parallel.
#   python3 bench/probe/copy_probe.py
import mmap, os, threading, time
import numpy as np
N = 34 * 1024 * 1024
fd = os.open("/dev/shm/blockd-copy-probe", os.O_CREAT | os.O_RDWR, 0o600)
os.ftruncate(fd, N)
m = mmap.mmap(fd, N)
shm = np.frombuffer(m, dtype=np.uint8)
heap = np.frombuffer(os.urandom(N), dtype=np.uint8).copy()
out = np.empty(N, dtype=np.uint8)
def copy(dst, src, k):
    step = (N + k - 1) // k
    ts = [threading.Thread(target=np.copyto, args=(dst[i:i + step], src[i:i + step])) for i in range(0, N, step)]
    for t in ts: t.start()
    for t in ts: t.join()
def best(f, n=7):
    f(); b = 1e9
    for _ in range(n):
        a = time.perf_counter(); f(); b = min(b, time.perf_counter() - a)
    return b * 1e3
for k in (1, 2, 4, 8):
    w = best(lambda: copy(shm, heap, k)); r = best(lambda: copy(out, shm, k))
    print(f"threads {k}: heap->shm {w:.2f} ms ({N / w / 1e6:.1f} GB/s), shm->heap {r:.2f} ms ({N / r / 1e6:.1f} GB/s)")
os.unlink("/dev/shm/blockd-copy-probe")
