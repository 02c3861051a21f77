// Training through the Engine over the CPU backend: gradient accumulation and ZeroGrad, Step as
// torch.optim.AdamW on the downloaded state, global-norm clipping as clip_grad_norm_, skipped steps
// on non-finite gradients, per-block step counters, and Export/ImportBlock.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "engine/engine.h"
#include "gtest/gtest.h"
#include "tests/engine/engine_fixture.h"

namespace blockd::testing {
namespace {

using absl::StatusCode;

AdamWHyper Hyper(bool decay_norm_weights = false) {
  AdamWHyper h;
  h.lr = 1e-2;
  h.beta1 = 0.9;
  h.beta2 = 0.95;
  h.eps = 1e-8;
  h.weight_decay = 0.1;
  h.decay_norm_weights = decay_norm_weights;
  return h;
}

class EngineTrainTest : public EngineFixture {
 protected:
  // Everything a Step reads or writes, for one block.
  struct State {
    TensorMap w, g, m, v;
    int64_t step = 0;
  };
  State Snapshot(const std::string& id) {
    return State{Read(id, TensorKind::kWeights), Read(id, TensorKind::kGradients), Read(id, TensorKind::kAdamM),
                 Read(id, TensorKind::kAdamV), engine_->GetBlock(id)->step};
  }
  static void ExpectSame(const std::string& what, const State& a, const State& b) {
    EXPECT_EQ(a.step, b.step) << what;
    for (const auto& [name, v] : a.w) EXPECT_TRUE(BitwiseEqual(what + ": weights " + name, b.w.at(name), v));
    for (const auto& [name, v] : a.g) EXPECT_TRUE(BitwiseEqual(what + ": gradients " + name, b.g.at(name), v));
    for (const auto& [name, v] : a.m) EXPECT_TRUE(BitwiseEqual(what + ": adam_m " + name, b.m.at(name), v));
    for (const auto& [name, v] : a.v) EXPECT_TRUE(BitwiseEqual(what + ": adam_v " + name, b.v.at(name), v));
  }

  // Checks `after` (read back from the engine) against torch.optim.AdamW applied in float64 to
  // `before`, with gradients times `grad_scale`, at step `step`; weight decay on matrices only
  // unless decay_norm_weights.
  void ExpectAdamW(const std::string& id, const BlockConfig& c, const State& before, const State& after,
                   const AdamWHyper& h, int64_t step, double grad_scale) {
    for (const ParamSpec& p : BlockParams(c)) {
      ref::AdamWState s(Cast<double>(before.w.at(p.name)), Cast<double>(before.m.at(p.name)),
                        Cast<double>(before.v.at(p.name)));
      const double wd = p.is_matrix || h.decay_norm_weights ? h.weight_decay : 0.0;
      ref::AdamWStep(&s, before.g.at(p.name), h.lr, h.beta1, h.beta2, h.eps, wd, step, grad_scale);
      // One step of fp32 arithmetic: a few roundings, relative to the magnitude of the terms (see
      // ops_test's AdamW test, which allows 32 u over six steps).
      const double k = 32 * kFloatUlp;
      const std::vector<float>&pw = after.w.at(p.name), &pm = after.m.at(p.name), &pv = after.v.at(p.name);
      for (size_t i = 0; i < pw.size(); ++i) {
        ASSERT_LE(std::fabs(pm[i] - s.m[i]), k * s.mag_m[i])
            << id << " adam_m " << p.name << "[" << i << "]: engine " << pm[i] << ", reference " << s.m[i];
        ASSERT_LE(std::fabs(pv[i] - s.v[i]), k * s.v[i])
            << id << " adam_v " << p.name << "[" << i << "]: engine " << pv[i] << ", reference " << s.v[i];
        ASSERT_LE(std::fabs(pw[i] - s.p[i]), k * s.mag_p[i])
            << id << " weight " << p.name << "[" << i << "]: engine " << pw[i] << ", reference " << s.p[i]
            << " (decay " << wd << ")";
      }
    }
  }

  static double SumSquares(const TensorMap& g) {
    double s = 0;
    for (const auto& [name, v] : g) {
      for (float x : v) s += static_cast<double>(x) * x;
    }
    return s;
  }

