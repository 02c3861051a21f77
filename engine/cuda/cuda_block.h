// A block on one GPU (see cuda_backend.h), and the activation type the CUDA backend passes around.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/cuda/device.h"

namespace blockd::cuda {

// [batch, seq, width] fp32 in device memory.
class CudaActivation : public Activation {
 public:
  CudaActivation(int device, int64_t batch, int64_t seq, int64_t width, DeviceBuffer data)
      : Activation(device, batch, seq, width), data_(std::move(data)) {}
  float* data() const { return data_.as<float>(); }

 private:
  DeviceBuffer data_;
};

absl::StatusOr<std::unique_ptr<CudaActivation>> NewActivation(DeviceContext* dev, int64_t batch, int64_t seq,
                                                               int64_t width);

size_t CudaBlockBytes(const BlockSpec& spec);
absl::StatusOr<std::unique_ptr<Block>> CreateCudaBlock(const BlockSpec& spec, DeviceContext* dev);

}  // namespace blockd::cuda
