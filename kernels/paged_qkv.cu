#include "kernels/paged_qkv.cuh"

#include <cuda_bf16.h>

#include "kernels/common.cuh"
#include "kernels/paged_kv.cuh"
#include "kernels/qknorm_rope_head.cuh"
#include "kernels/rope_angle.cuh"

namespace blockd::kernels {
namespace {

constexpr int kWarps = 8;
constexpr int kMaxPairsPerLane = 8;  // head_dim <= 512

// A warp per (token, part): parts 0 .. heads - 1 are q heads, then kv_heads k heads, then
// kv_heads v heads. Lane j holds the rotation pairs (i, i + dh/2) for i = j, j + 32, ...
template <class T>
__global__ void paged_qkv_kernel(const T* __restrict__ qkv, int64_t qkv_stride, T* __restrict__ q,
                                 const float* __restrict__ q_norm_w, const float* __restrict__ k_norm_w,
                                 const double* __restrict__ inv_freq, double rope_scale, PagedKv<T> kv, int64_t n,
                                 int64_t tokens, int heads, int kv_heads, int dh, float eps) {
  const int lane = threadIdx.x & 31;
  const int parts = heads + 2 * kv_heads;
  const int64_t task = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  if (task >= tokens * parts) return;
  const int64_t token = task / parts, r = token / n, pos = kv.start[r] + token % n;
  const int part = static_cast<int>(task % parts);
  const T* x = qkv + token * qkv_stride + int64_t(part) * dh;  // q, k and v heads are dh apart
  T* krow = part >= heads ? PagedKRow(kv, r, pos) : nullptr;
  if (part >= heads + kv_heads) {  // v: a copy into the page
    T* vd = krow + kPagedTokens * kv.kv_dim + int64_t(part - heads - kv_heads) * dh;
    for (int e = lane; e < dh; e += 32) vd[e] = x[e];
    return;
  }
  const bool is_q = part < heads;
  T* y = is_q ? q + token * int64_t(heads) * dh + int64_t(part) * dh : krow + int64_t(part - heads) * dh;
  QkNormRopeHead<T, kMaxPairsPerLane>(x, y, is_q ? q_norm_w : k_norm_w, dh, eps, nullptr,
                                      [&](int i) { return RopeCosSin(pos, inv_freq[i], rope_scale); });
}

}  // namespace

template <class T>
cudaError_t launch_paged_qkv(const T* qkv, int64_t qkv_stride, T* q, const float* q_norm_w, const float* k_norm_w,
                             const double* inv_freq, double rope_scale, const PagedKv<T>& kv, int64_t batch, int64_t n,
                             int heads, int kv_heads, int head_dim, float eps, cudaStream_t stream) {
  const int64_t tokens = batch * n, tasks = tokens * (heads + 2 * kv_heads);
  if (tasks == 0) return cudaSuccess;
  if (head_dim % 2 != 0 || head_dim > 2 * 32 * kMaxPairsPerLane) return cudaErrorInvalidValue;
  paged_qkv_kernel<T><<<ceil_div(tasks, kWarps), 32 * kWarps, 0, stream>>>(
      qkv, qkv_stride, q, q_norm_w, k_norm_w, inv_freq, rope_scale, kv, n, tokens, heads, kv_heads, head_dim, eps);
  return cudaGetLastError();
}

template cudaError_t launch_paged_qkv<float>(const float*, int64_t, float*, const float*, const float*, const double*,
                                             double, const PagedKv<float>&, int64_t, int64_t, int, int, int, float,
                                             cudaStream_t);
template cudaError_t launch_paged_qkv<__nv_bfloat16>(const __nv_bfloat16*, int64_t, __nv_bfloat16*, const float*,
                                                     const float*, const double*, double,
                                                     const PagedKv<__nv_bfloat16>&, int64_t, int64_t, int, int, int,
                                                     float, cudaStream_t);

}  // namespace blockd::kernels
