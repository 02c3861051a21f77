// The Engine over the CPU backend, spans and their activation handles: Forward and Backward through
// one block or a span against the float64 references, token counts, Backward consuming its handle
// (but not on a bad request), bad inputs, and the handles' TTL, deletion with their blocks,
// per-client limit and owner. Block lifecycle, weights, dtypes and seeded initialisation are in
// engine_test.cc; training (gradients, Step, clipping, checkpoints) in engine_train_test.cc.
#include "engine/engine.h"

#include <limits>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "engine/cpu/block_math.h"
#include "gtest/gtest.h"
#include "tests/engine/engine_fixture.h"

namespace blockd::testing {
namespace {

using absl::StatusCode;

class EngineTest : public EngineFixture {
 protected:
  int64_t BlockBytes(const BlockConfig& c) { return static_cast<int64_t>(engine_->backend().BlockBytes(Spec("x", c))); }
  int64_t MemoryUsed() { return engine_->Stats().memory_used[0]; }
};

// ------------------------------------------------------------------------------------ forward / backward

TEST_F(EngineTest, ForwardMatchesTheFloat64Reference) {
  for (bool qk_norm : {false, true}) {
    SCOPED_TRACE(qk_norm ? "qk_norm" : "no qk_norm");
    const BlockConfig c = Config(qk_norm);
    const std::string id = qk_norm ? "qk" : "plain";
    ASSERT_OK(Create(id, c, std::nullopt));
    const TensorMap w = RandomWeights(c);
    ASSERT_OK(Load(id, w));
    const std::vector<float> x = RandomActivation(16, 2.0);
    auto y = Forward({id}, x, kBatch, kSeq, false, /*offset=*/7);
    ASSERT_TRUE(y.ok()) << y.status();
    const std::vector<double> want = ref::Block(c, ToRef(c, w), Cast<double>(x), kBatch, kSeq, 7);
    // fp32 forward: within 1e-5 of the output's scale (see block_math_test).
    EXPECT_TRUE(AllClose("engine forward vs reference", y->out, want, 1e-5 * MaxAbs(want), 1e-5));
  }
}

TEST_F(EngineTest, SpanOfTwoBlocksEqualsChainedForwards) {
  // Two different configs with one hidden size.
  ASSERT_OK(Create("b0", Config(true), 1));
  ASSERT_OK(Create("b1", Config(false, 4), 2));
  const std::vector<float> x = RandomActivation(16);
  for (int64_t offset : {0, 6}) {
    SCOPED_TRACE(::testing::Message() << "position_offset " << offset);
    auto span = Forward({"b0", "b1"}, x, kBatch, kSeq, false, offset);
    auto y0 = Forward({"b0"}, x, kBatch, kSeq, false, offset);
    ASSERT_TRUE(span.ok() && y0.ok());
    auto y1 = Forward({"b1"}, y0->out, kBatch, kSeq, false, offset);
    ASSERT_TRUE(y1.ok());
    EXPECT_TRUE(BitwiseEqual("span [b0, b1] vs b0 then b1", span->out, y1->out));
    auto twice = Forward({"b0", "b0"}, x, kBatch, kSeq, false, offset);
    auto again = Forward({"b0"}, y0->out, kBatch, kSeq, false, offset);
    ASSERT_TRUE(twice.ok() && again.ok());
    EXPECT_TRUE(BitwiseEqual("span [b0, b0] vs b0 twice", twice->out, again->out));
  }
  auto at0 = Forward({"b0"}, x, kBatch, kSeq, false, 0);
  auto at6 = Forward({"b0"}, x, kBatch, kSeq, false, 6);
  EXPECT_FALSE(BitwiseEqual("", at0->out, at6->out)) << "position_offset must reach RoPE";
}

TEST_F(EngineTest, BackwardMatchesBlockMathThroughASpan) {
  const BlockConfig c0 = Config(true), c1 = Config(false, 1);
  ASSERT_OK(Create("b0", c0, std::nullopt));
  ASSERT_OK(Create("b1", c1, std::nullopt));
  const TensorMap w0 = RandomWeights(c0), w1 = RandomWeights(c1);
  ASSERT_OK(Load("b0", w0));
  ASSERT_OK(Load("b1", w1));
  const std::vector<float> x = RandomActivation(16, 2.0), dy = RandomActivation(16);
  auto f = Forward({"b0", "b1"}, x, kBatch, kSeq, true, /*offset=*/2);
  ASSERT_TRUE(f.ok()) << f.status();
  auto dx = Backward(f->activation_id, dy, kBatch, kSeq);
  ASSERT_TRUE(dx.ok()) << dx.status();

  // The same span in double through block_math (whose gradients block_math_test checks by
  // finite differences): this test is about the Engine's plumbing, names and order.
  ref::BlockWeights r0 = ToRef(c0, w0), r1 = ToRef(c1, w1), g0, g1;
  auto ptrs = [](ref::BlockWeights& w) {
    cpu::BlockParamPtrs<double> p;
    for (int i = 0; i < kNumParamIds; ++i) p.p[i] = w[i].empty() ? nullptr : w[i].data();
    return p;
  };
  auto cptrs = [&](ref::BlockWeights& w) {
    cpu::BlockParamPtrs<const double> p;
    for (int i = 0; i < kNumParamIds; ++i) p.p[i] = ptrs(w).p[i];
    return p;
  };
  for (const ParamSpec& p : BlockParams(c0)) g0[static_cast<int>(p.id)].assign(p.numel(), 0.0);
  for (const ParamSpec& p : BlockParams(c1)) g1[static_cast<int>(p.id)].assign(p.numel(), 0.0);
  const std::vector<double> xd = Cast<double>(x), dyd = Cast<double>(dy);
  std::vector<double> y0(xd.size()), y1(xd.size()), d1(xd.size()), d0(xd.size());
  cpu::BlockActivations<double> s0, s1;
  cpu::BlockForward(c0, cptrs(r0), xd.data(), kBatch, kSeq, 2, y0.data(), &s0);
  cpu::BlockForward(c1, cptrs(r1), y0.data(), kBatch, kSeq, 2, y1.data(), &s1);
  cpu::BlockBackward(c1, cptrs(r1), s1, dyd.data(), d1.data(), ptrs(g1));
  cpu::BlockBackward(c0, cptrs(r0), s0, d1.data(), d0.data(), ptrs(g0));

  EXPECT_TRUE(AllClose("forward output of the span", f->out, y1, 1e-5 * MaxAbs(y1), 1e-5));
  // fp32 gradients: 1e-5 of each tensor's scale, as in block_math_test's float-vs-double check.
  EXPECT_TRUE(AllClose("grad_input of the span", *dx, d0, 1e-5 * MaxAbs(d0), 1e-5));
  const TensorMap got0 = Read("b0", TensorKind::kGradients), got1 = Read("b1", TensorKind::kGradients);
  for (const ParamSpec& p : BlockParams(c0)) {
    const std::vector<double>& want = g0[static_cast<int>(p.id)];
    EXPECT_TRUE(AllClose("b0 gradient " + p.name, got0.at(p.name), want, 1e-5 * MaxAbs(want), 1e-5));
  }
  for (const ParamSpec& p : BlockParams(c1)) {
    const std::vector<double>& want = g1[static_cast<int>(p.id)];
    EXPECT_TRUE(AllClose("b1 gradient " + p.name, got1.at(p.name), want, 1e-5 * MaxAbs(want), 1e-5));
  }
}

// The tokens metric counts batch * seq per block a pass runs through, Backward as Forward, a block
// named twice in a span twice.
TEST_F(EngineTest, ForwardAndBackwardCountTokensPerBlock) {
  ASSERT_OK(Create("b0", Config(true), 1));
  ASSERT_OK(Create("b1", Config(true), 2));
  const std::vector<float> x = RandomActivation(16), dy = RandomActivation(16);
  for (const std::vector<std::string>& span : {std::vector<std::string>{"b0", "b1"},
                                               std::vector<std::string>{"b0", "b1", "b0"}}) {
    const int64_t expected = kBatch * kSeq * static_cast<int64_t>(span.size());
    ForwardArgs args;
    args.block_ids = span;
    args.input = TensorArg{DType::kFloat32, {kBatch, kSeq, 16}, x.data(), x.size() * 4};
    args.keep_activations = true;
    std::string y, dx;
    ForwardOutput fwd;
    fwd.output.data = &y;
    ASSERT_OK(engine_->Forward(args, &fwd));
    EXPECT_EQ(fwd.tokens, expected) << "Forward through " << span.size() << " blocks";
    TensorOut bwd;
    bwd.data = &dx;
    ASSERT_OK(engine_->Backward(fwd.activation_id, "", TensorArg{DType::kFloat32, {kBatch, kSeq, 16}, dy.data(),
                                                             dy.size() * 4},
                                &bwd));
    EXPECT_EQ(bwd.tokens, expected) << "Backward through " << span.size() << " blocks";
  }
}

TEST_F(EngineTest, BackwardConsumesTheHandleButNotOnABadRequest) {
  ASSERT_OK(Create("b0", Config(true), 5));
  const std::vector<float> x = RandomActivation(16), dy = RandomActivation(16);
  auto f = Forward({"b0"}, x, kBatch, kSeq, true);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->activation_id.rfind("act-", 0), 0u) << f->activation_id;

