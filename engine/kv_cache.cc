#include "engine/kv_cache.h"

#include <set>

namespace blockd {

KvCache::KvCache(std::vector<int64_t> kv_dims, int64_t batch)
    : kv_dims_(std::move(kv_dims)), tables_(static_cast<size_t>(batch)) {
  // Page layout: per block, K [kPageTokens, kv_dim] then V [kPageTokens, kv_dim].
  for (int64_t d : kv_dims_) {
    block_offset_.push_back(page_floats_);
    page_floats_ += 2 * kPageTokens * d;
  }
}

KvCache::Page::Page(int64_t floats, std::shared_ptr<KvPageCounter> c)
    : data(static_cast<size_t>(floats), 0.f), counter(std::move(c)) {
  if (counter) {
    counter->pages += 1;
    counter->bytes += static_cast<int64_t>(data.size() * sizeof(float));
  }
}

KvCache::Page::Page(const Page& other) : data(other.data), counter(other.counter) {
  if (counter) {
    counter->pages += 1;
    counter->bytes += static_cast<int64_t>(data.size() * sizeof(float));
  }
}

KvCache::Page::~Page() {
  if (counter) {
    counter->pages -= 1;
    counter->bytes -= static_cast<int64_t>(data.size() * sizeof(float));
  }
}

int64_t KvCache::ReservedBytes(const std::vector<int64_t>& kv_dims, int64_t batch, int64_t max_length) {
  int64_t page_floats = 0;
  for (int64_t d : kv_dims) page_floats += 2 * kPageTokens * d;
  const int64_t pages = (max_length + kPageTokens - 1) / kPageTokens;
  return batch * pages * page_floats * static_cast<int64_t>(sizeof(float));
}

int64_t KvCache::DistinctPages() const {
  std::set<const Page*> pages;
  for (const auto& table : tables_) {
    for (const auto& p : table) {
      if (p) pages.insert(p.get());
    }
  }
  return static_cast<int64_t>(pages.size());
}

const float* KvCache::Find(int64_t block, int64_t row, int64_t pos, bool value) const {
  const auto& table = tables_[row];
  const Page& page = *table[pos / kPageTokens];
  const int64_t d = kv_dims_[block];
  return page.data.data() + block_offset_[block] + (value ? kPageTokens * d : 0) + (pos % kPageTokens) * d;
}

float* KvCache::Slot(int64_t block, int64_t row, int64_t pos, bool value) {
  auto& table = tables_[row];
  const size_t index = static_cast<size_t>(pos / kPageTokens);
  if (table.size() <= index) table.resize(index + 1);
  std::shared_ptr<Page>& page = table[index];
  if (!page) {
    page = std::make_shared<Page>(page_floats_, counter_);
  } else if (page.use_count() > 1) {
    // Shared with another row, a fork or the committed cache: this row gets its own copy.
    page = std::make_shared<Page>(*page);
  }
  const int64_t d = kv_dims_[block];
  return page->data.data() + block_offset_[block] + (value ? kPageTokens * d : 0) + (pos % kPageTokens) * d;
}

const float* KvCache::Key(int64_t block, int64_t row, int64_t pos) const { return Find(block, row, pos, false); }
const float* KvCache::Value(int64_t block, int64_t row, int64_t pos) const { return Find(block, row, pos, true); }
float* KvCache::MutableKey(int64_t block, int64_t row, int64_t pos) { return Slot(block, row, pos, false); }
float* KvCache::MutableValue(int64_t block, int64_t row, int64_t pos) { return Slot(block, row, pos, true); }

void KvCache::Reorder(const std::vector<int32_t>& from) {
  std::vector<std::vector<std::shared_ptr<Page>>> next;
  next.reserve(from.size());
  for (int32_t r : from) next.push_back(tables_[r]);
  tables_ = std::move(next);
}

void KvCache::Trim(int64_t length) {
  const size_t keep = static_cast<size_t>((length + kPageTokens - 1) / kPageTokens);
  for (auto& table : tables_) {
    if (table.size() > keep) table.resize(keep);
  }
}

namespace {
class View : public KvBlockView {
 public:
  View(KvCache* cache, int64_t block) : cache_(cache), block_(block) {}
  const float* Key(int64_t row, int64_t pos) const override { return cache_->Key(block_, row, pos); }
  const float* Value(int64_t row, int64_t pos) const override { return cache_->Value(block_, row, pos); }
  float* MutableKey(int64_t row, int64_t pos) override { return cache_->MutableKey(block_, row, pos); }
  float* MutableValue(int64_t row, int64_t pos) override { return cache_->MutableValue(block_, row, pos); }

 private:
  KvCache* cache_;
  int64_t block_;
};
}  // namespace

std::unique_ptr<KvBlockView> KvCache::View(int64_t block) { return std::make_unique<class View>(this, block); }

}  // namespace blockd
