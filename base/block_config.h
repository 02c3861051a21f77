// A decoder block's hyperparameters, its precision, and the table of its named parameters.
//
//   BlockConfig c{.hidden_size = 1024, .num_attention_heads = 16, .num_kv_heads = 8,
//                 .head_dim = 128, .intermediate_size = 3072, .qk_norm = true};
//   RETURN_IF_ERROR(ValidateBlockConfig(c));
//   for (const ParamSpec& p : BlockParams(c)) ...  // HF names, [out, in] shapes
#pragma once

#include <cstdint>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/status.h"

namespace blockd {

// Hugging Face's defaults (LlamaConfig, Qwen2Config) for the two float hyperparameters.
inline constexpr double kDefaultRmsNormEps = 1e-6;
inline constexpr double kDefaultRopeTheta = 10000.0;

// Hugging Face's rope_scaling / rope_parameters (modeling_rope_utils.py). rope_type "" or "default"
// is plain RoPE and every other field is ignored. Fields a type does not use are left 0; 0 in
// attention_factor, beta_fast and beta_slow means "unset" and takes HF's default (get_mscale(factor),
// 32, 1) in RopeInvFreq / RopeAttentionScaling (base/rope.h).
struct RopeScaling {
  std::string rope_type;                     // "" | "default" | "linear" | "llama3" | "yarn"
  double factor = 0;                         // linear, llama3, yarn: > 0
  double low_freq_factor = 0;                // llama3
  double high_freq_factor = 0;               // llama3: > low_freq_factor
  int64_t original_max_position_embeddings = 0;  // llama3, yarn: > 0
  double attention_factor = 0;               // yarn: cos/sin scale; 0 -> 0.1 ln(factor) + 1
  double beta_fast = 0;                      // yarn: 0 -> 32
  double beta_slow = 0;                      // yarn: 0 -> 1
  bool is_default() const { return rope_type.empty() || rope_type == "default"; }
  bool operator==(const RopeScaling& o) const;
};

struct BlockConfig {
  int64_t hidden_size = 0;
  int64_t num_attention_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t intermediate_size = 0;
  double rms_norm_eps = kDefaultRmsNormEps;
  double rope_theta = kDefaultRopeTheta;
  bool qk_norm = false;
  RopeScaling rope_scaling;     // plain RoPE unless rope_type says otherwise
  bool attention_bias = false;  // Qwen2: self_attn.{q,k,v}_proj.bias

