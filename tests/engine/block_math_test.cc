// The whole decoder block of engine/cpu/block_math.h: its double forward against the naive float64
// reference, its backward against central differences for the input and every weight (QK-norm on
// and off, GQA ratios 1, 2 and 4, batch > 1, a nonzero position offset), float against double, and
// the accumulate-into-grads contract; with LoRA adapters on all seven projections, the adapters'
// gradients by the same finite differences.
#include "engine/cpu/block_math.h"

#include <cctype>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/engine/reference.h"
#include "tests/engine/test_util.h"

namespace blockd::cpu {
namespace {

using ::blockd::testing::AllClose;
using ::blockd::testing::BitwiseEqual;
using ::blockd::testing::Cast;
using ::blockd::testing::CheckGradient;
using ::blockd::testing::Dot;
using ::blockd::testing::MaxAbs;
using ::blockd::testing::Rand;
using ::blockd::testing::RoundToFloat;
using ::blockd::testing::TestSeed;
namespace ref = ::blockd::testing::ref;

// Central differences in double with eps = 1e-6: the loss is a sum of ~100 terms of O(1), computed
// to ~1e-14, so the numeric gradient carries ~1e-8 of rounding error and ~1e-12 of truncation
// error; atol 1e-6 leaves a margin of 100.
constexpr double kFdEps = 1e-6, kFdAtol = 1e-6, kFdRtol = 1e-5;

struct BlockCase {
  bool qk_norm;
  int64_t kv_heads;
  const char* rope = "default";  // "llama3" / "yarn" / "linear": scaled RoPE (see SetUp)
  bool bias = false;             // Qwen2's q/k/v biases
  bool lora = false;             // LoRA adapters (rank 3, alpha 7.5) on all seven projections
};

class BlockMathTest : public ::testing::TestWithParam<BlockCase> {
 protected:
  static constexpr int64_t kBatch = 2, kSeq = 5, kOffset = 3;

  void SetUp() override {
    config_.hidden_size = 16;
    config_.num_attention_heads = 4;
    config_.num_kv_heads = GetParam().kv_heads;
    config_.head_dim = 8;
    config_.intermediate_size = 24;
    config_.rms_norm_eps = 1e-6;
    config_.rope_theta = 10000;
    config_.qk_norm = GetParam().qk_norm;
    // With head_dim 8 and theta 1e4 the wavelengths are 6.3, 63, 628 and 6283: llama3's context of
    // 128 (bands at 32 and 128) puts one dimension in each of its three bands, and yarn's 64 gives a
    // correction range [0, 2] so the ramp is 0, 1/2, 1, 1.
    const std::string rope = GetParam().rope;
    if (rope == "llama3") config_.rope_scaling = {"llama3", 8.0, 1.0, 4.0, 128, 0, 0, 0};
    if (rope == "yarn") config_.rope_scaling = {"yarn", 4.0, 0, 0, 64, 0, 0, 0};
    if (rope == "linear") config_.rope_scaling = {"linear", 3.0, 0, 0, 0, 0, 0, 0};
    config_.attention_bias = GetParam().bias;
    if (GetParam().lora) {
      lora_.rank = 3;
      lora_.alpha = 7.5;
      for (const LoraTarget& t : kLoraTargets) lora_.target_modules.push_back(t.module);
    }
    params_ = BlockParams(config_, lora_);
    Rand rng(TestSeed(1000 + 10 * GetParam().kv_heads + GetParam().qk_norm));
    for (const ParamSpec& p : params_) {
      // Norm weights near 1 but not 1 (so their gradients matter); matrices 1.5x nn.Linear's range,
      // which makes the attention probabilities far from uniform.
      // Biases of both signs, of the size of a projection's output. LoRA's B random too (PEFT
      // starts it at 0, which would hide every path through A).
      const bool bias = p.id == ParamId::kQBias || p.id == ParamId::kKBias || p.id == ParamId::kVBias;
      weights_[static_cast<int>(p.id)] =
          p.is_matrix ? rng.Vec(p.numel(), -1.5 / std::sqrt(double(p.shape[1])), 1.5 / std::sqrt(double(p.shape[1])))
          : bias      ? rng.Vec(p.numel(), -1.0, 1.0)
                      : rng.Vec(p.numel(), 0.5, 1.5);
      RoundToFloat(&weights_[static_cast<int>(p.id)]);
    }
    x_ = rng.Vec(kBatch * kSeq * config_.hidden_size, -2, 2);
    RoundToFloat(&x_);
    r_ = rng.Vec(x_.size(), -1, 1);
    RoundToFloat(&r_);
  }

  template <class T>
  BlockParamPtrs<T> Ptrs(std::array<std::vector<std::remove_const_t<T>>, kNumParamIds>& w) const {
    BlockParamPtrs<T> p;
    for (int i = 0; i < kNumParamIds; ++i) p.p[i] = w[i].empty() ? nullptr : w[i].data();
    if (lora_.rank > 0) {
      p.lora_rank = lora_.rank;
      p.lora_scale = lora_.scale();
    }
    return p;
  }

