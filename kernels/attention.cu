#include <cmath>

#include <type_traits>

#include "kernels/attention.cuh"
#include "kernels/attention_fp32.cuh"
#include "kernels/attention_mma.cuh"
#include "kernels/common.cuh"

namespace blockd::kernels {
namespace {

// A block of 4 warps takes 16 rows (4 per warp); keys (or queries, in dk/dv) stream through
// shared memory 32 at a time, one per lane, with rows padded by one float against bank conflicts.
constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 4;
constexpr int kTile = kWarps * kRowsPerWarp;
constexpr int kChunk = 32;
constexpr int kMaxE = kAttentionMaxHeadDim / 32;  // head_dim elements per lane

template <class T>
__device__ __forceinline__ void load_rows(float* dst, int dst_stride, const T* src, int64_t src_stride, int rows,
                                          int first_row, int seq, int dh) {
  for (int idx = threadIdx.x; idx < rows * dh; idx += blockDim.x) {
    const int r = idx / dh, e = idx % dh;
    const int row = first_row + r;
    dst[r * dst_stride + e] = row < seq ? to_float(src[int64_t(row) * src_stride + e]) : 0.f;
  }
}

__device__ __forceinline__ float dot(const float* a, const float* b, int dh) {
  float s = 0.f;
  for (int e = 0; e < dh; ++e) s = fmaf(a[e], b[e], s);
  return s;
}

template <class T>
__global__ void __launch_bounds__(128) attention_fwd_kernel(const T* __restrict__ q, int64_t q_stride,
                                                            const T* __restrict__ k, int64_t k_stride,
                                                            const T* __restrict__ v, int64_t v_stride,
                                                            T* __restrict__ o, int64_t o_stride,
                                                            float* __restrict__ lse, int seq, int heads,
                                                            int kv_heads, int dh, float scale) {
  extern __shared__ float smem[];
  const int dpad = dh + 1;
  float* qs = smem;                // [kTile][dh]
  float* ks = qs + kTile * dh;     // [kChunk][dpad]
  float* vs = ks + kChunk * dpad;  // [kChunk][dh]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int b = blockIdx.y / heads, h = blockIdx.y % heads, kvh = h / (heads / kv_heads);
  const int row0 = blockIdx.x * kTile;
  const int64_t tok0 = int64_t(b) * seq;
  load_rows(qs, dh, q + tok0 * q_stride + int64_t(h) * dh, q_stride, kTile, row0, seq, dh);

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kMaxE];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    m[rr] = -INFINITY;
    l[rr] = 0.f;
#pragma unroll
    for (int t = 0; t < kMaxE; ++t) acc[rr][t] = 0.f;
  }
  const int last_row = min(row0 + kTile - 1, seq - 1);
  for (int c0 = 0; c0 <= last_row; c0 += kChunk) {
    __syncthreads();
    load_rows(ks, dpad, k + tok0 * k_stride + int64_t(kvh) * dh, k_stride, kChunk, c0, seq, dh);
    load_rows(vs, dh, v + tok0 * v_stride + int64_t(kvh) * dh, v_stride, kChunk, c0, seq, dh);
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr, i = row0 + r;
      if (i >= seq || c0 > i) continue;  // warp-uniform
      const int j = c0 + lane;
      const bool valid = j <= i;
      const float s = valid ? dot(qs + r * dh, ks + lane * dpad, dh) * scale : -INFINITY;
      const float m_new = fmaxf(m[rr], warp_max(s));
      const float p = valid ? expf(s - m_new) : 0.f;
      const float corr = expf(m[rr] - m_new);
      l[rr] = l[rr] * corr + warp_sum(p);
#pragma unroll
      for (int t = 0; t < kMaxE; ++t) acc[rr][t] *= corr;
      for (int jj = 0; jj < kChunk; ++jj) {
        const float pj = __shfl_sync(0xffffffffu, p, jj);
#pragma unroll
        for (int t = 0; t < kMaxE; ++t) {
          const int e = lane + 32 * t;
          if (e < dh) acc[rr][t] = fmaf(pj, vs[jj * dh + e], acc[rr][t]);
        }
      }
      m[rr] = m_new;
    }
  }
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int i = row0 + warp * kRowsPerWarp + rr;
    if (i >= seq) continue;
    T* orow = o + (tok0 + i) * o_stride + int64_t(h) * dh;
    const float inv = 1.f / l[rr];
