#include "client/cuda_ipc_region.h"

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "client/shared_memory_region.h"

namespace blockd {
namespace cuda_client {

absl::Status CudaError(absl::string_view what, cudaError_t e) {
  cudaGetLastError();  // leave no error behind for this thread's next CUDA call
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorName(e), ": ", cudaGetErrorString(e)));
}

}  // namespace cuda_client

using cuda_client::CudaError;
using cuda_client::OnDevice;

absl::StatusOr<std::unique_ptr<CudaIpcRegion>> CudaIpcRegion::Create(Client* client, int device, int64_t byte_size,
                                                                     std::string name) {
  if (byte_size <= 0) return absl::InvalidArgumentError(absl::StrCat("byte_size = ", byte_size, ", expected > 0"));
  int devices = 0;
  if (cudaError_t e = cudaGetDeviceCount(&devices); e != cudaSuccess) return CudaError("cudaGetDeviceCount", e);
  if (device < 0 || device >= devices) {
    return absl::InvalidArgumentError(absl::StrCat("device ", device, ": this process sees CUDA devices 0..", devices - 1));
  }
  OnDevice on(device);
  std::unique_ptr<CudaIpcRegion> r(new CudaIpcRegion());
  r->client_ = client;
  r->name_ = name.empty() ? absl::StrCat("cuda-", RandomHex().substr(0, 16)) : std::move(name);
  r->device_ = device;
  r->size_ = byte_size;
  void* p = nullptr;
  if (cudaError_t e = cudaMalloc(&p, static_cast<size_t>(byte_size)); e != cudaSuccess) {
    return CudaError(absl::StrCat("cudaMalloc(", byte_size, ")"), e);
  }
  r->data_ = static_cast<char*>(p);  // freed by the destructor from here on
  if (cudaError_t e = cudaEventCreateWithFlags(&r->event_, cudaEventDisableTiming | cudaEventInterprocess);
      e != cudaSuccess) {
    r->event_ = nullptr;
    return CudaError("cudaEventCreate(interprocess)", e);
  }
  // An interprocess event has a handle once recorded; the memory is zeroed before the daemon sees it.
  cudaIpcMemHandle_t mem;
  cudaIpcEventHandle_t ev;
  if (cudaError_t e = cudaMemset(r->data_, 0, static_cast<size_t>(byte_size)); e != cudaSuccess) {
    return CudaError("cudaMemset", e);
  }
  if (cudaError_t e = cudaEventRecord(r->event_, nullptr); e != cudaSuccess) return CudaError("cudaEventRecord", e);
  if (cudaError_t e = cudaIpcGetMemHandle(&mem, r->data_); e != cudaSuccess) return CudaError("cudaIpcGetMemHandle", e);
  if (cudaError_t e = cudaIpcGetEventHandle(&ev, r->event_); e != cudaSuccess) {
    return CudaError("cudaIpcGetEventHandle", e);
  }
  v1::RegisterSharedMemoryRequest req;
  req.set_name(r->name_);
  req.set_byte_size(byte_size);
  req.set_device(device);
  req.set_cuda_ipc_handle(reinterpret_cast<const char*>(&mem), sizeof(mem));
  req.set_cuda_ipc_event_handle(reinterpret_cast<const char*>(&ev), sizeof(ev));
  auto reg = client->RegisterSharedMemory(req);
  if (!reg.ok()) return reg.status();
  r->registered_ = true;
  return r;
}

CudaIpcRegion::~CudaIpcRegion() {
  // Unregistered first: the daemon closes its mapping before the memory goes.
  if (registered_) client_->UnregisterSharedMemory(name_).IgnoreError();
  OnDevice on(device_);
  if (event_ != nullptr) {
    cudaEventSynchronize(event_);  // the last Get's copy out of the region
    cudaEventDestroy(event_);
  }
  if (data_ != nullptr) cudaFree(data_);
}

v1::SharedMemoryRef CudaIpcRegion::Ref(int64_t offset, int64_t byte_size) const {
  return RegionRef(name_, offset, byte_size);
}

absl::StatusOr<v1::Tensor> CudaIpcRegion::Put(int64_t offset, v1::DType dtype, const std::vector<int64_t>& shape,
                                              const void* src, int64_t bytes, cudaStream_t stream) {
  RETURN_IF_ERROR(CheckFits(name_, size_, offset, bytes));
  OnDevice on(device_);
  // After the last Get's copy out, whichever stream it ran on.
  if (cudaError_t e = cudaStreamWaitEvent(stream, event_, 0); e != cudaSuccess) return CudaError("cudaStreamWaitEvent", e);
  if (cudaError_t e = cudaMemcpyAsync(data_ + offset, src, static_cast<size_t>(bytes), cudaMemcpyDeviceToDevice, stream);
      e != cudaSuccess) {
    return CudaError("cudaMemcpyAsync into the region", e);
  }
  RETURN_IF_ERROR(Record(stream));
  return SliceTensor(dtype, shape, Ref(offset, bytes));
}

absl::Status CudaIpcRegion::Get(const v1::Tensor& t, void* dst, int64_t capacity, cudaStream_t stream) {
  if (!t.has_shared_memory()) return absl::DataLossError(absl::StrCat("the reply names no slice of region ", name_));
  const v1::SharedMemoryRef& ref = t.shared_memory();
  RETURN_IF_ERROR(CheckReplySlice(name_, size_, ref));
  if (ref.byte_size() > capacity) {
    return absl::DataLossError(absl::StrCat("the reply's ", ref.byte_size(), " bytes do not fit the ", capacity,
                                            " bytes given"));
  }
  OnDevice on(device_);
  if (cudaError_t e = cudaMemcpyAsync(dst, data_ + ref.offset(), static_cast<size_t>(ref.byte_size()),
                                      cudaMemcpyDeviceToDevice, stream);
      e != cudaSuccess) {
    return CudaError("cudaMemcpyAsync out of the region", e);
  }
  return Record(stream);
}

absl::Status CudaIpcRegion::Record(cudaStream_t stream) {
  if (cudaError_t e = cudaEventRecord(event_, stream); e != cudaSuccess) return CudaError("cudaEventRecord", e);
  return absl::OkStatus();
}

}  // namespace blockd
