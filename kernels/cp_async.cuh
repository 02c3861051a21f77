// cp.async (sm_80+) global -> shared copies that run while the threads compute: issue, commit a
// group, later wait until at most N groups are still in flight, then __syncthreads before reading
// what other threads copied. A copy with valid == false writes zeros and reads nothing (src must
// still be a mapped address).
//
//   cp_async16(smem_u32(dst), src, in_range);
//   cp_async_commit();
//   ...                       // math on the previous stage
//   cp_async_wait<0>();
//   __syncthreads();
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace blockd::kernels {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16 bytes, bypassing L1 (streamed data): src and dst 16-byte aligned.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
// 4 bytes (cp.async.cg takes only 16): src and dst 4-byte aligned.
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

}  // namespace blockd::kernels
