// Replica groups over Gloo with real daemons: three CPU daemons on loopback (each its own
// process, so a member can be SIGKILLed or SIGSTOPped), as ARCHITECTURE.md "Replica groups" says.
//
// - Three replicas fed different data end bitwise identical (weights and moments) after several
//   group Steps, and equal one daemon fed the mean gradient to rounding (float sums in another
//   order: |a - b| <= 1e-6 + 1e-5 |b|).
// - JoinGroup broadcasts rank 0's weights, moments and step counters.
// - A member SIGKILLed (or stopped) before a group Step: the others answer ABORTED within the
//   group's timeout, unchanged; then a group of the survivors steps.
// - A Step after a group GradNorm reuses its mean gradients (one all-reduce), and still ends
//   replicas bitwise identical.
// - GradNorm + Step.clip_coefficient over two daemons holding different spans equals one daemon
//   running the whole span with max_grad_norm, bitwise.
// - Frozen blocks with LoRA adapters: the group trains the adapters only, the base stays as it was.
// - A Backward naming the group averages each block's gradients as it finishes, and the Step takes
//   that mean: bitwise what averaging at the Step gives, one all-reduce of the gradients per step.
// - Two members of a group on one daemon (replicas on its GPUs) train as members on several do.
// - Bad inputs get a clear status.
// - blockctl's group commands (collective-id, join-group, groups, grad-norm, step --group,
//   step --clip_coefficient, leave-group) against two daemons.
#include <signal.h>

#include <cmath>
#include <thread>

#include "gtest/gtest.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "tests/integration/blockctl_harness.h"
#include "tests/reliability/group_harness.h"
#include "tests/reliability/daemon_process.h"

namespace blockd::testing {
namespace {

constexpr int64_t kGroupTimeoutMs = 20000;

struct Member {
  std::unique_ptr<DaemonProcess> daemon;
  std::unique_ptr<Client> client;
};

v1::Tensor Scaled(const v1::Tensor& t, float s) {
  std::vector<float> v = Floats(t);
  for (float& x : v) x *= s;
  v1::Tensor out = t;
  out.set_data(std::string(reinterpret_cast<const char*>(v.data()), v.size() * 4));
  return out;
}

class GroupTest : public ::testing::Test {
 protected:
  void StartMembers(int n) {
    const std::string dir = MakeTempDir("group");
    for (int i = 0; i < n; ++i) {
      auto d = DaemonProcess::Start(BLOCKD_PATH, {"--collective_host=127.0.0.1"},
                                    dir + "/member" + std::to_string(i) + ".log");
      ASSERT_TRUE(d.ok()) << d.status();
      auto c = Client::Connect({.target = (*d)->target()});
      ASSERT_TRUE(c.ok()) << c.status();
      members_.push_back({*std::move(d), *std::move(c)});
    }
  }
  Client& C(int i) { return *members_[i].client; }

  // JoinGroup on every member in `ranks` at once (rank r on members_[ranks[r]]); the statuses.
  std::vector<absl::Status> Join(const std::string& group, const std::vector<int>& ranks,
                                 const std::vector<std::string>& blocks, int64_t timeout_ms = kGroupTimeoutMs,
                                 std::vector<int> world_sizes = {}) {
    std::vector<Client*> members;
    for (int i : ranks) members.push_back(&C(i));
    return JoinAtOnce(members, group, blocks, timeout_ms, "", std::move(world_sizes));
  }

  // A group Step on every member in `which` at once.
  std::vector<absl::StatusOr<v1::StepResponse>> GroupStep(const std::string& group, const std::vector<int>& which) {
    std::vector<absl::StatusOr<v1::StepResponse>> out(which.size(), absl::UnknownError("not run"));
    std::vector<std::thread> threads;
    for (size_t i = 0; i < which.size(); ++i) {
      threads.emplace_back([&, i] { out[i] = C(which[i]).Step(StepRequestFor(group)); });
    }
    for (std::thread& t : threads) t.join();
    return out;
  }

  static v1::StepRequest StepRequestFor(const std::string& group) { return GroupStepRequest(group); }

  // "ref" on member 0 sees a member's data with its gradient scaled by `scale` (1 / members): it
  // accumulates the mean gradient.
  void FeedReference(const v1::Tensor& x, int64_t dy_seed, float scale) {
    auto y = C(0).Forward({"ref"}, x, true);
    ASSERT_TRUE(y.ok()) << y.status();
    ASSERT_OK(C(0).Backward(y->activation_id(), Scaled(RandomTensor({2, 5, 32}, dy_seed), scale)).status());
  }

  // The group Step's answers agree on the norm, and "ref" steps with the same hyperparameters to
  // the same norm (to rounding).
  void StepReferenceBeside(const std::vector<absl::StatusOr<v1::StepResponse>>& results, int step) {
    for (auto& r : results) ASSERT_TRUE(r.ok()) << r.status();
    for (size_t i = 1; i < results.size(); ++i) EXPECT_EQ(results[0]->grad_norm(), results[i]->grad_norm());
    v1::StepRequest ref;
    ref.add_block_ids("ref");
    *ref.mutable_adamw() = StepRequestFor("g").adamw();
    ref.set_max_grad_norm(0.5);
    auto r = C(0).Step(ref);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_NEAR(r->grad_norm(), results[0]->grad_norm(), 1e-5 * r->grad_norm()) << "step " << step;
  }

