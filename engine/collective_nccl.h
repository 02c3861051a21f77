// The NCCL implementation of engine/collective.h, for replica groups of CUDA blocks (built with the
// CUDA backend only). Rank 0's daemon hosts the same rendezvous store as Gloo's (engine/tcp_store.h);
// the collective id is "blockd-nccl/1 HOST PORT NONCE". Through the store the members agree on their
// terms, show each other their GPU's UUID (two members on one GPU cannot share a communicator:
// FAILED_PRECONDITION), and rank 0 publishes ncclGetUniqueId's bytes. The communicator is
// non-blocking (config.blocking = 0), so its setup and every collective are bounded by the group's
// timeout: past it, or when NCCL reports a peer gone, ncclCommAbort and ABORTED.
//
// Gradients are reduced in place in device memory (ncclAvg on the block's stream, one call per
// block's contiguous gradient buffer); the small host-memory calls (the members' agreement flags, the
// join's broadcast of rank 0's state) are staged through a device buffer of the communicator's own.
//
// NVLink multicast (NVLS) stays off: the provider sets NCCL_NVLS_ENABLE=0 before NCCL's first call
// unless the environment already says otherwise; NVLS can put a shared host's GPUs out of service.
//
//   auto nccl = MakeNcclProvider({.advertise_host = "10.0.0.7"});
//   ASSIGN_OR_RETURN(std::string id, nccl->NewId(absl::Minutes(10)));           // rank 0's daemon
//   ASSIGN_OR_RETURN(auto c, nccl->Connect(id, rank, world, terms, timeout, /*device=*/0));
//   RETURN_IF_ERROR(c->AllReduceMeanOnDevice(grads, n, stream));
#pragma once

#include <memory>
#include <string>

#include "engine/collective.h"

namespace blockd {

struct NcclOptions {
  // The name or address the other members reach this daemon's rendezvous store by ("": hostname).
  std::string advertise_host;
  int64_t max_pending_ids = 64;
};

std::unique_ptr<CollectiveProvider> MakeNcclProvider(const NcclOptions& options);

// NCCL's version as "2.28.3" (the library loaded), for the log.
std::string NcclVersion();

}  // namespace blockd
