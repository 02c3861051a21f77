// Register-tiled fp32 flash attention (see attention_fp32.cuh). Counting that drove the design: a
// score costs head_dim FFMAs, so the kernels live or die by the FFMA share of issued instructions
// and by shared-memory wavefronts per FFMA. Every product reads its two operands as float4 along
// whichever dimension is contiguous in shared memory (q.k^T and dO.v^T along head_dim, P^T dO and
// dS^T q along keys and head_dim, dS k along keys and head_dim), so no tile is ever transposed.
// Per 4 steps of head_dim, the forward's 8x4 scores per thread cost 12 float4 reads for 128 FFMAs,
// the backward's 4x4 S plus 4x4 dP 16 reads for 128. Rows of q/k/v/dO tiles are padded by 4
// floats (one float4), which moves consecutive rows 4 banks apart: the 4 to 16 distinct rows a
// warp reads at once hit distinct banks.
#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "kernels/attention_fp32.cuh"
#include "kernels/common.cuh"

namespace blockd::kernels {
namespace {

constexpr int kThreads = 256;  // a 16 x 16 grid of threads in every phase
constexpr int kFwdRows = 128, kFwdKeys = 64;
constexpr int kBwdRows = 64, kBwdKeys = 64;

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16 (or 4) bytes global -> shared, zero-filled when !valid (src must still be a mapped address).
__device__ __forceinline__ void cp_async16(float* dst, const float* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(float* dst, const float* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Rows [row0, row0 + R) of a [seq, D] matrix whose rows sit `stride` floats apart, into shared
// memory with rows LD floats apart; rows at or past `seq` become zeros.
template <int R, int D, int LD>
__device__ __forceinline__ void load_tile(float* dst, const float* base, int64_t stride, int row0, int seq) {
  constexpr int kChunks = D / 4;
  for (int c = threadIdx.x; c < R * kChunks; c += kThreads) {
    const int r = c / kChunks, cc = c % kChunks;
    const int row = row0 + r;
    const bool valid = row < seq;
    cp_async16(dst + r * LD + cc * 4, base + int64_t(valid ? row : 0) * stride + cc * 4, valid);
  }
}

__device__ __forceinline__ const float4& ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ void st4(float* p, float a, float b, float c, float d) {
  *reinterpret_cast<float4*>(p) = make_float4(a, b, c, d);
}
// Component i of v; i is a compile-time constant once the loops around it unroll.
__device__ __forceinline__ float at(const float4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }
// acc + a.b over 4 consecutive elements, in element order (as a scalar loop would add them).
__device__ __forceinline__ float dot4(const float4& a, const float4& b, float acc) {
  acc = fmaf(a.x, b.x, acc);
  acc = fmaf(a.y, b.y, acc);
  acc = fmaf(a.z, b.z, acc);
  return fmaf(a.w, b.w, acc);
}
__device__ __forceinline__ void axpy4(float a, const float4& x, float (&y)[4]) {
  y[0] = fmaf(a, x.x, y[0]);
  y[1] = fmaf(a, x.y, y[1]);
  y[2] = fmaf(a, x.z, y[2]);
  y[3] = fmaf(a, x.w, y[3]);
}

template <int D>
struct FwdLayout {
  static constexpr int LD = D + 4;  // q/k/v rows
  // Score rows: the two rows a warp writes at once start 16 banks apart, so the scalar stores of P
  // do not conflict.
  static constexpr int LDP = kFwdKeys + 16;
  static constexpr int kFloats = kFwdRows * LD + 2 * kFwdKeys * LD + kFwdRows * LDP;
};

// Forward: a CTA owns 128 query rows of one (batch, head) and walks the key blocks up to the
// diagonal, 64 keys at a time. Thread (ty, tx) holds scores of rows ty + 16r (r < 8) and keys
// tx + 16c (c < 4), and output rows ty + 16r, columns 64g + 4tx .. +3. A warp is two ty rows
// by all 16 tx, so a row's softmax statistics reduce over a half-warp with shuffles, and the P
// that the row's PV product reads was written by that same half-warp. Loads are single-buffered
// but overlapped: the next K block loads during softmax and PV, the next V block during q.k^T.
template <int D>
__global__ void __launch_bounds__(kThreads, 1) attention_fwd_fp32_kernel(
    const float* __restrict__ q, int64_t q_stride, const float* __restrict__ k, int64_t k_stride,
    const float* __restrict__ v, int64_t v_stride, float* __restrict__ o, int64_t o_stride, float* __restrict__ lse,
    int seq, int heads, int kv_heads, float scale) {
  constexpr int BM = kFwdRows, BN = kFwdKeys, LD = FwdLayout<D>::LD, LDP = FwdLayout<D>::LDP;
  constexpr int RM = BM / 16, CN = BN / 16, G = D / 64;
  extern __shared__ __align__(16) float smem[];
  float* sq = smem;           // [BM][LD]
  float* sk = sq + BM * LD;   // [BN][LD]
  float* sv = sk + BN * LD;   // [BN][LD]
  float* sp = sv + BN * LD;   // [BM][LDP]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int ty = warp * 2 + (lane >> 4), tx = lane & 15;
  const int b = blockIdx.x / heads, h = blockIdx.x % heads, kvh = h / (heads / kv_heads);
  const int q0 = (gridDim.y - 1 - blockIdx.y) * BM;  // the longest rows (most keys) start first
  const int64_t tok0 = int64_t(b) * seq;
  const float* kbase = k + tok0 * k_stride + int64_t(kvh) * D;
  const float* vbase = v + tok0 * v_stride + int64_t(kvh) * D;
  load_tile<BM, D, LD>(sq, q + tok0 * q_stride + int64_t(h) * D, q_stride, q0, seq);
  load_tile<BN, D, LD>(sk, kbase, k_stride, 0, seq);
  cp_async_commit();
  load_tile<BN, D, LD>(sv, vbase, v_stride, 0, seq);
  cp_async_commit();

  float acc[RM][G][4], m[RM], l[RM];
#pragma unroll
  for (int r = 0; r < RM; ++r) {
    m[r] = -INFINITY;  // finite after block 0: key 0 is visible to every row
    l[r] = 0.f;
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int x = 0; x < 4; ++x) acc[r][g][x] = 0.f;
    }
  }
  const int blocks = (min(q0 + BM, seq) - 1) / BN + 1;
  for (int t = 0; t < blocks; ++t) {
    const int k0 = t * BN;
    cp_async_wait<1>();  // q and this K block (the V block may still be in flight)
    __syncthreads();
    float s[RM][CN];
#pragma unroll
    for (int r = 0; r < RM; ++r) {
#pragma unroll
      for (int c = 0; c < CN; ++c) s[r][c] = 0.f;
    }
#pragma unroll 4
    for (int e = 0; e < D; e += 4) {
      float4 kf[CN];
#pragma unroll
      for (int c = 0; c < CN; ++c) kf[c] = ld4(sk + (tx + 16 * c) * LD + e);
#pragma unroll
      for (int r = 0; r < RM; ++r) {
        const float4 qf = ld4(sq + (ty + 16 * r) * LD + e);
#pragma unroll
        for (int c = 0; c < CN; ++c) s[r][c] = dot4(qf, kf[c], s[r][c]);
      }
    }
    __syncthreads();  // every warp is done with sk
    if (t + 1 < blocks) load_tile<BN, D, LD>(sk, kbase, k_stride, k0 + BN, seq);
    cp_async_commit();  // possibly empty: keeps the group count the waits rely on

    const bool diagonal = k0 + BN - 1 > q0;  // some key of the block lies past some row
#pragma unroll
    for (int r = 0; r < RM; ++r) {
      const int i = q0 + ty + 16 * r;
      float mx = m[r];
#pragma unroll
      for (int c = 0; c < CN; ++c) {
        const int j = k0 + tx + 16 * c;
        s[r][c] = (!diagonal || j <= i) ? s[r][c] * scale : -INFINITY;
        mx = fmaxf(mx, s[r][c]);
      }
#pragma unroll
      for (int off = 1; off < 16; off <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float corr = expf(m[r] - mx);
      m[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int c = 0; c < CN; ++c) {
        const float p = expf(s[r][c] - mx);
        sum += p;
        sp[(ty + 16 * r) * LDP + tx + 16 * c] = p;
      }
      l[r] = l[r] * corr + sum;  // this thread's share of the row sum; reduced at the end
#pragma unroll
      for (int g = 0; g < G; ++g) {
#pragma unroll
        for (int x = 0; x < 4; ++x) acc[r][g][x] *= corr;
      }
    }
    cp_async_wait<1>();  // this V block (the next K block may still be in flight)
    __syncthreads();
#pragma unroll 2
    for (int j = 0; j < BN; j += 4) {
      float4 pf[RM];
#pragma unroll
      for (int r = 0; r < RM; ++r) pf[r] = ld4(sp + (ty + 16 * r) * LDP + j);
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const float4 vf = ld4(sv + (j + jj) * LD + 64 * g + 4 * tx);
#pragma unroll
          for (int r = 0; r < RM; ++r) axpy4(at(pf[r], jj), vf, acc[r][g]);
        }
      }
    }
    __syncthreads();  // every warp is done with sv
    if (t + 1 < blocks) load_tile<BN, D, LD>(sv, vbase, v_stride, k0 + BN, seq);
    cp_async_commit();
  }

#pragma unroll
  for (int r = 0; r < RM; ++r) {
    float sum = l[r];
#pragma unroll
    for (int off = 1; off < 16; off <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    const int i = q0 + ty + 16 * r;
    if (i >= seq) continue;
    const float inv = 1.f / sum;
    float* orow = o + (tok0 + i) * o_stride + int64_t(h) * D;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      st4(orow + 64 * g + 4 * tx, acc[r][g][0] * inv, acc[r][g][1] * inv, acc[r][g][2] * inv, acc[r][g][3] * inv);
    }
    if (tx == 0) lse[(int64_t(b) * heads + h) * seq + i] = m[r] + logf(sum);
  }
}

template <int D>
struct BwdLayout {
  static constexpr int LD = D + 4;  // k/v/q/dO rows
  // P and dS rows: 8 banks apart, so a warp's scalar stores (4 rows x 8 keys) and its float4
  // reads of 4 rows are conflict-free.
  static constexpr int LDS = kBwdKeys + 8;
  static constexpr int kFloats = 2 * kBwdKeys * LD + 2 * kBwdRows * LD + 2 * kBwdRows * LDS + 2 * kBwdRows;
};

// Backward: a CTA owns 64 keys of one (batch, kv head) and walks, for every query head that reads
// that kv head, the 64-row query blocks from the diagonal to the end; dK and dV of its keys stay in
// registers throughout (no atomics for them), dQ is added to the fp32 dq buffer with float4
// atomics (dq is zeroed first). Per query block:
//   A. S = q k^T and dP = dO v^T (thread: rows ty + 16r, keys tx + 16c), P = exp(S scale - lse),
//      dS = P (dP - delta), both to shared memory;
//   B. dV += P^T dO and dK += dS^T q (thread: keys 4ty .. +3, columns 64g + 4tx .. +3);
//   C. dQ += dS k (thread: rows ty + 16r, columns 64g + 4tx .. +3), while the next q and dO load.
// A warp is 4 ty by 8 tx, so each float4 read touches 4 or 8 distinct padded rows: one wavefront.
template <int D>
__global__ void __launch_bounds__(kThreads, 1) attention_bwd_fp32_kernel(
    const float* __restrict__ q, int64_t q_stride, const float* __restrict__ k, int64_t k_stride,
    const float* __restrict__ v, int64_t v_stride, const float* __restrict__ lse, const float* __restrict__ d_o,
    int64_t do_stride, const float* __restrict__ delta, float* __restrict__ dq, float* __restrict__ dk,
    float* __restrict__ dv, int64_t dv_stride, int seq, int heads, int kv_heads, float scale) {
  constexpr int BM = kBwdRows, BN = kBwdKeys, LD = BwdLayout<D>::LD, LDS = BwdLayout<D>::LDS, G = D / 64;
  extern __shared__ __align__(16) float smem[];
  float* sk = smem;             // [BN][LD]
  float* sv = sk + BN * LD;     // [BN][LD]
  float* sq = sv + BN * LD;     // [BM][LD]
  float* sdo = sq + BM * LD;    // [BM][LD]
  float* sp = sdo + BM * LD;    // [BM][LDS]
  float* sds = sp + BM * LDS;   // [BM][LDS]
  float* slse = sds + BM * LDS;  // [BM]
  float* sdelta = slse + BM;     // [BM]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int ty = (warp >> 1) * 4 + (lane >> 3), tx = (warp & 1) * 8 + (lane & 7);
  const int b = blockIdx.x / kv_heads, kvh = blockIdx.x % kv_heads, group = heads / kv_heads;
  const int j0 = blockIdx.y * BN;  // block 0 has the most queries; it starts first
  const int64_t tok0 = int64_t(b) * seq;
  const int64_t dq_stride = int64_t(heads) * D;
  load_tile<BN, D, LD>(sk, k + tok0 * k_stride + int64_t(kvh) * D, k_stride, j0, seq);
  load_tile<BN, D, LD>(sv, v + tok0 * v_stride + int64_t(kvh) * D, v_stride, j0, seq);

  const int qblocks = (seq - j0 + BM - 1) / BM;  // query blocks from the diagonal on, per head
  const int steps = group * qblocks;
  auto issue = [&](int step) {
    const int h = kvh * group + step / qblocks, i0 = j0 + (step % qblocks) * BM;
    load_tile<BM, D, LD>(sq, q + tok0 * q_stride + int64_t(h) * D, q_stride, i0, seq);
    load_tile<BM, D, LD>(sdo, d_o + tok0 * do_stride + int64_t(h) * D, do_stride, i0, seq);
    if (threadIdx.x < BM) {
      const int i = i0 + threadIdx.x;
      const bool valid = i < seq;
      const int64_t stat = (int64_t(b) * heads + h) * seq + (valid ? i : 0);
      cp_async4(slse + threadIdx.x, lse + stat, valid);
      cp_async4(sdelta + threadIdx.x, delta + stat, valid);
    }
  };
  issue(0);
  cp_async_commit();

  float dk_acc[4][G][4], dv_acc[4][G][4];
#pragma unroll
  for (int rr = 0; rr < 4; ++rr) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int x = 0; x < 4; ++x) dk_acc[rr][g][x] = dv_acc[rr][g][x] = 0.f;
    }
  }
  for (int step = 0; step < steps; ++step) {
    const int h = kvh * group + step / qblocks, i0 = j0 + (step % qblocks) * BM;
    cp_async_wait<0>();
    __syncthreads();
    {  // A: scores and their gradients.
      float s[4][4], dp[4][4];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
#pragma unroll
        for (int c = 0; c < 4; ++c) s[r][c] = dp[r][c] = 0.f;
      }
#pragma unroll 2
      for (int e = 0; e < D; e += 4) {
        float4 kf[4], vf[4];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          kf[c] = ld4(sk + (tx + 16 * c) * LD + e);
          vf[c] = ld4(sv + (tx + 16 * c) * LD + e);
        }
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const float4 qf = ld4(sq + (ty + 16 * r) * LD + e);
          const float4 of = ld4(sdo + (ty + 16 * r) * LD + e);
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            s[r][c] = dot4(qf, kf[c], s[r][c]);
            dp[r][c] = dot4(of, vf[c], dp[r][c]);
          }
        }
      }
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int ir = ty + 16 * r, i = i0 + ir;
        const float row_lse = slse[ir], row_delta = sdelta[ir];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int jc = tx + 16 * c;
          const bool valid = i < seq && j0 + jc <= i;
          const float p = valid ? expf(s[r][c] * scale - row_lse) : 0.f;
          sp[ir * LDS + jc] = p;
          sds[ir * LDS + jc] = valid ? p * (dp[r][c] - row_delta) : 0.f;
        }
      }
    }
    __syncthreads();
    // B: dV += P^T dO, dK += dS^T q over this block's rows.
