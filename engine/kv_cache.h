// The paged KV cache of one inference session, in host memory (the CPU backend's; a device page
// pool for the CUDA backend is future work).
//
// Tokens are stored in fixed pages of kPageTokens positions; each row has a page table. A page
// holds K and V of its positions for every block of the span, so one table serves the whole span.
// Pages are reference-counted: copying a cache (ForkSession, or the scratch copy a step writes
// into so that a failed step changes nothing) copies page tables only, and the first write to a
// shared page copies that page (copy-on-write). Beam reordering (hypo_ids) moves page tables,
// not data.
//
//   KvCache cache({kv_dim_b0, kv_dim_b1}, /*batch=*/2);
//   KvCache step = cache;                 // shares every page
//   float* k = step.MutableKey(/*block=*/0, /*row=*/1, /*pos=*/17);
//   cache = std::move(step);              // commit
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "engine/backend.h"

namespace blockd {

// Pages and bytes alive in every cache that counts into it (one per Engine, for its gauges and
// GetServerInfo). A page is counted once however many rows, forks or scratch copies share it.
struct KvPageCounter {
  std::atomic<int64_t> pages{0};
  std::atomic<int64_t> bytes{0};
};

class KvCache {
 public:
  static constexpr int64_t kPageTokens = 16;

  KvCache(std::vector<int64_t> kv_dims, int64_t batch);

  int64_t batch() const { return static_cast<int64_t>(tables_.size()); }
  int64_t blocks() const { return static_cast<int64_t>(kv_dims_.size()); }
  // Bytes the cache needs when every row holds `max_length` tokens in pages of its own: what a
  // session reserves up front, so no step can run out of memory.
  static int64_t ReservedBytes(const std::vector<int64_t>& kv_dims, int64_t batch, int64_t max_length);
  // Pages allocated and referenced by this cache (shared ones counted once), for tests and gauges.
  int64_t DistinctPages() const;

  const float* Key(int64_t block, int64_t row, int64_t pos) const;
  const float* Value(int64_t block, int64_t row, int64_t pos) const;
  float* MutableKey(int64_t block, int64_t row, int64_t pos);
  float* MutableValue(int64_t block, int64_t row, int64_t pos);

  // Row i takes row from[i]'s page table (beam search); pages become shared, not copied.
  void Reorder(const std::vector<int32_t>& from);
  // Drops every page wholly past `length` tokens in every row.
  void Trim(int64_t length);

  // Counts this cache's pages (and those of its copies) into `counter` from now on; set before the
  // first page is written.
  void CountPagesIn(std::shared_ptr<KvPageCounter> counter) { counter_ = std::move(counter); }

  // A view of block `block` for Block::InferStep.
  std::unique_ptr<KvBlockView> View(int64_t block);

 private:
  struct Page {
    Page(int64_t floats, std::shared_ptr<KvPageCounter> c);
    Page(const Page& other);
    Page& operator=(const Page&) = delete;
    ~Page();
    std::vector<float> data;
    std::shared_ptr<KvPageCounter> counter;  // null: not counted
  };
  float* Slot(int64_t block, int64_t row, int64_t pos, bool value);  // writable: allocates / copies
  const float* Find(int64_t block, int64_t row, int64_t pos, bool value) const;

  std::vector<int64_t> kv_dims_;
  std::vector<int64_t> block_offset_;  // floats into a page where block b's K begins
  int64_t page_floats_ = 0;
  std::vector<std::vector<std::shared_ptr<Page>>> tables_;  // per row, per page
  std::shared_ptr<KvPageCounter> counter_;
};

}  // namespace blockd
