// Block leases through the service: CreateBlockRequest.ttl_seconds, BlockInfo.ttl_seconds and
// idle_seconds (GetBlock's as it was before the call), ListBlocks' min_idle_seconds filter, the
// server's housekeeping deleting an idle block with its activation handles, calls keeping a block
// alive (a LoadWeights stream longer than the lease too), DeleteBlock's only_if_idle_seconds, and
// refusals of bad values.
// The engine's own tests (tests/engine/block_lease_test.cc) step a fake clock through every renewing
// call; here real seconds pass, so TTLs are short and waits are polls with generous limits.
#include <limits>
#include <set>
#include <string>
#include <vector>

#include <grpcpp/channel.h>
#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <gtest/gtest.h>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "tests/integration/harness.h"

namespace blockd::testing {
namespace {

using absl::StatusCode;

v1::CreateBlockRequest Leased(const std::string& id, int64_t ttl_seconds, uint64_t seed) {
  v1::CreateBlockRequest r = CreateRequest(id, TinyConfig(), seed);
  r.set_ttl_seconds(ttl_seconds);
  return r;
}

std::set<std::string> Ids(const std::vector<v1::BlockInfo>& blocks) {
  std::set<std::string> ids;
  for (const v1::BlockInfo& b : blocks) ids.insert(b.block_id());
  return ids;
}

class LeaseTest : public ::testing::Test {
 protected:
  void SetUp() override {
    server_ = StartServer(LoopbackOptions());  // housekeeping every 200 ms
    ASSERT_NE(server_, nullptr);
    client_ = ConnectTo(*server_);
    ASSERT_NE(client_, nullptr);
  }

  int64_t ServerBlocks() {
    auto info = client_->GetServerInfo();
    EXPECT_TRUE(info.ok()) << info.status();
    return info.ok() ? info->blocks() : -1;
  }

