#include "engine/kv_cache.h"

#include <algorithm>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "base/status_macros.h"

namespace blockd {

// The pages of a family: each block's store, the free page ids and the budget they are held
// against. Shared by the family's caches and by every page reference, so it outlives them all.
class KvPool {
 public:
  KvPool(std::vector<std::unique_ptr<KvPageStore>> stores) : stores_(std::move(stores)) {}

  absl::Status Grow(int64_t pages, std::vector<MemoryReservation> reservations) {
    for (auto& s : stores_) RETURN_IF_ERROR(s->Grow(pages));
    absl::MutexLock l(&mu_);
    for (int64_t i = 0; i < pages; ++i) free_.push_back(static_cast<int32_t>(capacity_ + pages - 1 - i));
    capacity_ += pages;
    for (MemoryReservation& r : reservations) reservations_.push_back(std::move(r));
    return absl::OkStatus();
  }
  absl::StatusOr<int32_t> Allocate() {
    absl::MutexLock l(&mu_);
    if (free_.empty()) {
      return absl::InternalError(absl::StrCat("the KV page pool of ", capacity_, " pages is exhausted"));
    }
    const int32_t id = free_.back();
    free_.pop_back();
    Count(+1);
    return id;
  }
  void Release(int32_t id) {
    absl::MutexLock l(&mu_);
    free_.push_back(id);
    Count(-1);
  }
  void CountIn(std::shared_ptr<KvPageCounter> counter) {
    absl::MutexLock l(&mu_);
    counter_ = std::move(counter);
  }
  absl::Status Copy(int32_t from, int32_t to) {
    for (auto& s : stores_) RETURN_IF_ERROR(s->CopyPage(from, to));
    return absl::OkStatus();
  }
  KvPageStore* store(int64_t block) const { return stores_[static_cast<size_t>(block)].get(); }
  int64_t blocks() const { return static_cast<int64_t>(stores_.size()); }

 private:
  std::vector<std::unique_ptr<KvPageStore>> stores_;  // fixed at creation; grown under the blocks' locks
  absl::Mutex mu_;
  std::vector<int32_t> free_ ABSL_GUARDED_BY(mu_);
  int64_t capacity_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<MemoryReservation> reservations_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<KvPageCounter> counter_ ABSL_GUARDED_BY(mu_);  // null: not counted

  void Count(int64_t sign) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!counter_) return;
    int64_t bytes = 0;
    for (const auto& s : stores_) bytes += s->page_bytes();
    counter_->pages += sign;
    counter_->bytes += sign * bytes;
  }
};

// One reference to a page; the last one gives the id back to the pool.
struct KvCache::PageRef {
  PageRef(std::shared_ptr<KvPool> p, int32_t i) : pool(std::move(p)), id(i) {}
  ~PageRef() { pool->Release(id); }
  PageRef(const PageRef&) = delete;
  PageRef& operator=(const PageRef&) = delete;
  std::shared_ptr<KvPool> pool;
  int32_t id;
};

absl::StatusOr<KvCache> KvCache::Create(std::vector<std::unique_ptr<KvPageStore>> stores, int64_t batch,
                                        int64_t max_length, std::vector<MemoryReservation> reservations) {
  auto pool = std::make_shared<KvPool>(std::move(stores));
  RETURN_IF_ERROR(pool->Grow(PagesFor(batch, max_length), std::move(reservations)));
  return KvCache(std::move(pool), batch);
}

absl::Status KvCache::GrowFamily(int64_t batch, int64_t max_length, std::vector<MemoryReservation> reservations) {
  return pool_->Grow(PagesFor(batch, max_length), std::move(reservations));
}

int64_t KvCache::blocks() const { return pool_->blocks(); }

void KvCache::CountPagesIn(std::shared_ptr<KvPageCounter> counter) { pool_->CountIn(std::move(counter)); }

int64_t KvCache::DistinctPages() const {
  std::set<int32_t> pages;
  for (const auto& table : tables_) {
    for (const auto& p : table) {
      if (p) pages.insert(p->id);
    }
  }
  return static_cast<int64_t>(pages.size());
}

int32_t KvCache::PageId(int64_t row, int64_t pos) const {
  const auto& table = tables_[static_cast<size_t>(row)];
  const size_t i = static_cast<size_t>(pos / kPageTokens);
  return i < table.size() && table[i] ? table[i]->id : -1;
}

