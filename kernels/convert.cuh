// Element type conversions on the device, for activations crossing the wire and bf16 weight copies.
//   launch_to_float(kWireBFloat16, staging, x, n, d_nonfinite, stream);  // + counts non-finite inputs
//   launch_from_float(y, kWireBFloat16, staging, n, stream);            // round to nearest even
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace blockd::kernels {

enum WireType : int { kWireFloat32 = 0, kWireBFloat16 = 1, kWireFloat16 = 2 };

// dst[i] = float(src[i]); *nonfinite (if not null) is incremented once per NaN/inf element.
cudaError_t launch_to_float(WireType src_type, const void* src, float* dst, int64_t n, unsigned int* nonfinite,
                            cudaStream_t stream);
cudaError_t launch_from_float(const float* src, WireType dst_type, void* dst, int64_t n, cudaStream_t stream);
cudaError_t launch_float_to_bf16(const float* src, __nv_bfloat16* dst, int64_t n, cudaStream_t stream);

}  // namespace blockd::kernels