  // The forward output was [2,5,16]: a grad_output of [2,4,20] and one of [2,5,8] are refused.
  EXPECT_TRUE(HasError(Backward(f->activation_id, dy, kBatch, kSeq - 1).status(), StatusCode::kInvalidArgument,
                       "grad_output shape [2,4,20]"));
  EXPECT_TRUE(HasError(Backward(f->activation_id, std::vector<float>(dy.begin(), dy.begin() + 2 * 5 * 8), kBatch, kSeq)
                           .status(),
                       StatusCode::kInvalidArgument, "the forward output was [2,5,16]"));
  {  // The right shape with too few bytes.
    TensorArg g{DType::kFloat32, {kBatch, kSeq, 16}, dy.data(), dy.size() * 4 - 4};
    std::string bytes;
    TensorOut out;
    out.data = &bytes;
    EXPECT_TRUE(HasError(engine_->Backward(f->activation_id, "", g, &out), StatusCode::kInvalidArgument, "bytes"));
  }
  std::vector<float> bad = dy;
  bad[13] = std::numeric_limits<float>::infinity();
  EXPECT_TRUE(HasError(Backward(f->activation_id, bad, kBatch, kSeq).status(), StatusCode::kInvalidArgument,
                       "non-finite"));
  EXPECT_FALSE(engine_->GetBlock("b0")->has_gradients) << "a rejected Backward must not touch gradients";

