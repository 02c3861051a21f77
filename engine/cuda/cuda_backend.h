// The CUDA backend: blocks resident in GPU memory with fp32 master weights, gradients and AdamW
// moments (and a bf16 copy of the weights in PRECISION_BF16), every op on the GPU (kernels/).
// This header has no CUDA types, so the server can select the backend without CUDA headers.
//   ASSIGN_OR_RETURN(std::unique_ptr<Backend> cuda, MakeCudaBackend());  // FAILED_PRECONDITION: no GPU
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "engine/backend.h"

namespace blockd {

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend();

}  // namespace blockd
