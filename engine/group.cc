#include "engine/group.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "base/echo.h"

namespace blockd {

GroupInfo InfoOf(const Group& g) {
  GroupInfo info;
  info.group_id = g.id;
  info.rank = g.rank;
  info.world_size = g.world_size;
  info.backend = g.backend;
  info.block_ids = g.block_ids;
  info.timeout = g.timeout;
  info.state = g.broken ? "failed" : g.joined ? "ready" : "joining";
  info.failure = g.Failure();
  info.steps = g.steps;
  info.payload_bytes = g.payload_bytes;
  return info;
}

absl::Status GroupStore::Add(std::shared_ptr<Group> g, int64_t max_per_client) {
  absl::MutexLock l(&mu_);
  if (groups_.count(g->id) != 0) {
    return absl::AlreadyExistsError(absl::StrCat("group ", Echo(g->id), " already exists on this daemon"));
  }
  int64_t owned = 0;
  for (const auto& [id, other] : groups_) {
    if (other->owner == g->owner) ++owned;
    if (other->broken) continue;
    for (uint64_t serial : g->block_serials) {
      auto it = std::find(other->block_serials.begin(), other->block_serials.end(), serial);
      if (it == other->block_serials.end()) continue;
      const std::string& block = other->block_ids[it - other->block_serials.begin()];
      return absl::FailedPreconditionError(
          absl::StrCat("block ", block, " is already in group ", other->owner == g->owner ? id : "of another client",
                       ": a block is in one group at a time (LeaveGroup first)"));
    }
  }
  if (owned >= max_per_client) {
    return absl::ResourceExhaustedError(
        absl::StrCat("this client already holds ", owned, " groups (at most ", max_per_client, "): leave one first"));
  }
  groups_[g->id] = std::move(g);
  return absl::OkStatus();
}

std::shared_ptr<Group> GroupStore::Find(absl::string_view id, absl::string_view caller) {
  absl::MutexLock l(&mu_);
  auto it = FindOwned(groups_, id, caller);
  return it == groups_.end() ? nullptr : it->second;
}

std::shared_ptr<Group> GroupStore::Remove(absl::string_view id, absl::string_view caller) {
  absl::MutexLock l(&mu_);
  auto it = FindOwned(groups_, id, caller);
  if (it == groups_.end()) return nullptr;
  std::shared_ptr<Group> g = std::move(it->second);
  groups_.erase(it);
  g->Break("the group was left");
  return g;
}

int64_t GroupStore::BreakReferencing(uint64_t serial, absl::string_view why) {
  absl::MutexLock l(&mu_);
  int64_t n = 0;
  for (const auto& [id, g] : groups_) {
    if (std::find(g->block_serials.begin(), g->block_serials.end(), serial) == g->block_serials.end()) continue;
    if (!g->broken) ++n;
    g->Break(why);
  }
  return n;
}

std::vector<std::shared_ptr<Group>> GroupStore::OwnedBy(absl::string_view caller) {
  absl::MutexLock l(&mu_);
  std::vector<std::shared_ptr<Group>> out;
  for (const auto& [id, g] : groups_) {
    if (g->owner == caller) out.push_back(g);
  }
  return out;
}

int64_t GroupStore::size() {
  absl::MutexLock l(&mu_);
  return static_cast<int64_t>(groups_.size());
}

}  // namespace blockd
