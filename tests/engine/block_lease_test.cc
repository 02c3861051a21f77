// Block leases in the Engine: a block created with a TTL is deleted by ExpireBlocks() once no call
// has named it for that long, with everything that references it (activation handles, memory);
// every call that names the block renews it, listing and checkpoint export do not. A fake clock
// (EngineOptions::lease_clock) steps time exactly, so nothing here sleeps or races a timer.
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/time/time.h"
#include "engine/engine.h"
#include "gtest/gtest.h"
#include "tests/engine/engine_fixture.h"

namespace blockd::testing {
namespace {

using absl::StatusCode;

constexpr absl::Duration kTtl = absl::Seconds(10);

class BlockLeaseTest : public EngineFixture {
 protected:
  BlockLeaseTest() { ResetWithFakeClock({}); }

  void ResetWithFakeClock(EngineOptions o) {
    o.lease_clock = [this] { return now_; };
    Reset(o);
  }

  absl::Status CreateLeased(const std::string& id, absl::Duration ttl, uint64_t seed = 1) {
    CreateBlockParams p;
    p.spec = Spec(id, Config(/*qk_norm=*/true));
    p.seed = seed;
    p.ttl = ttl;
    return engine_->CreateBlock(p).status();
  }

  absl::Duration IdleOf(const std::string& id) {
    for (const BlockInfo& info : engine_->ListBlocks()) {
      if (info.spec.id == id) return info.idle;
    }
    ADD_FAILURE() << "block " << id << " is not listed";
    return absl::ZeroDuration();
  }

  bool Exists(const std::string& id) {
    for (const std::string& b : engine_->BlockIds()) {
      if (b == id) return true;
    }
    return false;
  }

  int64_t BlockBytes() { return static_cast<int64_t>(engine_->backend().BlockBytes(Spec("x", Config(true)))); }
  int64_t MemoryUsed() { return engine_->Stats().memory_used[0]; }

