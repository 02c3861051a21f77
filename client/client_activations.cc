// The Client's activation calls (Forward, Backward, InferStep) and how their tensors travel
// (ClientOptions::transport): inside the messages (client.cc sends them), or through the client's
// own shared-memory regions, handing the reply back inline as if it had travelled in the messages.
#include <algorithm>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "client/client.h"
#include "client/shared_memory_region.h"

namespace blockd {

// The client's shared-memory regions for ClientOptions::transport: taken by one call at a time,
// given back after it, at most kMaxRegions (the daemon allows 16 per identity by default).
class Client::RegionPool {
 public:
  static constexpr int kMaxRegions = 8;
  static constexpr int64_t kMinBytes = 1 << 20;

  // An idle region of at least `bytes`, or a new one; nullptr when kAuto should send inline
  // (no shared memory with this daemon, or every region busy).
  absl::StatusOr<std::unique_ptr<SharedMemoryRegion>> Take(Client* client, int64_t bytes) {
    const bool insist = client->options_.transport == Transport::kSharedMemory;
    std::unique_ptr<SharedMemoryRegion> too_small;  // destroyed (unregistered) outside the lock
    {
      absl::MutexLock lock(&mu_);
      if (refused_ && !insist) return nullptr;
      auto fits = std::find_if(idle_.begin(), idle_.end(), [&](const auto& r) { return r->size() >= bytes; });
      if (fits != idle_.end()) {
        std::unique_ptr<SharedMemoryRegion> r = std::move(*fits);
        idle_.erase(fits);
        return r;
      }
      if (live_ >= kMaxRegions && !idle_.empty()) {
        too_small = std::move(idle_.back());
        idle_.pop_back();
        --live_;
      }
      if (live_ >= kMaxRegions) {
        if (!insist) return nullptr;
        return absl::ResourceExhaustedError(absl::StrCat("the client's ", kMaxRegions,
                                                         " shared-memory regions are all in use by calls in flight"));
      }
      ++live_;
    }
    too_small.reset();
    // Registering says it all: FAILED_PRECONDITION from a daemon without --allow_shared_memory,
    // NOT_FOUND from one on another host (no such object there).
    auto r = SharedMemoryRegion::Create(client, std::max(bytes, kMinBytes));
    if (r.ok()) return std::move(r).value();
    absl::MutexLock lock(&mu_);
    --live_;
    if (insist) return r.status();
    // A daemon that is only unreachable now is asked again next time; any other answer stands.
    const absl::StatusCode code = r.status().code();
    if (code != absl::StatusCode::kUnavailable && code != absl::StatusCode::kDeadlineExceeded) refused_ = true;
    return nullptr;
  }

  void Give(std::unique_ptr<SharedMemoryRegion> r) {
    absl::MutexLock lock(&mu_);
    idle_.push_back(std::move(r));
  }

  // A region the daemon no longer has (expired by --shared_memory_ttl): unregistered and unmapped.
  void Drop(std::unique_ptr<SharedMemoryRegion> r) {
    r.reset();
    absl::MutexLock lock(&mu_);
    --live_;
  }

