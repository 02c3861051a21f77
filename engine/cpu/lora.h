// LoRA's low-rank product beside a projection, forward and backward, on the CPU (PEFT's math).
// For a projection y = x W^T with an adapter A [r, in], B [out, r] and scale s = alpha / r:
//
//   y  += s (x A^T) B^T                    LoraForward
//   u   = x A^T;  dU = s dY B               (u recomputed: r columns, cheaper than keeping it)
//   dB += s dY^T u;  dA += dU^T x;  dx += dU A     LoraBackward
//
// Templated on the scalar like block_math.h: float in the backend, double in the tests.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/cpu/gemm.h"

namespace blockd::cpu {

// y [n, out] += s (x [n, in] A^T) B^T.
template <class T>
void LoraForward(const T* x, const T* a, const T* b, int64_t n, int64_t in, int64_t out, int64_t r, T s, T* y) {
  std::vector<T> u(static_cast<size_t>(n * r));
  Gemm(false, true, n, r, in, T(1), x, in, a, in, T(0), u.data(), r);
  Gemm(false, true, n, out, r, s, u.data(), r, b, r, T(1), y, out);
}

// Given dy [n, out], the gradient of y: dx [n, in] += dU A; dA [r, in] += dU^T x and
// dB [out, r] += s dY^T u when their pointers are set.
template <class T>
void LoraBackward(const T* x, const T* a, const T* b, const T* dy, int64_t n, int64_t in, int64_t out, int64_t r,
                  T s, T* dx, T* da, T* db) {
  std::vector<T> u(static_cast<size_t>(n * r)), du(static_cast<size_t>(n * r));
  Gemm(false, false, n, r, out, s, dy, out, b, r, T(0), du.data(), r);  // dU = s dY B
  if (db != nullptr) {
    Gemm(false, true, n, r, in, T(1), x, in, a, in, T(0), u.data(), r);
    Gemm(true, false, out, r, n, s, dy, out, u.data(), r, T(1), db, r);  // dB += s dY^T u
  }
  if (da != nullptr) Gemm(true, false, r, in, n, T(1), du.data(), r, x, in, T(1), da, in);  // dA += dU^T x
  Gemm(false, false, n, in, r, T(1), du.data(), r, a, in, T(1), dx, in);  // dx += dU A
}

}  // namespace blockd::cpu
