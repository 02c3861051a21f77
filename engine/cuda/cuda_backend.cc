#include "engine/cuda/cuda_backend.h"

#include <cuda_runtime.h>

#include <cstring>
#include <vector>

#include "absl/synchronization/mutex.h"

#include "absl/strings/str_cat.h"
#include "engine/cuda/cuda_block.h"
#include "engine/cuda/cuda_status.h"
#include "engine/cuda/device.h"
#include "engine/status_macros.h"
#include "kernels/attention.cuh"
#include "kernels/convert.cuh"

namespace blockd {
namespace {

using cuda::CudaActivation;
using cuda::DeviceBuffer;
using cuda::DeviceContext;
using cuda::DeviceGuard;

kernels::WireType WireOf(DType t) {
  switch (t) {
    case DType::kFloat32: return kernels::kWireFloat32;
    case DType::kBFloat16: return kernels::kWireBFloat16;
    case DType::kFloat16: return kernels::kWireFloat16;
  }
  return kernels::kWireFloat32;
}

// Copies between the device and pageable memory (a request's or a reply's bytes) go through the
// driver's own staging and ran at ~1.3 GB/s on the GPU host; a pinned buffer that the bytes pass
// through moves them at memcpy speed plus a full-rate DMA. One per device, grown on demand, used
// under a lock.
class PinnedStaging {
 public:
  ~PinnedStaging() {
    if (ptr_ != nullptr) cudaFreeHost(ptr_);
  }
  // Copies `bytes` of host `src` to device `dst` on `dev`'s stream and waits for the copy.
  absl::Status CopyToDevice(DeviceContext* dev, void* dst, const void* src, size_t bytes) {
    absl::MutexLock lock(&mu_);
    RETURN_IF_ERROR(Reserve(bytes));
    std::memcpy(ptr_, src, bytes);
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, ptr_, bytes, cudaMemcpyHostToDevice, dev->stream));
    return dev->Sync();  // the buffer is reused by the next caller
  }
  // Copies `bytes` of device `src` to host `dst` once `dev`'s stream has produced them.
  absl::Status CopyToHost(DeviceContext* dev, void* dst, const void* src, size_t bytes) {
    absl::MutexLock lock(&mu_);
    RETURN_IF_ERROR(Reserve(bytes));
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(ptr_, src, bytes, cudaMemcpyDeviceToHost, dev->stream));
    RETURN_IF_ERROR(dev->Sync());
    std::memcpy(dst, ptr_, bytes);
    return absl::OkStatus();
  }

 private:
  absl::Status Reserve(size_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (bytes <= capacity_) return absl::OkStatus();
    if (ptr_ != nullptr) cudaFreeHost(ptr_);
    ptr_ = nullptr;
    capacity_ = 0;
    CUDA_RETURN_IF_ERROR(cudaHostAlloc(&ptr_, bytes, cudaHostAllocPortable));
    capacity_ = bytes;
    return absl::OkStatus();
  }

  absl::Mutex mu_;
  void* ptr_ ABSL_GUARDED_BY(mu_) = nullptr;
  size_t capacity_ ABSL_GUARDED_BY(mu_) = 0;
};

class CudaBackend : public Backend {
 public:
  explicit CudaBackend(std::vector<std::unique_ptr<DeviceContext>> devices)
      : devices_(std::move(devices)), staging_(devices_.size()) {}

  absl::string_view name() const override { return "cuda"; }

  std::vector<DeviceInfo> devices() const override {
    std::vector<DeviceInfo> out;
    for (const auto& d : devices_) {
      DeviceInfo info;
      info.index = d->index;
      info.kind = "cuda";
      info.name = d->props.name;
      info.memory_total_bytes = static_cast<int64_t>(d->props.totalGlobalMem);
      info.compute_capability = absl::StrCat(d->props.major, ".", d->props.minor);
      out.push_back(info);
    }
    return out;
  }

  Precision default_precision() const override { return Precision::kBF16; }

  absl::Status Supports(const BlockSpec& spec) const override {
    if (spec.device < 0 || spec.device >= static_cast<int>(devices_.size())) {
      return absl::InvalidArgumentError(absl::StrCat("device ", spec.device, " does not exist: backend cuda has ",
                                                     devices_.size(), " GPU(s), 0..", devices_.size() - 1));
    }
    if (spec.config.head_dim > kernels::kAttentionMaxHeadDim) {
      return absl::UnimplementedError(absl::StrCat("backend cuda supports head_dim up to ",
                                                   kernels::kAttentionMaxHeadDim, ", got ", spec.config.head_dim));
    }
    if (spec.config.hidden_size > 32768) {
      return absl::UnimplementedError(
          absl::StrCat("backend cuda supports hidden_size up to 32768, got ", spec.config.hidden_size));
    }
    return absl::OkStatus();
  }

