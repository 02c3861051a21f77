// Tensor-core causal GQA attention for bf16 activations and head_dim 64 or 128, FlashAttention-2
// style: mma.sync m16n8k16 (bf16 in, fp32 accumulate), ldmatrix from padded shared memory tiles,
// cp.async loads, exp2-domain online softmax. launch_attention_fwd/bwd (attention.cu) dispatch here
// for those shapes; everything else runs the SIMT kernels. The kernels' own comments give their
// tilings.
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>

#include "kernels/attention.cuh"
#include "kernels/attention_mma.cuh"
#include "kernels/common.cuh"
#include "kernels/cp_async.cuh"
#include "kernels/mma.cuh"

namespace blockd::kernels {
namespace {

using bf16 = __nv_bfloat16;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Copies rows [row0, row0 + R) of a [seq, D] bf16 matrix (rows `stride` apart) into shared memory
// with rows LD = D + 8 elements apart (the 16-byte pad makes ldmatrix conflict-free). Rows past
// `seq` are zero-filled.
template <int R, int D, int NT>
__device__ __forceinline__ void load_tile(bf16* dst, const bf16* base, int64_t stride, int row0, int seq) {
  constexpr int kChunks = D / 8, LD = D + 8;
  for (int c = threadIdx.x; c < R * kChunks; c += NT) {
    const int r = c / kChunks, cc = c % kChunks;
    const int row = row0 + r;
    const bool valid = row < seq;
    cp_async16(smem_u32(dst + r * LD + cc * 8), base + int64_t(valid ? row : 0) * stride + cc * 8, valid);
  }
}

// Forward: 4 warps x 32 query rows (two 16-row m-tiles each, so every K and V fragment read from
// shared memory feeds two products), key blocks double-buffered: block jb+1 loads while jb runs.
constexpr int kFwdRows = 128, kFwdThreads = 128, kFwdMTiles = 2;
// Keys per block: 32 at head_dim 128 keeps the 2 x 64 output accumulators and the scores in registers.
template <int D>
__host__ __device__ constexpr int FwdKeys() {
  return D >= 128 ? 32 : 64;
}

template <int D>
__global__ void __launch_bounds__(kFwdThreads) attention_fwd_mma_kernel(
    const bf16* __restrict__ q, int64_t q_stride, const bf16* __restrict__ k, int64_t k_stride,
    const bf16* __restrict__ v, int64_t v_stride, bf16* __restrict__ o, int64_t o_stride, float* __restrict__ lse,
    int seq, int heads, int kv_heads, float scale_log2) {
  constexpr int BR = kFwdRows, BC = FwdKeys<D>(), LD = D + 8, MT = kFwdMTiles;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* qs = reinterpret_cast<bf16*>(smem_raw);
  bf16* ks = qs + BR * LD;      // [2][BC][LD]
  bf16* vs = ks + 2 * BC * LD;  // [2][BC][LD]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
  const int qb = gridDim.x - 1 - blockIdx.x;  // the longest (last) query blocks start first
  const int b = blockIdx.y / heads, h = blockIdx.y % heads, kvh = h / (heads / kv_heads);
  const int64_t tok0 = int64_t(b) * seq;
  const bf16* kbase = k + tok0 * k_stride + int64_t(kvh) * D;
  const bf16* vbase = v + tok0 * v_stride + int64_t(kvh) * D;
  const int q0 = qb * BR;
  const int last_key = min(q0 + BR, seq) - 1;
  const int nblocks = last_key / BC + 1;
  const int row0 = q0 + warp * 16 * MT;  // this warp's rows: row0 + 16 mt + g (+ 8)

  load_tile<BR, D, kFwdThreads>(qs, q + tok0 * q_stride + int64_t(h) * D, q_stride, q0, seq);
  load_tile<BC, D, kFwdThreads>(ks, kbase, k_stride, 0, seq);
  load_tile<BC, D, kFwdThreads>(vs, vbase, v_stride, 0, seq);
  cp_async_commit();

  float m_run[MT][2], l_run[MT][2];
  float oacc[MT][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    m_run[mt][0] = m_run[mt][1] = -INFINITY;
    l_run[mt][0] = l_run[mt][1] = 0.f;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) oacc[mt][dt][0] = oacc[mt][dt][1] = oacc[mt][dt][2] = oacc[mt][dt][3] = 0.f;
  }

