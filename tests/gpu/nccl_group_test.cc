// Replica groups of CUDA blocks over NCCL (engine/collective_nccl.h), with real CUDA daemons, each
// its own process started with CUDA_VISIBLE_DEVICES naming its GPU, so a member can be SIGKILLed or
// SIGSTOPped. Built twice from this file:
//
// nccl_group_test (label gpu: what one GPU allows)
// - A group of one on one GPU: GetCollectiveId picks NCCL, the group's GradNorm leaves the
//   gradients as they were (the mean of one), and its Step equals a plain Step of a twin block.
// - A Backward naming the group averages as it runs (the Step after reduces nothing again); a span
//   out of the group's order is refused.
// - Two members on the same GPU: NCCL cannot, so both are refused with FAILED_PRECONDITION naming
//   the GPU; the same two daemons form a group through Gloo when asked, and step identically.
// - A CPU daemon and a CUDA daemon: an NCCL id is refused on the CPU one; a Gloo group of the two
//   is refused on both (their terms name the backends).
//
// nccl_multigpu_test (labels gpu;multigpu: fails, not skips, with fewer than 2 GPUs)
// - A member per visible GPU: after the group's GradNorm every member's gradients equal the mean
//   of the members' gradients computed here on the host (float sums in NCCL's order against a
//   double sum: |a - b| <= 1e-6 + 1e-5 |b|), bitwise the same on all; after the Step every
//   member holds bitwise-identical weights and moments.
// - Backwards naming the group, at once on every member: the gradients are the members' mean
//   before any Step, bitwise the same on all.
// - A member SIGKILLed, or SIGSTOPped, before a group Step: the others answer ABORTED within the
//   group's timeout with nothing changed, and a group of the survivors steps.
#include <cuda_runtime.h>
#include <signal.h>

#include <cmath>
#include <cstdlib>
#include <iostream>
#include <thread>

#include "gtest/gtest.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "tests/integration/harness.h"
#include "tests/reliability/daemon_process.h"
#include "tests/reliability/group_harness.h"

namespace blockd::testing {
namespace {

constexpr int64_t kGroupTimeoutMs = 30000;

// The daemon: BLOCKD_BINARY when set (the GPU host runs a bundle, bench/device/run_checks.sh), else
// the one built beside this test.
std::string BlockdPath() {
  const char* env = std::getenv("BLOCKD_BINARY");
  return env != nullptr && env[0] != '\0' ? env : BLOCKD_PATH;
}

// The GPUs this test may use, as CUDA_VISIBLE_DEVICES entries for the daemons.
std::vector<std::string> VisibleGpus() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) n = 0;
  std::vector<std::string> out;
  const char* env = std::getenv("CUDA_VISIBLE_DEVICES");
  std::vector<std::string> listed;
  if (env != nullptr && env[0] != '\0') listed = absl::StrSplit(env, ',');
  for (int i = 0; i < n; ++i) out.push_back(i < static_cast<int>(listed.size()) ? listed[i] : std::to_string(i));
  return out;
}

class NcclGroupTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { gpus_ = new std::vector<std::string>(VisibleGpus()); }
  void SetUp() override {
    if (gpus_->empty()) GTEST_SKIP() << "no GPU";
  }

  // A CUDA daemon on `gpu` (a CUDA_VISIBLE_DEVICES entry), or a CPU daemon when `gpu` is empty.
  void StartMember(const std::string& gpu) {
    if (dir_.empty()) dir_ = MakeTempDir("nccl_group");
    ::setenv("CUDA_VISIBLE_DEVICES", gpu.empty() ? "" : gpu.c_str(), 1);
    ::setenv("NCCL_NVLS_ENABLE", "0", 0);  // never NVLink multicast on a shared host (the daemon sets it too)
    auto d = DaemonProcess::Start(
        BlockdPath(), {"--collective_host=127.0.0.1", gpu.empty() ? "--backend=cpu" : "--backend=cuda"},
        absl::StrCat(dir_, "/member", members_.size(), ".log"));
    ASSERT_TRUE(d.ok()) << d.status();
    auto c = Client::Connect({.target = (*d)->target()});
    ASSERT_TRUE(c.ok()) << c.status();
    members_.push_back({*std::move(d), *std::move(c)});
  }
  void TearDown() override {
    if (!HasFailure()) return;
    for (size_t i = 0; i < members_.size(); ++i) {  // the tail: the device run returns little
      const std::string log = members_[i].daemon->Log();
      std::cout << "---- member " << i << " log (tail)\n" << log.substr(log.size() > 3000 ? log.size() - 3000 : 0);
    }
  }
  Client& C(int i) { return *members_[i].client; }

  // JoinGroup on members `which` at once (rank r on members_[which[r]]) with an id of `backend`.
  std::vector<absl::Status> Join(const std::string& group, const std::vector<int>& which,
                                 const std::vector<std::string>& blocks, int64_t timeout_ms = kGroupTimeoutMs,
                                 const std::string& backend = "") {
    std::vector<Client*> members;
    for (int i : which) members.push_back(&C(i));
    return JoinAtOnce(members, group, blocks, timeout_ms, backend);
  }

  template <class Call>
  auto OnAll(const std::vector<int>& which, Call call) {
    using R = decltype(call(0));
    std::vector<R> out(which.size(), R(absl::UnknownError("not run")));
    std::vector<std::thread> threads;
    for (size_t i = 0; i < which.size(); ++i) threads.emplace_back([&, i] { out[i] = call(which[i]); });
    for (std::thread& t : threads) t.join();
    return out;
  }

  auto GroupStep(const std::string& group, const std::vector<int>& which) {
    return OnAll(which, [&](int i) { return C(i).Step(StepRequestFor(group)); });
  }
  auto GroupGradNorm(const std::string& group, const std::vector<int>& which) {
    return OnAll(which, [&](int i) { return C(i).GradNorm({}, group); });
  }

  static v1::StepRequest StepRequestFor(const std::string& group) { return GroupStepRequest(group); }

  // Forward + Backward of `ids` on member i; the Backward averages over `group` (a collective call
  // on NCCL: every member at once, see OnAll).
  absl::Status BackwardInGroup(int i, const std::vector<std::string>& ids, const std::string& group, uint64_t seed) {
    auto y = C(i).Forward(ids, RandomTensor({2, 5, 32}, seed), true);
    if (!y.ok()) return y.status();
    v1::BackwardRequest back;
    back.set_activation_id(y->activation_id());
    *back.mutable_grad_output() = RandomTensor({2, 5, 32}, seed + 1);
    back.set_group_id(group);
    return C(i).Backward(back).status();
  }
  int64_t GroupBytes(int i, const std::string& group) {
    auto info = C(i).GetGroup(group);
    EXPECT_TRUE(info.ok()) << info.status();
    return info.ok() ? info->collective_bytes() : -1;
  }

  struct Member {
    std::unique_ptr<DaemonProcess> daemon;
    std::unique_ptr<Client> client;
  };
  static std::vector<std::string>* gpus_;
  std::string dir_;
  std::vector<Member> members_;
};

std::vector<std::string>* NcclGroupTest::gpus_ = nullptr;

// Every element of `got` within |a - b| <= 1e-6 + 1e-5 |b| of `want`; "" or the first that is not.
std::string NearlyEqual(const Snapshot& got, const std::map<std::string, std::vector<double>>& want) {
  for (const auto& [name, bytes] : got) {
    const std::vector<float> a = Floats(bytes);
    const std::vector<double>& b = want.at(name);
    if (a.size() != b.size()) return absl::StrCat(name, ": ", a.size(), " values, expected ", b.size());
    for (size_t k = 0; k < a.size(); ++k) {
      if (std::fabs(a[k] - b[k]) > 1e-6 + 1e-5 * std::fabs(b[k])) {
        return absl::StrCat(name, "[", k, "] = ", a[k], ", the host's mean ", b[k]);
      }
    }
  }
  return "";
}

#ifndef BLOCKD_MULTIGPU

