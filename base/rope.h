// RoPE's inverse frequencies and attention scaling for every rope_type blockd accepts, computed
// once here so that the CPU ops and the CUDA rope table rotate by the same angles. The formulas are
// Hugging Face transformers' (modeling_rope_utils.py: _compute_default_rope_parameters,
// _compute_linear_scaling_rope_parameters, _compute_llama3_parameters, _compute_yarn_parameters),
// evaluated in double rather than torch's float32 so the float64 tests have an exact oracle.
//
//   std::vector<double> inv_freq = RopeInvFreq(config);   // head_dim / 2 entries
//   double scale = RopeAttentionScaling(config);          // multiplies cos and sin (yarn), else 1
//   angle(position, i) = position * inv_freq[i]
#pragma once

#include <vector>

#include "base/block_config.h"

namespace blockd {

// inv_freq[i] for i in 0..head_dim/2-1. `c` must pass ValidateBlockConfig.
std::vector<double> RopeInvFreq(const BlockConfig& c);

// The factor HF multiplies cos and sin by (its `attention_scaling`): yarn's attention_factor, or
// 0.1 ln(factor) + 1 when unset (get_mscale; 1 for factor <= 1); 1 for every other rope_type.
double RopeAttentionScaling(const BlockConfig& c);

}  // namespace blockd