  auto dx = Backward(f->activation_id, dy, kBatch, kSeq);
  ASSERT_TRUE(dx.ok()) << "the handle must survive bad requests: " << dx.status();
  EXPECT_TRUE(engine_->GetBlock("b0")->has_gradients);
  EXPECT_TRUE(HasError(Backward(f->activation_id, dy, kBatch, kSeq).status(), StatusCode::kNotFound,
                       f->activation_id));
  EXPECT_TRUE(HasError(Backward("act-00000000000000000000000000000000", dy, kBatch, kSeq).status(),
                       StatusCode::kNotFound, "not found"));

  auto g = Forward({"b0"}, x, kBatch, kSeq, true);
  ASSERT_TRUE(g.ok());
  EXPECT_NE(g->activation_id, f->activation_id);
  EXPECT_OK(engine_->ReleaseActivations(g->activation_id, ""));
  EXPECT_TRUE(HasError(Backward(g->activation_id, dy, kBatch, kSeq).status(), StatusCode::kNotFound, "not found"));
  EXPECT_TRUE(HasError(engine_->ReleaseActivations(g->activation_id, ""), StatusCode::kNotFound, "not found"));
  EXPECT_EQ(engine_->Stats().activations_held, 0);
  EXPECT_EQ(engine_->Stats().memory_used[0], engine_->GetBlock("b0")->memory_bytes);
}

TEST_F(EngineTest, ForwardRejectsBadInputsNamingTheProblem) {
  ASSERT_OK(Create("b0", Config(true), 5));
  BlockConfig wide = Config(false);
  wide.hidden_size = 32;
  ASSERT_OK(Create("wide", wide, 5));
  const std::vector<float> x = RandomActivation(16);
  EXPECT_TRUE(HasError(Forward({"b0"}, x, kBatch * 2, kSeq, false).status(), StatusCode::kInvalidArgument,
                       "expects [batch>=1,seq>=1,16]"));  // [4,5,8]
  EXPECT_TRUE(HasError(Forward({"b0"}, std::vector<float>(17 * 16, 0.5f), 1, 17, false).status(),
                       StatusCode::kInvalidArgument, "max_seq_len 16"));
  EXPECT_TRUE(HasError(Forward({"b0"}, std::vector<float>(5 * 16, 0.5f), 5, 1, false).status(),
                       StatusCode::kInvalidArgument, "max_batch_size 4"));
  EXPECT_TRUE(HasError(Forward({"b0", "wide"}, x, kBatch, kSeq, false).status(), StatusCode::kInvalidArgument,
                       "hidden_size"));
  EXPECT_TRUE(HasError(Forward({}, x, kBatch, kSeq, false).status(), StatusCode::kInvalidArgument, "block_ids"));
  EXPECT_TRUE(HasError(Forward({"b0", "nope"}, x, kBatch, kSeq, false).status(), StatusCode::kNotFound, "nope"));
  EXPECT_TRUE(HasError(Forward({"b0"}, x, kBatch, kSeq, false, -1).status(), StatusCode::kInvalidArgument,
                       "position_offset"));
  {
    ForwardArgs args;
    args.block_ids = {"b0"};
    args.input = TensorArg{DType::kFloat32, {kBatch, kSeq, 16}, x.data(), x.size() * 2};
    std::string bytes;
    ForwardOutput out;
    out.output.data = &bytes;
    EXPECT_TRUE(HasError(engine_->Forward(args, &out), StatusCode::kInvalidArgument, "bytes"));
    args.input = TensorArg{DType::kFloat32, {kBatch * kSeq, 16}, x.data(), x.size() * 4};
    EXPECT_TRUE(HasError(engine_->Forward(args, &out), StatusCode::kInvalidArgument, "input shape [10,16]"));
  }
  for (float v : {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::infinity()}) {
    std::vector<float> bad = x;
    bad[21] = v;
    EXPECT_TRUE(HasError(Forward({"b0"}, bad, kBatch, kSeq, true).status(), StatusCode::kInvalidArgument,
                         "non-finite"));
  }
  EXPECT_EQ(engine_->Stats().activations_held, 0);
  EXPECT_EQ(engine_->Stats().memory_used[0], BlockBytes(Config(true)) + BlockBytes(wide));
}

// ------------------------------------------------------------------------------------ handles

TEST_F(EngineTest, ActivationsExpireAfterTheirTtl) {
  EngineOptions o;
  o.activation_ttl = absl::Milliseconds(1);
  Reset(o);
  ASSERT_OK(Create("b0", Config(true), 5));
  const std::vector<float> x = RandomActivation(16), dy = RandomActivation(16);
  auto f = Forward({"b0"}, x, kBatch, kSeq, true);
  ASSERT_TRUE(f.ok());
  EXPECT_GT(MemoryUsed(), BlockBytes(Config(true)));
  absl::SleepFor(absl::Milliseconds(5));
  EXPECT_EQ(engine_->ExpireActivations(), 1);
  EXPECT_EQ(engine_->Stats().activations_held, 0);
  EXPECT_EQ(MemoryUsed(), BlockBytes(Config(true)));
  EXPECT_TRUE(HasError(Backward(f->activation_id, dy, kBatch, kSeq).status(), StatusCode::kNotFound, "expired"));
  EXPECT_FALSE(engine_->GetBlock("b0")->has_gradients);

  Reset({});  // the default TTL (10 minutes) keeps the handle
  ASSERT_OK(Create("b0", Config(true), 5));
  auto g = Forward({"b0"}, x, kBatch, kSeq, true);
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(engine_->ExpireActivations(), 0);
  EXPECT_OK(Backward(g->activation_id, dy, kBatch, kSeq).status());
}

TEST_F(EngineTest, DeleteBlockReleasesItsHandles) {
  ASSERT_OK(Create("b0", Config(true), 1));
  ASSERT_OK(Create("b1", Config(true), 2));
  const std::vector<float> x = RandomActivation(16), dy = RandomActivation(16);
  auto both = Forward({"b0", "b1"}, x, kBatch, kSeq, true);
  auto only1 = Forward({"b1"}, x, kBatch, kSeq, true);
  auto only0 = Forward({"b0"}, x, kBatch, kSeq, true);
  ASSERT_TRUE(both.ok() && only1.ok() && only0.ok());
  auto n = engine_->DeleteBlock("b1");
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 2);
  EXPECT_EQ(engine_->Stats().activations_held, 1);
  EXPECT_TRUE(HasError(Backward(both->activation_id, dy, kBatch, kSeq).status(), StatusCode::kNotFound, "not found"));
  EXPECT_TRUE(HasError(Backward(only1->activation_id, dy, kBatch, kSeq).status(), StatusCode::kNotFound, "not found"));
  // A new block under the old id does not revive them.
  ASSERT_OK(Create("b1", Config(true), 2));
  EXPECT_TRUE(HasError(Backward(both->activation_id, dy, kBatch, kSeq).status(), StatusCode::kNotFound, "not found"));
  EXPECT_OK(Backward(only0->activation_id, dy, kBatch, kSeq).status());
  EXPECT_EQ(MemoryUsed(), 2 * BlockBytes(Config(true)));
}

