// Causal grouped-query attention, forward and backward, flash-style: the [seq, seq] scores of a
// head are never stored. bf16 activations with head_dim 64 or 128 run on tensor cores
// (attention_mma.cu); the rest on the SIMT kernels here. In both,
// forward keeps the log-sum-exp per row and backward recomputes the
// probabilities from it. Query head h reads kv head h / (heads / kv_heads). fp32 arithmetic,
// activations stored as T (float or bf16). Rows are tokens of [batch, seq]; a tensor's heads sit
// side by side in a row, `*_stride` elements apart from one token to the next.
//
//   launch_attention_fwd(q, H*dh, k, Hkv*dh, v, qkv_stride, o, H*dh, lse, B, S, H, Hkv, dh, scale, s);
//   launch_attention_bwd(q, ..., o, lse, d_o, dq, dk, dv, dv_stride, delta_ws, B, S, H, Hkv, dh, scale, s);
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace blockd::kernels {

constexpr int kAttentionMaxHeadDim = 256;

// o: [tokens, o_stride] (head h at h*dh); lse: [batch, heads, seq] fp32.
template <class T>
cudaError_t launch_attention_fwd(const T* q, int64_t q_stride, const T* k, int64_t k_stride, const T* v,
                                 int64_t v_stride, T* o, int64_t o_stride, float* lse, int batch, int seq, int heads,
                                 int kv_heads, int head_dim, float scale, cudaStream_t stream);

// Writes dq [tokens, heads*dh] fp32, dk [tokens, kv_heads*dh] fp32 and dv (stride dv_stride, as T).
// `delta` is an fp32 workspace of attention_bwd_workspace_floats(...) floats.
template <class T>
cudaError_t launch_attention_bwd(const T* q, int64_t q_stride, const T* k, int64_t k_stride, const T* v,
                                 int64_t v_stride, const T* o, int64_t o_stride, const float* lse, const T* d_o,
                                 int64_t do_stride, float* dq, float* dk, T* dv, int64_t dv_stride, float* delta,
                                 int batch, int seq, int heads, int kv_heads, int head_dim, float scale,
                                 cudaStream_t stream);

int64_t attention_bwd_workspace_floats(int batch, int seq, int heads, int kv_heads, int head_dim);

// The SIMT kernels behind the two launchers above, for any head_dim up to 256 (the launchers use
// them for fp32 activations and for head dims the tensor-core kernels do not cover).
template <class T>
cudaError_t launch_attention_fwd_simt(const T* q, int64_t q_stride, const T* k, int64_t k_stride, const T* v,
                                      int64_t v_stride, T* o, int64_t o_stride, float* lse, int batch, int seq,
                                      int heads, int kv_heads, int head_dim, float scale, cudaStream_t stream);
template <class T>
cudaError_t launch_attention_bwd_simt(const T* q, int64_t q_stride, const T* k, int64_t k_stride, const T* v,
                                      int64_t v_stride, const T* o, int64_t o_stride, const float* lse, const T* d_o,
                                      int64_t do_stride, float* dq, float* dk, T* dv, int64_t dv_stride, float* delta,
                                      int batch, int seq, int heads, int kv_heads, int head_dim, float scale,
                                      cudaStream_t stream);

}  // namespace blockd::kernels