 private:
  absl::Mutex mu_;
  std::vector<std::unique_ptr<SharedMemoryRegion>> idle_ ABSL_GUARDED_BY(mu_);
  int live_ ABSL_GUARDED_BY(mu_) = 0;  // idle and taken
  bool refused_ ABSL_GUARDED_BY(mu_) = false;
};

void Client::InitTransport() { regions_.reset(new RegionPool()); }

void Client::RegionPoolDeleter::operator()(RegionPool* pool) const { delete pool; }

namespace {

const v1::Tensor& TensorOf(const v1::ForwardRequest& r) { return r.input(); }
const v1::Tensor& TensorOf(const v1::BackwardRequest& r) { return r.grad_output(); }
const v1::Tensor& TensorOf(const v1::InferStepRequest& r) { return r.hidden_states(); }
v1::Tensor* MutableTensorOf(v1::ForwardRequest* r) { return r->mutable_input(); }
v1::Tensor* MutableTensorOf(v1::BackwardRequest* r) { return r->mutable_grad_output(); }
v1::Tensor* MutableTensorOf(v1::InferStepRequest* r) { return r->mutable_hidden_states(); }
v1::Tensor* MutableTensorOf(v1::ForwardResponse* r) { return r->mutable_output(); }
v1::Tensor* MutableTensorOf(v1::BackwardResponse* r) { return r->mutable_grad_input(); }
v1::Tensor* MutableTensorOf(v1::InferStepResponse* r) { return r->mutable_hidden_states(); }

}  // namespace

template <class Req>
bool Client::WantsSharedMemory(const Req& request) const {
  const v1::Tensor& t = TensorOf(request);
  return options_.transport != Transport::kGrpc && !t.data().empty() && !t.has_shared_memory() &&
         !request.has_output_shared_memory();
}

template <class Req, class Resp>
absl::StatusOr<Resp> Client::Route(const Req& request, const CallOptions& call, Send<Req, Resp> send) {
  if (!WantsSharedMemory(request)) return (this->*send)(request, call);
  return ThroughSharedMemory(Req(request), call, send);  // the one copy of a caller's request
}

template <class Req, class Resp>
absl::StatusOr<Resp> Client::RouteOwned(Req request, const CallOptions& call, Send<Req, Resp> send) {
  if (!WantsSharedMemory(request)) return (this->*send)(request, call);
  return ThroughSharedMemory(std::move(request), call, send);
}

template <class Req, class Resp>
absl::StatusOr<Resp> Client::ThroughSharedMemory(Req request, const CallOptions& call, Send<Req, Resp> send) {
  v1::Tensor* in = MutableTensorOf(&request);
  const v1::DType dtype = in->dtype();
  const std::vector<int64_t> shape(in->shape().begin(), in->shape().end());
  std::string data = std::move(*in->mutable_data());
  in->clear_data();
  for (int attempt = 0;; ++attempt) {
    absl::StatusOr<std::unique_ptr<SharedMemoryRegion>> region = regions_->Take(this, static_cast<int64_t>(data.size()));
    if (!region.ok()) return region.status();
    if (*region == nullptr) {  // kAuto without shared memory: inside the message after all
      in->set_data(std::move(data));
      request.clear_output_shared_memory();
      return (this->*send)(request, call);
    }
    SharedMemoryRegion& r = **region;
    absl::StatusOr<v1::Tensor> put = r.Put(0, dtype, shape, data);
    if (!put.ok()) {
      regions_->Give(std::move(*region));
      return put.status();
    }
    *in = *std::move(put);
    // The reply has the request's shape and dtype; the daemon reads all of the input first.
    *request.mutable_output_shared_memory() = r.Ref(0, static_cast<int64_t>(data.size()));
    absl::StatusOr<Resp> resp = (this->*send)(request, call);
    if (!resp.ok() && attempt == 0 && resp.status().code() == absl::StatusCode::kNotFound &&
        absl::StrContains(resp.status().message(), r.name())) {
      // Unused past the daemon's --shared_memory_ttl, the region was unregistered (and nothing
      // ran: the regions are checked first): send again through a new one.
      regions_->Drop(std::move(*region));
      continue;
    }
    if (resp.ok()) {
      v1::Tensor* out = MutableTensorOf(&*resp);
      if (out->has_shared_memory()) {
        absl::StatusOr<std::string> bytes = r.Get(*out);
        if (!bytes.ok()) {
          regions_->Give(std::move(*region));
          return bytes.status();
        }
        out->clear_shared_memory();
        out->set_data(*std::move(bytes));
      }
    }
    regions_->Give(std::move(*region));
    return resp;
  }
}

absl::StatusOr<v1::ForwardResponse> Client::Forward(const v1::ForwardRequest& request, const CallOptions& call) {
  return Route(request, call, &Client::SendForward);
}

absl::StatusOr<v1::ForwardResponse> Client::Forward(const std::vector<std::string>& block_ids, v1::Tensor input,
                                                    bool keep_activations, int64_t position_offset,
                                                    const CallOptions& call) {
  v1::ForwardRequest request;
  for (const std::string& id : block_ids) request.add_block_ids(id);
  *request.mutable_input() = std::move(input);
  request.set_keep_activations(keep_activations);
  request.set_position_offset(position_offset);
  return RouteOwned(std::move(request), call, &Client::SendForward);
}

absl::StatusOr<v1::BackwardResponse> Client::Backward(absl::string_view activation_id, v1::Tensor grad_output,
                                                      const CallOptions& call) {
  v1::BackwardRequest request;
  request.set_activation_id(std::string(activation_id));
  *request.mutable_grad_output() = std::move(grad_output);
  return RouteOwned(std::move(request), call, &Client::SendBackward);
}

absl::StatusOr<v1::BackwardResponse> Client::Backward(const v1::BackwardRequest& request, const CallOptions& call) {
  return Route(request, call, &Client::SendBackward);
}

absl::StatusOr<v1::InferStepResponse> Client::InferStep(const v1::InferStepRequest& request,
                                                        const CallOptions& call) {
  return Route(request, call, &Client::SendInferStep);
}

}  // namespace blockd