  static void ExpectReplicas(const BlockState& a, const BlockState& b, const std::string& what) {
    EXPECT_EQ(DiffSnapshots(a.weights, b.weights), "") << what;
    EXPECT_EQ(DiffSnapshots(a.adam_m, b.adam_m), "") << what;
    EXPECT_EQ(DiffSnapshots(a.adam_v, b.adam_v), "") << what;
    EXPECT_EQ(a.step, b.step) << what;
  }

  // A replica's weights against one daemon's fed the mean gradient: float sums in another order.
  static void ExpectNearReference(const BlockState& got, const BlockState& ref) {
    for (const auto& [name, bytes] : got.weights) {
      const std::vector<float> a = Floats(bytes), b = Floats(ref.weights.at(name));
      ASSERT_EQ(a.size(), b.size());
      for (size_t k = 0; k < a.size(); ++k) {
        ASSERT_LE(std::fabs(a[k] - b[k]), 1e-6 + 1e-5 * std::fabs(b[k]))
            << name << "[" << k << "]: group " << a[k] << ", one daemon on the mean " << b[k];
      }
    }
  }

  std::vector<Member> members_;
};

TEST_F(GroupTest, ABackwardNamingTheGroupAveragesAsItRunsAndTheStepTakesThatMean) {
  ASSERT_NO_FATAL_FAILURE(StartMembers(2));
  // Two groups from the same seeds on the same two daemons: "go" averaged by the Backward as each
  // block finishes, "gp" at the Step. Two members sum exactly (a + b), so they must agree bitwise.
  for (int i = 0; i < 2; ++i) {
    for (const char* prefix : {"o", "p"}) {
      for (int b = 0; b < 2; ++b) {
        ASSERT_OK(C(i).CreateBlock(CreateRequest(absl::StrCat(prefix, b), TinyConfig(), 70 + b)).status());
      }
    }
  }
  for (const absl::Status& s : Join("go", {0, 1}, {"o0", "o1"})) ASSERT_OK(s);
  for (const absl::Status& s : Join("gp", {0, 1}, {"p0", "p1"})) ASSERT_OK(s);
  int64_t params = 0;
  for (const char* id : {"o0", "o1"}) params += C(0).GetBlock(id)->parameter_count();
  for (int step = 0; step < 3; ++step) {
    const int64_t before = C(0).GetGroup("go")->collective_bytes();
    for (int i = 0; i < 2; ++i) {
      const v1::Tensor x = RandomTensor({2, 5, 32}, 100 * step + i), dy = RandomTensor({2, 5, 32}, 900 + 100 * step + i);
      auto yp = C(i).Forward({"p0", "p1"}, x, true);
      ASSERT_TRUE(yp.ok()) << yp.status();
      ASSERT_OK(C(i).Backward(yp->activation_id(), dy).status());
      auto yo = C(i).Forward({"o0", "o1"}, x, true);
      ASSERT_TRUE(yo.ok()) << yo.status();
      v1::BackwardRequest back;
      back.set_activation_id(yo->activation_id());
      *back.mutable_grad_output() = dy;
      back.set_group_id("go");
      // Returns when this member's backward is done; its averaging goes on in the background, and
      // member 1's Backward comes after member 0's returned.
      auto dx = C(i).Backward(back);
      ASSERT_TRUE(dx.ok()) << dx.status();
    }
    // The averaging runs before any Step: the group's bytes grow by the gradients on their own.
    int64_t averaged = 0;
    for (int t = 0; t < 2000 && averaged < 4 * params; ++t) {
      absl::SleepFor(absl::Milliseconds(5));
      averaged = C(0).GetGroup("go")->collective_bytes() - before;
    }
    EXPECT_GE(averaged, 4 * params) << "step " << step << ": the Backward did not average the gradients";
    auto overlapped = GroupStep("go", {0, 1});
    auto plain = GroupStep("gp", {0, 1});
    for (int i = 0; i < 2; ++i) {
      ASSERT_TRUE(overlapped[i].ok()) << overlapped[i].status();
      ASSERT_TRUE(plain[i].ok()) << plain[i].status();
      EXPECT_EQ(overlapped[i]->grad_norm(), plain[i]->grad_norm()) << "step " << step;
    }
    const int64_t by_step = C(0).GetGroup("go")->collective_bytes() - before - averaged;
    EXPECT_LT(by_step, 1024) << "step " << step << ": the Step averaged the gradients again";
  }
  for (int i = 0; i < 2; ++i) {
    for (int b = 0; b < 2; ++b) {
      const BlockState o = StateOf(C(i), absl::StrCat("o", b)), p = StateOf(C(i), absl::StrCat("p", b));
      EXPECT_EQ(DiffSnapshots(o.weights, p.weights), "") << "member " << i << " block " << b;
      EXPECT_EQ(DiffSnapshots(o.adam_m, p.adam_m), "") << "member " << i << " block " << b;
      EXPECT_EQ(DiffSnapshots(o.adam_v, p.adam_v), "") << "member " << i << " block " << b;
    }
  }
  // Bad requests: a handle refused for its group stays usable.
  auto y = C(0).Forward({"o0", "o1"}, RandomTensor({1, 3, 32}, 5), true);
  ASSERT_TRUE(y.ok()) << y.status();
  v1::BackwardRequest bad;
  bad.set_activation_id(y->activation_id());
  *bad.mutable_grad_output() = RandomTensor({1, 3, 32}, 6);
  bad.set_group_id("nope");
  EXPECT_STATUS(C(0).Backward(bad).status(), absl::StatusCode::kNotFound, "no group nope");
  bad.set_group_id("gp");
  EXPECT_STATUS(C(0).Backward(bad).status(), absl::StatusCode::kInvalidArgument, "group gp holds [p0, p1]");
  bad.clear_group_id();
  ASSERT_OK(C(0).Backward(bad).status());
  EXPECT_EQ(C(0).GetGroup("go")->state(), "ready");
}

TEST_F(GroupTest, ReplicasEndBitwiseIdenticalAndEqualOneDaemonOnTheMeanGradient) {
  ASSERT_NO_FATAL_FAILURE(StartMembers(3));
  // Different seeds: the join must make them equal. "ref" on member 0 has rank 0's initial weights.
  for (int i = 0; i < 3; ++i) ASSERT_OK(C(i).CreateBlock(CreateRequest("b0", TinyConfig(), 100 + i)).status());
  ASSERT_OK(C(0).CreateBlock(CreateRequest("ref", TinyConfig(), 100)).status());
  const BlockState rank0 = StateOf(C(0), "b0");
  for (const absl::Status& s : Join("g", {0, 1, 2}, {"b0"})) ASSERT_OK(s);
  for (int i = 1; i < 3; ++i) {
    EXPECT_EQ(DiffSnapshots(rank0.weights, StateOf(C(i), "b0").weights), "") << "member " << i << " after join";
  }
  auto info = C(1).GetGroup("g");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->state(), "ready");
  EXPECT_EQ(info->world_size(), 3);
  EXPECT_EQ(info->backend(), "gloo");

