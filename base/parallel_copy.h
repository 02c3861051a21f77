// ParallelCopy: memcpy of a large host buffer spread over a few threads. One core copies ~6 GB/s
// on the GPU host (gVisor; bench/probe/copy_probe.py: a 34 MB activation in 6.0 ms), four ~20-25
// GB/s (1.4-1.8 ms). Activations move through host memory at several points (a client's put into
// its shared-memory region, a request's bytes into the daemon's pinned staging), each of tens of
// MB, so each such copy takes this.
//
// The copy is cut into slices of at least kMinSlice bytes, at most kMaxThreads of them; the caller
// copies slices itself while up to kMaxThreads - 1 pool threads (started on first use, shared by
// every caller) take others. A caller never waits for a slice no one has started: it takes any
// left over itself, so a busy pool only makes the copy as slow as one memcpy.
#pragma once

#include <cstddef>

#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace blockd {

inline constexpr size_t kParallelCopyMinSlice = size_t{2} << 20;
inline constexpr int kParallelCopyMaxThreads = 4;

// Copies n bytes from src to dst (which do not overlap).
void ParallelCopy(void* dst, const void* src, size_t n);

// Copies n bytes, starting `from` bytes into the concatenation of `pieces` (a message's bytes as
// gRPC received them, proto/tensor_wire.h), to dst. The caller checked that they are there.
void ParallelGather(void* dst, absl::Span<const absl::string_view> pieces, size_t from, size_t n);

}  // namespace blockd
