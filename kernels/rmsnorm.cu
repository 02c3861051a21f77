#include <algorithm>

#include "kernels/common.cuh"
#include "kernels/rmsnorm.cuh"

namespace blockd::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kBwdBlocks = 256;  // row groups whose dw partials are reduced afterwards

template <class T>
__global__ void rmsnorm_fwd_kernel(const float* __restrict__ x, const float* __restrict__ w, T* __restrict__ y,
                                   float* __restrict__ rstd, int d, float eps) {
  const int64_t row = blockIdx.x;
  const float* xr = x + row * d;
  float ss = 0.f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) ss += xr[i] * xr[i];
  ss = block_sum(ss);
  const float rs = rsqrtf(ss / d + eps);
  if (threadIdx.x == 0) rstd[row] = rs;
  T* yr = y + row * d;
  for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = from_float<T>((xr[i] * rs) * w[i]);
}

// Each block takes a contiguous range of rows; per-column dw partials live in shared memory (each
// thread owns its columns, so no atomics) and are written to workspace[block][d].
__global__ void rmsnorm_bwd_kernel(const float* __restrict__ dy, const float* __restrict__ x,
                                   const float* __restrict__ w, const float* __restrict__ rstd,
                                   const float* __restrict__ residual, float* __restrict__ dx,
                                   float* __restrict__ partial, int64_t rows, int d) {
  extern __shared__ float dw_acc[];
  for (int i = threadIdx.x; i < d; i += blockDim.x) dw_acc[i] = 0.f;
  const int64_t per_block = (rows + gridDim.x - 1) / gridDim.x;
  const int64_t begin = blockIdx.x * per_block;
  const int64_t end = min(rows, begin + per_block);
  for (int64_t row = begin; row < end; ++row) {
    const float* xr = x + row * d;
    const float* dyr = dy + row * d;
    const float rs = rstd[row];
    float dot = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) dot += dyr[i] * w[i] * (xr[i] * rs);
    const float mean = block_sum(dot) / d;
    float* dxr = dx + row * d;
    const float* res = residual != nullptr ? residual + row * d : nullptr;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
      const float xhat = xr[i] * rs;
      const float g = rs * (dyr[i] * w[i] - xhat * mean);
      dxr[i] = res != nullptr ? res[i] + g : g;
      dw_acc[i] += dyr[i] * xhat;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < d; i += blockDim.x) partial[int64_t(blockIdx.x) * d + i] = dw_acc[i];
}

__global__ void reduce_columns_kernel(const float* __restrict__ partial, int blocks, int d, float* __restrict__ dw,
                                      bool accumulate) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= d) return;
  float s = 0.f;
  for (int b = 0; b < blocks; ++b) s += partial[int64_t(b) * d + i];
  dw[i] = accumulate ? dw[i] + s : s;
}

}  // namespace

template <class T>
cudaError_t launch_rmsnorm_fwd(const float* x, const float* w, T* y, float* rstd, int64_t rows, int d, float eps,
                               cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  rmsnorm_fwd_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(x, w, y, rstd, d, eps);
  return cudaGetLastError();
}

int64_t rmsnorm_bwd_workspace_floats(int d) { return int64_t(kBwdBlocks) * d; }

cudaError_t launch_rmsnorm_bwd(const float* dy, const float* x, const float* w, const float* rstd,
                               const float* residual, float* dx, float* dw, bool accumulate_dw, float* workspace,
                               int64_t rows, int d, cudaStream_t stream) {
  const size_t smem = sizeof(float) * d;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(rmsnorm_bwd_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  const int blocks = static_cast<int>(std::min<int64_t>(kBwdBlocks, std::max<int64_t>(rows, 1)));
  rmsnorm_bwd_kernel<<<blocks, kThreads, smem, stream>>>(dy, x, w, rstd, residual, dx, workspace, rows, d);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  reduce_columns_kernel<<<ceil_div(d, 256), 256, 0, stream>>>(workspace, blocks, d, dw, accumulate_dw);
  return cudaGetLastError();
}

template cudaError_t launch_rmsnorm_fwd<float>(const float*, const float*, float*, float*, int64_t, int, float,
                                               cudaStream_t);
template cudaError_t launch_rmsnorm_fwd<__nv_bfloat16>(const float*, const float*, __nv_bfloat16*, float*, int64_t,
                                                       int, float, cudaStream_t);

}  // namespace blockd::kernels
