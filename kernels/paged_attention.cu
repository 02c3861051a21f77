#include "kernels/common.cuh"
#include "kernels/pdl.cuh"
#include "kernels/cp_async.cuh"
#include "kernels/paged_attention.cuh"
#include "kernels/paged_attention_mma.cuh"
#include "kernels/paged_kv.cuh"

#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace blockd::kernels {
namespace {

// Decode attention is a stream over K/V: each position's K and V row (dh elements of one kv head)
// is read once from HBM and used by every query of the kv head's group. A thread block owns one
// (kv head, row, split, tile of kQueries flattened (token, head) queries), keeps the queries in
// shared memory as fp32, and streams the split's positions in tiles of kTile through a ring of
// `stages` shared-memory buffers filled by cp.async, so the next tiles' loads are in flight while
// the warps compute on this one. Warp w owns query w: lane j scores position j of the tile, the
// warp's online softmax needs only shuffles, and each lane accumulates its pairs of the output's
// dh elements in registers. Nothing but the ring and the queries lives in shared memory, and the
// only writer of a ring stage is the cp.async issued after the __syncthreads that follows every
// warp's last read of it.
constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kQueries = kWarps;  // one query per warp
constexpr int kTile = 32;         // positions per tile: one per lane when scoring
constexpr int kMaxPairs = 4;      // output element pairs per lane: head_dim <= 256
constexpr int kRingBudget = 64 * 1024;  // ring bytes to aim for (at least two stages)
constexpr int kMaxSplitTiles = 32;      // positions per split at most: 1024

__device__ __forceinline__ float2 load2(const float* p) { return *reinterpret_cast<const float2*>(p); }
__device__ __forceinline__ float2 load2(const __nv_bfloat16* p) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}

template <class T>
__global__ void paged_kv_write_kernel(PagedKv<T> kv, const T* k, int64_t k_stride, const T* v, int64_t v_stride,
                                      int64_t n) {
  const int64_t token = blockIdx.x, r = token / n, i = token % n;
  T* kd = PagedKRow(kv, r, kv.start[r] + i);
  T* vd = kd + kPagedTokens * kv.kv_dim;
  for (int64_t e = threadIdx.x; e < kv.kv_dim; e += blockDim.x) {
    kd[e] = k[token * k_stride + e];
    vd[e] = v[token * v_stride + e];
  }
}

// Bytes of one K (or V) row in the ring: padded by one copy unit so that lanes reading different
// rows at the same column hit different banks (by 8 bytes for 4-byte copies: float2 reads of V).
template <class T, int kVec>
__host__ __device__ __forceinline__ int RowBytes(int dh) {
  return dh * static_cast<int>(sizeof(T)) + (kVec == 16 ? 16 : 8);
}

// q . k over dh elements; q fp32 in shared memory, k a ring row of T, read kVec bytes at a time.
template <class T, int kVec>
__device__ __forceinline__ float Dot(const float* q, const char* krow, int dh) {
  float s0 = 0.f, s1 = 0.f;  // two chains: half the dependent-FMA latency
  if constexpr (kVec == 16) {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll 4
    for (int e = 0; e < dh; e += kPer) {
      const uint4 raw = *reinterpret_cast<const uint4*>(krow + e * sizeof(T));
      if constexpr (std::is_same<T, float>::value) {
        const float4 kk = *reinterpret_cast<const float4*>(&raw);
        const float4 qq = *reinterpret_cast<const float4*>(q + e);
        s0 = fmaf(qq.x, kk.x, s0);
        s1 = fmaf(qq.y, kk.y, s1);
        s0 = fmaf(qq.z, kk.z, s0);
        s1 = fmaf(qq.w, kk.w, s1);
      } else {
        const __nv_bfloat162* kb = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float2 kk = __bfloat1622float2(kb[i]);
          const float2 qq = *reinterpret_cast<const float2*>(q + e + 2 * i);
          s0 = fmaf(qq.x, kk.x, s0);
          s1 = fmaf(qq.y, kk.y, s1);
        }
      }
    }
  } else {  // 4-byte units: two bf16 or one float
    if constexpr (std::is_same<T, float>::value) {
      const float* k = reinterpret_cast<const float*>(krow);
      for (int e = 0; e < dh; e += 2) {
        s0 = fmaf(q[e], k[e], s0);
        s1 = fmaf(q[e + 1], k[e + 1], s1);
      }
    } else {
      const T* k = reinterpret_cast<const T*>(krow);
      for (int e = 0; e < dh; e += 2) {
        const float2 kk = load2(k + e);
        s0 = fmaf(q[e], kk.x, s0);
        s1 = fmaf(q[e + 1], kk.y, s1);
      }
    }
  }
  return s0 + s1;
}

