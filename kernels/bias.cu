#include "kernels/bias.cuh"

#include "kernels/common.cuh"
#include "kernels/reduce_rows.cuh"

namespace blockd::kernels {
namespace {

// Row chunks of the first reduction step: a fixed count, so the summation order depends on the
// shape only; 64 chunks of columns x 256 threads keep an H200 busy at the widths of q|k|v.
constexpr int kChunks = 64;

template <class T>
__global__ void add_bias_kernel(T* __restrict__ y, int64_t stride, const float* __restrict__ bias, int64_t rows,
                                int width) {
  const int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (idx >= rows * width) return;
  const int64_t r = idx / width;
  const int j = static_cast<int>(idx % width);
  T* p = y + r * stride + j;
  *p = from_float<T>(to_float(*p) + bias[j]);
}

// partial[chunk * width + j] = sum of dy[r, j] over the chunk's rows; adjacent threads read
// adjacent columns, so every row is read coalesced.
template <class T>
__global__ void bias_partial_kernel(const T* __restrict__ dy, int64_t stride, int64_t rows, int width,
                                    int64_t rows_per_chunk, float* __restrict__ partial) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= width) return;
  const int64_t begin = blockIdx.y * rows_per_chunk;
  const int64_t end = begin + rows_per_chunk < rows ? begin + rows_per_chunk : rows;
  float s = 0.f;
  for (int64_t r = begin; r < end; ++r) s += to_float(dy[r * stride + j]);
  partial[int64_t(blockIdx.y) * width + j] = s;
}

}  // namespace

template <class T>
cudaError_t launch_add_bias(T* y, int64_t stride, const float* bias, int64_t rows, int width, cudaStream_t stream) {
  if (rows == 0 || width == 0) return cudaSuccess;
  add_bias_kernel<T><<<ceil_div(rows * width, 256), 256, 0, stream>>>(y, stride, bias, rows, width);
  return cudaGetLastError();
}

int64_t bias_bwd_workspace_floats(int width) { return int64_t(kChunks) * width; }

template <class T>
cudaError_t launch_bias_bwd(const T* dy, int64_t stride, int64_t rows, int width, float* dbias, bool accumulate,
                            float* workspace, cudaStream_t stream) {
  if (width == 0) return cudaSuccess;
  // Empty chunks (rows < kChunks) write zeros, so the second step always adds kChunks rows.
  const int64_t rows_per_chunk = (rows + kChunks - 1) / kChunks;
  bias_partial_kernel<T><<<dim3(ceil_div(width, 256), kChunks), 256, 0, stream>>>(dy, stride, rows, width,
                                                                                       rows_per_chunk, workspace);
  reduce_rows_kernel<<<ceil_div(width, 256), 256, 0, stream>>>(workspace, kChunks, width, dbias, accumulate);
  return cudaGetLastError();
}

template cudaError_t launch_add_bias<float>(float*, int64_t, const float*, int64_t, int, cudaStream_t);
template cudaError_t launch_add_bias<__nv_bfloat16>(__nv_bfloat16*, int64_t, const float*, int64_t, int,
                                                    cudaStream_t);
template cudaError_t launch_bias_bwd<float>(const float*, int64_t, int64_t, int, float*, bool, float*, cudaStream_t);
template cudaError_t launch_bias_bwd<__nv_bfloat16>(const __nv_bfloat16*, int64_t, int64_t, int, float*, bool, float*,
                                                    cudaStream_t);

}  // namespace blockd::kernels
