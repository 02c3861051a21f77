// Paged decode attention on tensor cores (bf16 K/V, head_dim 64 or 128), FlashDecoding style.
//
// A decode step reads every cached K/V row once and uses it for the few queries of its kv head's
// group (4 at Llama-3's 32/8 heads): on CUDA cores that is a 128-wide dot product and a 128-wide
// axpy per query and position, so the instruction stream, not HBM, bounded the SIMT kernel. Here
// a thread block owns (kv head, tile of 16 flattened (token, head) queries, row, split of the
// positions); the queries are one mma A operand (rows past the tile's queries are zeros), and each
// of the 4 warps takes 16 of every 64-position tile: S = Q K^T and O += P V are 16 m16n8k16
// products each per warp and tile, whatever the group. Tiles stream through a 3-stage cp.async
// ring; the page pointers of the next 1024 positions sit in shared memory, so a tile's addresses
// need no dependent global loads. Each warp keeps its own online softmax (exp2 domain, P rounded
// to bf16 for the product, as FlashAttention and cuDNN do); at the end the warps' states merge
// through shared memory into the output, or into the split's fp32 partial and log-sum-exp for
// paged_attention.cu's combine pass.
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>

#include "kernels/common.cuh"
#include "kernels/pdl.cuh"
#include "kernels/cp_async.cuh"
#include "kernels/mma.cuh"
#include "kernels/paged_attention_mma.cuh"
#include "kernels/paged_kv.cuh"

