// A block on one GPU (see cuda_backend.h), and the activation type the CUDA backend passes around.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/device.h"
#include "kernels/convert.cuh"

namespace blockd::cuda {

// The conversion kernels' name (kernels/convert.cuh) for an activation's dtype on the wire.
inline kernels::WireType WireOf(DType t) {
  switch (t) {
    case DType::kFloat32: return kernels::kWireFloat32;
    case DType::kBFloat16: return kernels::kWireBFloat16;
    case DType::kFloat16: return kernels::kWireFloat16;
  }
  return kernels::kWireFloat32;
}

// [batch, seq, width] fp32 in device memory.
class CudaActivation : public Activation {
 public:
  CudaActivation(int device, int64_t batch, int64_t seq, int64_t width, DeviceBuffer data)
      : Activation(device, batch, seq, width), data_(std::move(data)) {}
  ~CudaActivation() override {
    if (ready_ != nullptr) cudaEventDestroy(ready_);
  }
  CudaActivation(const CudaActivation&) = delete;
  CudaActivation& operator=(const CudaActivation&) = delete;
  float* data() const { return data_.as<float>(); }
  // Hands the values' memory to a block that keeps them for its backward; data() is null after.
  DeviceBuffer ReleaseData() { return std::move(data_); }
  // Records, on `stream`, the point after the kernels that produce the values; a download waits for
  // that point only, not for what other calls queue on the stream afterwards.
  absl::Status MarkReady(cudaStream_t stream);
  cudaEvent_t ready() const { return ready_; }

 private:
  DeviceBuffer data_;
  cudaEvent_t ready_ = nullptr;
};

absl::StatusOr<std::unique_ptr<CudaActivation>> NewActivation(DeviceContext* dev, int64_t batch, int64_t seq,
                                                               int64_t width);

// Bytes of a block's weights, gradients, moments and its own workspaces (the attention's cuDNN
// workspace is each call's, from the device's pool: attention_dispatch.h).
size_t CudaBlockBytes(const BlockSpec& spec);
absl::StatusOr<std::unique_ptr<Block>> CreateCudaBlock(const BlockSpec& spec, DeviceContext* dev,
                                                       AttentionMode attention);

}  // namespace blockd::cuda