#pragma unroll
    for (int t = 0; t < kMaxE; ++t) {
      const int e = lane + 32 * t;
      if (e < dh) orow[e] = from_float<T>(acc[rr][t] * inv);
    }
    if (lane == 0) lse[(int64_t(b) * heads + h) * seq + i] = m[rr] + logf(l[rr]);
  }
}

// delta[b, h, i] = sum_e do[i, h, e] * o[i, h, e]: the row sums of P * dP that softmax's backward needs.
template <class T>
__global__ void attention_delta_kernel(const T* __restrict__ o, int64_t o_stride, const T* __restrict__ d_o,
                                       int64_t do_stride, float* __restrict__ delta, int64_t tokens, int seq,
                                       int heads, int dh) {
  const int lane = threadIdx.x & 31;
  const int64_t task = blockIdx.x * int64_t(blockDim.x / 32) + (threadIdx.x >> 5);
  if (task >= tokens * heads) return;
  const int64_t token = task / heads;
  const int h = static_cast<int>(task % heads);
  const T* orow = o + token * o_stride + int64_t(h) * dh;
  const T* drow = d_o + token * do_stride + int64_t(h) * dh;
  float s = 0.f;
  for (int e = lane; e < dh; e += 32) s += to_float(orow[e]) * to_float(drow[e]);
  s = warp_sum(s);
  const int64_t b = token / seq, i = token % seq;
  if (lane == 0) delta[(b * heads + h) * seq + i] = s;
}

// dq_i = scale * sum_j p_ij (dp_ij - delta_i) k_j, with p recomputed from lse.
template <class T>
__global__ void __launch_bounds__(128) attention_bwd_dq_kernel(
    const T* __restrict__ q, int64_t q_stride, const T* __restrict__ k, int64_t k_stride, const T* __restrict__ v,
    int64_t v_stride, const float* __restrict__ lse, const T* __restrict__ d_o, int64_t do_stride,
    const float* __restrict__ delta, float* __restrict__ dq, int seq, int heads, int kv_heads, int dh, float scale) {
  extern __shared__ float smem[];
  const int dpad = dh + 1;
  float* qs = smem;                // [kTile][dh]
  float* dos = qs + kTile * dh;    // [kTile][dh]
  float* ks = dos + kTile * dh;    // [kChunk][dpad]
  float* vs = ks + kChunk * dpad;  // [kChunk][dpad]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int b = blockIdx.y / heads, h = blockIdx.y % heads, kvh = h / (heads / kv_heads);
  const int row0 = blockIdx.x * kTile;
  const int64_t tok0 = int64_t(b) * seq;
  load_rows(qs, dh, q + tok0 * q_stride + int64_t(h) * dh, q_stride, kTile, row0, seq, dh);
  load_rows(dos, dh, d_o + tok0 * do_stride + int64_t(h) * dh, do_stride, kTile, row0, seq, dh);
  float row_lse[kRowsPerWarp], row_delta[kRowsPerWarp], acc[kRowsPerWarp][kMaxE];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int i = row0 + warp * kRowsPerWarp + rr;
    const int64_t at = (int64_t(b) * heads + h) * seq + min(i, seq - 1);
    row_lse[rr] = lse[at];
    row_delta[rr] = delta[at];
#pragma unroll
    for (int t = 0; t < kMaxE; ++t) acc[rr][t] = 0.f;
  }
  const int last_row = min(row0 + kTile - 1, seq - 1);
  for (int c0 = 0; c0 <= last_row; c0 += kChunk) {
    __syncthreads();
    load_rows(ks, dpad, k + tok0 * k_stride + int64_t(kvh) * dh, k_stride, kChunk, c0, seq, dh);
    load_rows(vs, dpad, v + tok0 * v_stride + int64_t(kvh) * dh, v_stride, kChunk, c0, seq, dh);
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr, i = row0 + r;
      if (i >= seq || c0 > i) continue;
      const int j = c0 + lane;
      const bool valid = j <= i;
      const float p = valid ? expf(dot(qs + r * dh, ks + lane * dpad, dh) * scale - row_lse[rr]) : 0.f;
      const float dp = valid ? dot(dos + r * dh, vs + lane * dpad, dh) : 0.f;
      const float ds = p * (dp - row_delta[rr]);
      for (int jj = 0; jj < kChunk; ++jj) {
        const float dsj = __shfl_sync(0xffffffffu, ds, jj);
#pragma unroll
        for (int t = 0; t < kMaxE; ++t) {
          const int e = lane + 32 * t;
          if (e < dh) acc[rr][t] = fmaf(dsj, ks[jj * dpad + e], acc[rr][t]);
        }
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int i = row0 + warp * kRowsPerWarp + rr;
    if (i >= seq) continue;
    float* out = dq + (tok0 + i) * (int64_t(heads) * dh) + int64_t(h) * dh;
#pragma unroll
    for (int t = 0; t < kMaxE; ++t) {
      const int e = lane + 32 * t;
      if (e < dh) out[e] = acc[rr][t] * scale;
    }
  }
}