// Copies positions [t0, t0 + kTile) of kv head kvh of row r (those >= hi as zeros) into one ring
// stage: K rows at ks, V rows at vs. Issued by every thread of the block, not waited for.
template <class T, int kVec>
__device__ __forceinline__ void LoadTile(const PagedKv<T>& kv, int64_t r, int kvh, int dh, int64_t t0, int64_t hi,
                                         char* ks, char* vs) {
  const int units = dh * static_cast<int>(sizeof(T)) / kVec;  // copy units per row
  const int row_bytes = RowBytes<T, kVec>(dh);
  const int64_t v_offset = kPagedTokens * kv.kv_dim;
  for (int idx = threadIdx.x; idx < kTile * units; idx += kThreads) {
    const int j = idx / units, u = idx % units;
    const int64_t pos = t0 + j;
    const bool valid = pos < hi;
    const int64_t p = valid ? pos : t0;  // t0 < hi: a mapped address for the zero fill
    const T* page = PagePtr(kv, r, kv.table[r * kv.table_width + p / kPagedTokens]);
    const T* kp = page + (p % kPagedTokens) * kv.kv_dim + int64_t(kvh) * dh;
    const char* ksrc = reinterpret_cast<const char*>(kp) + u * kVec;
    const char* vsrc = reinterpret_cast<const char*>(kp + v_offset) + u * kVec;
    const int off = j * row_bytes + u * kVec;
    if constexpr (kVec == 16) {
      cp_async16(smem_u32(ks + off), ksrc, valid);
      cp_async16(smem_u32(vs + off), vsrc, valid);
    } else {
      cp_async4(smem_u32(ks + off), ksrc, valid);
      cp_async4(smem_u32(vs + off), vsrc, valid);
    }
  }
}

// Waits until at most `pending` cp.async groups of this thread are in flight (pending < 4).
__device__ __forceinline__ void WaitPending(int pending) {
  switch (pending) {
    case 0: cp_async_wait<0>(); break;
    case 1: cp_async_wait<1>(); break;
    case 2: cp_async_wait<2>(); break;
    default: cp_async_wait<3>(); break;
  }
}

