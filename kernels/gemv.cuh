// Skinny bf16 products D [m, n] = A [m, k] B^T (+ C) for m <= kGemvMaxRows: a decode step's
// nn.Linear layers at batch 1 to 4, where the product is a stream over the weights B [n, k] and
// cuBLASLt's split-K GEMMs (plus their reduce kernels) read them at 50-85% of HBM bandwidth. Each
// thread block takes 4 weight rows; its 8 warps split k, every lane reading 16 bytes of each row
// per step (the next step's in flight during this one's math), and reduce through shared memory;
// fp32 accumulation. Launched with programmatic dependent launch (pdl.cuh): a product starts
// loading its weights while the kernel before it finishes. GemmContext::Run sends the products
// that qualify here (gemv_applies); the MLP's gate|up product may also take launch_gemv_swiglu,
// which writes h = silu(gate) * up beside gate|up, as swiglu.cu would from them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace blockd::kernels {

struct GemmArgs;

constexpr int64_t kGemvMaxRows = 4;

// bf16 A and B, A row-major and B^T (nn.Linear's x W^T), alpha 1, beta 0 or 1, k and the leading
// dimensions multiples of 8 elements and A and B 16-byte aligned.
bool gemv_applies(const GemmArgs& g);
cudaError_t launch_gemv(const GemmArgs& g, cudaStream_t stream);

// g: the gate|up product (n = 2 f rows: f gate rows, then f up rows), beta 0, bf16 D [m, 2 f];
// also writes h [m, f] (row stride ldh) = silu(gate) * up of D's bf16 values.
bool gemv_swiglu_applies(const GemmArgs& g);
cudaError_t launch_gemv_swiglu(const GemmArgs& g, __nv_bfloat16* h, int64_t ldh, cudaStream_t stream);

}  // namespace blockd::kernels
