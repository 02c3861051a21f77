#include "engine/group.h"

#include <algorithm>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
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
  auto same = groups_.find(g->id);
  if (same != groups_.end()) {
    // Another rank of a group that has members here: the same owner's, the same size, not failed.
    const Group& first = *same->second.front();
    if (first.owner != g->owner) {
      return absl::AlreadyExistsError(absl::StrCat("group ", Echo(g->id), " already exists on this daemon"));
    }
    for (const std::shared_ptr<Group>& m : same->second) {
      if (m->rank == g->rank) {
        return absl::AlreadyExistsError(
            absl::StrCat("rank ", g->rank, " of group ", g->id, " already joined on this daemon"));
      }
      if (m->broken) {
        return absl::FailedPreconditionError(absl::StrCat("group ", g->id, " failed on this daemon (", m->Failure(),
                                                          "): LeaveGroup, then join a new group"));
      }
    }
    if (first.world_size != g->world_size) {
      return absl::InvalidArgumentError(absl::StrCat("world_size = ", g->world_size, ", but group ", g->id,
                                                     " has world_size ", first.world_size, " on this daemon"));
    }
  }
  int64_t owned = 0;
  for (const auto& [id, members] : groups_) {
    for (const std::shared_ptr<Group>& other : members) {
      if (other->owner == g->owner) ++owned;
      if (other->broken) continue;
      for (uint64_t serial : g->block_serials) {
        auto it = std::find(other->block_serials.begin(), other->block_serials.end(), serial);
        if (it == other->block_serials.end()) continue;
        const std::string& block = other->block_ids[it - other->block_serials.begin()];
        return absl::FailedPreconditionError(absl::StrCat(
            "block ", block, " is already in group ", other->owner == g->owner ? id : "of another client",
            ": a block is in one group at a time (LeaveGroup first)"));
      }
    }
  }
  if (owned >= max_per_client) {
    return absl::ResourceExhaustedError(absl::StrCat("this client already holds ", owned, " group members (at most ",
                                                     max_per_client, "): leave a group first"));
  }
  std::vector<std::shared_ptr<Group>>& members = groups_[g->id];
  members.push_back(std::move(g));
  std::sort(members.begin(), members.end(), [](const auto& a, const auto& b) { return a->rank < b->rank; });
  return absl::OkStatus();
}

std::shared_ptr<Group> GroupStore::Find(absl::string_view id, absl::string_view caller) {
  absl::MutexLock l(&mu_);
  auto it = groups_.find(id);
  if (it == groups_.end() || it->second.front()->owner != caller) return nullptr;
  return it->second.front();
}

absl::StatusOr<std::shared_ptr<Group>> GroupStore::FindMember(absl::string_view id, absl::string_view caller,
                                                              const std::vector<std::string>& block_ids,
                                                              const char* rpc) {
  absl::MutexLock l(&mu_);
  auto it = groups_.find(id);
  if (it == groups_.end() || it->second.front()->owner != caller) {
    return absl::NotFoundError(absl::StrCat("no group ", Echo(id), " on this daemon (JoinGroup first)"));
  }
  const std::vector<std::shared_ptr<Group>>& members = it->second;
  if (block_ids.empty()) {
    if (members.size() == 1) return members.front();
    return absl::InvalidArgumentError(absl::StrCat("group ", members.front()->id, " has ", members.size(),
                                                   " members on this daemon: ", rpc,
                                                   " names the blocks of the one it means"));
  }
  const std::set<std::string> named(block_ids.begin(), block_ids.end());
  std::vector<std::string> held;
  for (const std::shared_ptr<Group>& m : members) {
    if (named == std::set<std::string>(m->block_ids.begin(), m->block_ids.end())) return m;
    held.push_back(absl::StrCat("[", absl::StrJoin(m->block_ids, ", "), "]"));
  }
  return absl::InvalidArgumentError(absl::StrCat(rpc, " names blocks [", Echo(absl::StrJoin(block_ids, ", ")),
                                                 "] but group ", members.front()->id, " holds ",
                                                 absl::StrJoin(held, " and "), " here: name all of them, or none"));
}

int64_t GroupStore::Remove(absl::string_view id, absl::string_view caller) {
  std::vector<std::shared_ptr<Group>> out;
  {
    absl::MutexLock l(&mu_);
    auto it = groups_.find(id);
    if (it == groups_.end() || it->second.front()->owner != caller) return 0;
    out = std::move(it->second);
    groups_.erase(it);
  }
  for (const std::shared_ptr<Group>& g : out) g->Break("the group was left");
  return static_cast<int64_t>(out.size());
}

void GroupStore::RemoveMember(const std::shared_ptr<Group>& g) {
  {
    absl::MutexLock l(&mu_);
    auto it = groups_.find(g->id);
    if (it == groups_.end()) return;
    std::vector<std::shared_ptr<Group>>& members = it->second;
    members.erase(std::remove(members.begin(), members.end(), g), members.end());
    if (members.empty()) groups_.erase(it);
  }
  g->Break("the group was left");
}

int64_t GroupStore::BreakReferencing(uint64_t serial, absl::string_view why) {
  absl::MutexLock l(&mu_);
  int64_t n = 0;
  for (const auto& [id, members] : groups_) {
    for (const std::shared_ptr<Group>& g : members) {
      if (std::find(g->block_serials.begin(), g->block_serials.end(), serial) == g->block_serials.end()) continue;
      if (!g->broken) ++n;
      g->Break(why);
    }
  }
  return n;
}

std::vector<std::shared_ptr<Group>> GroupStore::OwnedBy(absl::string_view caller) {
  absl::MutexLock l(&mu_);
  std::vector<std::shared_ptr<Group>> out;
  for (const auto& [id, members] : groups_) {
    for (const std::shared_ptr<Group>& g : members) {
      if (g->owner == caller) out.push_back(g);
    }
  }
  return out;
}

int64_t GroupStore::size() {
  absl::MutexLock l(&mu_);
  int64_t n = 0;
  for (const auto& [id, members] : groups_) n += static_cast<int64_t>(members.size());
  return n;
}

}  // namespace blockd
