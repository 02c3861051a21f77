// Continuous batching: gathers concurrent inference steps that can share one launch (the same
// span of blocks, the same new_tokens and dtype: one key) into batches, within a short bounded
// window. A step counts as *on its way* from the moment its key is known (Arrive) until it joins a
// batch (Join) or gives up (Leave, a step refused before joining). The first step to join leads:
// it waits until every step of its key on its way has joined (or the batch holds `max_rows` rows,
// or `window` passed), then runs every member's step as one launch and wakes the others, who find
// their results in their Member. So a leader waits only for steps that are really coming: a lone
// step never waits, however many other sessions are open and idle on its span, and the steps of a
// launch already running are not waited for (they are not on their way until they come again).
// The batcher only gathers; what a step is and how a batch runs is the caller's (the Engine's).
//
//   StepBatcher<MyStep> batcher(absl::Microseconds(200));
//   batcher.Arrive(key);             // as soon as the step's key is known
//   if (!valid) { batcher.Leave(key); return error; }  // refused: no leader waits for it
//   MyStep me{...};  me.rows = batch;
//   std::vector<MyStep*> batch = batcher.Join(key, &me, /*max_rows=*/256);
//   if (!batch.empty()) {            // the leader (batch[0] == &me)
//     RunAll(batch);                 // sets every member's result
//     batcher.Finish(batch);         // wakes the others
//   }                                // else another leader ran me.
#pragma once

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

  // A step of `key` is on its way: a leader of `key` waits for it (within the window) until it
  // joins or leaves. Every Arrive is followed by exactly one Join or Leave.
  void Arrive(const std::string& key) {
    absl::MutexLock l(&mu_);
    ++coming_[key];
  }

  // A step that arrived will not join (it was refused): a leader waiting for it stops waiting.
  void Leave(const std::string& key) {
    absl::MutexLock l(&mu_);
    Gone(key);
    auto it = open_.find(key);
    if (it != open_.end() && Full(*it->second)) Close(it);
  }

  // Joins the open batch of `key`, or opens one and leads it (the step must have arrived).
  // `max_rows`: the rows a launch may hold (one value per key). Returns the batch, the caller
  // first, when the caller leads; empty once a leader ran the caller's step (and called Finish).
  // A step of max_rows rows or more runs alone.
  std::vector<Member*> Join(const std::string& key, Member* m, int64_t max_rows) {
    absl::MutexLock l(&mu_);
    Gone(key);
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
    return std::move(b->members);
  }

  // Rows in the open batch of `key` (0: none open), for tests and gauges.
  int64_t OpenRows(const std::string& key) {
    absl::MutexLock l(&mu_);
    auto it = open_.find(key);
    return it == open_.end() ? 0 : it->second->rows;
  }

  // Steps of `key` on their way (arrived, neither joined nor left), for tests.
  int64_t Coming(const std::string& key) {
    absl::MutexLock l(&mu_);
    auto it = coming_.find(key);
    return it == coming_.end() ? 0 : it->second;
  }

  // Wakes the members of a batch (all but the leader, members[0]) after their results were set.
  void Finish(const std::vector<Member*>& members) {
    absl::MutexLock l(&mu_);
    for (size_t i = 1; i < members.size(); ++i) members[i]->batch_done = true;
    cv_.SignalAll();
  }

 private:
  struct Batch {
    std::string key;
    std::vector<Member*> members;
    int64_t rows = 0;
    int64_t max_rows = 1;
    bool closed = false;
  };
  using Open = std::map<std::string, std::shared_ptr<Batch>>;

  // Full: no room for another row, or no other step of its key on its way.
  bool Full(const Batch& b) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return b.rows >= b.max_rows || coming_.count(b.key) == 0;
  }
  // A step of `key` is no longer on its way (it joined or left).
  void Gone(const std::string& key) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto it = coming_.find(key);
    if (it != coming_.end() && --it->second <= 0) coming_.erase(it);
  }
  // No one joins it any more; its leader launches it.
  void Close(typename Open::iterator it) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    it->second->closed = true;
    open_.erase(it);
    cv_.SignalAll();
  }

  const absl::Duration window_;
  absl::Mutex mu_;
  absl::CondVar cv_;  // few waiters (steps in flight): one variable, woken all at once
  Open open_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int64_t> coming_ ABSL_GUARDED_BY(mu_);  // per key: steps on their way
};

}  // namespace blockd
