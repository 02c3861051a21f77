// The block's ops on the CPU, forward and backward side by side, in plain loops a reader can check
// against ARCHITECTURE.md ("The block"); matrix products go through BLAS (gemm.h). Templated on the
// scalar so that the float backend and the tests' float64 finite-difference checks run the same code.
//
// Layouts are row-major and batch-first: activations [tokens, width] with tokens = batch * seq;
// per-head tensors [batch, seq, heads, head_dim]. Backward functions *add* into their input and
// weight gradients (dx, dw) unless their comment says they write.
#pragma once

#include <cstdint>

namespace blockd::cpu {

// y = x * rsqrt(mean(x^2) + eps) * w over rows of length d; rstd[r] keeps rsqrt(...) per row.
template <class T>
void RmsNormForward(const T* x, const T* w, int64_t rows, int64_t d, double eps, T* y, T* rstd);
// Adds dL/dx to dx and dL/dw to dw (unless dw is null), given dL/dy.
template <class T>
void RmsNormBackward(const T* dy, const T* x, const T* w, const T* rstd, int64_t rows, int64_t d, T* dx, T* dw);

// Rotary embedding in place on x [batch, seq, heads, head_dim], HF rotate_half pairs (i, i + dh/2),
// positions offset..offset+seq-1, angle = position * inv_freq[i] (head_dim / 2 entries, from
// RopeInvFreq in base/rope.h), cos and sin both multiplied by `scale` (RopeAttentionScaling: yarn's
// attention factor, else 1); angles computed in double.
template <class T>
void RopeForward(T* x, int64_t batch, int64_t seq, int64_t heads, int64_t head_dim, int64_t offset,
                 const double* inv_freq, double scale);
// The transpose of RopeForward (a rotation by the opposite angle, times the same scale), in place on
// a gradient.
template <class T>
void RopeBackward(T* dx, int64_t batch, int64_t seq, int64_t heads, int64_t head_dim, int64_t offset,
                  const double* inv_freq, double scale);

// out[r, j] += bias[j] over rows of length width (a projection's bias).
template <class T>
void AddBias(T* out, const T* bias, int64_t rows, int64_t width);
// Adds the column sums of dy [rows, width] to dbias (the bias gradient).
template <class T>
void BiasBackward(const T* dy, int64_t rows, int64_t width, T* dbias);

// Causal grouped-query attention: o = softmax(q k^T * scale + mask) v, query head h reads kv head
// h / (heads / kv_heads). Writes o [b, s, heads, dh] and lse [b, heads, s] (log-sum-exp per row).
template <class T>
void AttentionForward(const T* q, const T* k, const T* v, int64_t batch, int64_t seq, int64_t heads,
                      int64_t kv_heads, int64_t head_dim, double scale, T* o, T* lse);
// Writes dq, dk, dv (not added) from do, recomputing the probabilities from q, k and lse.
template <class T>
void AttentionBackward(const T* q, const T* k, const T* v, const T* o, const T* lse, const T* d_o,
                       int64_t batch, int64_t seq, int64_t heads, int64_t kv_heads, int64_t head_dim,
                       double scale, T* dq, T* dk, T* dv);

// h = silu(g) * u, elementwise over n.
template <class T>
void SwiGluForward(const T* g, const T* u, int64_t n, T* h);
// Writes dg and du from dh.
template <class T>
void SwiGluBackward(const T* dh, const T* g, const T* u, int64_t n, T* dg, T* du);

// One torch.optim.AdamW update of n elements (decoupled decay, bias correction for `step`,
// gradients multiplied by grad_scale first), in fp32 like PyTorch's single-tensor path.
void AdamWUpdate(float* p, const float* g, float* m, float* v, int64_t n, double lr, double beta1,
                 double beta2, double eps, double weight_decay, int64_t step, float grad_scale);

}  // namespace blockd::cpu