  size_t BlockBytes(const BlockSpec& spec) const override { return cuda::CudaBlockBytes(spec); }

  absl::StatusOr<std::unique_ptr<Block>> CreateBlock(const BlockSpec& spec) override {
    return cuda::CreateCudaBlock(spec, devices_[spec.device].get());
  }

  absl::StatusOr<std::unique_ptr<Activation>> Upload(int device, DType dtype, const void* data, int64_t batch,
                                                     int64_t seq, int64_t width) override {
    DeviceContext* dev = devices_[device].get();
    DeviceGuard guard(dev->index);
    const int64_t n = batch * seq * width;
    ASSIGN_OR_RETURN(std::unique_ptr<CudaActivation> a, cuda::NewActivation(dev, batch, seq, width));
    const size_t flag_at = (n * DTypeSize(dtype) + 15) / 16 * 16;  // the counter needs 4-byte alignment
    ASSIGN_OR_RETURN(DeviceBuffer staging, DeviceBuffer::Allocate(dev, flag_at + sizeof(unsigned)));
    auto* nonfinite = reinterpret_cast<unsigned*>(staging.as<char>() + flag_at);
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(nonfinite, 0, sizeof(unsigned), dev->stream));
    RETURN_IF_ERROR(staging_[device].CopyToDevice(dev, staging.get(), data, n * DTypeSize(dtype)));
    CUDA_RETURN_IF_ERROR(kernels::launch_to_float(WireOf(dtype), staging.get(), a->data(), n, nonfinite, dev->stream));
    unsigned bad = 0;
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(&bad, nonfinite, sizeof(bad), cudaMemcpyDeviceToHost, dev->stream));
    RETURN_IF_ERROR(dev->Sync());
    if (bad != 0) return absl::InvalidArgumentError(absl::StrCat("has ", bad, " non-finite values (NaN or inf)"));
    return std::unique_ptr<Activation>(std::move(a));
  }

  absl::Status Download(const Activation& a, DType dtype, void* dst) override {
    const auto& ca = static_cast<const CudaActivation&>(a);
    DeviceContext* dev = devices_[a.device()].get();
    DeviceGuard guard(dev->index);
    const int64_t n = a.numel();
    if (dtype == DType::kFloat32) return staging_[a.device()].CopyToHost(dev, dst, ca.data(), n * 4);
    ASSIGN_OR_RETURN(DeviceBuffer staging, DeviceBuffer::Allocate(dev, n * DTypeSize(dtype)));
    CUDA_RETURN_IF_ERROR(kernels::launch_from_float(ca.data(), WireOf(dtype), staging.get(), n, dev->stream));
    return staging_[a.device()].CopyToHost(dev, dst, staging.get(), n * DTypeSize(dtype));
  }

  absl::StatusOr<std::unique_ptr<Activation>> ToDevice(const Activation& a, int device) override {
    if (device < 0 || device >= static_cast<int>(devices_.size())) {
      return absl::InvalidArgumentError(absl::StrCat("device ", device, " does not exist"));
    }
    const auto& ca = static_cast<const CudaActivation&>(a);
    DeviceContext* src = devices_[a.device()].get();
    DeviceContext* dst = devices_[device].get();
    RETURN_IF_ERROR(src->Sync());  // the producer's work is done before the copy reads it
    DeviceGuard guard(dst->index);
    ASSIGN_OR_RETURN(std::unique_ptr<CudaActivation> out, cuda::NewActivation(dst, a.batch(), a.seq(), a.width()));
    CUDA_RETURN_IF_ERROR(
        cudaMemcpyPeerAsync(out->data(), dst->index, ca.data(), src->index, a.numel() * 4, dst->stream));
    RETURN_IF_ERROR(dst->Sync());
    return std::unique_ptr<Activation>(std::move(out));
  }

  bool healthy() const override { return !cuda::CudaBroken(); }

  int64_t DeviceMemoryUsed(int device) const override {
    DeviceGuard guard(device);
    size_t free_bytes = 0, total = 0;
    if (cudaMemGetInfo(&free_bytes, &total) != cudaSuccess) return 0;
    return static_cast<int64_t>(total - free_bytes);
  }

 private:
  std::vector<std::unique_ptr<DeviceContext>> devices_;
  std::vector<PinnedStaging> staging_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return absl::FailedPreconditionError(absl::StrCat("no CUDA device: ", cudaGetErrorString(e)));
  }
  if (count == 0) return absl::FailedPreconditionError("no CUDA device");
  std::vector<std::unique_ptr<DeviceContext>> devices;
  for (int i = 0; i < count; ++i) {
    ASSIGN_OR_RETURN(std::unique_ptr<DeviceContext> dev, DeviceContext::Create(i));
    devices.push_back(std::move(dev));
  }
  return std::unique_ptr<Backend>(std::make_unique<CudaBackend>(std::move(devices)));
}

}  // namespace blockd