  std::unique_ptr<Server> server_;
  std::unique_ptr<Client> client_;
};

TEST_F(LeaseTest, InfoCarriesTheLeaseAndListFiltersByIdleTime) {
  auto leased = client_->CreateBlock(Leased("leased", 600, 1));
  ASSERT_OK(leased.status());
  EXPECT_EQ(leased->ttl_seconds(), 600);
  EXPECT_LT(leased->idle_seconds(), 1.0);
  ASSERT_OK(client_->CreateBlock(Leased("plain", 0, 2)).status());

  absl::SleepFor(absl::Milliseconds(1500));
  // GetBlock names the block, so its idle time restarts; it reports the idle time it ended.
  auto renewed = client_->GetBlock("leased");
  ASSERT_OK(renewed.status());
  EXPECT_EQ(renewed->ttl_seconds(), 600);
  EXPECT_GE(renewed->idle_seconds(), 1.5) << "GetBlock reported the idle time after its own renewal";
  auto again_now = client_->GetBlock("leased");
  ASSERT_OK(again_now.status());
  EXPECT_LT(again_now->idle_seconds(), 0.5) << "GetBlock did not renew the lease";

  auto idle = client_->ListBlocks(absl::Seconds(1));
  ASSERT_OK(idle.status());
  ASSERT_EQ(Ids(*idle), std::set<std::string>{"plain"}) << "min_idle 1s should list only the block nobody named";
  EXPECT_GE((*idle)[0].idle_seconds(), 1.5);
  EXPECT_EQ((*idle)[0].ttl_seconds(), 0);

  auto all = client_->ListBlocks();
  ASSERT_OK(all.status());
  EXPECT_EQ(Ids(*all), (std::set<std::string>{"leased", "plain"}));
  auto again = client_->ListBlocks(absl::Seconds(1));
  ASSERT_OK(again.status());
  EXPECT_EQ(Ids(*again), std::set<std::string>{"plain"}) << "listing renewed a lease";
}

// "idle" is left alone and goes; "busy" has the same TTL but is named every 100 ms and stays;
// "plain" has no lease. The handle through "idle" goes with it, the one through "plain" alone stays.
TEST_F(LeaseTest, ServerDeletesTheIdleBlockWithItsHandlesAndKeepsTheUsedOne) {
  ASSERT_OK(client_->CreateBlock(Leased("idle", 2, 1)).status());
  ASSERT_OK(client_->CreateBlock(Leased("busy", 2, 2)).status());
  ASSERT_OK(client_->CreateBlock(Leased("plain", 0, 3)).status());
  const v1::Tensor x = RandomTensor({2, 3, 32}, 11);
  const absl::Time before_last_use = absl::Now();  // "idle" is last named during this Forward
  auto through_idle = client_->Forward({"idle", "plain"}, x, /*keep_activations=*/true);
  ASSERT_OK(through_idle.status());
  auto only_plain = client_->Forward({"plain"}, x, /*keep_activations=*/true);
  ASSERT_OK(only_plain.status());
  ASSERT_EQ(client_->GetServerInfo()->activations_held(), 2);

  const absl::Time give_up = absl::Now() + absl::Seconds(20);
  while (ServerBlocks() == 3 && absl::Now() < give_up) {
    ASSERT_OK(client_->Forward({"busy"}, x, /*keep_activations=*/false).status()) << "busy expired while in use";
    absl::SleepFor(absl::Milliseconds(100));
  }
  const absl::Duration gone_after = absl::Now() - before_last_use;
  auto listed = client_->ListBlocks();
  ASSERT_OK(listed.status());
  ASSERT_EQ(Ids(*listed), (std::set<std::string>{"busy", "plain"})) << "after " << gone_after;
  EXPECT_GE(gone_after, absl::Seconds(2)) << "idle went before its 2 s lease ran out";

  EXPECT_STATUS(client_->GetBlock("idle").status(), StatusCode::kNotFound, "block idle not found");
  auto info = client_->GetServerInfo();
  ASSERT_OK(info.status());
  EXPECT_EQ(info->activations_held(), 1) << "the handle through the expired block was not freed";
  EXPECT_STATUS(client_->Backward(through_idle->activation_id(), RandomTensor({2, 3, 32}, 12)).status(),
                StatusCode::kNotFound, "not found");
  ASSERT_OK(client_->Backward(only_plain->activation_id(), RandomTensor({2, 3, 32}, 13)).status());

  // What is left holds exactly the two blocks' memory.
  int64_t blocks_bytes = 0;
  for (const v1::BlockInfo& b : *listed) blocks_bytes += b.memory_bytes();
  info = client_->GetServerInfo();
  ASSERT_OK(info.status());
  ASSERT_EQ(info->devices_size(), 1);
  EXPECT_EQ(info->devices(0).memory_used_bytes(), blocks_bytes);
}

// A LoadWeights stream that lasts longer than the block's lease keeps the block: the lease is
// renewed as chunks arrive, not only at the first chunk and the commit.
TEST_F(LeaseTest, ALoadWeightsStreamLongerThanTheLeaseKeepsItsBlock) {
  ASSERT_OK(client_->CreateBlock(Leased("slow", 2, 1)).status());
  const TensorBytes t = RandomWeights(TinyConfig(), 2)[1];  // self_attn.q_proj.weight, 4 KiB
  const int64_t size = static_cast<int64_t>(t.data.size()), pieces = 16;
  ASSERT_EQ(size % (4 * pieces), 0);
  auto stub = v1::BlockService::NewStub(grpc::CreateChannel(TargetOf(*server_), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  v1::LoadWeightsResponse resp;
  auto writer = stub->LoadWeights(&ctx, &resp);
  const absl::Time start = absl::Now();
  for (int64_t i = 0; i < pieces; ++i) {  // 16 chunks 300 ms apart: 4.5 s, over twice the lease
    ASSERT_TRUE(writer->Write(Chunk("slow", t, i * size / pieces, size / pieces))) << "chunk " << i;
    absl::SleepFor(absl::Milliseconds(300));
  }
  ASSERT_TRUE(writer->WritesDone());
  ASSERT_OK(FromGrpcStatus(writer->Finish())) << "after " << absl::Now() - start;
  EXPECT_EQ(resp.loaded_size(), 1);
  auto info = client_->GetBlock("slow");
  ASSERT_OK(info.status());
  EXPECT_LT(info->idle_seconds(), 1.5) << "the commit did not renew the lease";
}

// DeleteBlock with only_if_idle_seconds (what `blockctl gc --yes` sends): a block a call named
// since is kept, and told so; an idle one goes; bad values are refused and delete nothing.
TEST_F(LeaseTest, DeleteOnlyIfIdleKeepsABlockInUse) {
  ASSERT_OK(client_->CreateBlock(Leased("b0", 0, 1)).status());
  v1::DeleteBlockRequest r;
  r.set_block_id("b0");
  r.set_only_if_idle_seconds(1);
  EXPECT_STATUS(client_->DeleteBlock(r).status(), StatusCode::kFailedPrecondition,
                "block b0 was named by a call", "less than the 1.0 s it must be idle: not deleted");
  for (double bad : {-1.0, std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
    r.set_only_if_idle_seconds(bad);
    EXPECT_STATUS(client_->DeleteBlock(r).status(), StatusCode::kInvalidArgument, "only_if_idle_seconds = ",
                  "expected a finite number >= 0");
  }
  EXPECT_EQ(ServerBlocks(), 1);
  absl::SleepFor(absl::Milliseconds(1200));
  r.set_only_if_idle_seconds(1);
  ASSERT_OK(client_->DeleteBlock(r).status());
  EXPECT_EQ(ServerBlocks(), 0);
}

TEST_F(LeaseTest, BadLeaseValuesAreRefusedAndChangeNothing) {
  EXPECT_STATUS(client_->CreateBlock(Leased("neg", -1, 1)).status(), StatusCode::kInvalidArgument,
                "ttl_seconds = -1, expected >= 0 (0: no lease)");
  EXPECT_STATUS(client_->GetBlock("neg").status(), StatusCode::kNotFound, "block neg not found");
  EXPECT_EQ(ServerBlocks(), 0);

  ASSERT_OK(client_->CreateBlock(Leased("b0", 0, 1)).status());
  EXPECT_STATUS(client_->ListBlocks(-absl::Seconds(1)).status(), StatusCode::kInvalidArgument,
                "min_idle_seconds = -1, expected a finite number >= 0");
  EXPECT_STATUS(client_->ListBlocks(absl::InfiniteDuration()).status(), StatusCode::kInvalidArgument,
                "min_idle_seconds = inf");
  EXPECT_EQ(ServerBlocks(), 1);
}

}  // namespace
}  // namespace blockd::testing
