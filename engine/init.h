// Deterministic parameter initialisation from a seed: norm weights 1, q/k/v biases 0 (as Hugging
// Face's _init_weights), matrices (LoRA's A too) uniform in [-1/sqrt(in), 1/sqrt(in)] (the range of nn.Linear's default, and of
// PEFT's A), LoRA's B 0. Counter-based, so every backend
// and every machine gets the same bits for the same (seed, parameter, element).
//   std::vector<float> w(p.numel());
//   InitParam(seed, p, w.data());
#pragma once

#include <cstdint>

#include "base/block_config.h"

namespace blockd {

void InitParam(uint64_t seed, const ParamSpec& param, float* out);

}  // namespace blockd