// For key row j of kv head kvh: dv_j = sum_i p_ij do_i and dk_j = scale * sum_i ds_ij q_i over
// every query i >= j of every query head that reads kvh.
template <class T>
__global__ void __launch_bounds__(128) attention_bwd_dkdv_kernel(
    const T* __restrict__ q, int64_t q_stride, const T* __restrict__ k, int64_t k_stride, const T* __restrict__ v,
    int64_t v_stride, const float* __restrict__ lse, const T* __restrict__ d_o, int64_t do_stride,
    const float* __restrict__ delta, float* __restrict__ dk, T* __restrict__ dv, int64_t dv_stride, int seq,
    int heads, int kv_heads, int dh, float scale) {
  extern __shared__ float smem[];
  const int dpad = dh + 1;
  float* krow = smem;                  // [kTile][dh]
  float* vrow = krow + kTile * dh;     // [kTile][dh]
  float* qc = vrow + kTile * dh;       // [kChunk][dpad]
  float* doc = qc + kChunk * dpad;     // [kChunk][dpad]
  float* lse_c = doc + kChunk * dpad;  // [kChunk]
  float* delta_c = lse_c + kChunk;     // [kChunk]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int b = blockIdx.y / kv_heads, kvh = blockIdx.y % kv_heads;
  const int group = heads / kv_heads;
  const int row0 = blockIdx.x * kTile;
  const int64_t tok0 = int64_t(b) * seq;
  load_rows(krow, dh, k + tok0 * k_stride + int64_t(kvh) * dh, k_stride, kTile, row0, seq, dh);
  load_rows(vrow, dh, v + tok0 * v_stride + int64_t(kvh) * dh, v_stride, kTile, row0, seq, dh);
  float acc_k[kRowsPerWarp][kMaxE], acc_v[kRowsPerWarp][kMaxE];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
#pragma unroll
    for (int t = 0; t < kMaxE; ++t) acc_k[rr][t] = acc_v[rr][t] = 0.f;
  }
  for (int g = 0; g < group; ++g) {
    const int h = kvh * group + g;
    const int64_t stat0 = (int64_t(b) * heads + h) * seq;
    for (int c0 = (row0 / kChunk) * kChunk; c0 < seq; c0 += kChunk) {
      __syncthreads();
      load_rows(qc, dpad, q + tok0 * q_stride + int64_t(h) * dh, q_stride, kChunk, c0, seq, dh);
      load_rows(doc, dpad, d_o + tok0 * do_stride + int64_t(h) * dh, do_stride, kChunk, c0, seq, dh);
      if (threadIdx.x < kChunk) {
        const int i = c0 + threadIdx.x;
        lse_c[threadIdx.x] = i < seq ? lse[stat0 + i] : 0.f;
        delta_c[threadIdx.x] = i < seq ? delta[stat0 + i] : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        const int r = warp * kRowsPerWarp + rr, j = row0 + r;
        if (j >= seq || c0 + kChunk - 1 < j) continue;  // every query of this chunk precedes key j
        const int i = c0 + lane;
        const bool valid = i >= j && i < seq;
        const float p = valid ? expf(dot(qc + lane * dpad, krow + r * dh, dh) * scale - lse_c[lane]) : 0.f;
        const float dp = valid ? dot(doc + lane * dpad, vrow + r * dh, dh) : 0.f;
        const float ds = p * (dp - delta_c[lane]);
        for (int ii = 0; ii < kChunk; ++ii) {
          const float pi = __shfl_sync(0xffffffffu, p, ii);
          const float dsi = __shfl_sync(0xffffffffu, ds, ii);
#pragma unroll
          for (int t = 0; t < kMaxE; ++t) {
            const int e = lane + 32 * t;
            if (e < dh) {
              acc_v[rr][t] = fmaf(pi, doc[ii * dpad + e], acc_v[rr][t]);
              acc_k[rr][t] = fmaf(dsi, qc[ii * dpad + e], acc_k[rr][t]);
            }
          }
        }
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int j = row0 + warp * kRowsPerWarp + rr;
    if (j >= seq) continue;
    float* dk_row = dk + (tok0 + j) * (int64_t(kv_heads) * dh) + int64_t(kvh) * dh;
    T* dv_row = dv + (tok0 + j) * dv_stride + int64_t(kvh) * dh;
#pragma unroll
    for (int t = 0; t < kMaxE; ++t) {
      const int e = lane + 32 * t;
      if (e < dh) {
        dk_row[e] = acc_k[rr][t] * scale;
        dv_row[e] = from_float<T>(acc_v[rr][t]);
      }
    }
  }
}

template <class T>
cudaError_t LaunchFwdSimt(const AttentionArgs<T>& a) {
  const size_t smem = sizeof(float) * (kTile * a.head_dim + kChunk * (a.head_dim + 1) + kChunk * a.head_dim);
  auto kernel = attention_fwd_kernel<T>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  dim3 grid(ceil_div(a.seq, kTile), a.batch * a.heads);
  kernel<<<grid, 32 * kWarps, smem, a.stream>>>(a.q, a.q_stride, a.k, a.k_stride, a.v, a.v_stride, a.o, a.o_stride,
                                                a.lse, a.seq, a.heads, a.kv_heads, a.head_dim, a.scale);
  return cudaGetLastError();
}

// Expects delta in the workspace (LaunchDelta, which every backward path runs first).
template <class T>
cudaError_t LaunchBwdSimt(const AttentionArgs<T>& a) {
  const float* delta = a.workspace;
  const size_t dq_smem = sizeof(float) * (2 * kTile * a.head_dim + 2 * kChunk * (a.head_dim + 1));
  auto dq_kernel = attention_bwd_dq_kernel<T>;
  cudaError_t e =
      cudaFuncSetAttribute(dq_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dq_smem));
  if (e != cudaSuccess) return e;
  dq_kernel<<<dim3(ceil_div(a.seq, kTile), a.batch * a.heads), 32 * kWarps, dq_smem, a.stream>>>(
      a.q, a.q_stride, a.k, a.k_stride, a.v, a.v_stride, a.lse, a.d_o, a.do_stride, delta, a.dq, a.seq, a.heads,
      a.kv_heads, a.head_dim, a.scale);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;

  const size_t kv_smem = sizeof(float) * (2 * kTile * a.head_dim + 2 * kChunk * (a.head_dim + 1) + 2 * kChunk);
  auto kv_kernel = attention_bwd_dkdv_kernel<T>;
  e = cudaFuncSetAttribute(kv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kv_smem));
  if (e != cudaSuccess) return e;
  kv_kernel<<<dim3(ceil_div(a.seq, kTile), a.batch * a.kv_heads), 32 * kWarps, kv_smem, a.stream>>>(
      a.q, a.q_stride, a.k, a.k_stride, a.v, a.v_stride, a.lse, a.d_o, a.do_stride, delta, a.dk, a.dv, a.dv_stride,
      a.seq, a.heads, a.kv_heads, a.head_dim, a.scale);
  return cudaGetLastError();
}

