// CUDA and cuBLAS errors as absl::Status, through one macro that records the expression, file and
// line. Out-of-memory becomes RESOURCE_EXHAUSTED; errors that leave the context unusable (an
// illegal address, a launch failure) become INTERNAL and mark the process's CUDA state broken,
// which turns health NOT_SERVING so the orchestrator restarts the daemon.
//   CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, stream));
//   CUDA_RETURN_IF_ERROR(kernels::launch_swiglu_fwd(gu, h, tokens, f, stream));
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include "absl/status/status.h"

namespace blockd::cuda {

absl::Status CallStatus(cudaError_t e, const char* expr, const char* file, int line);
absl::Status CallStatus(cublasStatus_t e, const char* expr, const char* file, int line);
// True once a sticky error was seen: every later CUDA call in this process would fail.
bool CudaBroken();

}  // namespace blockd::cuda

#define CUDA_RETURN_IF_ERROR(expr)                                                              \
  do {                                                                                          \
    ::absl::Status blockd_cuda_status_ = ::blockd::cuda::CallStatus((expr), #expr, __FILE__, __LINE__); \
    if (!blockd_cuda_status_.ok()) return blockd_cuda_status_;                                  \
  } while (0)
