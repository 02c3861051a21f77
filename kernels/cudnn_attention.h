// Causal grouped-query attention through cuDNN's fused flash-attention engines, forward and
// backward, on the layout blockd's own kernels use (attention.cuh): tokens of [batch, seq] are
// rows, a tensor's heads sit side by side in a row (head h at h * head_dim), `*_stride` elements
// from one token to the next. The saved statistics are blockd's lse: fp32 [batch, heads, seq],
// natural-log log-sum-exp of the scaled, masked scores (max + log(sum exp(s - max))), so the
// native backward can read cuDNN's and the other way round. K and V keep kv_heads heads: query
// head h reads kv head h / (heads / kv_heads) without expansion.
//
// cuDNN is loaded at run time (dlopen), so a machine without it still runs blockd:
// Available() says why not. The graphs are the ones PyTorch 2.11 builds on cuDNN 9.19
// (shared/reference/cudnn919_sdpa_graphs.jsonl), so cuDNN recognises them as SDPA and picks its
// fused engines. Execution plans are built on first use of a problem and cached.
//
//   std::unique_ptr<CudnnAttention> attn;
//   CudnnStatus st = CudnnAttention::Create(&attn);          // on the current device
//   CudnnAttentionProblem p = CudnnAttentionProblem::Packed(B, S, H, Hkv, dh);
//   CudnnPlanInfo info;
//   st = attn->Prepare(p, CudnnAttentionPass::kForward, &info);  // info.workspace_bytes
//   st = attn->Forward(p, {q, k, v, o, lse}, scale, workspace, info.workspace_bytes, stream);
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

namespace blockd::kernels {

struct CudnnStatus {
  enum class Code {
    kOk,
    kUnavailable,      // no GPU-usable cuDNN here (not installed, too old, no handle)
    kUnsupported,      // cuDNN has no engine for this graph or shape
    kInvalidArgument,  // the caller's sizes, pointers or workspace
    kFailed,           // cuDNN or CUDA failed while building or running a plan
  };
  Code code = Code::kOk;
  std::string message;

  bool ok() const { return code == Code::kOk; }
  static CudnnStatus Ok() { return {}; }
  static CudnnStatus Error(Code c, std::string m) { return {c, std::move(m)}; }
};

enum class CudnnAttentionPass { kForward, kBackward };
enum class CudnnAttentionDType { kBf16, kFp16 };

// Sizes and row strides (in elements) of one attention call; together with the pass they key the
// plan cache, since cuDNN's tensor descriptors carry their strides.
struct CudnnAttentionProblem {
  int batch = 0, seq = 0, heads = 0, kv_heads = 0, head_dim = 0;
  bool causal = true;
  CudnnAttentionDType dtype = CudnnAttentionDType::kBf16;
  int64_t q_stride = 0, k_stride = 0, v_stride = 0, o_stride = 0;     // both passes
  int64_t do_stride = 0, dq_stride = 0, dk_stride = 0, dv_stride = 0;  // backward only

  // Every tensor in its own packed buffer: heads * head_dim or kv_heads * head_dim per row.
  static CudnnAttentionProblem Packed(int batch, int seq, int heads, int kv_heads, int head_dim);
  std::string ToString() const;
};

struct CudnnAttentionFwdArgs {
  const void* q;  // [tokens, q_stride], heads heads
  const void* k;  // [tokens, k_stride], kv_heads heads
  const void* v;  // [tokens, v_stride], kv_heads heads
  void* o;        // [tokens, o_stride], heads heads
  float* lse;     // [batch, heads, seq] fp32, written
};

struct CudnnAttentionBwdArgs {
  const void* q;
  const void* k;
  const void* v;
  const void* o;      // the forward's output
  const float* lse;   // the forward's statistics (blockd's or cuDNN's)
  const void* d_o;    // [tokens, do_stride]
  void* dq;           // [tokens, dq_stride], written (not added), in the activation dtype
  void* dk;           // [tokens, dk_stride], kv_heads heads, summed over each kv head's query heads
  void* dv;           // [tokens, dv_stride], likewise
};

struct CudnnPlanInfo {
  size_t workspace_bytes = 0;  // device workspace Forward/Backward need (cuDNN's plus, backward, its fp32 buffers)
  int64_t engine_index = -1;   // cuDNN's global engine index (the reference logs 1/2 forward, 6/7 backward)
  std::string library;         // the cuDNN file and version in use
};

class CudnnAttention {
 public:
  // Whether cuDNN can be loaded (see cudnn_api.h for the search order); the message says why not.
  static CudnnStatus Available();
  // Creates a cuDNN handle on the current device; plans built by this object run on that device.
  static CudnnStatus Create(std::unique_ptr<CudnnAttention>* out);
  ~CudnnAttention();
  CudnnAttention(const CudnnAttention&) = delete;
  CudnnAttention& operator=(const CudnnAttention&) = delete;

  // Builds (once) and caches the plan of `pass` for `p`; reports its workspace and engine.
  CudnnStatus Prepare(const CudnnAttentionProblem& p, CudnnAttentionPass pass, CudnnPlanInfo* info);

  // Enqueue on `stream`. Pointers 16-byte aligned; `workspace` at least Prepare's workspace_bytes,
  // not shared with a call running concurrently. scale multiplies q k^T (1/sqrt(head_dim) usually).
  CudnnStatus Forward(const CudnnAttentionProblem& p, const CudnnAttentionFwdArgs& a, float scale, void* workspace,
                      size_t workspace_bytes, cudaStream_t stream);
  CudnnStatus Backward(const CudnnAttentionProblem& p, const CudnnAttentionBwdArgs& a, float scale, void* workspace,
                       size_t workspace_bytes, cudaStream_t stream);

  // Plans in the cache (for tests).
  size_t cached_plans() const;

 private:
  struct Plan;
  using Key = std::tuple<int, int, int, int, int, int, bool, int, int64_t, int64_t, int64_t, int64_t, int64_t,
                         int64_t, int64_t, int64_t>;
  CudnnAttention() = default;
  // Looks up or builds the plan; mu_ held.
  CudnnStatus GetPlan(const CudnnAttentionProblem& p, CudnnAttentionPass pass, Plan** plan);

  void* handle_ = nullptr;  // cudnnHandle_t, kept opaque so this header needs no cuDNN headers
  int device_ = -1;
  mutable std::mutex mu_;  // guards the cache and the handle's stream between SetStream and Execute
  std::map<Key, std::unique_ptr<Plan>> plans_;
};

}  // namespace blockd::kernels