  absl::Time now_ = absl::FromUnixSeconds(1'800'000'000);
};

TEST_F(BlockLeaseTest, InfoReportsTtlAndIdleTime) {
  ASSERT_OK(CreateLeased("leased", kTtl));
  ASSERT_OK(Create("plain", Config(true), 2));
  now_ += absl::Seconds(3);
  // GetBlock answers with the idle time before it renewed the lease (after, it would always read
  // 0), and renews: idle restarts from this call.
  auto leased = engine_->GetBlock("leased");
  ASSERT_TRUE(leased.ok()) << leased.status();
  EXPECT_EQ(leased->ttl, kTtl);
  EXPECT_EQ(leased->idle, absl::Seconds(3)) << "GetBlock reported the idle time after its own renewal";
  EXPECT_EQ(IdleOf("plain"), absl::Seconds(3));
  EXPECT_EQ(IdleOf("leased"), absl::ZeroDuration()) << "GetBlock did not renew the lease";
  now_ += absl::Milliseconds(2500);
  EXPECT_EQ(engine_->GetBlock("leased")->idle, absl::Milliseconds(2500));
  EXPECT_EQ(IdleOf("plain"), absl::Milliseconds(5500));
  EXPECT_EQ(engine_->GetBlock("plain")->ttl, absl::ZeroDuration());
}

TEST_F(BlockLeaseTest, IdleBlockIsDeletedWithItsHandlesAndMemory) {
  ASSERT_OK(CreateLeased("b0", kTtl));
  ASSERT_OK(Create("b1", Config(true), 2));  // no lease
  const std::vector<float> x = RandomActivation(16), dy = RandomActivation(16);
  auto only_b1 = Forward({"b1"}, x, kBatch, kSeq, /*keep=*/true);
  ASSERT_TRUE(only_b1.ok()) << only_b1.status();
  const int64_t per_block_handle = MemoryUsed() - 2 * BlockBytes();  // the same config and shape throughout
  ASSERT_GT(per_block_handle, 0);
  auto through_both = Forward({"b0", "b1"}, x, kBatch, kSeq, /*keep=*/true);
  ASSERT_TRUE(through_both.ok()) << through_both.status();
  ASSERT_EQ(engine_->Stats().activations_held, 2);
  ASSERT_EQ(MemoryUsed(), 2 * BlockBytes() + 3 * per_block_handle);

  now_ += kTtl - absl::Nanoseconds(1);
  EXPECT_TRUE(engine_->ExpireBlocks().empty()) << "b0 went before its TTL";
  EXPECT_TRUE(Exists("b0"));

  now_ += absl::Nanoseconds(1);
  EXPECT_EQ(engine_->ExpireBlocks(), std::vector<std::string>{"b0"});
  EXPECT_TRUE(HasError(engine_->GetBlock("b0").status(), StatusCode::kNotFound, "block b0 not found"));
  EXPECT_EQ(engine_->Stats().activations_held, 1) << "the handle through b0 outlived it";
  EXPECT_EQ(MemoryUsed(), BlockBytes() + per_block_handle) << "b0 or the handle through it still holds memory";
  EXPECT_TRUE(HasError(Backward(through_both->activation_id, dy, kBatch, kSeq).status(), StatusCode::kNotFound,
                       "not found"));
  EXPECT_OK(Backward(only_b1->activation_id, dy, kBatch, kSeq).status());
  EXPECT_EQ(MemoryUsed(), BlockBytes()) << "only b1 should hold memory now";
  EXPECT_TRUE(engine_->ExpireBlocks().empty()) << "a block is expired once";

  // The id is free again, and the new block's lease starts from its creation.
  ASSERT_OK(CreateLeased("b0", kTtl));
  EXPECT_EQ(IdleOf("b0"), absl::ZeroDuration());
  now_ += absl::Hours(1000);
  EXPECT_EQ(engine_->ExpireBlocks(), std::vector<std::string>{"b0"});
  EXPECT_TRUE(Exists("b1")) << "a block without a lease never expires";
}

// Every engine call that names the block renews its lease, the one that failed on a bad input too
// (the lease tracks whether the client is alive, not whether its calls are right).
TEST_F(BlockLeaseTest, EveryCallNamingTheBlockRenewsIt) {
  ASSERT_OK(CreateLeased("b0", kTtl));
  const std::vector<float> x = RandomActivation(16), dy = RandomActivation(16);
  std::string pending_handle;
  const TensorMap weights = RandomWeights(Config(true));
  const std::vector<std::pair<std::string, std::function<void()>>> uses = {
      {"GetBlock", [&] { EXPECT_OK(engine_->GetBlock("b0").status()); }},
      {"BlockParamsOf (a LoadWeights stream opens)", [&] { EXPECT_OK(engine_->BlockParamsOf("b0").status()); }},
      {"LoadWeights", [&] { EXPECT_OK(Load("b0", weights)); }},
      {"Forward", [&] {
         auto f = Forward({"b0"}, x, kBatch, kSeq, /*keep=*/true);
         ASSERT_TRUE(f.ok()) << f.status();
         pending_handle = f->activation_id;
       }},
      {"Backward", [&] { EXPECT_OK(Backward(pending_handle, dy, kBatch, kSeq).status()); }},
      {"Step", [&] { EXPECT_OK(engine_->Step({"b0"}, AdamWHyper{}, 0).status()); }},
      {"ZeroGrad", [&] { EXPECT_OK(engine_->ZeroGrad({"b0"})); }},
      {"RenewLease (a LoadWeights stream as its chunks arrive)", [&] { EXPECT_OK(engine_->RenewLease("b0")); }},
      {"TensorsVersionOf (a DownloadTensors starts)",
       [&] { EXPECT_OK(engine_->TensorsVersionOf("b0", TensorKind::kWeights).status()); }},
      {"ReadTensors (DownloadTensors)",
       [&] { EXPECT_OK(engine_->ReadTensors("b0", TensorKind::kWeights, DType::kFloat32, {}).status()); }},
      {"CheckTensorsVersion (a DownloadTensors ends)", [&] {
         auto v = engine_->TensorsVersionOf("b0", TensorKind::kGradients);
         ASSERT_TRUE(v.ok()) << v.status();
         now_ += kTtl - absl::Seconds(1);
         EXPECT_OK(engine_->CheckTensorsVersion("b0", TensorKind::kGradients, *v));
       }},
      {"a Forward with a bad input", [&] {
         EXPECT_TRUE(HasError(Forward({"b0"}, x, kBatch * kSeq, 1, false).status(), StatusCode::kInvalidArgument,
                              "input shape"));
       }},
  };
  for (const auto& [name, use] : uses) {
    now_ += kTtl - absl::Seconds(1);
    use();
    EXPECT_EQ(IdleOf("b0"), absl::ZeroDuration()) << name << " did not renew the lease";
    EXPECT_TRUE(engine_->ExpireBlocks().empty()) << "b0 expired right after " << name;
  }
  now_ += kTtl;
  EXPECT_EQ(engine_->ExpireBlocks(), std::vector<std::string>{"b0"});
}

// An operator listing blocks, or a periodic checkpoint of all of them, must not keep an abandoned
// block alive.
TEST_F(BlockLeaseTest, ListingAndCheckpointExportDoNotRenew) {
  ASSERT_OK(CreateLeased("b0", kTtl));
  now_ += kTtl - absl::Seconds(1);
  EXPECT_EQ(engine_->ListBlocks().size(), 1u);
  EXPECT_EQ(engine_->BlockIds().size(), 1u);
  auto exported = engine_->ExportBlocks({"b0"});
  ASSERT_TRUE(exported.ok()) << exported.status();
  EXPECT_EQ(engine_->Stats().blocks, 1);
  EXPECT_EQ(IdleOf("b0"), kTtl - absl::Seconds(1));
  now_ += absl::Seconds(1);
  EXPECT_EQ(engine_->ExpireBlocks(), std::vector<std::string>{"b0"});
  EXPECT_EQ(engine_->Stats().blocks, 0);
  EXPECT_EQ(MemoryUsed(), 0);
}

// What `blockctl gc --yes` relies on: a delete with only_if_idle judges the idle time with the block
// locked, refuses (and keeps the block) when a call named it since, and does not renew the lease
// it judges; without a lease the idle time counts the same.
TEST_F(BlockLeaseTest, DeleteOnlyIfIdleRefusesABlockUsedSinceAndDoesNotRenewIt) {
  ASSERT_OK(CreateLeased("b0", kTtl));
  ASSERT_OK(Create("b1", Config(true), 2));
  now_ += absl::Seconds(6);
  EXPECT_EQ(IdleOf("b0"), absl::Seconds(6));  // a garbage collector lists it as idle 5 s or more ...
  now_ += absl::Seconds(1);
  ASSERT_OK(engine_->GetBlock("b0").status());  // ... and then a client uses it
  now_ += absl::Seconds(2);
  EXPECT_TRUE(HasError(engine_->DeleteBlock("b0", absl::Seconds(5)).status(), StatusCode::kFailedPrecondition,
                       "block b0 was named by a call 2.0 s ago, less than the 5.0 s it must be idle: not deleted"));
  EXPECT_TRUE(Exists("b0"));
  EXPECT_EQ(IdleOf("b0"), absl::Seconds(2)) << "a refused conditional delete renewed the lease";
  now_ += absl::Seconds(3);
  auto released = engine_->DeleteBlock("b0", absl::Seconds(5));
  ASSERT_TRUE(released.ok()) << released.status();
  EXPECT_FALSE(Exists("b0"));
  EXPECT_TRUE(HasError(engine_->DeleteBlock("b0", absl::Seconds(5)).status(), StatusCode::kNotFound,
                       "block b0 not found"));
  EXPECT_TRUE(HasError(engine_->DeleteBlock("b1", absl::Seconds(13)).status(), StatusCode::kFailedPrecondition,
                       "block b1 was named by a call 12.0 s ago, less than the 13.0 s"));
  EXPECT_TRUE(engine_->DeleteBlock("b1", absl::Seconds(12)).ok()) << "a block without a lease idle 12 s";
  EXPECT_EQ(MemoryUsed(), 0);
}

// Checkpoints do not carry leases: a block restored over a leased one has none.
TEST_F(BlockLeaseTest, RestoredBlockHasNoLease) {
  ASSERT_OK(CreateLeased("b0", kTtl));
  auto exported = engine_->ExportBlocks({"b0"});
  ASSERT_TRUE(exported.ok()) << exported.status();
  ASSERT_OK(engine_->ImportBlocks(*exported, /*replace=*/true));
  EXPECT_EQ(engine_->GetBlock("b0")->ttl, absl::ZeroDuration());
  now_ += absl::Hours(1000);
  EXPECT_TRUE(engine_->ExpireBlocks().empty());
  EXPECT_TRUE(Exists("b0"));
}

TEST_F(BlockLeaseTest, NegativeTtlIsRefusedAndChangesNothing) {
  EXPECT_TRUE(HasError(CreateLeased("b0", -absl::Seconds(1)), StatusCode::kInvalidArgument,
                       "ttl = -1s, expected >= 0 (0: no lease)"));
  EXPECT_FALSE(Exists("b0"));
  EXPECT_EQ(MemoryUsed(), 0);
  EXPECT_TRUE(engine_->ExpireBlocks().empty());
}

}  // namespace
}  // namespace blockd::testing
