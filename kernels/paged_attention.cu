#include "kernels/common.cuh"
#include "kernels/paged_attention.cuh"

#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>

namespace blockd::kernels {
namespace {

constexpr int kThreads = 128;
constexpr int kKeyTile = 32;    // positions per tile: one per lane in the softmax pass
constexpr int kQueryTile = 8;   // (token, head) queries of one kv head per thread block

// Two adjacent elements as floats (one 4- or 8-byte load; e is even, rows are even-sized).
__device__ __forceinline__ float2 load2(const float* p) { return *reinterpret_cast<const float2*>(p); }
__device__ __forceinline__ float2 load2(const __nv_bfloat16* p) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}

// Row r's page `page`: in the one store's chunks, or (rows of several stores) in row r's.
template <class T>
__device__ __forceinline__ T* PagePtr(const PagedKv<T>& kv, int64_t r, int32_t page) {
  const int64_t page_elems = 2 * kPagedTokens * kv.kv_dim;
  if (kv.row_chunk == nullptr) return kv.chunks[page / kv.chunk_pages] + (page % kv.chunk_pages) * page_elems;
  const int32_t chunk_pages = kv.row_chunk_pages[r];
  return kv.chunks[kv.row_chunk[r] + page / chunk_pages] + (page % chunk_pages) * page_elems;
}

template <class T>
__global__ void paged_kv_write_kernel(PagedKv<T> kv, const T* k, int64_t k_stride, const T* v, int64_t v_stride,
                                      int64_t n) {
  const int64_t token = blockIdx.x, r = token / n, i = token % n;
  const int64_t pos = kv.start[r] + i;
  T* page = PagePtr(kv, r, kv.table[r * kv.table_width + pos / kPagedTokens]);
  T* kd = page + (pos % kPagedTokens) * kv.kv_dim;
  T* vd = kd + kPagedTokens * kv.kv_dim;
  for (int64_t e = threadIdx.x; e < kv.kv_dim; e += blockDim.x) {
    kd[e] = k[token * k_stride + e];
    vd[e] = v[token * v_stride + e];
  }
}

// Shared memory: K tile [kKeyTile][dh + 1] (padded: lanes read different rows at one column),
// V tile [kKeyTile][dh], queries [kQueryTile][dh], scores/probabilities [kQueryTile][kKeyTile],
// accumulators [kQueryTile][dh], and per query the running max, sum and this tile's correction.
size_t SmemBytes(int dh) {
  return sizeof(float) * (size_t(kKeyTile) * (dh + 1) + size_t(kKeyTile) * dh + size_t(kQueryTile) * dh +
                          size_t(kQueryTile) * kKeyTile + size_t(kQueryTile) * dh + 3 * kQueryTile);
}

// grid (kv_heads * query tiles, batch, splits). Query f of the tile is flattened (i, g):
// token i = f / group, head kvh * group + g.
template <class T>
__global__ void __launch_bounds__(kThreads, 4)
    paged_attention_kernel(PagedKv<T> kv, const T* q, int64_t q_stride, T* o, int64_t o_stride, int64_t n, int heads,
                           int kv_heads, int dh, int64_t split_len, int splits, float scale, float* part_o,
                           float* part_lse) {
  extern __shared__ float smem[];
  float* ks = smem;
  float* vs = ks + kKeyTile * (dh + 1);
  float* qs = vs + kKeyTile * dh;
  float* ss = qs + kQueryTile * dh;
  float* acc = ss + kQueryTile * kKeyTile;
  float* mx = acc + kQueryTile * dh;
  float* sum = mx + kQueryTile;
  float* corr = sum + kQueryTile;

  const int group = heads / kv_heads;
  const int tiles = static_cast<int>((n * group + kQueryTile - 1) / kQueryTile);
  const int kvh = blockIdx.x / tiles, tile = blockIdx.x % tiles;
  const int64_t r = blockIdx.y;
  const int split = blockIdx.z;
  const int64_t start = kv.start[r];
  const int64_t f0 = int64_t(tile) * kQueryTile;
  const int nq = static_cast<int>(min(int64_t(kQueryTile), n * group - f0));
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  for (int idx = tid; idx < kQueryTile * dh; idx += kThreads) {
    const int f = idx / dh, e = idx % dh;
    float val = 0.f;
    if (f < nq) {
      const int64_t i = (f0 + f) / group, h = int64_t(kvh) * group + (f0 + f) % group;
      val = to_float(q[(r * n + i) * q_stride + h * dh + e]);
    }
    qs[idx] = val;
    acc[idx] = 0.f;
  }
  if (tid < kQueryTile) {
    mx[tid] = -INFINITY;
    sum[tid] = 0.f;
  }
  // This block's positions: the split's part of 0..start + last query's token.
  const int64_t last_token = (f0 + nq - 1) / group;
  const int64_t len = start + last_token + 1;
  const int64_t lo = int64_t(split) * split_len, hi = min(len, lo + split_len);
  const int64_t kv_dim = kv.kv_dim;
  for (int64_t t0 = lo; t0 < hi; t0 += kKeyTile) {
    __syncthreads();  // the previous tile's K, V and probabilities are consumed
    for (int idx = tid; idx < kKeyTile * (dh / 2); idx += kThreads) {
      const int j = idx / (dh / 2), e = 2 * (idx % (dh / 2));
      const int64_t pos = t0 + j;
      float2 kk = make_float2(0.f, 0.f), vv = kk;
      if (pos < hi) {
        const T* page = PagePtr(kv, r, kv.table[r * kv.table_width + pos / kPagedTokens]);
        const T* kp = page + (pos % kPagedTokens) * kv_dim + int64_t(kvh) * dh + e;
        kk = load2(kp);
        vv = load2(kp + kPagedTokens * kv_dim);
      }
      ks[j * (dh + 1) + e] = kk.x;
      ks[j * (dh + 1) + e + 1] = kk.y;
      vs[j * dh + e] = vv.x;
      vs[j * dh + e + 1] = vv.y;
    }
    __syncthreads();
    for (int idx = tid; idx < nq * kKeyTile; idx += kThreads) {
      const int f = idx / kKeyTile, j = idx % kKeyTile;
      const int64_t pos = t0 + j;
      float s = -INFINITY;
      if (pos < hi && pos <= start + (f0 + f) / group) {
        const float* qf = qs + f * dh;
        const float* kj = ks + j * (dh + 1);
        float dot = 0.f;
        for (int e = 0; e < dh; ++e) dot = fmaf(qf[e], kj[e], dot);
        s = dot * scale;
      }
      ss[idx] = s;
    }
    __syncthreads();
    // Online softmax: one warp per query, one lane per position of the tile.
    for (int f = warp; f < nq; f += kThreads / 32) {
      const float s = ss[f * kKeyTile + lane];
      const float m_old = mx[f];
      const float m_new = fmaxf(m_old, warp_max(s));
      const float p = s == -INFINITY ? 0.f : __expf(s - m_new);
      const float total = warp_sum(p);
      ss[f * kKeyTile + lane] = p;
      __syncwarp();
      if (lane == 0) {
        const float c = m_old == -INFINITY ? (m_new == -INFINITY ? 1.f : 0.f) : __expf(m_old - m_new);
        corr[f] = c;
        sum[f] = sum[f] * c + total;
        mx[f] = m_new;
      }
    }
    __syncthreads();
    for (int idx = tid; idx < nq * dh; idx += kThreads) {
      const int f = idx / dh, e = idx % dh;
      float a = acc[idx] * corr[f];
      const float* pf = ss + f * kKeyTile;
#pragma unroll 8
      for (int j = 0; j < kKeyTile; ++j) a = fmaf(pf[j], vs[j * dh + e], a);
      acc[idx] = a;
    }
  }
  __syncthreads();
  for (int idx = tid; idx < nq * dh; idx += kThreads) {
    const int f = idx / dh, e = idx % dh;
    const int64_t i = (f0 + f) / group, h = int64_t(kvh) * group + (f0 + f) % group;
    const float l = sum[f];
    const float out = l > 0.f ? acc[idx] / l : 0.f;
    if (splits == 1) {
      o[(r * n + i) * o_stride + h * dh + e] = from_float<T>(out);
    } else {
      const int64_t row = (r * n + i) * heads + h;  // [batch * n * heads] queries
      part_o[(int64_t(split) * gridDim.y * n * heads + row) * dh + e] = out;
      if (e == 0) part_lse[int64_t(split) * gridDim.y * n * heads + row] = l > 0.f ? mx[f] + __logf(l) : -INFINITY;
    }
  }
}

// One block per query (row, token, head): o = sum_s exp(lse_s - lse) o_s.
template <class T>
__global__ void paged_attention_combine_kernel(const float* part_o, const float* part_lse, T* o, int64_t o_stride,
                                               int64_t queries, int heads, int dh, int splits) {
  const int64_t row = blockIdx.x;
  float m = -INFINITY;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, part_lse[s * queries + row]);
  float total = 0.f;
  for (int s = 0; s < splits; ++s) total += __expf(part_lse[s * queries + row] - m);
  const int64_t token = row / heads, h = row % heads;
  for (int e = threadIdx.x; e < dh; e += blockDim.x) {
    float a = 0.f;
    for (int s = 0; s < splits; ++s) {
      const float w = __expf(part_lse[s * queries + row] - m);
      if (w > 0.f) a = fmaf(w, part_o[(s * queries + row) * dh + e], a);
    }
    o[token * o_stride + h * dh + e] = from_float<T>(a / total);
  }
}

