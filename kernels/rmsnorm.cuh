// RMSNorm over rows of an fp32 activation, forward and backward. Statistics are fp32.
//   y = x * rstd * w,  rstd = rsqrt(mean(x^2) + eps)            (y stored as T: float or bf16)
//   dx = residual + rstd * (dy*w - xhat * mean(dy*w*xhat)),  dw (+)= sum_rows dy * xhat
//
//   launch_rmsnorm_fwd(x, w, n1, rstd1, rows, d, eps, stream);
//   launch_rmsnorm_bwd(dn1, x, w, rstd1, /*residual=*/dr1, dx, nullptr, dw, /*accumulate=*/true, ws, rows, d, s);
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace blockd::kernels {

template <class T>
cudaError_t launch_rmsnorm_fwd(const float* x, const float* w, T* y, float* rstd, int64_t rows, int d, float eps,
                               cudaStream_t stream);

// Workspace floats launch_rmsnorm_bwd needs for `d` columns.
int64_t rmsnorm_bwd_workspace_floats(int d);

// dx = residual + (norm backward); residual may be null; dx_bf16 (may be null) receives a bf16
// copy of dx for the matrix products that read it next. dw is overwritten, or added to when
// `accumulate_dw`. `workspace` holds rmsnorm_bwd_workspace_floats(d) floats.
cudaError_t launch_rmsnorm_bwd(const float* dy, const float* x, const float* w, const float* rstd,
                               const float* residual, float* dx, __nv_bfloat16* dx_bf16, float* dw,
                               bool accumulate_dw, float* workspace, int64_t rows, int d, cudaStream_t stream);

}  // namespace blockd::kernels
