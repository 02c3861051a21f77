// Causal grouped-query attention, forward and backward, flash-style: the [seq, seq] scores of a
// head are never stored. bf16 activations with head_dim 64 or 128 run on tensor cores
// (attention_mma.cu), fp32 ones with head_dim 64 or 128 on register-tiled FFMA kernels
// (attention_fp32.cu: IEEE fp32, no TF32); the rest on the SIMT kernels in attention.cu. In all,
// forward keeps the log-sum-exp per row and backward recomputes the probabilities from it. Query
// head h reads kv head h / (heads / kv_heads). fp32 arithmetic, activations stored as T (float or
// bf16). Rows are tokens of [batch, seq]; a tensor's heads sit side by side in a row, `*_stride`
// elements apart from one token to the next (so v may be the last part of a fused q|k|v row).
//
//   AttentionArgs<bf16> a = AttentionArgs<bf16>::Causal(B, S, H, Hkv, dh, stream);
//   a.q = q;  a.q_stride = H * dh;    a.k = k;  a.k_stride = Hkv * dh;
//   a.v = qkv + (H + Hkv) * dh;       a.v_stride = (H + 2 * Hkv) * dh;
//   a.o = o;  a.o_stride = H * dh;    a.lse = lse;
//   launch_attention_fwd(a);
//   a.d_o = d_o;  a.do_stride = H * dh;  a.dq = dq;  a.dk = dk;  a.dv = dv;  a.dv_stride = ...;
//   a.workspace = ws;                    // attention_bwd_workspace_floats(B, S, H, Hkv, dh) floats
//   launch_attention_bwd(a);
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace blockd::kernels {

constexpr int kAttentionMaxHeadDim = 256;

// Everything one forward or backward launch reads: the forward sets the first two groups, the
// backward all of them (o and lse are then the forward's outputs, read back).
template <class T>
struct AttentionArgs {
  // Inputs [tokens, *_stride], head h at h * head_dim.
  const T* q = nullptr;
  int64_t q_stride = 0;
  const T* k = nullptr;
  int64_t k_stride = 0;
  const T* v = nullptr;
  int64_t v_stride = 0;
  // Written by the forward, read by the backward: o [tokens, o_stride]; lse [batch, heads, seq] fp32.
  T* o = nullptr;
  int64_t o_stride = 0;
  float* lse = nullptr;

  // Backward only: dO in, dq [tokens, heads * head_dim] and dk [tokens, kv_heads * head_dim] out in
  // fp32, dv [tokens, dv_stride] out as T; `workspace` holds attention_bwd_workspace_floats(...).
  const T* d_o = nullptr;
  int64_t do_stride = 0;
  float* dq = nullptr;
  float* dk = nullptr;
  T* dv = nullptr;
  int64_t dv_stride = 0;
  float* workspace = nullptr;

  int batch = 0, seq = 0, heads = 0, kv_heads = 0, head_dim = 0;
  float scale = 0.f;  // multiplies q.k before the softmax
  cudaStream_t stream = nullptr;

  // The sizes of a causal attention with the usual softmax scale 1/sqrt(head_dim); the pointers
  // and strides are the caller's to set.
  static AttentionArgs Causal(int batch, int seq, int heads, int kv_heads, int head_dim, cudaStream_t stream) {
    AttentionArgs a;
    a.batch = batch;
    a.seq = seq;
    a.heads = heads;
    a.kv_heads = kv_heads;
    a.head_dim = head_dim;
    a.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
    a.stream = stream;
    return a;
  }
};

template <class T>
cudaError_t launch_attention_fwd(const AttentionArgs<T>& args);

// Overwrites dq, dk and dv (no accumulation).
template <class T>
cudaError_t launch_attention_bwd(const AttentionArgs<T>& args);

// The SIMT kernels whatever the shape, bypassing the faster paths above: for benchmarks and tests
// that set the paths side by side. Same contract as launch_attention_fwd/bwd.
template <class T>
cudaError_t launch_attention_fwd_simt(const AttentionArgs<T>& args);
template <class T>
cudaError_t launch_attention_bwd_simt(const AttentionArgs<T>& args);

int64_t attention_bwd_workspace_floats(int batch, int seq, int heads, int kv_heads, int head_dim);

}  // namespace blockd::kernels