int ceil_div64(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace

template <class T>
cudaError_t launch_paged_kv_write(const PagedKv<T>& kv, const T* k, int64_t k_stride, const T* v, int64_t v_stride,
                                  int64_t batch, int64_t n, cudaStream_t stream) {
  if (batch * n == 0) return cudaSuccess;
  const int threads = static_cast<int>(std::min<int64_t>(256, (kv.kv_dim + 31) / 32 * 32));
  paged_kv_write_kernel<T><<<static_cast<unsigned>(batch * n), threads, 0, stream>>>(kv, k, k_stride, v, v_stride, n);
  return cudaGetLastError();
}

int paged_attention_splits(int64_t batch, int64_t n, int heads, int kv_heads, int64_t max_len, int sm_count) {
  const int group = heads / kv_heads;
  const int64_t blocks = batch * kv_heads * ceil_div64(n * group, kQueryTile);
  const int64_t want = std::max<int64_t>(1, (2 * int64_t(sm_count) + blocks - 1) / blocks);
  // At least two tiles of positions per split, so a split's fixed cost stays small.
  const int64_t most = std::max<int64_t>(1, max_len / (2 * kKeyTile));
  return static_cast<int>(std::min<int64_t>({want, most, 128}));
}

int64_t paged_attention_workspace_floats(int64_t batch, int64_t n, int heads, int head_dim, int splits) {
  if (splits <= 1) return 0;
  return int64_t(splits) * batch * n * heads * (head_dim + 1);
}

template <class T>
cudaError_t launch_paged_attention(const PagedKv<T>& kv, const T* q, int64_t q_stride, T* o, int64_t o_stride,
                                   int64_t batch, int64_t n, int heads, int kv_heads, int head_dim, int64_t max_len,
                                   int splits, float* workspace, cudaStream_t stream) {
  if (batch * n == 0) return cudaSuccess;
  if (head_dim % 2 != 0 || head_dim > 256 || heads % kv_heads != 0 || splits < 1) return cudaErrorInvalidValue;
  const size_t smem = SmemBytes(head_dim);
  if (smem > 48 * 1024) {  // head_dim above 128 needs more than the default, on whichever device is current
    cudaError_t e = cudaFuncSetAttribute(paged_attention_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  const int group = heads / kv_heads;
  const int tiles = ceil_div64(n * group, kQueryTile);
  // Splits cover whole key tiles.
  const int64_t split_len = (ceil_div64(max_len, splits) + kKeyTile - 1) / kKeyTile * kKeyTile;
  const int used = ceil_div64(max_len, split_len);
  const int64_t queries = batch * n * heads;
  float* part_o = workspace;
  float* part_lse = used > 1 ? workspace + int64_t(used) * queries * head_dim : nullptr;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  dim3 grid(static_cast<unsigned>(kv_heads * tiles), static_cast<unsigned>(batch), static_cast<unsigned>(used));
  paged_attention_kernel<T><<<grid, kThreads, smem, stream>>>(kv, q, q_stride, o, o_stride, n, heads, kv_heads,
                                                              head_dim, split_len, used, scale, part_o, part_lse);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || used == 1) return e;
  const int threads = std::min(256, (head_dim + 31) / 32 * 32);
  paged_attention_combine_kernel<T><<<static_cast<unsigned>(queries), threads, 0, stream>>>(
      part_o, part_lse, o, o_stride, queries, heads, head_dim, used);
  return cudaGetLastError();
}

#define INSTANTIATE(T)                                                                                          \
  template cudaError_t launch_paged_kv_write<T>(const PagedKv<T>&, const T*, int64_t, const T*, int64_t, int64_t, \
                                                int64_t, cudaStream_t);                                         \
  template cudaError_t launch_paged_attention<T>(const PagedKv<T>&, const T*, int64_t, T*, int64_t, int64_t,     \
                                                 int64_t, int, int, int, int64_t, int, float*, cudaStream_t);
INSTANTIATE(float)
INSTANTIATE(__nv_bfloat16)
#undef INSTANTIATE

}  // namespace blockd::kernels