absl::Status KvCache::PrepareWrite(const KvCache& committed, int64_t start, int64_t n) {
  const size_t first = static_cast<size_t>(start / kPageTokens);
  const size_t end = static_cast<size_t>((start + n + kPageTokens - 1) / kPageTokens);
  // The committed cache's references to the pages this step writes: those never read the positions
  // it writes (they are past the committed length), so they do not force a copy. A page holds one
  // place's positions, so only the committed tables' entries at those places can name it (a
  // reference missed elsewhere would only cost a needless copy); counted from a sorted list, not
  // a map of every page of every row, which a batch of 64 rebuilt each step.
  std::vector<const PageRef*> held;
  for (const auto& table : committed.tables_) {
    for (size_t i = first; i < std::min(end, table.size()); ++i) {
      if (table[i]) held.push_back(table[i].get());
    }
  }
  std::sort(held.begin(), held.end());
  for (auto& table : tables_) {
    if (table.size() < end) table.resize(end);
    for (size_t i = first; i < end; ++i) {
      std::shared_ptr<PageRef>& page = table[i];
      if (page) {
        const auto [lo, hi] = std::equal_range(held.begin(), held.end(), page.get());
        const long others = page.use_count() - 1 - static_cast<long>(hi - lo);
        if (others == 0) continue;  // this row's own: written in place
      }
      ASSIGN_OR_RETURN(int32_t id, pool_->Allocate());
      auto fresh = std::make_shared<PageRef>(pool_, id);
      // A shared page keeps its earlier positions in the copy; a new one has none to keep.
      if (page) RETURN_IF_ERROR(pool_->Copy(page->id, id));
      page = std::move(fresh);
    }
  }
  return absl::OkStatus();
}

std::vector<int32_t> KvCache::Table(int64_t* width) const {
  size_t w = 0;
  for (const auto& table : tables_) w = std::max(w, table.size());
  std::vector<int32_t> out(tables_.size() * w, -1);
  for (size_t r = 0; r < tables_.size(); ++r) {
    for (size_t i = 0; i < tables_[r].size(); ++i) {
      if (tables_[r][i]) out[r * w + i] = tables_[r][i]->id;
    }
  }
  *width = static_cast<int64_t>(w);
  return out;
}

std::vector<int32_t> KvCache::DeviceMeta(int64_t start, int64_t* width) const {
  constexpr size_t kPadPages = kStepGraphPositions / kKvPageTokens;
  size_t w = 0;
  for (const auto& table : tables_) w = std::max(w, table.size());
  w = (w + kPadPages - 1) / kPadPages * kPadPages;
  const size_t rows = tables_.size();
  std::vector<int32_t> out(rows + rows * w, -1);
  std::fill_n(out.begin(), rows, static_cast<int32_t>(start));
  for (size_t r = 0; r < rows; ++r) {
    for (size_t i = 0; i < tables_[r].size(); ++i) {
      if (tables_[r][i]) out[rows + r * w + i] = tables_[r][i]->id;
    }
  }
  *width = static_cast<int64_t>(w);
  return out;
}

StepGraphKey KvCache::GraphKey(int64_t start, int64_t new_tokens, int64_t width) const {
  StepGraphKey key;
  key.rows = batch();
  key.new_tokens = new_tokens;
  key.table_width = width;
  key.length_bucket = (start + new_tokens + kStepGraphPositions - 1) / kStepGraphPositions;
  key.pages = Store(0)->pages();
  return key;
}

KvBlockView KvCache::View(int64_t block, const std::vector<int32_t>& table, int64_t width) const {
  KvBlockView v;
  v.pages = pool_->store(block);
  v.table = table.data();
  v.table_width = width;
  return v;
}

KvPageStore* KvCache::Store(int64_t block) const { return pool_->store(block); }

void KvCache::Reorder(const std::vector<int32_t>& from) {
  std::vector<std::vector<std::shared_ptr<PageRef>>> next;
  next.reserve(from.size());
  for (int32_t r : from) next.push_back(tables_[static_cast<size_t>(r)]);
  tables_ = std::move(next);
}

void KvCache::Trim(int64_t length) {
  const size_t keep = static_cast<size_t>((length + kPageTokens - 1) / kPageTokens);
  for (auto& table : tables_) {
    if (table.size() > keep) table.resize(keep);
  }
}

}  // namespace blockd
