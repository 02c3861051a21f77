// SwiGLU on the fused gate|up projection: each row of gu is [gate (f) | up (f)].
//   h = silu(gate) * up;   dgate = dh * up * silu'(gate),  dup = dh * silu(gate)
//   launch_swiglu_fwd(gu, h, tokens, f, stream);
//   launch_swiglu_bwd(dh, gu, dgu, tokens, f, stream);
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace blockd::kernels {

template <class T>
cudaError_t launch_swiglu_fwd(const T* gu, T* h, int64_t tokens, int64_t f, cudaStream_t stream);
template <class T>
cudaError_t launch_swiglu_bwd(const T* dh, const T* gu, T* dgu, int64_t tokens, int64_t f, cudaStream_t stream);

}  // namespace blockd::kernels
