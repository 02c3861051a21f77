#include "kernels/gemv.cuh"

#include <cuda_bf16.h>

#include "kernels/common.cuh"
#include "kernels/gemm.h"
#include "kernels/pdl.cuh"

namespace blockd::kernels {
namespace {

using bf16 = __nv_bfloat16;
constexpr int kWarps = 8, kThreads = 32 * kWarps;
constexpr int kCols = 4;       // weight rows per thread block (SwiGLU: 2 gate rows, their 2 up rows)
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

__device__ __forceinline__ float silu(float g) { return g * (1.f / (1.f + expf(-g))); }  // swiglu.cu's

// Where a block's weight rows are: kCols consecutive rows from col0, or (kGlu) gate rows col0 and
// col0 + 1 and their up rows f further. Rows past the block's own (`cols`) read its first again.
template <bool kGlu>
__device__ __forceinline__ int64_t WeightRow(int64_t col0, int j, int cols, int64_t f) {
  if constexpr (kGlu) {
    const int jj = j % 2 < cols ? j % 2 : 0;
    return col0 + jj + (j >= 2 ? f : 0);
  } else {
    return col0 + (j < cols ? j : 0);
  }
}

// grid: one block per kCols output columns (kGlu: per 2 of h's). Warp w takes the steps w,
// w + kWarps, ... of k for the block's weight rows and the M rows of A; the partial sums meet in
// shared memory. Launched with PDL: the first step's weights load before pdl_wait, everything
// the previous kernel may write (A, C, D) after it.
template <int M, class CT, class DT, bool kGlu>
__global__ void __launch_bounds__(kThreads) gemv_kernel(const bf16* __restrict__ a, int64_t lda,
                                                        const bf16* __restrict__ b, int64_t ldb, int64_t n, int64_t k,
                                                        const void* c, int64_t ldc, float beta, DT* __restrict__ d,
                                                        int64_t ldd, bf16* __restrict__ h, int64_t ldh) {
  pdl_launch_dependents();  // the next product may start loading its weights
  __shared__ float partial[kWarps][M * kCols];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int per_block = kGlu ? 2 : kCols;
  const int64_t cols_total = kGlu ? n / 2 : n;  // kGlu: n = 2 f weight rows, f outputs of h
  const int64_t col0 = int64_t(blockIdx.x) * per_block;
  const int cols = static_cast<int>(min(int64_t(per_block), cols_total - col0));
  const bf16* rows[kCols];
#pragma unroll
  for (int j = 0; j < kCols; ++j) rows[j] = b + WeightRow<kGlu>(col0, j, cols, cols_total) * ldb;
  const int64_t stride = int64_t(kWarps) * kStep;
  int64_t k0 = int64_t(warp) * kStep + lane * 8;
  uint4 w[kCols];
  if (k0 < k) {
#pragma unroll
    for (int j = 0; j < kCols; ++j) w[j] = *reinterpret_cast<const uint4*>(rows[j] + k0);
  }
  pdl_wait();
  float acc[M][kCols] = {};
  for (; k0 < k; k0 += stride) {
    float x[M][8];
#pragma unroll
    for (int m = 0; m < M; ++m) unpack8(*reinterpret_cast<const uint4*>(a + m * lda + k0), x[m]);
    uint4 next[kCols] = {};
    if (k0 + stride < k) {  // the next step's weights in flight during this step's math
#pragma unroll
      for (int j = 0; j < kCols; ++j) next[j] = *reinterpret_cast<const uint4*>(rows[j] + k0 + stride);
    }
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
#pragma unroll
    for (int j = 0; j < kCols; ++j) w[j] = next[j];
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
  auto total = [&](int m, int j) {
    float s = 0.f;
#pragma unroll
    for (int w2 = 0; w2 < kWarps; ++w2) s += partial[w2][m * kCols + j];
    return s;
  };
  if constexpr (kGlu) {
    // gate|up into d (bf16, as the unfused product stores them), h = silu(gate) * up from those.
    if (threadIdx.x >= M * 2) return;
    const int m = threadIdx.x / 2, jj = threadIdx.x % 2;
    if (jj >= cols) return;
    const int64_t col = col0 + jj;
    const bf16 g = __float2bfloat16_rn(total(m, jj)), u = __float2bfloat16_rn(total(m, 2 + jj));
    d[m * ldd + col] = g;
    d[m * ldd + cols_total + col] = u;
    h[m * ldh + col] = __float2bfloat16_rn(silu(__bfloat162float(g)) * __bfloat162float(u));
  } else {
    if (threadIdx.x >= M * kCols) return;
    const int m = threadIdx.x / kCols, j = threadIdx.x % kCols;
    if (j >= cols) return;
    float s = total(m, j);
    const int64_t col = col0 + j;
    if (beta != 0.f) s += beta * to_float(static_cast<const CT*>(c)[m * ldc + col]);
    d[m * ldd + col] = from_float<DT>(s);
  }
}

// Launches with programmatic stream serialization: the kernel may begin while the previous one
// in the stream finishes (pdl.cuh).
template <class... Params, class... Args>
cudaError_t launch_pdl(void (*kernel)(Params...), unsigned blocks, cudaStream_t stream, Args... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(kThreads);
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
}

template <int M, class CT, class DT>
cudaError_t Launch(const GemmArgs& g, cudaStream_t stream) {
  const void* c = g.c != nullptr ? g.c : g.d;
  const int64_t ldc = g.c != nullptr ? g.ldc : g.ldd;
  return launch_pdl(gemv_kernel<M, CT, DT, false>, ceil_div(g.n, kCols), stream, static_cast<const bf16*>(g.a),
                    g.lda, static_cast<const bf16*>(g.b), g.ldb, g.n, g.k, c, ldc, g.beta, static_cast<DT*>(g.d),
                    g.ldd, static_cast<bf16*>(nullptr), int64_t{0});
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

template <int M>
cudaError_t LaunchSwiGlu(const GemmArgs& g, __nv_bfloat16* h, int64_t ldh, cudaStream_t stream) {
  return launch_pdl(gemv_kernel<M, bf16, bf16, true>, ceil_div(g.n / 2, 2), stream, static_cast<const bf16*>(g.a),
                    g.lda, static_cast<const bf16*>(g.b), g.ldb, g.n, g.k, static_cast<const void*>(nullptr),
                    int64_t{0}, 0.f, static_cast<bf16*>(g.d), g.ldd, h, ldh);
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

bool gemv_swiglu_applies(const GemmArgs& g) {
  return gemv_applies(g) && g.beta == 0.f && g.d_type == GemmType::kBF16 && g.n % 2 == 0;
}

cudaError_t launch_gemv_swiglu(const GemmArgs& g, __nv_bfloat16* h, int64_t ldh, cudaStream_t stream) {
  if (!gemv_swiglu_applies(g)) return cudaErrorInvalidValue;
  switch (g.m) {
    case 1: return LaunchSwiGlu<1>(g, h, ldh, stream);
    case 2: return LaunchSwiGlu<2>(g, h, ldh, stream);
    case 3: return LaunchSwiGlu<3>(g, h, ldh, stream);
    case 4: return LaunchSwiGlu<4>(g, h, ldh, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace blockd::kernels
