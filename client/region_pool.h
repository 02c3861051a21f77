// The regions a client keeps for its activation calls' transport, of one kind (SharedMemoryRegion
// for host tensors, CudaIpcRegion for device tensors): one region per call in flight, taken by a
// call and given back after it, at most kMaxRegions, reused. The first registration the daemon
// refuses for good (no --allow_shared_memory, another host, another GPU, the CPU backend) turns
// the pool off, so later calls fall back at once instead of asking again.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

namespace blockd {

template <class Region>
class RegionPool {
 public:
  static constexpr int kMaxRegions = 8;  // the daemon allows 16 per identity by default
  static constexpr int64_t kMinBytes = 1 << 20;
  using Create = absl::FunctionRef<absl::StatusOr<std::unique_ptr<Region>>(int64_t byte_size)>;

  // An idle region of at least `bytes`, or a new one made by `create`. nullptr when the caller
  // should fall back (the daemon refused this kind of region, or every region is busy); with
  // `insist`, the error instead.
  absl::StatusOr<std::unique_ptr<Region>> Take(int64_t bytes, bool insist, Create create) {
    std::unique_ptr<Region> too_small;  // destroyed (unregistered) outside the lock
    {
      absl::MutexLock lock(&mu_);
      if (refused_ && !insist) return nullptr;
      auto fits = std::find_if(idle_.begin(), idle_.end(), [&](const auto& r) { return r->size() >= bytes; });
      if (fits != idle_.end()) {
        std::unique_ptr<Region> r = std::move(*fits);
        idle_.erase(fits);
        return r;
      }
      if (live_ >= kMaxRegions && !idle_.empty()) {
        too_small = std::move(idle_.back());
        idle_.pop_back();
        --live_;
      }
      if (live_ >= kMaxRegions) {
        if (!insist) return nullptr;
        return absl::ResourceExhaustedError(
            absl::StrCat("the client's ", kMaxRegions, " regions of this kind are all in use by calls in flight"));
      }
      ++live_;
    }
    too_small.reset();
    // Registering says it all: FAILED_PRECONDITION from a daemon without --allow_shared_memory,
    // NOT_FOUND for a POSIX object from one on another host, INVALID_ARGUMENT or FAILED_PRECONDITION
    // for CUDA IPC memory from one on another GPU or the CPU backend.
    absl::StatusOr<std::unique_ptr<Region>> r = create(std::max(bytes, kMinBytes));
    if (r.ok()) return r;
    absl::MutexLock lock(&mu_);
    --live_;
    if (insist) return r.status();
    // A daemon that is only unreachable now is asked again next time; any other answer stands.
    const absl::StatusCode code = r.status().code();
    if (code != absl::StatusCode::kUnavailable && code != absl::StatusCode::kDeadlineExceeded) refused_ = true;
    return nullptr;
  }

  void Give(std::unique_ptr<Region> r) {
    absl::MutexLock lock(&mu_);
    idle_.push_back(std::move(r));
  }

  // A region the daemon no longer has (expired by --shared_memory_ttl): unregistered and freed.
  void Drop(std::unique_ptr<Region> r) {
    r.reset();
    absl::MutexLock lock(&mu_);
    --live_;
  }

  // Whether the daemon refused this kind of region for good (calls fall back).
  bool refused() const {
    absl::MutexLock lock(&mu_);
    return refused_;
  }

 private:
  mutable absl::Mutex mu_;
  std::vector<std::unique_ptr<Region>> idle_ ABSL_GUARDED_BY(mu_);
  int live_ ABSL_GUARDED_BY(mu_) = 0;  // idle and taken
  bool refused_ ABSL_GUARDED_BY(mu_) = false;
};

// Whether a call failed because the daemon no longer has region `name`: unused past its
// --shared_memory_ttl, it was unregistered, and nothing ran (the regions are checked first), so
// the call may be sent again through a new region.
inline bool RegionExpired(const absl::Status& s, absl::string_view name) {
  return s.code() == absl::StatusCode::kNotFound && absl::StrContains(s.message(), name);
}

}  // namespace blockd
