// LoRA adapters through the Engine over the CPU backend: validation (nothing created on refusal),
// the adapters as named parameters with PEFT's initialisation, memory of frozen and trainable blocks
// with adapters, forward and adapter gradients against the float64 reference (central differences),
// Step on a frozen base (adapters only, base bitwise unchanged, AdamW as torch's), sessions and
// checkpoints. The block math itself is checked per op in block_math_test's Lora cases.
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
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

LoraConfig AllTargets(int32_t rank, double alpha) {
  LoraConfig l;
  l.rank = rank;
  l.alpha = alpha;
  for (const LoraTarget& t : kLoraTargets) l.target_modules.push_back(t.module);
  return l;
}

class LoraTest : public EngineFixture {
 protected:
  absl::StatusOr<BlockInfo> CreateLora(const std::string& id, const BlockConfig& c, bool frozen,
                                       const LoraConfig& lora, std::optional<uint64_t> seed = std::nullopt) {
    CreateBlockParams p;
    p.spec = Spec(id, c);
    p.spec.frozen = frozen;
    p.spec.lora = lora;
    p.seed = seed;
    return engine_->CreateBlock(p);
  }

  // Random base weights and adapters (B random too: PEFT's zero B would hide every path through A).
  TensorMap RandomLoraWeights(const BlockConfig& c, const LoraConfig& lora) {
    TensorMap w = RandomWeights(c);
    for (const ParamSpec& p : BlockParams(c, lora)) {
      if (!IsLoraParam(p.id)) continue;
      const double bound = 1.5 / std::sqrt(static_cast<double>(p.shape[1]));
      w[p.name] = Cast<float>(rng_.Vec(p.numel(), -bound, bound));
    }
    return w;
  }

  static ref::BlockWeights ToRefLora(const BlockConfig& c, const LoraConfig& lora, const TensorMap& w) {
    ref::BlockWeights out;
    for (const ParamSpec& p : BlockParams(c, lora)) out[static_cast<int>(p.id)] = Cast<double>(w.at(p.name));
    return out;
  }
};

TEST_F(LoraTest, RefusesBadConfigsWithClearMessagesAndCreatesNothing) {
  // Config(false): q_proj/o_proj [16,16], k_proj/v_proj [8,16], gate/up [32,16], down [16,32].
  const BlockConfig c = Config(false);
  struct Bad {
    LoraConfig lora;
    const char* message;
  };
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  const std::vector<Bad> cases = {
      {{0, 16, {"q_proj"}}, "lora.rank = 0, expected 1..16 (min(out, in) of q_proj [16,16])"},
      {{-3, 16, {"q_proj"}}, "lora.rank = -3, expected 1..16"},
      {{17, 16, {"q_proj"}}, "lora.rank = 17, expected 1..16"},
      {{9, 16, {"q_proj", "v_proj"}}, "lora.rank = 9, expected 1..8 (min(out, in) of v_proj [8,16])"},
      {{4, 0, {"q_proj"}}, "lora.alpha = 0, expected a finite number > 0"},
      {{4, -8, {"q_proj"}}, "lora.alpha = -8, expected a finite number > 0"},
      {{4, nan, {"q_proj"}}, "lora.alpha = nan, expected a finite number > 0"},
      {{4, inf, {"q_proj"}}, "lora.alpha = inf, expected a finite number > 0"},
      {{4, 8, {}}, "lora.target_modules is empty, expected one or more of q_proj k_proj v_proj o_proj gate_proj"},
      {{4, 8, {"q_proj", "qkv_proj"}}, "lora.target_modules[1] = \"qkv_proj\", expected one of q_proj k_proj"},
      {{4, 8, {"lm_head"}}, "lora.target_modules[0] = \"lm_head\""},
      {{4, 8, {"self_attn.q_proj"}}, "lora.target_modules[0] = \"self_attn.q_proj\""},
      {{4, 8, {"v_proj", "up_proj", "v_proj"}}, "lora.target_modules names v_proj twice (at 0 and 2)"},
  };
  for (const Bad& b : cases) {
    for (bool frozen : {false, true}) {
      EXPECT_TRUE(HasError(CreateLora("b0", c, frozen, b.lora, 1).status(), StatusCode::kInvalidArgument, b.message));
    }
  }
  EXPECT_TRUE(engine_->ListBlocks().empty());
  EXPECT_EQ(engine_->Stats().memory_used[0], 0) << "a refused block reserves nothing";
}

