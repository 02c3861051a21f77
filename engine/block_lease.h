// A block's lease: how long the block may go unused before the engine's sweep deletes it, and
// when it was last used. A training client that dies (or forgets its blocks) then leaves nothing
// resident. Every call that looks the block up renews the lease, so renewal is lock-free: it sits
// on the path of every Forward and must not serialise calls that share a block.
//
//   BlockLease lease(absl::Minutes(5), now);   // ttl 0: no lease, never expires
//   lease.Renew(now);                           // a call used the block
//   if (lease.Expired(now)) { /* delete the block */ }
#pragma once

#include <atomic>
#include <cstdint>

#include "absl/time/time.h"

namespace blockd {

class BlockLease {
 public:
  BlockLease(absl::Duration ttl, absl::Time now) : ttl_(ttl), last_used_ns_(absl::ToUnixNanos(now)) {}

  absl::Duration ttl() const { return ttl_; }

  // Never moves the last use backwards: concurrent calls may renew with slightly out-of-order times.
  void Renew(absl::Time now) {
    const int64_t t = absl::ToUnixNanos(now);
    int64_t seen = last_used_ns_.load(std::memory_order_relaxed);
    while (seen < t && !last_used_ns_.compare_exchange_weak(seen, t, std::memory_order_relaxed)) {
    }
  }

  // Time since the last use; zero when `now` is earlier (a renewal raced the caller's clock read).
  absl::Duration Idle(absl::Time now) const {
    const absl::Duration idle = now - absl::FromUnixNanos(last_used_ns_.load(std::memory_order_relaxed));
    return idle > absl::ZeroDuration() ? idle : absl::ZeroDuration();
  }

  bool Expired(absl::Time now) const { return ttl_ > absl::ZeroDuration() && Idle(now) >= ttl_; }

 private:
  const absl::Duration ttl_;
  std::atomic<int64_t> last_used_ns_;
};

}  // namespace blockd
