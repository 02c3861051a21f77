#include <algorithm>

#include "kernels/common.cuh"
#include "kernels/pdl.cuh"
#include "kernels/swiglu.cuh"

namespace blockd::kernels {
namespace {

__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + expf(-g)); }

// 16 bytes of T: 4 floats or 8 bf16. Rows of gate|up are 16-byte aligned when f % kLanes == 0.
template <class T>
struct Pack {
  static constexpr int kLanes = 16 / sizeof(T);
  T v[kLanes];
};

template <class T>
__device__ __forceinline__ Pack<T> load16(const T* p) {
  Pack<T> out;
  *reinterpret_cast<uint4*>(out.v) = *reinterpret_cast<const uint4*>(p);
  return out;
}

template <class T>
__device__ __forceinline__ void store16(T* p, const Pack<T>& v) {
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(v.v);
}

template <class T>
__global__ void swiglu_fwd_vec_kernel(const T* __restrict__ gu, T* __restrict__ h, int64_t tokens, int64_t f) {
  pdl_launch_dependents();  // the down product may start loading its weights
  constexpr int L = Pack<T>::kLanes;
  const int64_t per_row = f / L, n = tokens * per_row;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / per_row, c = (i % per_row) * L;
    const Pack<T> g = load16(gu + t * 2 * f + c), u = load16(gu + t * 2 * f + f + c);
    Pack<T> out;
#pragma unroll
    for (int j = 0; j < L; ++j) {
      const float gj = to_float(g.v[j]);
      out.v[j] = from_float<T>(gj * sigmoid(gj) * to_float(u.v[j]));
    }
    store16(h + t * f + c, out);
  }
}

template <class T>
__global__ void swiglu_bwd_vec_kernel(const T* __restrict__ dh, const T* __restrict__ gu, T* __restrict__ dgu,
                                      int64_t tokens, int64_t f) {
  constexpr int L = Pack<T>::kLanes;
  const int64_t per_row = f / L, n = tokens * per_row;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / per_row, c = (i % per_row) * L;
    const Pack<T> g = load16(gu + t * 2 * f + c), u = load16(gu + t * 2 * f + f + c), d = load16(dh + t * f + c);
    Pack<T> dg, du;
#pragma unroll
    for (int j = 0; j < L; ++j) {
      const float gj = to_float(g.v[j]), uj = to_float(u.v[j]), dj = to_float(d.v[j]);
      const float s = sigmoid(gj);
      dg.v[j] = from_float<T>(dj * uj * (s * (1.f + gj * (1.f - s))));
      du.v[j] = from_float<T>(dj * gj * s);
    }
    store16(dgu + t * 2 * f + c, dg);
    store16(dgu + t * 2 * f + f + c, du);
  }
}

template <class T>
__global__ void swiglu_fwd_kernel(const T* __restrict__ gu, T* __restrict__ h, int64_t tokens, int64_t f) {
  pdl_launch_dependents();
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

template <class T>
bool Aligned(const void* a, const void* b, int64_t f) {
  return f % Pack<T>::kLanes == 0 && ((reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b)) % 16) == 0;
}

}  // namespace

template <class T>
cudaError_t launch_swiglu_fwd(const T* gu, T* h, int64_t tokens, int64_t f, cudaStream_t stream) {
  if (tokens * f == 0) return cudaSuccess;
  if (Aligned<T>(gu, h, f)) {
    swiglu_fwd_vec_kernel<T><<<GridFor(tokens * f / Pack<T>::kLanes), 256, 0, stream>>>(gu, h, tokens, f);
  } else {
    swiglu_fwd_kernel<T><<<GridFor(tokens * f), 256, 0, stream>>>(gu, h, tokens, f);
  }
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_swiglu_bwd(const T* dh, const T* gu, T* dgu, int64_t tokens, int64_t f, cudaStream_t stream) {
  if (tokens * f == 0) return cudaSuccess;
  if (Aligned<T>(dh, gu, f) && reinterpret_cast<uintptr_t>(dgu) % 16 == 0) {
    swiglu_bwd_vec_kernel<T><<<GridFor(tokens * f / Pack<T>::kLanes), 256, 0, stream>>>(dh, gu, dgu, tokens, f);
  } else {
    swiglu_bwd_kernel<T><<<GridFor(tokens * f), 256, 0, stream>>>(dh, gu, dgu, tokens, f);
  }
  return cudaGetLastError();
}

template cudaError_t launch_swiglu_fwd<float>(const float*, float*, int64_t, int64_t, cudaStream_t);
template cudaError_t launch_swiglu_fwd<__nv_bfloat16>(const __nv_bfloat16*, __nv_bfloat16*, int64_t, int64_t,
                                                      cudaStream_t);
template cudaError_t launch_swiglu_bwd<float>(const float*, const float*, float*, int64_t, int64_t, cudaStream_t);
template cudaError_t launch_swiglu_bwd<__nv_bfloat16>(const __nv_bfloat16*, const __nv_bfloat16*, __nv_bfloat16*,
                                                      int64_t, int64_t, cudaStream_t);

}  // namespace blockd::kernels
