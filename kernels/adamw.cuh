// AdamW over all parameters of a block in one launch, and the sum of squares of its gradients.
//
// Parameters are one flat fp32 buffer with the matrices first, so weight decay applies to
// [0, decay_end). Hyperparameters are read from a device struct (written before the launch), so
// a step can be captured in a CUDA graph and replayed with new values. The arithmetic is the
// sequence of fp32 operations of torch.optim.AdamW's single-tensor path, as the CPU backend does.
//   AdamWDeviceParams* hp = ...;  // cudaMemcpyAsync'd from MakeAdamWParams(...)
//   launch_adamw(p, g, m, v, p_bf16, n, hp, stream);
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace blockd::kernels {

struct AdamWDeviceParams {
  float decay;         // 1 - lr * weight_decay, for elements below decay_end
  float beta1, one_minus_beta1;
  float beta2, one_minus_beta2;
  float bias2_sqrt;    // sqrt(1 - beta2^step)
  float neg_step_size; // -lr / (1 - beta1^step)
  float eps;
  float grad_scale;    // global-norm clipping factor (1: none)
  int64_t decay_end;   // elements [0, decay_end) are decayed
};

// Host-side: the parameters of step `step` (1-based), computed in double and rounded like PyTorch.
AdamWDeviceParams MakeAdamWParams(double lr, double beta1, double beta2, double eps, double weight_decay,
                                  int64_t step, float grad_scale, int64_t decay_end);

// Updates p, m, v in place from g; refreshes p_bf16 (when not null) with the new weights.
cudaError_t launch_adamw(float* p, const float* g, float* m, float* v, __nv_bfloat16* p_bf16, int64_t n,
                         const AdamWDeviceParams* params, cudaStream_t stream);

// Workspace doubles launch_sum_squares needs.
int sum_squares_workspace_doubles();
// *out = sum_i g[i]^2 in double, deterministically (fixed grid, fixed reduction order).
cudaError_t launch_sum_squares(const float* g, int64_t n, double* workspace, double* out, cudaStream_t stream);

}  // namespace blockd::kernels
