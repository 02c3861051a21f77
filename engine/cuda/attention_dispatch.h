// Which attention a CUDA block runs, and the calls that run it: cuDNN's fused flash attention
// (kernels/cudnn_attention.h; bf16, about 2.5x the native kernels forward and 2x backward on an
// H200) or blockd's own kernels (kernels/attention.cuh). Both keep the same lse (fp32
// [batch, heads, seq], natural log), so a forward of one and a backward of the other agree.
//
// --attention (CudaBackendOptions::attention) decides per block, once, at creation:
//   native  blockd's kernels.
//   auto    cuDNN for a bf16 block when cuDNN loaded on the device and builds plans for the block's
//           largest shape (max_batch_size x max_seq_len), else blockd's kernels; a later call whose
//           shape cuDNN refuses runs blockd's kernels (logged once per shape).
//   cudnn   cuDNN for every bf16 block, or CreateBlock fails; a call whose shape cuDNN refuses fails
//           with UNIMPLEMENTED rather than silently running something else.
// FP32 and TF32 blocks always run blockd's kernels (cuDNN's fused attention is bf16/fp16 only).
//
// cuDNN's workspace (its own plus the backward's fp32 dQ accumulator, ~ batch*heads*seq*head_dim*4
// bytes, ~140 MB for a Llama-3-8B block at 4k tokens) comes from the device's stream-ordered pool
// for each call, like the backward's other temporaries: the blocks on a device share that memory
// instead of each keeping its own, and a warm pool hands it out without a cudaMalloc.
//
//   ASSIGN_OR_RETURN(AttentionRunner attn, AttentionRunner::Create(mode, spec, dev));
//   RETURN_IF_ERROR(attn.Forward(args));                 // o, lse
//   ASSIGN_OR_RETURN(QkGrads g, attn.Backward(args));    // dv into args.dv; dq, dk in g
#pragma once

#include <cuda_bf16.h>

#include <cstddef>
#include <cstdint>
#include <set>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/device.h"
#include "kernels/attention.cuh"
#include "kernels/cudnn_attention.h"

namespace blockd::cuda {

// Loads cuDNN and creates the device's handle (dev->cudnn) unless mode is kNative. Where cuDNN
// cannot be used, kCudnn fails (FAILED_PRECONDITION) and kAuto records why in dev->cudnn_unavailable.
absl::Status InitAttention(AttentionMode mode, DeviceContext* dev);

// The backend-wide answer for GetServerInfo: "cudnn" when bf16 blocks will try cuDNN.
AttentionInfo DescribeAttention(AttentionMode mode, const DeviceContext& dev);

// What a block runs, decided once from its spec at creation (cuDNN's plans for its largest shape
// are built then and cached per device).
struct AttentionPlan {
  bool cudnn = false;
  std::string reason;
};
// Fails only for kCudnn on a block cuDNN cannot run (FAILED_PRECONDITION or UNIMPLEMENTED).
absl::StatusOr<AttentionPlan> PlanAttention(AttentionMode mode, const BlockSpec& spec, DeviceContext* dev);

// dq and dk as the attention backward leaves them, [tokens, heads * dh] and [tokens, kv_heads * dh]:
// fp32 from the native kernels, bf16 from cuDNN (it has no fp32 dK; see Backward).
struct QkGrads {
  DeviceBuffer dq, dk;
  bool bf16 = false;
};

class AttentionRunner {
 public:
  AttentionRunner() = default;
  static absl::StatusOr<AttentionRunner> Create(AttentionMode mode, const BlockSpec& spec, DeviceContext* dev);

  AttentionInfo info() const { return {plan_.cudnn ? "cudnn" : "native", plan_.reason}; }

  // Enqueues on a.stream: o and lse from q, k, v.
  absl::Status Forward(const kernels::AttentionArgs<float>& a);
  absl::Status Forward(const kernels::AttentionArgs<__nv_bfloat16>& a);
  // Enqueues on a.stream: dv into a.dv; dq and dk into buffers from the device's pool. a.dq, a.dk
  // and a.workspace are the runner's to set.
  absl::StatusOr<QkGrads> Backward(kernels::AttentionArgs<float> a);
  absl::StatusOr<QkGrads> Backward(kernels::AttentionArgs<__nv_bfloat16> a);

 private:
  // Whether this call runs on cuDNN: the block chose it and cuDNN takes the call's shape. Fills
  // *problem and *workspace (the call's, from the device's pool) for the call.
  absl::StatusOr<bool> UseCudnn(const kernels::AttentionArgs<__nv_bfloat16>& a, bool backward,
                                kernels::CudnnAttentionProblem* problem, DeviceBuffer* workspace);
  template <class T>
  absl::StatusOr<QkGrads> NativeBackward(kernels::AttentionArgs<T> a);

  AttentionMode mode_ = AttentionMode::kNative;
  AttentionPlan plan_;
  DeviceContext* dev_ = nullptr;
  std::set<std::pair<int64_t, int64_t>> refused_;  // (batch, seq) already logged; calls on a block are serialised
};

}  // namespace blockd::cuda