  for (int jb = 0; jb < nblocks; ++jb) {
    const int k0 = jb * BC, stage = jb & 1;
    if (jb + 1 < nblocks) {  // the other stage was released by the last barrier of iteration jb - 1
      load_tile<BC, D, kFwdThreads>(ks + (stage ^ 1) * BC * LD, kbase, k_stride, k0 + BC, seq);
      load_tile<BC, D, kFwdThreads>(vs + (stage ^ 1) * BC * LD, vbase, v_stride, k0 + BC, seq);
      cp_async_commit();
      cp_async_wait<1>();  // block jb has landed; jb + 1 may still be in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const bf16* kst = ks + stage * BC * LD;
    const bf16* vst = vs + stage * BC * LD;

    float s[MT][BC / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < BC / 8; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
    }
#pragma unroll 2
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qa[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) load_a(qa[mt], qs, LD, warp * 16 * MT + mt * 16, kk * 16);
#pragma unroll
      for (int nt = 0; nt < BC / 8; nt += 2) {
        uint32_t bf[4];
        load_b_nk(bf, kst, LD, nt * 8, kk * 16);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_bf16(s[mt][nt], qa[mt], bf[0], bf[1]);
          mma_bf16(s[mt][nt + 1], qa[mt], bf[2], bf[3]);
        }
      }
    }
    // Scale into the exp2 domain, mask, and update the running max and sum of each row.
    const bool mask = k0 + BC - 1 > row0 || k0 + BC > seq;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int row_a = row0 + mt * 16 + g;
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nt = 0; nt < BC / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float val = s[mt][nt][e] * scale_log2;
          if (mask) {
            const int key = k0 + nt * 8 + 2 * tig + (e & 1);
            if (key > row_a + (e >> 1) * 8 || key >= seq) val = -INFINITY;
          }
          s[mt][nt][e] = val;
          mx[e >> 1] = fmaxf(mx[e >> 1], val);
        }
      }
      float m_use[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        const float m_new = fmaxf(m_run[mt][r], mx[r]);
        m_use[r] = m_new == -INFINITY ? 0.f : m_new;  // a row with no valid key yet stays at zero
        const float corr = fast_exp2(m_run[mt][r] - m_use[r]);
        m_run[mt][r] = m_new;
        l_run[mt][r] *= corr;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          oacc[mt][dt][2 * r] *= corr;
          oacc[mt][dt][2 * r + 1] *= corr;
        }
      }
#pragma unroll
      for (int nt = 0; nt < BC / 8; ++nt) {
        s[mt][nt][0] = fast_exp2(s[mt][nt][0] - m_use[0]);
        s[mt][nt][1] = fast_exp2(s[mt][nt][1] - m_use[0]);
        s[mt][nt][2] = fast_exp2(s[mt][nt][2] - m_use[1]);
        s[mt][nt][3] = fast_exp2(s[mt][nt][3] - m_use[1]);
        l_run[mt][0] += s[mt][nt][0] + s[mt][nt][1];
        l_run[mt][1] += s[mt][nt][2] + s[mt][nt][3];
      }
    }
    // O += P V, P packed to bf16 one 16-key slice at a time.