TEST_F(EngineTest, PerClientHandleLimit) {
  EngineOptions o;
  o.max_activations_per_client = 2;
  Reset(o);
  ASSERT_OK(Create("b0", Config(true), 1));
  const std::vector<float> x = RandomActivation(16), dy = RandomActivation(16);
  auto a1 = Forward({"b0"}, x, kBatch, kSeq, true, 0, "alice");
  auto a2 = Forward({"b0"}, x, kBatch, kSeq, true, 0, "alice");
  ASSERT_TRUE(a1.ok() && a2.ok());
  EXPECT_TRUE(HasError(Forward({"b0"}, x, kBatch, kSeq, true, 0, "alice").status(), StatusCode::kResourceExhausted,
                       "alice"));
  EXPECT_OK(Forward({"b0"}, x, kBatch, kSeq, true, 0, "bob").status());
  EXPECT_OK(Forward({"b0"}, x, kBatch, kSeq, false, 0, "alice").status());  // the limit is on kept handles only
  EXPECT_EQ(engine_->Stats().activations_held, 3);
  ASSERT_OK(Backward(a1->activation_id, dy, kBatch, kSeq, "alice").status());
  EXPECT_OK(Forward({"b0"}, x, kBatch, kSeq, true, 0, "alice").status());
}

// A handle belongs to the identity that ran its Forward: to anyone else it is NOT_FOUND, exactly as
// an id that never existed, and their attempts leave it (and the block's gradients) untouched.
TEST_F(EngineTest, HandlesBelongToTheirClient) {
  ASSERT_OK(Create("b0", Config(true), 1));
  const std::vector<float> x = RandomActivation(16), dy = RandomActivation(16);
  auto a = Forward({"b0"}, x, kBatch, kSeq, true, 0, "alice");
  ASSERT_TRUE(a.ok()) << a.status();
  const std::string unknown = "act-" + std::string(32, '0');
  auto bob = Backward(a->activation_id, dy, kBatch, kSeq, "bob");
  EXPECT_TRUE(HasError(bob.status(), StatusCode::kNotFound, "not found"));
  auto never = Backward(unknown, dy, kBatch, kSeq, "bob");
  std::string shown(bob.status().message()), shown_unknown(never.status().message());
  shown.replace(shown.find(a->activation_id), a->activation_id.size(), "<id>");
  shown_unknown.replace(shown_unknown.find(unknown), unknown.size(), "<id>");
  EXPECT_EQ(shown, shown_unknown) << "another client's handle reads differently from an unknown one";
  EXPECT_TRUE(HasError(engine_->ReleaseActivations(a->activation_id, "bob"), StatusCode::kNotFound, "not found"));
  EXPECT_FALSE(engine_->GetBlock("b0")->has_gradients) << "bob's Backward computed gradients";
  EXPECT_EQ(engine_->Stats().activations_held, 1);
  EXPECT_OK(Backward(a->activation_id, dy, kBatch, kSeq, "alice").status());
  EXPECT_TRUE(engine_->GetBlock("b0")->has_gradients);
  EXPECT_EQ(engine_->Stats().activations_held, 0);
}

}  // namespace
}  // namespace blockd::testing
