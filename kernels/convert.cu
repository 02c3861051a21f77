#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "kernels/common.cuh"
#include "kernels/convert.cuh"

namespace blockd::kernels {
namespace {

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// The 2-byte wire types (bf16, fp16) to and from fp32, by their bits. They move 8 values per
// thread and access (16 bytes of wire, 32 of fp32) where both buffers are 16-byte aligned, as the
// transfer buffers are; the rest one value at a time.
__device__ __forceinline__ float half_bits_to_float(uint16_t bits, int type) {
  if (type == kWireBFloat16) return __uint_as_float(static_cast<uint32_t>(bits) << 16);
  return __half2float(__ushort_as_half(bits));
}

__device__ __forceinline__ uint16_t float_to_half_bits(float v, int type) {
  if (type == kWireBFloat16) return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  return __half_as_ushort(__float2half_rn(v));
}

__device__ __forceinline__ float load_wire(const void* src, int type, int64_t i) {
  if (type == kWireFloat32) return static_cast<const float*>(src)[i];
  return half_bits_to_float(static_cast<const uint16_t*>(src)[i], type);
}

__global__ void to_float_kernel(int type, const void* __restrict__ src, float* __restrict__ dst, int64_t n,
                                unsigned int* nonfinite) {
  unsigned int bad = 0;
  const int64_t first = blockIdx.x * int64_t(blockDim.x) + threadIdx.x, stride = int64_t(gridDim.x) * blockDim.x;
  int64_t scalar_from = 0;
  if (type != kWireFloat32 && aligned16(src) && aligned16(dst)) {
    const int64_t vectors = n / 8;
    for (int64_t v = first; v < vectors; v += stride) {
      const uint4 w = static_cast<const uint4*>(src)[v];
      const uint32_t words[4] = {w.x, w.y, w.z, w.w};
      float f[8];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        f[2 * k] = half_bits_to_float(static_cast<uint16_t>(words[k] & 0xffff), type);
        f[2 * k + 1] = half_bits_to_float(static_cast<uint16_t>(words[k] >> 16), type);
      }
#pragma unroll
      for (int k = 0; k < 8; ++k) bad += !isfinite(f[k]);
      float4* out = reinterpret_cast<float4*>(dst) + 2 * v;
      out[0] = make_float4(f[0], f[1], f[2], f[3]);
      out[1] = make_float4(f[4], f[5], f[6], f[7]);
    }
    scalar_from = vectors * 8;
  }
  for (int64_t i = scalar_from + first; i < n; i += stride) {
    const float v = load_wire(src, type, i);
    dst[i] = v;
    bad += !isfinite(v);
  }
  if (nonfinite != nullptr && __syncthreads_or(bad != 0)) {
    if (bad) atomicAdd(nonfinite, bad);
  }
}

__global__ void from_float_kernel(const float* __restrict__ src, int type, void* __restrict__ dst, int64_t n) {
  const int64_t first = blockIdx.x * int64_t(blockDim.x) + threadIdx.x, stride = int64_t(gridDim.x) * blockDim.x;
  int64_t scalar_from = 0;
  if (type != kWireFloat32 && aligned16(src) && aligned16(dst)) {
    const int64_t vectors = n / 8;
    for (int64_t v = first; v < vectors; v += stride) {
      const float4 a = reinterpret_cast<const float4*>(src)[2 * v];
      const float4 b = reinterpret_cast<const float4*>(src)[2 * v + 1];
      const float f[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
      uint32_t words[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        words[k] = static_cast<uint32_t>(float_to_half_bits(f[2 * k], type)) |
                   (static_cast<uint32_t>(float_to_half_bits(f[2 * k + 1], type)) << 16);
      }
      static_cast<uint4*>(dst)[v] = make_uint4(words[0], words[1], words[2], words[3]);
    }
    scalar_from = vectors * 8;
  }
  for (int64_t i = scalar_from + first; i < n; i += stride) {
    if (type == kWireFloat32) {
      static_cast<float*>(dst)[i] = src[i];
    } else {
      static_cast<uint16_t*>(dst)[i] = float_to_half_bits(src[i], type);
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
