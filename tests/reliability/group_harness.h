// Replica-group test support shared by tests/reliability/group_test.cc (Gloo, CPU daemons) and
// tests/gpu/nccl_group_test.cc (NCCL, CUDA daemons): JoinGroup on every member at once, a Step.
//
//   std::vector<absl::Status> s = JoinAtOnce({&a, &b}, "g", {"b0"}, /*timeout_ms=*/20000);
//   s = JoinMembersAtOnce({{&a, {"x0"}}, {&a, {"y0"}}, {&b, {"x0"}}}, "h", 20000);  // two on a
#pragma once

#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "client/client.h"

namespace blockd::testing {

// A member to join: the daemon (its client) and the blocks it joins with.
struct JoiningMember {
  Client* client;
  std::vector<std::string> blocks;
  int world_size = 0;  // 0: the number of members
};

// GetCollectiveId(`backend`) on members[0]'s daemon, then JoinGroup as rank r on members[r], all at
// once; each member's status. Several members may be one daemon's (replicas on its GPUs).
inline std::vector<absl::Status> JoinMembersAtOnce(const std::vector<JoiningMember>& members, const std::string& group,
                                                   int64_t timeout_ms, const std::string& backend = "") {
  auto id = members[0].client->GetCollectiveId(backend);
  EXPECT_TRUE(id.ok()) << id.status();
  if (!id.ok()) return std::vector<absl::Status>(members.size(), id.status());
  std::vector<absl::Status> out(members.size());
  std::vector<std::thread> threads;
  for (size_t r = 0; r < members.size(); ++r) {
    threads.emplace_back([&, r] {
      v1::JoinGroupRequest req;
      req.set_group_id(group);
      req.set_rank(static_cast<int32_t>(r));
      req.set_world_size(members[r].world_size > 0 ? members[r].world_size : static_cast<int32_t>(members.size()));
      req.set_collective_id(id->collective_id());
      for (const std::string& b : members[r].blocks) req.add_block_ids(b);
      req.set_timeout_ms(timeout_ms);
      out[r] = members[r].client->JoinGroup(req).status();
    });
  }
  for (std::thread& t : threads) t.join();
  return out;
}

// The same with one daemon per member, all joining with `blocks`; `world_sizes` (one per member)
// overrides the world size each one says.
inline std::vector<absl::Status> JoinAtOnce(const std::vector<Client*>& members, const std::string& group,
                                            const std::vector<std::string>& blocks, int64_t timeout_ms,
                                            const std::string& backend = "", std::vector<int> world_sizes = {}) {
  std::vector<JoiningMember> joining;
  for (size_t r = 0; r < members.size(); ++r) {
    joining.push_back({members[r], blocks, world_sizes.empty() ? 0 : world_sizes[r]});
  }
  return JoinMembersAtOnce(joining, group, timeout_ms, backend);
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