  std::vector<float> x_ = RandomActivation(16, 2.0), dy_ = RandomActivation(16);
};

TEST_F(EngineTrainTest, GradientsAccumulateUntilStepOrZeroGrad) {
  ASSERT_OK(Create("b0", Config(true), 3));
  EXPECT_FALSE(engine_->GetBlock("b0")->has_gradients);
  TrainPass({"b0"}, x_, dy_);
  EXPECT_TRUE(engine_->GetBlock("b0")->has_gradients);
  const TensorMap once = Read("b0", TensorKind::kGradients);
  TrainPass({"b0"}, x_, dy_);
  const TensorMap twice = Read("b0", TensorKind::kGradients);
  for (const auto& [name, g] : once) {
    std::vector<double> doubled = Cast<double>(g);
    for (double& v : doubled) v *= 2;
    // g + g is exact; BLAS may fold the addition into its sum: one fp32 rounding of the terms.
    EXPECT_TRUE(AllClose("gradient " + name + " after two backwards vs 2x one", twice.at(name), doubled,
                         4 * kFloatUlp * MaxAbs(doubled), 2 * kFloatUlp));
  }

  ASSERT_OK(engine_->ZeroGrad({"b0"}));
  EXPECT_FALSE(engine_->GetBlock("b0")->has_gradients);
  // Documented: a block without gradients downloads zeros.
  for (const auto& [name, g] : Read("b0", TensorKind::kGradients)) {
    EXPECT_TRUE(BitwiseEqual("gradient " + name + " after ZeroGrad", g, std::vector<float>(g.size(), 0.f)));
  }
  TrainPass({"b0"}, x_, dy_);
  const TensorMap after_zero = Read("b0", TensorKind::kGradients);
  for (const auto& [name, g] : once) {
    EXPECT_TRUE(BitwiseEqual("gradient " + name + " from one backward after ZeroGrad", after_zero.at(name), g));
  }

  auto r = engine_->Step({"b0"}, Hyper(), 0);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE(engine_->GetBlock("b0")->has_gradients) << "Step consumes the gradients";
  EXPECT_TRUE(HasError(engine_->Step({"b0"}, Hyper(), 0).status(), StatusCode::kFailedPrecondition, "no gradients"));
  EXPECT_TRUE(HasError(engine_->ZeroGrad({"b0", "nope"}), StatusCode::kNotFound, "nope"));
  EXPECT_TRUE(HasError(engine_->ZeroGrad({}), StatusCode::kInvalidArgument, "block_ids"));
}

TEST_F(EngineTrainTest, StepIsAdamWOnTheDownloadedState) {
  for (bool decay_norm : {false, true}) {
    SCOPED_TRACE(decay_norm ? "decay_norm_weights" : "matrices decayed only");
    const BlockConfig c = Config(true);
    const std::string id = decay_norm ? "decay_all" : "decay_matrices";
    ASSERT_OK(Create(id, c, 21));
    const AdamWHyper h = Hyper(decay_norm);
    for (int64_t step = 1; step <= 2; ++step) {
      SCOPED_TRACE(::testing::Message() << "step " << step);
      TrainPass({id}, x_, dy_);
      const State before = Snapshot(id);
      auto r = engine_->Step({id}, h, /*max_grad_norm=*/0);
      ASSERT_TRUE(r.ok()) << r.status();
      EXPECT_FALSE(r->skipped);
      EXPECT_NEAR(r->grad_norm, std::sqrt(SumSquares(before.g)), 1e-12 * r->grad_norm);
      EXPECT_EQ(r->clip_coefficient, 1.0);
      EXPECT_EQ(r->steps, (std::vector<std::pair<std::string, int64_t>>{{id, step}}));
      const State after = Snapshot(id);
      EXPECT_EQ(after.step, step);
      ExpectAdamW(id, c, before, after, h, step, 1.0);
    }
  }
}

TEST_F(EngineTrainTest, ClippingUsesTheGlobalNormOverAllNamedBlocks) {
  const BlockConfig c0 = Config(true), c1 = Config(false, 1);
  for (double fraction : {0.3, 10.0}) {  // max_grad_norm below and above the norm
    SCOPED_TRACE(::testing::Message() << "max_grad_norm = " << fraction << " x norm");
    Reset({});
    ASSERT_OK(Create("b0", c0, 1));
    ASSERT_OK(Create("b1", c1, 2));
    TrainPass({"b0", "b1"}, x_, dy_);
    const State s0 = Snapshot("b0"), s1 = Snapshot("b1");
    const double norm = std::sqrt(SumSquares(s0.g) + SumSquares(s1.g));
    const double max_norm = fraction * norm;
    auto r = engine_->Step({"b0", "b1"}, Hyper(), max_norm);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_FALSE(r->skipped);
    EXPECT_NEAR(r->grad_norm, norm, 1e-12 * norm) << "the reply carries the norm before clipping";
    // torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6), clamped to at most 1.
    const double coef = std::min(1.0, max_norm / (norm + 1e-6));
    EXPECT_NEAR(r->clip_coefficient, coef, 1e-12);
    // Both blocks' moments and weights saw gradients times the one global coefficient (a per-block
    // norm would give each block its own).
    ExpectAdamW("b0", c0, s0, Snapshot("b0"), Hyper(), 1, coef);
    ExpectAdamW("b1", c1, s1, Snapshot("b1"), Hyper(), 1, coef);
  }
}

TEST_F(EngineTrainTest, NonFiniteGradientsSkipTheStepAndChangeNothing) {
  const BlockConfig c = Config(true);
  ASSERT_OK(Create("a", c, 1));
  ASSERT_OK(Create("b", c, std::nullopt));
  // Block b's down_proj has a row of +-1e30 (finite): its forward stays finite, but a grad_output
  // of 1e10 in that channel makes dL/dh = dy W_down ~ 1e40 overflow fp32 in backward.
  TensorMap w = RandomWeights(c);
  std::vector<float>& down = w["mlp.down_proj.weight"];
  for (int64_t j = 0; j < c.intermediate_size; ++j) down[j] = j % 2 ? 1e30f : -1e30f;
  ASSERT_OK(Load("b", w));
  // One ordinary step first, so the moments and step counters are not at their initial values.
  TrainPass({"a"}, x_, dy_);
  TrainPass({"b"}, x_, dy_);
  auto first = engine_->Step({"a", "b"}, Hyper(), 0);
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_FALSE(first->skipped);
  ASSERT_TRUE(std::isfinite(first->grad_norm));

  std::vector<float> overflow = dy_;
  for (int64_t t = 0; t < kBatch * kSeq; ++t) overflow[t * 16] = 1e10f;
  TrainPass({"a"}, x_, dy_);
  TrainPass({"b"}, x_, overflow);
  const State a = Snapshot("a"), b = Snapshot("b");
  ASSERT_FALSE(std::isfinite(SumSquares(b.g))) << "the setup should have produced non-finite gradients";
  auto version = engine_->TensorsVersionOf("b", TensorKind::kAdamM);
  ASSERT_TRUE(version.ok()) << version.status();
  auto r = engine_->Step({"a", "b"}, Hyper(), 1.0);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->skipped);
  EXPECT_FALSE(std::isfinite(r->grad_norm));
  EXPECT_EQ(r->steps, (std::vector<std::pair<std::string, int64_t>>{{"a", 1}, {"b", 1}}));
  ExpectSame("block a after a skipped step", a, Snapshot("a"));
  ExpectSame("block b after a skipped step", b, Snapshot("b"));
  const absl::Status unchanged = engine_->CheckTensorsVersion("b", TensorKind::kAdamM, *version);
  EXPECT_TRUE(unchanged.ok()) << "a skipped step moved the moments' version: " << unchanged;
  EXPECT_TRUE(engine_->GetBlock("a")->has_gradients);
  // Block a alone has finite gradients and steps normally.
  auto alone = engine_->Step({"a"}, Hyper(), 0);
  ASSERT_TRUE(alone.ok());
  EXPECT_FALSE(alone->skipped);
  ExpectAdamW("a", c, a, Snapshot("a"), Hyper(), 2, 1.0);
}

// DownloadTensors reads one tensor per call and checks the version it saw at its start before each
// read. Every change to what it can read moves the version of that kind of tensor, and only of that
// kind; calls that change nothing (Forward, listing, export, ZeroGrad without gradients, a refused
// or skipped Step) leave it; another block under the same id, re-created or restored, is another
// version whatever its counts.
TEST_F(EngineTrainTest, EveryChangeToWhatADownloadReadsMovesThatKindsVersion) {
  const BlockConfig c = Config(true);
  ASSERT_OK(Create("b", c, 1));
  constexpr TensorKind kKinds[] = {TensorKind::kWeights, TensorKind::kGradients, TensorKind::kAdamM,
                                   TensorKind::kAdamV};
  std::map<TensorKind, TensorsVersion> seen;
  auto take = [&] {
    for (TensorKind k : kKinds) {
      auto v = engine_->TensorsVersionOf("b", k);
      ASSERT_TRUE(v.ok()) << v.status();
      seen[k] = *v;
    }
  };
  // After `what`: the kinds in `changed` are ABORTED naming `why` (checked by CheckTensorsVersion
  // and by ReadTensors, which then reads nothing), the others read as before.
  auto expect = [&](const std::string& what, std::vector<TensorKind> changed, const std::string& why) {
    for (TensorKind k : kKinds) {
      const bool moved = std::find(changed.begin(), changed.end(), k) != changed.end();
      const absl::Status check = engine_->CheckTensorsVersion("b", k, seen[k]);
      const absl::Status read = engine_->ReadTensors("b", k, DType::kFloat32, {}, &seen[k]).status();
      if (moved) {
        EXPECT_TRUE(HasError(check, StatusCode::kAborted, why)) << what << ", " << TensorKindName(k);
        EXPECT_TRUE(HasError(read, StatusCode::kAborted, "download again")) << what << ", " << TensorKindName(k);
      } else {
        EXPECT_OK(check);
        EXPECT_OK(read);
      }
    }
    take();
  };
  take();
  const std::vector<float> x = RandomActivation(16), dy = RandomActivation(16);
  ASSERT_TRUE(Forward({"b"}, x, kBatch, kSeq, /*keep=*/false).ok());
  ASSERT_TRUE(engine_->GetBlock("b").ok());
  engine_->ListBlocks();
  ASSERT_TRUE(engine_->ExportBlocks({"b"}).ok());
  ASSERT_OK(engine_->ZeroGrad({"b"}));  // no gradients to clear
  EXPECT_TRUE(HasError(engine_->Step({"b"}, Hyper(), 0).status(), StatusCode::kFailedPrecondition, "no gradients"));
  expect("calls that change nothing", {}, "");

  TrainPass({"b"}, x, dy);
  expect("a Backward", {TensorKind::kGradients},
         "block b's gradients changed while they were downloaded (1 change, the last: a Backward wrote gradients)");
  TrainPass({"b"}, x, dy);
  ASSERT_OK(engine_->ZeroGrad({"b"}));
  expect("a Backward and a ZeroGrad", {TensorKind::kGradients},
         "(2 changes, the last: a ZeroGrad cleared the gradients), so the tensors sent mix two versions");
  ASSERT_OK(Load("b", RandomWeights(c)));
  expect("a LoadWeights", {TensorKind::kWeights}, "block b's weights changed while they were downloaded "
                                                  "(1 change, the last: a LoadWeights wrote weights)");
  TrainPass({"b"}, x, dy);
  take();
  ASSERT_TRUE(engine_->Step({"b"}, Hyper(), 0).ok());
  expect("a Step", {kKinds[0], kKinds[1], kKinds[2], kKinds[3]}, "an optimizer Step updated the block");

  auto state = engine_->ExportBlocks({"b"});
  ASSERT_TRUE(state.ok()) << state.status();
  ASSERT_OK(engine_->ImportBlocks(*state, /*replace=*/true));
  expect("a restore", {kKinds[0], kKinds[1], kKinds[2], kKinds[3]},
         "block b was deleted and created again (or restored) while its");
  ASSERT_TRUE(engine_->DeleteBlock("b").ok());
  ASSERT_OK(Create("b", c, 1));  // the same seed: the same bytes and counts, but another block
  EXPECT_TRUE(HasError(engine_->CheckTensorsVersion("b", TensorKind::kWeights, seen[TensorKind::kWeights]),
                       StatusCode::kAborted,
                       "block b was deleted and created again (or restored) while its weights were downloaded, so "
                       "the tensors sent belong to two blocks: download again"));
  expect("a delete and create", {kKinds[0], kKinds[1], kKinds[2], kKinds[3]}, "was deleted and created again");
  ASSERT_TRUE(engine_->DeleteBlock("b").ok());
  // Gone while a download of it ran: ABORTED like any change (NOT_FOUND is for a block that never was).
  EXPECT_TRUE(HasError(engine_->CheckTensorsVersion("b", TensorKind::kWeights, seen[TensorKind::kWeights]),
                       StatusCode::kAborted, "block b was deleted while its weights were downloaded: download again"));
  EXPECT_TRUE(HasError(engine_->ReadTensors("b", TensorKind::kWeights, DType::kFloat32, {}, &seen[TensorKind::kWeights])
                           .status(),
                       StatusCode::kAborted, "block b was deleted while its weights were downloaded"));
  EXPECT_TRUE(HasError(engine_->ReadTensors("b", TensorKind::kWeights, DType::kFloat32, {}).status(),
                       StatusCode::kNotFound, "block b not found"));
}

TEST_F(EngineTrainTest, StepRejectsBadRequestsAndChangesNothing) {
  ASSERT_OK(Create("a", Config(true), 1));
  ASSERT_OK(Create("b", Config(true), 2));
  EXPECT_TRUE(HasError(engine_->Step({"a"}, Hyper(), 0).status(), StatusCode::kFailedPrecondition, "no gradients"));
  TrainPass({"a"}, x_, dy_);
  const State before = Snapshot("a");
  EXPECT_TRUE(HasError(engine_->Step({"a", "b"}, Hyper(), 0).status(), StatusCode::kFailedPrecondition, "block b"));
  EXPECT_TRUE(HasError(engine_->Step({"a", "a"}, Hyper(), 0).status(), StatusCode::kInvalidArgument, "twice"));
  EXPECT_TRUE(HasError(engine_->Step({}, Hyper(), 0).status(), StatusCode::kInvalidArgument, "block_ids"));
  EXPECT_TRUE(HasError(engine_->Step({"a", "nope"}, Hyper(), 0).status(), StatusCode::kNotFound, "nope"));
  struct Bad {
    std::function<void(AdamWHyper*, double*)> mutate;
    std::string field;
  };
  const std::vector<Bad> bad = {
      {[](AdamWHyper* h, double*) { h->lr = -1e-3; }, "adamw.lr"},
      {[](AdamWHyper* h, double*) { h->lr = std::nan(""); }, "adamw.lr"},
      {[](AdamWHyper* h, double*) { h->beta1 = 1; }, "adamw.beta1"},
      {[](AdamWHyper* h, double*) { h->beta2 = -0.1; }, "adamw.beta2"},
      {[](AdamWHyper* h, double*) { h->eps = 0; }, "adamw.eps"},
      {[](AdamWHyper* h, double*) { h->weight_decay = -1; }, "adamw.weight_decay"},
      {[](AdamWHyper*, double* m) { *m = -1; }, "max_grad_norm"},
      {[](AdamWHyper*, double* m) { *m = INFINITY; }, "max_grad_norm"},
  };
  for (const Bad& b : bad) {
    AdamWHyper h = Hyper();
    double max_norm = 0;
    b.mutate(&h, &max_norm);
    EXPECT_TRUE(HasError(engine_->Step({"a"}, h, max_norm).status(), StatusCode::kInvalidArgument, b.field));
  }
  ExpectSame("block a after rejected steps", before, Snapshot("a"));
  EXPECT_TRUE(engine_->GetBlock("a")->has_gradients);
  EXPECT_OK(engine_->Step({"a"}, Hyper(), 0).status());
}

TEST_F(EngineTrainTest, StepCountersArePerBlock) {
  const BlockConfig c = Config(true);
  ASSERT_OK(Create("a", c, 1));
  ASSERT_OK(Create("b", c, 2));
  TrainPass({"a"}, x_, dy_);
  auto r1 = engine_->Step({"a"}, Hyper(), 0);
  ASSERT_TRUE(r1.ok());
  EXPECT_EQ(r1->steps, (std::vector<std::pair<std::string, int64_t>>{{"a", 1}}));
  TrainPass({"a", "b"}, x_, dy_);
  const State a = Snapshot("a"), b = Snapshot("b");
  auto r2 = engine_->Step({"b", "a"}, Hyper(), 0);
  ASSERT_TRUE(r2.ok());
  EXPECT_EQ(r2->steps, (std::vector<std::pair<std::string, int64_t>>{{"b", 1}, {"a", 2}}));
  EXPECT_EQ(engine_->GetBlock("a")->step, 2);
  EXPECT_EQ(engine_->GetBlock("b")->step, 1);
  // Each block's bias correction uses its own counter.
  ExpectAdamW("a", c, a, Snapshot("a"), Hyper(), 2, 1.0);
  ExpectAdamW("b", c, b, Snapshot("b"), Hyper(), 1, 1.0);
}

TEST_F(EngineTrainTest, ExportImportRoundTripIsBitwise) {
  const BlockConfig c = Config(true);
  ASSERT_OK(Create("a", c, 5));
  ASSERT_OK(Create("b", Config(false, 4), 6));
  TrainPass({"a", "b"}, x_, dy_);
  ASSERT_OK(engine_->Step({"a"}, Hyper(), 0).status());
  auto states = engine_->ExportBlocks({"a", "b"});
  ASSERT_TRUE(states.ok()) << states.status();
  ASSERT_EQ(states->size(), 2u);
  const BlockState& state = (*states)[0];
  EXPECT_EQ(state.spec.id, "a");
  EXPECT_EQ((*states)[1].spec.id, "b");
  EXPECT_EQ(state.step, 1);
  EXPECT_EQ((*states)[1].step, 0);
  ASSERT_TRUE(state.last_adamw.has_value());
  EXPECT_EQ(state.last_adamw->lr, Hyper().lr);
  EXPECT_FALSE((*states)[1].last_adamw.has_value());
  ASSERT_EQ(state.weights.size(), BlockParams(c).size());
  const TensorMap w = Read("a", TensorKind::kWeights), m = Read("a", TensorKind::kAdamM);
  for (const NamedTensor& t : state.weights) {
    EXPECT_EQ(t.dtype, DType::kFloat32);
    EXPECT_TRUE(BitwiseEqual("exported weights " + t.name, t.bytes.data(), t.bytes.size(), w.at(t.name).data(),
                             w.at(t.name).size() * 4));
  }
  for (const NamedTensor& t : state.adam_m) {
    EXPECT_TRUE(BitwiseEqual("exported adam_m " + t.name, t.bytes.data(), t.bytes.size(), m.at(t.name).data(),
                             m.at(t.name).size() * 4));
  }

  std::unique_ptr<Engine> other = std::make_unique<Engine>(MakeCpuBackend(), EngineOptions{});
  ASSERT_OK(other->ImportBlocks(*states, /*replace=*/false));
  auto again = other->ExportBlocks({"a", "b"});
  ASSERT_TRUE(again.ok()) << again.status();
  ASSERT_EQ(again->size(), 2u);
  for (size_t s = 0; s < 2; ++s) {
    const BlockState &x = (*states)[s], &y = (*again)[s];
    SCOPED_TRACE(x.spec.id);
    EXPECT_EQ(y.spec.id, x.spec.id);
    EXPECT_TRUE(y.spec.config == x.spec.config);
    EXPECT_EQ(y.spec.layer_index, x.spec.layer_index);
    EXPECT_EQ(y.spec.max_seq_len, x.spec.max_seq_len);
    EXPECT_EQ(y.spec.max_batch_size, x.spec.max_batch_size);
    EXPECT_EQ(y.spec.precision, x.spec.precision);
    EXPECT_EQ(y.step, x.step);
    EXPECT_EQ(y.last_adamw.has_value(), x.last_adamw.has_value());
    if (x.last_adamw && y.last_adamw) {
      EXPECT_EQ(y.last_adamw->weight_decay, x.last_adamw->weight_decay);
    }
    for (auto [a, b, kind] : {std::tuple{&x.weights, &y.weights, "weights"}, std::tuple{&x.adam_m, &y.adam_m, "adam_m"},
                              std::tuple{&x.adam_v, &y.adam_v, "adam_v"}}) {
      ASSERT_EQ(a->size(), b->size());
      for (size_t i = 0; i < a->size(); ++i) {
        EXPECT_EQ((*a)[i].name, (*b)[i].name);
        EXPECT_EQ((*a)[i].shape, (*b)[i].shape);
        EXPECT_EQ((*b)[i].bytes, (*a)[i].bytes) << kind << " " << (*a)[i].name << " differs after the round trip";
      }
    }
  }
  auto info = other->GetBlock("a");
  ASSERT_TRUE(info.ok());
  EXPECT_TRUE(info->weights_loaded);
  EXPECT_EQ(info->step, 1);
  EXPECT_FALSE(info->has_gradients) << "gradients are not part of a block's state";

  // Both copies train identically from here: same outputs, and the same second step (which
  // needs the step counter and the moments to have travelled).
  ASSERT_OK(engine_->ZeroGrad({"a", "b"}));
  auto y1 = Forward({"a", "b"}, x_, kBatch, kSeq, false);
  TrainPass({"a"}, x_, dy_);
  ASSERT_OK(engine_->Step({"a"}, Hyper(), 0).status());
  const State mine = Snapshot("a");
  std::swap(engine_, other);
  auto y2 = Forward({"a", "b"}, x_, kBatch, kSeq, false);
  TrainPass({"a"}, x_, dy_);
  ASSERT_OK(engine_->Step({"a"}, Hyper(), 0).status());
  ExpectSame("the imported block after one more step", mine, Snapshot("a"));
  ASSERT_TRUE(y1.ok() && y2.ok());
  EXPECT_TRUE(BitwiseEqual("forward of the imported span", y2->out, y1->out));
  std::swap(engine_, other);

  // Import without replace onto an existing id fails and changes nothing.
  const State before = Snapshot("a");
  EXPECT_TRUE(HasError(engine_->ImportBlocks({state}, false), StatusCode::kAlreadyExists, "a"));
  ExpectSame("block a after a refused import", before, Snapshot("a"));
  // With replace, the old block and its activation handles are gone.
  auto handle = Forward({"a"}, x_, kBatch, kSeq, true);
  ASSERT_TRUE(handle.ok());
  ASSERT_OK(engine_->ImportBlocks({state}, /*replace=*/true));
  EXPECT_EQ(engine_->GetBlock("a")->step, 1);
  EXPECT_TRUE(HasError(Backward(handle->activation_id, dy_, kBatch, kSeq).status(), StatusCode::kNotFound, ""));
  EXPECT_EQ(engine_->Stats().activations_held, 0);
  EXPECT_EQ(engine_->Stats().memory_used[0],
            engine_->GetBlock("a")->memory_bytes + engine_->GetBlock("b")->memory_bytes);
}

TEST_F(EngineTrainTest, ImportIsAllOrNothing) {
  ASSERT_OK(Create("a", Config(true), 5));
  auto exported = engine_->ExportBlocks({"a"});
  ASSERT_TRUE(exported.ok());
  BlockState good = (*exported)[0];
  good.spec.id = "good";
  BlockState bad_shape = good;
  bad_shape.spec.id = "bad";
  bad_shape.adam_v[3].shape = {1, 2};
  BlockState missing = good;
  missing.spec.id = "missing";
  missing.weights.pop_back();
  const int64_t used = engine_->Stats().memory_used[0];
  EXPECT_TRUE(HasError(engine_->ImportBlocks({good, bad_shape}, false), StatusCode::kInvalidArgument,
                       "does not match"));
  EXPECT_TRUE(HasError(engine_->ImportBlocks({good, missing}, false), StatusCode::kInvalidArgument, "weights"));
  EXPECT_TRUE(HasError(engine_->ImportBlocks({good, good}, false), StatusCode::kInvalidArgument, "twice"));
  EXPECT_TRUE(HasError(engine_->GetBlock("good").status(), StatusCode::kNotFound, "good"));
  EXPECT_EQ(engine_->ListBlocks().size(), 1u);
  EXPECT_EQ(engine_->Stats().memory_used[0], used);

  EngineOptions o;
  o.max_blocks = 2;
  Reset(o);
  BlockState second = good;
  second.spec.id = "second";
  ASSERT_OK(Create("a", Config(true), 5));
  EXPECT_TRUE(HasError(engine_->ImportBlocks({good, second}, false), StatusCode::kResourceExhausted, "max_blocks"));
  EXPECT_EQ(engine_->ListBlocks().size(), 1u);
  EXPECT_OK(engine_->ImportBlocks({good}, false));
}


TEST_F(EngineTrainTest, ConcurrentSpansDoNotDeadlockAndGradientsAddUp) {
  ASSERT_OK(Create("a", Config(true), 1));
  ASSERT_OK(Create("b", Config(false, 1), 2));
  // One pass in each span order, for the expected sums.
  TrainPass({"a", "b"}, x_, dy_);
  const TensorMap ab_a = Read("a", TensorKind::kGradients), ab_b = Read("b", TensorKind::kGradients);
  ASSERT_OK(engine_->ZeroGrad({"a", "b"}));
  TrainPass({"b", "a"}, x_, dy_);
  const TensorMap ba_a = Read("a", TensorKind::kGradients), ba_b = Read("b", TensorKind::kGradients);
  ASSERT_OK(engine_->ZeroGrad({"a", "b"}));

  // Four threads, two per span order (which lock the same blocks in opposite span order), eight
  // passes each, with their Forwards and Backwards interleaving freely.
  constexpr int kThreads = 4, kPasses = 8;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      const std::vector<std::string> span = t % 2 ? std::vector<std::string>{"b", "a"}
                                                  : std::vector<std::string>{"a", "b"};
      for (int i = 0; i < kPasses; ++i) TrainPass(span, x_, dy_);
    });
  }
  for (std::thread& th : threads) th.join();
  EXPECT_EQ(engine_->Stats().activations_held, 0);

  const double n = kThreads / 2 * kPasses;  // passes per span order
  for (auto [id, ab, ba] : {std::tuple{"a", &ab_a, &ba_a}, std::tuple{"b", &ab_b, &ba_b}}) {
    const TensorMap got = Read(id, TensorKind::kGradients);
    for (const auto& [name, g] : got) {
      std::vector<double> want(g.size()), scale(g.size());
      for (size_t i = 0; i < g.size(); ++i) {
        want[i] = n * (static_cast<double>(ab->at(name)[i]) + ba->at(name)[i]);
        scale[i] = n * (std::fabs(ab->at(name)[i]) + std::fabs(ba->at(name)[i]));
      }
      // 32 fp32 additions in whatever order the threads ran: <= 32 u of the sum of magnitudes.
      for (size_t i = 0; i < g.size(); ++i) {
        ASSERT_LE(std::fabs(g[i] - want[i]), 32 * kFloatUlp * scale[i] + 1e-30)
            << "block " << id << " gradient " << name << "[" << i << "]: " << g[i] << " vs " << want[i];
      }
    }
  }
}

// BUG (engine.cc, reported): ExportBlocks/ImportBlocks turn a block whose weights were never
// loaded into one that is "loaded" with zeros. Enable once fixed.
TEST_F(EngineTrainTest, ExportOfABlockWithoutWeightsKeepsThemMissing) {
  const BlockConfig c = Config(true);
  ASSERT_OK(Create("a", c, std::nullopt));
  TensorMap w = RandomWeights(c);
  ASSERT_OK(Load("a", {{"mlp.up_proj.weight", w.at("mlp.up_proj.weight")}}));
  auto states = engine_->ExportBlocks({"a"});
  if (!states.ok()) {  // refusing to export is one acceptable answer
    EXPECT_TRUE(HasError(states.status(), StatusCode::kFailedPrecondition, "mlp.down_proj.weight"));
    return;
  }
  Engine other(MakeCpuBackend(), EngineOptions{});
  ASSERT_OK(other.ImportBlocks(*states, false));  // the other: the missing weights stay missing
  EXPECT_EQ(other.GetBlock("a")->missing_weights, engine_->GetBlock("a")->missing_weights);
}

}  // namespace
}  // namespace blockd::testing
