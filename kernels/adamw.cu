#include <algorithm>
#include <cmath>

#include "kernels/adamw.cuh"
#include "kernels/common.cuh"

namespace blockd::kernels {
namespace {

constexpr int kReduceBlocks = 528;

__global__ void adamw_kernel(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                             float* __restrict__ v, __nv_bfloat16* __restrict__ p_bf16, int64_t n,
                             const AdamWDeviceParams* __restrict__ hp_ptr) {
  const AdamWDeviceParams hp = *hp_ptr;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float gi = g[i] * hp.grad_scale;
    float pi = p[i];
    if (i < hp.decay_end) pi *= hp.decay;
    const float mi = m[i] * hp.beta1 + gi * hp.one_minus_beta1;
    const float vi = v[i] * hp.beta2 + hp.one_minus_beta2 * gi * gi;
    const float denom = sqrtf(vi) / hp.bias2_sqrt + hp.eps;
    pi += hp.neg_step_size * (mi / denom);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if (p_bf16 != nullptr) p_bf16[i] = __float2bfloat16_rn(pi);
  }
}

__global__ void sum_squares_kernel(const float* __restrict__ g, int64_t n, double* __restrict__ partial) {
  double s = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const double x = g[i];
    s += x * x;
  }
  s = block_sum(s);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

__global__ void sum_partials_kernel(const double* __restrict__ partial, int count, double* __restrict__ out) {
  double s = 0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) s += partial[i];
  s = block_sum(s);
  if (threadIdx.x == 0) *out = s;
}

}  // namespace

AdamWDeviceParams MakeAdamWParams(double lr, double beta1, double beta2, double eps, double weight_decay,
                                  int64_t step, float grad_scale, int64_t decay_end) {
  AdamWDeviceParams hp;
  hp.decay = static_cast<float>(1.0 - lr * weight_decay);
  hp.beta1 = static_cast<float>(beta1);
  hp.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  hp.beta2 = static_cast<float>(beta2);
  hp.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  hp.bias2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))));
  hp.neg_step_size = static_cast<float>(-lr / (1.0 - std::pow(beta1, static_cast<double>(step))));
  hp.eps = static_cast<float>(eps);
  hp.grad_scale = grad_scale;
  hp.decay_end = decay_end;
  return hp;
}

cudaError_t launch_adamw(float* p, const float* g, float* m, float* v, __nv_bfloat16* p_bf16, int64_t n,
                         const AdamWDeviceParams* params, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int grid = static_cast<int>(std::min<int64_t>((n + 255) / 256, 132 * 16));
  adamw_kernel<<<grid, 256, 0, stream>>>(p, g, m, v, p_bf16, n, params);
  return cudaGetLastError();
}

int sum_squares_workspace_doubles() { return kReduceBlocks; }

cudaError_t launch_sum_squares(const float* g, int64_t n, double* workspace, double* out, cudaStream_t stream) {
  sum_squares_kernel<<<kReduceBlocks, 256, 0, stream>>>(g, n, workspace);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  sum_partials_kernel<<<1, 512, 0, stream>>>(workspace, kReduceBlocks, out);
  return cudaGetLastError();
}

}  // namespace blockd::kernels
