#include "engine/session.h"

#include <algorithm>
#include <iterator>

#include "absl/strings/str_cat.h"
#include "base/echo.h"
#include "base/status_macros.h"

namespace blockd {

std::pair<SessionStore::Map::iterator, SessionStore::Map::iterator> SessionStore::RangeOf(absl::string_view owner) {
  auto first = sessions_.lower_bound(Key(std::string(owner), std::string()));
  auto last = first;
  while (last != sessions_.end() && last->first.first == owner) ++last;
  return {first, last};
}

absl::Status SessionStore::CheckRoomLocked(absl::string_view id, absl::string_view owner, int64_t max_per_client) {
  if (sessions_.count(Key(std::string(owner), std::string(id))) != 0) {
    return absl::AlreadyExistsError(absl::StrCat("session ", Echo(id), " already exists"));
  }
  auto [first, last] = RangeOf(owner);
  const int64_t held = std::distance(first, last);
  if (held >= max_per_client) {
    return absl::ResourceExhaustedError(absl::StrCat("client ", Echo(owner), " already holds ", held,
                                                     " inference sessions (limit --max_sessions_per_client=",
                                                     max_per_client, "); close one first"));
  }
  return absl::OkStatus();
}

absl::Status SessionStore::CheckRoom(absl::string_view id, absl::string_view owner, int64_t max_per_client) {
  absl::MutexLock lock(&mu_);
  return CheckRoomLocked(id, owner, max_per_client);
}

absl::Status SessionStore::Add(std::shared_ptr<Session> s, int64_t max_per_client) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(CheckRoomLocked(s->id, s->owner, max_per_client));
  Key key(s->owner, s->id);
  sessions_.emplace(std::move(key), std::move(s));
  return absl::OkStatus();
}

std::shared_ptr<Session> SessionStore::Find(absl::string_view id, absl::string_view caller, absl::Time now) {
  absl::MutexLock lock(&mu_);
  auto it = sessions_.find(Key(std::string(caller), std::string(id)));
  if (it == sessions_.end() || it->second->closed || it->second->expires() <= now) return nullptr;
  return it->second;
}

bool SessionStore::Remove(absl::string_view id, absl::string_view caller) {
  absl::MutexLock lock(&mu_);
  auto it = sessions_.find(Key(std::string(caller), std::string(id)));
  if (it == sessions_.end()) return false;
  it->second->closed = true;
  sessions_.erase(it);
  return true;
}

int64_t SessionStore::CloseReferencing(uint64_t serial) {
  absl::MutexLock lock(&mu_);
  int64_t n = 0;
  for (auto it = sessions_.begin(); it != sessions_.end();) {
    const auto& serials = it->second->block_serials;
    if (std::find(serials.begin(), serials.end(), serial) != serials.end()) {
      it->second->closed = true;
      it = sessions_.erase(it);
      ++n;
    } else {
      ++it;
    }
  }
  return n;
}

int64_t SessionStore::Expire(absl::Time now) {
  absl::MutexLock lock(&mu_);
  int64_t n = 0;
  for (auto it = sessions_.begin(); it != sessions_.end();) {
    if (it->second->expires() <= now) {
      it->second->closed = true;
      it = sessions_.erase(it);
      ++n;
    } else {
      ++it;
    }
  }
  return n;
}

std::vector<std::shared_ptr<Session>> SessionStore::OwnedBy(absl::string_view caller) {
  absl::MutexLock lock(&mu_);
  std::vector<std::shared_ptr<Session>> out;
  auto [first, last] = RangeOf(caller);
  for (auto it = first; it != last; ++it) out.push_back(it->second);
  return out;
}

int64_t SessionStore::size() {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(sessions_.size());
}

std::map<int, int64_t> SessionStore::ReservedBytes() {
  absl::MutexLock lock(&mu_);
  std::map<int, int64_t> out;
  for (const auto& [id, s] : sessions_) {
    for (const auto& [device, bytes] : s->kv_bytes_per_device) out[device] += bytes;
  }
  return out;
}

}  // namespace blockd
