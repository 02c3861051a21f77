#include <cmath>
#include <type_traits>

#include "kernels/common.cuh"
#include "kernels/qknorm_rope_head.cuh"
#include "kernels/reduce_rows.cuh"
#include "kernels/rope.cuh"
#include "kernels/rope_angle.cuh"

namespace blockd::kernels {
namespace {

constexpr int kMaxPairsPerLane = 8;  // head_dim <= 512
constexpr int kWarps = 8;
constexpr int kBwdBlocks = 1056;  // 8 blocks of 8 warps per SM: enough loads in flight
constexpr int64_t kTokensForWarpPerToken = 1024;

__global__ void rope_table_kernel(float2* table, int seq, int half, int64_t offset,
                                  const double* __restrict__ inv_freq, double scale) {
  const int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (idx >= int64_t(seq) * half) return;
  const int s = static_cast<int>(idx / half), i = static_cast<int>(idx % half);
  table[idx] = RopeCosSin(offset + s, inv_freq[i], scale);
}

template <class T>
__global__ void qknorm_rope_fwd_kernel(const T* __restrict__ in, int64_t in_stride, T* __restrict__ out,
                                       float* __restrict__ rstd, const float* __restrict__ w,
                                       const float2* __restrict__ table, int64_t tokens, int seq, int heads, int dh,
                                       float eps) {
  const int64_t task = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  if (task >= tokens * heads) return;
  const int64_t token = task / heads;
  const int h = static_cast<int>(task % heads);
  const int half = dh / 2;
  const int pos = static_cast<int>(token % seq);
  QkNormRopeHead<T, kMaxPairsPerLane>(in + token * in_stride + int64_t(h) * dh, out + task * dh, w, dh, eps,
                                      rstd != nullptr ? rstd + task : nullptr,
                                      [&](int i) { return table[int64_t(pos) * half + i]; });
}

// Grid-strided over (token, head) tasks with a fixed grid, so each warp's dw partial is a
// deterministic sum; partials land in workspace[block][dh] and are reduced afterwards.
template <class T, class G>
__global__ void qknorm_rope_bwd_kernel(const G* __restrict__ dout, const T* __restrict__ in, int64_t in_stride,
                                       const float* __restrict__ rstd, const float* __restrict__ w,
                                       const float2* __restrict__ table, T* __restrict__ din,
                                       float* __restrict__ partial, int64_t tokens, int seq, int heads, int dh) {
  const int lane = threadIdx.x & 31;
  const int64_t warp_id = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  const int64_t num_warps = int64_t(gridDim.x) * kWarps;
  const int half = dh / 2;
  float dwa[kMaxPairsPerLane] = {}, dwb[kMaxPairsPerLane] = {};
  for (int64_t task = warp_id; task < tokens * heads; task += num_warps) {
    const int64_t token = task / heads;
    const int h = static_cast<int>(task % heads);
    const int pos = static_cast<int>(token % seq);
    const G* g = dout + task * dh;
    float ga[kMaxPairsPerLane], gb[kMaxPairsPerLane];
    // The transpose of the rotation: rotate the gradient back by -angle.
#pragma unroll
    for (int t = 0; t < kMaxPairsPerLane; ++t) {
      const int i = lane + 32 * t;
      ga[t] = gb[t] = 0.f;
      if (i < half) {
        const float2 cs = table[int64_t(pos) * half + i];
        const float u = to_float(g[i]), v = to_float(g[i + half]);
        ga[t] = u * cs.x + v * cs.y;
        gb[t] = v * cs.x - u * cs.y;
      }
    }
    const T* x = in + token * in_stride + int64_t(h) * dh;
    T* dx = din + token * in_stride + int64_t(h) * dh;
    if (w == nullptr) {
#pragma unroll
      for (int t = 0; t < kMaxPairsPerLane; ++t) {
        const int i = lane + 32 * t;
        if (i < half) {
          dx[i] = from_float<T>(ga[t]);
          dx[i + half] = from_float<T>(gb[t]);
        }
      }
      continue;
    }
    const float rs = rstd[task];
    float xa[kMaxPairsPerLane], xb[kMaxPairsPerLane];
    float dot = 0.f;
#pragma unroll
    for (int t = 0; t < kMaxPairsPerLane; ++t) {
      const int i = lane + 32 * t;
      xa[t] = i < half ? to_float(x[i]) * rs : 0.f;  // xhat
      xb[t] = i < half ? to_float(x[i + half]) * rs : 0.f;
      if (i < half) dot += ga[t] * w[i] * xa[t] + gb[t] * w[i + half] * xb[t];
    }
    const float mean = warp_sum(dot) / dh;
#pragma unroll
    for (int t = 0; t < kMaxPairsPerLane; ++t) {
      const int i = lane + 32 * t;
      if (i < half) {
        dx[i] = from_float<T>(rs * (ga[t] * w[i] - xa[t] * mean));
        dx[i + half] = from_float<T>(rs * (gb[t] * w[i + half] - xb[t] * mean));
        dwa[t] += ga[t] * xa[t];
        dwb[t] += gb[t] * xb[t];
      }
    }
  }
  if (w == nullptr) return;
  // Combine the block's warps in a fixed order (deterministic), one partial row per block.
  __shared__ float warp_dw[kWarps][2 * 32 * kMaxPairsPerLane];
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int t = 0; t < kMaxPairsPerLane; ++t) {
    const int i = lane + 32 * t;
    if (i < half) {
      warp_dw[warp][i] = dwa[t];
      warp_dw[warp][i + half] = dwb[t];
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < dh; i += blockDim.x) {
    float s = 0.f;
    for (int k = 0; k < kWarps; ++k) s += warp_dw[k][i];
    partial[int64_t(blockIdx.x) * dh + i] = s;
  }
}

// Token-per-warp variants for head_dim = 64 P (P = 1, 2, 4): a lane owns the P adjacent pairs
// (i, i + dh/2) for i in [P lane, P lane + P), so loads are P-wide vectors, and cos/sin and the
// norm weights are read once per token (per warp) instead of once per head.
template <class T, int P>
struct Vec {
  T v[P];
};

template <class T, int P>
__device__ __forceinline__ void load_vec(float (&dst)[P], const T* src) {
  if constexpr (P == 1) {
    dst[0] = to_float(src[0]);
  } else if constexpr (std::is_same<T, float>::value) {
    if constexpr (P == 2) {
      const float2 v = *reinterpret_cast<const float2*>(src);
      dst[0] = v.x, dst[1] = v.y;
    } else {
      const float4 v = *reinterpret_cast<const float4*>(src);
      dst[0] = v.x, dst[1] = v.y, dst[2] = v.z, dst[3] = v.w;
    }
  } else {
#pragma unroll
    for (int p = 0; p < P; p += 2) {
      const __nv_bfloat162 v = *reinterpret_cast<const __nv_bfloat162*>(src + p);
      dst[p] = __low2float(v), dst[p + 1] = __high2float(v);
    }
  }
}

template <class T, int P>
__device__ __forceinline__ void store_vec(T* dst, const float (&src)[P]) {
  if constexpr (P == 1) {
    dst[0] = from_float<T>(src[0]);
  } else if constexpr (std::is_same<T, float>::value) {
#pragma unroll
    for (int p = 0; p < P; ++p) dst[p] = src[p];
  } else {
#pragma unroll
    for (int p = 0; p < P; p += 2) {
      *reinterpret_cast<__nv_bfloat162*>(dst + p) = __floats2bfloat162_rn(src[p], src[p + 1]);
    }
  }
}

template <class T, int P>
__global__ void qknorm_rope_fwd_tok_kernel(const T* __restrict__ in, int64_t in_stride, T* __restrict__ out,
                                           float* __restrict__ rstd, const float* __restrict__ w,
                                           const float2* __restrict__ table, int64_t tokens, int seq, int heads,
                                           float eps) {
  constexpr int HALF = 32 * P, DH = 2 * HALF;
  const int lane = threadIdx.x & 31, i0 = lane * P;
  const int64_t token = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  if (token >= tokens) return;
  float wa[P], wb[P], c[P], sn[P];
#pragma unroll
  for (int p = 0; p < P; ++p) {
    wa[p] = w != nullptr ? w[i0 + p] : 1.f;
    wb[p] = w != nullptr ? w[HALF + i0 + p] : 1.f;
    const float2 cs = table[int64_t(token % seq) * HALF + i0 + p];
    c[p] = cs.x, sn[p] = cs.y;
  }
  for (int h = 0; h < heads; ++h) {
    const T* x = in + token * in_stride + int64_t(h) * DH;
    float a[P], b[P];
    load_vec<T, P>(a, x + i0);
    load_vec<T, P>(b, x + HALF + i0);
    if (w != nullptr) {
      float ss = 0.f;
#pragma unroll
      for (int p = 0; p < P; ++p) ss += a[p] * a[p] + b[p] * b[p];
      const float rs = rsqrtf(warp_sum(ss) / DH + eps);
      if (lane == 0) rstd[token * heads + h] = rs;
#pragma unroll
      for (int p = 0; p < P; ++p) {
        a[p] = (a[p] * rs) * wa[p];
        b[p] = (b[p] * rs) * wb[p];
      }
    }
    float ya[P], yb[P];
#pragma unroll
    for (int p = 0; p < P; ++p) {
      ya[p] = a[p] * c[p] - b[p] * sn[p];
      yb[p] = b[p] * c[p] + a[p] * sn[p];
    }
    T* y = out + (token * heads + h) * DH;
    store_vec<T, P>(y + i0, ya);
    store_vec<T, P>(y + HALF + i0, yb);
  }
}

template <class T, class G, int P>
__global__ void qknorm_rope_bwd_tok_kernel(const G* __restrict__ dout, const T* __restrict__ in,
                                           int64_t in_stride, const float* __restrict__ rstd,
                                           const float* __restrict__ w, const float2* __restrict__ table,
                                           T* __restrict__ din, float* __restrict__ partial, int64_t tokens, int seq,
                                           int heads) {
  constexpr int HALF = 32 * P, DH = 2 * HALF;
  const int lane = threadIdx.x & 31, i0 = lane * P, warp = threadIdx.x >> 5;
  float wa[P], wb[P], dwa[P], dwb[P];
#pragma unroll
  for (int p = 0; p < P; ++p) {
    wa[p] = w != nullptr ? w[i0 + p] : 1.f;
    wb[p] = w != nullptr ? w[HALF + i0 + p] : 1.f;
    dwa[p] = dwb[p] = 0.f;
  }
  for (int64_t token = blockIdx.x * int64_t(kWarps) + warp; token < tokens; token += int64_t(gridDim.x) * kWarps) {
    float c[P], sn[P];
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const float2 cs = table[int64_t(token % seq) * HALF + i0 + p];
      c[p] = cs.x, sn[p] = cs.y;
    }
    for (int h = 0; h < heads; ++h) {
      const G* g = dout + (token * heads + h) * DH;
      float u[P], v[P], ga[P], gb[P];
      load_vec<G, P>(u, g + i0);
      load_vec<G, P>(v, g + HALF + i0);
#pragma unroll
      for (int p = 0; p < P; ++p) {  // the transpose of the rotation
        ga[p] = u[p] * c[p] + v[p] * sn[p];
        gb[p] = v[p] * c[p] - u[p] * sn[p];
      }
      T* dx = din + token * in_stride + int64_t(h) * DH;
      if (w == nullptr) {
        store_vec<T, P>(dx + i0, ga);
        store_vec<T, P>(dx + HALF + i0, gb);
        continue;
      }
      const T* x = in + token * in_stride + int64_t(h) * DH;
      const float rs = rstd[token * heads + h];
      float xa[P], xb[P];
      load_vec<T, P>(xa, x + i0);
      load_vec<T, P>(xb, x + HALF + i0);
      float dot = 0.f;
#pragma unroll
      for (int p = 0; p < P; ++p) {
        xa[p] *= rs;  // xhat
        xb[p] *= rs;
        dot += ga[p] * wa[p] * xa[p] + gb[p] * wb[p] * xb[p];
      }
      const float mean = warp_sum(dot) / DH;
      float da[P], db[P];
#pragma unroll
      for (int p = 0; p < P; ++p) {
        da[p] = rs * (ga[p] * wa[p] - xa[p] * mean);
        db[p] = rs * (gb[p] * wb[p] - xb[p] * mean);
        dwa[p] += ga[p] * xa[p];
        dwb[p] += gb[p] * xb[p];
      }
      store_vec<T, P>(dx + i0, da);
      store_vec<T, P>(dx + HALF + i0, db);
    }
  }
  if (w == nullptr) return;
  __shared__ float warp_dw[kWarps][DH];
#pragma unroll
  for (int p = 0; p < P; ++p) {
    warp_dw[warp][i0 + p] = dwa[p];
    warp_dw[warp][HALF + i0 + p] = dwb[p];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < DH; i += blockDim.x) {
    float s = 0.f;
    for (int k = 0; k < kWarps; ++k) s += warp_dw[k][i];
    partial[int64_t(blockIdx.x) * DH + i] = s;
  }
}

}  // namespace

