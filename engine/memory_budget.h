// Per-device memory budgets. Everything a block or an activation handle holds is reserved here
// before it is allocated, so a request that would not fit fails with RESOURCE_EXHAUSTED and
// changes nothing.
//
//   MemoryBudget budget({{0, 80 << 30}});
//   ASSIGN_OR_RETURN(MemoryReservation r, budget.Reserve(0, bytes, "block b0"));
//   // ... r releases the bytes when destroyed
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include "absl/strings/string_view.h"

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace blockd {

class MemoryBudget;

// Bytes reserved on one device; released when destroyed. Movable, not copyable.
class MemoryReservation {
 public:
  MemoryReservation() = default;
  MemoryReservation(MemoryReservation&& o) noexcept { *this = std::move(o); }
  MemoryReservation& operator=(MemoryReservation&& o) noexcept;
  ~MemoryReservation() { Release(); }
  int64_t bytes() const { return bytes_; }
  int device() const { return device_; }
  void Release();

 private:
  friend class MemoryBudget;
  MemoryBudget* budget_ = nullptr;
  int device_ = 0;
  int64_t bytes_ = 0;
};

class MemoryBudget {
 public:
  explicit MemoryBudget(std::map<int, int64_t> limits) : limits_(std::move(limits)) {}

  // RESOURCE_EXHAUSTED naming `what`, the bytes asked and the bytes free when it does not fit.
  absl::StatusOr<MemoryReservation> Reserve(int device, int64_t bytes, absl::string_view what);
  int64_t used(int device) const;
  int64_t limit(int device) const;

 private:
  friend class MemoryReservation;
  void Give(int device, int64_t bytes);

  mutable absl::Mutex mu_;
  std::map<int, int64_t> limits_;
  std::map<int, int64_t> used_ ABSL_GUARDED_BY(mu_);
};

std::string HumanBytes(int64_t bytes);  // "1.50 GiB"

}  // namespace blockd