#pragma unroll
    for (int kk = 0; kk < BC / 16; ++kk) {
      uint32_t pa[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        pa[mt][0] = pack_bf16(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pa[mt][1] = pack_bf16(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pa[mt][2] = pack_bf16(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pa[mt][3] = pack_bf16(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dt = 0; dt < D / 8; dt += 2) {
        uint32_t bf[4];
        load_b_kn(bf, vst, LD, kk * 16, dt * 8);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_bf16(oacc[mt][dt], pa[mt], bf[0], bf[1]);
          mma_bf16(oacc[mt][dt + 1], pa[mt], bf[2], bf[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = l_run[mt][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int row = row0 + mt * 16 + g + r * 8;
      if (row >= seq) continue;
      const float inv = 1.f / l;
      bf16* orow = o + (tok0 + row) * o_stride + int64_t(h) * D;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        *reinterpret_cast<__nv_bfloat162*>(orow + dt * 8 + 2 * tig) =
            __floats2bfloat162_rn(oacc[mt][dt][2 * r] * inv, oacc[mt][dt][2 * r + 1] * inv);
      }
      if (tig == 0) lse[(int64_t(b) * heads + h) * seq + row] = (m_run[mt][r] + log2f(l)) * kLn2;
    }
  }
}

// Backward: a CTA of 8 warps takes 128 keys of one kv head and walks the 64-query blocks of every
// query head that reads it. Each product is tiled over the warps in two dimensions, so that a
// fragment read from shared memory feeds several products:
//   S^T = K Q^T, dP^T = V dO^T   [128 keys x 64 queries]  warps 4 (keys) x 2 (queries), 32 x 32 each
//   dV += P^T dO, dK += dS^T Q   [128 keys x D]           warps 4 (keys) x 2 (head dim), 32 x D/2
//   dQ += dS K                   [64 queries x D]         warps 2 (queries) x 4 (head dim), 32 x D/4
// P^T and dS^T go through shared memory between the first and the other products; dK and dV stay
// in registers for the whole walk; dQ is added to the fp32 dq buffer with float2 atomics.
// With kSplit (grouped-query attention), a CTA takes one query head instead of the whole group, for
// more CTAs; the group's CTAs then add their dK and dV with atomics (dk and dv_accum, zeroed first).
constexpr int kBwdKeys = 128, kBwdRows = 64, kBwdThreads = 256;

template <int D, bool kSplit>
__global__ void __launch_bounds__(kBwdThreads, 1) attention_bwd_mma_kernel(
    const bf16* __restrict__ q, int64_t q_stride, const bf16* __restrict__ k, int64_t k_stride,
    const bf16* __restrict__ v, int64_t v_stride, const float* __restrict__ lse, const bf16* __restrict__ d_o,
    int64_t do_stride, const float* __restrict__ delta, float* __restrict__ dq, float* __restrict__ dk,
    bf16* __restrict__ dv, int64_t dv_stride, float* __restrict__ dv_accum, int seq, int heads, int kv_heads,
    float scale) {
  constexpr int BC = kBwdKeys, BR = kBwdRows, LD = D + 8, LDP = BR + 8;
  constexpr int DH2 = D / 2, DH4 = D / 4;  // head-dim slice of a warp in dK/dV and in dQ
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* ks = reinterpret_cast<bf16*>(smem_raw);
  bf16* vs = ks + BC * LD;
  bf16* qs = vs + BC * LD;
  bf16* dos = qs + BR * LD;
  bf16* pts = dos + BR * LD;  // P^T  [keys][queries]
  bf16* dss = pts + BC * LDP;  // dS^T [keys][queries]
  float* lse_s = reinterpret_cast<float*>(dss + BC * LDP);  // log2-domain lse of the query block
  float* delta_s = lse_s + BR;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
  const int kb = gridDim.x - 1 - blockIdx.x;
  const int group = heads / kv_heads;
  const int b = kSplit ? blockIdx.y / heads : blockIdx.y / kv_heads;
  const int kvh = kSplit ? (blockIdx.y % heads) / group : blockIdx.y % kv_heads;
  const int h_first = kSplit ? blockIdx.y % heads : kvh * group, h_count = kSplit ? 1 : group;
  const int64_t tok0 = int64_t(b) * seq;
  const int key0 = kb * BC;
  const float scale_log2 = scale * kLog2e;
  const int dq_stride = heads * D;
  // Warp tiles: S/dP rows (keys) and columns (queries); dK/dV rows and head-dim columns; dQ.
  const int s_key = (warp & 3) * 32, s_qry = (warp >> 2) * 32;
  const int kv_key = (warp & 3) * 32, kv_col = (warp >> 2) * DH2;
  const int q_row = (warp & 1) * 32, q_col = (warp >> 1) * DH4;

  load_tile<BC, D, kBwdThreads>(ks, k + tok0 * k_stride + int64_t(kvh) * D, k_stride, key0, seq);
  load_tile<BC, D, kBwdThreads>(vs, v + tok0 * v_stride + int64_t(kvh) * D, v_stride, key0, seq);
  cp_async_commit();

  float dk_acc[2][DH2 / 8][4], dv_acc[2][DH2 / 8][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int nt = 0; nt < DH2 / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dk_acc[mt][nt][e] = dv_acc[mt][nt][e] = 0.f;
    }
  }
  const int nqb = (seq + BR - 1) / BR;

  for (int h = h_first; h < h_first + h_count; ++h) {
    const bf16* qbase = q + tok0 * q_stride + int64_t(h) * D;
    const bf16* dobase = d_o + tok0 * do_stride + int64_t(h) * D;
    const int64_t stat0 = (int64_t(b) * heads + h) * seq;
    for (int qb = key0 / BR; qb < nqb; ++qb) {
      const int q0 = qb * BR;
      __syncthreads();  // the previous block's tiles are no longer read
      load_tile<BR, D, kBwdThreads>(qs, qbase, q_stride, q0, seq);
      load_tile<BR, D, kBwdThreads>(dos, dobase, do_stride, q0, seq);
      cp_async_commit();
      if (threadIdx.x < BR) {
        const int qi = q0 + threadIdx.x;
        lse_s[threadIdx.x] = qi < seq ? lse[stat0 + qi] * kLog2e : 0.f;
        delta_s[threadIdx.x] = qi < seq ? delta[stat0 + qi] : 0.f;
      }
      cp_async_wait<0>();
      __syncthreads();

      // S^T and dP^T for this warp's 32 keys x 32 queries.
      {
        float st[2][4][4], dpt[2][4][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) st[mt][nt][e] = dpt[mt][nt][e] = 0.f;
          }
        }
#pragma unroll 2
        for (int kk = 0; kk < D / 16; ++kk) {
          uint32_t ka[2][4];
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) load_a(ka[mt], ks, LD, s_key + mt * 16, kk * 16);
#pragma unroll
          for (int nt = 0; nt < 4; nt += 2) {
            uint32_t bq[4];
            load_b_nk(bq, qs, LD, s_qry + nt * 8, kk * 16);
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
              mma_bf16(st[mt][nt], ka[mt], bq[0], bq[1]);
              mma_bf16(st[mt][nt + 1], ka[mt], bq[2], bq[3]);
            }
          }
        }
#pragma unroll 2
        for (int kk = 0; kk < D / 16; ++kk) {
          uint32_t va[2][4];
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) load_a(va[mt], vs, LD, s_key + mt * 16, kk * 16);
#pragma unroll
          for (int nt = 0; nt < 4; nt += 2) {
            uint32_t bdo[4];
            load_b_nk(bdo, dos, LD, s_qry + nt * 8, kk * 16);
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
              mma_bf16(dpt[mt][nt], va[mt], bdo[0], bdo[1]);
              mma_bf16(dpt[mt][nt + 1], va[mt], bdo[2], bdo[3]);
            }
          }
        }
        // P^T = exp(S^T scale - lse) with the causal mask; dS^T = P^T (dP^T - delta). Both to
        // shared memory as bf16.
        const bool mask = q0 < key0 + BC - 1 || q0 + BR > seq || key0 + BC > seq;
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) {
            float p[4], ds[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int qc = s_qry + nt * 8 + 2 * tig + (e & 1);
              p[e] = fast_exp2(st[mt][nt][e] * scale_log2 - lse_s[qc]);
              if (mask) {
                const int key = key0 + s_key + mt * 16 + g + (e >> 1) * 8, query = q0 + qc;
                if (query < key || query >= seq || key >= seq) p[e] = 0.f;
              }
              ds[e] = p[e] * (dpt[mt][nt][e] - delta_s[qc]);
            }
            const int row = s_key + mt * 16 + g, col = s_qry + nt * 8 + 2 * tig;
            *reinterpret_cast<uint32_t*>(pts + row * LDP + col) = pack_bf16(p[0], p[1]);
            *reinterpret_cast<uint32_t*>(pts + (row + 8) * LDP + col) = pack_bf16(p[2], p[3]);
            *reinterpret_cast<uint32_t*>(dss + row * LDP + col) = pack_bf16(ds[0], ds[1]);
            *reinterpret_cast<uint32_t*>(dss + (row + 8) * LDP + col) = pack_bf16(ds[2], ds[3]);
          }
        }
      }
      __syncthreads();  // P^T and dS^T are complete

      // dV += P^T dO and dK += dS^T Q for this warp's 32 keys x D/2 head dims (k: the 64 queries).
