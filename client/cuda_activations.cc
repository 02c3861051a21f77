#include "client/cuda_activations.h"

#include <cuda.h>  // the driver's types, for cuMemGetAddressRange through the runtime's entry point

#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/status_macros.h"
#include "client/activation_tensors.h"
#include "client/shared_memory_region.h"
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

// The allocation holding device memory `p` of the current device: its base and size (the
// driver's cuMemGetAddressRange, which the runtime does not offer) and its IPC handle; nullopt for
// memory CUDA IPC cannot name (a stream-ordered pool's).
struct AllocationInfo {
  uintptr_t base = 0;
  int64_t size = 0;
  std::string handle;
};
std::optional<AllocationInfo> AllocationHolding(const void* p) {
  using GetRange = CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr);
  static const GetRange get_range = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &fn, 12000, cudaEnableDefault, &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return GetRange{nullptr};
    }
    return reinterpret_cast<GetRange>(fn);
  }();
  if (get_range == nullptr) return std::nullopt;
  CUdeviceptr base = 0;
  size_t size = 0;
  if (get_range(&base, &size, reinterpret_cast<CUdeviceptr>(p)) != CUDA_SUCCESS) return std::nullopt;
  cudaIpcMemHandle_t h;
  if (cudaIpcGetMemHandle(&h, reinterpret_cast<void*>(base)) != cudaSuccess) {
    cudaGetLastError();
    return std::nullopt;
  }
  return AllocationInfo{static_cast<uintptr_t>(base), static_cast<int64_t>(size),
                        std::string(reinterpret_cast<const char*>(&h), sizeof(h))};
}

}  // namespace

CudaActivations::~CudaActivations() {
  absl::MutexLock lock(&mu_);
  for (const auto& [key, a] : allocations_) client_->UnregisterSharedMemory(a.name).IgnoreError();
}

std::optional<CudaActivations::InPlaceRefs> CudaActivations::InPlace(int device, const void* x, const void* out,
                                                                     int64_t n) {
  OnDevice on(device);
  const std::optional<AllocationInfo> held[2] = {AllocationHolding(x), AllocationHolding(out)};
  const uintptr_t at[2] = {reinterpret_cast<uintptr_t>(x), reinterpret_cast<uintptr_t>(out)};
  for (int i = 0; i < 2; ++i) {
    if (!held[i] || at[i] + static_cast<uintptr_t>(n) > held[i]->base + static_cast<uintptr_t>(held[i]->size)) {
      return std::nullopt;
    }
  }
  absl::MutexLock lock(&mu_);
  InPlaceRefs r;
  for (int i = 0; i < 2; ++i) {
    Allocation* a = AllocationOf(device, held[i]->base, held[i]->size, held[i]->handle);
    if (a == nullptr) {
      for (Allocation* t : r.taken) --t->users;
      return std::nullopt;
    }
    ++a->users;
    r.taken.push_back(a);
    r.refs[i] = RegionRef(a->name, static_cast<int64_t>(at[i] - held[i]->base), n);
  }
  registered_[device] = true;
  return r;
}

void CudaActivations::ReleaseInPlace(const InPlaceRefs& in_place) {
  const absl::Time now = absl::Now();
  absl::MutexLock lock(&mu_);
  for (Allocation* a : in_place.taken) {
    --a->users;
    a->last_used = now;
  }
}

void CudaActivations::Forget(const InPlaceRefs& in_place) {
  absl::MutexLock lock(&mu_);
  for (Allocation* a : in_place.taken) {
    --a->users;
    a->handle.clear();  // registered again by the next call that names the allocation
  }
}

CudaActivations::Allocation* CudaActivations::AllocationOf(int device, uintptr_t base, int64_t size,
                                                           const std::string& handle) {
  const std::pair<int, uintptr_t> key(device, base);
  auto it = allocations_.find(key);
  if (it != allocations_.end() && it->second.handle == handle && it->second.size == size) return &it->second;
  if (allocations_off_) return nullptr;
  if (it != allocations_.end()) {  // freed and allocated again: the registration names dead memory
    if (it->second.users > 0) return nullptr;
    client_->UnregisterSharedMemory(it->second.name).IgnoreError();
    allocations_.erase(it);
  }
  const absl::Time idle_since = absl::Now() - absl::Seconds(1);
  while (static_cast<int>(allocations_.size()) >= kMaxAllocations) {
    // Full: only a registration idle for a second makes room, the least recently used first, so
    // a working set larger than kMaxAllocations copies the rest instead of registering every call.
    auto victim = allocations_.end();
    for (auto i = allocations_.begin(); i != allocations_.end(); ++i) {
      if (i->second.users == 0 && i->second.last_used < idle_since &&
          (victim == allocations_.end() || i->second.last_used < victim->second.last_used)) {
        victim = i;
      }
    }
    if (victim == allocations_.end()) return nullptr;
    client_->UnregisterSharedMemory(victim->second.name).IgnoreError();
    allocations_.erase(victim);
  }
  v1::RegisterSharedMemoryRequest req;
  req.set_name(absl::StrCat("alloc-", RandomHex().substr(0, 16)));
  req.set_byte_size(size);
  req.set_device(device);
  req.set_cuda_ipc_handle(handle);
  if (absl::Status s = client_->RegisterSharedMemory(req).status(); !s.ok()) {
    // Over the identity's region limit, or not answering now: copy this time. Any other answer stands.
    const absl::StatusCode code = s.code();
    if (code != absl::StatusCode::kResourceExhausted && code != absl::StatusCode::kUnavailable &&
        code != absl::StatusCode::kDeadlineExceeded) {
      allocations_off_ = true;
    }
    return nullptr;
  }
  Allocation& a = allocations_[key];
  a.name = req.name();
  a.size = size;
  a.handle = handle;
  a.last_used = absl::Now();
  return &a;
}

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
    if (std::optional<absl::StatusOr<Resp>> done = CallInPlace<Req, Resp>(request, device, x, out, n, stream, call)) {
      return *std::move(done);
    }
    if (std::optional<absl::StatusOr<Resp>> done =
            CallThroughRegion<Req, Resp>(request, device, x, out, n, stream, call, mode == Transport::kSharedMemory)) {
      return *std::move(done);
    }
  }
  return CallThroughHost<Req, Resp>(std::move(request), device, x, out, n, stream, call);
}

