// One GPU as the CUDA backend uses it: its stream, its stream-ordered memory pool, its cuBLASLt
// context, and device buffers allocated from that pool.
//
// Every block on a device runs on the device's one stream, so the pool, the GEMM workspace and
// all buffers are used in stream order however many threads issue work; a call waits on an event
// it recorded, never on the whole stream. The pool keeps freed memory (release threshold: max), so
// once warmed a forward, backward or step allocates nothing from the driver.
//
// Activations cross PCIe on two copy streams, one per direction, with memory from a pool of their
// own that never waits on the compute stream (a freed buffer is reused once its free has completed,
// else the pool grows): a call's upload queues behind neither other calls' compute nor their
// downloads (which wait for their kernels), and its download waits only for the kernels that
// produced it.
//   ASSIGN_OR_RETURN(DeviceBuffer buf, DeviceBuffer::Allocate(dev, bytes));
//   float* p = buf.as<float>();
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "kernels/gemm.h"

namespace blockd::kernels {
class CudnnAttention;  // kernels/cudnn_attention.h, built only where cuDNN's headers are
}

namespace blockd::cuda {

struct DeviceContext {
  int index = 0;
  cudaDeviceProp props{};
  cudaStream_t stream = nullptr;
  cudaStream_t upload_stream = nullptr;    // host-to-device transfers of activations
  cudaStream_t download_stream = nullptr;  // device-to-host
  cudaMemPool_t copy_pool = nullptr;       // their device memory
  void* gemm_workspace = nullptr;
  size_t gemm_workspace_bytes = 0;
  kernels::GemmContext gemm;
  // cuDNN's handle and plan cache for the device's blocks (attention_dispatch.h); null when cuDNN
  // is not used here, and then cudnn_unavailable says why. Its plans run on `stream` like the rest.
  std::shared_ptr<kernels::CudnnAttention> cudnn;
  std::string cudnn_library;  // file and version, when cudnn is set
  std::string cudnn_unavailable;

  static absl::StatusOr<std::unique_ptr<DeviceContext>> Create(int index);
  ~DeviceContext();
  // The stream this thread issues the device's compute on: `stream`, except while a StepGraph
  // captures a span's step from this thread (CaptureScope), when it is the capture's own stream,
  // so that other threads' work on the device keeps running and stays out of the capture.
  cudaStream_t Stream() const;
  // Whether this thread is capturing the device's work (nothing may allocate outside the capture).
  bool capturing() const;

  // Waits until the work issued so far on the stream is done (an event, not the whole stream later).
  absl::Status Sync();
  // The same for another stream of the device (a copy stream).
  absl::Status Sync(cudaStream_t other);
};

// For its scope, this thread's DeviceContext::Stream() of `dev` is `capture` (a stream in capture).
class CaptureScope {
 public:
  CaptureScope(const DeviceContext* dev, cudaStream_t capture);
  ~CaptureScope();
  CaptureScope(const CaptureScope&) = delete;
  CaptureScope& operator=(const CaptureScope&) = delete;
};

// Makes `device` current for the scope and restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();

 private:
  int previous_ = -1;
};

// Device memory from the device's pool, freed in stream order. Movable, not copyable.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  static absl::StatusOr<DeviceBuffer> Allocate(DeviceContext* dev, size_t bytes);
  // From the copy pool, in `stream`'s order (a copy stream), freed in `free_stream`'s order: the
  // compute stream's for an activation the compute stream reads next, the copy stream's for a
  // copy's own scratch.
  static absl::StatusOr<DeviceBuffer> AllocateForCopy(DeviceContext* dev, size_t bytes, cudaStream_t stream,
                                                      cudaStream_t free_stream);
  DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  ~DeviceBuffer() { Reset(); }

  void* get() const { return ptr_; }
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }
  void Reset();
  // Owns `ptr` (of `bytes`, from a stream-ordered allocation: a captured step's output, whose
  // address every replay allocates again) and frees it in stream order like the rest.
  static DeviceBuffer Adopt(DeviceContext* dev, void* ptr, size_t bytes);
  // Gives up the memory without freeing it (it belongs to a capture); returns its address.
  void* Release();

 private:
  DeviceContext* dev_ = nullptr;
  cudaStream_t free_stream_ = nullptr;  // nullptr: dev_->stream
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace blockd::cuda