#pragma unroll
      for (int kk = 0; kk < BR / 16; ++kk) {
        uint32_t pa[2][4], da[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          load_a(pa[mt], pts, LDP, kv_key + mt * 16, kk * 16);
          load_a(da[mt], dss, LDP, kv_key + mt * 16, kk * 16);
        }
#pragma unroll
        for (int nt = 0; nt < DH2 / 8; nt += 2) {
          uint32_t bdo[4], bq[4];
          load_b_kn(bdo, dos, LD, kk * 16, kv_col + nt * 8);
          load_b_kn(bq, qs, LD, kk * 16, kv_col + nt * 8);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma_bf16(dv_acc[mt][nt], pa[mt], bdo[0], bdo[1]);
            mma_bf16(dv_acc[mt][nt + 1], pa[mt], bdo[2], bdo[3]);
            mma_bf16(dk_acc[mt][nt], da[mt], bq[0], bq[1]);
            mma_bf16(dk_acc[mt][nt + 1], da[mt], bq[2], bq[3]);
          }
        }
      }

      // dQ += scale * dS K for this warp's 32 queries x D/4 head dims (k: the 128 keys).
      {
        float dq_acc[2][DH4 / 8][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
          for (int nt = 0; nt < DH4 / 8; ++nt) dq_acc[mt][nt][0] = dq_acc[mt][nt][1] = dq_acc[mt][nt][2] = dq_acc[mt][nt][3] = 0.f;
        }
#pragma unroll 2
        for (int kk = 0; kk < BC / 16; ++kk) {
          uint32_t a[2][4];
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) load_a_t(a[mt], dss, LDP, q_row + mt * 16, kk * 16);
#pragma unroll
          for (int nt = 0; nt < DH4 / 8; nt += 2) {
            uint32_t bk[4];
            load_b_kn(bk, ks, LD, kk * 16, q_col + nt * 8);
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
              mma_bf16(dq_acc[mt][nt], a[mt], bk[0], bk[1]);
              mma_bf16(dq_acc[mt][nt + 1], a[mt], bk[2], bk[3]);
            }
          }
        }
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          const int qrow = q0 + q_row + mt * 16 + g;
#pragma unroll
          for (int nt = 0; nt < DH4 / 8; ++nt) {
            const int col = q_col + nt * 8 + 2 * tig;
            if (qrow < seq) {
              atomicAdd(reinterpret_cast<float2*>(dq + (tok0 + qrow) * dq_stride + int64_t(h) * D + col),
                        make_float2(dq_acc[mt][nt][0] * scale, dq_acc[mt][nt][1] * scale));
            }
            if (qrow + 8 < seq) {
              atomicAdd(reinterpret_cast<float2*>(dq + (tok0 + qrow + 8) * dq_stride + int64_t(h) * D + col),
                        make_float2(dq_acc[mt][nt][2] * scale, dq_acc[mt][nt][3] * scale));
            }
          }
        }
      }
    }
  }
  // dK = scale * sum dS^T Q (fp32), dV = sum P^T dO (bf16, into the strided q|k|v gradient).
  const int dk_stride = kv_heads * D;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int key = key0 + kv_key + mt * 16 + g + r * 8;
      if (key >= seq) continue;
      float* dkrow = dk + (tok0 + key) * dk_stride + int64_t(kvh) * D;
      bf16* dvrow = dv + (tok0 + key) * dv_stride + int64_t(kvh) * D;
