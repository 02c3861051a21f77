#include "proto/config_convert.h"

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace blockd {

BlockConfig FromProto(const v1::BlockConfig& c) {
  BlockConfig out;
  out.hidden_size = c.hidden_size();
  out.num_attention_heads = c.num_attention_heads();
  out.num_kv_heads = c.num_kv_heads();
  out.head_dim = c.head_dim();
  out.intermediate_size = c.intermediate_size();
  out.rms_norm_eps = c.rms_norm_eps();
  out.rope_theta = c.rope_theta();
  out.qk_norm = c.qk_norm();
  out.attention_bias = c.attention_bias();
  const v1::RopeScaling& r = c.rope_scaling();
  out.rope_scaling.rope_type = r.rope_type();
  out.rope_scaling.factor = r.factor();
  out.rope_scaling.low_freq_factor = r.low_freq_factor();
  out.rope_scaling.high_freq_factor = r.high_freq_factor();
  out.rope_scaling.original_max_position_embeddings = r.original_max_position_embeddings();
  out.rope_scaling.attention_factor = r.attention_factor();
  out.rope_scaling.beta_fast = r.beta_fast();
  out.rope_scaling.beta_slow = r.beta_slow();
  return out;
}

void ToProto(const BlockConfig& c, v1::BlockConfig* out) {
  out->set_hidden_size(c.hidden_size);
  out->set_num_attention_heads(c.num_attention_heads);
  out->set_num_kv_heads(c.num_kv_heads);
  out->set_head_dim(c.head_dim);
  out->set_intermediate_size(c.intermediate_size);
  out->set_rms_norm_eps(c.rms_norm_eps);
  out->set_rope_theta(c.rope_theta);
  out->set_qk_norm(c.qk_norm);
  out->set_attention_bias(c.attention_bias);
  // Plain RoPE leaves the message unset, so replies about plain blocks read as before.
  if (c.rope_scaling.is_default()) {
    out->clear_rope_scaling();
    return;
  }
  const RopeScaling& r = c.rope_scaling;
  v1::RopeScaling* w = out->mutable_rope_scaling();
  w->set_rope_type(r.rope_type);
  w->set_factor(r.factor);
  w->set_low_freq_factor(r.low_freq_factor);
  w->set_high_freq_factor(r.high_freq_factor);
  w->set_original_max_position_embeddings(r.original_max_position_embeddings);
  w->set_attention_factor(r.attention_factor);
  w->set_beta_fast(r.beta_fast);
  w->set_beta_slow(r.beta_slow);
}

LoraConfig FromProto(const v1::LoraConfig& l) {
  LoraConfig out;
  out.rank = l.rank();
  out.alpha = l.alpha();
  out.target_modules.assign(l.target_modules().begin(), l.target_modules().end());
  return out;
}

void ToProto(const LoraConfig& l, v1::LoraConfig* out) {
  out->set_rank(l.rank);
  out->set_alpha(l.alpha);
  for (const std::string& m : l.target_modules) out->add_target_modules(m);
}

v1::BlockConfig ToProto(const BlockConfig& c) {
  v1::BlockConfig out;
  ToProto(c, &out);
  return out;
}

absl::StatusOr<std::optional<Precision>> FromProto(v1::Precision p) {
  switch (p) {
    case v1::PRECISION_UNSPECIFIED: return std::optional<Precision>();
    case v1::PRECISION_FP32: return std::optional<Precision>(Precision::kFP32);
    case v1::PRECISION_TF32: return std::optional<Precision>(Precision::kTF32);
    case v1::PRECISION_BF16: return std::optional<Precision>(Precision::kBF16);
    default: return absl::InvalidArgumentError(absl::StrCat("precision = ", static_cast<int>(p), " is not a Precision"));
  }
}

v1::Precision ToProto(Precision p) {
  switch (p) {
    case Precision::kFP32: return v1::PRECISION_FP32;
    case Precision::kTF32: return v1::PRECISION_TF32;
    case Precision::kBF16: return v1::PRECISION_BF16;
  }
  return v1::PRECISION_UNSPECIFIED;
}

absl::StatusOr<v1::Precision> ParsePrecisionName(absl::string_view text) {
  const std::string p = absl::AsciiStrToLower(text);
  if (p.empty() || p == "default") return v1::PRECISION_UNSPECIFIED;
  if (p == "fp32" || p == "float32") return v1::PRECISION_FP32;
  if (p == "tf32") return v1::PRECISION_TF32;
  if (p == "bf16" || p == "bfloat16") return v1::PRECISION_BF16;
  return absl::InvalidArgumentError(absl::StrCat("--precision=", text, ": expected fp32, tf32 or bf16"));
}

std::string PrecisionName(v1::Precision p) {
  auto engine = FromProto(p);
  if (!engine.ok() || !engine->has_value()) return "default";
  return std::string(PrecisionName(**engine));
}

absl::StatusOr<DType> FromProto(v1::DType t, absl::string_view what) {
  switch (t) {
    case v1::DTYPE_FLOAT32: return DType::kFloat32;
    case v1::DTYPE_BFLOAT16: return DType::kBFloat16;
    case v1::DTYPE_FLOAT16: return DType::kFloat16;
    default:
      return absl::InvalidArgumentError(absl::StrCat(what, " is ", v1::DType_Name(t).empty() ? std::to_string(t) : v1::DType_Name(t),
                                                     ", expected DTYPE_FLOAT32, DTYPE_BFLOAT16 or DTYPE_FLOAT16"));
  }
}

v1::DType ToProto(DType t) {
  switch (t) {
    case DType::kFloat32: return v1::DTYPE_FLOAT32;
    case DType::kBFloat16: return v1::DTYPE_BFLOAT16;
    case DType::kFloat16: return v1::DTYPE_FLOAT16;
  }
  return v1::DTYPE_UNSPECIFIED;
}

}  // namespace blockd
