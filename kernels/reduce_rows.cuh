// The second step of a weight gradient reduced in two (rmsnorm.cu's dw, rope.cu's QK-norm dw):
// the first kernel writes one row of partial sums per block, this one adds the rows up.
// Include it only where it is launched: the kernel has internal linkage, one copy per file.
//   reduce_rows_kernel<<<ceil_div(d, 256), 256, 0, stream>>>(partial, rows, d, dw, accumulate);
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace blockd::kernels {
namespace {

// dw[i] = sum over r < rows of partial[r * d + i], added to dw[i] when `accumulate`.
__global__ void reduce_rows_kernel(const float* __restrict__ partial, int64_t rows, int d, float* __restrict__ dw,
                                   bool accumulate) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= d) return;
  float s = 0.f;
  for (int64_t r = 0; r < rows; ++r) s += partial[r * d + i];
  dw[i] = accumulate ? dw[i] + s : s;
}

}  // namespace
}  // namespace blockd::kernels