#pragma unroll
      for (int nt = 0; nt < DH2 / 8; ++nt) {
        const int col = kv_col + nt * 8 + 2 * tig;
        const float2 dkv = make_float2(dk_acc[mt][nt][2 * r] * scale, dk_acc[mt][nt][2 * r + 1] * scale);
        if constexpr (kSplit) {
          atomicAdd(reinterpret_cast<float2*>(dkrow + col), dkv);
          atomicAdd(reinterpret_cast<float2*>(dv_accum + (tok0 + key) * dk_stride + int64_t(kvh) * D + col),
                    make_float2(dv_acc[mt][nt][2 * r], dv_acc[mt][nt][2 * r + 1]));
        } else {
          *reinterpret_cast<float2*>(dkrow + col) = dkv;
          *reinterpret_cast<__nv_bfloat162*>(dvrow + col) =
              __floats2bfloat162_rn(dv_acc[mt][nt][2 * r], dv_acc[mt][nt][2 * r + 1]);
        }
      }
    }
  }
}

// dv (bf16, rows dv_stride apart) = dv_accum (fp32, [tokens, kv_dim]).
__global__ void dv_from_accum_kernel(const float* __restrict__ acc, bf16* __restrict__ dv, int64_t dv_stride,
                                     int64_t tokens, int kv_dim) {
  const int64_t n = tokens * kv_dim / 2;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = (2 * i) / kv_dim, c = (2 * i) % kv_dim;
    const float2 a = *reinterpret_cast<const float2*>(acc + 2 * i);
    *reinterpret_cast<__nv_bfloat162*>(dv + t * dv_stride + c) = __floats2bfloat162_rn(a.x, a.y);
  }
}

