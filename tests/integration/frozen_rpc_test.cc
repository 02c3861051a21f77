// Frozen blocks through the service on loopback: CreateBlockRequest.frozen reaches the engine and
// BlockInfo reports it, the block holds its weights only (memory_bytes), Forward and Backward give a
// trainable block's output and input gradient, Step, ZeroGrad and downloads of gradients or moments
// are refused with the block's state unchanged, and a checkpoint brings the flag back.
#include <gtest/gtest.h>

#include "tests/integration/harness.h"

namespace blockd::testing {
namespace {

TEST(FrozenRpc, WeightsOnlyForwardBackwardAndRefusals) {
  ServerOptions o = LoopbackOptions();
  o.checkpoint_dir = MakeTempDir("frozen-ckpt");
  auto server = StartServer(o);
  ASSERT_NE(server, nullptr);
  auto client = ConnectTo(*server, {.client_id = "frozen"});
  ASSERT_NE(client, nullptr);
  const v1::BlockConfig config = TinyConfig(/*qk_norm=*/true);
  const int64_t params = ExpectedParameterCount(config);

  v1::CreateBlockRequest frozen_req = CreateRequest("frozen", config, std::nullopt, 2, 16);
  frozen_req.set_frozen(true);
  auto frozen = client->CreateBlock(frozen_req);
  ASSERT_OK(frozen.status());
  EXPECT_TRUE(frozen->frozen());
  EXPECT_EQ(frozen->memory_bytes(), 4 * params) << "fp32 weights only on the CPU backend";
  auto trainable = client->CreateBlock(CreateRequest("trainable", config, std::nullopt, 2, 16));
  ASSERT_OK(trainable.status());
  EXPECT_FALSE(trainable->frozen());
  EXPECT_EQ(trainable->memory_bytes(), 16 * params);
  auto info = client->GetServerInfo();
  ASSERT_OK(info.status());
  EXPECT_EQ(info->devices(0).memory_used_bytes(), 20 * params);

  const std::vector<TensorBytes> weights = RandomWeights(config, 7);
  ASSERT_OK(client->LoadWeights("frozen", weights).status());
  ASSERT_OK(client->LoadWeights("trainable", weights).status());
  EXPECT_EQ(Download(*client, "frozen", v1::TENSOR_KIND_WEIGHTS), Download(*client, "trainable", v1::TENSOR_KIND_WEIGHTS));

  const v1::Tensor x = RandomTensor({2, 5, config.hidden_size()}, 11);
  const v1::Tensor dy = RandomTensor({2, 5, config.hidden_size()}, 12);
  auto yf = client->Forward({"frozen"}, x, /*keep_activations=*/true);
  auto yt = client->Forward({"trainable"}, x, /*keep_activations=*/true);
  ASSERT_OK(yf.status());
  ASSERT_OK(yt.status());
  EXPECT_EQ(yf->output().data(), yt->output().data()) << "frozen and trainable forward differ";
  auto dxf = client->Backward(yf->activation_id(), dy);
  auto dxt = client->Backward(yt->activation_id(), dy);
  ASSERT_OK(dxf.status());
  ASSERT_OK(dxt.status());
  EXPECT_EQ(dxf->grad_input().data(), dxt->grad_input().data()) << "frozen and trainable input gradients differ";

  const Snapshot before = Download(*client, "frozen", v1::TENSOR_KIND_WEIGHTS);
  v1::StepRequest step;
  step.add_block_ids("frozen");
  EXPECT_TRUE(StatusIs(client->Step(step).status(), absl::StatusCode::kFailedPrecondition,
                       {"block frozen is frozen", "no gradients or AdamW state", "Step"}));
  EXPECT_TRUE(StatusIs(client->ZeroGrad({"frozen"}), absl::StatusCode::kFailedPrecondition,
                       {"block frozen is frozen", "ZeroGrad"}));
  for (v1::TensorKind kind : {v1::TENSOR_KIND_GRADIENTS, v1::TENSOR_KIND_ADAM_M, v1::TENSOR_KIND_ADAM_V}) {
    EXPECT_TRUE(StatusIs(client->DownloadTensors("frozen", kind).status(), absl::StatusCode::kFailedPrecondition,
                         {"block frozen is frozen", "to download"}));
  }
  EXPECT_EQ(DiffSnapshots(before, Download(*client, "frozen", v1::TENSOR_KIND_WEIGHTS)), "");
  auto after = client->GetBlock("frozen");
  ASSERT_OK(after.status());
  EXPECT_EQ(after->step(), 0);
  EXPECT_FALSE(after->has_gradients());

  v1::SaveCheckpointRequest save;
  save.set_name("frozen-c1");
  ASSERT_OK(client->SaveCheckpoint(save).status());
  ASSERT_OK(client->DeleteBlock("frozen").status());
  v1::RestoreCheckpointRequest restore;
  restore.set_name("frozen-c1");
  ASSERT_OK(client->RestoreCheckpoint(restore).status());
  auto restored = client->GetBlock("frozen");
  ASSERT_OK(restored.status());
  EXPECT_TRUE(restored->frozen());
  EXPECT_EQ(restored->memory_bytes(), 4 * params);
  EXPECT_EQ(DiffSnapshots(before, Download(*client, "frozen", v1::TENSOR_KIND_WEIGHTS)), "");
}

}  // namespace
}  // namespace blockd::testing
