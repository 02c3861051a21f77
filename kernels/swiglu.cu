#include <algorithm>

#include "kernels/common.cuh"
#include "kernels/swiglu.cuh"

namespace blockd::kernels {
namespace {

__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + expf(-g)); }

template <class T>
__global__ void swiglu_fwd_kernel(const T* __restrict__ gu, T* __restrict__ h, int64_t tokens, int64_t f) {
  const int64_t n = tokens * f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / f, c = i % f;
    const float g = to_float(gu[t * 2 * f + c]);
    const float u = to_float(gu[t * 2 * f + f + c]);
    h[i] = from_float<T>(g * sigmoid(g) * u);
  }
}

template <class T>
__global__ void swiglu_bwd_kernel(const T* __restrict__ dh, const T* __restrict__ gu, T* __restrict__ dgu,
                                  int64_t tokens, int64_t f) {
  const int64_t n = tokens * f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / f, c = i % f;
    const float g = to_float(gu[t * 2 * f + c]);
    const float u = to_float(gu[t * 2 * f + f + c]);
    const float s = sigmoid(g);
    const float d = to_float(dh[i]);
    dgu[t * 2 * f + c] = from_float<T>(d * u * (s * (1.f + g * (1.f - s))));
    dgu[t * 2 * f + f + c] = from_float<T>(d * g * s);
  }
}

int GridFor(int64_t n) { return static_cast<int>(std::min<int64_t>((n + 255) / 256, 65536)); }

}  // namespace

template <class T>
cudaError_t launch_swiglu_fwd(const T* gu, T* h, int64_t tokens, int64_t f, cudaStream_t stream) {
  if (tokens * f == 0) return cudaSuccess;
  swiglu_fwd_kernel<T><<<GridFor(tokens * f), 256, 0, stream>>>(gu, h, tokens, f);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_swiglu_bwd(const T* dh, const T* gu, T* dgu, int64_t tokens, int64_t f, cudaStream_t stream) {
  if (tokens * f == 0) return cudaSuccess;
  swiglu_bwd_kernel<T><<<GridFor(tokens * f), 256, 0, stream>>>(dh, gu, dgu, tokens, f);
  return cudaGetLastError();
}

template cudaError_t launch_swiglu_fwd<float>(const float*, float*, int64_t, int64_t, cudaStream_t);
template cudaError_t launch_swiglu_fwd<__nv_bfloat16>(const __nv_bfloat16*, __nv_bfloat16*, int64_t, int64_t,
                                                      cudaStream_t);
template cudaError_t launch_swiglu_bwd<float>(const float*, const float*, float*, int64_t, int64_t, cudaStream_t);
template cudaError_t launch_swiglu_bwd<__nv_bfloat16>(const __nv_bfloat16*, const __nv_bfloat16*, __nv_bfloat16*,
                                                      int64_t, int64_t, cudaStream_t);

}  // namespace blockd::kernels
