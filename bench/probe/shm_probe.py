# Probe: how fast the GPU host moves a 34 MB tensor from a POSIX shared-memory object to the GPU:
# pread into pinned memory, memcpy from a mapping, and DMA straight from a cudaHostRegister'ed mapping.
import ctypes, mmap, os, time
import torch
N = 34 * 1024 * 1024
fd = os.open("/dev/shm/blockd-probe", os.O_CREAT | os.O_RDWR, 0o600)
os.ftruncate(fd, N)
m = mmap.mmap(fd, N)
m.write(os.urandom(1 << 20) * 34)
pinned = torch.empty(N, dtype=torch.uint8).pin_memory()
dev = torch.empty(N, dtype=torch.uint8, device="cuda")
def t(f, k=5):
    f(); torch.cuda.synchronize(); best = 1e9
    for _ in range(k):
        a = time.perf_counter(); f(); torch.cuda.synchronize(); best = min(best, time.perf_counter() - a)
    return best * 1e3
buf = (ctypes.c_char * N).from_address(pinned.data_ptr())
mv = memoryview(buf).cast("B")
print("pread into pinned   %.2f ms" % t(lambda: os.preadv(fd, [mv], 0)))
src = torch.frombuffer(m, dtype=torch.uint8)
print("memcpy mmap->pinned %.2f ms" % t(lambda: pinned.copy_(src)))
print("H2D from pinned     %.2f ms" % t(lambda: dev.copy_(pinned, non_blocking=True)))
print("D2H to pinned       %.2f ms" % t(lambda: pinned.copy_(dev, non_blocking=True)))
print("pwrite from pinned  %.2f ms" % t(lambda: os.pwritev(fd, [mv], 0)))
cudart = torch.cuda.cudart()
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
r = cudart.cudaHostRegister(addr, N, 0)
print("cudaHostRegister on the mapping:", r)
if int(r) == 0:
    reg = torch.from_numpy(__import__("numpy").frombuffer(m, dtype="uint8"))
    print("H2D from registered mapping %.2f ms" % t(lambda: dev.copy_(reg, non_blocking=True)))
    print("D2H to registered mapping   %.2f ms" % t(lambda: reg.copy_(dev, non_blocking=True)))
    # another process truncates: does DMA still run (pages pinned) without a fault?
    os.ftruncate(fd, 4096)
    try:
        print("H2D after truncate %.2f ms" % t(lambda: dev.copy_(reg, non_blocking=True), 1))
    except Exception as e:
        print("after truncate:", e)
    print("cudaHostUnregister:", cudart.cudaHostUnregister(addr))
os.unlink("/dev/shm/blockd-probe")
