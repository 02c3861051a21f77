// Forward and Backward of tensors in this process's device memory, with the transport chosen by
// itself (the C++ side of the Python client's transport="auto" for CUDA tensors), as the
// client's ClientOptions::transport says:
// - kAuto: by CUDA IPC when the daemon opens this process's memory (same host and GPU, CUDA
//   backend, --allow_shared_memory): read and written in place, the allocations (cudaMalloc) that
//   the tensor and `out` live in registered once as regions (at most 12; when full only one idle
//   for a second makes room), the stream synchronised before the call; or, for memory CUDA IPC
//   cannot name (cudaMallocAsync pools) or beyond those 12, copied through a CudaIpcRegion of the
//   device (one per call in flight, at most 8, reused). Otherwise, for good, through host memory:
//   the tensor is copied to the host and sent as Client::Forward sends an inline tensor (through
//   shared memory when the daemon on this host allows it, else inside the message), and the reply
//   copied back.
// - kSharedMemory: by CUDA IPC, or the call fails saying why not.
// - kGrpc: through host memory and the messages.
// The tensor's dtype and shape are the request's tensor's (`input` of a Forward, `grad_output` of
// a Backward; their bytes are ignored). The reply has the same dtype and shape (a span maps hidden
// states to hidden states) and lands in `out`, on the tensor's device. Everything runs in
// `stream`'s order: the tensor is read after the work queued there before the call, and the
// reply is in `out` for the work queued there after it.
//
//   CudaActivations calls(client.get());
//   v1::ForwardRequest req;  ...  req.mutable_input()->set_dtype(v1::DTYPE_BFLOAT16);  (shape too)
//   ASSIGN_OR_RETURN(v1::ForwardResponse y, calls.Forward(req, x_dev, y_dev, stream));
//
// An allocation freed while registered stays mapped by the daemon (its memory is not returned to
// the device) until a new allocation at its address replaces the registration, room is made for
// another, or this object is destroyed; keep buffers across calls, as a training loop does.
//
// Built only with the CUDA backend (blockd_client_cuda).
#pragma once

#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/synchronization/mutex.h"
#include "blockd/v1/block_service.pb.h"
#include "client/client.h"
#include "client/cuda_ipc_region.h"
#include "client/region_pool.h"

namespace blockd {

class CudaActivations {
 public:
  explicit CudaActivations(Client* client) : client_(client) {}  // `client` outlives this
  ~CudaActivations();  // unregisters the regions
  CudaActivations(const CudaActivations&) = delete;
  CudaActivations& operator=(const CudaActivations&) = delete;

  // `x`, `out`: device memory of one device, each holding the tensor's bytes (they may be the same).
  absl::StatusOr<v1::ForwardResponse> Forward(v1::ForwardRequest request, const void* x, void* out,
                                              cudaStream_t stream, const CallOptions& call = {});
  absl::StatusOr<v1::BackwardResponse> Backward(v1::BackwardRequest request, const void* grad_output,
                                                void* grad_input, cudaStream_t stream, const CallOptions& call = {});

  // Whether calls with tensors on `device` go by CUDA IPC: true once a region of it registered,
  // false once the daemon refused one (calls go through host memory), unset before either.
  std::optional<bool> UsesCudaIpc(int device) const;

  static constexpr int kMaxAllocations = 12;  // the daemon allows 16 regions per identity by default

 private:
  using Pool = RegionPool<CudaIpcRegion>;
  // Checks the request and the pointers, then sends it the first way that works: in place,
  // through a region, through host memory. `n`: the tensor's (and the reply's) bytes.
  template <class Req, class Resp>
  absl::StatusOr<Resp> Call(Req request, const void* x, void* out, cudaStream_t stream, const CallOptions& call);
  // nullopt when this way is not open for this call (nothing was sent); else the call's outcome.
  template <class Req, class Resp>
  std::optional<absl::StatusOr<Resp>> CallInPlace(Req& request, int device, const void* x, void* out, int64_t n,
                                                  cudaStream_t stream, const CallOptions& call);
  template <class Req, class Resp>
  std::optional<absl::StatusOr<Resp>> CallThroughRegion(Req& request, int device, const void* x, void* out, int64_t n,
                                                        cudaStream_t stream, const CallOptions& call, bool insist);
  template <class Req, class Resp>
  absl::StatusOr<Resp> CallThroughHost(Req request, int device, const void* x, void* out, int64_t n,
                                       cudaStream_t stream, const CallOptions& call);
  Pool& PoolOf(int device);

  // A caller's allocation registered as a region (no event: the call synchronises its stream).
  struct Allocation {
    std::string name;
    int64_t size = 0;
    std::string handle;  // its cudaIpcMemHandle_t: another one at the same base is another allocation
    int users = 0;       // calls in flight naming it
    absl::Time last_used;
  };
  struct InPlaceRefs {
    std::array<v1::SharedMemoryRef, 2> refs;  // the tensor's slice, out's slice
    std::vector<Allocation*> taken;           // held against eviction until ReleaseInPlace
  };
  // Slices naming `n` bytes at `x` and at `out` in their allocations, registered as needed;
  // nullopt when either cannot be named (the caller copies through a region).
  std::optional<InPlaceRefs> InPlace(int device, const void* x, const void* out, int64_t n);
  void ReleaseInPlace(const InPlaceRefs& in_place);
  void Forget(const InPlaceRefs& in_place);  // regions the daemon expired
  Allocation* AllocationOf(int device, uintptr_t base, int64_t size, const std::string& handle)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  Client* client_;
  mutable absl::Mutex mu_;
  std::map<int, std::unique_ptr<Pool>> pools_ ABSL_GUARDED_BY(mu_);  // by device
  std::map<int, bool> registered_ ABSL_GUARDED_BY(mu_);              // devices with a region made
  std::map<std::pair<int, uintptr_t>, Allocation> allocations_ ABSL_GUARDED_BY(mu_);  // by device, base
  bool allocations_off_ ABSL_GUARDED_BY(mu_) = false;  // the daemon refused one for good
};

}  // namespace blockd
