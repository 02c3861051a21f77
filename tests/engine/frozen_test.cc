// Frozen blocks through the Engine over the CPU backend: weights only (memory and budget), the same
// forward and input gradient as a trainable block of the same weights, Step/ZeroGrad and downloads
// of gradients or moments refused with nothing changed, sessions, and checkpoints that keep the flag.
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "engine/checkpoint.h"
#include "engine/engine.h"
#include "gtest/gtest.h"
#include "tests/engine/engine_fixture.h"

namespace blockd::testing {
namespace {

namespace fs = std::filesystem;
using absl::StatusCode;

class FrozenTest : public EngineFixture {
 protected:
  absl::StatusOr<BlockInfo> CreateFrozen(const std::string& id, const BlockConfig& c, bool frozen) {
    CreateBlockParams p;
    p.spec = Spec(id, c);
    p.spec.frozen = frozen;
    return engine_->CreateBlock(p);
  }

  // "frozen" and "trainable" hold the same random weights.
  void MakePair(const BlockConfig& c) {
    ASSERT_OK(CreateFrozen("frozen", c, true).status());
    ASSERT_OK(CreateFrozen("trainable", c, false).status());
    weights_ = RandomWeights(c);
    ASSERT_OK(Load("frozen", weights_));
    ASSERT_OK(Load("trainable", weights_));
  }

