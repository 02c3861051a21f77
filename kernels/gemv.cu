#include "kernels/gemv.cuh"

#include <cuda_bf16.h>

#include "kernels/common.cuh"
#include "kernels/gemm.h"

namespace blockd::kernels {
namespace {

using bf16 = __nv_bfloat16;
constexpr int kWarps = 8, kThreads = 32 * kWarps;
constexpr int kCols = 4;      // weight rows (output columns) per thread block
constexpr int kStep = 32 * 8;  // k elements a warp covers per step: 16 bytes per lane

__device__ __forceinline__ void unpack8(const uint4& raw, float (&f)[8]) {
  const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 v = __bfloat1622float2(p[i]);
    f[2 * i] = v.x;
    f[2 * i + 1] = v.y;
  }
}

template <class CT>
__device__ __forceinline__ float load_c(const void* c, int64_t i) {
  return to_float(static_cast<const CT*>(c)[i]);
}

// grid: ceil(n / kCols) blocks. Warp w takes the steps w, w + kWarps, ... of k for the block's
// kCols weight rows and the M rows of A; the partial sums meet in shared memory.
template <int M, class CT, class DT>
__global__ void __launch_bounds__(kThreads) gemv_kernel(const bf16* __restrict__ a, int64_t lda,
                                                        const bf16* __restrict__ b, int64_t ldb, int64_t n, int64_t k,
                                                        const void* c, int64_t ldc, float beta, DT* __restrict__ d,
                                                        int64_t ldd) {
  __shared__ float partial[kWarps][M * kCols];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t col0 = int64_t(blockIdx.x) * kCols;
  const int cols = static_cast<int>(min(int64_t(kCols), n - col0));
  float acc[M][kCols] = {};
  for (int64_t k0 = int64_t(warp) * kStep + lane * 8; k0 < k; k0 += kWarps * kStep) {
    uint4 w[kCols];
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      // Rows past n read row col0 again (in range); their sums are never written.
      w[j] = *reinterpret_cast<const uint4*>(b + (col0 + (j < cols ? j : 0)) * ldb + k0);
    }
    float x[M][8];
#pragma unroll
    for (int m = 0; m < M; ++m) unpack8(*reinterpret_cast<const uint4*>(a + m * lda + k0), x[m]);
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      float wf[8];
      unpack8(w[j], wf);
#pragma unroll
      for (int m = 0; m < M; ++m) {
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[m][j] = fmaf(x[m][e], wf[e], acc[m][j]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      const float s = warp_sum(acc[m][j]);
      if (lane == 0) partial[warp][m * kCols + j] = s;
    }
  }
  __syncthreads();
  if (threadIdx.x < M * kCols) {
    const int m = threadIdx.x / kCols, j = threadIdx.x % kCols;
    if (j >= cols) return;
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += partial[w][threadIdx.x];
    const int64_t col = col0 + j;
    if (beta != 0.f) s += beta * load_c<CT>(c, m * ldc + col);
    d[m * ldd + col] = from_float<DT>(s);
  }
}

template <int M, class CT, class DT>
cudaError_t Launch(const GemmArgs& g, cudaStream_t stream) {
  const void* c = g.c != nullptr ? g.c : g.d;
  const int64_t ldc = g.c != nullptr ? g.ldc : g.ldd;
  gemv_kernel<M, CT, DT><<<ceil_div(g.n, kCols), kThreads, 0, stream>>>(
      static_cast<const bf16*>(g.a), g.lda, static_cast<const bf16*>(g.b), g.ldb, g.n, g.k, c, ldc, g.beta,
      static_cast<DT*>(g.d), g.ldd);
  return cudaGetLastError();
}

template <int M>
cudaError_t LaunchTypes(const GemmArgs& g, cudaStream_t stream) {
  const GemmType ct = g.c != nullptr ? g.c_type : g.d_type;
  const bool c_bf16 = ct == GemmType::kBF16, d_bf16 = g.d_type == GemmType::kBF16;
  if (c_bf16 && d_bf16) return Launch<M, bf16, bf16>(g, stream);
  if (c_bf16) return Launch<M, bf16, float>(g, stream);
  if (d_bf16) return Launch<M, float, bf16>(g, stream);
  return Launch<M, float, float>(g, stream);
}

}  // namespace

bool gemv_applies(const GemmArgs& g) {
  const uintptr_t ab = reinterpret_cast<uintptr_t>(g.a) | reinterpret_cast<uintptr_t>(g.b);
  return g.mode == GemmMode::kBF16 && !g.trans_a && g.trans_b && g.m >= 1 && g.m <= kGemvMaxRows &&
         g.alpha == 1.f && (g.beta == 0.f || g.beta == 1.f) && g.k % 8 == 0 && g.lda % 8 == 0 && g.ldb % 8 == 0 &&
         ab % 16 == 0;
}

cudaError_t launch_gemv(const GemmArgs& g, cudaStream_t stream) {
  switch (g.m) {
    case 1: return LaunchTypes<1>(g, stream);
    case 2: return LaunchTypes<2>(g, stream);
    case 3: return LaunchTypes<3>(g, stream);
    case 4: return LaunchTypes<4>(g, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace blockd::kernels