template <class Req, class Resp>
std::optional<absl::StatusOr<Resp>> CudaActivations::CallInPlace(Req& request, int device, const void* x, void* out,
                                                                 int64_t n, cudaStream_t stream,
                                                                 const CallOptions& call) {
  std::optional<InPlaceRefs> in_place = InPlace(device, x, out, n);
  if (!in_place) return std::nullopt;
  // The allocations carry no event: x is written, and out's memory done with by its earlier
  // users, once the stream's work so far has run. The daemon synchronises before it answers.
  if (cudaError_t e = cudaStreamSynchronize(stream); e != cudaSuccess) {
    ReleaseInPlace(*in_place);
    return CudaError("cudaStreamSynchronize", e);
  }
  v1::Tensor* t = MutableTensorOf(&request);
  *t = SliceTensor(t->dtype(), wire::ShapeOf(*t), in_place->refs[0]);
  *request.mutable_output_shared_memory() = in_place->refs[1];
  absl::StatusOr<Resp> resp = Send(client_, static_cast<const Req&>(request), call);
  if (!resp.ok() && (RegionExpired(resp.status(), in_place->refs[0].region()) ||
                     RegionExpired(resp.status(), in_place->refs[1].region()))) {
    Forget(*in_place);  // nothing ran: the caller copies through a region instead
    return std::nullopt;
  }
  ReleaseInPlace(*in_place);
  if (!resp.ok()) return resp;
  v1::Tensor* o = MutableTensorOf(&*resp);
  const v1::SharedMemoryRef& want = in_place->refs[1];
  if (!o->has_shared_memory() || o->shared_memory().region() != want.region() ||
      o->shared_memory().offset() != want.offset() || o->shared_memory().byte_size() != n) {
    return absl::DataLossError("the reply names no slice, or another one than the request's output slice");
  }
  o->clear_shared_memory();
  return resp;
}

template <class Req, class Resp>
std::optional<absl::StatusOr<Resp>> CudaActivations::CallThroughRegion(Req& request, int device, const void* x,
                                                                       void* out, int64_t n, cudaStream_t stream,
                                                                       const CallOptions& call, bool insist) {
  Pool& pool = PoolOf(device);
  v1::Tensor* t = MutableTensorOf(&request);
  const std::vector<int64_t> shape = wire::ShapeOf(*t);
  for (int attempt = 0;; ++attempt) {
    absl::StatusOr<std::unique_ptr<CudaIpcRegion>> region = pool.Take(n, insist, [&](int64_t size) {
      return CudaIpcRegion::Create(client_, device, size);
    });
    if (!region.ok()) return region.status();
    if (*region == nullptr) return std::nullopt;  // kAuto without CUDA IPC: through host memory
    CudaIpcRegion& r = **region;
    {
      absl::MutexLock lock(&mu_);
      registered_[device] = true;
    }
    absl::StatusOr<v1::Tensor> put = r.Put(0, t->dtype(), shape, x, n, stream);
    if (!put.ok()) {
      pool.Give(*std::move(region));
      return put.status();
    }
    *t = *std::move(put);
    // In place: the daemon reads all of the tensor before it writes the reply.
    *request.mutable_output_shared_memory() = r.Ref(0, n);
    absl::StatusOr<Resp> resp = Send(client_, static_cast<const Req&>(request), call);
    if (!resp.ok() && attempt == 0 && RegionExpired(resp.status(), r.name())) {
      pool.Drop(*std::move(region));  // send again through a new one
      continue;
    }
    if (resp.ok()) {
      v1::Tensor* o = MutableTensorOf(&*resp);
      if (absl::Status got = r.Get(*o, out, n, stream); got.ok()) {
        o->clear_shared_memory();
      } else {
        resp = got;
      }
    }
    pool.Give(*std::move(region));
    return resp;
  }
}

template <class Req, class Resp>
absl::StatusOr<Resp> CudaActivations::CallThroughHost(Req request, int device, const void* x, void* out, int64_t n,
                                                      cudaStream_t stream, const CallOptions& call) {
  v1::Tensor* t = MutableTensorOf(&request);
  t->clear_shared_memory();  // named by an attempt whose region had expired
  request.clear_output_shared_memory();
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
