// The fixture of the hostile-input battery (hostile_input_test.cc: every RPC but the session
// ones; hostile_session_test.cc: inference sessions): one server with a user and an admin token,
// blocks A, B (trained), W (another width), U (no weights), BIG and LONG, a checkpoint "base", and
// what the cases need around them: the Case table row, a snapshot of the server's state and its
// diff, a tensor with one value replaced.
#pragma once

#include <grpcpp/channel.h>
#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <iomanip>
#include <set>
#include <thread>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "tests/integration/harness.h"

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define BLOCKD_CLANG_ASAN 1
#endif
#endif

namespace blockd::testing {

using absl::StatusCode;

inline constexpr char kUserToken[] = "battery-user-token-0123456789";
inline constexpr char kAdminToken[] = "battery-admin-token-0123456789";
inline constexpr int64_t kMaxMessage = 32 << 20;
inline constexpr int64_t kMaxConcurrent = 8;
inline constexpr int64_t kMaxHandles = 3;
inline constexpr int64_t kMaxBlocks = 7;
// Every block the battery holds; all of them are snapshotted around every case.
inline const std::vector<std::string> kBlocks = {"A", "B", "W", "U", "BIG", "LONG"};

// hidden 8 with a huge MLP (a forward keeps 2 x intermediate floats per token) or a long context.
inline v1::BlockConfig NarrowConfig(int64_t intermediate) {
  v1::BlockConfig c = TinyConfig(false, 8);
  c.set_intermediate_size(intermediate);
  return c;
}

struct ServerState {
  std::map<std::string, BlockState> blocks;
  std::vector<std::string> ids;
  int64_t activations = -1, memory = -1;
};

inline std::string Diff(const ServerState& a, const ServerState& b) {
  std::vector<std::string> d;
  for (const auto& [id, st] : a.blocks) {
    const std::string s = DiffStates(st, b.blocks.at(id));
    if (!s.empty()) d.push_back(absl::StrCat("block ", id, ": ", s));
  }
  if (a.ids != b.ids) d.push_back(absl::StrCat("blocks [", absl::StrJoin(a.ids, ","), "] -> [", absl::StrJoin(b.ids, ","), "]"));
  if (a.activations != b.activations) d.push_back(absl::StrCat("activation handles ", a.activations, " -> ", b.activations));
  if (a.memory != b.memory) d.push_back(absl::StrCat("memory in use ", a.memory, " -> ", b.memory));
  return absl::StrJoin(d, "; ");
}

struct Case {
  std::string rpc, what;
  StatusCode code;
  std::vector<std::string> parts;
  std::function<absl::Status()> call;
  std::function<void()> setup = nullptr;    // before the snapshot (or after it, with snapshot_first)
  bool snapshot_first = false;
  std::function<void()> undo = nullptr;     // after the call, before the check (snapshot_first cases)
  std::function<void()> cleanup = nullptr;  // after the check
};

class HostileInput : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = MakeTempDir("hostile");
    ASSERT_FALSE(dir_.empty());
    std::ofstream(dir_ + "/users") << kUserToken << "\n";
    std::ofstream(dir_ + "/admins") << kAdminToken << "\n";
    ServerOptions o = LoopbackOptions();
    o.auth_token_file = dir_ + "/users";
    o.admin_token_file = dir_ + "/admins";
    o.checkpoint_dir = dir_ + "/checkpoints";
    o.service.max_message_bytes = kMaxMessage;
    o.service.max_concurrent_rpcs = kMaxConcurrent;
    o.engine.max_blocks = kMaxBlocks;
    o.engine.max_activations_per_client = kMaxHandles;
    o.engine.memory_budget_bytes = int64_t{1} << 30;
    server_ = StartServer(o);
    ASSERT_NE(server_, nullptr);
    admin_ = ConnectTo(*server_, {.token = kAdminToken});
    user_ = ConnectTo(*server_, {.token = kUserToken});
    anonymous_ = ConnectTo(*server_);
    channel_ = grpc::CreateChannel(TargetOf(*server_), grpc::InsecureChannelCredentials());
    stub_ = v1::BlockService::NewStub(channel_);