  const int kSteps = 3;
  for (int step = 0; step < kSteps; ++step) {
    std::vector<v1::Tensor> inputs;
    for (int i = 0; i < 3; ++i) {
      inputs.push_back(RandomTensor({2, 5, 32}, 1000 * step + i));
      TrainStep(C(i), {"b0"}, inputs[i], 5000 + 1000 * step + i);
      ASSERT_NO_FATAL_FAILURE(FeedReference(inputs[i], 5000 + 1000 * step + i, 1.f / 3));
    }
    ASSERT_NO_FATAL_FAILURE(StepReferenceBeside(GroupStep("g", {0, 1, 2}), step));
  }
  const BlockState s0 = StateOf(C(0), "b0");
  EXPECT_EQ(s0.step, kSteps);
  for (int i = 1; i < 3; ++i) ExpectReplicas(s0, StateOf(C(i), "b0"), absl::StrCat("member ", i));
  ExpectNearReference(s0, StateOf(C(0), "ref"));
}

// Replicas on several GPUs of one daemon (ARCHITECTURE.md "Replica groups"): one daemon holds
// ranks 0 and 1 of a group (blocks a0 and b0), another rank 2 (c0). Each Step names its member's
// blocks; the three end bitwise identical and equal one daemon fed the mean gradient, as three
// daemons do. On the CPU backend the local members are two block sets in host memory; on CUDA
// each would be on its own GPU, the same protocol.
TEST_F(GroupTest, MembersOfOneGroupOnOneDaemonTrainLikeMembersOnSeveral) {
  ASSERT_NO_FATAL_FAILURE(StartMembers(2));
  ASSERT_OK(C(0).CreateBlock(CreateRequest("a0", TinyConfig(), 100)).status());
  ASSERT_OK(C(0).CreateBlock(CreateRequest("b0", TinyConfig(), 101)).status());
  ASSERT_OK(C(1).CreateBlock(CreateRequest("c0", TinyConfig(), 102)).status());
  ASSERT_OK(C(0).CreateBlock(CreateRequest("ref", TinyConfig(), 100)).status());
  ASSERT_OK(C(0).CreateBlock(CreateRequest("x0", TinyConfig(), 103)).status());
  const BlockState rank0 = StateOf(C(0), "a0");
  for (const absl::Status& s : JoinMembersAtOnce({{&C(0), {"a0"}}, {&C(0), {"b0"}}, {&C(1), {"c0"}}}, "g",
                                                 kGroupTimeoutMs)) {
    ASSERT_OK(s);
  }
  EXPECT_EQ(DiffSnapshots(rank0.weights, StateOf(C(0), "b0").weights), "") << "b0 after the join";
  EXPECT_EQ(DiffSnapshots(rank0.weights, StateOf(C(1), "c0").weights), "") << "c0 after the join";
  auto listed = C(0).ListGroups();
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_EQ(listed->size(), 2u);
  EXPECT_EQ((*listed)[0].rank() + (*listed)[1].rank(), 1);
  auto info = C(0).GetGroup("g");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->rank(), 0);  // the lowest rank here
  EXPECT_EQ(info->world_size(), 3);

