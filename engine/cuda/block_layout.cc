#include "engine/cuda/block_layout.h"

#include "engine/cuda/cuda_block.h"
#include "engine/cuda/lora_gemms.h"
#include "kernels/adamw.cuh"
#include "kernels/bias.cuh"
#include "kernels/rmsnorm.cuh"
#include "kernels/rope.cuh"

namespace blockd::cuda {
namespace {

constexpr ParamId kStorageOrder[] = {
    ParamId::kQProj,     ParamId::kKProj,     ParamId::kVProj,     ParamId::kOProj,     ParamId::kGateProj,
    ParamId::kUpProj,    ParamId::kDownProj,  ParamId::kQLoraA,    ParamId::kKLoraA,    ParamId::kVLoraA,
    ParamId::kQLoraB,    ParamId::kKLoraB,    ParamId::kVLoraB,    ParamId::kOLoraA,    ParamId::kOLoraB,
    ParamId::kGateLoraA, ParamId::kUpLoraA,   ParamId::kGateLoraB, ParamId::kUpLoraB,   ParamId::kDownLoraA,
    ParamId::kDownLoraB, ParamId::kQBias,     ParamId::kKBias,     ParamId::kVBias,     ParamId::kInputNorm,
    ParamId::kQNorm,     ParamId::kKNorm,     ParamId::kPostNorm};
static_assert(sizeof(kStorageOrder) / sizeof(kStorageOrder[0]) == kNumParamIds, "every parameter has a place");

}  // namespace

Layout MakeLayout(const BlockConfig& c, const LoraConfig& lora) {
  Layout l;
  l.params = BlockParams(c, lora);
  l.offset.fill(-1);
  for (ParamId id : kStorageOrder) {
    if (id == ParamId::kQLoraA) l.adapter_begin = l.total;
    if (id == ParamId::kQBias) l.adapter_end = l.total;
    for (const ParamSpec& p : l.params) {
      if (p.id != id) continue;
      l.offset[static_cast<int>(id)] = l.total;
      l.total += p.numel();
      if (p.is_matrix) l.decay_end = l.total;
    }
  }
  for (const ParamSpec& p : l.params) l.index_offset.push_back(l.offset[static_cast<int>(p.id)]);
  return l;
}

Dims DimsOf(const BlockConfig& c, const LoraConfig& lora, int64_t batch, int64_t seq) {
  return {batch,
          seq,
          batch * seq,
          c.hidden_size,
          c.q_dim(),
          c.kv_dim(),
          c.q_dim() + 2 * c.kv_dim(),
          c.intermediate_size,
          static_cast<int>(c.num_attention_heads),
          static_cast<int>(c.num_kv_heads),
          static_cast<int>(c.head_dim),
          LoraUColumns(lora)};
}

size_t ActSize(Precision p) { return p == Precision::kBF16 ? 2 : 4; }

size_t SavedBytesFor(const BlockConfig& c, const LoraConfig& lora, Precision p, int64_t batch, int64_t seq) {
  const Dims m = DimsOf(c, lora, batch, seq);
  const size_t t = ActSize(p);
  size_t bytes = 0;
  bytes += m.n * m.d * 4 + m.n * m.d * t + m.n * 4;        // x, n1, rstd1
  bytes += m.n * m.qkv * t;                                // qkv
  if (c.qk_norm) bytes += m.n * (m.heads + m.kv_heads) * 4; // rstd_q, rstd_k
  bytes += m.n * (m.qd + m.kvd) * t;                       // q, k after norm and rope
  bytes += m.seq * (m.dh / 2) * 8;                         // rope table
  bytes += m.n * m.qd * t + m.batch * m.heads * m.seq * 4; // o, lse
  bytes += m.n * m.d * 4 + m.n * 4 + m.n * m.d * t;        // r1, rstd2, n2
  bytes += m.n * 2 * m.f * t;                              // gate|up
  bytes += m.n * m.f * t;                                  // h = silu(gate) * up (kept: saves a pass)
  bytes += m.n * m.lora_u * t;                             // U = x A^T of every LoRA target
  return bytes;
}

size_t RmsWorkspaceFloats(const BlockConfig& c) {
  return static_cast<size_t>(kernels::rmsnorm_bwd_workspace_floats(static_cast<int>(c.hidden_size)));
}
size_t QkWorkspaceFloats(const BlockConfig& c) {
  return static_cast<size_t>(kernels::qknorm_rope_bwd_workspace_floats(static_cast<int>(c.head_dim)));
}
size_t BiasWorkspaceFloats(const BlockConfig& c) {
  if (!c.attention_bias) return 0;
  return static_cast<size_t>(kernels::bias_bwd_workspace_floats(static_cast<int>(c.q_dim() + 2 * c.kv_dim())));
}
size_t InvFreqBytes(const BlockConfig& c) { return static_cast<size_t>(c.head_dim / 2) * sizeof(double); }

size_t CudaBlockBytes(const BlockSpec& spec) {
  const Layout l = MakeLayout(spec.config, spec.lora);
  const size_t p = static_cast<size_t>(l.total);
  const bool bf16 = spec.precision == Precision::kBF16;
  size_t bytes;
  if (spec.frozen) {
    // The weights in the compute dtype; fp32 adapters and 1-D parameters, their gradients (the
    // 1-D ones' a scratch) and the adapters' moments.
    const size_t rest = static_cast<size_t>(l.total - l.adapter_begin);
    const size_t adapters = static_cast<size_t>(l.adapter_end - l.adapter_begin);
    bytes = (bf16 ? 2 * p + 4 * rest : 4 * p) + 4 * rest + 8 * adapters;
  } else {
    bytes = 16 * p;  // weights, gradients, m, v
    if (bf16) bytes += 2 * p;
  }
  bytes += sizeof(kernels::AdamWDeviceParams) + kernels::sum_squares_workspace_doubles() * 8 + 8;
  bytes += (RmsWorkspaceFloats(spec.config) + QkWorkspaceFloats(spec.config) + BiasWorkspaceFloats(spec.config)) * 4;
  bytes += InvFreqBytes(spec.config);
  return bytes;
}

}  // namespace blockd::cuda
