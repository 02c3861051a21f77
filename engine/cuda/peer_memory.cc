#include "engine/cuda/peer_memory.h"

#include <cuda.h>  // CUresult and CUdeviceptr only: the driver entry point is resolved at run time

#include <cstring>
#include <map>
#include <string>

#include "absl/synchronization/mutex.h"

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "engine/cuda/cuda_status.h"

namespace blockd::cuda {
namespace {

// A failed open must leave no error behind for the next CUDA call of this thread.
std::string Describe(cudaError_t e) {
  cudaGetLastError();
  return absl::StrCat(cudaGetErrorName(e), ": ", cudaGetErrorString(e));
}

// The allocation holding `ptr`, through the driver's cuMemGetAddressRange (the runtime has no
// call that says an allocation's size); the runtime hands out the driver entry point, so nothing
// links libcuda.
absl::StatusOr<int64_t> BytesFrom(void* ptr) {
  using GetRange = CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr);
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  const cudaError_t e = cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &fn, 12000, cudaEnableDefault, &found);
  if (e != cudaSuccess || fn == nullptr || found != cudaDriverEntryPointSuccess) {
    return absl::FailedPreconditionError(absl::StrCat("cannot size CUDA IPC memory: cuMemGetAddressRange not found (",
                                                      e == cudaSuccess ? "no symbol" : Describe(e), ")"));
  }
  CUdeviceptr base = 0;
  size_t size = 0;
  const CUdeviceptr p = reinterpret_cast<CUdeviceptr>(ptr);
  if (reinterpret_cast<GetRange>(fn)(&base, &size, p) != CUDA_SUCCESS || p < base || p - base > size) {
    return absl::InvalidArgumentError("the CUDA IPC memory's allocation cannot be sized");
  }
  return static_cast<int64_t>(size - (p - base));
}

}  // namespace

struct IpcMapping {
  int device = 0;
  void* base = nullptr;
  int64_t bytes = 0;  // the allocation's size from base, measured when it was opened
  ~IpcMapping() {
    DeviceGuard guard(device);
    cudaIpcCloseMemHandle(base);
  }
};

namespace {

// The open mappings by (device, handle bytes); entries of closed mappings expire with them.
absl::Mutex mappings_mu;
std::map<std::pair<int, std::string>, std::weak_ptr<IpcMapping>>& Mappings() {
  static auto* m = new std::map<std::pair<int, std::string>, std::weak_ptr<IpcMapping>>();
  return *m;
}

}  // namespace

CudaPeerMemory::~CudaPeerMemory() {
  if (pinned_on_ >= 0) {
    DeviceGuard guard(pinned_on_);
    cudaHostUnregister(base_);
    return;
  }
  DeviceGuard guard(device_);
  if (event_ != nullptr) cudaEventDestroy(event_);
  // mapping_ goes after: closed here if this was its last region.
}