  // What the second member on a daemon changes for bad requests.
  EXPECT_STATUS(C(0).Step(StepRequestFor("g")).status(), absl::StatusCode::kInvalidArgument,
                "2 members on this daemon", "names the blocks");
  auto join_x0 = [&](int32_t rank, int32_t world) {
    v1::JoinGroupRequest req;
    req.set_group_id("g");
    req.set_rank(rank);
    req.set_world_size(world);
    req.set_collective_id(C(0).GetCollectiveId()->collective_id());
    req.add_block_ids("x0");
    req.set_timeout_ms(2000);
    return C(0).JoinGroup(req).status();
  };
  EXPECT_STATUS(join_x0(1, 3), absl::StatusCode::kAlreadyExists, "rank 1 of group g already joined");
  EXPECT_STATUS(join_x0(3, 4), absl::StatusCode::kInvalidArgument, "world_size = 4", "has world_size 3");
  v1::StepRequest wrong = StepRequestFor("g");
  wrong.add_block_ids("x0");
  EXPECT_STATUS(C(0).Step(wrong).status(), absl::StatusCode::kInvalidArgument, "holds [a0] and [b0]");

  const std::vector<std::pair<int, std::string>> members = {{0, "a0"}, {0, "b0"}, {1, "c0"}};
  const int kSteps = 2;
  for (int step = 0; step < kSteps; ++step) {
    for (size_t i = 0; i < members.size(); ++i) {
      const v1::Tensor x = RandomTensor({2, 5, 32}, 1000 * step + i);
      const int64_t dy_seed = 5000 + 1000 * step + i;
      TrainStep(C(members[i].first), {members[i].second}, x, dy_seed);
      ASSERT_NO_FATAL_FAILURE(FeedReference(x, dy_seed, 1.f / 3));
    }
    std::vector<absl::StatusOr<v1::StepResponse>> results(members.size(), absl::UnknownError("not run"));
    std::vector<std::thread> threads;
    for (size_t i = 0; i < members.size(); ++i) {
      threads.emplace_back([&, i] {
        v1::StepRequest req = StepRequestFor("g");
        req.add_block_ids(members[i].second);
        results[i] = C(members[i].first).Step(req);
      });
    }
    for (std::thread& t : threads) t.join();
    ASSERT_NO_FATAL_FAILURE(StepReferenceBeside(results, step));
  }
  const BlockState a = StateOf(C(0), "a0");
  EXPECT_EQ(a.step, kSteps);
  for (const auto& [d, id] : members) ExpectReplicas(a, StateOf(C(d), id), id);
  ExpectNearReference(a, StateOf(C(0), "ref"));
  // Leaving takes both of this daemon's members out.
  ASSERT_OK(C(0).LeaveGroup("g"));
  listed = C(0).ListGroups();
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_TRUE(listed->empty());
  EXPECT_STATUS(C(0).GetGroup("g").status(), absl::StatusCode::kNotFound, "no group g");
}

// Frozen blocks with LoRA adapters (the usual fine-tune) form a group: the join copies rank 0's
// base and adapters, the group averages the adapters' gradients (the base has none), and after
// group Steps the replicas are bitwise identical with the base bitwise as it was.
TEST_F(GroupTest, FrozenBlocksWithLoraTrainTheirAdaptersAsOneGroup) {
  ASSERT_NO_FATAL_FAILURE(StartMembers(2));
  for (int i = 0; i < 2; ++i) {
    v1::CreateBlockRequest r = CreateRequest("b0", TinyConfig(), 300 + i);
    r.set_frozen(true);
    r.mutable_lora()->set_rank(4);
    r.mutable_lora()->set_alpha(8);
    for (const char* t : {"q_proj", "v_proj", "down_proj"}) r.mutable_lora()->add_target_modules(t);
    ASSERT_OK(C(i).CreateBlock(r).status());
  }
  const Snapshot rank0 = Download(C(0), "b0", v1::TENSOR_KIND_WEIGHTS);
  for (const absl::Status& s : Join("g", {0, 1}, {"b0"})) ASSERT_OK(s);
  EXPECT_EQ(DiffSnapshots(rank0, Download(C(1), "b0", v1::TENSOR_KIND_WEIGHTS)), "") << "member 1 after join";
  for (int step = 0; step < 2; ++step) {
    for (int i = 0; i < 2; ++i) TrainStep(C(i), {"b0"}, RandomTensor({2, 5, 32}, 700 + 10 * step + i), 900 + i);
    auto results = GroupStep("g", {0, 1});
    for (auto& r : results) ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(results[0]->grad_norm(), results[1]->grad_norm());
  }
  const Snapshot w0 = Download(C(0), "b0", v1::TENSOR_KIND_WEIGHTS);
  EXPECT_EQ(DiffSnapshots(w0, Download(C(1), "b0", v1::TENSOR_KIND_WEIGHTS)), "");
  int adapters_moved = 0;
  for (const auto& [name, bytes] : w0) {
    if (name.find(".lora_") == std::string::npos) {
      EXPECT_EQ(bytes, rank0.at(name)) << name << ": a frozen base changed";
    } else {
      adapters_moved += bytes != rank0.at(name);
    }
  }
  EXPECT_GE(adapters_moved, 3) << "the group Steps moved no lora_B (every one starts at zero)";
}

