// Rotary position embedding with the optional per-head QK-norm before it (Qwen3), forward and
// backward, for one part (q or k) of the fused q|k|v projection output.
//   table[s][i] = scale * (cos, sin)((offset + s) * inv_freq[i])  angles reduced in double
//   out[h] = rope(qk_norm ? rmsnorm_dh(in[h]) * w : in[h])          HF rotate_half pairs (i, i + dh/2)
// inv_freq (dh/2 doubles in device memory) and scale come from base/rope.h (RopeInvFreq,
// RopeAttentionScaling), so every rope_type is one table; backward reads the same table.
//
//   launch_rope_table(table, seq, dh, offset, inv_freq, scale, stream);
//   launch_qknorm_rope_fwd(qkv, qkv_stride, q, rstd_q, q_norm_w, table, tokens, seq, H, dh, eps, stream);
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace blockd::kernels {

cudaError_t launch_rope_table(float2* table, int seq, int head_dim, int64_t offset, const double* inv_freq,
                              double scale, cudaStream_t stream);

// in: [tokens, in_stride] with the part's heads at the row start; out: [tokens, heads, dh]
// contiguous; rstd: [tokens, heads] (written only when norm_w is not null).
template <class T>
cudaError_t launch_qknorm_rope_fwd(const T* in, int64_t in_stride, T* out, float* rstd, const float* norm_w,
                                   const float2* table, int64_t tokens, int seq, int heads, int head_dim, float eps,
                                   cudaStream_t stream);

int64_t qknorm_rope_bwd_workspace_floats(int head_dim);

// dout: [tokens, heads, dh] gradient of `out`, fp32 (G = float) or, for T = bf16, bf16 as cuDNN's
// attention backward writes it; din (stride in_stride) receives the gradient of `in`. With norm_w,
// dw is overwritten or (accumulate) added to. The arithmetic is fp32 either way.
template <class T, class G>
cudaError_t launch_qknorm_rope_bwd(const G* dout, const T* in, int64_t in_stride, const float* rstd,
                                   const float* norm_w, const float2* table, T* din, float* dw, bool accumulate,
                                   float* workspace, int64_t tokens, int seq, int heads, int head_dim,
                                   cudaStream_t stream);

}  // namespace blockd::kernels