TEST_F(NcclGroupTest, AGroupOfOneOnOneGpuStepsLikeAPlainStep) {
  ASSERT_NO_FATAL_FAILURE(StartMember((*gpus_)[0]));
  ASSERT_OK(C(0).CreateBlock(CreateRequest("b0", TinyConfig(), 5)).status());
  ASSERT_OK(C(0).CreateBlock(CreateRequest("twin", TinyConfig(), 5)).status());
  auto id = C(0).GetCollectiveId();
  ASSERT_TRUE(id.ok()) << id.status();
  EXPECT_EQ(id->backend(), "nccl") << "CUDA blocks pick NCCL";
  for (const absl::Status& s : Join("g", {0}, {"b0"})) ASSERT_OK(s);
  auto info = C(0).GetGroup("g");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->backend(), "nccl");
  EXPECT_EQ(info->state(), "ready");

  for (int step = 0; step < 2; ++step) {
    const v1::Tensor x = RandomTensor({2, 5, 32}, 100 + step);
    TrainStep(C(0), {"b0"}, x, 200 + step);
    TrainStep(C(0), {"twin"}, x, 200 + step);
    const Snapshot grads = Download(C(0), "b0", v1::TENSOR_KIND_GRADIENTS);
    auto plain = C(0).GradNorm({"b0"}, "");
    ASSERT_TRUE(plain.ok()) << plain.status();
    auto norms = GroupGradNorm("g", {0});
    ASSERT_TRUE(norms[0].ok()) << norms[0].status();
    EXPECT_EQ(norms[0]->sum_of_squares(), plain->sum_of_squares()) << "the mean of one is itself";
    EXPECT_EQ(DiffSnapshots(grads, Download(C(0), "b0", v1::TENSOR_KIND_GRADIENTS)), "")
        << "the group's all-reduce changed the gradients of a group of one";
    auto r = GroupStep("g", {0});
    ASSERT_TRUE(r[0].ok()) << r[0].status();
    v1::StepRequest twin = StepRequestFor("");
    twin.add_block_ids("twin");
    auto t = C(0).Step(twin);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_NEAR(r[0]->grad_norm(), t->grad_norm(), 1e-6 * t->grad_norm()) << "step " << step;
  }
  const BlockState a = StateOf(C(0), "b0"), b = StateOf(C(0), "twin");
  EXPECT_EQ(a.step, 2);
  std::map<std::string, std::vector<double>> twin;
  for (const auto& [name, bytes] : b.weights) {
    const std::vector<float> f = Floats(bytes);
    twin[name].assign(f.begin(), f.end());
  }
  EXPECT_EQ(NearlyEqual(a.weights, twin), "") << "the group of one against a plain Step of its twin";
}

// A Backward naming an NCCL group averages each block's gradients as its backward is queued (on the
// collective's own stream, beside the earlier blocks' backward): the mean of one leaves them as
// they were, the Step after reduces nothing again, and a span out of the group's order is refused
// before anything runs.
TEST_F(NcclGroupTest, ABackwardAveragesOverTheGroupBeforeTheStep) {
  ASSERT_NO_FATAL_FAILURE(StartMember((*gpus_)[0]));
  for (const char* id : {"b0", "b1", "t0", "t1"}) {
    ASSERT_OK(C(0).CreateBlock(CreateRequest(id, TinyConfig(), id[1] == '0' ? 5 : 6)).status());
  }
  for (const absl::Status& s : Join("g", {0}, {"b0", "b1"})) ASSERT_OK(s);
  int64_t params = 0;
  for (const char* id : {"b0", "b1"}) params += C(0).GetBlock(id)->parameter_count();
  for (int step = 0; step < 2; ++step) {
    const int64_t before = GroupBytes(0, "g");
    ASSERT_OK(BackwardInGroup(0, {"b0", "b1"}, "g", 300 + 10 * step));
    EXPECT_EQ(GroupBytes(0, "g") - before, 4 * params) << "the Backward averaged every gradient once";
    auto y = C(0).Forward({"t0", "t1"}, RandomTensor({2, 5, 32}, 300 + 10 * step), true);
    ASSERT_TRUE(y.ok()) << y.status();
    ASSERT_OK(C(0).Backward(y->activation_id(), RandomTensor({2, 5, 32}, 301 + 10 * step)).status());
    for (const char* b : {"0", "1"}) {
      EXPECT_EQ(DiffSnapshots(Download(C(0), absl::StrCat("t", b), v1::TENSOR_KIND_GRADIENTS),
                              Download(C(0), absl::StrCat("b", b), v1::TENSOR_KIND_GRADIENTS)),
                "")
          << "the mean of one is itself (block " << b << ")";
    }
    auto r = GroupStep("g", {0});
    ASSERT_TRUE(r[0].ok()) << r[0].status();
    EXPECT_LT(GroupBytes(0, "g") - before - 4 * params, 1024) << "the Step averaged the gradients again";
    v1::StepRequest twin = StepRequestFor("");
    for (const char* id : {"t0", "t1"}) twin.add_block_ids(id);
    auto t = C(0).Step(twin);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ(r[0]->grad_norm(), t->grad_norm()) << "step " << step;
  }
  EXPECT_EQ(DiffSnapshots(StateOf(C(0), "b0").weights, StateOf(C(0), "t0").weights), "");
  EXPECT_EQ(DiffSnapshots(StateOf(C(0), "b1").adam_v, StateOf(C(0), "t1").adam_v), "");
  const BlockState kept = StateOf(C(0), "b0");
  EXPECT_STATUS(BackwardInGroup(0, {"b1", "b0"}, "g", 7), absl::StatusCode::kInvalidArgument,
                "runs its blocks in the group's order [b0, b1]");
  EXPECT_EQ(DiffStates(kept, StateOf(C(0), "b0")), "");
  EXPECT_EQ(C(0).GetGroup("g")->state(), "ready") << "a refused Backward leaves the group as it was";
}

