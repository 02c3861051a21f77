// One decoder block's inference step on the CPU against a session's KV cache: the same math as
// BlockForward (block_math.h), but the new tokens of each row sit at that row's own positions and
// attend to the K/V the cache holds for the row's earlier positions. Nothing is kept for backward.
//
//   BlockInferStep(config, w, x, batch, new_tokens, start.data(), kv, out);
#pragma once

#include <cstdint>
#include <vector>

#include "engine/backend.h"
#include "engine/cpu/block_math.h"

namespace blockd::cpu {

// A block's KV pages in host memory, fp32: one chunk per Grow, so a page never moves.
class CpuKvPageStore : public KvPageStore {
 public:
  explicit CpuKvPageStore(int64_t kv_dim);
  int64_t page_bytes() const override { return page_floats_ * static_cast<int64_t>(sizeof(float)); }
  int64_t pages() const override { return pages_; }
  absl::Status Grow(int64_t pages) override;
  absl::Status CopyPage(int32_t from, int32_t to) override;
  float* Page(int32_t id);

 private:
  int64_t page_floats_, pages_ = 0;
  std::vector<std::vector<float>> chunks_;
  std::vector<int64_t> chunk_first_;  // the first page id of each chunk
};

// x, out [batch, n, hidden]; start[r] = row r's cached length. Writes the new K/V into the pages
// of `kv` (CpuKvPageStores), which the caller made this row's own. Each row is computed alone (its
// own products), so a row gives the same bits whatever other rows share the step.
void BlockInferStep(const BlockConfig& c, const BlockParamPtrs<const float>& w, const float* x, int64_t batch,
                    int64_t n, const int64_t* start, const KvBlockView& kv, float* out);

}  // namespace blockd::cpu
