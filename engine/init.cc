#include "engine/init.h"

#include <cmath>

namespace blockd {
namespace {

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace

void InitParam(uint64_t seed, const ParamSpec& param, float* out) {
  const int64_t n = param.numel();
  const bool lora_b = IsLoraParam(param.id) && (static_cast<int>(param.id) - kNumBaseParamIds) % 2 == 1;
  if (param.id == ParamId::kQBias || param.id == ParamId::kKBias || param.id == ParamId::kVBias || lora_b) {
    // Zeros, as Hugging Face's _init_weights (Llama/Qwen2PreTrainedModel) sets every Linear bias,
    // and as PEFT starts lora_B, so a new adapter leaves the block's output as it was.
    for (int64_t i = 0; i < n; ++i) out[i] = 0.f;
    return;
  }
  if (!param.is_matrix) {
    for (int64_t i = 0; i < n; ++i) out[i] = 1.f;
    return;
  }
  // lora_A too: PEFT's kaiming_uniform_(a=sqrt(5)) bound is sqrt(6 / ((1 + 5) in)) = 1/sqrt(in).
  const double bound = 1.0 / std::sqrt(static_cast<double>(param.shape[1]));
  const uint64_t key = SplitMix64(seed ^ SplitMix64(static_cast<uint64_t>(param.id) + 1));
  for (int64_t i = 0; i < n; ++i) {
    // 24 random bits -> a uniform in [-1, 1), exact in float.
    const uint64_t r = SplitMix64(key + static_cast<uint64_t>(i)) >> 40;
    const double u = static_cast<double>(r) / static_cast<double>(1u << 23) - 1.0;
    out[i] = static_cast<float>(u * bound);
  }
}

}  // namespace blockd