TEST_F(NcclGroupTest, TwoMembersOnOneGpuAreRefusedAndMayUseGloo) {
  ASSERT_NO_FATAL_FAILURE(StartMember((*gpus_)[0]));
  ASSERT_NO_FATAL_FAILURE(StartMember((*gpus_)[0]));
  for (int i = 0; i < 2; ++i) ASSERT_OK(C(i).CreateBlock(CreateRequest("b0", TinyConfig(), 30 + i)).status());
  for (const absl::Status& s : Join("g", {0, 1}, {"b0"})) {
    EXPECT_STATUS(s, absl::StatusCode::kFailedPrecondition, "ranks 0 and 1 are both on GPU-", "gloo");
  }
  EXPECT_STATUS(C(0).GetGroup("g").status(), absl::StatusCode::kNotFound, "no group g");
  // Through host memory they can.
  for (const absl::Status& s : Join("g", {0, 1}, {"b0"}, kGroupTimeoutMs, "gloo")) ASSERT_OK(s);
  for (int i = 0; i < 2; ++i) TrainStep(C(i), {"b0"}, RandomTensor({2, 4, 32}, 40 + i), 50 + i);
  for (auto& r : GroupStep("g", {0, 1})) ASSERT_TRUE(r.ok()) << r.status();
  const BlockState s0 = StateOf(C(0), "b0"), s1 = StateOf(C(1), "b0");
  EXPECT_EQ(DiffSnapshots(s0.weights, s1.weights), "");
  EXPECT_EQ(DiffSnapshots(s0.adam_m, s1.adam_m), "");
  EXPECT_EQ(DiffSnapshots(s0.adam_v, s1.adam_v), "");
}

TEST_F(NcclGroupTest, CpuAndCudaMembersAreRefused) {
  ASSERT_NO_FATAL_FAILURE(StartMember((*gpus_)[0]));
  ASSERT_NO_FATAL_FAILURE(StartMember(""));  // the CPU backend
  for (int i = 0; i < 2; ++i) ASSERT_OK(C(i).CreateBlock(CreateRequest("b0", TinyConfig(), 7)).status());
  EXPECT_STATUS(C(1).GetCollectiveId("nccl").status(), absl::StatusCode::kFailedPrecondition, "NCCL", "cpu");
  auto nccl = Join("g", {0, 1}, {"b0"}, /*timeout_ms=*/3000);
  EXPECT_STATUS(nccl[1], absl::StatusCode::kFailedPrecondition, "NCCL", "cpu backend");
  EXPECT_STATUS(nccl[0], absl::StatusCode::kAborted, "did not form");
  auto gloo = Join("g", {0, 1}, {"b0"}, kGroupTimeoutMs, "gloo");
  EXPECT_STATUS(gloo[1], absl::StatusCode::kFailedPrecondition, "disagree", "cpu blocks", "cuda blocks");
  EXPECT_STATUS(gloo[0], absl::StatusCode::kFailedPrecondition, "disagree");
}

#else  // BLOCKD_MULTIGPU

class NcclMultiGpuTest : public NcclGroupTest {
 protected:
  void SetUp() override {
    ASSERT_GE(gpus_->size(), 2u) << "the multigpu tests need at least 2 visible GPUs";
  }
};

