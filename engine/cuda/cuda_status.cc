#include "engine/cuda/cuda_status.h"

#include <atomic>

#include "absl/strings/str_cat.h"
#include "base/log.h"

namespace blockd::cuda {
namespace {

std::atomic<bool> broken{false};

bool IsSticky(cudaError_t e) {
  switch (e) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorAssert:
    case cudaErrorECCUncorrectable:
    case cudaErrorUnknown:
      return true;
    default:
      return false;
  }
}

}  // namespace

bool CudaBroken() { return broken.load(); }

absl::Status CallStatus(cudaError_t e, const char* expr, const char* file, int line) {
  if (e == cudaSuccess) return absl::OkStatus();
  const std::string where = absl::StrCat(expr, " at ", file, ":", line, ": ", cudaGetErrorName(e), " (",
                                         cudaGetErrorString(e), ")");
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();  // not sticky: clear it so later calls are unaffected
    return absl::ResourceExhaustedError(absl::StrCat("out of device memory: ", where));
  }
  if (IsSticky(e)) {
    if (!broken.exchange(true)) BLOCKD_LOG(kError, "sticky CUDA error, the device is unusable: ", where);
    return absl::InternalError(absl::StrCat("the CUDA device failed and blockd must restart: ", where));
  }
  return absl::InternalError(absl::StrCat("CUDA call failed: ", where));
}

absl::Status CallStatus(cublasStatus_t e, const char* expr, const char* file, int line) {
  if (e == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  const std::string where = absl::StrCat(expr, " at ", file, ":", line, ": ", cublasLtGetStatusName(e), " (",
                                         cublasLtGetStatusString(e), ")");
  if (e == CUBLAS_STATUS_ALLOC_FAILED) return absl::ResourceExhaustedError(absl::StrCat("out of device memory: ", where));
  if (e == CUBLAS_STATUS_EXECUTION_FAILED) {
    // Usually the consequence of a sticky error; check whether the context is still usable.
    const cudaError_t last = cudaDeviceSynchronize();
    if (IsSticky(last)) return CallStatus(last, expr, file, line);
  }
  return absl::InternalError(absl::StrCat("cuBLAS call failed: ", where));
}

}  // namespace blockd::cuda