namespace blockd::kernels {
namespace {

using bf16 = __nv_bfloat16;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

constexpr int kWarps = 4, kThreads = 32 * kWarps;
constexpr int kTile = kPagedMmaTile;        // positions per ring stage: 16 per warp
constexpr int kQueries = 16;                // one mma row tile
constexpr int kStages = 3;
constexpr int kWindowPages = 64;            // page pointers held: 1024 positions
constexpr int kWindowTiles = kWindowPages * kPagedTokens / kTile;

template <int D>
struct Smem {
  static constexpr int kLd = D + 8;                                  // padded row, in elements
  static constexpr int kStageElems = 2 * kTile * kLd;                // K rows then V rows
  static constexpr int kRingBytes = kStages * kStageElems * 2;
  static constexpr int kMergeBytes = kWarps * kQueries * (D + 2) * 4;  // each warp's O, m, l
  static constexpr int kQBytes = kQueries * kLd * 2;
  static constexpr int kWindowBytes = kWindowPages * 8;
  static constexpr int kQAt = kRingBytes > kMergeBytes ? kRingBytes : kMergeBytes;  // past ring and merge
  static constexpr int kBytes = kQAt + kQBytes + kWindowBytes;
};

// Page pointers of positions [base, base + 1024) that lie below hi, into win.
__device__ __forceinline__ void LoadWindow(const PagedKv<bf16>& kv, int64_t r, int64_t base, int64_t hi,
                                           const bf16** win) {
  for (int i = threadIdx.x; i < kWindowPages; i += kThreads) {
    const int64_t pos = base + int64_t(i) * kPagedTokens;
    if (pos < hi) win[i] = PagePtr(kv, r, kv.table[r * kv.table_width + pos / kPagedTokens]);
  }
}

// Positions [t0, t0 + kTile) of kv head kvh (those >= hi zero-filled) into one ring stage: K rows,
// then V rows, kLd elements apart. win holds the pages from window_base on; t0 < hi.
template <int D>
__device__ __forceinline__ void LoadTile(const bf16* const* win, int64_t window_base, int64_t kv_dim, int kvh,
                                         int64_t t0, int64_t hi, bf16* stage) {
  constexpr int kUnits = D / 8, kLd = Smem<D>::kLd;  // 16-byte copies per row
  const int64_t v_offset = kPagedTokens * kv_dim;
#pragma unroll
  for (int idx = threadIdx.x; idx < kTile * kUnits; idx += kThreads) {
    const int j = idx / kUnits, u = idx % kUnits;
    const int64_t pos = t0 + j;
    const bool valid = pos < hi;
    const int local = static_cast<int>((valid ? pos : t0) - window_base);
    const bf16* kp = win[local / kPagedTokens] + (local % kPagedTokens) * kv_dim + kvh * D + u * 8;
    cp_async16(smem_u32(stage + j * kLd + u * 8), kp, valid);
    cp_async16(smem_u32(stage + (kTile + j) * kLd + u * 8), kp + v_offset, valid);
  }
}

// grid (kv_heads * query tiles, batch, splits). Query f of the tile is flattened (i, g): token
// i = f / group, head kvh * group + g.
template <int D>
__global__ void __launch_bounds__(kThreads) paged_attention_mma_kernel(PagedKv<bf16> kv, const bf16* q,
                                                                       int64_t q_stride, bf16* o, int64_t o_stride,
                                                                       int64_t n, int heads, int kv_heads,
                                                                       int64_t split_len, int splits, float scale_log2,
                                                                       float* part_o, float* part_lse) {
  pdl_launch_dependents();  // the output product may start loading its weights
  using S = Smem<D>;
  constexpr int kLd = S::kLd;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* ring = reinterpret_cast<bf16*>(smem_raw);  // also the merge area once the walk is done
  bf16* qs = reinterpret_cast<bf16*>(smem_raw + S::kQAt);
  const bf16** win = reinterpret_cast<const bf16**>(reinterpret_cast<unsigned char*>(qs) + S::kQBytes);

  const int group = heads / kv_heads;
  const PagedShare share = PagedShareOf(kv.start, n, group, kQueries, split_len);
  const int kvh = share.kvh, split = share.split, nq = share.nq;
  const int64_t r = share.r, start = share.start, f0 = share.f0, lo = share.lo, hi = share.hi;
  const int64_t len = start + (f0 + nq - 1) / group + 1;
  const int count = lo < hi ? static_cast<int>((hi - lo + kTile - 1) / kTile) : 0;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;

  if (count > 0) LoadWindow(kv, r, lo, hi, win);
  // The queries, zero rows past the tile's; pairs of elements (q_stride need only be even).
  for (int idx = threadIdx.x; idx < kQueries * (D / 2); idx += kThreads) {
    const int f = idx / (D / 2), e = 2 * (idx % (D / 2));
    uint32_t val = 0;
    if (f < nq) {
      const int64_t i = (f0 + f) / group, h = int64_t(kvh) * group + (f0 + f) % group;
      val = *reinterpret_cast<const uint32_t*>(q + (r * n + i) * q_stride + h * D + e);
    }
    *reinterpret_cast<uint32_t*>(qs + f * kLd + e) = val;
  }
  __syncthreads();  // the window and the queries are written
  for (int s = 0; s < kStages - 1; ++s) {  // one group each, even if empty: the waits count groups
    if (s < count) LoadTile<D>(win, lo, kv.kv_dim, kvh, lo + int64_t(s) * kTile, hi, ring + s * S::kStageElems);
    cp_async_commit();
  }
  uint32_t qa[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) load_a(qa[kk], qs, kLd, 0, kk * 16);

  // The last position each of this lane's two rows (g, g + 8) sees; rows past nq see the tile's
  // last query's (their zero queries give finite scores that are never written).
  int64_t last[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) last[h] = start + (f0 + min(g + 8 * h, nq - 1)) / group;
  const int64_t last_max = len - 1;

  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  float oacc[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) oacc[dt][0] = oacc[dt][1] = oacc[dt][2] = oacc[dt][3] = 0.f;

  int64_t window_base = lo;
  for (int t = 0; t < count; ++t) {
    // Tile t has landed and every warp is done with tile t - 1, whose stage the next load refills.
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = t + kStages - 1;
    if (next < count) {
      if (next % kWindowTiles == 0) {  // the next tile opens a window: every earlier tile is issued
        window_base = lo + int64_t(next) * kTile;
        LoadWindow(kv, r, window_base, hi, win);
        __syncthreads();
      }
      LoadTile<D>(win, window_base, kv.kv_dim, kvh, lo + int64_t(next) * kTile, hi,
                  ring + (next % kStages) * S::kStageElems);
    }
    cp_async_commit();

    const int64_t p0 = lo + int64_t(t) * kTile + warp * 16;  // this warp's 16 positions
    if (p0 >= hi || p0 > last_max) continue;                   // warp-uniform
    const bf16* ks = ring + (t % kStages) * S::kStageElems;
    const bf16* vs = ks + kTile * kLd;
    float s[2][4] = {};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t b[4];
      load_b_nk(b, ks, kLd, warp * 16, kk * 16);
      mma_bf16(s[0], qa[kk], b[0], b[1]);
      mma_bf16(s[1], qa[kk], b[2], b[3]);
    }
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t pos = p0 + nt * 8 + 2 * tig + (e & 1);
        const float val = pos < hi && pos <= last[e >> 1] ? s[nt][e] * scale_log2 : -INFINITY;
        s[nt][e] = val;
        mx[e >> 1] = fmaxf(mx[e >> 1], val);
      }
    }
    float m_use[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      const float m_new = fmaxf(m_run[h], mx[h]);
      m_use[h] = m_new == -INFINITY ? 0.f : m_new;  // a row with no position yet stays at zero
      const float corr = fast_exp2(m_run[h] - m_use[h]);
      m_run[h] = m_new;
      l_run[h] *= corr;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        oacc[dt][2 * h] *= corr;
        oacc[dt][2 * h + 1] *= corr;
      }
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      s[nt][0] = fast_exp2(s[nt][0] - m_use[0]);
      s[nt][1] = fast_exp2(s[nt][1] - m_use[0]);
      s[nt][2] = fast_exp2(s[nt][2] - m_use[1]);
      s[nt][3] = fast_exp2(s[nt][3] - m_use[1]);
      l_run[0] += s[nt][0] + s[nt][1];
      l_run[1] += s[nt][2] + s[nt][3];
    }
    const uint32_t pa[4] = {pack_bf16(s[0][0], s[0][1]), pack_bf16(s[0][2], s[0][3]), pack_bf16(s[1][0], s[1][1]),
                            pack_bf16(s[1][2], s[1][3])};
