#include "proto/hf_config.h"

#include <algorithm>
#include <fstream>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace blockd {
namespace {

using nlohmann::json;

// Python's truthiness of a JSON value: blockd.config reads config.json with json.load and tests
// fields with `if c.get(...)`, and both languages must accept and refuse the same files.
bool Truthy(const json& v) {
  if (v.is_null()) return false;
  if (v.is_boolean()) return v.get<bool>();
  if (v.is_number_integer()) return v.get<int64_t>() != 0;
  if (v.is_number()) return v.get<double>() != 0;
  if (v.is_string() || v.is_array() || v.is_object()) return !v.empty();
  return true;
}

bool TruthyField(const json& c, const char* key) { return c.contains(key) && Truthy(c[key]); }

// A value as it appears in messages: compact JSON with sorted keys (nlohmann's json is a std::map),
// which is what Python's json.dumps(v, sort_keys=True, separators=(",", ":")) writes too.
std::string Shown(const json& v) { return v.dump(); }

// A RoPE variant other than plain rope_theta (rope_scaling, or transformers 5's rope_parameters).
bool ScaledRope(const json& r) {
  if (!Truthy(r)) return false;
  if (!r.is_object()) return true;
  for (const char* key : {"rope_type", "type"}) {
    if (r.contains(key) && Truthy(r[key])) return !(r[key].is_string() && r[key].get<std::string>() == "default");
  }
  return false;
}

const json& TextConfig(const json& j) {
  if (j.contains("text_config") && j["text_config"].is_object()) return j["text_config"];
  return j;
}

absl::Status CheckSupported(const json& c) {
  const json model_type = c.value("model_type", json());
  const bool known = model_type.is_string() &&
                     std::find(std::begin(kHfModelTypes), std::end(kHfModelTypes), model_type.get<std::string>()) !=
                         std::end(kHfModelTypes);
  if (!known) {
    return absl::InvalidArgumentError(absl::StrCat("model_type ", Shown(model_type), ": blockd blocks are ",
                                                   "llama, qwen2 or qwen3 decoder layers"));
  }
  const json act = c.contains("hidden_act") ? c["hidden_act"] : c.value("hidden_activation", json("silu"));
  if (!act.is_string() || act.get<std::string>() != "silu") {
    return absl::InvalidArgumentError(absl::StrCat("hidden_act ", Shown(act), ": blockd blocks compute a SiLU-gated MLP"));
  }
  for (const char* key : {"rope_scaling", "rope_parameters"}) {
    if (c.contains(key) && ScaledRope(c[key])) {
      return absl::InvalidArgumentError(
          absl::StrCat(key, " ", Shown(c[key]), ": blockd blocks compute plain RoPE (rope_theta only)"));
    }
  }
  for (const char* flag : {"attention_bias", "mlp_bias"}) {
    if (TruthyField(c, flag)) {
      return absl::InvalidArgumentError(absl::StrCat(flag, " is true: blockd blocks have no bias terms"));
    }
  }
  if (TruthyField(c, "use_sliding_window") && TruthyField(c, "sliding_window")) {
    return absl::InvalidArgumentError("use_sliding_window is true: blockd blocks compute full causal attention");
  }
  return absl::OkStatus();
}

// A positive integer field. Absent or null: `fallback` when given, else "config.json has no KEY";
// 0 also takes the fallback where there is one (Hugging Face writes head_dim 0 / null for "derive").
absl::StatusOr<int64_t> PositiveInt(const json& c, const char* key, std::optional<int64_t> fallback) {
  const bool given = c.contains(key) && !c[key].is_null();
  if (!given) {
    if (fallback.has_value()) return *fallback;
    return absl::InvalidArgumentError(absl::StrCat("config.json has no ", key));
  }
  const json& v = c[key];
  if (v.is_number_integer()) {
    const int64_t n = v.get<int64_t>();
    if (n == 0 && fallback.has_value()) return *fallback;
    if (n > 0) return n;
  }
  return absl::InvalidArgumentError(absl::StrCat(key, " is ", Shown(v), ", expected a positive integer"));
}

absl::StatusOr<double> Number(const json& v, const std::string& what, double fallback) {
  if (v.is_null()) return fallback;
  if (!v.is_number()) return absl::InvalidArgumentError(absl::StrCat(what, " is ", Shown(v), ", expected a number"));
  return v.get<double>();
}

}  // namespace

absl::StatusOr<json> ReadHfConfig(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  json j;
  try {
    in >> j;
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, " is not JSON: ", e.what()));
  }
  if (!j.is_object()) return absl::InvalidArgumentError(absl::StrCat(path, " is not a JSON object"));
  return json(TextConfig(j));
}

absl::StatusOr<BlockConfig> BlockConfigFromHf(const json& config) {
  if (!config.is_object()) return absl::InvalidArgumentError("config.json is not a JSON object");
  const json& c = TextConfig(config);
  if (absl::Status s = CheckSupported(c); !s.ok()) return s;
  BlockConfig out;
  auto hidden = PositiveInt(c, "hidden_size", std::nullopt);
  if (!hidden.ok()) return hidden.status();
  auto heads = PositiveInt(c, "num_attention_heads", std::nullopt);
  if (!heads.ok()) return heads.status();
  auto kv = PositiveInt(c, "num_key_value_heads", *heads);
  if (!kv.ok()) return kv.status();
  auto head_dim = PositiveInt(c, "head_dim", *hidden / *heads);
  if (!head_dim.ok()) return head_dim.status();
  auto intermediate = PositiveInt(c, "intermediate_size", std::nullopt);
  if (!intermediate.ok()) return intermediate.status();
  auto eps = Number(c.value("rms_norm_eps", json()), "rms_norm_eps", 1e-6);
  if (!eps.ok()) return eps.status();
  absl::StatusOr<double> theta = 10000.0;
  if (c.contains("rope_theta") && !c["rope_theta"].is_null()) {
    theta = Number(c["rope_theta"], "rope_theta", 10000.0);
  } else if (c.contains("rope_parameters") && c["rope_parameters"].is_object()) {  // transformers >= 5
    theta = Number(c["rope_parameters"].value("rope_theta", json()), "rope_parameters.rope_theta", 10000.0);
  }
  if (!theta.ok()) return theta.status();
  out.hidden_size = *hidden;
  out.num_attention_heads = *heads;
  out.num_kv_heads = *kv;
  out.head_dim = *head_dim;
  out.intermediate_size = *intermediate;
  out.rms_norm_eps = *eps;
  out.rope_theta = *theta;
  out.qk_norm = c["model_type"].get<std::string>() == "qwen3";
  return out;
}

absl::StatusOr<int64_t> HfNumLayers(const json& config) {
  if (!config.is_object()) return absl::InvalidArgumentError("config.json is not a JSON object");
  return PositiveInt(TextConfig(config), "num_hidden_layers", std::nullopt);
}

}  // namespace blockd