// grid (kv_heads * query tiles, batch, splits). Query f of the tile is flattened (i, g): token
// i = f / group, head kvh * group + g. Shared memory: queries [kQueries][dh] fp32, then `stages`
// ring stages of K rows [kTile] and V rows [kTile] (RowBytes each).
template <class T, int kVec>
__global__ void __launch_bounds__(kThreads, 3)
    paged_attention_kernel(PagedKv<T> kv, const T* q, int64_t q_stride, T* o, int64_t o_stride, int64_t n, int heads,
                           int kv_heads, int dh, int64_t split_len, int splits, int stages, float scale,
                           float* part_o, float* part_lse) {
  pdl_launch_dependents();  // the output product may start loading its weights
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* qs = reinterpret_cast<float*>(smem_raw);
  char* ring = reinterpret_cast<char*>(qs + kQueries * dh);
  const int row_bytes = RowBytes<T, kVec>(dh);
  const int stage_bytes = 2 * kTile * row_bytes;

  const int group = heads / kv_heads;
  const PagedShare share = PagedShareOf(kv.start, n, group, kQueries, split_len);
  const int kvh = share.kvh, split = share.split, nq = share.nq;
  const int64_t r = share.r, start = share.start, f0 = share.f0, lo = share.lo, hi = share.hi;
  const int count = lo < hi ? static_cast<int>((hi - lo + kTile - 1) / kTile) : 0;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  // The first stages - 1 tiles go in flight before anything else (one group each, even if empty,
  // so that the group count the waits rely on holds).
  for (int s = 0; s < stages - 1; ++s) {
    if (s < count) {
      char* ks = ring + s * stage_bytes;
      LoadTile<T, kVec>(kv, r, kvh, dh, lo + int64_t(s) * kTile, hi, ks, ks + kTile * row_bytes);
    }
    cp_async_commit();
  }
  for (int idx = threadIdx.x; idx < kQueries * dh; idx += kThreads) {
    const int f = idx / dh, e = idx % dh;
    float val = 0.f;
    if (f < nq) {
      const int64_t i = (f0 + f) / group, h = int64_t(kvh) * group + (f0 + f) % group;
      val = to_float(q[(r * n + i) * q_stride + h * dh + e]);
    }
    qs[idx] = val;
  }

  const bool active = warp < nq;  // warp-uniform
  const int64_t last = active ? start + (f0 + warp) / group : -1;  // the last position this query sees
  const float* qf = qs + warp * dh;
  float m = -INFINITY, l = 0.f;
  float2 acc[kMaxPairs];
#pragma unroll
  for (int k = 0; k < kMaxPairs; ++k) acc[k] = make_float2(0.f, 0.f);

  for (int t = 0; t < count; ++t) {
    // Tile t has landed (only the stages - 2 younger groups may still be in flight) and every
    // warp is done with tile t - 1, whose stage the next load refills; the queries are written.
    WaitPending(stages - 2);
    __syncthreads();
    const int next = t + stages - 1;
    if (next < count) {
      char* ks = ring + (next % stages) * stage_bytes;
      LoadTile<T, kVec>(kv, r, kvh, dh, lo + int64_t(next) * kTile, hi, ks, ks + kTile * row_bytes);
    }
    cp_async_commit();

    const int64_t t0 = lo + int64_t(t) * kTile;
    if (!active || t0 > last) continue;  // warp-uniform: the warp's query sees none of this tile
    const char* ks = ring + (t % stages) * stage_bytes;
    const char* vs = ks + kTile * row_bytes;
    const int64_t pos = t0 + lane;
    const bool valid = pos < hi && pos <= last;
    const float dot = Dot<T, kVec>(qf, ks + lane * row_bytes, dh);
    const float s = valid ? dot * scale : -INFINITY;
    const float m_new = fmaxf(m, warp_max(s));  // finite: position t0 <= last is valid
    const float p = valid ? __expf(s - m_new) : 0.f;
    const float corr = m == -INFINITY ? 0.f : __expf(m - m_new);  // acc and l are 0 while m is -inf
    l = l * corr + warp_sum(p);
    m = m_new;
#pragma unroll
    for (int k = 0; k < kMaxPairs; ++k) {
      acc[k].x *= corr;
      acc[k].y *= corr;
    }
    const int used = static_cast<int>(min(int64_t(kTile), min(hi, last + 1) - t0));  // warp-uniform
#pragma unroll 4
    for (int j = 0; j < used; ++j) {
      const float pj = __shfl_sync(0xffffffffu, p, j);
      const T* vrow = reinterpret_cast<const T*>(vs + j * row_bytes);
#pragma unroll
      for (int k = 0; k < kMaxPairs; ++k) {
        const int e = 2 * lane + 64 * k;
        if (e < dh) {
          const float2 vv = load2(vrow + e);
          acc[k].x = fmaf(pj, vv.x, acc[k].x);
          acc[k].y = fmaf(pj, vv.y, acc[k].y);
        }
      }
    }
  }
  cp_async_wait<0>();  // no copy outlives the block (the trailing groups are empty)
  if (!active) return;

  const int64_t i = (f0 + warp) / group, h = int64_t(kvh) * group + (f0 + warp) % group;
  const float inv = l > 0.f ? 1.f / l : 0.f;
  if (splits == 1) {
    T* orow = o + (r * n + i) * o_stride + h * dh;
#pragma unroll
    for (int k = 0; k < kMaxPairs; ++k) {
      const int e = 2 * lane + 64 * k;
      if (e < dh) {
        orow[e] = from_float<T>(acc[k].x * inv);
        orow[e + 1] = from_float<T>(acc[k].y * inv);
      }
    }
  } else {
    const int64_t queries = int64_t(gridDim.y) * n * heads;
    const int64_t row = (r * n + i) * heads + h;  // [batch * n * heads] queries
    float* po = part_o + (int64_t(split) * queries + row) * dh;
#pragma unroll
    for (int k = 0; k < kMaxPairs; ++k) {
      const int e = 2 * lane + 64 * k;
      if (e < dh) *reinterpret_cast<float2*>(po + e) = make_float2(acc[k].x * inv, acc[k].y * inv);
    }
    if (lane == 0) part_lse[int64_t(split) * queries + row] = l > 0.f ? m + __logf(l) : -INFINITY;
  }
}

