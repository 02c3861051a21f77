#include "engine/cuda/attention_dispatch.h"

#include <algorithm>
#include <memory>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "base/log.h"
#include "base/status_macros.h"
#include "engine/cuda/cuda_status.h"

namespace blockd::cuda {
namespace {

using bf16 = __nv_bfloat16;
using kernels::CudnnAttentionPass;
using kernels::CudnnAttentionProblem;
using kernels::CudnnStatus;

// The problem of a bf16 attention call in the block's layout: the strides come from the call, so
// the plan prepared at creation (BlockProblem) is the one the calls find in the cache.
CudnnAttentionProblem ProblemOf(const kernels::AttentionArgs<bf16>& a, bool backward) {
  CudnnAttentionProblem p = CudnnAttentionProblem::Packed(a.batch, a.seq, a.heads, a.kv_heads, a.head_dim);
  p.q_stride = a.q_stride;
  p.k_stride = a.k_stride;
  p.v_stride = a.v_stride;
  p.o_stride = a.o_stride;
  if (backward) {
    // dq and dk are packed buffers of their own (QkGrads); dv goes into its part of dq|dk|dv.
    p.do_stride = a.do_stride;
    p.dv_stride = a.dv_stride;
  }
  return p;
}

// What CudaBlock::Attention (cuda_block.cc) passes: q, k and o packed, v inside the fused q|k|v
// row, dO packed, dv inside dq|dk|dv.
CudnnAttentionProblem BlockProblem(const BlockConfig& c, int64_t batch, int64_t seq) {
  kernels::AttentionArgs<bf16> a = kernels::AttentionArgs<bf16>::Causal(
      static_cast<int>(batch), static_cast<int>(seq), static_cast<int>(c.num_attention_heads),
      static_cast<int>(c.num_kv_heads), static_cast<int>(c.head_dim), nullptr);
  a.q_stride = a.o_stride = a.do_stride = c.q_dim();
  a.k_stride = c.kv_dim();
  a.v_stride = a.dv_stride = c.q_dim() + 2 * c.kv_dim();
  return ProblemOf(a, /*backward=*/true);
}

absl::Status CudnnError(const CudnnStatus& s) {
  switch (s.code) {
    case CudnnStatus::Code::kOk: return absl::OkStatus();
    case CudnnStatus::Code::kUnavailable: return absl::FailedPreconditionError(s.message);
    case CudnnStatus::Code::kUnsupported: return absl::UnimplementedError(s.message);
    case CudnnStatus::Code::kInvalidArgument: return absl::InvalidArgumentError(s.message);
    case CudnnStatus::Code::kFailed: return absl::InternalError(s.message);
  }
  return absl::InternalError(s.message);
}

// cuDNN's plans for both passes of problem p (each call takes its workspace then: UseCudnn).
absl::Status PrepareBoth(kernels::CudnnAttention* cudnn, const CudnnAttentionProblem& p) {
#ifdef BLOCKD_HAVE_CUDNN
  kernels::CudnnPlanInfo fwd, bwd;
  if (CudnnStatus s = cudnn->Prepare(p, CudnnAttentionPass::kForward, &fwd); !s.ok()) return CudnnError(s);
  if (CudnnStatus s = cudnn->Prepare(p, CudnnAttentionPass::kBackward, &bwd); !s.ok()) return CudnnError(s);
  return absl::OkStatus();
#else
  (void)cudnn;
  (void)p;
  return absl::FailedPreconditionError("built without cuDNN");
#endif
}

}  // namespace

absl::Status InitAttention(AttentionMode mode, DeviceContext* dev) {
  if (mode == AttentionMode::kNative) {
    dev->cudnn_unavailable = "--attention=native";
    return absl::OkStatus();
  }
#ifdef BLOCKD_HAVE_CUDNN
  DeviceGuard guard(dev->index);
  std::unique_ptr<kernels::CudnnAttention> handle;
  CudnnStatus s = kernels::CudnnAttention::Create(&handle);
  if (s.ok()) {
    // A small causal problem proves that cuDNN has an engine on this GPU, and names the library.
    kernels::CudnnPlanInfo info;
    s = handle->Prepare(CudnnAttentionProblem::Packed(1, 64, 2, 1, 64), CudnnAttentionPass::kForward, &info);
    if (s.ok()) {
      dev->cudnn = std::move(handle);
      dev->cudnn_library = info.library;
      return absl::OkStatus();
    }
  }
  dev->cudnn_unavailable = s.message;
#else
  dev->cudnn_unavailable = "this blockd was built without cuDNN's headers (cudnn_graph.h)";
#endif
  if (mode == AttentionMode::kCudnn) {
    return absl::FailedPreconditionError(
        absl::StrCat("--attention=cudnn: cuDNN cannot run on GPU ", dev->index, ": ", dev->cudnn_unavailable));
  }
  return absl::OkStatus();
}

AttentionInfo DescribeAttention(AttentionMode mode, const DeviceContext& dev) {
  const std::string flag = absl::StrCat("--attention=", AttentionModeName(mode));
  if (dev.cudnn == nullptr) return {"native", absl::StrCat(flag, ": ", dev.cudnn_unavailable)};
  return {"cudnn", absl::StrCat(flag, ": ", dev.cudnn_library,
                                " for bf16 blocks whose shape it accepts; fp32 and tf32 blocks run the native kernels")};
}

absl::StatusOr<AttentionPlan> PlanAttention(AttentionMode mode, const BlockSpec& spec, DeviceContext* dev) {
  const std::string flag = absl::StrCat("--attention=", AttentionModeName(mode));
  AttentionPlan plan;
  if (mode == AttentionMode::kNative) {
    plan.reason = flag;
    return plan;
  }
  if (spec.precision != Precision::kBF16) {
    // Not an error for kCudnn: the flag is about bf16 blocks; cuDNN has no fp32 fused attention.
    plan.reason = absl::StrCat(flag, ": precision ", PrecisionName(spec.precision),
                               " runs the native kernels (cuDNN's fused attention is bf16)");
    return plan;
  }
  absl::Status refused;
  if (dev->cudnn == nullptr) {
    refused = absl::FailedPreconditionError(dev->cudnn_unavailable);
  } else if (spec.config.head_dim % 8 != 0) {
    // cuDNN reads 16-byte aligned rows; v's offset in q|k|v is (heads + kv_heads) * head_dim.
    refused = absl::UnimplementedError(absl::StrCat("head_dim ", spec.config.head_dim, " is not a multiple of 8"));
  } else {
    DeviceGuard guard(dev->index);
    refused = PrepareBoth(dev->cudnn.get(), BlockProblem(spec.config, spec.max_batch_size, spec.max_seq_len));
    if (refused.ok()) {
      plan.cudnn = true;
      plan.reason = absl::StrCat(flag, ": ", dev->cudnn_library);
      return plan;
    }
  }
  if (mode == AttentionMode::kCudnn) {
    return absl::Status(refused.code(),
                        absl::StrCat("--attention=cudnn: cuDNN cannot run block ", spec.id, ": ", refused.message()));
  }
  plan.reason = absl::StrCat(flag, ": cuDNN refused (", refused.message(), "), using the native kernels");
  return plan;
}

absl::StatusOr<AttentionRunner> AttentionRunner::Create(AttentionMode mode, const BlockSpec& spec,
                                                        DeviceContext* dev) {
  AttentionRunner r;
  r.mode_ = mode;
  r.dev_ = dev;
  ASSIGN_OR_RETURN(r.plan_, PlanAttention(mode, spec, dev));
  BLOCKD_LOG(kInfo, "block ", spec.id, " (", PrecisionName(spec.precision), "): attention ",
             r.plan_.cudnn ? "cudnn" : "native", ": ", r.plan_.reason);
  return r;
}

absl::StatusOr<bool> AttentionRunner::UseCudnn(const kernels::AttentionArgs<bf16>& a, bool backward,
                                               CudnnAttentionProblem* problem, DeviceBuffer* workspace) {
  if (!plan_.cudnn) return false;
  *problem = ProblemOf(a, backward);
  absl::Status refused;
#ifdef BLOCKD_HAVE_CUDNN
  kernels::CudnnPlanInfo info;
  const CudnnStatus s = dev_->cudnn->Prepare(
      *problem, backward ? CudnnAttentionPass::kBackward : CudnnAttentionPass::kForward, &info);
  if (s.ok()) {
    // From the device's pool for this call, back in stream order after it: blocks on a device
    // share the memory instead of each keeping its own (~140 MB for a Llama-3-8B block at 4k).
    ASSIGN_OR_RETURN(*workspace, DeviceBuffer::Allocate(dev_, info.workspace_bytes));
    return true;
  }
  refused = CudnnError(s);
#endif
  if (mode_ == AttentionMode::kCudnn) {
    return absl::Status(refused.code(),
                        absl::StrCat("--attention=cudnn: cuDNN refused ", problem->ToString(), ": ", refused.message()));
  }
  if (refused_.insert({a.batch, a.seq}).second) {
    BLOCKD_LOG(kWarning, "cuDNN attention refused ", problem->ToString(), " (", refused.message(),
               "): this shape runs the native kernels");
  }
  return false;
}

absl::Status AttentionRunner::Forward(const kernels::AttentionArgs<float>& a) {
  CUDA_RETURN_IF_ERROR(kernels::launch_attention_fwd(a));
  return absl::OkStatus();
}

absl::Status AttentionRunner::Forward(const kernels::AttentionArgs<bf16>& a) {
  CudnnAttentionProblem p;
  DeviceBuffer ws;
  ASSIGN_OR_RETURN(const bool cudnn, UseCudnn(a, /*backward=*/false, &p, &ws));
  if (!cudnn) {
    CUDA_RETURN_IF_ERROR(kernels::launch_attention_fwd(a));
    return absl::OkStatus();
  }
#ifdef BLOCKD_HAVE_CUDNN
  return CudnnError(dev_->cudnn->Forward(p, {a.q, a.k, a.v, a.o, a.lse}, a.scale, ws.get(), ws.bytes(), a.stream));
#else
  return absl::InternalError("unreachable: cuDNN chosen without cuDNN");
#endif
}

template <class T>
absl::StatusOr<QkGrads> AttentionRunner::NativeBackward(kernels::AttentionArgs<T> a) {
  const int64_t tokens = int64_t(a.batch) * a.seq;
  QkGrads g;
  ASSIGN_OR_RETURN(g.dq, DeviceBuffer::Allocate(dev_, tokens * a.heads * a.head_dim * 4));
  ASSIGN_OR_RETURN(g.dk, DeviceBuffer::Allocate(dev_, tokens * a.kv_heads * a.head_dim * 4));
  ASSIGN_OR_RETURN(DeviceBuffer ws, DeviceBuffer::Allocate(dev_, kernels::attention_bwd_workspace_floats(
                                                                     a.batch, a.seq, a.heads, a.kv_heads,
                                                                     a.head_dim) * 4));
  a.dq = g.dq.as<float>();
  a.dk = g.dk.as<float>();
  a.workspace = ws.as<float>();
  CUDA_RETURN_IF_ERROR(kernels::launch_attention_bwd(a));
  return g;  // ws goes back to the pool in stream order, after the kernels
}

absl::StatusOr<QkGrads> AttentionRunner::Backward(kernels::AttentionArgs<float> a) { return NativeBackward(a); }

absl::StatusOr<QkGrads> AttentionRunner::Backward(kernels::AttentionArgs<bf16> a) {
  CudnnAttentionProblem p;
  DeviceBuffer ws;
  ASSIGN_OR_RETURN(const bool cudnn, UseCudnn(a, /*backward=*/true, &p, &ws));
  if (!cudnn) return NativeBackward(a);
#ifdef BLOCKD_HAVE_CUDNN
  // cuDNN writes dQ and dK in the activation dtype; it keeps dQ in fp32 only in its workspace
  // (blocked, pre-scale) and has no fp32 dK at all. The QK-norm/RoPE backward therefore reads bf16
  // for both (launch_qknorm_rope_bwd<bf16, bf16>), computing in fp32. That adds one rounding
  // (<= u = 2^-8 relative, per element) before a kernel whose output, dq|dk|dv, is bf16 anyway,
  // and the dv that the native bf16 path writes is rounded the same way: well inside the gpu
  // tests' norm-wise gradient bound of 8u (tests/gpu/cuda_block_test.cc), which stays as it is.
  const int64_t tokens = int64_t(a.batch) * a.seq;
  QkGrads g;
  g.bf16 = true;
  ASSIGN_OR_RETURN(g.dq, DeviceBuffer::Allocate(dev_, tokens * a.heads * a.head_dim * sizeof(bf16)));
  ASSIGN_OR_RETURN(g.dk, DeviceBuffer::Allocate(dev_, tokens * a.kv_heads * a.head_dim * sizeof(bf16)));
  kernels::CudnnAttentionBwdArgs args{a.q, a.k, a.v, a.o, a.lse, a.d_o, g.dq.get(), g.dk.get(), a.dv};
  RETURN_IF_ERROR(CudnnError(dev_->cudnn->Backward(p, args, a.scale, ws.get(), ws.bytes(), a.stream)));
  return g;
#else
  return absl::InternalError("unreachable: cuDNN chosen without cuDNN");
#endif
}

}  // namespace blockd::cuda