TEST_F(NcclMultiGpuTest, MembersOnEveryGpuAverageGradientsAndStepIdentically) {
  const int n = static_cast<int>(gpus_->size());
  std::vector<int> all;
  for (int i = 0; i < n; ++i) {
    ASSERT_NO_FATAL_FAILURE(StartMember((*gpus_)[i]));
    ASSERT_OK(C(i).CreateBlock(CreateRequest("b0", TinyConfig(), 60 + i)).status());
    all.push_back(i);
  }
  const Snapshot rank0 = Download(C(0), "b0", v1::TENSOR_KIND_WEIGHTS);
  for (const absl::Status& s : Join("g", all, {"b0"})) ASSERT_OK(s);
  for (int i = 1; i < n; ++i) {
    EXPECT_EQ(DiffSnapshots(rank0, Download(C(i), "b0", v1::TENSOR_KIND_WEIGHTS)), "") << "member " << i;
  }
  for (int step = 0; step < 3; ++step) {
    std::map<std::string, std::vector<double>> mean;
    for (int i = 0; i < n; ++i) {
      TrainStep(C(i), {"b0"}, RandomTensor({2, 5, 32}, 1000 * step + i), 5000 + 1000 * step + i);
      for (const auto& [name, bytes] : Download(C(i), "b0", v1::TENSOR_KIND_GRADIENTS)) {
        const std::vector<float> g = Floats(bytes);
        std::vector<double>& m = mean[name];
        m.resize(g.size());
        for (size_t k = 0; k < g.size(); ++k) m[k] += g[k] / static_cast<double>(n);
      }
    }
    auto norms = GroupGradNorm("g", all);
    for (auto& r : norms) ASSERT_TRUE(r.ok()) << r.status();
    double host_ss = 0;
    for (const auto& [name, m] : mean) {
      for (double x : m) host_ss += x * x;
    }
    const Snapshot g0 = Download(C(0), "b0", v1::TENSOR_KIND_GRADIENTS);
    EXPECT_EQ(NearlyEqual(g0, mean), "") << "step " << step << ": member 0's gradients after the all-reduce";
    for (int i = 1; i < n; ++i) {
      EXPECT_EQ(DiffSnapshots(g0, Download(C(i), "b0", v1::TENSOR_KIND_GRADIENTS)), "") << "member " << i;
      EXPECT_EQ(norms[i]->sum_of_squares(), norms[0]->sum_of_squares()) << "member " << i;
    }
    EXPECT_NEAR(norms[0]->sum_of_squares(), host_ss, 1e-5 * host_ss);
    for (auto& r : GroupStep("g", all)) ASSERT_TRUE(r.ok()) << r.status();
  }
  const BlockState s0 = StateOf(C(0), "b0");
  EXPECT_EQ(s0.step, 3);
  for (int i = 1; i < n; ++i) {
    const BlockState si = StateOf(C(i), "b0");
    EXPECT_EQ(DiffSnapshots(s0.weights, si.weights), "") << "member " << i;
    EXPECT_EQ(DiffSnapshots(s0.adam_m, si.adam_m), "") << "member " << i;
    EXPECT_EQ(DiffSnapshots(s0.adam_v, si.adam_v), "") << "member " << i;
  }
}

// One daemon seeing every GPU holds a member on each (the blocks of member i on GPU i): the same
// protocol as a daemon per GPU, each Step naming its member's blocks; the members end identical.
TEST_F(NcclMultiGpuTest, OneDaemonHoldsAMemberOnEachGpu) {
  const int n = static_cast<int>(gpus_->size());
  ASSERT_NO_FATAL_FAILURE(StartMember(absl::StrJoin(*gpus_, ",")));
  std::vector<JoiningMember> joining;
  for (int i = 0; i < n; ++i) {
    v1::CreateBlockRequest req = CreateRequest(absl::StrCat("d", i), TinyConfig(), 90 + i);
    req.set_device(i);
    auto info = C(0).CreateBlock(req);
    ASSERT_TRUE(info.ok()) << info.status();
    ASSERT_EQ(info->device(), i);
    joining.push_back({&C(0), {req.block_id()}});
  }
  for (const absl::Status& s : JoinMembersAtOnce(joining, "g", kGroupTimeoutMs)) ASSERT_OK(s);
  for (int step = 0; step < 2; ++step) {
    for (int i = 0; i < n; ++i) {
      TrainStep(C(0), {absl::StrCat("d", i)}, RandomTensor({2, 5, 32}, 1000 * step + i), 5000 + 1000 * step + i);
    }
    std::vector<absl::StatusOr<v1::StepResponse>> results(n, absl::UnknownError("not run"));
    std::vector<std::thread> threads;
    for (int i = 0; i < n; ++i) {
      threads.emplace_back([&, i] {
        v1::StepRequest req = GroupStepRequest("g");
        req.add_block_ids(absl::StrCat("d", i));
        results[i] = C(0).Step(req);
      });
    }
    for (std::thread& t : threads) t.join();
    for (auto& r : results) ASSERT_TRUE(r.ok()) << r.status();
  }
  const BlockState s0 = StateOf(C(0), "d0");
  EXPECT_EQ(s0.step, 2);
  for (int i = 1; i < n; ++i) {
    const BlockState si = StateOf(C(0), absl::StrCat("d", i));
    EXPECT_EQ(DiffSnapshots(s0.weights, si.weights), "") << "member " << i;
    EXPECT_EQ(DiffSnapshots(s0.adam_m, si.adam_m), "") << "member " << i;
    EXPECT_EQ(DiffSnapshots(s0.adam_v, si.adam_v), "") << "member " << i;
  }
}

