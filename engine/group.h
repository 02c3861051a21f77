// Replica groups: daemons (or GPUs) holding the same blocks that average their gradients before
// every optimizer step (data parallelism), owned by the identity that joined them (owned.h). The
// Engine runs the joins and the group steps (engine_groups.cc) through a Collective
// (collective.h); this store only keeps groups, their owners and the per-client cap.
//
//   auto g = std::make_shared<Group>();
//   g->owner = caller; g->id = "g0"; g->block_ids = {"b0", "b1"}; ...
//   RETURN_IF_ERROR(store.Add(g, /*max_per_client=*/16));          // joining: not usable yet
//   std::shared_ptr<Group> found = store.Find("g0", caller);      // null: NOT_FOUND
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "engine/collective.h"
#include "engine/owned.h"

namespace blockd {

// What JoinGroup, GetGroup and ListGroups report.
struct GroupInfo {
  std::string group_id;
  int rank = 0;
  int world_size = 0;
  std::string backend;
  std::vector<std::string> block_ids;
  absl::Duration timeout;
  std::string state;         // "joining", "ready", "failed"
  std::string failure;       // why, when failed
  int64_t steps = 0;         // group steps done
  int64_t payload_bytes = 0; // through the group's collectives
};

// The collectives one group call ran, for metrics.
struct CollectiveUse {
  int64_t calls = 0;
  int64_t bytes = 0;
  double seconds = 0;
  bool aborted = false;  // a collective failed: the group is broken
  // Adds `other`'s into this, and clears `other`.
  void Take(CollectiveUse& other) {
    calls += other.calls;
    bytes += other.bytes;
    seconds += other.seconds;
    aborted = aborted || other.aborted;
    other = CollectiveUse();
  }
};

struct Group;

// The averaging a Backward that names its group starts (Engine::Backward with group_id, host
// collectives only): as each block's backward finishes, the Backward hands over a copy of the
// block's trained gradients, and a thread of its own all-reduces them in the group's fixed order
// (its blocks last to first, which a span's backward follows) while the earlier blocks' backward
// still runs, as DDP's buckets do. The next group call (GradNorm or Step) waits for it and takes
// its mean as if it had all-reduced the gradients itself. While it runs, it is the only user of
// the group's collective: every other group call finishes it first.
class OverlapReduce {
 public:
  // `sizes[k]`: floats of the trained gradients of the group's k-th block. `g` outlives the
  // thread: the group stops it (Stop) before its collective goes.
  OverlapReduce(Group* g, std::vector<size_t> sizes);
  ~OverlapReduce() { Stop(); }
  OverlapReduce(const OverlapReduce&) = delete;
  OverlapReduce& operator=(const OverlapReduce&) = delete;

  // Where the k-th block's gradients go (sizes[k] floats), written by the Backward before Ready(k).
  float* Slot(size_t k) { return mean_.data() + offsets_[k]; }
  // The k-th block's gradients are in their slot, final for this Backward, at this (serial,
  // gradient generation); the thread averages them there.
  void Ready(size_t k, std::pair<uint64_t, uint64_t> version);
  // A block will never be ready (its Backward failed): the thread stops waiting.
  void Cancel();
  // Cancel, then wait for the thread (a collective in flight ends, or times out, first).
  void Stop();
  // Waits for the thread. OK: `*mean` is the group's mean gradients in the group's flat layout
  // (blocks in order, their trained tensors in order) and `*of` their versions. ABORTED: a
  // collective failed (the group is broken); CANCELLED: the Backward failed before the end.
  absl::Status Finish(std::vector<float>* mean, std::vector<std::pair<uint64_t, uint64_t>>* of, CollectiveUse* use);

 private:
  void Run(Group* g);

  std::vector<size_t> sizes_, offsets_;
  absl::Mutex mu_;
  absl::CondVar cv_;
  std::vector<bool> has_ ABSL_GUARDED_BY(mu_);
  std::vector<std::pair<uint64_t, uint64_t>> versions_ ABSL_GUARDED_BY(mu_);
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  // The blocks' slots, in the group's flat layout: each written by the Backward, then averaged in
  // place by the thread after Ready (disjoint ranges, ordered by mu_); taken by Finish.
  std::vector<float> mean_;
  // Written by the thread, read after joining it.
  absl::Status status_;
  CollectiveUse use_;
  absl::Mutex join_mu_;  // Finish and Stop join the thread once
  std::thread thread_ ABSL_GUARDED_BY(join_mu_);
};

struct Group : Owned {
  ~Group() {
    if (overlap != nullptr) overlap->Stop();  // before the collective it uses goes
  }
  // Fixed at join.
  std::string id;
  int rank = 0;
  int world_size = 0;
  std::string backend;
  std::vector<std::string> block_ids;
  std::vector<uint64_t> block_serials;  // a block deleted and created again is not this group's
  absl::Duration timeout;

