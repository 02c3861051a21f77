// One decoder block's inference step on the CPU against a session's KV cache: the same math as
// BlockForward (block_math.h), but the new tokens of each row sit at that row's own positions and
// attend to the K/V the cache holds for the row's earlier positions. Nothing is kept for backward.
//
//   BlockInferStep(config, w, x, batch, new_tokens, start.data(), kv, out);
#pragma once

#include <cstdint>

#include "engine/backend.h"
#include "engine/cpu/block_math.h"

namespace blockd::cpu {

// x, out [batch, n, hidden]; start[r] = row r's cached length. Writes the new K/V into `kv`.
void BlockInferStep(const BlockConfig& c, const BlockParamPtrs<const float>& w, const float* x, int64_t batch,
                    int64_t n, const int64_t* start, KvBlockView& kv, float* out);

}  // namespace blockd::cpu
