#include "base/block_config.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/echo.h"
#include "base/status_macros.h"

namespace blockd {

bool RopeScaling::operator==(const RopeScaling& o) const {
  return rope_type == o.rope_type && factor == o.factor && low_freq_factor == o.low_freq_factor &&
         high_freq_factor == o.high_freq_factor &&
         original_max_position_embeddings == o.original_max_position_embeddings &&
         attention_factor == o.attention_factor && beta_fast == o.beta_fast && beta_slow == o.beta_slow;
}

bool BlockConfig::operator==(const BlockConfig& o) const {
  return hidden_size == o.hidden_size && num_attention_heads == o.num_attention_heads &&
         num_kv_heads == o.num_kv_heads && head_dim == o.head_dim &&
         intermediate_size == o.intermediate_size && rms_norm_eps == o.rms_norm_eps &&
         rope_theta == o.rope_theta && qk_norm == o.qk_norm && rope_scaling == o.rope_scaling &&
         attention_bias == o.attention_bias;
}

absl::string_view PrecisionName(Precision p) {
  switch (p) {
    case Precision::kFP32: return "fp32";
    case Precision::kTF32: return "tf32";
    case Precision::kBF16: return "bf16";
  }
  return "?";
}

namespace {

absl::Status CheckRange(absl::string_view field, int64_t v, int64_t lo, int64_t hi) {
  if (v < lo || v > hi) {
    return absl::InvalidArgumentError(
        absl::StrCat("config.", field, " = ", v, ", expected ", lo, "..", hi));
  }
  return absl::OkStatus();
}

}  // namespace

void FillUnsetConfigDefaults(BlockConfig* c) {
  if (c->rms_norm_eps == 0) c->rms_norm_eps = kDefaultRmsNormEps;
  if (c->rope_theta == 0) c->rope_theta = kDefaultRopeTheta;
}

absl::Status ValidateBlockConfig(const BlockConfig& c) {
  if (auto s = CheckRange("hidden_size", c.hidden_size, 1, 65536); !s.ok()) return s;
  if (auto s = CheckRange("num_attention_heads", c.num_attention_heads, 1, 1024); !s.ok()) return s;
  if (auto s = CheckRange("num_kv_heads", c.num_kv_heads, 1, 1024); !s.ok()) return s;
  if (auto s = CheckRange("head_dim", c.head_dim, 2, 512); !s.ok()) return s;
  if (auto s = CheckRange("intermediate_size", c.intermediate_size, 1, 262144); !s.ok()) return s;
  if (c.head_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("config.head_dim = ", c.head_dim, ", expected an even number (RoPE pairs i, i+head_dim/2)"));
  }
  if (c.num_attention_heads % c.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "config.num_attention_heads = ", c.num_attention_heads, " is not a multiple of config.num_kv_heads = ",
        c.num_kv_heads));
  }
  if (c.q_dim() > 65536) {
    return absl::InvalidArgumentError(absl::StrCat("config.num_attention_heads * config.head_dim = ", c.q_dim(),
                                                   ", expected at most 65536"));
  }
  if (!std::isfinite(c.rms_norm_eps) || c.rms_norm_eps <= 0 || c.rms_norm_eps >= 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("config.rms_norm_eps = ", c.rms_norm_eps, ", expected a number in (0, 1)"));
  }
  if (!std::isfinite(c.rope_theta) || c.rope_theta <= 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("config.rope_theta = ", c.rope_theta, ", expected a finite number > 1"));
  }
  return ValidateRopeScaling(c.rope_scaling);
}

