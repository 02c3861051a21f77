// A Hugging Face config.json -> the BlockConfig of one decoder layer, with the refusals of what a
// blockd block cannot compute. Every C++ path from a config.json (blockctl create --config,
// blockctl import-hf) goes through BlockConfigFromHf, and client/python/blockd/config.py
// (BlockConfig.from_hf) says the same things in the same words, so a config one path refuses is
// refused by all of them. tests/proto/hf_configs.json holds the cases both languages are held to.
//
//   ASSIGN_OR_RETURN(nlohmann::json hf, ReadHfConfig("/models/Qwen3-0.6B/config.json"));
//   ASSIGN_OR_RETURN(BlockConfig c, BlockConfigFromHf(hf));   // refuses gelu, dynamic RoPE, MLP biases...
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "base/block_config.h"
#include "nlohmann/json.hpp"

namespace blockd {

// The model types whose decoder layer a blockd block computes.
inline constexpr const char* kHfModelTypes[] = {"llama", "qwen2", "qwen3"};

// Reads a config.json: the object itself, or its "text_config" when it has one (multimodal
// wrappers). NOT_FOUND when the file cannot be read; INVALID_ARGUMENT (naming `path`) when it is
// not a JSON object.
absl::StatusOr<nlohmann::json> ReadHfConfig(const std::string& path);

// The BlockConfig of one layer of `config` (Llama/Qwen2/Qwen3 field names): head_dim defaults to
// hidden_size / num_attention_heads, num_key_value_heads to num_attention_heads (0 or null: the
// default too), rms_norm_eps to 1e-6, rope_theta to rope_parameters.rope_theta (transformers 5) or
// 10000; qk_norm for qwen3. INVALID_ARGUMENT, before any mapping, for what a block cannot compute:
// another model_type, a non-SiLU MLP, a scaled RoPE (rope_scaling or rope_parameters with a
// rope_type other than "default"), attention or MLP biases, sliding-window attention; and for a
// field that is missing or not a positive integer / a number.
absl::StatusOr<BlockConfig> BlockConfigFromHf(const nlohmann::json& config);

// num_hidden_layers of `config` (INVALID_ARGUMENT when missing or not a positive integer).
absl::StatusOr<int64_t> HfNumLayers(const nlohmann::json& config);

}  // namespace blockd
