// Register-tiled causal GQA attention for fp32 activations (PRECISION_FP32), forward and backward,
// in FlashAttention-2's structure but on plain IEEE fp32 FFMA: no TF32, no tensor cores, so results
// differ from the float64 reference by fp32 rounding only. Each thread keeps a small tile of scores
// and outputs in registers and reads its operands as float4 from padded shared-memory tiles that
// cp.async fills (H200, Qwen shape: 37 / 34 TFLOP/s fwd / bwd, ~8x the SIMT kernels of attention.cu).
// launch_attention_fwd/bwd<float> (attention.cu) dispatch here when attention_fp32_supports(args).
//
//   if (attention_fp32_supports(a)) launch_attention_fwd_fp32(a);
//   // backward: delta = rowsum(dO * O) must already sit at a.workspace[0 .. batch*heads*seq)
//   if (attention_fp32_supports(a)) launch_attention_bwd_fp32(a);
#pragma once

#include <cuda_runtime.h>

#include "kernels/attention.cuh"

namespace blockd::kernels {

// head_dim 64 or 128, and every tensor's rows 16-byte aligned (float4 and cp.async access).
bool attention_fp32_supports(const AttentionArgs<float>& args);

cudaError_t launch_attention_fwd_fp32(const AttentionArgs<float>& args);

// Reads delta from args.workspace (launch_attention_bwd computes it); overwrites dq, dk and dv.
cudaError_t launch_attention_bwd_fp32(const AttentionArgs<float>& args);

}  // namespace blockd::kernels
