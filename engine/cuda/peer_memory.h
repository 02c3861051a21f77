// CUDA IPC memory of a same-host client (a PyTorch tensor's storage), opened on the daemon's
// device, or a POSIX shared-memory region's mapping pinned for DMA: the backend's side of
// PeerMemory (engine/backend.h). Activations are read from it and written into it by DMA
// (CudaBackend::UploadPeer/DownloadPeer), device to device or across PCIe.
//
//   ASSIGN_OR_RETURN(auto peer, cuda::OpenCudaPeerMemory(dev, mem_handle, event_handle));
//   RETURN_IF_ERROR(peer->WaitOn(dev->upload_stream));   // the client's writes come first
//   cudaMemcpyAsync(staging, peer->at(offset), bytes, cudaMemcpyDeviceToDevice, dev->upload_stream);
#pragma once

#include <cuda_runtime.h>

#include <memory>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/backend.h"
#include "engine/cuda/device.h"

namespace blockd::cuda {

// One mapping of a client's allocation. CUDA lets a process open an IPC handle only once (a
// second cudaIpcOpenMemHandle of the same allocation fails), and a PyTorch client's tensors share
// the caching allocator's segments, so regions of one segment share one mapping (as PyTorch's
// own getIpcDevPtr does); the last region to go closes it.
struct IpcMapping;

class CudaPeerMemory : public PeerMemory {
 public:
  CudaPeerMemory(std::shared_ptr<IpcMapping> mapping, int device, void* base)
      : mapping_(std::move(mapping)), device_(device), base_(base) {}
  // The event's destroy; the mapping closes with its last user. Pinned host memory is unpinned.
  ~CudaPeerMemory() override;
  int device() const override { return device_; }
  int64_t bytes() const override { return bytes_; }
  char* at(int64_t offset) const { return static_cast<char*>(base_) + offset; }
  // Makes `stream` wait for the work the client recorded on its IPC event (none: nothing to wait for).
  absl::Status WaitOn(cudaStream_t stream) const;

 private:
  friend absl::StatusOr<std::unique_ptr<CudaPeerMemory>> OpenCudaPeerMemory(DeviceContext*, absl::string_view,
                                                                             absl::string_view);
  friend absl::StatusOr<std::unique_ptr<CudaPeerMemory>> PinCudaHostMemory(DeviceContext*, void*, size_t);
  std::shared_ptr<IpcMapping> mapping_;
  int device_;
  void* base_;
  int64_t bytes_ = 0;             // set once the allocation is sized
  cudaEvent_t event_ = nullptr;   // the client's IPC event, when it gave one
  int pinned_on_ = -1;            // pinned host memory (device_ kHost): the device whose context pinned it
};

// Opens `mem_handle` (a cudaIpcMemHandle_t's bytes) and `event_handle` (a cudaIpcEventHandle_t's,
// or empty) on `dev`. INVALID_ARGUMENT for a handle of the wrong size or one that does not open
// (another host's, memory already freed, random bytes); FAILED_PRECONDITION for memory that lives
// on another device. The size is the allocation's from the handle's address, as the driver says.
absl::StatusOr<std::unique_ptr<CudaPeerMemory>> OpenCudaPeerMemory(DeviceContext* dev, absl::string_view mem_handle,
                                                                   absl::string_view event_handle);

// Pins `bytes` of host memory at `ptr` for DMA (cudaHostRegister, portable: every device's copies
// read it), as PeerMemory::kHost. FAILED_PRECONDITION when the driver refuses (memory it cannot
// pin, past the end of a shrunk object).
absl::StatusOr<std::unique_ptr<CudaPeerMemory>> PinCudaHostMemory(DeviceContext* dev, void* ptr, size_t bytes);

}  // namespace blockd::cuda