TEST_F(LoraTest, AdaptersAreNamedParametersWithPeftsInitAndCountedMemory) {
  const BlockConfig c = Config(true);
  LoraConfig lora{4, 8, {"down_proj", "q_proj", "v_proj"}};  // any order; the block keeps q k v o gate up down's
  auto frozen = CreateLora("frozen", c, true, lora, 5);
  ASSERT_TRUE(frozen.ok()) << frozen.status();
  EXPECT_EQ(frozen->spec.lora.target_modules, (std::vector<std::string>{"q_proj", "v_proj", "down_proj"}));
  EXPECT_EQ(frozen->spec.lora.rank, 4);
  EXPECT_EQ(frozen->spec.lora.alpha, 8);
  const int64_t base = ParameterCount(c);
  // q A [4,16] B [16,4]; v A [4,16] B [8,4]; down A [4,32] B [16,4]
  const int64_t adapters = 64 + 64 + 64 + 32 + 128 + 64;
  EXPECT_EQ(frozen->parameter_count, base + adapters);
  EXPECT_EQ(frozen->memory_bytes, 4 * base + 16 * adapters) << "base weights, adapters with gradients and moments";
  EXPECT_EQ(engine_->Stats().memory_used[0], 4 * base + 16 * adapters);
  auto trainable = CreateLora("trainable", c, false, lora, 5);
  ASSERT_TRUE(trainable.ok()) << trainable.status();
  EXPECT_EQ(trainable->memory_bytes, 16 * (base + adapters));

  auto params = engine_->BlockParamsOf("frozen");
  ASSERT_TRUE(params.ok()) << params.status();
  const std::vector<std::pair<std::string, std::vector<int64_t>>> want = {
      {"self_attn.q_proj.lora_A.weight", {4, 16}}, {"self_attn.q_proj.lora_B.weight", {16, 4}},
      {"self_attn.v_proj.lora_A.weight", {4, 16}}, {"self_attn.v_proj.lora_B.weight", {8, 4}},
      {"mlp.down_proj.lora_A.weight", {4, 32}},    {"mlp.down_proj.lora_B.weight", {16, 4}}};
  ASSERT_EQ(params->size(), BlockParams(c).size() + want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    const ParamSpec& p = (*params)[BlockParams(c).size() + i];
    EXPECT_EQ(p.name, want[i].first);
    EXPECT_EQ(p.shape, want[i].second) << p.name;
  }
  // The seeded block: A uniform in +-1/sqrt(in) (PEFT's kaiming_uniform(a=sqrt(5))), B zero; the
  // same bits on the trainable twin.
  const TensorMap w = Read("frozen", TensorKind::kWeights), wt = Read("trainable", TensorKind::kWeights);
  for (const auto& [name, shape] : want) {
    const std::vector<float>& v = w.at(name);
    EXPECT_TRUE(BitwiseEqual("adapter " + name + " of both blocks", v, wt.at(name)));
    if (name.find("lora_B") != std::string::npos) {
      EXPECT_EQ(MaxAbs(Cast<double>(v)), 0.0) << name << " should start at zero";
    } else {
      const double bound = 1 / std::sqrt(static_cast<double>(shape[1]));
      EXPECT_LE(MaxAbs(Cast<double>(v)), bound) << name;
      EXPECT_GT(MaxAbs(Cast<double>(v)), 0.5 * bound) << name << " looks unseeded";
    }
  }
  // An unseeded block (weights to come from LoadWeights) has its adapters ready: only the base is missing.
  auto unseeded = CreateLora("unseeded", c, true, lora);
  ASSERT_TRUE(unseeded.ok()) << unseeded.status();
  EXPECT_EQ(unseeded->missing_weights.size(), BlockParams(c).size());
  for (const std::string& name : unseeded->missing_weights) EXPECT_EQ(name.find("lora_"), std::string::npos) << name;
  // A new adapter leaves the block's output exactly as the base's: B is zero.
  auto plain = CreateLora("plain", c, true, LoraConfig{}, 5);
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_FALSE(plain->spec.lora.requested());
  const std::vector<float> x = RandomActivation(16, 2.0);
  auto yl = Forward({"frozen"}, x, kBatch, kSeq, false);
  auto yp = Forward({"plain"}, x, kBatch, kSeq, false);
  ASSERT_TRUE(yl.ok() && yp.ok()) << yl.status() << yp.status();
  EXPECT_TRUE(BitwiseEqual("output with fresh adapters vs none", yl->out, yp->out));
}