  TensorMap weights_;
};

TEST_F(FrozenTest, HoldsWeightsOnlyAndSaysSo) {
  BlockConfig c = Config(true);
  c.attention_bias = true;
  auto frozen = CreateFrozen("frozen", c, true);
  ASSERT_TRUE(frozen.ok()) << frozen.status();
  const int64_t params = ParameterCount(c);
  EXPECT_TRUE(frozen->spec.frozen);
  EXPECT_EQ(frozen->parameter_count, params);
  EXPECT_EQ(frozen->memory_bytes, 4 * params) << "fp32 weights, no gradients, no moments";
  EXPECT_EQ(engine_->Stats().memory_used[0], 4 * params) << "the budget reserves what the block holds";
  auto trainable = CreateFrozen("trainable", c, false);
  ASSERT_TRUE(trainable.ok()) << trainable.status();
  EXPECT_FALSE(trainable->spec.frozen);
  EXPECT_EQ(trainable->memory_bytes, 16 * params);
  EXPECT_EQ(engine_->Stats().memory_used[0], 20 * params);
}

TEST_F(FrozenTest, ForwardAndInputGradientEqualATrainableBlocks) {
  for (bool qk_norm : {false, true}) {
    SCOPED_TRACE(qk_norm ? "qk_norm" : "no qk_norm");
    Reset({});
    BlockConfig c = Config(qk_norm);
    c.attention_bias = qk_norm;  // both kinds of 1-D parameters whose gradients a frozen block skips
    MakePair(c);
    const std::vector<float> x = RandomActivation(16, 2.0), dy = RandomActivation(16);
    auto ff = Forward({"frozen"}, x, kBatch, kSeq, /*keep=*/true);
    auto ft = Forward({"trainable"}, x, kBatch, kSeq, /*keep=*/true);
    ASSERT_TRUE(ff.ok() && ft.ok()) << ff.status() << ft.status();
    EXPECT_TRUE(BitwiseEqual("forward output", ff->out, ft->out));
    auto df = Backward(ff->activation_id, dy, kBatch, kSeq);
    auto dt = Backward(ft->activation_id, dy, kBatch, kSeq);
    ASSERT_TRUE(df.ok() && dt.ok()) << df.status() << dt.status();
    EXPECT_TRUE(BitwiseEqual("input gradient", *df, *dt));
    EXPECT_FALSE(engine_->GetBlock("frozen")->has_gradients);
    EXPECT_TRUE(engine_->GetBlock("trainable")->has_gradients);
    // A span mixing both: the frozen block passes the gradient on to the trainable one.
    auto span = Forward({"trainable", "frozen"}, x, kBatch, kSeq, /*keep=*/true);
    ASSERT_TRUE(span.ok()) << span.status();
    ASSERT_OK(Backward(span->activation_id, dy, kBatch, kSeq).status());
  }
}

TEST_F(FrozenTest, StepZeroGradAndGradientDownloadsAreRefusedAndChangeNothing) {
  MakePair(Config(true));
  const std::vector<float> x = RandomActivation(16, 2.0), dy = RandomActivation(16);
  TrainPass({"trainable", "frozen"}, x, dy);
  const TensorMap before = Read("frozen", TensorKind::kWeights);
  const TensorMap trainable_grads = Read("trainable", TensorKind::kGradients);
  AdamWHyper h;
  EXPECT_TRUE(HasError(engine_->Step({"frozen"}, h, 0).status(), StatusCode::kFailedPrecondition,
                       "block frozen is frozen: it holds weights only, no gradients or AdamW state, so Step"));
  // Refused as a whole: the trainable block named with it is not stepped either.
  EXPECT_TRUE(HasError(engine_->Step({"trainable", "frozen"}, h, 0).status(), StatusCode::kFailedPrecondition,
                       "frozen"));
  EXPECT_EQ(engine_->GetBlock("trainable")->step, 0);
  EXPECT_TRUE(engine_->GetBlock("trainable")->has_gradients);
  EXPECT_TRUE(HasError(engine_->ZeroGrad({"trainable", "frozen"}), StatusCode::kFailedPrecondition, "ZeroGrad"));
  EXPECT_TRUE(engine_->GetBlock("trainable")->has_gradients);
  for (const auto& [name, g] : Read("trainable", TensorKind::kGradients)) {
    EXPECT_TRUE(BitwiseEqual("trainable gradient " + name, g, trainable_grads.at(name)));
  }
  for (TensorKind kind : {TensorKind::kGradients, TensorKind::kAdamM, TensorKind::kAdamV}) {
    EXPECT_TRUE(HasError(engine_->ReadTensors("frozen", kind, DType::kFloat32, {}).status(),
                         StatusCode::kFailedPrecondition, "is frozen"));
    EXPECT_TRUE(HasError(engine_->TensorNames("frozen", kind, {"mlp.up_proj.weight"}).status(),
                         StatusCode::kFailedPrecondition, "mlp.up_proj.weight has no"));
  }
  EXPECT_TRUE(HasError(engine_->TensorNames("frozen", TensorKind::kWeights, {"nope"}).status(),
                       StatusCode::kInvalidArgument, "has no tensor \"nope\""));
  auto names = engine_->TensorNames("frozen", TensorKind::kWeights, {});
  ASSERT_TRUE(names.ok()) << names.status();
  EXPECT_EQ(names->size(), BlockParams(Config(true)).size());
  const TensorMap after = Read("frozen", TensorKind::kWeights);
  for (const auto& [name, w] : before) EXPECT_TRUE(BitwiseEqual("frozen weight " + name, after.at(name), w));
  for (const auto& [name, w] : weights_) EXPECT_TRUE(BitwiseEqual("loaded weight " + name, after.at(name), w));
  EXPECT_EQ(engine_->GetBlock("frozen")->step, 0);
}

TEST_F(FrozenTest, SessionsRunOnFrozenBlocks) {
  MakePair(Config(true));
  const std::vector<float> x = RandomActivation(16, 2.0);
  auto full = Forward({"frozen"}, x, kBatch, kSeq, /*keep=*/false);
  ASSERT_TRUE(full.ok()) << full.status();
  auto y = SessionPrefill({"frozen"}, x);
  ASSERT_TRUE(y.ok()) << y.status();
  EXPECT_TRUE(AllClose("session prefill vs Forward", *y, Cast<double>(full->out), 1e-5 * MaxAbs(Cast<double>(full->out)),
                       0));
}

TEST_F(FrozenTest, CheckpointsKeepTheFlagAndTheWeights) {
  MakePair(Config(true));
  const fs::path dir = fs::temp_directory_path() / ("blockd-frozen-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  auto ckpt = MakeFileCheckpointer(engine_.get(), dir.string(), /*every_steps=*/0, /*keep=*/3);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  ASSERT_OK((*ckpt)->Save({"frozen", "trainable"}, "c1").status());
  ASSERT_OK(engine_->DeleteBlock("frozen").status());
  ASSERT_OK((*ckpt)->Restore("c1", {}).status());
  auto info = engine_->GetBlock("frozen");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_TRUE(info->spec.frozen);
  EXPECT_EQ(info->memory_bytes, 4 * ParameterCount(Config(true)));
  EXPECT_FALSE(engine_->GetBlock("trainable")->spec.frozen);
  const TensorMap back = Read("frozen", TensorKind::kWeights);
  for (const auto& [name, w] : weights_) EXPECT_TRUE(BitwiseEqual("restored weight " + name, back.at(name), w));
  // The state of a frozen block has no moments; one with moments does not import as frozen.
  auto states = engine_->ExportBlocks({"frozen", "trainable"});
  ASSERT_TRUE(states.ok()) << states.status();
  EXPECT_TRUE((*states)[0].adam_m.empty() && (*states)[0].adam_v.empty());
  BlockState bad = (*states)[1];
  bad.spec.id = "bad";
  bad.spec.frozen = true;
  EXPECT_TRUE(HasError(engine_->ImportBlocks({bad}, false), StatusCode::kInvalidArgument, "(the block is frozen)"));
  fs::remove_all(dir);
}

}  // namespace
}  // namespace blockd::testing
