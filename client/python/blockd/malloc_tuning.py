"""Host allocator settings for a client process that moves activations of tens of MB per call: the
Python counterpart of base/malloc_tuning.h, which the daemon and the C++ benchmarks apply.

With glibc's defaults every allocation over 32 MB is a fresh mmap, so each activation's bytes
object, protobuf string and reply buffer is faulted in page by page on every call: a 34 MB
`tobytes()` plus `bytearray()` took 196 ms on the build VM (gVisor), 5.3 ms with these settings,
which keep large buffers in one brk heap and up to 1 GiB of freed memory for reuse.

`Client()` applies them once per process; BLOCKD_MALLOC_TUNING=0 in the environment leaves glibc's
defaults (for comparisons, or a process that wants its freed memory back at once). Other C
libraries (no `mallopt`) are left as they are.
"""
import ctypes
import ctypes.util
import os
import threading

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8
_KEEP = 1 << 30
_lock = threading.Lock()
_applied = None


def tune_malloc_for_large_buffers():
    """Applies the settings (once per process); True when glibc took them all."""
    global _applied
    with _lock:
        if _applied is not None:
            return _applied
        _applied = False
        if os.environ.get("BLOCKD_MALLOC_TUNING") == "0":
            return False
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            return False
        mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        settings = ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, _KEEP), (_M_TRIM_THRESHOLD, _KEEP), (_M_TOP_PAD, 64 << 20))
        _applied = all([mallopt(k, v) == 1 for k, v in settings])
        return _applied