cudaError_t launch_rope_table(float2* table, int seq, int head_dim, int64_t offset, const double* inv_freq,
                              double scale, cudaStream_t stream) {
  const int64_t n = int64_t(seq) * (head_dim / 2);
  if (n == 0) return cudaSuccess;
  rope_table_kernel<<<ceil_div(n, 256), 256, 0, stream>>>(table, seq, head_dim / 2, offset, inv_freq, scale);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_qknorm_rope_fwd(const T* in, int64_t in_stride, T* out, float* rstd, const float* norm_w,
                                   const float2* table, int64_t tokens, int seq, int heads, int head_dim, float eps,
                                   cudaStream_t stream) {
  const int64_t tasks = tokens * heads;
  if (tasks == 0) return cudaSuccess;
  const bool vec_ok = (in_stride % 8) == 0 && (reinterpret_cast<uintptr_t>(in) % 16) == 0;
  // A warp per token (its heads in turn) pays off with many tokens; a decode step's few tokens
  // take a warp per (token, head), else one warp would walk all the heads alone.
  if (vec_ok && tokens >= kTokensForWarpPerToken && (head_dim == 64 || head_dim == 128 || head_dim == 256)) {
    const int blocks = ceil_div(tokens, kWarps);
    if (head_dim == 64) {
      qknorm_rope_fwd_tok_kernel<T, 1><<<blocks, 32 * kWarps, 0, stream>>>(in, in_stride, out, rstd, norm_w, table,
                                                                          tokens, seq, heads, eps);
    } else if (head_dim == 128) {
      qknorm_rope_fwd_tok_kernel<T, 2><<<blocks, 32 * kWarps, 0, stream>>>(in, in_stride, out, rstd, norm_w, table,
                                                                          tokens, seq, heads, eps);
    } else {
      qknorm_rope_fwd_tok_kernel<T, 4><<<blocks, 32 * kWarps, 0, stream>>>(in, in_stride, out, rstd, norm_w, table,
                                                                          tokens, seq, heads, eps);
    }
    return cudaGetLastError();
  }
  qknorm_rope_fwd_kernel<T><<<ceil_div(tasks, kWarps), 32 * kWarps, 0, stream>>>(
      in, in_stride, out, rstd, norm_w, table, tokens, seq, heads, head_dim, eps);
  return cudaGetLastError();
}

int64_t qknorm_rope_bwd_workspace_floats(int head_dim) { return int64_t(kBwdBlocks) * head_dim; }

template <class T, class G>
cudaError_t launch_qknorm_rope_bwd(const G* dout, const T* in, int64_t in_stride, const float* rstd,
                                   const float* norm_w, const float2* table, T* din, float* dw, bool accumulate,
                                   float* workspace, int64_t tokens, int seq, int heads, int head_dim,
                                   cudaStream_t stream) {
  const int64_t tasks = tokens * heads;
  if (tasks == 0) return cudaSuccess;
  const bool vec_ok = (in_stride % 8) == 0 && ((reinterpret_cast<uintptr_t>(in) | reinterpret_cast<uintptr_t>(din) |
                                                reinterpret_cast<uintptr_t>(dout)) % 16) == 0;
  if (vec_ok && (head_dim == 64 || head_dim == 128 || head_dim == 256)) {
    if (head_dim == 64) {
      qknorm_rope_bwd_tok_kernel<T, G, 1><<<kBwdBlocks, 32 * kWarps, 0, stream>>>(dout, in, in_stride, rstd, norm_w,
                                                                              table, din, workspace, tokens, seq, heads);
    } else if (head_dim == 128) {
      qknorm_rope_bwd_tok_kernel<T, G, 2><<<kBwdBlocks, 32 * kWarps, 0, stream>>>(dout, in, in_stride, rstd, norm_w,
                                                                              table, din, workspace, tokens, seq, heads);
    } else {
      qknorm_rope_bwd_tok_kernel<T, G, 4><<<kBwdBlocks, 32 * kWarps, 0, stream>>>(dout, in, in_stride, rstd, norm_w,
                                                                              table, din, workspace, tokens, seq, heads);
    }
  } else {
    qknorm_rope_bwd_kernel<T, G><<<kBwdBlocks, 32 * kWarps, 0, stream>>>(dout, in, in_stride, rstd, norm_w, table, din,
                                                                      workspace, tokens, seq, heads, head_dim);
  }
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || norm_w == nullptr) return e;
  reduce_rows_kernel<<<ceil_div(head_dim, 128), 128, 0, stream>>>(workspace, kBwdBlocks, head_dim, dw, accumulate);
  return cudaGetLastError();
}

#define BLOCKD_INSTANTIATE_ROPE(T)                                                                                 \
  template cudaError_t launch_qknorm_rope_fwd<T>(const T*, int64_t, T*, float*, const float*, const float2*,       \
                                                 int64_t, int, int, int, float, cudaStream_t);                    \
  template cudaError_t launch_qknorm_rope_bwd<T, float>(const float*, const T*, int64_t, const float*,             \
                                                        const float*, const float2*, T*, float*, bool, float*,     \
                                                        int64_t, int, int, int, cudaStream_t);
BLOCKD_INSTANTIATE_ROPE(float)
BLOCKD_INSTANTIATE_ROPE(__nv_bfloat16)
// bf16 gradients in: what cuDNN's attention backward writes for dq and dk.
template cudaError_t launch_qknorm_rope_bwd<__nv_bfloat16, __nv_bfloat16>(
    const __nv_bfloat16*, const __nv_bfloat16*, int64_t, const float*, const float*, const float2*, __nv_bfloat16*,
    float*, bool, float*, int64_t, int, int, int, cudaStream_t);

}  // namespace blockd::kernels