// Sizes every kernel handles: the SIMT kernels keep head_dim / 32 elements per lane.
template <class T>
bool Valid(const AttentionArgs<T>& a) {
  return a.head_dim > 0 && a.head_dim <= kAttentionMaxHeadDim && a.kv_heads > 0 && a.heads % a.kv_heads == 0;
}

// delta = rowsum(dO * O) into the workspace: the first step of every backward path.
template <class T>
cudaError_t LaunchDelta(const AttentionArgs<T>& a) {
  const int64_t tokens = int64_t(a.batch) * a.seq;
  attention_delta_kernel<T><<<ceil_div(tokens * a.heads, 8), 256, 0, a.stream>>>(
      a.o, a.o_stride, a.d_o, a.do_stride, a.workspace, tokens, a.seq, a.heads, a.head_dim);
  return cudaGetLastError();
}

}  // namespace

template <class T>
cudaError_t launch_attention_fwd(const AttentionArgs<T>& args) {
  if (!Valid(args)) return cudaErrorInvalidValue;
  if (args.batch == 0 || args.seq == 0) return cudaSuccess;
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {  // tensor cores where they cover the head dim
    if (attention_mma_supports(args.head_dim)) return launch_attention_fwd_mma(args);
  } else {  // fp32: register-tiled FFMA kernels where they cover the head dim and alignment
    if (attention_fp32_supports(args)) return launch_attention_fwd_fp32(args);
  }
  return LaunchFwdSimt(args);
}