// One warp per query (row, token, head): o = sum_s exp(lse_s - lse) o_s, lse = log sum_s exp(lse_s).
template <class T>
__global__ void paged_attention_combine_kernel(const float* part_o, const float* part_lse, T* o, int64_t o_stride,
                                               int64_t queries, int heads, int dh, int splits) {
  pdl_launch_dependents();
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (row >= queries) return;
  const int lane = threadIdx.x & 31;
  float m = -INFINITY;
  for (int s = lane; s < splits; s += 32) m = fmaxf(m, part_lse[s * queries + row]);
  m = warp_max(m);
  float total = 0.f;
  for (int s = lane; s < splits; s += 32) total += __expf(part_lse[s * queries + row] - m);
  total = warp_sum(total);
  const float inv = 1.f / total;
  const int64_t token = row / heads, h = row % heads;
  for (int e = 2 * lane; e < dh; e += 64) {
    float2 a = make_float2(0.f, 0.f);
    for (int s = 0; s < splits; ++s) {
      const float w = __expf(part_lse[s * queries + row] - m);
      if (w > 0.f) {  // a split that saw no position of this query wrote lse -inf (and zeros)
        const float2 v = *reinterpret_cast<const float2*>(part_o + (s * queries + row) * dh + e);
        a.x = fmaf(w, v.x, a.x);
        a.y = fmaf(w, v.y, a.y);
      }
    }
    o[token * o_stride + h * dh + e] = from_float<T>(a.x * inv);
    o[token * o_stride + h * dh + e + 1] = from_float<T>(a.y * inv);
  }
}

int ceil_div64(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// The ring's depth for one head_dim: as many stages as fit kRingBudget, 2 to 4.
template <class T, int kVec>
int RingStages(int dh) {
  const int stage_bytes = 2 * kTile * RowBytes<T, kVec>(dh);
  return std::clamp(kRingBudget / stage_bytes, 2, 4);
}

template <class T, int kVec>
cudaError_t Launch(const PagedKv<T>& kv, const T* q, int64_t q_stride, T* o, int64_t o_stride, int64_t batch,
                   int64_t n, int heads, int kv_heads, int dh, int64_t split_len, int used, float scale,
                   float* part_o, float* part_lse, cudaStream_t stream) {
  const int stages = RingStages<T, kVec>(dh);
  const size_t smem = sizeof(float) * kQueries * dh + size_t(stages) * 2 * kTile * RowBytes<T, kVec>(dh);
  if (smem > 48 * 1024) {  // above the default: allowed once per device (a host call, no stream work)
    static thread_local int configured_for = -1;  // the last device configured from this thread
    int device = 0;
    cudaError_t e = cudaGetDevice(&device);
    if (e != cudaSuccess) return e;
    if (configured_for != device) {
      // The largest this instantiation ever asks for (head_dim 256), so one call serves all.
      const int most = static_cast<int>(sizeof(float) * kQueries * 256 +
                                        size_t(RingStages<T, kVec>(256)) * 2 * kTile * RowBytes<T, kVec>(256));
      e = cudaFuncSetAttribute(paged_attention_kernel<T, kVec>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               std::max(most, static_cast<int>(smem)));
      if (e != cudaSuccess) return e;
      configured_for = device;
    }
  }
  const int tiles = ceil_div64(n * (heads / kv_heads), kQueries);
  dim3 grid(static_cast<unsigned>(kv_heads * tiles), static_cast<unsigned>(batch), static_cast<unsigned>(used));
  paged_attention_kernel<T, kVec><<<grid, kThreads, smem, stream>>>(kv, q, q_stride, o, o_stride, n, heads, kv_heads,
                                                                    dh, split_len, used, stages, scale, part_o,
                                                                    part_lse);
  return cudaGetLastError();
}

}  // namespace

template <class T>
cudaError_t launch_paged_kv_write(const PagedKv<T>& kv, const T* k, int64_t k_stride, const T* v, int64_t v_stride,
                                  int64_t batch, int64_t n, cudaStream_t stream) {
  if (batch * n == 0) return cudaSuccess;
  const int threads = static_cast<int>(std::min<int64_t>(256, (kv.kv_dim + 31) / 32 * 32));
  paged_kv_write_kernel<T><<<static_cast<unsigned>(batch * n), threads, 0, stream>>>(kv, k, k_stride, v, v_stride, n);
  return cudaGetLastError();
}

