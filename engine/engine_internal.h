// Engine internals shared by the Engine's files (engine*.cc): a registry entry and the span lock.
// Not for use outside the Engine's own files.
#pragma once

#include <algorithm>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "engine/engine.h"

namespace blockd {

// A fresh Entry::serial: never reused in this process, so a block is told from a later one of the same id.
uint64_t NextBlockSerial();
// FAILED_PRECONDITION for a frozen block asked for what only trained parameters have.
absl::Status FrozenError(const BlockSpec& spec, absl::string_view what);

// One named block. `mu` serialises the calls that compute with or change the block; `state_mu`
// guards the small bookkeeping that GetBlock/ListBlocks read, so they never wait behind a Forward.
struct Engine::Entry {
  Entry(absl::Duration ttl, absl::Time now) : lease(ttl, now) {}

  absl::Mutex mu;
  BlockSpec spec;
  BlockLease lease;
  uint64_t serial = 0;  // distinguishes a block from a later one with the same id
  TensorGenerations generations;  // bumped, with `mu` held, before every change to the tensors
  std::vector<ParamSpec> params;
  std::unique_ptr<Block> block;
  MemoryReservation reservation;

  mutable absl::Mutex state_mu;
  std::vector<bool> loaded ABSL_GUARDED_BY(state_mu);
  bool has_grad ABSL_GUARDED_BY(state_mu) = false;
  int64_t step ABSL_GUARDED_BY(state_mu) = 0;
  std::optional<AdamWHyper> last_adamw ABSL_GUARDED_BY(state_mu);
  bool deleted ABSL_GUARDED_BY(state_mu) = false;

  bool HasGrad() const {
    absl::MutexLock l(&state_mu);
    return has_grad;
  }
  void SetHasGrad(bool v) {
    absl::MutexLock l(&state_mu);
    has_grad = v;
  }
  std::vector<std::string> Missing() const {
    absl::MutexLock l(&state_mu);
    std::vector<std::string> missing;
    for (size_t i = 0; i < params.size(); ++i) {
      if (!loaded[i]) missing.push_back(params[i].name);
    }
    return missing;
  }
};

// Locks the distinct blocks of a span in one global order (by address), so spans that share blocks
// never deadlock, and checks that none was deleted while waiting.
class Engine::SpanLock {
 public:
  explicit SpanLock(const std::vector<EntryPtr>& entries) {
    for (const EntryPtr& e : entries) unique_.push_back(e.get());
    std::sort(unique_.begin(), unique_.end());
    unique_.erase(std::unique(unique_.begin(), unique_.end()), unique_.end());
    for (Entry* e : unique_) e->mu.Lock();
  }
  ~SpanLock() { Unlock(); }
  // Releases the blocks early (then the destructor does nothing).
  void Unlock() {
    for (auto it = unique_.rbegin(); it != unique_.rend(); ++it) (*it)->mu.Unlock();
    unique_.clear();
  }
  absl::Status CheckAlive() const {
    for (Entry* e : unique_) {
      absl::MutexLock l(&e->state_mu);
      if (e->deleted) return absl::NotFoundError(absl::StrCat("block ", e->spec.id, " was deleted"));
    }
    return absl::OkStatus();
  }

 private:
  std::vector<Entry*> unique_;
};

}  // namespace blockd
