#include "server/convert.h"

#include "absl/strings/str_cat.h"

namespace blockd {

grpc::Status ToGrpcStatus(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  // absl::StatusCode and grpc::StatusCode share their numbering (both follow google.rpc.Code).
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

void ToProto(const BlockInfo& info, absl::string_view backend, v1::BlockInfo* out) {
  out->set_block_id(info.spec.id);
  ToProto(info.spec.config, out->mutable_config());
  out->set_layer_index(info.spec.layer_index);
  out->set_precision(ToProto(info.spec.precision));
  out->set_device(info.spec.device);
  out->set_parameter_count(info.parameter_count);
  out->set_memory_bytes(info.memory_bytes);
  out->set_weights_loaded(info.weights_loaded);
  out->set_step(info.step);
  out->set_max_seq_len(info.spec.max_seq_len);
  out->set_max_batch_size(info.spec.max_batch_size);
  for (const std::string& m : info.missing_weights) out->add_missing_weights(m);
  out->set_has_gradients(info.has_gradients);
  out->set_backend(std::string(backend));
  // Rounded up: a lease of a fraction of a second (engine API) must not read as 0, "no lease".
  out->set_ttl_seconds(absl::ToInt64Seconds(absl::Ceil(info.ttl, absl::Seconds(1))));
  out->set_idle_seconds(absl::ToDoubleSeconds(info.idle));
  out->set_attention_backend(info.attention.backend);
  out->set_attention_reason(info.attention.reason);
  out->set_frozen(info.spec.frozen);
  if (info.spec.lora.rank > 0) ToProto(info.spec.lora, out->mutable_lora());
}

absl::StatusOr<TensorKind> FromProto(v1::TensorKind k) {
  switch (k) {
    case v1::TENSOR_KIND_WEIGHTS: return TensorKind::kWeights;
    case v1::TENSOR_KIND_GRADIENTS: return TensorKind::kGradients;
    case v1::TENSOR_KIND_ADAM_M: return TensorKind::kAdamM;
    case v1::TENSOR_KIND_ADAM_V: return TensorKind::kAdamV;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "kind = ", static_cast<int>(k),
          ", expected TENSOR_KIND_WEIGHTS, TENSOR_KIND_GRADIENTS, TENSOR_KIND_ADAM_M or TENSOR_KIND_ADAM_V"));
  }
}

absl::StatusOr<TensorArg> TensorArgOf(const v1::Tensor& t, absl::string_view what) {
  TensorArg arg;
  auto dtype = FromProto(t.dtype(), absl::StrCat(what, ".dtype"));
  if (!dtype.ok()) return dtype.status();
  arg.dtype = *dtype;
  for (int64_t d : t.shape()) {
    if (d < 0 || d > (int64_t{1} << 40)) {
      return absl::InvalidArgumentError(absl::StrCat(what, ".shape has dimension ", d, ", expected 0..2^40"));
    }
    arg.shape.push_back(d);
  }
  arg.data = t.data().data();
  arg.size = t.data().size();
  return arg;
}

AdamWHyper FromProto(const v1::AdamW& a) {
  AdamWHyper h;
  if (a.has_lr()) h.lr = a.lr();
  if (a.has_beta1()) h.beta1 = a.beta1();
  if (a.has_beta2()) h.beta2 = a.beta2();
  if (a.has_eps()) h.eps = a.eps();
  if (a.has_weight_decay()) h.weight_decay = a.weight_decay();
  h.decay_norm_weights = a.decay_norm_weights();
  return h;
}

}  // namespace blockd