  std::string NameOf(ParamId id) const {
    for (const ParamSpec& p : params_) {
      if (p.id == id) return p.name;
    }
    return "?";
  }

  ref::BlockWeights ZeroGrads() const {
    ref::BlockWeights g;
    for (const ParamSpec& p : params_) g[static_cast<int>(p.id)].assign(p.numel(), 0.0);
    return g;
  }

  // Runs forward (keeping activations in `saved`) and returns sum(r * out).
  double Loss(BlockActivations<double>* saved) {
    out_.resize(x_.size());
    BlockForward(config_, Ptrs<const double>(weights_), x_.data(), kBatch, kSeq, kOffset, out_.data(), saved);
    return Dot(r_, out_.data());
  }

  BlockConfig config_;
  LoraConfig lora_;
  std::vector<ParamSpec> params_;
  ref::BlockWeights weights_;
  std::vector<double> x_, r_, out_;
};

TEST_P(BlockMathTest, DoubleForwardMatchesReference) {
  BlockActivations<double> saved;
  Loss(&saved);
  const std::vector<double> want =
      ref::Block(config_, weights_, x_, kBatch, kSeq, kOffset, lora_.rank > 0 ? lora_.scale() : 0);
  EXPECT_TRUE(AllClose("block<double> out", out_, want, 1e-11, 1e-12));
}

TEST_P(BlockMathTest, BackwardMatchesFiniteDifferencesForInputAndEveryWeight) {
  BlockActivations<double> saved;
  Loss(&saved);
  ref::BlockWeights grads = ZeroGrads();
  std::vector<double> dx(x_.size());
  BlockBackward(config_, Ptrs<const double>(weights_), saved, r_.data(), dx.data(), Ptrs<double>(grads));

  BlockActivations<double> scratch;
  auto loss = [&] { return Loss(&scratch); };
  // dL/dx includes both residual identities (dx = dy + ...): drop either and this fails.
  EXPECT_TRUE(CheckGradient("block dL/dx", &x_, dx, loss, kFdEps, kFdAtol, kFdRtol));
  for (const ParamSpec& p : params_) {
    const int id = static_cast<int>(p.id);
    EXPECT_TRUE(CheckGradient(absl::StrCat("block dL/d ", p.name), &weights_[id], grads[id], loss, kFdEps, kFdAtol,
                              kFdRtol));
  }
}

TEST_P(BlockMathTest, FloatMatchesDouble) {
  BlockActivations<double> saved;
  Loss(&saved);
  ref::BlockWeights grads = ZeroGrads();
  std::vector<double> dx(x_.size());
  BlockBackward(config_, Ptrs<const double>(weights_), saved, r_.data(), dx.data(), Ptrs<double>(grads));

  std::array<std::vector<float>, kNumParamIds> wf, gf;
  for (const ParamSpec& p : params_) {
    wf[static_cast<int>(p.id)] = Cast<float>(weights_[static_cast<int>(p.id)]);
    gf[static_cast<int>(p.id)].assign(p.numel(), 0.f);
  }
  const std::vector<float> xf = Cast<float>(x_), rf = Cast<float>(r_);
  std::vector<float> outf(x_.size()), dxf(x_.size());
  BlockActivations<float> savedf;
  BlockForward(config_, Ptrs<const float>(wf), xf.data(), kBatch, kSeq, kOffset, outf.data(), &savedf);
  // The fp32 bar of ARCHITECTURE.md ("Testing"): within 1e-5 of the output's scale.
  EXPECT_TRUE(AllClose("block<float> out", outf, out_, 1e-5 * MaxAbs(out_), 1e-5));

  BlockBackward(config_, Ptrs<const float>(wf), savedf, rf.data(), dxf.data(), Ptrs<float>(gf));
  // Gradients chain a few more fp32 products and reductions than the forward (~10 roundings on
  // the path, sums of <= 24 terms), with cancellation in the softmax and RMSNorm backwards, so the
  // error is relative to each tensor's scale; the same 1e-5 of that scale bounds it with a margin
  // of ~25 at these sizes. A wrong formula is off by O(1).
  EXPECT_TRUE(AllClose("block<float> dx", dxf, dx, 1e-5 * MaxAbs(dx), 1e-5));
  for (const ParamSpec& p : params_) {
    const int id = static_cast<int>(p.id);
    EXPECT_TRUE(AllClose(absl::StrCat("block<float> d ", p.name), gf[id], grads[id], 1e-5 * MaxAbs(grads[id]), 1e-5));
  }
}

TEST_P(BlockMathTest, BackwardAddsIntoGradsAndWritesDx) {
  BlockActivations<double> saved;
  Loss(&saved);
  ref::BlockWeights once = ZeroGrads(), twice = ZeroGrads();
  std::vector<double> dx(x_.size()), dx2(x_.size(), std::numeric_limits<double>::quiet_NaN());
  BlockBackward(config_, Ptrs<const double>(weights_), saved, r_.data(), dx.data(), Ptrs<double>(once));
  BlockBackward(config_, Ptrs<const double>(weights_), saved, r_.data(), dx2.data(), Ptrs<double>(twice));
  BlockBackward(config_, Ptrs<const double>(weights_), saved, r_.data(), dx2.data(), Ptrs<double>(twice));
  EXPECT_TRUE(BitwiseEqual("block dx written over a NaN-filled buffer", dx2, dx));
  for (const ParamSpec& p : params_) {
    const int id = static_cast<int>(p.id);
    std::vector<double> doubled = once[id];
    for (double& g : doubled) g *= 2;
    // g + g is exact; BLAS may fuse the addition into its accumulation (one rounding).
    EXPECT_TRUE(AllClose(absl::StrCat("d ", p.name, " after two backwards vs 2x one"), twice[id], doubled,
                         1e-13 * MaxAbs(doubled), 1e-13));
  }
}

TEST_P(BlockMathTest, FrozenBaseGivesTheSameInputAndAdapterGradients) {
  // A frozen block passes null gradients for its base parameters: dx and the adapters' gradients
  // come out bit for bit as with every gradient asked for.
  BlockActivations<double> saved;
  Loss(&saved);
  ref::BlockWeights all = ZeroGrads(), adapters = ZeroGrads();
  std::vector<double> dx(x_.size()), dx_frozen(x_.size());
  BlockBackward(config_, Ptrs<const double>(weights_), saved, r_.data(), dx.data(), Ptrs<double>(all));
  BlockParamPtrs<double> only = Ptrs<double>(adapters);
  for (const ParamSpec& p : params_) {
    if (!IsLoraParam(p.id)) only.p[static_cast<int>(p.id)] = nullptr;
  }
  BlockBackward(config_, Ptrs<const double>(weights_), saved, r_.data(), dx_frozen.data(), only);
  EXPECT_TRUE(BitwiseEqual("block dx with the base frozen", dx_frozen, dx));
  for (const ParamSpec& p : params_) {
    const int id = static_cast<int>(p.id);
    if (IsLoraParam(p.id)) {
      EXPECT_TRUE(BitwiseEqual(absl::StrCat("d ", p.name, " with the base frozen"), adapters[id], all[id]));
    } else {
      EXPECT_EQ(MaxAbs(adapters[id]), 0.0) << p.name << " of a frozen base was written";
    }
  }
}

TEST_P(BlockMathTest, ZeroBranchesLeaveTheIdentity) {
  // With o_proj and down_proj zero both branches vanish: out = x, and dL/dx = dL/dout through the
  // two residual identities alone. (Their adapters' B too, when there are adapters.)
  for (ParamId id : {ParamId::kOProj, ParamId::kDownProj, ParamId::kOLoraB, ParamId::kDownLoraB}) {
    for (double& w : weights_[static_cast<int>(id)]) w = 0;
  }
  BlockActivations<double> saved;
  Loss(&saved);
  EXPECT_TRUE(BitwiseEqual("block out with both branches off", out_, x_));
  ref::BlockWeights grads = ZeroGrads();
  std::vector<double> dx(x_.size());
  BlockBackward(config_, Ptrs<const double>(weights_), saved, r_.data(), dx.data(), Ptrs<double>(grads));
  EXPECT_TRUE(BitwiseEqual("block dx with both branches off", dx, r_));
  // The branches' output projections still receive gradients.
  BlockActivations<double> scratch;
  auto loss = [&] { return Loss(&scratch); };
  for (ParamId id : {ParamId::kOProj, ParamId::kDownProj}) {
    EXPECT_TRUE(CheckGradient(absl::StrCat("block dL/d ", NameOf(id)), &weights_[static_cast<int>(id)],
                              grads[static_cast<int>(id)], loss, kFdEps, kFdAtol, kFdRtol));
  }
}

INSTANTIATE_TEST_SUITE_P(Configs, BlockMathTest,
                         ::testing::Values(BlockCase{false, 4}, BlockCase{false, 2}, BlockCase{false, 1},
                                           BlockCase{true, 4}, BlockCase{true, 2}, BlockCase{true, 1},
                                           BlockCase{false, 2, "llama3"}, BlockCase{true, 1, "yarn"},
                                           BlockCase{false, 4, "linear"}, BlockCase{false, 2, "default", true},
                                           BlockCase{true, 2, "yarn", true}, BlockCase{false, 1, "llama3", true},
                                           BlockCase{false, 2, "default", false, true},
                                           BlockCase{true, 1, "llama3", true, true}),
                         [](const ::testing::TestParamInfo<BlockCase>& info) {
                           std::string rope = info.param.rope;
                           rope[0] = static_cast<char>(std::toupper(rope[0]));
                           return std::string(info.param.qk_norm ? "QkNorm" : "NoQkNorm") + "Gqa" +
                                  std::to_string(4 / info.param.kv_heads) + (rope == "Default" ? "" : rope + "Rope") +
                                  (info.param.bias ? "Bias" : "") + (info.param.lora ? "Lora" : "");
                         });

}  // namespace
}  // namespace blockd::cpu
