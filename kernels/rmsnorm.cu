#include <algorithm>

#include "kernels/common.cuh"
#include "kernels/pdl.cuh"
#include "kernels/reduce_rows.cuh"
#include "kernels/rmsnorm.cuh"

namespace blockd::kernels {
namespace {

// One warp per row; rows stay in L1 between the two passes over them. Loads are float4 when
// rows are 16-byte aligned (d % 4 == 0), which every real hidden size is.
constexpr int kWarpsPerBlock = 8;
constexpr int kDwRowChunks = 64;  // row groups whose dw partials are reduced afterwards
// Below this many rows (a decode step's) the forward gives each row a whole block: a warp alone
// walks a 4096-wide row in 32 dependent steps, a block in 4.
constexpr int64_t kBlockRowsBelow = 1024;

template <class T, bool kVec, bool kBlockRow>
__global__ void rmsnorm_fwd_kernel(const float* __restrict__ x, const float* __restrict__ w, T* __restrict__ y,
                                   float* __restrict__ rstd, int64_t rows, int d, float eps) {
  pdl_launch_dependents();  // a decode step's next product may start loading its weights
  const int t = kBlockRow ? threadIdx.x : threadIdx.x & 31, step = kBlockRow ? blockDim.x : 32;
  const int64_t row = kBlockRow ? blockIdx.x : blockIdx.x * int64_t(kWarpsPerBlock) + (threadIdx.x >> 5);
  if (row >= rows) return;  // block-uniform when kBlockRow (block_sum below syncs the block)
  const float* xr = x + row * d;
  float ss = 0.f;
  if constexpr (kVec) {
    for (int i = t * 4; i < d; i += 4 * step) {
      const float4 v = *reinterpret_cast<const float4*>(xr + i);
      ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
  } else {
    for (int i = t; i < d; i += step) ss += xr[i] * xr[i];
  }
  const float rs = rsqrtf((kBlockRow ? block_sum(ss) : warp_sum(ss)) / d + eps);
  if (t == 0) rstd[row] = rs;
  T* yr = y + row * d;
  if constexpr (kVec) {
    for (int i = t * 4; i < d; i += 4 * step) {
      const float4 v = *reinterpret_cast<const float4*>(xr + i);
      const float4 g = *reinterpret_cast<const float4*>(w + i);
      yr[i] = from_float<T>((v.x * rs) * g.x);
      yr[i + 1] = from_float<T>((v.y * rs) * g.y);
      yr[i + 2] = from_float<T>((v.z * rs) * g.z);
      yr[i + 3] = from_float<T>((v.w * rs) * g.w);
    }
  } else {
    for (int i = t; i < d; i += step) yr[i] = from_float<T>((xr[i] * rs) * w[i]);
  }
}

// dx = residual + rstd * (dy*w - xhat * mean(dy*w*xhat)), one warp per row.
template <bool kVec>
__global__ void rmsnorm_bwd_dx_kernel(const float* __restrict__ dy, const float* __restrict__ x,
                                      const float* __restrict__ w, const float* __restrict__ rstd,
                                      const float* __restrict__ residual, float* __restrict__ dx,
                                      __nv_bfloat16* __restrict__ dx_bf16, int64_t rows, int d) {
  const int lane = threadIdx.x & 31;
  const int64_t row = blockIdx.x * int64_t(kWarpsPerBlock) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const float* xr = x + row * d;
  const float* dyr = dy + row * d;
  const float rs = rstd[row];
  float dot = 0.f;
  if constexpr (kVec) {
    for (int i = lane * 4; i < d; i += 128) {
      const float4 a = *reinterpret_cast<const float4*>(dyr + i);
      const float4 b = *reinterpret_cast<const float4*>(xr + i);
      const float4 g = *reinterpret_cast<const float4*>(w + i);
      dot += a.x * g.x * (b.x * rs) + a.y * g.y * (b.y * rs) + a.z * g.z * (b.z * rs) + a.w * g.w * (b.w * rs);
    }
  } else {
    for (int i = lane; i < d; i += 32) dot += dyr[i] * w[i] * (xr[i] * rs);
  }
  const float mean = warp_sum(dot) / d;
  float* dxr = dx + row * d;
  const float* res = residual != nullptr ? residual + row * d : nullptr;
  __nv_bfloat16* dxh = dx_bf16 != nullptr ? dx_bf16 + row * d : nullptr;
  auto one = [&](int i, float dyv, float xv, float wv) {
    const float g = rs * (dyv * wv - (xv * rs) * mean);
    const float out = res != nullptr ? res[i] + g : g;
    dxr[i] = out;
    if (dxh != nullptr) dxh[i] = __float2bfloat16_rn(out);
  };
  if constexpr (kVec) {
    for (int i = lane * 4; i < d; i += 128) {
      const float4 a = *reinterpret_cast<const float4*>(dyr + i);
      const float4 b = *reinterpret_cast<const float4*>(xr + i);
      const float4 g = *reinterpret_cast<const float4*>(w + i);
      one(i, a.x, b.x, g.x);
      one(i + 1, a.y, b.y, g.y);
      one(i + 2, a.z, b.z, g.z);
      one(i + 3, a.w, b.w, g.w);
    }
  } else {
    for (int i = lane; i < d; i += 32) one(i, dyr[i], xr[i], w[i]);
  }
}

// partial[chunk][c] = sum over the chunk's rows of dy[r][c] * x[r][c] * rstd[r]: threads walk
// columns, so every row read is coalesced.
__global__ void rmsnorm_dw_partial_kernel(const float* __restrict__ dy, const float* __restrict__ x,
                                          const float* __restrict__ rstd, float* __restrict__ partial, int64_t rows,
                                          int d) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= d) return;
  const int64_t per_chunk = (rows + gridDim.y - 1) / gridDim.y;
  const int64_t begin = blockIdx.y * per_chunk, end = min(rows, begin + per_chunk);
  float s = 0.f;
  for (int64_t r = begin; r < end; ++r) s += dy[r * d + c] * (x[r * d + c] * rstd[r]);
  partial[int64_t(blockIdx.y) * d + c] = s;
}

}  // namespace

