// Device memory of this process registered with a blockd on the same GPU by CUDA IPC, so Forward
// and Backward tensors that already live on the GPU travel device to device instead of through
// host memory or gRPC messages (ARCHITECTURE.md, "Shared-memory tensors"; the daemon needs the
// CUDA backend and --allow_shared_memory). The C++ counterpart of the Python client's CudaRegion.
//
// Create() allocates the region with cudaMalloc (CUDA IPC cannot name memory from a stream-ordered
// pool), makes an interprocess event, and registers both. Put() copies a device tensor into the
// region on the caller's stream and records the event there; the daemon waits on that event
// before it reads the region and before it writes the reply into it, and synchronises before it
// answers, so the reply is in the region when the call returns.
//
//   ASSIGN_OR_RETURN(auto region, CudaIpcRegion::Create(client.get(), /*device=*/0, 2 * bytes));
//   v1::ForwardRequest req;  ...
//   ASSIGN_OR_RETURN(*req.mutable_input(), region->Put(0, v1::DTYPE_BFLOAT16, {8, 2048, 1024}, x_dev, bytes, stream));
//   *req.mutable_output_shared_memory() = region->Ref(0, bytes);   // in place: read before written
//   ASSIGN_OR_RETURN(v1::ForwardResponse y, client->Forward(req));
//   RETURN_IF_ERROR(region->Get(y.output(), y_dev, bytes, stream));
//
// A daemon on another GPU or host, or on the CPU backend, refuses the registration (Create fails):
// fall back to SharedMemoryRegion or inline tensors. Built only with the CUDA backend
// (blockd_client_cuda).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "blockd/v1/block_service.pb.h"
#include "client/client.h"

namespace blockd {

class CudaIpcRegion {
 public:
  // `device`: this process's CUDA device, which must be the daemon's device of that index;
  // `name`: the region's name on the daemon ("" picks "cuda-<random>").
  static absl::StatusOr<std::unique_ptr<CudaIpcRegion>> Create(Client* client, int device, int64_t byte_size,
                                                               std::string name = "");
  ~CudaIpcRegion();  // unregisters (best effort), then frees the memory and the event
  CudaIpcRegion(const CudaIpcRegion&) = delete;
  CudaIpcRegion& operator=(const CudaIpcRegion&) = delete;

  const std::string& name() const { return name_; }
  int device() const { return device_; }
  int64_t size() const { return size_; }
  void* data() { return data_; }

  // A reference to [offset, offset + byte_size) of this region.
  v1::SharedMemoryRef Ref(int64_t offset, int64_t byte_size) const;
  // Copies `bytes` bytes of device memory at `src` to `offset` on `stream`, records the region's
  // event there, and returns a Tensor naming them. INVALID_ARGUMENT when they do not fit.
  absl::StatusOr<v1::Tensor> Put(int64_t offset, v1::DType dtype, const std::vector<int64_t>& shape, const void* src,
                                 int64_t bytes, cudaStream_t stream);
  // Copies a reply tensor's slice of this region to device memory at `dst` (room for `capacity`
  // bytes) on `stream`, then records the event there: the next call's writes into the region
  // wait for this copy. DATA_LOSS when the reply names no slice of this region or does not fit.
  absl::Status Get(const v1::Tensor& t, void* dst, int64_t capacity, cudaStream_t stream);
  // Records the event on `stream`: for a caller that writes data() itself before a call.
  absl::Status Record(cudaStream_t stream);

 private:
  CudaIpcRegion() = default;
  Client* client_ = nullptr;
  std::string name_;
  int device_ = 0;
  int64_t size_ = 0;
  char* data_ = nullptr;
  cudaEvent_t event_ = nullptr;
  bool registered_ = false;
};

namespace cuda_client {

// INTERNAL naming the CUDA call that failed; clears the error for this thread's next CUDA call.
absl::Status CudaError(absl::string_view what, cudaError_t e);

// Sets `device` current for a scope and restores the caller's.
class OnDevice {
 public:
  explicit OnDevice(int device) {
    cudaGetDevice(&previous_);
    cudaSetDevice(device);
  }
  ~OnDevice() { cudaSetDevice(previous_); }
  OnDevice(const OnDevice&) = delete;
  OnDevice& operator=(const OnDevice&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace cuda_client
}  // namespace blockd