absl::Status ValidateRopeScaling(const RopeScaling& r) {
  if (r.is_default()) return absl::OkStatus();
  const std::string& t = r.rope_type;
  if (t != "linear" && t != "llama3" && t != "yarn") {
    return absl::InvalidArgumentError(absl::StrCat("config.rope_scaling.rope_type = \"", Echo(t),
                                                   "\", expected default, linear, llama3 or yarn"));
  }
  auto positive = [&](absl::string_view field, double v) -> absl::Status {
    if (std::isfinite(v) && v > 0) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat("config.rope_scaling.", field, " = ", v, ", expected a finite number > 0 for rope_type ", t));
  };
  RETURN_IF_ERROR(positive("factor", r.factor));
  if (t == "llama3" || t == "yarn") {
    if (r.original_max_position_embeddings <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("config.rope_scaling.original_max_position_embeddings = ",
                                                     r.original_max_position_embeddings, ", expected > 0 for rope_type ", t));
    }
  }
  if (t == "llama3") {
    RETURN_IF_ERROR(positive("low_freq_factor", r.low_freq_factor));
    RETURN_IF_ERROR(positive("high_freq_factor", r.high_freq_factor));
    // HF's smooth factor divides by high - low; Llama 3.1's 1 and 4 keep it positive.
    if (r.high_freq_factor <= r.low_freq_factor) {
      return absl::InvalidArgumentError(absl::StrCat("config.rope_scaling.high_freq_factor = ", r.high_freq_factor,
                                                     " must exceed low_freq_factor = ", r.low_freq_factor));
    }
  }
  if (t == "yarn") {
    // 0 means unset (HF's defaults); anything else must be a usable number.
    for (auto [field, v] : {std::pair<absl::string_view, double>{"attention_factor", r.attention_factor},
                            {"beta_fast", r.beta_fast}, {"beta_slow", r.beta_slow}}) {
      if (v != 0) RETURN_IF_ERROR(positive(field, v));
    }
  }
  return absl::OkStatus();
}

int64_t ParamSpec::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::vector<ParamSpec> BlockParams(const BlockConfig& c) {
  const int64_t d = c.hidden_size, f = c.intermediate_size;
  std::vector<ParamSpec> p;
  p.push_back({ParamId::kInputNorm, "input_layernorm.weight", {d}, false});
  p.push_back({ParamId::kQProj, "self_attn.q_proj.weight", {c.q_dim(), d}, true});
  if (c.attention_bias) p.push_back({ParamId::kQBias, "self_attn.q_proj.bias", {c.q_dim()}, false});
  p.push_back({ParamId::kKProj, "self_attn.k_proj.weight", {c.kv_dim(), d}, true});
  if (c.attention_bias) p.push_back({ParamId::kKBias, "self_attn.k_proj.bias", {c.kv_dim()}, false});
  p.push_back({ParamId::kVProj, "self_attn.v_proj.weight", {c.kv_dim(), d}, true});
  if (c.attention_bias) p.push_back({ParamId::kVBias, "self_attn.v_proj.bias", {c.kv_dim()}, false});
  p.push_back({ParamId::kOProj, "self_attn.o_proj.weight", {d, c.q_dim()}, true});
  if (c.qk_norm) {
    p.push_back({ParamId::kQNorm, "self_attn.q_norm.weight", {c.head_dim}, false});
    p.push_back({ParamId::kKNorm, "self_attn.k_norm.weight", {c.head_dim}, false});
  }
  p.push_back({ParamId::kPostNorm, "post_attention_layernorm.weight", {d}, false});
  p.push_back({ParamId::kGateProj, "mlp.gate_proj.weight", {f, d}, true});
  p.push_back({ParamId::kUpProj, "mlp.up_proj.weight", {f, d}, true});
  p.push_back({ParamId::kDownProj, "mlp.down_proj.weight", {d, f}, true});
  return p;
}