  std::atomic<bool> joined{false};
  // Set (never cleared) when a collective failed, a member block was deleted or the group left:
  // the group then answers FAILED_PRECONDITION, and its blocks may join another group.
  std::atomic<bool> broken{false};
  std::atomic<int64_t> steps{0};
  std::atomic<int64_t> payload_bytes{0};
  void Break(absl::string_view why) {
    absl::MutexLock l(&failure_mu);
    if (!broken.exchange(true)) failure = std::string(why);
  }
  std::string Failure() const {
    absl::MutexLock l(&failure_mu);
    return failure;
  }

  absl::Mutex mu;  // serialises the group's collectives; taken before any block's lock
  std::unique_ptr<Collective> collective ABSL_GUARDED_BY(mu);
  // The mean gradients the last group GradNorm all-reduced, and the (serial, gradient generation)
  // of each block they were reduced from. The Step that usually follows reuses them when no
  // member's gradients changed since (every member must agree: see StartGroupCall), so one
  // GradNorm + Step all-reduces the gradients once. Emptied by that Step; one gradient-sized
  // buffer at most.
  std::vector<float> mean_grads ABSL_GUARDED_BY(mu);
  std::vector<std::pair<uint64_t, uint64_t>> mean_grads_of ABSL_GUARDED_BY(mu);
  // Instead of mean_grads, for a device collective (NCCL): the GradNorm averaged the blocks'
  // gradients in place, so they are the mean themselves (mean_grads_of says of which generation).
  bool mean_in_place ABSL_GUARDED_BY(mu) = false;
  // An averaging started by a Backward naming this group, until a group call finishes it.
  std::shared_ptr<OverlapReduce> overlap ABSL_GUARDED_BY(mu);
  // What a device collective's averaging inside a Backward ran, for the next group call's metrics.
  CollectiveUse backward_use ABSL_GUARDED_BY(mu);

 private:
  mutable absl::Mutex failure_mu;  // a leaf
  std::string failure ABSL_GUARDED_BY(failure_mu);
};

GroupInfo InfoOf(const Group& g);

// The groups of this daemon: a group id holds one member per rank that joined here (one per GPU
// when a daemon holds several replicas), all of one owner and one world size.
class GroupStore {
 public:
  // ALREADY_EXISTS for an id another client uses or a rank of it that joined here already;
  // INVALID_ARGUMENT for another world size than the id's members here; FAILED_PRECONDITION when
  // a member of the id here failed, or a block of `g` is in another group that has not failed;
  // RESOURCE_EXHAUSTED when the owner already holds `max_per_client` members.
  absl::Status Add(std::shared_ptr<Group> g, int64_t max_per_client);
  // The caller's member of the group with the lowest rank, else null (one answer for unknown and
  // others').
  std::shared_ptr<Group> Find(absl::string_view id, absl::string_view caller);
  // The caller's member holding exactly `block_ids` (any order), or with `block_ids` empty its only
  // member: NOT_FOUND for no group, INVALID_ARGUMENT when no member holds those blocks or several
  // members leave the choice open. `rpc` names the call in the messages.
  absl::StatusOr<std::shared_ptr<Group>> FindMember(absl::string_view id, absl::string_view caller,
                                                    const std::vector<std::string>& block_ids, const char* rpc);
  // Takes the caller's members of the group out (breaking them); how many.
  int64_t Remove(absl::string_view id, absl::string_view caller);
  // Takes this member out (breaking it), if it is still here.
  void RemoveMember(const std::shared_ptr<Group>& g);
  // Breaks every member holding the block of this serial; returns how many.
  int64_t BreakReferencing(uint64_t serial, absl::string_view why);
  std::vector<std::shared_ptr<Group>> OwnedBy(absl::string_view caller);
  int64_t size();

 private:
  absl::Mutex mu_;  // a leaf: never held while taking a group's or a block's lock
  // By id, the members that joined here in rank order.
  std::map<std::string, std::vector<std::shared_ptr<Group>>, std::less<>> groups_ ABSL_GUARDED_BY(mu_);
};

}  // namespace blockd