// Backwards naming the group, on every member at once, leave every member's gradients the mean of
// the members' (against the host's mean of twin blocks' local gradients), bitwise the same on all,
// before any Step; the Step reduces nothing again and the members step identically.
TEST_F(NcclMultiGpuTest, BackwardsAverageOverTheGroupAsTheyRun) {
  const int n = static_cast<int>(gpus_->size());
  std::vector<int> all;
  for (int i = 0; i < n; ++i) {
    ASSERT_NO_FATAL_FAILURE(StartMember((*gpus_)[i]));
    for (const char* id : {"b0", "b1", "t0", "t1"}) {
      ASSERT_OK(C(i).CreateBlock(CreateRequest(id, TinyConfig(), id[1] == '0' ? 80 : 81)).status());
    }
    all.push_back(i);
  }
  for (const absl::Status& s : Join("g", all, {"b0", "b1"})) ASSERT_OK(s);
  int64_t params = 0;
  for (const char* id : {"b0", "b1"}) params += C(0).GetBlock(id)->parameter_count();
  for (int step = 0; step < 2; ++step) {
    const int64_t before = GroupBytes(0, "g");
    // The twins run the same inputs without the group: their gradients are each member's own.
    std::map<std::string, std::vector<double>> mean[2];
    for (int i = 0; step == 0 && i < n; ++i) {
      const uint64_t seed = 500 + 100 * step + 10 * i;
      auto y = C(i).Forward({"t0", "t1"}, RandomTensor({2, 5, 32}, seed), true);
      ASSERT_TRUE(y.ok()) << y.status();
      ASSERT_OK(C(i).Backward(y->activation_id(), RandomTensor({2, 5, 32}, seed + 1)).status());
      for (int b = 0; b < 2; ++b) {
        for (const auto& [name, bytes] : Download(C(i), absl::StrCat("t", b), v1::TENSOR_KIND_GRADIENTS)) {
          const std::vector<float> g = Floats(bytes);
          std::vector<double>& m = mean[b][name];
          m.resize(g.size());
          for (size_t k = 0; k < g.size(); ++k) m[k] += g[k] / static_cast<double>(n);
        }
      }
      ASSERT_OK(C(i).ZeroGrad({"t0", "t1"}));
    }
    for (const absl::Status& s : OnAll(all, [&](int i) {
           return BackwardInGroup(i, {"b0", "b1"}, "g", 500 + 100 * step + 10 * i);
         })) {
      ASSERT_OK(s);
    }
    EXPECT_EQ(GroupBytes(0, "g") - before, 4 * params) << "step " << step;
    for (int b = 0; b < 2; ++b) {
      const Snapshot g0 = Download(C(0), absl::StrCat("b", b), v1::TENSOR_KIND_GRADIENTS);
      // The twins hold the blocks' weights until the first Step (they are not stepped).
      if (step == 0) {
        EXPECT_EQ(NearlyEqual(g0, mean[b]), "") << "block " << b;
      }
      for (int i = 1; i < n; ++i) {
        EXPECT_EQ(DiffSnapshots(g0, Download(C(i), absl::StrCat("b", b), v1::TENSOR_KIND_GRADIENTS)), "")
            << "member " << i << ", block " << b;
      }
    }
    for (auto& r : GroupStep("g", all)) ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_LT(GroupBytes(0, "g") - before - 4 * params, 1024) << "step " << step << ": the Step averaged again";
  }
  for (int i = 1; i < n; ++i) {
    for (const char* id : {"b0", "b1"}) {
      const BlockState s0 = StateOf(C(0), id), si = StateOf(C(i), id);
      EXPECT_EQ(DiffSnapshots(s0.weights, si.weights), "") << "member " << i << " " << id;
      EXPECT_EQ(DiffSnapshots(s0.adam_v, si.adam_v), "") << "member " << i << " " << id;
    }
  }
}

