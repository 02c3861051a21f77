// Replica-group test support shared by tests/reliability/group_test.cc (Gloo, CPU daemons) and
// tests/gpu/nccl_group_test.cc (NCCL, CUDA daemons): JoinGroup on every member at once, a Step.
//
//   std::vector<absl::Status> s = JoinAtOnce({&a, &b}, "g", {"b0"}, /*timeout_ms=*/20000);
#pragma once

#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "client/client.h"

namespace blockd::testing {

// GetCollectiveId(`backend`) on members[0], then JoinGroup as rank r on members[r], all at once;
// each member's status. `world_sizes` (one per member) overrides the world size each one says.
inline std::vector<absl::Status> JoinAtOnce(const std::vector<Client*>& members, const std::string& group,
                                            const std::vector<std::string>& blocks, int64_t timeout_ms,
                                            const std::string& backend = "", std::vector<int> world_sizes = {}) {
  auto id = members[0]->GetCollectiveId(backend);
  EXPECT_TRUE(id.ok()) << id.status();
  if (!id.ok()) return std::vector<absl::Status>(members.size(), id.status());
  std::vector<absl::Status> out(members.size());
  std::vector<std::thread> threads;
  for (size_t r = 0; r < members.size(); ++r) {
    threads.emplace_back([&, r] {
      v1::JoinGroupRequest req;
      req.set_group_id(group);
      req.set_rank(static_cast<int32_t>(r));
      req.set_world_size(world_sizes.empty() ? static_cast<int32_t>(members.size()) : world_sizes[r]);
      req.set_collective_id(id->collective_id());
      for (const std::string& b : blocks) req.add_block_ids(b);
      req.set_timeout_ms(timeout_ms);
      out[r] = members[r]->JoinGroup(req).status();
    });
  }
  for (std::thread& t : threads) t.join();
  return out;
}

// A group Step request: AdamW at lr 1e-2, clipped to a gradient norm of 0.5.
inline v1::StepRequest GroupStepRequest(const std::string& group) {
  v1::StepRequest req;
  req.set_group_id(group);
  req.mutable_adamw()->set_lr(1e-2);
  req.set_max_grad_norm(0.5);
  return req;
}

}  // namespace blockd::testing
