// Tensor-core (mma.sync, bf16) attention kernels for head_dim 64 and 128; see attention_mma.cu.
// Called by launch_attention_fwd/bwd (attention.cuh) for bf16 activations; exposed for the tests.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace blockd::kernels {

bool attention_mma_supports(int head_dim);

cudaError_t launch_attention_fwd_mma(const __nv_bfloat16* q, int64_t q_stride, const __nv_bfloat16* k,
                                     int64_t k_stride, const __nv_bfloat16* v, int64_t v_stride, __nv_bfloat16* o,
                                     int64_t o_stride, float* lse, int batch, int seq, int heads, int kv_heads,
                                     int head_dim, float scale, cudaStream_t stream);

// `delta` (rowsum(dO * O), [batch, heads, seq]) must be computed already; dq is zeroed here and
// accumulated with atomic adds. With grouped-query attention (heads > kv_heads) dk and `dv_accum`
// (fp32 [tokens, kv_heads * head_dim]) are accumulated the same way and dv is converted at the end.
cudaError_t launch_attention_bwd_mma(const __nv_bfloat16* q, int64_t q_stride, const __nv_bfloat16* k,
                                     int64_t k_stride, const __nv_bfloat16* v, int64_t v_stride, const float* lse,
                                     const __nv_bfloat16* d_o, int64_t do_stride, const float* delta, float* dq,
                                     float* dk, __nv_bfloat16* dv, int64_t dv_stride, float* dv_accum, int batch,
                                     int seq, int heads, int kv_heads, int head_dim, float scale, cudaStream_t stream);

}  // namespace blockd::kernels