#pragma unroll 2
    for (int i = 0; i < BM; ++i) {
      const float4 pf = ld4(sp + i * LDS + 4 * ty);
      const float4 dsf = ld4(sds + i * LDS + 4 * ty);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float4 of = ld4(sdo + i * LD + 64 * g + 4 * tx);
        const float4 qf = ld4(sq + i * LD + 64 * g + 4 * tx);
#pragma unroll
        for (int rr = 0; rr < 4; ++rr) {
          axpy4(at(pf, rr), of, dv_acc[rr][g]);
          axpy4(at(dsf, rr), qf, dk_acc[rr][g]);
        }
      }
    }
    __syncthreads();  // q, dO, P, lse and delta are free: the next block loads under C
    if (step + 1 < steps) issue(step + 1);
    cp_async_commit();
    {  // C: dQ += scale * dS k, added to global memory.
      float acc[4][G][4];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
#pragma unroll
        for (int g = 0; g < G; ++g) {
#pragma unroll
          for (int x = 0; x < 4; ++x) acc[r][g][x] = 0.f;
        }
      }
#pragma unroll 2
      for (int j = 0; j < BN; j += 4) {
        float4 dsf[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) dsf[r] = ld4(sds + (ty + 16 * r) * LDS + j);
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
#pragma unroll
          for (int g = 0; g < G; ++g) {
            const float4 kf = ld4(sk + (j + jj) * LD + 64 * g + 4 * tx);
#pragma unroll
            for (int r = 0; r < 4; ++r) axpy4(at(dsf[r], jj), kf, acc[r][g]);
          }
        }
      }
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int i = i0 + ty + 16 * r;
        if (i >= seq) continue;
        float* row = dq + (tok0 + i) * dq_stride + int64_t(h) * D + 4 * tx;
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const float4 add =
              make_float4(acc[r][g][0] * scale, acc[r][g][1] * scale, acc[r][g][2] * scale, acc[r][g][3] * scale);
