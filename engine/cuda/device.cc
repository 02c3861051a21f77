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
  // The copy streams' few small kernels (wire conversions) are scheduled ahead of the compute
  // stream's pending blocks, so a transfer does not wait for a large GEMM to drain.
  int least = 0, greatest = 0;
  CUDA_RETURN_IF_ERROR(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  CUDA_RETURN_IF_ERROR(cudaStreamCreateWithPriority(&dev->upload_stream, cudaStreamNonBlocking, greatest));
  CUDA_RETURN_IF_ERROR(cudaStreamCreateWithPriority(&dev->download_stream, cudaStreamNonBlocking, greatest));
  cudaMemPool_t pool;
  CUDA_RETURN_IF_ERROR(cudaDeviceGetDefaultMemPool(&pool, index));
  uint64_t threshold = UINT64_MAX;
  CUDA_RETURN_IF_ERROR(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
  cudaMemPoolProps props = {};
  props.allocType = cudaMemAllocationTypePinned;
  props.location.type = cudaMemLocationTypeDevice;
  props.location.id = index;
  CUDA_RETURN_IF_ERROR(cudaMemPoolCreate(&dev->copy_pool, &props));
  CUDA_RETURN_IF_ERROR(cudaMemPoolSetAttribute(dev->copy_pool, cudaMemPoolAttrReleaseThreshold, &threshold));
  // Never make the copy stream wait for the stream that freed a buffer (the compute stream).
  int no = 0;
  CUDA_RETURN_IF_ERROR(cudaMemPoolSetAttribute(dev->copy_pool, cudaMemPoolReuseAllowInternalDependencies, &no));
  CUDA_RETURN_IF_ERROR(cudaMalloc(&dev->gemm_workspace, kGemmWorkspaceBytes));
  dev->gemm_workspace_bytes = kGemmWorkspaceBytes;
  CUDA_RETURN_IF_ERROR(dev->gemm.Init(dev->gemm_workspace, dev->gemm_workspace_bytes));
  return dev;
}

DeviceContext::~DeviceContext() {
  DeviceGuard guard(index);
  if (stream != nullptr) cudaStreamSynchronize(stream);
  for (cudaStream_t s : {upload_stream, download_stream}) {
    if (s != nullptr) cudaStreamSynchronize(s);
  }
  cudnn.reset();  // on its device, after the work that uses its plans
  if (gemm_workspace != nullptr) cudaFree(gemm_workspace);
  if (copy_pool != nullptr) cudaMemPoolDestroy(copy_pool);  // released once nothing is outstanding
  for (cudaStream_t s : {upload_stream, download_stream}) {
    if (s != nullptr) cudaStreamDestroy(s);
  }
  if (stream != nullptr) cudaStreamDestroy(stream);
}

namespace {

absl::Status SyncStream(int device, cudaStream_t stream) {
  DeviceGuard guard(device);
  cudaEvent_t done;
  CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  absl::Status s = CallStatus(cudaEventRecord(done, stream), "cudaEventRecord(done, stream)", __FILE__, __LINE__);
  if (s.ok()) s = CallStatus(cudaEventSynchronize(done), "cudaEventSynchronize(done)", __FILE__, __LINE__);
  cudaEventDestroy(done);
  return s;
}

}  // namespace

absl::Status DeviceContext::Sync() { return SyncStream(index, stream); }

absl::Status DeviceContext::Sync(cudaStream_t other) { return SyncStream(index, other); }

namespace {
// The capture this thread runs, if any (CaptureScope).
thread_local const DeviceContext* capture_dev = nullptr;
thread_local cudaStream_t capture_stream = nullptr;
}  // namespace

cudaStream_t DeviceContext::Stream() const { return capture_dev == this ? capture_stream : stream; }

bool DeviceContext::capturing() const { return capture_dev == this; }

CaptureScope::CaptureScope(const DeviceContext* dev, cudaStream_t capture) {
  capture_dev = dev;
  capture_stream = capture;
}

CaptureScope::~CaptureScope() {
  capture_dev = nullptr;
  capture_stream = nullptr;
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
  CUDA_RETURN_IF_ERROR(cudaMallocAsync(&b.ptr_, bytes, dev->Stream()));
  return b;
}

absl::StatusOr<DeviceBuffer> DeviceBuffer::AllocateForCopy(DeviceContext* dev, size_t bytes, cudaStream_t stream,
                                                         cudaStream_t free_stream) {
  DeviceBuffer b;
  b.dev_ = dev;
  b.free_stream_ = free_stream;
  b.bytes_ = bytes;
  if (bytes == 0) return b;
  DeviceGuard guard(dev->index);
  CUDA_RETURN_IF_ERROR(cudaMallocFromPoolAsync(&b.ptr_, bytes, dev->copy_pool, stream));
  return b;
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    Reset();
    dev_ = o.dev_;
    free_stream_ = o.free_stream_;
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
    cudaFreeAsync(ptr_, free_stream_ != nullptr ? free_stream_ : dev_->Stream());
  }
  ptr_ = nullptr;
  bytes_ = 0;
}

DeviceBuffer DeviceBuffer::Adopt(DeviceContext* dev, void* ptr, size_t bytes) {
  DeviceBuffer b;
  b.dev_ = dev;
  b.ptr_ = ptr;
  b.bytes_ = bytes;
  return b;
}

void* DeviceBuffer::Release() {
  void* p = ptr_;
  ptr_ = nullptr;
  bytes_ = 0;
  return p;
}

}  // namespace blockd::cuda
