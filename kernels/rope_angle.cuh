// Device-only (.cu files): one RoPE rotation entry, as launch_rope_table writes it and the paged
// step's q/k kernel computes it in place, so both give the same bits.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace blockd::kernels {

// scale * (cos, sin)(pos * inv_freq): the angle reduced in double so that large positions keep
// their precision, sincos in double, rounded to float.
__device__ __forceinline__ float2 RopeCosSin(int64_t pos, double inv_freq, double scale) {
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  double angle = double(pos) * inv_freq;
  angle -= kTwoPi * rint(angle / kTwoPi);
  double c, sn;
  sincos(angle, &sn, &c);
  // Yarn's attention factor multiplies cos and sin alike (HF's cos * attention_scaling); backward's
  // transpose rotation reads the same scaled entries, which is its exact derivative.
  return make_float2(static_cast<float>(scale * c), static_cast<float>(scale * sn));
}

}  // namespace blockd::kernels
