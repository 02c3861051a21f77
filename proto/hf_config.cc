#include "proto/hf_config.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/status_macros.h"

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
  // Qwen2's q/k/v biases are blockd's attention_bias; Llama's and Qwen3's attention_bias also
  // puts a bias on o_proj, which blocks do not have.
  if (TruthyField(c, "attention_bias") && c["model_type"].get<std::string>() != "qwen2") {
    return absl::InvalidArgumentError(
        "attention_bias is true: blockd blocks have q/k/v biases only (qwen2), not an o_proj bias");
  }
  if (TruthyField(c, "mlp_bias")) {
    return absl::InvalidArgumentError("mlp_bias is true: blockd blocks have no MLP bias terms");
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

// A positive number of a rope dict; absent or null is `fallback` when given, else "KEY has no FIELD".
absl::StatusOr<double> RopeNumber(const json& r, const std::string& key, const char* field,
                                  std::optional<double> fallback) {
  if (!r.contains(field) || r[field].is_null()) {
    if (fallback.has_value()) return *fallback;
    return absl::InvalidArgumentError(absl::StrCat(key, " has no ", field));
  }
  const json& v = r[field];
  if (v.is_number() && v.get<double>() > 0 && std::isfinite(v.get<double>())) return v.get<double>();
  return absl::InvalidArgumentError(absl::StrCat(key, ".", field, " is ", Shown(v), ", expected a positive number"));
}

// HF's get_mscale(scale, mscale) of _compute_yarn_parameters.
double GetMscale(double scale, double mscale) { return scale <= 1 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0; }

// rope_scaling (or transformers 5's rope_parameters) as HF's modeling_rope_utils.py reads it. The
// config-level defaults HF applies (yarn's original_max_position_embeddings from
// max_position_embeddings, its factor from their ratio, DeepSeek's mscale ratio as the attention
// factor) are resolved here, so a BlockConfig carries what the formulas use and nothing else.
absl::StatusOr<RopeScaling> RopeFromHf(const json& c) {
  std::string key = "rope_scaling";
  if (!TruthyField(c, "rope_scaling")) key = "rope_parameters";
  if (!TruthyField(c, key.c_str())) return RopeScaling{};
  const json& r = c[key];
  if (!r.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(key, " ", Shown(r), ": expected an object with a rope_type"));
  }
  json type = json();
  for (const char* k : {"rope_type", "type"}) {
    if (r.contains(k) && Truthy(r[k])) {
      type = r[k];
      break;
    }
  }
  RopeScaling out;
  if (type.is_null() || (type.is_string() && type.get<std::string>() == "default")) return out;
  const std::string t = type.is_string() ? type.get<std::string>() : "";
  if (t != "linear" && t != "llama3" && t != "yarn") {
    return absl::InvalidArgumentError(
        absl::StrCat(key, " ", Shown(r), ": blockd blocks compute default, linear, llama3 or yarn RoPE"));
  }
  out.rope_type = t;
  if (t == "llama3") {
    ASSIGN_OR_RETURN(out.low_freq_factor, RopeNumber(r, key, "low_freq_factor", std::nullopt));
    ASSIGN_OR_RETURN(out.high_freq_factor, RopeNumber(r, key, "high_freq_factor", std::nullopt));
    if (out.high_freq_factor <= out.low_freq_factor) {  // HF's smooth factor divides by their difference
      return absl::InvalidArgumentError(absl::StrCat(key, ".high_freq_factor is ", Shown(r["high_freq_factor"]),
                                                     ", expected more than low_freq_factor ",
                                                     Shown(r["low_freq_factor"])));
    }
  }
  if (t == "llama3" || t == "yarn") {
    const json& max_pos = c.value("max_position_embeddings", json());
    const bool own = r.contains("original_max_position_embeddings") && !r["original_max_position_embeddings"].is_null();
    const json& v = own ? r["original_max_position_embeddings"] : (t == "yarn" ? max_pos : json());
    if (v.is_null()) return absl::InvalidArgumentError(absl::StrCat(key, " has no original_max_position_embeddings"));
    if (!v.is_number_integer() || v.get<int64_t>() <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(own ? key + "." : std::string(),
                                                     own ? "original_max_position_embeddings" : "max_position_embeddings",
                                                     " is ", Shown(v), ", expected a positive integer"));
    }
    out.original_max_position_embeddings = v.get<int64_t>();
  }
  std::optional<double> factor_fallback;
  if (t == "yarn" && c.contains("max_position_embeddings") && c["max_position_embeddings"].is_number_integer() &&
      c["max_position_embeddings"].get<int64_t>() > 0) {
    // HF: a yarn config without factor takes max_position_embeddings / original_max_position_embeddings.
    factor_fallback = c["max_position_embeddings"].get<double>() / out.original_max_position_embeddings;
  }
  ASSIGN_OR_RETURN(out.factor, RopeNumber(r, key, "factor", factor_fallback));
  if (t == "yarn") {
    ASSIGN_OR_RETURN(out.beta_fast, RopeNumber(r, key, "beta_fast", 32.0));
    ASSIGN_OR_RETURN(out.beta_slow, RopeNumber(r, key, "beta_slow", 1.0));
    if (r.contains("attention_factor") && !r["attention_factor"].is_null()) {
      ASSIGN_OR_RETURN(out.attention_factor, RopeNumber(r, key, "attention_factor", std::nullopt));
    } else if (TruthyField(r, "mscale") && TruthyField(r, "mscale_all_dim")) {
      ASSIGN_OR_RETURN(const double mscale, RopeNumber(r, key, "mscale", std::nullopt));
      ASSIGN_OR_RETURN(const double mscale_all_dim, RopeNumber(r, key, "mscale_all_dim", std::nullopt));
      out.attention_factor = GetMscale(out.factor, mscale) / GetMscale(out.factor, mscale_all_dim);
    } else {
      out.attention_factor = GetMscale(out.factor, 1.0);
    }
    if (r.contains("truncate") && !Truthy(r["truncate"])) {
      return absl::InvalidArgumentError(absl::StrCat(key, ".truncate is ", Shown(r["truncate"]),
                                                     ": blockd blocks compute yarn with truncate true"));
    }
  }
  return out;
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
  // Qwen2 always has q/k/v biases: HF's Qwen2Attention builds them with bias=True whatever the
  // config says, and its checkpoints carry them.
  out.attention_bias = c["model_type"].get<std::string>() == "qwen2";
  // RopeFromHf checks every field ValidateRopeScaling would, in config.json's words.
  ASSIGN_OR_RETURN(out.rope_scaling, RopeFromHf(c));
  return out;
}

absl::StatusOr<int64_t> HfNumLayers(const json& config) {
  if (!config.is_object()) return absl::InvalidArgumentError("config.json is not a JSON object");
  return PositiveInt(TextConfig(config), "num_hidden_layers", std::nullopt);
}

}  // namespace blockd