std::vector<ParamSpec> BlockParams(const BlockConfig& c, const LoraConfig& lora) {
  std::vector<ParamSpec> p = BlockParams(c);
  if (lora.rank <= 0) return p;
  const size_t base = p.size();
  for (const LoraTarget& t : kLoraTargets) {
    if (std::find(lora.target_modules.begin(), lora.target_modules.end(), t.module) == lora.target_modules.end()) {
      continue;
    }
    const ParamSpec* w = nullptr;
    for (size_t i = 0; i < base; ++i) {
      if (p[i].id == t.base) w = &p[i];
    }
    const std::string stem = w->name.substr(0, w->name.size() - std::string(".weight").size());
    const int64_t out = w->shape[0], in = w->shape[1];
    ParamSpec a{t.a, absl::StrCat(stem, ".lora_A.weight"), {lora.rank, in}, true};
    ParamSpec b{t.b, absl::StrCat(stem, ".lora_B.weight"), {out, lora.rank}, true};
    p.push_back(std::move(a));
    p.push_back(std::move(b));
  }
  return p;
}

int64_t ParameterCount(const BlockConfig& c) { return ParameterCount(c, LoraConfig{}); }

int64_t ParameterCount(const BlockConfig& c, const LoraConfig& lora) {
  int64_t n = 0;
  for (const ParamSpec& p : BlockParams(c, lora)) n += p.numel();
  return n;
}

bool LoraConfig::operator==(const LoraConfig& o) const {
  return rank == o.rank && alpha == o.alpha && target_modules == o.target_modules;
}

absl::Status ValidateLoraConfig(const LoraConfig& lora, const BlockConfig& c) {
  std::vector<std::string> known;
  for (const LoraTarget& t : kLoraTargets) known.push_back(t.module);
  const std::string known_list = absl::StrJoin(known, " ");
  if (lora.target_modules.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("lora.target_modules is empty, expected one or more of ", known_list));
  }
  for (size_t i = 0; i < lora.target_modules.size(); ++i) {
    const std::string& m = lora.target_modules[i];
    if (std::find(known.begin(), known.end(), m) == known.end()) {
      return absl::InvalidArgumentError(absl::StrCat("lora.target_modules[", i, "] = \"", Echo(m),
                                                     "\", expected one of ", known_list));
    }
    for (size_t j = 0; j < i; ++j) {
      if (lora.target_modules[j] == m) {
        return absl::InvalidArgumentError(absl::StrCat("lora.target_modules names ", m, " twice (at ", j, " and ", i,
                                                       "), expected each module at most once"));
      }
    }
  }
  // The largest rank every target allows: min(in, out) of each targeted matrix.
  int64_t max_rank = std::numeric_limits<int64_t>::max();
  std::string limiting;
  for (const ParamSpec& p : BlockParams(c)) {
    for (const LoraTarget& t : kLoraTargets) {
      if (p.id != t.base || std::find(lora.target_modules.begin(), lora.target_modules.end(), t.module) ==
                                lora.target_modules.end()) {
        continue;
      }
      const int64_t m = std::min(p.shape[0], p.shape[1]);
      if (m < max_rank) {
        max_rank = m;
        limiting = absl::StrCat(t.module, " ", ShapeString(p.shape));
      }
    }
  }
  if (lora.rank < 1 || lora.rank > max_rank) {
    return absl::InvalidArgumentError(absl::StrCat("lora.rank = ", lora.rank, ", expected 1..", max_rank,
                                                   " (min(out, in) of ", limiting, ")"));
  }
  if (!std::isfinite(lora.alpha) || lora.alpha <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("lora.alpha = ", lora.alpha, ", expected a finite number > 0 (the scale is alpha / rank)"));
  }
  return absl::OkStatus();
}

void NormaliseLoraConfig(LoraConfig* lora) {
  std::vector<std::string> ordered;
  for (const LoraTarget& t : kLoraTargets) {
    if (std::find(lora->target_modules.begin(), lora->target_modules.end(), t.module) != lora->target_modules.end()) {
      ordered.push_back(t.module);
    }
  }
  lora->target_modules = std::move(ordered);
}

int FindParam(const std::vector<ParamSpec>& params, absl::string_view name) {
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].name == name) return static_cast<int>(i);
  }
  return -1;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ","), "]");
}

}  // namespace blockd