TEST_F(NcclMultiGpuTest, AKilledMemberAbortsTheOthersUnchangedAndTheSurvivorsRegroup) {
  const int n = std::min<int>(3, static_cast<int>(gpus_->size()));
  std::vector<int> all, survivors;
  for (int i = 0; i < n; ++i) {
    ASSERT_NO_FATAL_FAILURE(StartMember((*gpus_)[i]));
    ASSERT_OK(C(i).CreateBlock(CreateRequest("b0", TinyConfig(), 7)).status());
    all.push_back(i);
    if (i < n - 1) survivors.push_back(i);
  }
  for (const absl::Status& s : Join("g", all, {"b0"}, /*timeout_ms=*/3000)) ASSERT_OK(s);
  for (int i = 0; i < n; ++i) TrainStep(C(i), {"b0"}, RandomTensor({1, 4, 32}, 10 + i), 20 + i);
  std::vector<BlockState> before;
  for (int i : survivors) before.push_back(StateOf(C(i), "b0"));
  members_[n - 1].daemon->Kill();
  const absl::Time start = absl::Now();
  auto results = GroupStep("g", survivors);
  for (auto& r : results) EXPECT_STATUS(r.status(), absl::StatusCode::kAborted, "group g", "nothing was applied");
  EXPECT_LT(absl::Now() - start, absl::Seconds(60)) << "the 3 s timeout did not bound the step";
  for (size_t k = 0; k < survivors.size(); ++k) {
    EXPECT_EQ(DiffStates(before[k], StateOf(C(survivors[k]), "b0")), "") << "member " << survivors[k];
  }
  for (const absl::Status& s : Join("g2", survivors, {"b0"})) ASSERT_OK(s);
  for (auto& r : GroupStep("g2", survivors)) ASSERT_TRUE(r.ok()) << r.status();
  for (size_t k = 1; k < survivors.size(); ++k) {
    EXPECT_EQ(DiffSnapshots(StateOf(C(0), "b0").weights, StateOf(C(survivors[k]), "b0").weights), "");
  }
  EXPECT_EQ(StateOf(C(0), "b0").step, 1);
}

TEST_F(NcclMultiGpuTest, AStoppedMemberAbortsTheOthersWithinTheTimeout) {
  for (int i = 0; i < 2; ++i) {
    ASSERT_NO_FATAL_FAILURE(StartMember((*gpus_)[i]));
    ASSERT_OK(C(i).CreateBlock(CreateRequest("b0", TinyConfig(), 7)).status());
  }
  for (const absl::Status& s : Join("g", {0, 1}, {"b0"}, /*timeout_ms=*/2000)) ASSERT_OK(s);
  for (int i = 0; i < 2; ++i) TrainStep(C(i), {"b0"}, RandomTensor({1, 4, 32}, 10 + i), 20 + i);
  // One group Step together first: the communicator works, so the abort below is the stop's.
  for (auto& r : GroupStep("g", {0, 1})) ASSERT_TRUE(r.ok()) << r.status();
  TrainStep(C(0), {"b0"}, RandomTensor({1, 4, 32}, 30), 40);
  const BlockState before = StateOf(C(0), "b0");
  ASSERT_EQ(::kill(members_[1].daemon->pid(), SIGSTOP), 0);
  const absl::Time start = absl::Now();
  auto r = C(0).Step(StepRequestFor("g"));
  ::kill(members_[1].daemon->pid(), SIGCONT);
  EXPECT_STATUS(r.status(), absl::StatusCode::kAborted, "group g");
  EXPECT_LT(absl::Now() - start, absl::Seconds(60)) << "the 2 s timeout did not bound the step";
  EXPECT_EQ(DiffStates(before, StateOf(C(0), "b0")), "");
  // The survivor alone.
  for (const absl::Status& s : Join("g2", {0}, {"b0"})) ASSERT_OK(s);
  for (auto& s : GroupStep("g2", {0})) ASSERT_TRUE(s.ok()) << s.status();
}

#endif  // BLOCKD_MULTIGPU

}  // namespace
}  // namespace blockd::testing