template <class T>
cudaError_t launch_attention_bwd(const AttentionArgs<T>& args) {
  if (!Valid(args)) return cudaErrorInvalidValue;
  if (args.batch == 0 || args.seq == 0) return cudaSuccess;
  const cudaError_t e = LaunchDelta(args);
  if (e != cudaSuccess) return e;
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    if (attention_mma_supports(args.head_dim)) return launch_attention_bwd_mma(args);
  } else {
    if (attention_fp32_supports(args)) return launch_attention_bwd_fp32(args);
  }
  return LaunchBwdSimt(args);
}

template <class T>
cudaError_t launch_attention_fwd_simt(const AttentionArgs<T>& args) {
  if (!Valid(args)) return cudaErrorInvalidValue;
  if (args.batch == 0 || args.seq == 0) return cudaSuccess;
  return LaunchFwdSimt(args);
}

template <class T>
cudaError_t launch_attention_bwd_simt(const AttentionArgs<T>& args) {
  if (!Valid(args)) return cudaErrorInvalidValue;
  if (args.batch == 0 || args.seq == 0) return cudaSuccess;
  const cudaError_t e = LaunchDelta(args);
  if (e != cudaSuccess) return e;
  return LaunchBwdSimt(args);
}

int64_t attention_bwd_workspace_floats(int batch, int seq, int heads, int kv_heads, int head_dim) {
  // delta [batch, heads, seq], then the tensor-core path's fp32 dV accumulator [tokens, kv_heads * head_dim].
  return int64_t(batch) * heads * seq + int64_t(batch) * seq * kv_heads * head_dim;
}

template cudaError_t launch_attention_fwd<float>(const AttentionArgs<float>&);
template cudaError_t launch_attention_fwd<__nv_bfloat16>(const AttentionArgs<__nv_bfloat16>&);
template cudaError_t launch_attention_bwd<float>(const AttentionArgs<float>&);
template cudaError_t launch_attention_bwd<__nv_bfloat16>(const AttentionArgs<__nv_bfloat16>&);
template cudaError_t launch_attention_fwd_simt<float>(const AttentionArgs<float>&);
template cudaError_t launch_attention_fwd_simt<__nv_bfloat16>(const AttentionArgs<__nv_bfloat16>&);
template cudaError_t launch_attention_bwd_simt<float>(const AttentionArgs<float>&);
template cudaError_t launch_attention_bwd_simt<__nv_bfloat16>(const AttentionArgs<__nv_bfloat16>&);

}  // namespace blockd::kernels