#if __CUDA_ARCH__ >= 900
          atomicAdd(reinterpret_cast<float4*>(row + 64 * g), add);  // one red.v4 instead of four
#else
          atomicAdd(row + 64 * g, add.x);
          atomicAdd(row + 64 * g + 1, add.y);
          atomicAdd(row + 64 * g + 2, add.z);
          atomicAdd(row + 64 * g + 3, add.w);
#endif
        }
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < 4; ++rr) {
    const int j = j0 + 4 * ty + rr;
    if (j >= seq) continue;
    float* dk_row = dk + (tok0 + j) * (int64_t(kv_heads) * D) + int64_t(kvh) * D + 4 * tx;
    float* dv_row = dv + (tok0 + j) * dv_stride + int64_t(kvh) * D + 4 * tx;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      st4(dk_row + 64 * g, dk_acc[rr][g][0] * scale, dk_acc[rr][g][1] * scale, dk_acc[rr][g][2] * scale,
          dk_acc[rr][g][3] * scale);
      st4(dv_row + 64 * g, dv_acc[rr][g][0], dv_acc[rr][g][1], dv_acc[rr][g][2], dv_acc[rr][g][3]);
    }
  }
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <int D>
cudaError_t LaunchFwd(const AttentionArgs<float>& a) {
  const size_t smem = sizeof(float) * FwdLayout<D>::kFloats;
  auto kernel = attention_fwd_fp32_kernel<D>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  // x: (batch, head), so that the dispatcher hands out every head's longest block before any shorter one.
  const dim3 grid(a.batch * a.heads, ceil_div(a.seq, kFwdRows));
  kernel<<<grid, kThreads, smem, a.stream>>>(a.q, a.q_stride, a.k, a.k_stride, a.v, a.v_stride, a.o, a.o_stride,
                                             a.lse, a.seq, a.heads, a.kv_heads, a.scale);
  return cudaGetLastError();
}