#pragma unroll
    for (int dt = 0; dt < D / 8; dt += 2) {
      uint32_t b[4];
      load_b_kn(b, vs, kLd, warp * 16, dt * 8);
      mma_bf16(oacc[dt], pa, b[0], b[1]);
      mma_bf16(oacc[dt + 1], pa, b[2], b[3]);
    }
  }
  cp_async_wait<0>();  // no copy outlives the walk (the trailing groups are empty)
  __syncthreads();     // every warp is done with the ring: it becomes the merge area

  // Each warp's state: O [kQueries][D], then m and l [kQueries], fp32.
  float* merge = reinterpret_cast<float*>(smem_raw);
  float* mo = merge + warp * kQueries * D;
  float* mm = merge + kWarps * kQueries * D + warp * kQueries;
  float* ml = merge + kWarps * kQueries * (D + 1) + warp * kQueries;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = l_run[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int row = g + 8 * h;
    if (tig == 0) {
      mm[row] = m_run[h];
      ml[row] = l;
    }
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<float2*>(mo + row * D + dt * 8 + 2 * tig) = make_float2(oacc[dt][2 * h], oacc[dt][2 * h + 1]);
    }
  }
  __syncthreads();

  // The merge: thread (row, column pairs) of the block's queries.
  const int64_t queries = int64_t(gridDim.y) * n * heads;
  for (int idx = threadIdx.x; idx < nq * (D / 2); idx += kThreads) {
    const int f = idx / (D / 2), e = 2 * (idx % (D / 2));
    float mw[kWarps], mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, mw[w] = merge[kWarps * kQueries * D + w * kQueries + f]);
    float l = 0.f, ox = 0.f, oy = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float c = mw[w] == -INFINITY ? 0.f : fast_exp2(mw[w] - mx);  // a warp that saw nothing adds 0
      l += c * merge[kWarps * kQueries * (D + 1) + w * kQueries + f];
      const float2 v = *reinterpret_cast<const float2*>(merge + (w * kQueries + f) * D + e);
      ox += c * v.x;
      oy += c * v.y;
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int64_t i = (f0 + f) / group, h = int64_t(kvh) * group + (f0 + f) % group;
    if (splits == 1) {
      *reinterpret_cast<__nv_bfloat162*>(o + (r * n + i) * o_stride + h * D + e) =
          __floats2bfloat162_rn(ox * inv, oy * inv);
    } else {
      const int64_t row = (r * n + i) * heads + h;  // [batch * n * heads] queries
      *reinterpret_cast<float2*>(part_o + (int64_t(split) * queries + row) * D + e) = make_float2(ox * inv, oy * inv);
      if (e == 0) part_lse[int64_t(split) * queries + row] = l > 0.f ? (mx + log2f(l)) * kLn2 : -INFINITY;
    }
  }
}

template <int D>
cudaError_t Launch(const PagedKv<bf16>& kv, const bf16* q, int64_t q_stride, bf16* o, int64_t o_stride, int64_t batch,
                   int64_t n, int heads, int kv_heads, int64_t split_len, int used, float* part_o, float* part_lse,
                   cudaStream_t stream) {
  constexpr int smem = Smem<D>::kBytes;
  static thread_local int configured_for = -1;  // the last device configured from this thread
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  if (configured_for != device) {  // above the default 48 KB: allowed once per device (a host call)
    e = cudaFuncSetAttribute(paged_attention_mma_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
    configured_for = device;
  }
  const int64_t tiles = PagedMmaQueryTiles(n, heads / kv_heads);
  dim3 grid(static_cast<unsigned>(kv_heads * tiles), static_cast<unsigned>(batch), static_cast<unsigned>(used));
  const float scale_log2 = static_cast<float>(kLog2e / std::sqrt(static_cast<double>(D)));
  paged_attention_mma_kernel<D><<<grid, kThreads, smem, stream>>>(kv, q, q_stride, o, o_stride, n, heads, kv_heads,
                                                                  split_len, used, scale_log2, part_o, part_lse);
  return cudaGetLastError();
}

}  // namespace

int PagedMmaBlocksPerSm(int head_dim) {
  constexpr int kSmemPerSm = 227 * 1024, kReserved = 1024;  // H100/H200: per SM, per block
  return kSmemPerSm / ((head_dim == 64 ? Smem<64>::kBytes : Smem<128>::kBytes) + kReserved);
}

cudaError_t launch_paged_attention_mma(const PagedKv<bf16>& kv, const bf16* q, int64_t q_stride, bf16* o,
                                       int64_t o_stride, int64_t batch, int64_t n, int heads, int kv_heads,
                                       int head_dim, int64_t split_len, int used, float* part_o, float* part_lse,
                                       cudaStream_t stream) {
  if (head_dim == 64) {
    return Launch<64>(kv, q, q_stride, o, o_stride, batch, n, heads, kv_heads, split_len, used, part_o, part_lse,
                      stream);
  }
  if (head_dim == 128) {
    return Launch<128>(kv, q, q_stride, o, o_stride, batch, n, heads, kv_heads, split_len, used, part_o, part_lse,
                       stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace blockd::kernels
