// cuDNN attention: handle, plan cache and execution (see cudnn_attention.h). The graphs are built
// in cudnn_attention_graph.cc, the library loaded in cudnn_api.cc.
#include "kernels/cudnn_attention.h"

#include <cmath>
#include <cstdio>
#include <limits>
#include <utility>
#include <vector>

#include "kernels/cudnn_api.h"
#include "kernels/cudnn_attention_graph.h"

namespace blockd::kernels {
namespace {

using Code = CudnnStatus::Code;

constexpr size_t kWorkspaceAlign = 256;
size_t AlignUp(size_t n) { return (n + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign; }

const char* PassName(CudnnAttentionPass pass) {
  return pass == CudnnAttentionPass::kForward ? "forward" : "backward";
}

CudnnStatus Validate(const CudnnAttentionProblem& p, CudnnAttentionPass pass) {
  auto bad = [&](const std::string& what) {
    return CudnnStatus::Error(Code::kInvalidArgument, "cuDNN attention " + std::string(PassName(pass)) + " " +
                                                          p.ToString() + ": " + what);
  };
  if (p.batch <= 0 || p.seq <= 0 || p.heads <= 0 || p.kv_heads <= 0 || p.head_dim <= 0) return bad("empty shape");
  if (p.heads % p.kv_heads != 0) return bad("heads must be a multiple of kv_heads");
  const int64_t qd = int64_t(p.heads) * p.head_dim, kvd = int64_t(p.kv_heads) * p.head_dim;
  if (p.q_stride < qd || p.o_stride < qd || p.k_stride < kvd || p.v_stride < kvd) {
    return bad("a row stride is smaller than its tensor's heads * head_dim");
  }
  if (pass == CudnnAttentionPass::kBackward &&
      (p.do_stride < qd || p.dq_stride < qd || p.dk_stride < kvd || p.dv_stride < kvd)) {
    return bad("a gradient's row stride is smaller than its tensor's heads * head_dim");
  }
  return CudnnStatus::Ok();
}

// A handle and its plans belong to the device they were made on.
CudnnStatus CheckDevice(int device) {
  int current = -1;
  if (cudaGetDevice(&current) != cudaSuccess || current != device) {
    return CudnnStatus::Error(Code::kInvalidArgument, "cuDNN attention: made on device " + std::to_string(device) +
                                                          ", called on device " + std::to_string(current));
  }
  return CudnnStatus::Ok();
}

CudnnStatus CheckAligned(const char* name, const void* ptr) {
  if (ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 != 0) {
    return CudnnStatus::Error(Code::kInvalidArgument,
                              std::string("cuDNN attention: ") + name + " is null or not 16-byte aligned");
  }
  return CudnnStatus::Ok();
}

}  // namespace

CudnnAttentionProblem CudnnAttentionProblem::Packed(int batch, int seq, int heads, int kv_heads, int head_dim) {
  CudnnAttentionProblem p;
  p.batch = batch;
  p.seq = seq;
  p.heads = heads;
  p.kv_heads = kv_heads;
  p.head_dim = head_dim;
  const int64_t qd = int64_t(heads) * head_dim, kvd = int64_t(kv_heads) * head_dim;
  p.q_stride = p.o_stride = p.do_stride = p.dq_stride = qd;
  p.k_stride = p.v_stride = p.dk_stride = p.dv_stride = kvd;
  return p;
}

std::string CudnnAttentionProblem::ToString() const {
  char buf[320];
  std::snprintf(buf, sizeof(buf),
                "[b=%d s=%d H=%d Hkv=%d dh=%d %s %s; row strides q %lld k %lld v %lld o %lld do %lld dq %lld dk "
                "%lld dv %lld]",
                batch, seq, heads, kv_heads, head_dim, causal ? "causal" : "full",
                dtype == CudnnAttentionDType::kBf16 ? "bf16" : "fp16", (long long)q_stride, (long long)k_stride,
                (long long)v_stride, (long long)o_stride, (long long)do_stride, (long long)dq_stride,
                (long long)dk_stride, (long long)dv_stride);
  return buf;
}

struct CudnnAttention::Plan {
  // Members are destroyed in reverse: the plan before the graph's tensors and operations.
  cudnn::AttentionGraph graph;
  cudnn::ExecutionPlan exec;
  size_t cudnn_workspace = 0;
  // Backward only: offsets of the fp32 buffers after cuDNN's workspace.
  size_t softmax_sum_offset = 0, dq_accum_offset = 0, dq_accum_bytes = 0;
  size_t total_workspace = 0;
};

CudnnStatus CudnnAttention::Available() {
  std::string why;
  if (cudnn::LoadApi(&why) == nullptr) return CudnnStatus::Error(Code::kUnavailable, why);
  return CudnnStatus::Ok();
}

CudnnStatus CudnnAttention::Create(std::unique_ptr<CudnnAttention>* out) {
  std::string why;
  const cudnn::Api* api = cudnn::LoadApi(&why);
  if (api == nullptr) return CudnnStatus::Error(Code::kUnavailable, why);
  std::unique_ptr<CudnnAttention> a(new CudnnAttention());
  if (cudaGetDevice(&a->device_) != cudaSuccess) {
    return CudnnStatus::Error(Code::kUnavailable,
                              std::string("no CUDA device: ") + cudaGetErrorString(cudaGetLastError()));
  }
  cudnnHandle_t h = nullptr;
  const cudnnStatus_t s = api->Create(&h);
  if (s != CUDNN_STATUS_SUCCESS) {
    return CudnnStatus::Error(Code::kUnavailable, "cudnnCreate (" + api->path + ") failed: " + api->Describe(s));
  }
  a->handle_ = h;
  *out = std::move(a);
  return CudnnStatus::Ok();
}

CudnnAttention::~CudnnAttention() {
  plans_.clear();  // descriptors before the handle they were made with
  if (handle_ != nullptr) cudnn::LoadApi(nullptr)->Destroy(static_cast<cudnnHandle_t>(handle_));
}

size_t CudnnAttention::cached_plans() const {
  std::lock_guard<std::mutex> lock(mu_);
  return plans_.size();
}

CudnnStatus CudnnAttention::GetPlan(const CudnnAttentionProblem& p, CudnnAttentionPass pass, Plan** plan) {
  if (CudnnStatus v = Validate(p, pass); !v.ok()) return v;
  const bool bwd = pass == CudnnAttentionPass::kBackward;
  const Key key{static_cast<int>(pass), p.batch, p.seq, p.heads, p.kv_heads, p.head_dim, p.causal,
                static_cast<int>(p.dtype), p.q_stride, p.k_stride, p.v_stride, p.o_stride,
                bwd ? p.do_stride : 0, bwd ? p.dq_stride : 0, bwd ? p.dk_stride : 0, bwd ? p.dv_stride : 0};
  if (auto it = plans_.find(key); it != plans_.end()) {
    *plan = it->second.get();
    return CudnnStatus::Ok();
  }
  const cudnn::Api* api = cudnn::LoadApi(nullptr);
  auto built = std::make_unique<Plan>();
  cudnn::Builder b(api);
  if (bwd) {
    cudnn::BuildBackwardGraph(b, p, &built->graph);
  } else {
    cudnn::BuildForwardGraph(b, p, &built->graph);
  }
  const bool graph_ok = b.ok();
  if (graph_ok) cudnn::BuildExecutionPlan(b, static_cast<cudnnHandle_t>(handle_), built->graph.ops, &built->exec);
  if (!b.ok()) {
    // A graph cuDNN accepts node by node but no engine takes is "unsupported"; a node it refuses
    // is a bug in the graph (or a cuDNN too old for it), reported as a failure.
    const bool unsupported = graph_ok && (b.status() == CUDNN_STATUS_NOT_SUPPORTED ||
                                          CUDNN_STATUS_CATEGORY(b.status()) == CUDNN_STATUS_NOT_SUPPORTED);
    return CudnnStatus::Error(unsupported ? Code::kUnsupported : Code::kFailed,
                              "cuDNN " + std::to_string(api->version) + " (" + api->path + ") attention " +
                                  PassName(pass) + " " + p.ToString() + ": " + b.error());
  }
  built->cudnn_workspace = static_cast<size_t>(built->exec.workspace_bytes);
  built->total_workspace = AlignUp(built->cudnn_workspace);
  if (bwd) {
    const size_t rows = size_t(p.batch) * p.heads * p.seq;
    built->softmax_sum_offset = built->total_workspace;
    built->total_workspace += AlignUp(rows * sizeof(float));
    built->dq_accum_offset = built->total_workspace;
    built->dq_accum_bytes = rows * p.head_dim * sizeof(float);
    built->total_workspace += AlignUp(built->dq_accum_bytes);
  }
  *plan = built.get();
  plans_.emplace(key, std::move(built));
  return CudnnStatus::Ok();
}

CudnnStatus CudnnAttention::Prepare(const CudnnAttentionProblem& p, CudnnAttentionPass pass, CudnnPlanInfo* info) {
  if (CudnnStatus s = CheckDevice(device_); !s.ok()) return s;
  std::lock_guard<std::mutex> lock(mu_);
  Plan* plan = nullptr;
  if (CudnnStatus s = GetPlan(p, pass, &plan); !s.ok()) return s;
  const cudnn::Api* api = cudnn::LoadApi(nullptr);
  info->workspace_bytes = plan->total_workspace;
  info->engine_index = plan->exec.engine_index;
  info->library = api->path + " (cuDNN " + std::to_string(api->version) + ")";
  return CudnnStatus::Ok();
}

namespace {

// Binds the uids to memory and runs the plan on `stream`.
CudnnStatus Execute(const cudnn::Api* api, cudnnHandle_t handle, const cudnn::ExecutionPlan& exec,
                    const std::vector<int64_t>& uids, std::vector<void*>& ptrs, void* workspace,
                    cudaStream_t stream, const char* pass) {
  cudnnStatus_t s = api->SetStream(handle, stream);
  if (s != CUDNN_STATUS_SUCCESS) {
    return CudnnStatus::Error(Code::kFailed, std::string("cudnnSetStream failed: ") + api->Describe(s));
  }
  cudnn::Builder b(api);
  cudnn::Descriptor pack = b.Make(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, std::string("variant pack (") + pass + ")");
  b.Set(pack, CUDNN_ATTR(CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS), CUDNN_TYPE_INT64, static_cast<int64_t>(uids.size()),
        uids.data());
  b.Set(pack, CUDNN_ATTR(CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS), CUDNN_TYPE_VOID_PTR,
        static_cast<int64_t>(ptrs.size()), ptrs.data());
  b.Set(pack, CUDNN_ATTR(CUDNN_ATTR_VARIANT_PACK_WORKSPACE), CUDNN_TYPE_VOID_PTR, 1, &workspace);
  b.Finalize(pack);
  if (!b.ok()) return CudnnStatus::Error(Code::kFailed, b.error());
  s = api->Execute(handle, exec.plan.get(), pack.get());
  if (s != CUDNN_STATUS_SUCCESS) {
    return CudnnStatus::Error(Code::kFailed, std::string("cudnnBackendExecute (") + pass + ", engine " +
                                                 std::to_string(exec.engine_index) + ") failed: " + api->Describe(s));
  }
  return CudnnStatus::Ok();
}

}  // namespace

CudnnStatus CudnnAttention::Forward(const CudnnAttentionProblem& p, const CudnnAttentionFwdArgs& a, float scale,
                                    void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (CudnnStatus s = CheckDevice(device_); !s.ok()) return s;
  for (auto [name, ptr] : {std::pair<const char*, const void*>{"q", a.q}, {"k", a.k}, {"v", a.v}, {"o", a.o},
                           {"lse", a.lse}}) {
    if (CudnnStatus s = CheckAligned(name, ptr); !s.ok()) return s;
  }
  std::lock_guard<std::mutex> lock(mu_);
  Plan* plan = nullptr;
  if (CudnnStatus s = GetPlan(p, CudnnAttentionPass::kForward, &plan); !s.ok()) return s;
  if (workspace_bytes < plan->total_workspace || (plan->total_workspace > 0 && workspace == nullptr)) {
    return CudnnStatus::Error(Code::kInvalidArgument, "cuDNN attention forward: workspace of " +
                                                          std::to_string(workspace_bytes) + " bytes, needs " +
                                                          std::to_string(plan->total_workspace));
  }
  // By-value scalars are read from host memory during cudnnBackendExecute.
  float scale_v = scale, neg_inf = -std::numeric_limits<float>::infinity();
  std::vector<int64_t> uids = {cudnn::kUidQ, cudnn::kUidK, cudnn::kUidV, cudnn::kUidO, cudnn::kUidStats,
                               cudnn::kUidScale};
  std::vector<void*> ptrs = {const_cast<void*>(a.q), const_cast<void*>(a.k), const_cast<void*>(a.v), a.o, a.lse,
                             &scale_v};
  if (p.causal) {
    uids.push_back(cudnn::kUidNegInf);
    ptrs.push_back(&neg_inf);
  }
  return Execute(cudnn::LoadApi(nullptr), static_cast<cudnnHandle_t>(handle_), plan->exec, uids, ptrs, workspace,
                 stream, "forward");
}

CudnnStatus CudnnAttention::Backward(const CudnnAttentionProblem& p, const CudnnAttentionBwdArgs& a, float scale,
                                     void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (CudnnStatus s = CheckDevice(device_); !s.ok()) return s;
  for (auto [name, ptr] : {std::pair<const char*, const void*>{"q", a.q}, {"k", a.k}, {"v", a.v}, {"o", a.o},
                           {"lse", a.lse}, {"d_o", a.d_o}, {"dq", a.dq}, {"dk", a.dk}, {"dv", a.dv}}) {
    if (CudnnStatus s = CheckAligned(name, ptr); !s.ok()) return s;
  }
  std::lock_guard<std::mutex> lock(mu_);
  Plan* plan = nullptr;
  if (CudnnStatus s = GetPlan(p, CudnnAttentionPass::kBackward, &plan); !s.ok()) return s;
  if (workspace == nullptr || workspace_bytes < plan->total_workspace) {
    return CudnnStatus::Error(Code::kInvalidArgument, "cuDNN attention backward: workspace of " +
                                                          std::to_string(workspace_bytes) + " bytes, needs " +
                                                          std::to_string(plan->total_workspace));
  }
  char* ws = static_cast<char*>(workspace);
  void* softmax_sum = ws + plan->softmax_sum_offset;
  void* dq_accum = ws + plan->dq_accum_offset;
  // cuDNN adds dS K into dQ_accum block by block (cudnn-frontend zeroes it before each run).
  if (cudaError_t e = cudaMemsetAsync(dq_accum, 0, plan->dq_accum_bytes, stream); e != cudaSuccess) {
    return CudnnStatus::Error(Code::kFailed, std::string("cudaMemsetAsync(dQ_accum): ") + cudaGetErrorString(e));
  }
  float scale_v = scale, one = 1.f, neg_inf = -std::numeric_limits<float>::infinity();
  std::vector<int64_t> uids = {cudnn::kUidQ,  cudnn::kUidK,  cudnn::kUidV,  cudnn::kUidO,
                               cudnn::kUidStats, cudnn::kUidDO, cudnn::kUidDQ, cudnn::kUidDK,
                               cudnn::kUidDV, cudnn::kUidSoftmaxSum, cudnn::kUidDQAccum, cudnn::kUidScale,
                               cudnn::kUidOne};
  std::vector<void*> ptrs = {const_cast<void*>(a.q), const_cast<void*>(a.k),     const_cast<void*>(a.v),
                             const_cast<void*>(a.o), const_cast<float*>(a.lse), const_cast<void*>(a.d_o),
                             a.dq,                   a.dk,                       a.dv,
                             softmax_sum,            dq_accum,                   &scale_v,
                             &one};
  if (p.causal) {
    uids.push_back(cudnn::kUidNegInf);
    ptrs.push_back(&neg_inf);
  }
  return Execute(cudnn::LoadApi(nullptr), static_cast<cudnnHandle_t>(handle_), plan->exec, uids, ptrs, workspace,
                 stream, "backward");
}

}  // namespace blockd::kernels