TEST_F(LoraTest, ForwardAndAdapterGradientsMatchTheFloat64Reference) {
  for (bool frozen : {true, false}) {
    SCOPED_TRACE(frozen ? "frozen base" : "trainable base");
    Reset({});
    BlockConfig c = Config(true);
    c.attention_bias = true;
    const LoraConfig lora = AllTargets(3, 7.5);
    ASSERT_OK(CreateLora("b0", c, frozen, lora).status());
    const TensorMap w = RandomLoraWeights(c, lora);
    ASSERT_OK(Load("b0", w));
    std::vector<float> x = RandomActivation(16, 2.0), r = RandomActivation(16);
    auto y = Forward({"b0"}, x, kBatch, kSeq, /*keep=*/true);
    ASSERT_TRUE(y.ok()) << y.status();
    ref::BlockWeights rw = ToRefLora(c, lora, w);
    const double scale = lora.scale();
    const std::vector<double> want = ref::Block(c, rw, Cast<double>(x), kBatch, kSeq, 0, scale);
    // The fp32 bar of ARCHITECTURE.md ("Testing"), as block_math_test's FloatMatchesDouble.
    EXPECT_TRUE(AllClose("lora block out", y->out, want, 1e-5 * MaxAbs(want), 1e-5));
    auto dx = Backward(y->activation_id, r, kBatch, kSeq);
    ASSERT_TRUE(dx.ok()) << dx.status();
    EXPECT_TRUE(engine_->GetBlock("b0")->has_gradients) << "a frozen block with adapters has their gradients";
    const TensorMap g = Read("b0", TensorKind::kGradients);
    EXPECT_EQ(g.size(), frozen ? 14u : BlockParams(c, lora).size());

    // Central differences of sum(r * out) through the float64 reference, per adapter element and
    // per input element; the engine's fp32 gradients within 1e-5 of each tensor's scale.
    const std::vector<double> rd = Cast<double>(r);
    std::vector<double> xd = Cast<double>(x);
    auto loss = [&] { return Dot(rd, ref::Block(c, rw, xd, kBatch, kSeq, 0, scale).data()); };
    auto numeric = [&](std::vector<double>* v) {
      std::vector<double> out(v->size());
      for (size_t i = 0; i < v->size(); ++i) {
        const double saved = (*v)[i];
        (*v)[i] = saved + 1e-6;
        const double plus = loss();
        (*v)[i] = saved - 1e-6;
        const double minus = loss();
        (*v)[i] = saved;
        out[i] = (plus - minus) / 2e-6;
      }
      return out;
    };
    const std::vector<double> want_dx = numeric(&xd);
    EXPECT_TRUE(AllClose("lora block dx vs central differences", *dx, want_dx, 1e-5 * MaxAbs(want_dx), 1e-5));
    for (const ParamSpec& p : BlockParams(c, lora)) {
      if (!IsLoraParam(p.id)) continue;
      const std::vector<double> want_g = numeric(&rw[static_cast<int>(p.id)]);
      ASSERT_GT(MaxAbs(want_g), 1e-3) << p.name << ": a negligible gradient would prove nothing";
      EXPECT_TRUE(AllClose("d " + p.name + " vs central differences", g.at(p.name), want_g, 1e-5 * MaxAbs(want_g),
                           1e-5));
    }
  }
}

TEST_F(LoraTest, StepOnAFrozenBaseUpdatesOnlyTheAdaptersAsAdamW) {
  const BlockConfig c = Config(true);
  const LoraConfig lora = AllTargets(2, 4);
  ASSERT_OK(CreateLora("b0", c, true, lora, 9).status());
  const TensorMap base = Read("b0", TensorKind::kWeights);
  AdamWHyper h;
  h.lr = 1e-2;
  h.weight_decay = 0.1;
  for (int64_t step = 1; step <= 3; ++step) {
    TrainPass({"b0"}, RandomActivation(16, 2.0), RandomActivation(16));
    const TensorMap w0 = Read("b0", TensorKind::kWeights), g = Read("b0", TensorKind::kGradients),
                    m0 = Read("b0", TensorKind::kAdamM), v0 = Read("b0", TensorKind::kAdamV);
    ASSERT_EQ(g.size(), 14u) << "gradients of the adapters only";
    auto result = engine_->Step({"b0"}, h, 0);
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_FALSE(result->skipped);
    const TensorMap w1 = Read("b0", TensorKind::kWeights), m1 = Read("b0", TensorKind::kAdamM),
                    v1 = Read("b0", TensorKind::kAdamV);
    for (const ParamSpec& p : BlockParams(c, lora)) {
      if (!IsLoraParam(p.id)) {
        EXPECT_TRUE(BitwiseEqual("frozen base " + p.name + " after step " + std::to_string(step), w1.at(p.name),
                                 base.at(p.name)));
        continue;
      }
      ref::AdamWState s(Cast<double>(w0.at(p.name)), Cast<double>(m0.at(p.name)), Cast<double>(v0.at(p.name)));
      ref::AdamWStep(&s, g.at(p.name), h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, step, 1.0);
      const double k = 32 * kFloatUlp;  // as engine_train_test: a few fp32 roundings of the terms' size
      for (size_t i = 0; i < s.p.size(); ++i) {
        ASSERT_LE(std::fabs(m1.at(p.name)[i] - s.m[i]), k * s.mag_m[i]) << p.name << " adam_m[" << i << "]";
        ASSERT_LE(std::fabs(v1.at(p.name)[i] - s.v[i]), k * s.v[i]) << p.name << " adam_v[" << i << "]";
        ASSERT_LE(std::fabs(w1.at(p.name)[i] - s.p[i]), k * s.mag_p[i]) << p.name << "[" << i << "]";
      }
    }
  }
  EXPECT_EQ(engine_->GetBlock("b0")->step, 3);
  // B has moved off zero, so the adapters now change the output.
  EXPECT_GT(MaxAbs(Cast<double>(Read("b0", TensorKind::kWeights).at("self_attn.q_proj.lora_B.weight"))), 0.0);
  // The base has no gradient or moments to download; the adapters do.
  EXPECT_TRUE(HasError(engine_->TensorNames("b0", TensorKind::kAdamM, {"mlp.up_proj.weight"}).status(),
                       StatusCode::kFailedPrecondition, "mlp.up_proj.weight has no adam_m"));
  EXPECT_OK(engine_->TensorNames("b0", TensorKind::kAdamM, {"mlp.up_proj.lora_A.weight"}).status());
  ASSERT_OK(engine_->ZeroGrad({"b0"}));
  EXPECT_FALSE(engine_->GetBlock("b0")->has_gradients);
}

