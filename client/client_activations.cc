// The Client's activation calls (Forward, Backward, InferStep) and how their tensors travel
// (ClientOptions::transport): inside the messages (client.cc sends them), or through the client's
// own shared-memory regions, handing the reply back inline as if it had travelled in the messages.
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <google/protobuf/field_mask.pb.h>
#include <google/protobuf/util/field_mask_util.h>

#include "base/parallel_copy.h"
#include "client/activation_tensors.h"
#include "client/client.h"
#include "client/region_pool.h"
#include "client/shared_memory_region.h"

namespace blockd {

// The client's shared-memory regions for ClientOptions::transport (client/region_pool.h).
class Client::RegionPool : public blockd::RegionPool<SharedMemoryRegion> {};

void Client::InitTransport() { regions_.reset(new RegionPool()); }

void Client::RegionPoolDeleter::operator()(RegionPool* pool) const { delete pool; }

namespace {

// A copy of a caller's request to send: protobuf's own copy would move a 34 MB tensor on one
// core; its bytes are copied over a few threads instead (base/parallel_copy.h), the rest by a
// field mask of every field but the tensor's data.
template <class Req>
Req CopyToSend(const Req& request) {
  using google::protobuf::util::FieldMaskUtil;
  static const google::protobuf::FieldMask* const all_but_data = [] {
    auto* mask = new google::protobuf::FieldMask();
    const google::protobuf::Descriptor* d = Req::descriptor();
    for (int i = 0; i < d->field_count(); ++i) {
      const google::protobuf::FieldDescriptor* f = d->field(i);
      if (f->message_type() != v1::Tensor::descriptor()) {
        mask->add_paths(f->name());
        continue;
      }
      const google::protobuf::Descriptor* t = v1::Tensor::descriptor();
      for (int j = 0; j < t->field_count(); ++j) {
        if (t->field(j)->number() != v1::Tensor::kDataFieldNumber) mask->add_paths(f->name() + "." + t->field(j)->name());
      }
    }
    return mask;
  }();
  Req copy;
  FieldMaskUtil::MergeMessageTo(request, *all_but_data, FieldMaskUtil::MergeOptions(), &copy);
  const std::string& data = TensorOf(request).data();
  if (!data.empty()) {
    std::string bytes(data.size(), '\0');
    ParallelCopy(bytes.data(), data.data(), data.size());
    MutableTensorOf(&copy)->set_data(std::move(bytes));
  }
  return copy;
}

}  // namespace

template <class Req>
bool Client::WantsSharedMemory(const Req& request) const {
  const v1::Tensor& t = TensorOf(request);
  return options_.transport != Transport::kGrpc && !t.data().empty() && !t.has_shared_memory() &&
         !request.has_output_shared_memory();
}

template <class Req, class Resp>
absl::StatusOr<Resp> Client::Route(const Req& request, const CallOptions& call, Send<Req, Resp> send) {
  // The one copy of a caller's request (which serialising it would have made).
  if (!WantsSharedMemory(request)) return (this->*send)(CopyToSend(request), call);
  return ThroughSharedMemory(CopyToSend(request), call, send);
}

template <class Req, class Resp>
absl::StatusOr<Resp> Client::RouteOwned(Req request, const CallOptions& call, Send<Req, Resp> send) {
  if (!WantsSharedMemory(request)) return (this->*send)(std::move(request), call);
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
    absl::StatusOr<std::unique_ptr<SharedMemoryRegion>> region =
        regions_->Take(static_cast<int64_t>(data.size()), options_.transport == Transport::kSharedMemory,
                       [this](int64_t size) { return SharedMemoryRegion::Create(this, size); });
    if (!region.ok()) return region.status();
    if (*region == nullptr) {  // kAuto without shared memory: inside the message after all
      in->set_data(std::move(data));
      request.clear_output_shared_memory();
      return (this->*send)(std::move(request), call);
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
    absl::StatusOr<Resp> resp = (this->*send)(Req(request), call);  // small: its tensor is in the region
    if (!resp.ok() && attempt == 0 && RegionExpired(resp.status(), r.name())) {  // send again through a new one
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

absl::StatusOr<v1::ForwardResponse> Client::Forward(v1::ForwardRequest&& request, const CallOptions& call) {
  return RouteOwned(std::move(request), call, &Client::SendForward);
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

absl::StatusOr<v1::BackwardResponse> Client::Backward(v1::BackwardRequest&& request, const CallOptions& call) {
  return RouteOwned(std::move(request), call, &Client::SendBackward);
}

absl::StatusOr<v1::InferStepResponse> Client::InferStep(const v1::InferStepRequest& request,
                                                        const CallOptions& call) {
  return Route(request, call, &Client::SendInferStep);
}

}  // namespace blockd
