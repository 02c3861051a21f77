#include "engine/memory_budget.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace blockd {

MemoryReservation& MemoryReservation::operator=(MemoryReservation&& o) noexcept {
  if (this != &o) {
    Release();
    budget_ = o.budget_;
    device_ = o.device_;
    bytes_ = o.bytes_;
    o.budget_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}

void MemoryReservation::Release() {
  if (budget_ != nullptr && bytes_ > 0) budget_->Give(device_, bytes_);
  budget_ = nullptr;
  bytes_ = 0;
}

absl::StatusOr<MemoryReservation> MemoryBudget::Reserve(int device, int64_t bytes, absl::string_view what) {
  auto limit_it = limits_.find(device);
  if (limit_it == limits_.end()) {
    return absl::InvalidArgumentError(absl::StrCat("device ", device, " does not exist"));
  }
  absl::MutexLock lock(&mu_);
  int64_t& used = used_[device];
  if (bytes < 0 || bytes > limit_it->second - used) {
    return absl::ResourceExhaustedError(absl::StrCat(
        what, " needs ", HumanBytes(bytes), " on device ", device, ", but only ",
        HumanBytes(limit_it->second - used), " of its ", HumanBytes(limit_it->second), " memory budget is free"));
  }
  used += bytes;
  MemoryReservation r;
  r.budget_ = this;
  r.device_ = device;
  r.bytes_ = bytes;
  return r;
}

void MemoryBudget::Give(int device, int64_t bytes) {
  absl::MutexLock lock(&mu_);
  used_[device] -= bytes;
}

int64_t MemoryBudget::used(int device) const {
  absl::MutexLock lock(&mu_);
  auto it = used_.find(device);
  return it == used_.end() ? 0 : it->second;
}

int64_t MemoryBudget::limit(int device) const {
  auto it = limits_.find(device);
  return it == limits_.end() ? 0 : it->second;
}

std::string HumanBytes(int64_t bytes) {
  const double b = static_cast<double>(bytes);
  if (b >= (1ll << 30)) return absl::StrFormat("%.2f GiB", b / (1ll << 30));
  if (b >= (1ll << 20)) return absl::StrFormat("%.2f MiB", b / (1ll << 20));
  if (b >= (1ll << 10)) return absl::StrFormat("%.2f KiB", b / (1ll << 10));
  return absl::StrCat(bytes, " B");
}

}  // namespace blockd