TEST_F(LoraTest, SessionsApplyTheAdapters) {
  const BlockConfig c = Config(true);
  const LoraConfig lora = AllTargets(2, 3);
  ASSERT_OK(CreateLora("b0", c, true, lora).status());
  const TensorMap w = RandomLoraWeights(c, lora);
  ASSERT_OK(Load("b0", w));
  const std::vector<float> x = RandomActivation(16, 2.0);
  auto full = Forward({"b0"}, x, kBatch, kSeq, /*keep=*/false);
  ASSERT_TRUE(full.ok()) << full.status();
  auto y = SessionPrefill({"b0"}, x);
  ASSERT_TRUE(y.ok()) << y.status();
  const std::vector<double> want = ref::Block(c, ToRefLora(c, lora, w), Cast<double>(x), kBatch, kSeq, 0, lora.scale());
  EXPECT_TRUE(AllClose("session prefill with adapters vs reference", *y, want, 1e-5 * MaxAbs(want), 1e-5));
  EXPECT_TRUE(AllClose("session prefill vs Forward", *y, Cast<double>(full->out), 1e-5 * MaxAbs(want), 0));
}

TEST_F(LoraTest, CheckpointsKeepTheConfigTheAdaptersAndTheirMoments) {
  const BlockConfig c = Config(false);
  const LoraConfig lora{2, 5, {"k_proj", "gate_proj"}};
  ASSERT_OK(CreateLora("b0", c, true, lora, 4).status());
  TrainPass({"b0"}, RandomActivation(16, 2.0), RandomActivation(16));
  ASSERT_OK(engine_->Step({"b0"}, AdamWHyper{}, 0).status());
  const TensorMap w = Read("b0", TensorKind::kWeights), m = Read("b0", TensorKind::kAdamM);
  ASSERT_EQ(m.size(), 4u);
  const fs::path dir = fs::temp_directory_path() / ("blockd-lora-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  auto ckpt = MakeFileCheckpointer(engine_.get(), dir.string(), /*every_steps=*/0, /*keep=*/3);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  ASSERT_OK((*ckpt)->Save({"b0"}, "c1").status());
  ASSERT_OK(engine_->DeleteBlock("b0").status());
  ASSERT_OK((*ckpt)->Restore("c1", {}).status());
  auto info = engine_->GetBlock("b0");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_TRUE(info->spec.frozen);
  EXPECT_EQ(info->spec.lora, lora);
  EXPECT_EQ(info->step, 1);
  const TensorMap w2 = Read("b0", TensorKind::kWeights), m2 = Read("b0", TensorKind::kAdamM);
  for (const auto& [name, v] : w) EXPECT_TRUE(BitwiseEqual("restored weight " + name, w2.at(name), v));
  for (const auto& [name, v] : m) EXPECT_TRUE(BitwiseEqual("restored adam_m " + name, m2.at(name), v));
  // A state whose targets are out of the adapters' order is refused, not silently misread.
  auto states = engine_->ExportBlocks({"b0"});
  ASSERT_TRUE(states.ok()) << states.status();
  BlockState bad = (*states)[0];
  bad.spec.id = "bad";
  bad.spec.lora.target_modules = {"gate_proj", "k_proj"};
  EXPECT_TRUE(HasError(engine_->ImportBlocks({bad}, false), StatusCode::kInvalidArgument, "out of the order"));
  fs::remove_all(dir);
}

}  // namespace
}  // namespace blockd::testing