  int64_t q_dim() const { return num_attention_heads * head_dim; }
  int64_t kv_dim() const { return num_kv_heads * head_dim; }
  bool operator==(const BlockConfig& o) const;
};

// Arithmetic of matrix products; master weights and moments are fp32 in every mode.
enum class Precision : uint8_t { kFP32, kTF32, kBF16 };
absl::string_view PrecisionName(Precision p);  // "fp32", "tf32", "bf16"

// Checks sizes, divisibility and ranges; the message names the field and the value.
// Includes ValidateRopeScaling(c.rope_scaling).
absl::Status ValidateBlockConfig(const BlockConfig& c);
// A known rope_type with the fields it needs: factor > 0; llama3 also low/high_freq_factor > 0 with
// high > low and original_max_position_embeddings > 0; yarn original_max_position_embeddings > 0
// and attention_factor, beta_fast, beta_slow either 0 (HF's default) or > 0.
absl::Status ValidateRopeScaling(const RopeScaling& r);

// Sets rms_norm_eps and rope_theta left 0 to Hugging Face's defaults. 0 is what a proto3 field
// omitted from a request reads as, so grpcurl users need not spell them. Negative or non-finite
// values are left for ValidateBlockConfig to refuse.
void FillUnsetConfigDefaults(BlockConfig* c);

// The parameters of one block, in a fixed order that every backend, file and message uses.
enum class ParamId : uint8_t {
  kInputNorm, kQProj, kKProj, kVProj, kOProj, kQNorm, kKNorm, kPostNorm, kGateProj, kUpProj, kDownProj,
  kQBias, kKBias, kVBias,  // only with attention_bias; appended so the ids of older blocks keep their values
  // LoRA adapters (only with a LoraConfig that targets the projection): A [rank, in], B [out, rank].
  kQLoraA, kQLoraB, kKLoraA, kKLoraB, kVLoraA, kVLoraB, kOLoraA, kOLoraB,
  kGateLoraA, kGateLoraB, kUpLoraA, kUpLoraB, kDownLoraA, kDownLoraB,
};
inline constexpr int kNumBaseParamIds = 14;  // the ids before the adapters'
inline constexpr int kNumParamIds = 28;

// PEFT's LoRA on a block's projections: for a target W [out, in], y = x W^T + (alpha / rank) (x A^T) B^T
// with A [rank, in] and B [out, rank], named like W with ".lora_A"/".lora_B" before ".weight"
// (self_attn.q_proj.lora_A.weight). rank 0 (and no field set): no adapters.
struct LoraConfig {
  int32_t rank = 0;
  double alpha = 0;
  std::vector<std::string> target_modules;  // "q_proj" ... "down_proj"; canonical order once normalised
  bool requested() const { return rank != 0 || alpha != 0 || !target_modules.empty(); }
  double scale() const { return alpha / rank; }
  bool operator==(const LoraConfig& o) const;
};

// One projection LoRA may target: its module name, the base matrix and its two adapters.
struct LoraTarget {
  const char* module;  // "q_proj"
  ParamId base, a, b;
};
inline constexpr LoraTarget kLoraTargets[] = {
    {"q_proj", ParamId::kQProj, ParamId::kQLoraA, ParamId::kQLoraB},
    {"k_proj", ParamId::kKProj, ParamId::kKLoraA, ParamId::kKLoraB},
    {"v_proj", ParamId::kVProj, ParamId::kVLoraA, ParamId::kVLoraB},
    {"o_proj", ParamId::kOProj, ParamId::kOLoraA, ParamId::kOLoraB},
    {"gate_proj", ParamId::kGateProj, ParamId::kGateLoraA, ParamId::kGateLoraB},
    {"up_proj", ParamId::kUpProj, ParamId::kUpLoraA, ParamId::kUpLoraB},
    {"down_proj", ParamId::kDownProj, ParamId::kDownLoraA, ParamId::kDownLoraB},
};
inline bool IsLoraParam(ParamId id) { return static_cast<int>(id) >= kNumBaseParamIds; }

// rank 1..min(in, out) of every target, alpha finite > 0, targets non-empty, known and not repeated.
// Messages name the field ("lora.rank = 0, expected 1..64 (min(in, out) of q_proj [64, 64])").
absl::Status ValidateLoraConfig(const LoraConfig& lora, const BlockConfig& c);
// The targets in kLoraTargets order (the order of the adapters in BlockParams).
void NormaliseLoraConfig(LoraConfig* lora);

struct ParamSpec {
  ParamId id;
  std::string name;            // Hugging Face name inside one layer, e.g. "self_attn.q_proj.weight"
  std::vector<int64_t> shape;  // [out, in] for matrices, [n] for norm weights
  bool is_matrix = false;      // 2-D: weight decay applies; 1-D norm weights and biases are not decayed by default
  int64_t numel() const;
};

// The parameters that `c` has, in the table's order (ARCHITECTURE.md): the q/k/v biases follow
// their weights, q_norm/k_norm follow o_proj (each only when the config has them).
std::vector<ParamSpec> BlockParams(const BlockConfig& c);
// The same, then the adapters of `lora` (A then B per target, in kLoraTargets order): the trained
// suffix of a frozen block with adapters.
std::vector<ParamSpec> BlockParams(const BlockConfig& c, const LoraConfig& lora);
int64_t ParameterCount(const BlockConfig& c);
int64_t ParameterCount(const BlockConfig& c, const LoraConfig& lora);
// Index into BlockParams(c) of `name`, or -1.
int FindParam(const std::vector<ParamSpec>& params, absl::string_view name);

std::string ShapeString(const std::vector<int64_t>& shape);  // "[2,7,64]"

}  // namespace blockd
