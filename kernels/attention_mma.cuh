// Tensor-core (mma.sync, bf16) attention kernels for head_dim 64 and 128; see attention_mma.cu.
// launch_attention_fwd/bwd (attention.cuh) dispatch here for bf16 activations of those head dims.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/attention.cuh"

namespace blockd::kernels {

bool attention_mma_supports(int head_dim);

cudaError_t launch_attention_fwd_mma(const AttentionArgs<__nv_bfloat16>& args);

// The workspace's first batch * heads * seq floats must hold delta = rowsum(dO * O) already
// ([batch, heads, seq]); the rest is the fp32 dV accumulator [tokens, kv_heads * head_dim] that
// grouped-query attention (heads > kv_heads) adds into, as it does into dk, with atomics before dv
// is converted at the end. dq is zeroed here and accumulated with atomic adds.
cudaError_t launch_attention_bwd_mma(const AttentionArgs<__nv_bfloat16>& args);

}  // namespace blockd::kernels
