// Activation handles: what a Forward with keep_activations saved, until Backward consumes it,
// the client releases it, its block is deleted, or its TTL passes.
//
// A handle belongs to the identity that ran the Forward (see engine/owned.h): Acquire by anyone
// else answers exactly as for an unknown id and leaves the handle alone. A handle in use by a
// Backward is never freed under it: expiry and deletion of its blocks only mark it, and it goes
// when the Backward returns it.
//
//   ASSIGN_OR_RETURN(std::string id, store.Add(std::move(handle), limit));  // "act-<32 hex>"
//   ASSIGN_OR_RETURN(ActivationHandle* h, store.Acquire(id, caller));      // exclusive until Return/Erase
//   store.Erase(id);                                                        // consumed
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "engine/backend.h"
#include "engine/memory_budget.h"
#include "engine/owned.h"

namespace blockd {

// `owner` (from Owned) is also the identity the per-client handle limit counts against.
struct ActivationHandle : Owned {
  std::vector<std::string> block_ids;
  std::vector<uint64_t> block_serials;                   // which incarnation of each id it ran through
  std::vector<std::unique_ptr<SavedActivations>> saved;  // one per block of the span
  int64_t batch = 0, seq = 0, width = 0;                 // the output's shape, which grad_output must have
  int device = 0;  // where the span's last block ran
  std::vector<MemoryReservation> reservations;  // what `saved` holds, per device
  absl::Time expires;
  bool in_use = false;
  bool doomed = false;  // expired or a block deleted while in use: erase when returned
};

class ActivationStore {
 public:
  using IdSource = std::function<absl::StatusOr<std::string>()>;
  // `new_id` names new handles (tests inject their own; the daemon's are "act-" and 128 random bits).
  explicit ActivationStore(IdSource new_id = [] { return NewResourceId("act-"); }) : new_id_(std::move(new_id)) {}

  // Adds a handle under a fresh id from the id source, drawn before the store's lock is taken (it
  // may wait on the kernel); RESOURCE_EXHAUSTED when its owner already holds `max_per_client`.
  absl::StatusOr<std::string> Add(std::unique_ptr<ActivationHandle> handle, int64_t max_per_client);
  // Exclusive use of `caller`'s handle `id`: NOT_FOUND when unknown, expired or another identity's
  // (one message for all three), FAILED_PRECONDITION when another call of the owner is using it.
  absl::StatusOr<ActivationHandle*> Acquire(absl::string_view id, absl::string_view caller);
  // Gives an acquired handle back unchanged (or frees it, if it was doomed meanwhile).
  void Return(absl::string_view id);
  // Frees an acquired handle.
  void Erase(absl::string_view id);
  // Frees every handle whose span runs through block `serial`; returns how many.
  int64_t EraseReferencing(uint64_t serial);
  // Frees handles past their expiry; returns how many.
  int64_t Expire(absl::Time now);
  int64_t size() const;
  int64_t CountForClient(absl::string_view client) const;

 private:
  using Map = std::map<std::string, std::unique_ptr<ActivationHandle>, std::less<>>;
  // The one removal path for handles nobody asked for by id (expiry, deleted blocks): frees those
  // matching `pred` now, or dooms them when a call is using them; returns how many.
  template <class Pred>
  int64_t EraseIf(Pred pred);
  int64_t CountLocked(absl::string_view client) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const IdSource new_id_;
  mutable absl::Mutex mu_;
  Map handles_ ABSL_GUARDED_BY(mu_);
};

}  // namespace blockd