    // A and B: trained (moments set, gradients accumulated); W: another width; U: no weights;
    // BIG: a huge MLP on a narrow stream; LONG: a narrow block that allows 2^20 positions.
    ASSERT_OK(admin_->CreateBlock(CreateRequest("A", TinyConfig(true), 1)).status());
    ASSERT_OK(admin_->CreateBlock(CreateRequest("B", TinyConfig(), 2)).status());
    ASSERT_OK(admin_->CreateBlock(CreateRequest("W", TinyConfig(false, 64), 3)).status());
    ASSERT_OK(admin_->CreateBlock(CreateRequest("U", TinyConfig(), std::nullopt)).status());
    ASSERT_OK(admin_->CreateBlock(CreateRequest("BIG", NarrowConfig(16384), 4)).status());
    ASSERT_OK(admin_->CreateBlock(CreateRequest("LONG", NarrowConfig(16), 5, 1, 1 << 20)).status());
    Train({"A", "B"}, 10);
    ASSERT_OK(Step({"A", "B"}));
    Train({"A", "B"}, 20);
    v1::SaveCheckpointRequest save;
    save.set_name("base");
    ASSERT_OK(admin_->SaveCheckpoint(save).status());
  }

  void Train(const std::vector<std::string>& ids, uint64_t seed) {
    TrainStep(*admin_, ids, RandomTensor({2, 8, 32}, seed), seed + 1);
  }
  absl::Status Step(const std::vector<std::string>& ids) {
    v1::StepRequest r;
    for (const std::string& id : ids) r.add_block_ids(id);
    return admin_->Step(r).status();
  }
  std::string ForwardKeep(Client& c, const std::string& id, uint64_t seed) {
    auto y = c.Forward({id}, RandomTensor({1, 4, 32}, seed), true);
    EXPECT_TRUE(y.ok()) << y.status();
    return y.ok() ? y->activation_id() : "";
  }

  ServerState Snapshot() {
    ServerState s;
    for (const std::string& id : kBlocks) s.blocks[id] = StateOf(*admin_, id);
    auto blocks = admin_->ListBlocks();
    EXPECT_TRUE(blocks.ok()) << blocks.status();
    if (blocks.ok()) {
      for (const v1::BlockInfo& b : *blocks) s.ids.push_back(b.block_id());
    }
    auto info = admin_->GetServerInfo();
    EXPECT_TRUE(info.ok()) << info.status();
    if (info.ok()) {
      s.activations = info->activations_held();
      s.memory = info->devices(0).memory_used_bytes();
    }
    return s;
  }
  // Work a cancelled call started may still be finishing on the server: wait (a bounded time) for
  // the handle count and memory to come back before judging them. A leak never comes back.
  void Settle(const ServerState& before) {
    const absl::Time deadline = absl::Now() + absl::Seconds(15);
    while (absl::Now() < deadline) {
      auto info = admin_->GetServerInfo();
      if (info.ok() && info->activations_held() == before.activations &&
          info->devices(0).memory_used_bytes() == before.memory) {
        return;
      }
      absl::SleepFor(absl::Milliseconds(20));
    }
  }

  std::unique_ptr<grpc::ClientContext> AdminContext() {
    auto ctx = std::make_unique<grpc::ClientContext>();
    ctx->AddMetadata("authorization", absl::StrCat("Bearer ", kAdminToken));
    ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    return ctx;
  }

  std::string dir_;
  std::unique_ptr<Server> server_;
  std::unique_ptr<Client> admin_, user_, anonymous_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::BlockService::Stub> stub_;
};

inline v1::Tensor WithValue(v1::Tensor t, size_t index, float value) {
  std::vector<float> v = Floats(t);
  v[index] = value;
  return wire::MakeTensor(t.dtype(), wire::ShapeOf(t), v);
}

inline v1::BlockConfig Mutated(const std::function<void(v1::BlockConfig&)>& f) {
  v1::BlockConfig c = TinyConfig();
  f(c);
  return c;
}

}  // namespace blockd::testing