absl::Status CudaPeerMemory::WaitOn(cudaStream_t stream) const {
  if (event_ == nullptr) return absl::OkStatus();
  CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream, event_, 0));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<CudaPeerMemory>> OpenCudaPeerMemory(DeviceContext* dev, absl::string_view mem_handle,
                                                                   absl::string_view event_handle) {
  if (mem_handle.size() != sizeof(cudaIpcMemHandle_t)) {
    return absl::InvalidArgumentError(absl::StrCat("cuda_ipc_handle has ", mem_handle.size(), " bytes, expected ",
                                                   sizeof(cudaIpcMemHandle_t), " (a cudaIpcMemHandle_t)"));
  }
  if (!event_handle.empty() && event_handle.size() != sizeof(cudaIpcEventHandle_t)) {
    return absl::InvalidArgumentError(absl::StrCat("cuda_ipc_event_handle has ", event_handle.size(),
                                                   " bytes, expected ", sizeof(cudaIpcEventHandle_t),
                                                   " (a cudaIpcEventHandle_t) or none"));
  }
  DeviceGuard guard(dev->index);
  std::shared_ptr<IpcMapping> mapping;
  {
    absl::MutexLock lock(&mappings_mu);
    auto& known = Mappings()[{dev->index, std::string(mem_handle)}];
    mapping = known.lock();
    if (mapping == nullptr) {
      cudaIpcMemHandle_t mh;
      std::memcpy(&mh, mem_handle.data(), sizeof(mh));
      void* base = nullptr;
      if (cudaError_t e = cudaIpcOpenMemHandle(&base, mh, cudaIpcMemLazyEnablePeerAccess); e != cudaSuccess) {
        Mappings().erase({dev->index, std::string(mem_handle)});
        return absl::InvalidArgumentError(absl::StrCat(
            "cuda_ipc_handle does not open on device ", dev->index, " (", Describe(e),
            "): expected the handle of live device memory of a process on the daemon's host (cudaIpcGetMemHandle, "
            "or torch's untyped_storage()._share_cuda_())"));
      }
      mapping = std::make_shared<IpcMapping>();
      mapping->device = dev->index;
      mapping->base = base;
      // Sized now, while cudaIpcOpenMemHandle has just made the device's context current on this
      // thread: cuMemGetAddressRange is a driver call, and a later registration of the same
      // allocation (two tensors of one PyTorch segment share its handle) may come on a gRPC thread
      // where no runtime call has bound the context yet (DeviceGuard skips cudaSetDevice when the
      // runtime already reports the device), which made it fail there.
      absl::StatusOr<int64_t> bytes = BytesFrom(base);
      if (!bytes.ok()) {
        Mappings().erase({dev->index, std::string(mem_handle)});
        return bytes.status();  // `mapping` closes the handle
      }
      mapping->bytes = *bytes;
      known = mapping;
    }
    // Entries whose mapping closed: dropped here, so the map stays as small as the open mappings.
    for (auto it = Mappings().begin(); it != Mappings().end();) {
      it = it->second.expired() ? Mappings().erase(it) : std::next(it);
    }
  }
  void* base = mapping->base;
  const int64_t peer_bytes = mapping->bytes;
  // From here on `peer` holds the mapping whatever happens.
  auto peer = std::make_unique<CudaPeerMemory>(std::move(mapping), dev->index, base);
  cudaPointerAttributes attr{};
  if (cudaError_t e = cudaPointerGetAttributes(&attr, base); e != cudaSuccess) {
    return absl::InvalidArgumentError(absl::StrCat("the opened CUDA IPC memory has no attributes (", Describe(e), ")"));
  }
  if (attr.device != dev->index) {
    return absl::FailedPreconditionError(absl::StrCat("the CUDA IPC memory lives on device ", attr.device,
                                                      ", not on device ", dev->index,
                                                      ": register memory of the device the blocks are on"));
  }
  cudaEvent_t event = nullptr;
  if (!event_handle.empty()) {
    cudaIpcEventHandle_t eh;
    std::memcpy(&eh, event_handle.data(), sizeof(eh));
    if (cudaError_t e = cudaIpcOpenEventHandle(&event, eh); e != cudaSuccess) {
      return absl::InvalidArgumentError(absl::StrCat("cuda_ipc_event_handle does not open (", Describe(e),
                                                     "): expected torch.cuda.Event(interprocess=True).ipc_handle()"));
    }
  }
  peer->bytes_ = peer_bytes;
  peer->event_ = event;
  return peer;
}

absl::StatusOr<std::unique_ptr<CudaPeerMemory>> PinCudaHostMemory(DeviceContext* dev, void* ptr, size_t bytes) {
  DeviceGuard guard(dev->index);
  if (cudaError_t e = cudaHostRegister(ptr, bytes, cudaHostRegisterPortable); e != cudaSuccess) {
    return absl::FailedPreconditionError(absl::StrCat("cannot pin ", bytes, " bytes of host memory (", Describe(e), ")"));
  }
  auto pinned = std::make_unique<CudaPeerMemory>(nullptr, PeerMemory::kHost, ptr);
  pinned->bytes_ = static_cast<int64_t>(bytes);
  pinned->pinned_on_ = dev->index;
  return pinned;
}

}  // namespace blockd::cuda
