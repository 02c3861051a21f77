// Server-side resources that belong to one caller: today activation handles; inference sessions
// and replica-group memberships are meant to use the same two pieces.
//
// 1. Ids are capabilities: NewResourceId draws 128 bits from the kernel's CSPRNG (getrandom(2)),
//    so no number of a caller's own ids says anything about anyone else's.
// 2. A resource records the identity it was handed to (`Owned::owner`, the string the server
//    derives from the credential), and FindOwned is the one lookup: another identity's id reads
//    exactly as an unknown one, so a caller can neither use another's resource nor learn that it
//    exists. Callers answer a miss with one NOT_FOUND message that does not depend on why.
//
//   struct Session : Owned { ... };
//   std::map<std::string, std::unique_ptr<Session>, std::less<>> sessions;
//   ASSIGN_OR_RETURN(std::string id, NewResourceId("sess-"));
//   auto it = FindOwned(sessions, id, caller);
//   if (it == sessions.end()) return absl::NotFoundError(...);
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace blockd {

struct Owned {
  std::string owner;  // the identity the resource was created for
};

// `prefix` followed by 32 lowercase hex digits (128 bits from getrandom(2), else /dev/urandom).
// INTERNAL only if the kernel gives no random bytes at all.
absl::StatusOr<std::string> NewResourceId(absl::string_view prefix);

namespace internal {
// The read loop behind NewResourceId over `source`, a function with getrandom(2)'s contract
// (getrandom itself in the daemon; tests feed short reads, EINTR and 0). True when `n` bytes came;
// false on an error other than EINTR, or when `source` gives 0 bytes, which getrandom never should
// and which would otherwise loop for ever.
using RandomSource = ssize_t (*)(void* buf, size_t n, unsigned int flags);
bool FillRandom(unsigned char* buf, size_t n, RandomSource source);
}  // namespace internal

// The entry of `table` (a map from id to a pointer to an Owned type) for `id` if `caller` owns it,
// else table.end(): the same answer for an id that does not exist and for one that belongs to
// someone else.
template <class Map>
typename Map::iterator FindOwned(Map& table, absl::string_view id, absl::string_view caller) {
  auto it = table.find(id);
  if (it == table.end() || it->second->owner != caller) return table.end();
  return it;
}

}  // namespace blockd