TEST_F(GroupTest, AKilledMemberAbortsTheOthersUnchangedAndTheSurvivorsRegroup) {
  ASSERT_NO_FATAL_FAILURE(StartMembers(3));
  for (int i = 0; i < 3; ++i) ASSERT_OK(C(i).CreateBlock(CreateRequest("b0", TinyConfig(), 7)).status());
  for (const absl::Status& s : Join("g", {0, 1, 2}, {"b0"}, /*timeout_ms=*/3000)) ASSERT_OK(s);
  for (int i = 0; i < 3; ++i) TrainStep(C(i), {"b0"}, RandomTensor({1, 4, 32}, 10 + i), 20 + i);
  const BlockState before0 = StateOf(C(0), "b0"), before1 = StateOf(C(1), "b0");
  members_[2].daemon->Kill();
  const absl::Time start = absl::Now();
  auto results = GroupStep("g", {0, 1});
  for (auto& r : results) EXPECT_STATUS(r.status(), absl::StatusCode::kAborted, "group g", "nothing was applied");
  // Generous: the 3 s group timeout plus a loaded CI machine; a hang would be the failure.
  EXPECT_LT(absl::Now() - start, absl::Seconds(60));
  EXPECT_EQ(DiffStates(before0, StateOf(C(0), "b0")), "");
  EXPECT_EQ(DiffStates(before1, StateOf(C(1), "b0")), "");
  auto info = C(0).GetGroup("g");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->state(), "failed");
  EXPECT_STATUS(C(0).Step(StepRequestFor("g")).status(), absl::StatusCode::kFailedPrecondition, "group g failed");

  for (const absl::Status& s : Join("g2", {0, 1}, {"b0"})) ASSERT_OK(s);
  auto again = GroupStep("g2", {0, 1});
  for (auto& r : again) ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(DiffSnapshots(StateOf(C(0), "b0").weights, StateOf(C(1), "b0").weights), "");
  ASSERT_OK(C(0).LeaveGroup("g"));
  EXPECT_STATUS(C(0).GetGroup("g").status(), absl::StatusCode::kNotFound, "no group g");
}

TEST_F(GroupTest, AMemberKilledWhileABackwardAveragesAbortsTheStepUnchanged) {
  ASSERT_NO_FATAL_FAILURE(StartMembers(2));
  for (int i = 0; i < 2; ++i) ASSERT_OK(C(i).CreateBlock(CreateRequest("b0", TinyConfig(), 7)).status());
  for (const absl::Status& s : Join("g", {0, 1}, {"b0"}, /*timeout_ms=*/2000)) ASSERT_OK(s);
  const BlockState before = StateOf(C(0), "b0");
  // Member 0's averaging waits in the collective for member 1, which dies instead of joining it.
  auto y = C(0).Forward({"b0"}, RandomTensor({1, 4, 32}, 10), true);
  ASSERT_TRUE(y.ok()) << y.status();
  v1::BackwardRequest back;
  back.set_activation_id(y->activation_id());
  *back.mutable_grad_output() = RandomTensor({1, 4, 32}, 11);
  back.set_group_id("g");
  ASSERT_OK(C(0).Backward(back).status());
  members_[1].daemon->Kill();
  const absl::Time start = absl::Now();
  EXPECT_STATUS(C(0).Step(StepRequestFor("g")).status(), absl::StatusCode::kAborted, "group g");
  EXPECT_LT(absl::Now() - start, absl::Seconds(60));  // the 2 s timeout on a loaded machine; a hang fails
  const BlockState after = StateOf(C(0), "b0");
  EXPECT_EQ(DiffSnapshots(before.weights, after.weights), "");
  EXPECT_EQ(DiffSnapshots(before.adam_m, after.adam_m), "");
  EXPECT_EQ(after.step, before.step);
  EXPECT_EQ(C(0).GetGroup("g")->state(), "failed");
  ASSERT_OK(C(0).LeaveGroup("g"));
  // The block trains on: a plain Step uses its own gradients.
  v1::StepRequest plain = GroupStepRequest("");
  plain.add_block_ids("b0");
  auto r = C(0).Step(plain);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(StateOf(C(0), "b0").step, before.step + 1);
}

TEST_F(GroupTest, AStoppedMemberAbortsTheOthersWithinTheTimeout) {
  ASSERT_NO_FATAL_FAILURE(StartMembers(2));
  for (int i = 0; i < 2; ++i) ASSERT_OK(C(i).CreateBlock(CreateRequest("b0", TinyConfig(), 7)).status());
  for (const absl::Status& s : Join("g", {0, 1}, {"b0"}, /*timeout_ms=*/2000)) ASSERT_OK(s);
  TrainStep(C(0), {"b0"}, RandomTensor({1, 4, 32}, 10), 20);
  const BlockState before = StateOf(C(0), "b0");
  ASSERT_EQ(::kill(members_[1].daemon->pid(), SIGSTOP), 0);
  auto r = C(0).Step(StepRequestFor("g"));
  ::kill(members_[1].daemon->pid(), SIGCONT);
  EXPECT_STATUS(r.status(), absl::StatusCode::kAborted, "group g");
  EXPECT_EQ(DiffStates(before, StateOf(C(0), "b0")), "");
}

