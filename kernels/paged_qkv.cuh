// An inference step's q, k and v onto a cached prefix (a decode step, or a chunk after earlier
// ones), in one launch: per (token, head), QK-norm (when norm weights are given) and RoPE at the
// row's own position start[r] + i for q and k, q into `q`, k and v straight into their pages
// (paged_attention.cuh's layout). The rotation entries are computed in place, to the same bits
// launch_rope_table writes; the arithmetic is launch_qknorm_rope_fwd's.
//
//   launch_paged_qkv<bf16>(qkv, qkv_stride, q, q_norm_w, k_norm_w, inv_freq, scale, kv, batch, n,
//                          heads, kv_heads, head_dim, eps, stream);
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/paged_attention.cuh"

namespace blockd::kernels {

// qkv [batch * n, qkv_stride]: each token's q heads, k heads, v heads, head_dim each; q out
// [batch * n, heads * head_dim]. inv_freq: head_dim / 2 doubles on the device. head_dim even, <= 512.
template <class T>
cudaError_t launch_paged_qkv(const T* qkv, int64_t qkv_stride, T* q, const float* q_norm_w, const float* k_norm_w,
                             const double* inv_freq, double rope_scale, const PagedKv<T>& kv, int64_t batch, int64_t n,
                             int heads, int kv_heads, int head_dim, float eps, cudaStream_t stream);

}  // namespace blockd::kernels
