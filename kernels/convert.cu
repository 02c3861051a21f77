#include <cuda_fp16.h>

#include <algorithm>

#include "kernels/common.cuh"
#include "kernels/convert.cuh"

namespace blockd::kernels {
namespace {

__device__ __forceinline__ float load_wire(const void* src, int type, int64_t i) {
  if (type == kWireBFloat16) return __bfloat162float(static_cast<const __nv_bfloat16*>(src)[i]);
  if (type == kWireFloat16) return __half2float(static_cast<const __half*>(src)[i]);
  return static_cast<const float*>(src)[i];
}

__global__ void to_float_kernel(int type, const void* __restrict__ src, float* __restrict__ dst, int64_t n,
                                unsigned int* nonfinite) {
  unsigned int bad = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float v = load_wire(src, type, i);
    dst[i] = v;
    bad += !isfinite(v);
  }
  if (nonfinite != nullptr && __syncthreads_or(bad != 0)) {
    if (bad) atomicAdd(nonfinite, bad);
  }
}

__global__ void from_float_kernel(const float* __restrict__ src, int type, void* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float v = src[i];
    if (type == kWireBFloat16) {
      static_cast<__nv_bfloat16*>(dst)[i] = __float2bfloat16_rn(v);
    } else if (type == kWireFloat16) {
      static_cast<__half*>(dst)[i] = __float2half_rn(v);
    } else {
      static_cast<float*>(dst)[i] = v;
    }
  }
}

__global__ void float_to_bf16_kernel(const float* __restrict__ src, __nv_bfloat16* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    dst[i] = __float2bfloat16_rn(src[i]);
  }
}

int GridFor(int64_t n) { return static_cast<int>(std::min<int64_t>((n + 255) / 256, 4096)); }

}  // namespace

cudaError_t launch_to_float(WireType src_type, const void* src, float* dst, int64_t n, unsigned int* nonfinite,
                            cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  to_float_kernel<<<GridFor(n), 256, 0, stream>>>(src_type, src, dst, n, nonfinite);
  return cudaGetLastError();
}

cudaError_t launch_from_float(const float* src, WireType dst_type, void* dst, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  from_float_kernel<<<GridFor(n), 256, 0, stream>>>(src, dst_type, dst, n);
  return cudaGetLastError();
}

cudaError_t launch_float_to_bf16(const float* src, __nv_bfloat16* dst, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  float_to_bf16_kernel<<<GridFor(n), 256, 0, stream>>>(src, dst, n);
  return cudaGetLastError();
}

}  // namespace blockd::kernels
