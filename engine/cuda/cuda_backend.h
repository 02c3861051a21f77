// The CUDA backend: blocks resident in GPU memory with fp32 master weights, gradients and AdamW
// moments (and a bf16 copy of the weights in PRECISION_BF16), every op on the GPU (kernels/).
// This header has no CUDA types, so the server can select the backend without CUDA headers.
//   ASSIGN_OR_RETURN(std::unique_ptr<Backend> cuda, MakeCudaBackend());  // FAILED_PRECONDITION: no GPU
#pragma once

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "engine/backend.h"

namespace blockd {

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend();

// For benchmarks: the high-water mark, in bytes, of device memory in use by a CUDA backend's
// transfers (its copy pool, device.h) on `device` since the last reset; -1 for another backend.
int64_t CudaTransferPoolPeakBytes(const Backend& backend, int device, bool reset);

}  // namespace blockd
