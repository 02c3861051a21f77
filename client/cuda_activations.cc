#include "client/cuda_activations.h"

#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/status_macros.h"
#include "client/activation_tensors.h"
#include "client/tensor_bytes.h"

namespace blockd {
namespace {

using cuda_client::CudaError;
using cuda_client::OnDevice;

absl::StatusOr<v1::ForwardResponse> Send(Client* c, const v1::ForwardRequest& r, const CallOptions& call) {
  return c->Forward(r, call);
}
absl::StatusOr<v1::BackwardResponse> Send(Client* c, const v1::BackwardRequest& r, const CallOptions& call) {
  return c->Backward(r, call);
}
absl::StatusOr<v1::ForwardResponse> Send(Client* c, v1::ForwardRequest&& r, const CallOptions& call) {
  return c->Forward(std::move(r), call);
}
absl::StatusOr<v1::BackwardResponse> Send(Client* c, v1::BackwardRequest&& r, const CallOptions& call) {
  return c->Backward(std::move(r), call);
}

// The device whose memory `p` is (`what` names it in errors): INVALID_ARGUMENT for host memory.
absl::StatusOr<int> DeviceOf(const void* p, const char* what) {
  cudaPointerAttributes a{};
  if (cudaError_t e = cudaPointerGetAttributes(&a, p); e != cudaSuccess) {
    return CudaError(absl::StrCat("cudaPointerGetAttributes(", what, ")"), e);
  }
  if (a.type != cudaMemoryTypeDevice && a.type != cudaMemoryTypeManaged) {
    return absl::InvalidArgumentError(absl::StrCat(what, " is not device memory of this process"));
  }
  return a.device;
}

}  // namespace

CudaActivations::~CudaActivations() = default;

absl::StatusOr<v1::ForwardResponse> CudaActivations::Forward(v1::ForwardRequest request, const void* x, void* out,
                                                             cudaStream_t stream, const CallOptions& call) {
  return Call<v1::ForwardRequest, v1::ForwardResponse>(std::move(request), x, out, stream, call);
}

absl::StatusOr<v1::BackwardResponse> CudaActivations::Backward(v1::BackwardRequest request, const void* grad_output,
                                                               void* grad_input, cudaStream_t stream,
                                                               const CallOptions& call) {
  return Call<v1::BackwardRequest, v1::BackwardResponse>(std::move(request), grad_output, grad_input, stream, call);
}

std::optional<bool> CudaActivations::UsesCudaIpc(int device) const {
  absl::MutexLock lock(&mu_);
  if (registered_.count(device) != 0) return true;
  auto it = pools_.find(device);
  if (it != pools_.end() && it->second->refused()) return false;
  return std::nullopt;
}

CudaActivations::Pool& CudaActivations::PoolOf(int device) {
  absl::MutexLock lock(&mu_);
  std::unique_ptr<Pool>& pool = pools_[device];
  if (pool == nullptr) pool = std::make_unique<Pool>();
  return *pool;
}

template <class Req, class Resp>
absl::StatusOr<Resp> CudaActivations::Call(Req request, const void* x, void* out, cudaStream_t stream,
                                           const CallOptions& call) {
  v1::Tensor* t = MutableTensorOf(&request);
  const std::vector<int64_t> shape = wire::ShapeOf(*t);
  const int64_t count = wire::NumElements(shape), item = wire::DTypeBytes(t->dtype());
  if (count < 0 || item == 0) {
    return absl::InvalidArgumentError(absl::StrCat("the request's tensor (", wire::DTypeName(t->dtype()), " [",
                                                   absl::StrJoin(shape, ", "), "]) has no byte size"));
  }
  if (!t->data().empty() || t->has_shared_memory() || request.has_output_shared_memory()) {
    return absl::InvalidArgumentError(
        "the request's tensor names dtype and shape only: its bytes are the device tensor's, and the reply's go to out");
  }
  const int64_t n = count * item;
  ASSIGN_OR_RETURN(const int device, DeviceOf(x, "the tensor"));
  ASSIGN_OR_RETURN(const int out_device, DeviceOf(out, "out"));
  if (out_device != device) {
    return absl::InvalidArgumentError(
        absl::StrCat("the tensor is on device ", device, " and out on device ", out_device, ": expected one device"));
  }
  const Transport mode = client_->options().transport;
  if (mode != Transport::kGrpc) {
    Pool& pool = PoolOf(device);
    for (int attempt = 0;; ++attempt) {
      ASSIGN_OR_RETURN(std::unique_ptr<CudaIpcRegion> region,
                       pool.Take(n, mode == Transport::kSharedMemory, [&](int64_t size) {
                         return CudaIpcRegion::Create(client_, device, size);
                       }));
      if (region == nullptr) break;  // kAuto without CUDA IPC: through host memory
      {
        absl::MutexLock lock(&mu_);
        registered_[device] = true;
      }
      absl::StatusOr<v1::Tensor> put = region->Put(0, t->dtype(), shape, x, n, stream);
      if (!put.ok()) {
        pool.Give(std::move(region));
        return put.status();
      }
      *t = *std::move(put);
      // In place: the daemon reads all of the tensor before it writes the reply.
      *request.mutable_output_shared_memory() = region->Ref(0, n);
      absl::StatusOr<Resp> resp = Send(client_, static_cast<const Req&>(request), call);
      if (!resp.ok() && attempt == 0 && RegionExpired(resp.status(), region->name())) {
        pool.Drop(std::move(region));  // send again through a new one
        continue;
      }
      if (resp.ok()) {
        v1::Tensor* o = MutableTensorOf(&*resp);
        if (absl::Status got = region->Get(*o, out, n, stream); got.ok()) {
          o->clear_shared_memory();
        } else {
          resp = got;
        }
      }
      pool.Give(std::move(region));
      return resp;
    }
  }
  // Through host memory: the client sends the bytes as it sends any inline tensor.
  OnDevice on(device);
  std::string bytes(static_cast<size_t>(n), '\0');
  if (cudaError_t e = cudaMemcpyAsync(bytes.data(), x, bytes.size(), cudaMemcpyDeviceToHost, stream); e != cudaSuccess) {
    return CudaError("cudaMemcpyAsync of the tensor to the host", e);
  }
  if (cudaError_t e = cudaStreamSynchronize(stream); e != cudaSuccess) return CudaError("cudaStreamSynchronize", e);
  t->set_data(std::move(bytes));
  ASSIGN_OR_RETURN(Resp resp, Send(client_, std::move(request), call));
  v1::Tensor* o = MutableTensorOf(&resp);
  if (static_cast<int64_t>(o->data().size()) != n) {
    return absl::DataLossError(absl::StrCat("the reply carries ", o->data().size(), " bytes, expected ", n));
  }
  if (cudaError_t e = cudaMemcpyAsync(out, o->data().data(), o->data().size(), cudaMemcpyHostToDevice, stream);
      e != cudaSuccess) {
    return CudaError("cudaMemcpyAsync of the reply to the device", e);
  }
  // The reply's bytes are freed below: the copy must have read them.
  if (cudaError_t e = cudaStreamSynchronize(stream); e != cudaSuccess) return CudaError("cudaStreamSynchronize", e);
  o->clear_data();
  return resp;
}

}  // namespace blockd
