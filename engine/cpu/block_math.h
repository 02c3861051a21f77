// One decoder block's forward and backward on the CPU, composed from ops.h exactly as
// ARCHITECTURE.md ("The block") writes the math. Templated on the scalar: the CPU backend runs it
// in float, the tests in double for finite-difference checks of every gradient.
//
//   BlockParamPtrs<const float> w = ...;           // by ParamId; q_norm/k_norm null without qk_norm
//   BlockActivations<float> saved;
//   BlockForward(config, w, x, batch, seq, /*offset=*/0, out, &saved);
//   BlockBackward(config, w, saved, dy, dx, grads);  // adds into grads
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "base/block_config.h"

namespace blockd::cpu {

// By ParamId; a LoRA adapter's A and B are set (both) only on the projections it targets, and
// lora_rank / lora_scale (alpha / rank) say how to apply them.
template <class T>
struct BlockParamPtrs {
  std::array<T*, kNumParamIds> p{};
  int64_t lora_rank = 0;
  double lora_scale = 0;
  T* operator[](ParamId id) const { return p[static_cast<int>(id)]; }
};

// Everything forward computes that backward needs, [tokens, width] row-major.
template <class T>
struct BlockActivations {
  int64_t batch = 0, seq = 0, offset = 0;
  std::vector<T> x, rstd1, n1;            // input, its rsqrt statistics, normed input
  std::vector<T> q_raw, k_raw, rstd_q, rstd_k;  // before QK-norm (only with qk_norm)
  std::vector<T> q, k, v;                 // after QK-norm and RoPE: what attention read
  std::vector<T> attn, lse;               // attention output before o_proj, log-sum-exp per row
  std::vector<T> r1, rstd2, n2;           // first residual, its statistics, normed
  std::vector<T> gate, up;                // MLP pre-activations
  size_t bytes() const;
};

template <class T>
void BlockForward(const BlockConfig& c, const BlockParamPtrs<const T>& w, const T* x, int64_t batch, int64_t seq,
                  int64_t offset, T* out, BlockActivations<T>* saved);

// Writes dx and *adds* every weight gradient into `grads`; a null gradient pointer (a frozen
// block's parameter) is skipped. `grads` carries no lora_rank: `w`'s applies.
template <class T>
void BlockBackward(const BlockConfig& c, const BlockParamPtrs<const T>& w, const BlockActivations<T>& s,
                   const T* dy, T* dx, const BlockParamPtrs<T>& grads);

}  // namespace blockd::cpu
