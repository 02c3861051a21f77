// The CUDA backend: blocks resident in GPU memory with fp32 master weights, gradients and AdamW
// moments (and a bf16 copy of the weights in PRECISION_BF16), every op on the GPU (kernels/).
// This header has no CUDA types, so the server can select the backend without CUDA headers.
//   ASSIGN_OR_RETURN(std::unique_ptr<Backend> cuda, MakeCudaBackend());  // FAILED_PRECONDITION: no GPU
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/backend.h"

namespace blockd {

// Which attention kernels bf16 blocks run (--attention): cuDNN's fused flash attention when it
// loads and accepts the block's shape, else blockd's own (auto); cuDNN or fail (cudnn); blockd's
// own (native). FP32 and TF32 blocks always run blockd's own. See engine/cuda/attention_dispatch.h.
enum class AttentionMode { kAuto, kCudnn, kNative };
absl::StatusOr<AttentionMode> ParseAttentionMode(absl::string_view name);  // "auto", "cudnn", "native"
absl::string_view AttentionModeName(AttentionMode mode);

struct CudaBackendOptions {
  AttentionMode attention = AttentionMode::kAuto;
};

// FAILED_PRECONDITION without a usable GPU, or with --attention=cudnn where cuDNN does not load.
absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(const CudaBackendOptions& options = {});

// What a CUDA backend's bf16 blocks run ("cudnn" or "native") and why, for the log and
// GetServerInfo; each block's own choice is in Block::attention(). Empty for another backend.
AttentionInfo CudaAttentionSummary(const Backend& backend);

// For benchmarks: the high-water mark, in bytes, of device memory in use by a CUDA backend's
// transfers (its copy pool, device.h) on `device` since the last reset; -1 for another backend.
int64_t CudaTransferPoolPeakBytes(const Backend& backend, int device, bool reset);

}  // namespace blockd