// A group GradNorm all-reduces the mean gradients; the group Step right after reuses them rather
// than averaging again (GroupInfo.collective_bytes counts what moved). If any member's gradients
// changed in between, every member reduces again, so the collectives still match.
TEST_F(GroupTest, AStepAfterGroupGradNormReusesItsMeanGradients) {
  ASSERT_NO_FATAL_FAILURE(StartMembers(2));
  for (int i = 0; i < 2; ++i) ASSERT_OK(C(i).CreateBlock(CreateRequest("b0", TinyConfig(), 20 + i)).status());
  for (const absl::Status& s : Join("g", {0, 1}, {"b0"})) ASSERT_OK(s);
  auto bytes_of = [&](int i) {
    auto info = C(i).GetGroup("g");
    EXPECT_TRUE(info.ok()) << info.status();
    return info.ok() ? info->collective_bytes() : int64_t{-1};
  };
  auto grad_norms = [&] {
    std::vector<absl::StatusOr<v1::GradNormResponse>> out(2, absl::UnknownError("not run"));
    std::thread t([&] { out[1] = C(1).GradNorm({}, "g"); });
    out[0] = C(0).GradNorm({"b0"}, "g");
    t.join();
    return out;
  };
  // Step 1, no GradNorm: what one gradient all-reduce (plus the agreement) moves.
  for (int i = 0; i < 2; ++i) TrainStep(C(i), {"b0"}, RandomTensor({2, 5, 32}, 40 + i), 50 + i);
  int64_t before = bytes_of(0);
  for (auto& r : GroupStep("g", {0, 1})) ASSERT_TRUE(r.ok()) << r.status();
  const int64_t full_step = bytes_of(0) - before;

  // Step 2: GradNorm, then Step reusing its mean.
  for (int i = 0; i < 2; ++i) TrainStep(C(i), {"b0"}, RandomTensor({2, 5, 32}, 60 + i), 70 + i);
  before = bytes_of(0);
  auto norms = grad_norms();
  for (auto& n : norms) ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(norms[0]->sum_of_squares(), norms[1]->sum_of_squares());
  EXPECT_TRUE(norms[0]->finite());
  const int64_t grad_norm_bytes = bytes_of(0) - before;
  EXPECT_EQ(grad_norm_bytes, full_step) << "GradNorm moves what a Step's all-reduce does";
  before = bytes_of(0);
  auto steps = GroupStep("g", {0, 1});
  for (auto& r : steps) ASSERT_TRUE(r.ok()) << r.status();
  const int64_t reused_step = bytes_of(0) - before;
  EXPECT_LT(reused_step, full_step / 100) << "the Step after GradNorm all-reduced the gradients again";
  EXPECT_EQ(steps[0]->grad_norm(), steps[1]->grad_norm());
  const double norm = std::sqrt(norms[0]->sum_of_squares());
  EXPECT_NEAR(steps[0]->grad_norm(), norm, 1e-9 * norm) << "Step clipped by another norm than GradNorm's";

  // Step 3: GradNorm, then another Backward on member 1 only: both reduce again (no hang).
  for (int i = 0; i < 2; ++i) TrainStep(C(i), {"b0"}, RandomTensor({2, 5, 32}, 80 + i), 90 + i);
  for (auto& n : grad_norms()) ASSERT_TRUE(n.ok()) << n.status();
  TrainStep(C(1), {"b0"}, RandomTensor({2, 5, 32}, 99), 98);
  before = bytes_of(0);
  for (auto& r : GroupStep("g", {0, 1})) ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(bytes_of(0) - before, full_step) << "a member's gradients changed after GradNorm: reduce again";

  const BlockState s0 = StateOf(C(0), "b0"), s1 = StateOf(C(1), "b0");
  EXPECT_EQ(s0.step, 3);
  EXPECT_EQ(DiffSnapshots(s0.weights, s1.weights), "");
  EXPECT_EQ(DiffSnapshots(s0.adam_m, s1.adam_m), "");
  EXPECT_EQ(DiffSnapshots(s0.adam_v, s1.adam_v), "");
}

TEST_F(GroupTest, GradNormAndClipCoefficientOverTwoDaemonsEqualOneDaemonsClip) {
  ASSERT_NO_FATAL_FAILURE(StartMembers(2));
  // A pipeline: b0 on member 0, b1 on member 1; the same span as r0, r1 on member 0.
  ASSERT_OK(C(0).CreateBlock(CreateRequest("b0", TinyConfig(), 1)).status());
  ASSERT_OK(C(1).CreateBlock(CreateRequest("b1", TinyConfig(), 2)).status());
  ASSERT_OK(C(0).CreateBlock(CreateRequest("r0", TinyConfig(), 1)).status());
  ASSERT_OK(C(0).CreateBlock(CreateRequest("r1", TinyConfig(), 2)).status());
  const v1::Tensor x = RandomTensor({2, 6, 32}, 3), dy = RandomTensor({2, 6, 32}, 4);
  auto h = C(0).Forward({"b0"}, x, true);
  ASSERT_TRUE(h.ok()) << h.status();
  auto y = C(1).Forward({"b1"}, h->output(), true);
  ASSERT_TRUE(y.ok()) << y.status();
  auto dh = C(1).Backward(y->activation_id(), dy);
  ASSERT_TRUE(dh.ok()) << dh.status();
  ASSERT_OK(C(0).Backward(h->activation_id(), dh->grad_input()).status());
  auto yr = C(0).Forward({"r0", "r1"}, x, true);
  ASSERT_TRUE(yr.ok()) << yr.status();
  ASSERT_OK(C(0).Backward(yr->activation_id(), dy).status());

  auto n0 = C(0).GradNorm({"b0"}), n1 = C(1).GradNorm({"b1"});
  ASSERT_TRUE(n0.ok()) << n0.status();
  ASSERT_TRUE(n1.ok()) << n1.status();
  EXPECT_TRUE(n0->finite() && n1->finite());
  const double max_norm = 0.05, norm = std::sqrt(n0->sum_of_squares() + n1->sum_of_squares());
  const double coefficient = std::min(1.0, max_norm / (norm + 1e-6));
  ASSERT_LT(coefficient, 1.0) << "the test must clip";
  for (auto [member, block] : {std::pair{0, "b0"}, std::pair{1, "b1"}}) {
    v1::StepRequest req;
    req.add_block_ids(block);
    req.mutable_adamw()->set_lr(1e-2);
    req.set_clip_coefficient(coefficient);
    ASSERT_OK(C(member).Step(req).status());
  }
  v1::StepRequest ref;
  ref.add_block_ids("r0");
  ref.add_block_ids("r1");
  ref.mutable_adamw()->set_lr(1e-2);
  ref.set_max_grad_norm(max_norm);
  auto r = C(0).Step(ref);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->grad_norm(), norm);
  EXPECT_EQ(r->clip_coefficient(), coefficient);
  EXPECT_EQ(DiffSnapshots(StateOf(C(0), "b0").weights, StateOf(C(0), "r0").weights), "");
  EXPECT_EQ(DiffSnapshots(StateOf(C(1), "b1").weights, StateOf(C(0), "r1").weights), "");
}

