// A linear layer's bias (Qwen2's q/k/v projections): added to the product's output, and its
// gradient, the column sums of the output gradient, reduced in two deterministic steps.
//   launch_add_bias<T>(qkv, qkv_width, bias, tokens, qkv_width, stream);          // forward
//   launch_bias_bwd<T>(dqkv, qkv_width, tokens, qkv_width, dbias, accumulate,
//                      workspace, stream);  // workspace: bias_bwd_workspace_floats(width)
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace blockd::kernels {

// y[r * stride + j] += bias[j] for r < rows, j < width; the sum in fp32, stored as T.
template <class T>
cudaError_t launch_add_bias(T* y, int64_t stride, const float* bias, int64_t rows, int width, cudaStream_t stream);

int64_t bias_bwd_workspace_floats(int width);

// dbias[j] (= or +=, with accumulate) sum over r < rows of dy[r * stride + j], in fp32, in a fixed
// order whatever the launch (bitwise reproducible).
template <class T>
cudaError_t launch_bias_bwd(const T* dy, int64_t stride, int64_t rows, int width, float* dbias, bool accumulate,
                            float* workspace, cudaStream_t stream);

}  // namespace blockd::kernels
