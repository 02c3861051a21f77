// The shared Hugging Face config.json cases (tests/proto/hf_configs.json), read the same way by the
// C++ tests that hold BlockConfigFromHf and `blockctl create --config` to them (Python's
// BlockConfig.from_hf reads the file in tests/client_python/hf_config_test.py). The test target
// defines HF_CONFIGS_JSON as the file's path.
#pragma once

#include <fstream>

#include <nlohmann/json.hpp>

#ifndef HF_CONFIGS_JSON
#error "HF_CONFIGS_JSON must name tests/proto/hf_configs.json"
#endif

namespace blockd::testing {

// The whole file: {"base": {...}, "cases": [{"name", "set", "error" or the expected fields}, ...]}.
inline nlohmann::json HfConfigCases() {
  std::ifstream in(HF_CONFIGS_JSON);
  nlohmann::json j;
  in >> j;
  return j;
}

// `base` with the case's `set` applied (null deletes), wrapped in text_config when the case says so.
inline nlohmann::json HfConfigOf(const nlohmann::json& all, const nlohmann::json& c) {
  nlohmann::json config = all["base"];
  for (const auto& [key, value] : c["set"].items()) {
    if (value.is_null()) {
      config.erase(key);
    } else {
      config[key] = value;
    }
  }
  if (c.value("wrap_in_text_config", false)) {
    return nlohmann::json{{"model_type", "llava"}, {"text_config", config}};
  }
  return config;
}

}  // namespace blockd::testing