TEST_F(GroupTest, BlockctlFormsAGroupStepsItAndLeaves) {
  ASSERT_NO_FATAL_FAILURE(StartMembers(2));
  auto ctl = [&](int i, const std::string& args) {
    return RunBlockctl(absl::StrCat("--target=", members_[i].daemon->target(), " --timeout=120s ", args));
  };
  for (int i = 0; i < 2; ++i) ASSERT_OK(C(i).CreateBlock(CreateRequest("b0", TinyConfig(), 30 + i)).status());
  Ran id = ctl(0, "collective-id");
  ASSERT_EQ(id.exit_code, 0) << id.output;
  const std::string collective_id(absl::StripAsciiWhitespace(id.output));
  EXPECT_RUN(ctl(1, "join-group g b0 --rank=1 --world_size=2 --collective_id=not@base64"), 2, "--collective_id");
  EXPECT_RUN(ctl(1, "join-group g b0 --rank=1 --collective_id=" + collective_id), 2, "--world_size");
  std::vector<Ran> joins(2);
  {
    std::vector<std::thread> threads;
    for (int r = 0; r < 2; ++r) {
      threads.emplace_back([&, r] {
        joins[r] = ctl(r, absl::StrCat("join-group g b0 --rank=", r, " --world_size=2 --timeout_ms=60000 "
                                       "--collective_id=", collective_id));
      });
    }
    for (std::thread& t : threads) t.join();
  }
  EXPECT_RUN(joins[0], 0, "rank        0 of 2 (gloo)");
  EXPECT_RUN(joins[1], 0, "state       ready");
  EXPECT_RUN(ctl(1, "groups"), 0, "1/2");
  EXPECT_RUN(ctl(0, "groups g --json"), 0, "\"world_size\": 2");
  EXPECT_RUN(ctl(0, "groups nope"), 1, "NOT_FOUND");

  // grad-norm and step --group on both members at once; the replicas then agree bitwise.
  for (int i = 0; i < 2; ++i) TrainStep(C(i), {"b0"}, RandomTensor({2, 5, 32}, 130 + i), 140 + i);
  auto on_both = [&](const std::string& args) {
    std::vector<Ran> out(2);
    std::vector<std::thread> threads;
    for (int i = 0; i < 2; ++i) threads.emplace_back([&, i] { out[i] = ctl(i, args); });
    for (std::thread& t : threads) t.join();
    return out;
  };
  std::vector<Ran> norms = on_both("grad-norm --group=g");
  EXPECT_RUN(norms[0], 0, "sum of squares  ");
  EXPECT_EQ(norms[0].output, norms[1].output) << "the members' mean gradients differ";
  std::vector<Ran> steps = on_both("step --group=g --lr=0.01 --max_grad_norm=0.05");
  EXPECT_RUN(steps[0], 0, "step        b0 1");
  EXPECT_EQ(steps[0].output, steps[1].output);
  const BlockState s0 = StateOf(C(0), "b0"), s1 = StateOf(C(1), "b0");
  EXPECT_EQ(DiffSnapshots(s0.weights, s1.weights), "");
  EXPECT_EQ(DiffSnapshots(s0.adam_v, s1.adam_v), "");

  // Outside a group: grad-norm of blocks, then step --clip_coefficient.
  TrainStep(C(0), {"b0"}, RandomTensor({2, 5, 32}, 150), 151);
  EXPECT_RUN(ctl(0, "grad-norm b0"), 0, "finite          yes");
  EXPECT_RUN(ctl(0, "step b0 --clip_coefficient=0.5 --max_grad_norm=1"), 1, "INVALID_ARGUMENT");
  EXPECT_RUN(ctl(0, "step b0 --clip_coefficient=0.5"), 0, "gradients scaled by 0.5");
  EXPECT_RUN(ctl(0, "grad-norm"), 2, "grad-norm takes BLOCK ids, or --group");
  EXPECT_RUN(ctl(0, "leave-group g"), 0, "left group g");
  EXPECT_RUN(ctl(0, "groups"), 0, "no groups");
  EXPECT_RUN(ctl(0, "leave-group g"), 1, "NOT_FOUND");
  EXPECT_RUN(ctl(1, "leave-group g"), 0, "left group g");
}

