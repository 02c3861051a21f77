// Where a CUDA block keeps its parameters and how much memory it and its forward take: the
// storage order of its one parameter buffer (and of its gradients and moments), the sizes of a
// forward/backward and the bytes a forward keeps for the backward.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "base/block_config.h"
#include "engine/backend.h"

namespace blockd::cuda {

struct Layout {
  std::vector<ParamSpec> params;               // BlockParams(config, lora) order
  std::array<int64_t, kNumParamIds> offset{};  // by ParamId; -1 when absent
  std::vector<int64_t> index_offset;           // by BlockParams index
  int64_t total = 0;
  int64_t decay_end = 0;
  int64_t adapter_begin = 0, adapter_end = 0;  // the LoRA adapters (empty without)
};
// Matrices first, so that the fused q|k|v and gate|up products find their rows adjacent and AdamW
// decays exactly the prefix [0, decay_end): the base ones, then the LoRA adapters (a contiguous
// range: a frozen block's trained part), the A matrices of one site adjacent so that one product
// makes the site's U (lora_gemms.h). The 1-D parameters follow, the q, k and v biases adjacent so
// that they are one bias of the fused q|k|v product.
Layout MakeLayout(const BlockConfig& c, const LoraConfig& lora);

// Sizes of one forward/backward.
struct Dims {
  int64_t batch, seq, n, d, qd, kvd, qkv, f;
  int heads, kv_heads, dh;
  int64_t lora_u;  // columns of the adapters' U (LoraUColumns), 0 without
};
Dims DimsOf(const BlockConfig& c, const LoraConfig& lora, int64_t batch, int64_t seq);

size_t ActSize(Precision p);  // bytes of an activation element in the compute dtype
// What a forward keeps for the backward.
size_t SavedBytesFor(const BlockConfig& c, const LoraConfig& lora, Precision p, int64_t batch, int64_t seq);
// The backward kernels' workspaces and RoPE's inverse frequencies (uploaded once per block; each
// forward's table reads them).
size_t RmsWorkspaceFloats(const BlockConfig& c);
size_t QkWorkspaceFloats(const BlockConfig& c);
size_t BiasWorkspaceFloats(const BlockConfig& c);
size_t InvFreqBytes(const BlockConfig& c);

}  // namespace blockd::cuda
