// Host allocator settings for a process that moves activations of tens of MB per call.
//
// With glibc's defaults every allocation over 32 MB is a fresh mmap, and a freed thread-arena heap
// goes back to the kernel, so each large gRPC message, proto string and reply buffer is faulted in
// page by page (and zeroed) on every call: on the build VM a 35 MB malloc + memset + memcpy took
// 93 ms with 17,000 page faults, 18 ms with 427 after these settings. They keep large buffers in
// one brk heap (one arena; glibc's per-thread caches still serve small allocations without its
// lock) and keep up to 1 GiB of freed memory for reuse instead of trimming it.
//
//   int main(int argc, char** argv) { blockd::TuneMallocForLargeBuffers(); ... }
//
// Call it first in main, before threads allocate (the daemon, the benchmarks); the C++ Client's
// first Connect and the Python Client (blockd/malloc_tuning.py) apply it too. BLOCKD_MALLOC_TUNING=0
// in the environment leaves glibc's defaults (for comparisons). Returns whether the settings were
// applied.
#pragma once

namespace blockd {

bool TuneMallocForLargeBuffers();

}  // namespace blockd
