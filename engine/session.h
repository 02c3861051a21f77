// Inference sessions: a span of blocks, `batch_size` rows and their paged KV cache (kv_cache.h),
// owned by the identity that opened them (owned.h). The Engine runs the steps
// (engine_sessions.cc); this store only keeps sessions, their owners, TTLs and the per-client cap.
// Session ids are the client's names, not capabilities: each identity has its own namespace (the
// store's key is owner and id), so two clients may both call a session "s1", and another identity's
// session reads exactly as an unknown one, whatever the call.
//
//   auto s = std::make_shared<Session>(std::move(cache));  // KvCache::Create
//   s->owner = caller; s->id = id; ...
//   RETURN_IF_ERROR(store.Add(s, /*max_per_client=*/64));
//   std::shared_ptr<Session> found = store.Find(id, caller, absl::Now());  // null: NOT_FOUND
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "base/dtype.h"
#include "engine/kv_cache.h"
#include "engine/memory_budget.h"
#include "engine/owned.h"

namespace blockd {

// What OpenSession, TrimSession, ForkSession and ListSessions report.
struct SessionInfo {
  std::string session_id;
  std::vector<std::string> block_ids;
  int64_t batch_size = 0;
  int64_t max_length = 0;
  int64_t length = 0;    // tokens per row cached so far
  int64_t kv_bytes = 0;  // reserved against the memory budget for the whole cache
  absl::Duration ttl = absl::ZeroDuration();
  absl::Time expires;
};

struct Session : Owned {
  explicit Session(KvCache c) : cache(std::move(c)) {}

  // Fixed at open.
  std::string id;
  std::vector<std::string> block_ids;
  std::vector<uint64_t> block_serials;  // a block deleted and created again is not this session's
  int64_t batch_size = 0;
  int64_t max_length = 0;
  absl::Duration ttl;
  // Bytes reserved against the budget for the whole cache, per device; the family's pool holds
  // the reservations (kv_cache.h), so a closed fork's bytes stay until its family is closed.
  std::map<int, int64_t> kv_bytes_per_device;
  int64_t kv_bytes = 0;

  // Set (never cleared) when the store drops the session: by Close, the TTL sweep or DeleteBlock.
  // An atomic, not `mu`, so that DeleteBlock holding a block's lock never waits for a step.
  std::atomic<bool> closed{false};
  std::atomic<int64_t> expires_ns{0};  // absl::ToUnixNanos; renewed by every call naming it
  void Renew(absl::Time now) { expires_ns = absl::ToUnixNanos(now + ttl); }
  absl::Time expires() const { return absl::FromUnixNanos(expires_ns.load()); }

  absl::Mutex mu;  // serialises the calls that read or change what follows
  KvCache cache ABSL_GUARDED_BY(mu);
  int64_t length ABSL_GUARDED_BY(mu) = 0;
  // The last step's id and output, so a retry of it (the same step_id) is answered again.
  int64_t last_step_id ABSL_GUARDED_BY(mu) = 0;
  std::string last_output ABSL_GUARDED_BY(mu);
  DType last_dtype ABSL_GUARDED_BY(mu) = DType::kFloat32;
  std::vector<int64_t> last_shape ABSL_GUARDED_BY(mu);
  uint64_t last_fingerprint ABSL_GUARDED_BY(mu) = 0;  // of the request, so a retry must repeat it
  // Its steps' table upload and captured launch (StepGraph, EngineOptions::infer_graphs), made at
  // its first step; null where the backend captures nothing or the span crosses devices.
  std::unique_ptr<StepGraph> graph ABSL_GUARDED_BY(mu);
  bool graph_made ABSL_GUARDED_BY(mu) = false;
};

class SessionStore {
 public:
  // ALREADY_EXISTS for an id the owner already uses (another identity's "s1" is no conflict);
  // RESOURCE_EXHAUSTED when the owner already holds `max_per_client` sessions.
  absl::Status Add(std::shared_ptr<Session> s, int64_t max_per_client);
  // What Add would refuse now, for a caller that must know before it commits memory (a fork).
  absl::Status CheckRoom(absl::string_view id, absl::string_view owner, int64_t max_per_client);
  // The caller's open, unexpired session, else null (one answer for unknown, expired and others').
  std::shared_ptr<Session> Find(absl::string_view id, absl::string_view caller, absl::Time now);
  // Closes the caller's session; false as Find would return null.
  bool Remove(absl::string_view id, absl::string_view caller);
  // Closes every session whose span includes the block of this serial; returns how many.
  int64_t CloseReferencing(uint64_t serial);
  // Closes the sessions whose TTL has passed; returns how many.
  int64_t Expire(absl::Time now);
  std::vector<std::shared_ptr<Session>> OwnedBy(absl::string_view caller);
  int64_t size();
  // Device -> bytes the open sessions' KV caches hold reserved against the memory budget.
  std::map<int, int64_t> ReservedBytes();

 private:
  absl::Status CheckRoomLocked(absl::string_view id, absl::string_view owner, int64_t max_per_client)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // (owner, id): one namespace per identity, and an owner's sessions are one range of the map.
  using Key = std::pair<std::string, std::string>;
  using Map = std::map<Key, std::shared_ptr<Session>>;
  // The owner's sessions: [first, second).
  std::pair<Map::iterator, Map::iterator> RangeOf(absl::string_view owner) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Mutex mu_;  // a leaf: never held while taking a session's or a block's lock
  Map sessions_ ABSL_GUARDED_BY(mu_);
};

}  // namespace blockd