template <class T>
int paged_attention_splits(int64_t batch, int64_t n, int heads, int kv_heads, int head_dim, int64_t max_len,
                           int sm_count) {
  const int group = heads / kv_heads;
  if (std::is_same<T, __nv_bfloat16>::value && PagedMmaSupported(head_dim, int64_t(kv_heads) * head_dim)) {
    // The tensor-core kernel: up to 1024 positions (its page window), one split when the blocks
    // fill half the SMs or more; fewer blocks (a row or a few) would each walk up to 16 tiles one
    // after another on an otherwise idle GPU, so they split, two tiles or more each, until they
    // fill about one wave (the combine pass costs less than the walk it shortens). Longer: two
    // waves of resident blocks whatever the batch, splits of at most 1024 positions, and at least
    // two tiles per split.
    const int64_t blocks = batch * kv_heads * PagedMmaQueryTiles(n, group);
    if (max_len <= 1024) {
      if (2 * blocks >= sm_count) return 1;
      return static_cast<int>(std::max<int64_t>(
          1, std::min<int64_t>((sm_count + blocks - 1) / blocks, max_len / (2 * kPagedMmaTile))));
    }
    const int64_t slots = int64_t(sm_count) * PagedMmaBlocksPerSm(head_dim);
    const int64_t want = std::max<int64_t>({1, (2 * slots + blocks - 1) / blocks, (max_len + 1023) / 1024});
    const int64_t most = std::max<int64_t>(1, max_len / (2 * kPagedMmaTile));
    return static_cast<int>(std::min<int64_t>({want, most, 128}));
  }
  const int64_t blocks = batch * kv_heads * ceil_div64(n * group, kQueries);
  // Enough blocks for four per SM whatever the batch (three are resident at head_dim 128: with
  // fewer, a second partial wave leaves most SMs idle), and splits of at most kMaxSplitTiles tiles
  // so that the last wave is short...
  const int64_t want = std::max<int64_t>({1, (4 * int64_t(sm_count) + blocks - 1) / blocks,
                                          (max_len + kMaxSplitTiles * kTile - 1) / (kMaxSplitTiles * kTile)});
  // ...but at least four tiles of positions per split, so the ring fills and a split's fixed cost
  // (its queries, its partial output) stays small beside its K/V.
  const int64_t most = std::max<int64_t>(1, max_len / (4 * kTile));
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
  if (head_dim % 2 != 0 || head_dim > 2 * 32 * kMaxPairs || heads % kv_heads != 0 || splits < 1) {
    return cudaErrorInvalidValue;
  }
  // bf16 at head_dim 64 and 128 runs on tensor cores (paged_attention_mma.cu), the rest here.
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
  const bool mma = kBf16 && PagedMmaSupported(head_dim, kv.kv_dim);
  // Splits cover whole tiles.
  const int tile = mma ? kPagedMmaTile : kTile;
  const int64_t split_len = (ceil_div64(max_len, splits) + tile - 1) / tile * tile;
  const int used = ceil_div64(max_len, split_len);
  const int64_t queries = batch * n * heads;
  float* part_o = workspace;
  float* part_lse = used > 1 ? workspace + int64_t(used) * queries * head_dim : nullptr;
  cudaError_t e = cudaSuccess;
  if constexpr (kBf16) {
    if (mma) {
      e = launch_paged_attention_mma(kv, q, q_stride, o, o_stride, batch, n, heads, kv_heads, head_dim, split_len,
                                     used, part_o, part_lse, stream);
    }
  }
  if (!mma) {
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
    // 16-byte copies when a K/V row (and so every row, pages being 16-byte aligned) is a whole
    // number of 16-byte units; 4-byte copies otherwise.
    const bool vec16 = head_dim * sizeof(T) % 16 == 0 && kv.kv_dim * sizeof(T) % 16 == 0;
    e = vec16 ? Launch<T, 16>(kv, q, q_stride, o, o_stride, batch, n, heads, kv_heads, head_dim, split_len, used,
                              scale, part_o, part_lse, stream)
              : Launch<T, 4>(kv, q, q_stride, o, o_stride, batch, n, heads, kv_heads, head_dim, split_len, used, scale,
                             part_o, part_lse, stream);
  }
  if (e != cudaSuccess || used == 1) return e;
  constexpr int kCombineWarps = 4;
  paged_attention_combine_kernel<T><<<ceil_div64(queries, kCombineWarps), 32 * kCombineWarps, 0, stream>>>(
      part_o, part_lse, o, o_stride, queries, heads, head_dim, used);
  return cudaGetLastError();
}

#define INSTANTIATE(T)                                                                                          \
  template cudaError_t launch_paged_kv_write<T>(const PagedKv<T>&, const T*, int64_t, const T*, int64_t, int64_t, \
                                                int64_t, cudaStream_t);                                         \
  template cudaError_t launch_paged_attention<T>(const PagedKv<T>&, const T*, int64_t, T*, int64_t, int64_t,     \
                                                 int64_t, int, int, int, int64_t, int, float*, cudaStream_t); \
  template int paged_attention_splits<T>(int64_t, int64_t, int, int, int, int64_t, int);
INSTANTIATE(float)
INSTANTIATE(__nv_bfloat16)
#undef INSTANTIATE

}  // namespace blockd::kernels