template <int D>
cudaError_t LaunchBwd(const AttentionArgs<float>& a) {
  const int64_t tokens = int64_t(a.batch) * a.seq;
  cudaError_t e = cudaMemsetAsync(a.dq, 0, sizeof(float) * tokens * a.heads * D, a.stream);
  if (e != cudaSuccess) return e;
  const size_t smem = sizeof(float) * BwdLayout<D>::kFloats;
  auto kernel = attention_bwd_fp32_kernel<D>;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  const dim3 grid(a.batch * a.kv_heads, ceil_div(a.seq, kBwdKeys));
  kernel<<<grid, kThreads, smem, a.stream>>>(a.q, a.q_stride, a.k, a.k_stride, a.v, a.v_stride, a.lse, a.d_o,
                                             a.do_stride, a.workspace, a.dq, a.dk, a.dv, a.dv_stride, a.seq,
                                             a.heads, a.kv_heads, a.scale);
  return cudaGetLastError();
}

}  // namespace

bool attention_fp32_supports(const AttentionArgs<float>& a) {
  if (a.head_dim != 64 && a.head_dim != 128) return false;
  // Every row is read or written as float4 (cp.async moves 16 bytes): rows must start 16-byte aligned.
  for (const void* p : {static_cast<const void*>(a.q), static_cast<const void*>(a.k), static_cast<const void*>(a.v),
                        static_cast<const void*>(a.o), static_cast<const void*>(a.d_o), static_cast<const void*>(a.dq),
                        static_cast<const void*>(a.dk), static_cast<const void*>(a.dv)}) {
    if (!Aligned16(p)) return false;  // null is aligned: the forward leaves the backward's pointers unset
  }
  for (int64_t s : {a.q_stride, a.k_stride, a.v_stride, a.o_stride, a.do_stride, a.dv_stride}) {
    if (s % 4 != 0) return false;
  }
  return true;
}

cudaError_t launch_attention_fwd_fp32(const AttentionArgs<float>& a) {
  return a.head_dim == 64 ? LaunchFwd<64>(a) : LaunchFwd<128>(a);
}

cudaError_t launch_attention_bwd_fp32(const AttentionArgs<float>& a) {
  return a.head_dim == 64 ? LaunchBwd<64>(a) : LaunchBwd<128>(a);
}

}  // namespace blockd::kernels
