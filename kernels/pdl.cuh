// Programmatic dependent launch (sm_90): a kernel launched with PDL (launch_pdl in gemv.cu) may
// start while the kernel before it in the stream still runs, once every block of that one has
// called pdl_launch_dependents; it reads nothing the earlier kernel writes before pdl_wait, which
// returns when the earlier kernel has finished and its writes are visible. Weight-streaming
// kernels load their weights (never written by a step) before pdl_wait. Both are no-ops without
// a dependent PDL launch, and compile to nothing below sm_90.
#pragma once

namespace blockd::kernels {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::);
#endif
}

}  // namespace blockd::kernels