TEST_F(GroupTest, BadInputsGetClearStatuses) {
  ASSERT_NO_FATAL_FAILURE(StartMembers(2));
  for (int i = 0; i < 2; ++i) ASSERT_OK(C(i).CreateBlock(CreateRequest("b0", TinyConfig(), 7)).status());
  auto id = C(0).GetCollectiveId();
  ASSERT_TRUE(id.ok()) << id.status();
  EXPECT_EQ(id->backend(), "gloo");
  auto join = [&](int32_t rank, int32_t world, const std::string& cid, std::vector<std::string> blocks,
                  const std::string& group = "g") {
    v1::JoinGroupRequest req;
    req.set_group_id(group);
    req.set_rank(rank);
    req.set_world_size(world);
    req.set_collective_id(cid);
    for (const std::string& b : blocks) req.add_block_ids(b);
    req.set_timeout_ms(2000);
    return C(0).JoinGroup(req).status();
  };
  EXPECT_STATUS(join(0, 0, id->collective_id(), {"b0"}), absl::StatusCode::kInvalidArgument, "world_size = 0");
  EXPECT_STATUS(join(2, 2, id->collective_id(), {"b0"}), absl::StatusCode::kInvalidArgument, "rank = 2",
                "expected 0..1");
  EXPECT_STATUS(join(0, 2, "garbage", {"b0"}), absl::StatusCode::kInvalidArgument, "not a Gloo collective id");
  EXPECT_STATUS(join(0, 2, id->collective_id(), {"nope"}), absl::StatusCode::kNotFound, "nope");
  EXPECT_STATUS(join(0, 2, id->collective_id(), {"b0"}, "bad group!"), absl::StatusCode::kInvalidArgument,
                "group_id");
  EXPECT_STATUS(join(0, 2, "", {"b0"}), absl::StatusCode::kInvalidArgument, "collective_id is empty");
  EXPECT_STATUS(C(0).GetCollectiveId("nccl").status(), absl::StatusCode::kFailedPrecondition, "NCCL", "CPU");
  EXPECT_STATUS(C(0).GetCollectiveId("mpi").status(), absl::StatusCode::kInvalidArgument, "expected \"gloo\"");
  // Nobody else comes: the join fails after its timeout and leaves no group behind.
  EXPECT_STATUS(join(0, 2, id->collective_id(), {"b0"}), absl::StatusCode::kAborted, "did not form");
  EXPECT_STATUS(C(0).GetGroup("g").status(), absl::StatusCode::kNotFound, "no group g");
  EXPECT_STATUS(C(0).Step(StepRequestFor("nope")).status(), absl::StatusCode::kNotFound, "no group nope");
  // Members that disagree on world_size both hear why.
  auto mismatch = Join("g", {0, 1}, {"b0"}, 5000, {2, 3});
  EXPECT_STATUS(mismatch[1], absl::StatusCode::kFailedPrecondition, "disagree", "world_size 3", "world_size 2");
  EXPECT_STATUS(mismatch[0], absl::StatusCode::kFailedPrecondition, "disagree");
  // A working group: Step must name its blocks or none; clip_coefficient and max_grad_norm exclude.
  for (const absl::Status& s : Join("g", {0, 1}, {"b0"})) ASSERT_OK(s);
  ASSERT_OK(C(0).CreateBlock(CreateRequest("other", TinyConfig(), 7)).status());
  v1::StepRequest wrong = StepRequestFor("g");
  wrong.add_block_ids("other");
  EXPECT_STATUS(C(0).Step(wrong).status(), absl::StatusCode::kInvalidArgument, "group g holds [b0]");
  v1::StepRequest both = StepRequestFor("g");
  both.set_clip_coefficient(0.5);
  EXPECT_STATUS(C(0).Step(both).status(), absl::StatusCode::kInvalidArgument, "clip_coefficient");
  // A member without gradients makes every member refuse at once, with nothing changed.
  TrainStep(C(0), {"b0"}, RandomTensor({1, 3, 32}, 1), 2);
  auto refused = GroupStep("g", {0, 1});
  EXPECT_STATUS(refused[1].status(), absl::StatusCode::kFailedPrecondition, "b0 has no gradients");
  EXPECT_STATUS(refused[0].status(), absl::StatusCode::kFailedPrecondition, "refused");
  // A block in a working group cannot join another; another client does not see the group.
  EXPECT_STATUS(Join("g3", {0}, {"b0"})[0], absl::StatusCode::kFailedPrecondition, "already in group g");
  auto stranger = Client::Connect({.target = members_[0].daemon->target(), .client_id = "stranger"});
  ASSERT_TRUE(stranger.ok()) << stranger.status();
  EXPECT_STATUS((*stranger)->GetGroup("g").status(), absl::StatusCode::kNotFound, "no group g");
  // Deleting a member block fails the group.
  ASSERT_OK(C(1).DeleteBlock("b0").status());
  auto info = C(1).GetGroup("g");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->state(), "failed");
  EXPECT_NE(info->failure().find("block b0 was deleted"), std::string::npos) << info->failure();
}

}  // namespace
}  // namespace blockd::testing
