#include "engine/activation_store.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "base/echo.h"
#include "base/status_macros.h"

namespace blockd {

absl::StatusOr<std::string> ActivationStore::Add(std::unique_ptr<ActivationHandle> handle, int64_t max_per_client) {
  for (;;) {
    // Ids are capabilities: 128 random bits (engine/owned.h), drawn outside the lock because the
    // kernel may make us wait and every Backward needs the lock. A repeat is astronomically
    // unlikely, but costs one lookup to rule out.
    ASSIGN_OR_RETURN(std::string id, new_id_());
    absl::MutexLock lock(&mu_);
    const int64_t held = CountLocked(handle->owner);
    if (held >= max_per_client) {
      return absl::ResourceExhaustedError(absl::StrCat("client ", Echo(handle->owner), " already holds ", held,
                                                       " activation handles (limit ", max_per_client,
                                                       "); call Backward or ReleaseActivations first"));
    }
    if (handles_.count(id) == 0) {
      handles_.emplace(id, std::move(handle));
      return id;
    }
  }
}

absl::StatusOr<ActivationHandle*> ActivationStore::Acquire(absl::string_view id, absl::string_view caller) {
  absl::MutexLock lock(&mu_);
  auto it = FindOwned(handles_, id, caller);
  if (it == handles_.end() || it->second->doomed) {
    return absl::NotFoundError(absl::StrCat("activation ", Echo(id),
                                            " not found (already used by Backward, released, or expired)"));
  }
  if (it->second->in_use) {
    return absl::FailedPreconditionError(absl::StrCat("activation ", Echo(id), " is in use by another call"));
  }
  it->second->in_use = true;
  return it->second.get();
}

void ActivationStore::Return(absl::string_view id) {
  absl::MutexLock lock(&mu_);
  auto it = handles_.find(id);
  if (it == handles_.end()) return;
  it->second->in_use = false;
  if (it->second->doomed) handles_.erase(it);
}

void ActivationStore::Erase(absl::string_view id) {
  absl::MutexLock lock(&mu_);
  auto it = handles_.find(id);
  if (it != handles_.end()) handles_.erase(it);
}

template <class Pred>
int64_t ActivationStore::EraseIf(Pred pred) {
  absl::MutexLock lock(&mu_);
  int64_t n = 0;
  for (auto it = handles_.begin(); it != handles_.end();) {
    ActivationHandle& h = *it->second;
    if (h.doomed || !pred(h)) {
      ++it;
      continue;
    }
    ++n;
    if (h.in_use) {  // the Backward using it frees it when it returns it
      h.doomed = true;
      ++it;
    } else {
      it = handles_.erase(it);
    }
  }
  return n;
}

int64_t ActivationStore::EraseReferencing(uint64_t serial) {
  return EraseIf([serial](const ActivationHandle& h) {
    return std::find(h.block_serials.begin(), h.block_serials.end(), serial) != h.block_serials.end();
  });
}

int64_t ActivationStore::Expire(absl::Time now) {
  return EraseIf([now](const ActivationHandle& h) { return h.expires <= now; });
}

int64_t ActivationStore::size() const {
  absl::MutexLock lock(&mu_);
  int64_t n = 0;
  for (const auto& [id, h] : handles_) n += !h->doomed;
  return n;
}

int64_t ActivationStore::CountLocked(absl::string_view client) const {
  int64_t n = 0;
  for (const auto& [id, h] : handles_) n += (h->owner == client && !h->doomed);
  return n;
}

int64_t ActivationStore::CountForClient(absl::string_view client) const {
  absl::MutexLock lock(&mu_);
  return CountLocked(client);
}

}  // namespace blockd
