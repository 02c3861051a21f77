// Continuous batching: gathers concurrent inference steps that can share one launch (the same
// span of blocks, the same new_tokens and dtype: one key) into batches, within a short bounded
// window. The first step of a batch leads: it waits up to `window` for others (or until the batch
// holds `max_rows` rows, or as many steps as the caller said could come), then runs every
// member's step as one launch and wakes the others, who find their results in their Member.
// The batcher only gathers; what a step is and how a batch runs is the caller's (the Engine's).
//
//   StepBatcher<MyStep> batcher(absl::Microseconds(200));
//   MyStep me{...};  me.rows = batch;
//   std::vector<MyStep*> batch = batcher.Join(key, &me, /*expected=*/sessions_on_span, /*max_rows=*/256);
//   if (!batch.empty()) {            // the leader (batch[0] == &me)
//     RunAll(batch);                 // sets every member's result
//     batcher.Finish(key, batch);    // wakes the others
//   }                                // else another leader ran me.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace blockd {

// Member: any type with `int64_t rows` (its rows in a launch) and `bool batch_done` (set by Finish).
template <class Member>
class StepBatcher {
 public:
  explicit StepBatcher(absl::Duration window) : window_(window) {}

  // Joins the open batch of `key`, or opens one and leads it. `expected`: how many steps could
  // join at most (the sessions on the span), so a leader stops waiting once all of them came;
  // `max_rows`: the rows a launch may hold (one value per key). Returns the batch, the caller
  // first, when the caller leads; empty once a leader ran the caller's step (and called Finish).
  // A step of max_rows rows or more runs alone.
  std::vector<Member*> Join(const std::string& key, Member* m, int64_t expected, int64_t max_rows) {
    absl::MutexLock l(&mu_);
    auto it = open_.find(key);
    if (it != open_.end()) {
      Batch& b = *it->second;
      if (b.rows + m->rows <= b.max_rows) {
        b.members.push_back(m);
        b.rows += m->rows;
        if (Full(b)) Close(it);
        while (!m->batch_done) cv_.Wait(&mu_);
        return {};
      }
      Close(it);  // full for this step: launch it, and start the next batch here
    }
    auto b = std::make_shared<Batch>();
    b->key = key;
    b->members.push_back(m);
    b->rows = m->rows;
    // Steps of batches launched and not yet finished cannot come again before they finish (a
    // session's steps are serialised), so they are not waited for.
    auto running = running_.find(key);
    b->expected = std::max<int64_t>(1, expected - (running == running_.end() ? 0 : running->second));
    b->max_rows = max_rows;
    if (!Full(*b) && window_ > absl::ZeroDuration()) {
      open_[key] = b;
      const absl::Time deadline = absl::Now() + window_;
      while (!b->closed) {
        if (cv_.WaitWithDeadline(&mu_, deadline)) break;  // timed out
      }
      if (!b->closed) {
        auto mine = open_.find(key);
        if (mine != open_.end() && mine->second == b) Close(mine);
      }
    }
    if (!b->counted) Count(*b);  // never opened: full at once, or no window
    return std::move(b->members);
  }

  // Rows in the open batch of `key` (0: none open), for tests and gauges.
  int64_t OpenRows(const std::string& key) {
    absl::MutexLock l(&mu_);
    auto it = open_.find(key);
    return it == open_.end() ? 0 : it->second->rows;
  }

  // Wakes the members of a batch (all but the leader, members[0]) after their results were set.
  void Finish(const std::string& key, const std::vector<Member*>& members) {
    absl::MutexLock l(&mu_);
    for (size_t i = 1; i < members.size(); ++i) members[i]->batch_done = true;
    auto it = running_.find(key);
    if (it != running_.end() && (it->second -= static_cast<int64_t>(members.size())) <= 0) running_.erase(it);
    cv_.SignalAll();
  }

 private:
  struct Batch {
    std::string key;
    std::vector<Member*> members;
    int64_t rows = 0;
    int64_t expected = 1;
    int64_t max_rows = 1;
    bool closed = false;
    bool counted = false;  // its steps are in running_
  };
  using Open = std::map<std::string, std::shared_ptr<Batch>>;

  bool Full(const Batch& b) const {
    return b.rows >= b.max_rows || static_cast<int64_t>(b.members.size()) >= b.expected;
  }
  // No one joins it any more; its leader launches it.
  void Close(typename Open::iterator it) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    it->second->closed = true;
    Count(*it->second);
    open_.erase(it);
    cv_.SignalAll();
  }
  void Count(Batch& b) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    b.counted = true;
    running_[b.key] += static_cast<int64_t>(b.members.size());
  }

  const absl::Duration window_;
  absl::Mutex mu_;
  absl::CondVar cv_;  // few waiters (steps in flight): one variable, woken all at once
  Open open_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int64_t> running_ ABSL_GUARDED_BY(mu_);  // per key: steps launched, not finished
};

}  // namespace blockd
