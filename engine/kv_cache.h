// The paged KV cache of one inference session: page tables on the host, page storage in the
// backend (a KvPageStore per block of the span: host memory on the CPU backend, device memory in
// the block's compute dtype on CUDA).
//
// Tokens sit in fixed pages of kPageTokens positions; each row has a table of page ids, and one
// table serves the whole span (page id p of every block's store holds the same positions). The
// stores belong to a pool that a session shares with its forks (a family): page ids are the
// pool's. Pages are reference-counted: copying a cache (ForkSession, or the scratch copy a step
// works on) copies tables only; before a step writes a page that another session or another row
// still reads, PrepareWrite gives the row a copy (copy-on-write, KvPageStore::CopyPage). Beam
// reordering (hypo_ids) moves tables, not data. A page only the stepping session holds is written
// in place even though its committed cache holds it too: the step writes positions >= the
// committed length, which the committed cache never reads, so a failed step changes nothing.
//
//   ASSIGN_OR_RETURN(KvCache cache, KvCache::Create(std::move(stores), batch, max_length, {}));
//   KvCache step = cache;                              // shares every page
//   RETURN_IF_ERROR(step.PrepareWrite(cache, start, new_tokens));
//   int64_t width;  std::vector<int32_t> table = step.Table(&width);
//   block->InferStep(x, starts, step.View(b, table, width));
//   cache = std::move(step);                           // commit
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/memory_budget.h"

namespace blockd {

class KvPool;

// Pages and bytes alive in every cache that counts into it (one per Engine, for its gauges and
// GetServerInfo). A page is counted once however many rows, forks or scratch copies share it.
struct KvPageCounter {
  std::atomic<int64_t> pages{0};
  std::atomic<int64_t> bytes{0};
};

class KvCache {
 public:
  static constexpr int64_t kPageTokens = kKvPageTokens;

  // Bytes of one page of one block: K and V of kPageTokens positions.
  static int64_t PageBytes(int64_t kv_dim, int64_t element_bytes) { return 2 * kPageTokens * kv_dim * element_bytes; }
  // Pages a session of `batch` rows up to `max_length` tokens adds to its family's pool: every
  // page its rows can hold, plus one per row for the copy a step makes of a page that hypo_ids
  // left shared between rows while the committed tables still hold the originals. This bounds
  // every page the session can ever hold, so a step never runs out of pages.
  static int64_t PagesFor(int64_t batch, int64_t max_length) {
    return batch * ((max_length + kPageTokens - 1) / kPageTokens + 1);
  }
  // What a session reserves against the budget of a device whose blocks of the span have pages
  // of `page_bytes` in all.
  static int64_t ReservedBytes(int64_t page_bytes, int64_t batch, int64_t max_length) {
    return PagesFor(batch, max_length) * page_bytes;
  }

  // A new family: one empty store per block of the span, grown by PagesFor(batch, max_length).
  // The pool keeps `reservations` (the budget's bytes for its pages) until its last cache goes.
  static absl::StatusOr<KvCache> Create(std::vector<std::unique_ptr<KvPageStore>> stores, int64_t batch,
                                        int64_t max_length, std::vector<MemoryReservation> reservations);
  // A fork's room: grows the family's pool by PagesFor(batch, max_length), keeping `reservations`.
  // No step may run on the span's blocks meanwhile (the caller holds their locks).
  absl::Status GrowFamily(int64_t batch, int64_t max_length, std::vector<MemoryReservation> reservations);

  int64_t batch() const { return static_cast<int64_t>(tables_.size()); }
  int64_t blocks() const;
  // Pages referenced by this cache (shared ones counted once), for tests and gauges.
  int64_t DistinctPages() const;
  // The id of the page holding `pos` of `row`, -1 when the row has none there.
  int32_t PageId(int64_t row, int64_t pos) const;

  // Makes positions start..start+n-1 of every row writable: allocates missing pages and copies
  // each page that someone other than this row and `committed` (the session's cache before the
  // step) holds. INTERNAL if the pool ran out, which the reservation rules out.
  absl::Status PrepareWrite(const KvCache& committed, int64_t start, int64_t n);
  // The page tables, [batch, *width] page ids (-1 past a row's pages).
  std::vector<int32_t> Table(int64_t* width) const;
  // KvBlockView::device_meta of a step whose rows all start at `start`: [batch] starts, then the
  // page tables [batch, *width] with the width padded to whole kStepGraphPositions.
  std::vector<int32_t> DeviceMeta(int64_t start, int64_t* width) const;
  // The StepGraphKey of a step of `new_tokens` from `start` with DeviceMeta's `width`, but for
  // its `generation` (the span's blocks', which the caller adds).
  StepGraphKey GraphKey(int64_t start, int64_t new_tokens, int64_t width) const;
  KvBlockView View(int64_t block, const std::vector<int32_t>& table, int64_t width) const;
  // Block `block`'s page store of this cache's family: what a batched step (rows of several
  // families) names per row in KvBlockView::row_pages.
  KvPageStore* Store(int64_t block) const;

  // Row i takes row from[i]'s page table (beam search); pages become shared, not copied.
  void Reorder(const std::vector<int32_t>& from);
  // Drops every page wholly past `length` tokens in every row.
  void Trim(int64_t length);

  // Counts the pages of this cache's family in use into `counter` from now on; set before the
  // first page is written.
  void CountPagesIn(std::shared_ptr<KvPageCounter> counter);

 private:
  struct PageRef;
  KvCache(std::shared_ptr<KvPool> pool, int64_t batch) : pool_(std::move(pool)), tables_(static_cast<size_t>(batch)) {}

  std::shared_ptr<KvPool> pool_;
  std::vector<std::vector<std::shared_ptr<PageRef>>> tables_;  // per row, per page
};

}  // namespace blockd
