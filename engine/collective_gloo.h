// The Gloo implementation of engine/collective.h: collectives over TCP on host memory, for groups
// of CPU-backend blocks. Rendezvous through a TcpStoreServer (engine/tcp_store.h) hosted by rank
// 0's daemon; the collective id is "blockd-gloo/1 HOST PORT NONCE", opaque to clients.
//
//   auto gloo = MakeGlooProvider({.advertise_host = "10.0.0.7"});
//   ASSIGN_OR_RETURN(std::string id, gloo->NewId(absl::Minutes(10)));
#pragma once

#include <memory>
#include <string>

#include "engine/collective.h"

namespace blockd {

struct GlooOptions {
  // The name or address the other members reach this daemon by, for the rendezvous store and for
  // Gloo's own connections ("": this host's name, as gethostname(2) gives it).
  std::string advertise_host;
  int64_t max_pending_ids = 64;  // ids handed out whose group has not connected yet
};

std::unique_ptr<CollectiveProvider> MakeGlooProvider(const GlooOptions& options);

}  // namespace blockd