template <class T>
cudaError_t launch_rmsnorm_fwd(const float* x, const float* w, T* y, float* rstd, int64_t rows, int d, float eps,
                               cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  constexpr int kThreads = 32 * kWarpsPerBlock;
  if (rows < kBlockRowsBelow) {
    const unsigned blocks = static_cast<unsigned>(rows);
    if (d % 4 == 0) {
      rmsnorm_fwd_kernel<T, true, true><<<blocks, kThreads, 0, stream>>>(x, w, y, rstd, rows, d, eps);
    } else {
      rmsnorm_fwd_kernel<T, false, true><<<blocks, kThreads, 0, stream>>>(x, w, y, rstd, rows, d, eps);
    }
    return cudaGetLastError();
  }
  const int blocks = ceil_div(rows, kWarpsPerBlock);
  if (d % 4 == 0) {
    rmsnorm_fwd_kernel<T, true, false><<<blocks, kThreads, 0, stream>>>(x, w, y, rstd, rows, d, eps);
  } else {
    rmsnorm_fwd_kernel<T, false, false><<<blocks, kThreads, 0, stream>>>(x, w, y, rstd, rows, d, eps);
  }
  return cudaGetLastError();
}

int64_t rmsnorm_bwd_workspace_floats(int d) { return int64_t(kDwRowChunks) * d; }

cudaError_t launch_rmsnorm_bwd(const float* dy, const float* x, const float* w, const float* rstd,
                               const float* residual, float* dx, __nv_bfloat16* dx_bf16, float* dw,
                               bool accumulate_dw, float* workspace, int64_t rows, int d, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int blocks = ceil_div(rows, kWarpsPerBlock);
  if (d % 4 == 0) {
    rmsnorm_bwd_dx_kernel<true><<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(dy, x, w, rstd, residual, dx, dx_bf16,
                                                                             rows, d);
  } else {
    rmsnorm_bwd_dx_kernel<false><<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(dy, x, w, rstd, residual, dx, dx_bf16,
                                                                              rows, d);
  }
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  const int chunks = static_cast<int>(std::min<int64_t>(kDwRowChunks, rows));
  rmsnorm_dw_partial_kernel<<<dim3(ceil_div(d, 256), chunks), 256, 0, stream>>>(dy, x, rstd, workspace, rows, d);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  reduce_rows_kernel<<<ceil_div(d, 256), 256, 0, stream>>>(workspace, chunks, d, dw, accumulate_dw);
  return cudaGetLastError();
}

template cudaError_t launch_rmsnorm_fwd<float>(const float*, const float*, float*, float*, int64_t, int, float,
                                               cudaStream_t);
template cudaError_t launch_rmsnorm_fwd<__nv_bfloat16>(const float*, const float*, __nv_bfloat16*, float*, int64_t,
                                                       int, float, cudaStream_t);

}  // namespace blockd::kernels
