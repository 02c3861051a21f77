// Device-only (.cu files): QK-norm and RoPE of one (token, head) of q or k by one warp, shared by
// the forward of rope.cu (rotation entries from a table) and paged_qkv.cu (computed in place).
#pragma once

#include "kernels/common.cuh"

namespace blockd::kernels {

// y = rope(w ? rmsnorm_dh(x) * w : x) for one head of dh elements (dh even, <= 64 * kMaxPairs):
// lane j holds the rotation pairs (i, i + dh/2) for i = j, j + 32, ...; cos_sin(i) gives entry i's
// (cos, sin). With w, lane 0 writes the head's 1/rms into *rstd when rstd is not null.
template <class T, int kMaxPairs, class CosSin>
__device__ __forceinline__ void QkNormRopeHead(const T* x, T* y, const float* w, int dh, float eps, float* rstd,
                                               CosSin cos_sin) {
  const int lane = threadIdx.x & 31, half = dh / 2;
  float a[kMaxPairs], b[kMaxPairs];
  float ss = 0.f;
#pragma unroll
  for (int t = 0; t < kMaxPairs; ++t) {
    const int i = lane + 32 * t;
    a[t] = i < half ? to_float(x[i]) : 0.f;
    b[t] = i < half ? to_float(x[i + half]) : 0.f;
    ss += a[t] * a[t] + b[t] * b[t];
  }
  if (w != nullptr) {
    const float rs = rsqrtf(warp_sum(ss) / dh + eps);
    if (lane == 0 && rstd != nullptr) *rstd = rs;
#pragma unroll
    for (int t = 0; t < kMaxPairs; ++t) {
      const int i = lane + 32 * t;
      if (i < half) {
        a[t] = (a[t] * rs) * w[i];
        b[t] = (b[t] * rs) * w[i + half];
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kMaxPairs; ++t) {
    const int i = lane + 32 * t;
    if (i < half) {
      const float2 cs = cos_sin(i);
      y[i] = from_float<T>(a[t] * cs.x - b[t] * cs.y);
      y[i + half] = from_float<T>(b[t] * cs.x + a[t] * cs.y);
    }
  }
}

}  // namespace blockd::kernels
