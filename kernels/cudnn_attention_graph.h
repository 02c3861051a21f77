// The cuDNN operation graphs of causal grouped-query attention, forward (14 nodes) and backward
// (24 nodes), node for node the ones PyTorch 2.11 builds on cuDNN 9.19
// (shared/reference/cudnn919_sdpa_graphs.jsonl): cuDNN matches these patterns to its fused
// flash-attention engines. Internal to cudnn_attention.cc.
#pragma once

#include <deque>
#include <vector>

#include "kernels/cudnn_api.h"
#include "kernels/cudnn_attention.h"

namespace blockd::kernels::cudnn {

// Unique ids of the tensors that the variant pack binds to memory (or, by value, to host scalars).
enum AttentionUid : int64_t {
  kUidQ = 1,
  kUidK = 2,
  kUidV = 3,
  kUidO = 4,
  kUidStats = 5,       // fp32 [b, H, s, 1]: max + log(sum exp), blockd's lse
  kUidScale = 6,       // by value: the softmax scale
  kUidNegInf = 7,      // by value: -inf, the masked scores
  kUidOne = 8,         // by value: 1.0 (PyTorch's graph scales rowsum(dO * O) by it)
  kUidDO = 9,
  kUidDQ = 10,
  kUidDK = 11,
  kUidDV = 12,
  kUidSoftmaxSum = 13,  // fp32 [b, H, s, 1] workspace: rowsum(dO * O)
  kUidDQAccum = 14,     // fp32 [b, H, s, dh] workspace, zeroed before each backward
  kUidFirstVirtual = 100,
};

// Every descriptor of one graph, kept alive as long as the plan made from it.
struct AttentionGraph {
  std::deque<Descriptor> descriptors;          // tensors, pointwise/matmul/reduction descriptors, ops
  std::vector<cudnnBackendDescriptor_t> ops;   // the operations, in the reference's order
};

// Append the pass's tensors and operations to `g`; on failure b.ok() is false and b.error() names
// the node, descriptor and attribute.
void BuildForwardGraph(Builder& b, const CudnnAttentionProblem& p, AttentionGraph* g);
void BuildBackwardGraph(Builder& b, const CudnnAttentionProblem& p, AttentionGraph* g);

}  // namespace blockd::kernels::cudnn
