#include "engine/cuda/device.h"

#include <cstdint>

#include "engine/cuda/cuda_status.h"

namespace blockd::cuda {

constexpr size_t kGemmWorkspaceBytes = 32 << 20;  // what cuBLASLt wants on Hopper

absl::StatusOr<std::unique_ptr<DeviceContext>> DeviceContext::Create(int index) {
  auto dev = std::make_unique<DeviceContext>();
  dev->index = index;
  DeviceGuard guard(index);
  CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&dev->props, index));
  CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&dev->stream, cudaStreamNonBlocking));
  cudaMemPool_t pool;
  CUDA_RETURN_IF_ERROR(cudaDeviceGetDefaultMemPool(&pool, index));
  uint64_t threshold = UINT64_MAX;
  CUDA_RETURN_IF_ERROR(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
  CUDA_RETURN_IF_ERROR(cudaMalloc(&dev->gemm_workspace, kGemmWorkspaceBytes));
  dev->gemm_workspace_bytes = kGemmWorkspaceBytes;
  CUDA_RETURN_IF_ERROR(dev->gemm.Init(dev->gemm_workspace, dev->gemm_workspace_bytes));
  return dev;
}

DeviceContext::~DeviceContext() {
  DeviceGuard guard(index);
  if (stream != nullptr) cudaStreamSynchronize(stream);
  if (gemm_workspace != nullptr) cudaFree(gemm_workspace);
  if (stream != nullptr) cudaStreamDestroy(stream);
}

absl::Status DeviceContext::Sync() {
  DeviceGuard guard(index);
  cudaEvent_t done;
  CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  absl::Status s = CallStatus(cudaEventRecord(done, stream), "cudaEventRecord(done, stream)", __FILE__, __LINE__);
  if (s.ok()) s = CallStatus(cudaEventSynchronize(done), "cudaEventSynchronize(done)", __FILE__, __LINE__);
  cudaEventDestroy(done);
  return s;
}

DeviceGuard::DeviceGuard(int device) {
  cudaGetDevice(&previous_);
  if (previous_ != device) cudaSetDevice(device);
}

DeviceGuard::~DeviceGuard() {
  int now = -1;
  cudaGetDevice(&now);
  if (previous_ >= 0 && now != previous_) cudaSetDevice(previous_);
}

absl::StatusOr<DeviceBuffer> DeviceBuffer::Allocate(DeviceContext* dev, size_t bytes) {
  DeviceBuffer b;
  b.dev_ = dev;
  b.bytes_ = bytes;
  if (bytes == 0) return b;
  DeviceGuard guard(dev->index);
  CUDA_RETURN_IF_ERROR(cudaMallocAsync(&b.ptr_, bytes, dev->stream));
  return b;
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    Reset();
    dev_ = o.dev_;
    ptr_ = o.ptr_;
    bytes_ = o.bytes_;
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}

void DeviceBuffer::Reset() {
  if (ptr_ != nullptr) {
    DeviceGuard guard(dev_->index);
    cudaFreeAsync(ptr_, dev_->stream);
  }
  ptr_ = nullptr;
  bytes_ = 0;
}

}  // namespace blockd::cuda
