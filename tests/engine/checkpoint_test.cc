// engine/checkpoint.h rotation: --checkpoint_keep applies to automatic checkpoints (saved without
// a name: every_steps, or Save with an empty name) only; a checkpoint the user named is never
// deleted by later saves and restores as saved.
#include "engine/checkpoint.h"

#include <cstdlib>
#include <filesystem>
#include <optional>
#include <set>
#include <string>

#include "tests/engine/engine_fixture.h"

namespace blockd::testing {
namespace {

namespace fs = std::filesystem;


// The checkpoint directories under `dir` (LATEST and temporaries left out).
std::set<std::string> CheckpointsIn(const std::string& dir) {
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string base = e.path().filename().string();
    if (e.is_directory() && base[0] != '.') names.insert(base);
  }
  return names;
}

class CheckpointRotation : public EngineFixture {
 protected:
  void SetUp() override { ASSERT_OK(Create("b0", Config(false), 7)); }
  void TearDown() override {
    std::error_code ec;
    for (const std::string& d : dirs_) fs::remove_all(d, ec);
  }
  std::string FreshDir(const std::string& tag) {
    std::string tmpl = (fs::temp_directory_path() / ("blockd-" + tag + "-XXXXXX")).string();
    EXPECT_NE(mkdtemp(tmpl.data()), nullptr) << tmpl;
    dirs_.push_back(tmpl);
    return tmpl;
  }
  std::vector<std::string> dirs_;
  // Changes b0's weights so each checkpoint holds something different.
  void Change(int k) {
    TensorMap w = RandomWeights(Config(false));
    w.begin()->second[0] = static_cast<float>(k);
    ASSERT_OK(Load("b0", w));
  }
};

TEST_F(CheckpointRotation, NamedCheckpointsOutliveAutomaticRotation) {
  const std::string dir = FreshDir("rotation");
  auto ckpt = MakeFileCheckpointer(engine_.get(), dir, /*every_steps=*/1, /*keep=*/2);
  ASSERT_OK(ckpt.status());
  Change(1);
  const TensorMap good = Read("b0", TensorKind::kWeights);
  ASSERT_OK((*ckpt)->Save({}, "good").status());
  // Five automatic saves after it: three through AfterStep (as a Step triggers them), two through
  // Save with no name (SaveCheckpoint without a name).
  for (int k = 2; k <= 6; ++k) {
    Change(k);
    if (k <= 4) {
      (*ckpt)->AfterStep({"b0"});
    } else {
      ASSERT_OK((*ckpt)->Save({}, "").status());
    }
  }
  const std::set<std::string> expected = {"good", "ckpt-00000005", "ckpt-00000006"};
  EXPECT_EQ(CheckpointsIn(dir), expected) << "keep=2 automatic checkpoints plus the named one";

  Change(7);
  auto restored = (*ckpt)->Restore("good", {});
  ASSERT_OK(restored.status());
  EXPECT_EQ(Read("b0", TensorKind::kWeights), good) << "checkpoint good no longer holds what was saved";
}

// A block with scaled RoPE and Qwen2's biases restores with its whole config and its bias tensors.
TEST_F(CheckpointRotation, RopeScalingAndBiasesRestore) {
  BlockConfig c = Config(false);
  c.attention_bias = true;
  c.rope_scaling = {"yarn", 4.0, 0, 0, 4096, 1.2, 16, 2};
  ASSERT_OK(Create("q2", c, std::nullopt));
  const TensorMap w = RandomWeights(c);
  ASSERT_TRUE(w.count("self_attn.v_proj.bias"));
  ASSERT_OK(Load("q2", w));
  auto ckpt = MakeFileCheckpointer(engine_.get(), FreshDir("rope"), 0, 3);
  ASSERT_OK(ckpt.status());
  ASSERT_OK((*ckpt)->Save({"q2"}, "scaled").status());
  ASSERT_OK(engine_->DeleteBlock("q2").status());
  ASSERT_OK((*ckpt)->Restore("scaled", {}).status());
  auto info = engine_->GetBlock("q2");
  ASSERT_OK(info.status());
  EXPECT_TRUE(info->spec.config == c) << "rope_scaling / attention_bias lost in the manifest";
  EXPECT_EQ(Read("q2", TensorKind::kWeights), w);
}

TEST_F(CheckpointRotation, AutomaticNamesPassOverANameTheUserTook) {
  const std::string dir = FreshDir("taken");
  auto ckpt = MakeFileCheckpointer(engine_.get(), dir, /*every_steps=*/0, /*keep=*/1);
  ASSERT_OK(ckpt.status());
  ASSERT_OK((*ckpt)->Save({}, "ckpt-00000002").status());  // the user's, sequence 1
  auto automatic = (*ckpt)->Save({}, "");
  ASSERT_OK(automatic.status());  // not ALREADY_EXISTS: the automatic name passed over the user's
  auto again = (*ckpt)->Save({}, "");
  ASSERT_OK(again.status());
  const std::set<std::string> expected = {"ckpt-00000002", fs::path(again->path).filename().string()};
  EXPECT_EQ(CheckpointsIn(dir), expected) << "keep=1 automatic checkpoint plus the named one";
}

TEST_F(CheckpointRotation, KeepBelowOneIsRefused) {
  EXPECT_TRUE(HasError(MakeFileCheckpointer(engine_.get(), FreshDir("keep0"), 0, 0).status(),
                       absl::StatusCode::kInvalidArgument, "--checkpoint_keep = 0"));
}

TEST_F(CheckpointRotation, LongNamesAreEchoedShort) {
  auto ckpt = MakeFileCheckpointer(engine_.get(), FreshDir("long"), 0, 3);
  ASSERT_OK(ckpt.status());
  const std::string huge(200000, 'n');
  for (const absl::Status& s : {(*ckpt)->Save({}, huge).status(), (*ckpt)->Restore(huge, {}).status()}) {
    EXPECT_TRUE(HasError(s, absl::StatusCode::kInvalidArgument, "(200000 bytes)"));
    EXPECT_LT(s.message().size(), 400u) << s.message().substr(0, 400);
  }
}

}  // namespace
}  // namespace blockd::testing
