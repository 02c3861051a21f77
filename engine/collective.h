// Collectives for replica groups: the engine's seam between a group's arithmetic (average the
// gradients, broadcast rank 0's state, sum a scalar) and the library that moves the bytes. Gloo
// (host memory over TCP, engine/collective_gloo.h) serves CPU blocks; NCCL (engine/collective_nccl.h,
// built with CUDA) serves CUDA blocks and also reduces their gradients in place in device memory.
// The engine never sees a library type: a collective id is opaque bytes that the provider of one
// backend makes and parses, and a device stream is a void*.
//
//   CollectiveProvider& gloo = ...;                               // the server made it at start
//   ASSIGN_OR_RETURN(std::string id, gloo.NewId(absl::Minutes(10)));   // on rank 0's daemon
//   // every member, at once, with the same id:
//   ASSIGN_OR_RETURN(std::unique_ptr<Collective> c, gloo.Connect(id, rank, world_size, terms, timeout, -1));
//   RETURN_IF_ERROR(c->AllReduceSum(grads.data(), grads.size()));   // ABORTED if a member is gone
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace blockd {

// One member's end of a connected group. Every call is collective: all members make the same
// calls in the same order with the same sizes. A call that fails (a member died, stalled past the
// timeout, or called something else) answers ABORTED, and the Collective is broken for good: the
// members form a new group. Calls are not thread-safe; the group serialises them.
class Collective {
 public:
  virtual ~Collective() = default;
  virtual absl::string_view backend() const = 0;  // "gloo", "nccl"
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  // In place: every member ends with the element-wise sum, bitwise the same on every member.
  virtual absl::Status AllReduceSum(float* data, size_t n) = 0;
  virtual absl::Status AllReduceSum(double* data, size_t n) = 0;
  // In place: every member ends with `root`'s bytes.
  virtual absl::Status Broadcast(void* data, size_t bytes, int root) = 0;
  // True when the members' gradients can be reduced where they live on a GPU (NCCL).
  virtual bool on_device() const { return false; }
  // In place on the device this member connected with, in stream order on `stream` (a
  // cudaStream_t): every member ends with the element-wise mean of `n` floats, bitwise the same on
  // every member. Returns once the result is complete. On failure the data is partly reduced.
  virtual absl::Status AllReduceMeanOnDevice(float* device_data, size_t n, void* stream) {
    (void)device_data, (void)n, (void)stream;
    return absl::UnimplementedError(absl::StrCat(backend(), " collectives reduce host memory only"));
  }
  // Averaging while a backward runs (as DDP's buckets do): queues the in-place mean of `n` floats
  // on the collective's own stream, ordered after the work queued on `after` (a cudaStream_t: the
  // block's backward) so far, and returns once queued, so that it runs beside what `after` runs
  // next. WaitQueued returns once every call queued so is complete. The same members' failures as
  // AllReduceMeanOnDevice, answered by either call.
  virtual absl::Status QueueAllReduceMeanOnDevice(float* device_data, size_t n, void* after) {
    (void)device_data, (void)n, (void)after;
    return absl::UnimplementedError(absl::StrCat(backend(), " collectives reduce host memory only"));
  }
  virtual absl::Status WaitQueued() { return absl::OkStatus(); }
  // Payload bytes of the calls above so far (a 1 MiB all-reduce counts 1 MiB), for metrics.
  virtual int64_t payload_bytes() const = 0;
};

// Makes collective ids and connects members for one backend.
class CollectiveProvider {
 public:
  virtual ~CollectiveProvider() = default;
  virtual absl::string_view backend() const = 0;
  // A new id, on the daemon that will be rank 0; what its rendezvous needs (Gloo: a small
  // key-value store) is hosted here until the group connects or `ttl` passes.
  virtual absl::StatusOr<std::string> NewId(absl::Duration ttl) = 0;
  // Connects this member; returns when all `world_size` members connected. `terms` is what every
  // member must agree on (world size, block ids and configs), as words: rank 0 publishes its own,
  // the others compare theirs, and every member learns whether all agreed before any connects.
  // INVALID_ARGUMENT for an id this backend cannot parse or a rank someone already took;
  // FAILED_PRECONDITION naming both terms when a member's differ from rank 0's; ABORTED when the
  // others did not all come within `timeout`, which also bounds every later call of the group.
  // `device` is the GPU holding the member's blocks for a device backend (NCCL), -1 for host ones.
  virtual absl::StatusOr<std::unique_ptr<Collective>> Connect(const std::string& id, int rank, int world_size,
                                                              const std::string& terms, absl::Duration timeout,
                                                              int device) = 0;
  // Drops what expired ids still host; called by the server's housekeeping.
  virtual void Sweep() {}
};

}  // namespace blockd