template <int D>
size_t FwdSmem() {
  return sizeof(bf16) * (kFwdRows + 4 * FwdKeys<D>()) * (D + 8);
}
template <int D>
size_t BwdSmem() {
  return sizeof(bf16) * ((2 * kBwdKeys + 2 * kBwdRows) * (D + 8) + 2 * kBwdKeys * (kBwdRows + 8)) +
         sizeof(float) * 2 * kBwdRows;
}

template <int D>
cudaError_t LaunchFwd(const AttentionArgs<bf16>& a) {
  auto kernel = attention_fwd_mma_kernel<D>;
  const size_t smem = FwdSmem<D>();
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  kernel<<<dim3(ceil_div(a.seq, kFwdRows), a.batch * a.heads), kFwdThreads, smem, a.stream>>>(
      a.q, a.q_stride, a.k, a.k_stride, a.v, a.v_stride, a.o, a.o_stride, a.lse, a.seq, a.heads, a.kv_heads,
      a.scale * kLog2e);
  return cudaGetLastError();
}

template <int D>
cudaError_t LaunchBwd(const AttentionArgs<bf16>& a) {
  const int64_t tokens = int64_t(a.batch) * a.seq;
  const float* delta = a.workspace;
  float* dv_accum = a.workspace + int64_t(a.batch) * a.heads * a.seq;  // see attention_bwd_workspace_floats
  cudaError_t e = cudaMemsetAsync(a.dq, 0, sizeof(float) * tokens * a.heads * D, a.stream);
  if (e != cudaSuccess) return e;
  const size_t smem = BwdSmem<D>();
  const dim3 grid_keys(ceil_div(a.seq, kBwdKeys));
  if (a.heads == a.kv_heads) {
    auto kernel = attention_bwd_mma_kernel<D, false>;
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
    kernel<<<dim3(grid_keys.x, a.batch * a.kv_heads), kBwdThreads, smem, a.stream>>>(
        a.q, a.q_stride, a.k, a.k_stride, a.v, a.v_stride, a.lse, a.d_o, a.do_stride, delta, a.dq, a.dk, a.dv,
        a.dv_stride, nullptr, a.seq, a.heads, a.kv_heads, a.scale);
    return cudaGetLastError();
  }
  const int64_t kv_dim = int64_t(a.kv_heads) * D;
  e = cudaMemsetAsync(a.dk, 0, sizeof(float) * tokens * kv_dim, a.stream);
  if (e == cudaSuccess) e = cudaMemsetAsync(dv_accum, 0, sizeof(float) * tokens * kv_dim, a.stream);
  if (e != cudaSuccess) return e;
  auto kernel = attention_bwd_mma_kernel<D, true>;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  kernel<<<dim3(grid_keys.x, a.batch * a.heads), kBwdThreads, smem, a.stream>>>(
      a.q, a.q_stride, a.k, a.k_stride, a.v, a.v_stride, a.lse, a.d_o, a.do_stride, delta, a.dq, a.dk, a.dv,
      a.dv_stride, dv_accum, a.seq, a.heads, a.kv_heads, a.scale);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  const int64_t pairs = tokens * kv_dim / 2;
  dv_from_accum_kernel<<<static_cast<int>(std::min<int64_t>((pairs + 255) / 256, 4096)), 256, 0, a.stream>>>(
      dv_accum, a.dv, a.dv_stride, tokens, static_cast<int>(kv_dim));
  return cudaGetLastError();
}

}  // namespace

bool attention_mma_supports(int head_dim) { return head_dim == 64 || head_dim == 128; }

cudaError_t launch_attention_fwd_mma(const AttentionArgs<bf16>& args) {
  if (args.head_dim == 64) return LaunchFwd<64>(args);
  if (args.head_dim == 128) return LaunchFwd<128>(args);
  return cudaErrorInvalidValue;
}

cudaError_t launch_attention_bwd_mma(const AttentionArgs<bf16>& args) {
  if (args.head_dim == 64) return LaunchBwd<64>(args);
  if (args.head_dim == 128) return LaunchBwd<128>(args);
  return cudaErrorInvalidValue;
}

}  // namespace blockd::kernels
