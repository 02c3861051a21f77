// Every op of engine/cpu/ops.h against the naive float64 references of reference.h (float and double
// instantiations), every backward against central differences in double, and AdamWUpdate against
// torch.optim.AdamW's formula.
#include "engine/cpu/ops.h"

#include <cmath>
#include <limits>
#include <vector>

#include "base/rope.h"
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
using ::blockd::testing::kFloatUlp;
using ::blockd::testing::MaxAbs;
using ::blockd::testing::Rand;
using ::blockd::testing::RoundToFloat;
using ::blockd::testing::TestSeed;
namespace ref = ::blockd::testing::ref;

// Central differences with eps = 1e-6 on O(1) inputs: truncation error eps^2/6 * |f'''| ~ 1e-13, and
// rounding error ~ 1e-16 * |L| / eps ~ 1e-9 for a loss |L| ~ 10. kFdAtol leaves a 100x margin.
constexpr double kFdEps = 1e-6, kFdAtol = 1e-7, kFdRtol = 1e-6;
// The double instantiation computes the reference's math in another order (and through BLAS).
constexpr double kDoubleAtol = 1e-12, kDoubleRtol = 1e-12;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ---------------------------------------------------------------------------------------------- RMSNorm

struct RmsCase {
  int64_t rows, d;
  double eps, x_scale;
};

TEST(RmsNormTest, ForwardMatchesFloat64Reference) {
  // The last case has eps comparable to mean(x^2), so eps must sit inside the square root.
  for (const RmsCase& c : {RmsCase{10, 16, 1e-6, 2.0}, RmsCase{6, 64, 1e-5, 1.0}, RmsCase{3, 2, 1e-6, 3.0},
                           RmsCase{4, 32, 1e-2, 0.05}}) {
    SCOPED_TRACE(::testing::Message() << "rows " << c.rows << ", d " << c.d << ", eps " << c.eps);
    Rand rng(TestSeed(100 + c.d));
    std::vector<double> x = rng.Vec(c.rows * c.d, -c.x_scale, c.x_scale), w = rng.Signed(c.d, 0.2, 1.5);
    RoundToFloat(&x);
    RoundToFloat(&w);
    std::vector<double> y_ref, rstd_ref;
    ref::RmsNorm(x, w, c.rows, c.d, c.eps, &y_ref, &rstd_ref);

    std::vector<float> xf = Cast<float>(x), wf = Cast<float>(w), yf(x.size()), rf(c.rows);
    RmsNormForward(xf.data(), wf.data(), c.rows, c.d, c.eps, yf.data(), rf.data());
    // rstd is computed in double and rounded once (<= u relative); y = (x * rstd) * w adds two fp32
    // products and has no cancellation, so y is within 3u of the exact value, relative to itself.
    EXPECT_TRUE(AllClose("rmsnorm<float> y", yf, y_ref, 0, 4 * kFloatUlp));
    EXPECT_TRUE(AllClose("rmsnorm<float> rstd", rf, rstd_ref, 0, 2 * kFloatUlp));

    std::vector<double> yd(x.size()), rd(c.rows);
    RmsNormForward(x.data(), w.data(), c.rows, c.d, c.eps, yd.data(), rd.data());
    EXPECT_TRUE(AllClose("rmsnorm<double> y", yd, y_ref, kDoubleAtol, kDoubleRtol));
    EXPECT_TRUE(AllClose("rmsnorm<double> rstd", rd, rstd_ref, kDoubleAtol, kDoubleRtol));
  }
}

TEST(RmsNormTest, BackwardMatchesFiniteDifferences) {
  for (const RmsCase& c : {RmsCase{6, 16, 1e-5, 2.0}, RmsCase{4, 8, 1e-2, 0.1}}) {
    SCOPED_TRACE(::testing::Message() << "rows " << c.rows << ", d " << c.d << ", eps " << c.eps);
    Rand rng(TestSeed(110 + c.d));
    std::vector<double> x = rng.Vec(c.rows * c.d, -c.x_scale, c.x_scale), w = rng.Signed(c.d, 0.2, 1.5);
    const std::vector<double> r = rng.Vec(x.size(), -1, 1);
    std::vector<double> y(x.size()), rstd(c.rows);
    auto loss = [&] {
      RmsNormForward(x.data(), w.data(), c.rows, c.d, c.eps, y.data(), rstd.data());
      return Dot(r, y.data());
    };
    loss();
    std::vector<double> dx(x.size(), 0.0), dw(w.size(), 0.0);
    RmsNormBackward(r.data(), x.data(), w.data(), rstd.data(), c.rows, c.d, dx.data(), dw.data());
    EXPECT_TRUE(CheckGradient("rmsnorm dL/dx", &x, dx, loss, kFdEps, kFdAtol, kFdRtol));
    EXPECT_TRUE(CheckGradient("rmsnorm dL/dw", &w, dw, loss, kFdEps, kFdAtol, kFdRtol));
  }
}

TEST(RmsNormTest, BackwardAddsIntoItsGradients) {
  const int64_t rows = 5, d = 16;
  Rand rng(TestSeed(120));
  const std::vector<double> x = rng.Vec(rows * d, -2, 2), w = rng.Signed(d, 0.2, 1.5), dy = rng.Vec(rows * d, -1, 1);
  std::vector<double> y(x.size()), rstd(rows);
  RmsNormForward(x.data(), w.data(), rows, d, 1e-6, y.data(), rstd.data());
  std::vector<double> dx(x.size(), 0.0), dw(d, 0.0);
  RmsNormBackward(dy.data(), x.data(), w.data(), rstd.data(), rows, d, dx.data(), dw.data());
  const std::vector<double> px = rng.Vec(x.size(), -3, 3), pw = rng.Vec(d, -3, 3);
  std::vector<double> dx2 = px, dw2 = pw, want_x(x.size()), want_w(d);
  RmsNormBackward(dy.data(), x.data(), w.data(), rstd.data(), rows, d, dx2.data(), dw2.data());
  for (size_t i = 0; i < dx.size(); ++i) want_x[i] = px[i] + dx[i];
  for (size_t i = 0; i < dw.size(); ++i) want_w[i] = pw[i] + dw[i];
  EXPECT_TRUE(AllClose("rmsnorm dx added to a prefilled buffer", dx2, want_x, 1e-15, 1e-15));
  EXPECT_TRUE(AllClose("rmsnorm dw added to a prefilled buffer", dw2, want_w, 1e-15, 1e-15));
}

TEST(RmsNormTest, FloatBackwardMatchesDouble) {
  const int64_t rows = 8, d = 32;
  Rand rng(TestSeed(130));
  std::vector<double> x = rng.Vec(rows * d, -2, 2), w = rng.Signed(d, 0.2, 1.5), dy = rng.Vec(rows * d, -1, 1);
  RoundToFloat(&x);
  RoundToFloat(&w);
  RoundToFloat(&dy);
  std::vector<double> y(x.size()), rstd(rows), dx(x.size(), 0.0), dw(d, 0.0);
  RmsNormForward(x.data(), w.data(), rows, d, 1e-6, y.data(), rstd.data());
  RmsNormBackward(dy.data(), x.data(), w.data(), rstd.data(), rows, d, dx.data(), dw.data());
  std::vector<float> xf = Cast<float>(x), wf = Cast<float>(w), dyf = Cast<float>(dy), yf(x.size()), rf(rows),
                     dxf(x.size(), 0.f), dwf(d, 0.f);
  RmsNormForward(xf.data(), wf.data(), rows, d, 1e-6, yf.data(), rf.data());
  RmsNormBackward(dyf.data(), xf.data(), wf.data(), rf.data(), rows, d, dxf.data(), dwf.data());
  // Accumulated in double; the float version differs by rstd's rounding (u) and one rounding per
  // output, but dx = rstd * (dy w - xhat mean(dy w xhat)) can cancel, so the error is relative to
  // the scale of the terms (~ max |dx|), not to each element.
  EXPECT_TRUE(AllClose("rmsnorm<float> dx", dxf, dx, 8 * kFloatUlp * MaxAbs(dx), 4 * kFloatUlp));
  EXPECT_TRUE(AllClose("rmsnorm<float> dw", dwf, dw, 8 * kFloatUlp * MaxAbs(dw), 4 * kFloatUlp));
}

// ---------------------------------------------------------------------------------------------- RoPE

struct RopeCase {
  int64_t batch, seq, heads, dh, offset;
  double theta;
};

const RopeCase kRopeCases[] = {
    {2, 5, 3, 8, 0, 1e4}, {2, 7, 2, 16, 37, 1e4}, {1, 4, 1, 64, 4093, 1e6}, {3, 3, 2, 2, 5, 500.0}};

// The inverse frequencies of plain RoPE with base theta, through base/rope.h as the block gets them.
std::vector<double> PlainInvFreq(int64_t dh, double theta) {
  BlockConfig c;
  c.head_dim = dh;
  c.rope_theta = theta;
  return RopeInvFreq(c);
}

TEST(RopeTest, ForwardMatchesHfRotateHalf) {
  for (const RopeCase& c : kRopeCases) {
    SCOPED_TRACE(::testing::Message() << "dh " << c.dh << ", offset " << c.offset << ", theta " << c.theta);
    Rand rng(TestSeed(200 + c.dh));
    std::vector<double> x = rng.Vec(c.batch * c.seq * c.heads * c.dh, -2, 2);
    RoundToFloat(&x);
    const std::vector<double> want = ref::Rope(x, c.batch, c.seq, c.heads, c.dh, c.offset, c.theta);

    // Angles are computed in double and each output rounded once to float: u relative, plus the
    // double angle error (position * 1e-16 ~ 1e-12 at position 4096). Angles computed in float
    // would be off by position * u ~ 2e-4 there.
    std::vector<float> xf = Cast<float>(x);
    RopeForward(xf.data(), c.batch, c.seq, c.heads, c.dh, c.offset, PlainInvFreq(c.dh, c.theta).data(), 1.0);
    EXPECT_TRUE(AllClose("rope<float>", xf, want, 1e-10, 2 * kFloatUlp));

    std::vector<double> xd = x;
    RopeForward(xd.data(), c.batch, c.seq, c.heads, c.dh, c.offset, PlainInvFreq(c.dh, c.theta).data(), 1.0);
    EXPECT_TRUE(AllClose("rope<double>", xd, want, 1e-10, kDoubleRtol));
  }
}

TEST(RopeTest, BackwardMatchesFiniteDifferences) {
  for (const RopeCase& c : kRopeCases) {
    SCOPED_TRACE(::testing::Message() << "dh " << c.dh << ", offset " << c.offset << ", theta " << c.theta);
    Rand rng(TestSeed(210 + c.dh));
    std::vector<double> x = rng.Vec(c.batch * c.seq * c.heads * c.dh, -2, 2);
    const std::vector<double> r = rng.Vec(x.size(), -1, 1);
    std::vector<double> y;
    auto loss = [&] {
      y = x;
      RopeForward(y.data(), c.batch, c.seq, c.heads, c.dh, c.offset, PlainInvFreq(c.dh, c.theta).data(), 1.0);
      return Dot(r, y.data());
    };
    std::vector<double> dx = r;
    RopeBackward(dx.data(), c.batch, c.seq, c.heads, c.dh, c.offset, PlainInvFreq(c.dh, c.theta).data(), 1.0);
    EXPECT_TRUE(CheckGradient("rope dL/dx", &x, dx, loss, kFdEps, kFdAtol, kFdRtol));

    // A rotation: backward (by -angle) undoes forward.
    std::vector<double> round_trip = x;
    RopeForward(round_trip.data(), c.batch, c.seq, c.heads, c.dh, c.offset, PlainInvFreq(c.dh, c.theta).data(), 1.0);
    RopeBackward(round_trip.data(), c.batch, c.seq, c.heads, c.dh, c.offset, PlainInvFreq(c.dh, c.theta).data(), 1.0);
    EXPECT_TRUE(AllClose("rope backward(forward(x))", round_trip, x, 1e-14, 1e-14));
  }
}

// Llama 3.1/3.2's, Qwen2.5's yarn (computed and given attention factor, other betas) and a linear
// scaling, each with a head_dim that puts dimensions in every band of its formula.
std::vector<BlockConfig> ScaledRopeConfigs() {
  std::vector<BlockConfig> out;
  BlockConfig c;
  c.head_dim = 64;
  c.rope_theta = 500000;
  c.rope_scaling = {"llama3", 32.0, 1.0, 4.0, 8192, 0, 0, 0};
  out.push_back(c);
  c.rope_theta = 1e6;
  c.rope_scaling = {"yarn", 4.0, 0, 0, 32768, 0, 0, 0};
  out.push_back(c);
  c.head_dim = 16;
  c.rope_theta = 1e4;
  c.rope_scaling = {"yarn", 8.0, 0, 0, 2048, 1.25, 16, 2};
  out.push_back(c);
  c.rope_scaling = {"linear", 2.5, 0, 0, 0, 0, 0, 0};
  out.push_back(c);
  return out;
}

TEST(RopeTest, ScaledInvFreqAndRotationMatchHf) {
  for (const BlockConfig& cfg : ScaledRopeConfigs()) {
    SCOPED_TRACE(::testing::Message() << cfg.rope_scaling.rope_type << " dh " << cfg.head_dim);
    ASSERT_TRUE(ValidateRopeScaling(cfg.rope_scaling).ok());
    const std::vector<double> inv_freq = RopeInvFreq(cfg), want_freq = ref::InvFreq(cfg);
    EXPECT_TRUE(AllClose("inv_freq", inv_freq, want_freq, 0, 1e-14));
    // Scaling changes something: a config that fell through to plain RoPE would pass the rest.
    EXPECT_NE(inv_freq, PlainInvFreq(cfg.head_dim, cfg.rope_theta));
    EXPECT_EQ(RopeAttentionScaling(cfg), ref::RopeScale(cfg));

    const int64_t batch = 2, seq = 5, heads = 3, offset = 3000;
    Rand rng(TestSeed(230 + cfg.head_dim));
    std::vector<double> x = rng.Vec(batch * seq * heads * cfg.head_dim, -2, 2);
    const std::vector<double> want = ref::Rope(x, batch, seq, heads, cfg.head_dim, offset, want_freq, ref::RopeScale(cfg));
    std::vector<double> y = x;
    RopeForward(y.data(), batch, seq, heads, cfg.head_dim, offset, inv_freq.data(), RopeAttentionScaling(cfg));
    EXPECT_TRUE(AllClose("scaled rope<double>", y, want, 1e-10, kDoubleRtol));

    const std::vector<double> r = rng.Vec(x.size(), -1, 1);
    auto loss = [&] {
      y = x;
      RopeForward(y.data(), batch, seq, heads, cfg.head_dim, offset, inv_freq.data(), RopeAttentionScaling(cfg));
      return Dot(r, y.data());
    };
    std::vector<double> dx = r;
    RopeBackward(dx.data(), batch, seq, heads, cfg.head_dim, offset, inv_freq.data(), RopeAttentionScaling(cfg));
    EXPECT_TRUE(CheckGradient("scaled rope dL/dx", &x, dx, loss, kFdEps, kFdAtol, kFdRtol));
  }
  // Yarn's attention factor left unset is get_mscale(factor) = 0.1 ln(4) + 1.
  EXPECT_DOUBLE_EQ(RopeAttentionScaling(ScaledRopeConfigs()[1]), 0.1 * std::log(4.0) + 1);
}

// --------------------------------------------------------------------------------------- bias

TEST(BiasTest, ForwardAddsAndBackwardSumsColumns) {
  Rand rng(TestSeed(240));
  const int64_t rows = 7, width = 5;
  const std::vector<double> x = rng.Vec(rows * width, -1, 1), b = rng.Vec(width, -1, 1);
  std::vector<double> y = x;
  AddBias(y.data(), b.data(), rows, width);
  for (int64_t i = 0; i < rows * width; ++i) EXPECT_EQ(y[i], x[i] + b[i % width]) << "element " << i;
  const std::vector<double> dy = rng.Vec(rows * width, -1, 1);
  std::vector<double> db = rng.Vec(width, -1, 1), db0 = db;  // adds into what is there
  BiasBackward(dy.data(), rows, width, db.data());
  for (int64_t j = 0; j < width; ++j) {
    double sum = db0[j];
    for (int64_t r = 0; r < rows; ++r) sum += dy[r * width + j];
    EXPECT_NEAR(db[j], sum, 1e-14) << "column " << j;
  }
}

// ---------------------------------------------------------------------------------------------- Attention

struct AttnCase {
  int64_t batch, seq, heads, kv_heads, dh;
};

class AttentionTest : public ::testing::TestWithParam<AttnCase> {
 protected:
  void SetUp() override {
    const AttnCase& c = GetParam();
    Rand rng(TestSeed(300 + 10 * c.heads + c.kv_heads + 100 * c.seq));
    q_ = rng.Vec(c.batch * c.seq * c.heads * c.dh, -1, 1);
    k_ = rng.Vec(c.batch * c.seq * c.kv_heads * c.dh, -1, 1);
    v_ = rng.Vec(k_.size(), -1, 1);
    r_ = rng.Vec(q_.size(), -1, 1);
    RoundToFloat(&q_);
    RoundToFloat(&k_);
    RoundToFloat(&v_);
    scale_ = 1.0 / std::sqrt(static_cast<double>(c.dh));
  }
  std::vector<double> q_, k_, v_, r_;
  double scale_ = 1;
};

TEST_P(AttentionTest, ForwardMatchesFloat64Reference) {
  const AttnCase& c = GetParam();
  std::vector<double> o_ref, lse_ref;
  ref::Attention(q_, k_, v_, c.batch, c.seq, c.heads, c.kv_heads, c.dh, scale_, &o_ref, &lse_ref);

  std::vector<float> qf = Cast<float>(q_), kf = Cast<float>(k_), vf = Cast<float>(v_), of(q_.size()),
                     lf(lse_ref.size());
  AttentionForward(qf.data(), kf.data(), vf.data(), c.batch, c.seq, c.heads, c.kv_heads, c.dh, scale_, of.data(),
                   lf.data());
  // With |q|, |k|, |v| <= 1 and dh <= 16, an fp32 score is off by at most dh * u * dh * scale
  // <= 4e-6 (worst case); a softmax turns a score error d into a relative probability error
  // <= 2d, so o and lse are within ~8e-6 of the exact values. atol 1e-5 covers that bound.
  EXPECT_TRUE(AllClose("attention<float> o", of, o_ref, 1e-5, 1e-5));
  EXPECT_TRUE(AllClose("attention<float> lse", lf, lse_ref, 1e-5, 1e-5));

  std::vector<double> od(q_.size()), ld(lse_ref.size());
  AttentionForward(q_.data(), k_.data(), v_.data(), c.batch, c.seq, c.heads, c.kv_heads, c.dh, scale_, od.data(),
                   ld.data());
  EXPECT_TRUE(AllClose("attention<double> o", od, o_ref, kDoubleAtol, kDoubleRtol));
  EXPECT_TRUE(AllClose("attention<double> lse", ld, lse_ref, kDoubleAtol, kDoubleRtol));
}

TEST_P(AttentionTest, BackwardMatchesFiniteDifferences) {
  const AttnCase& c = GetParam();
  std::vector<double> o(q_.size()), lse(c.batch * c.heads * c.seq);
  auto loss = [&] {
    AttentionForward(q_.data(), k_.data(), v_.data(), c.batch, c.seq, c.heads, c.kv_heads, c.dh, scale_, o.data(),
                     lse.data());
    return Dot(r_, o.data());
  };
  loss();
  std::vector<double> dq(q_.size()), dk(k_.size()), dv(v_.size());
  AttentionBackward(q_.data(), k_.data(), v_.data(), o.data(), lse.data(), r_.data(), c.batch, c.seq, c.heads,
                    c.kv_heads, c.dh, scale_, dq.data(), dk.data(), dv.data());
  // With one token the softmax has one entry, so o = v does not depend on q or k.
  if (c.seq > 1) {
    EXPECT_TRUE(CheckGradient("attention dL/dq", &q_, dq, loss, kFdEps, kFdAtol, kFdRtol));
    EXPECT_TRUE(CheckGradient("attention dL/dk", &k_, dk, loss, kFdEps, kFdAtol, kFdRtol));
  }
  EXPECT_TRUE(CheckGradient("attention dL/dv", &v_, dv, loss, kFdEps, kFdAtol, kFdRtol));
}

TEST_P(AttentionTest, BackwardWritesItsOutputs) {
  const AttnCase& c = GetParam();
  std::vector<double> o(q_.size()), lse(c.batch * c.heads * c.seq);
  AttentionForward(q_.data(), k_.data(), v_.data(), c.batch, c.seq, c.heads, c.kv_heads, c.dh, scale_, o.data(),
                   lse.data());
  std::vector<double> dq(q_.size(), 0.0), dk(k_.size(), 0.0), dv(v_.size(), 0.0);
  std::vector<double> dq2(q_.size(), kNaN), dk2(k_.size(), kNaN), dv2(v_.size(), kNaN);
  AttentionBackward(q_.data(), k_.data(), v_.data(), o.data(), lse.data(), r_.data(), c.batch, c.seq, c.heads,
                    c.kv_heads, c.dh, scale_, dq.data(), dk.data(), dv.data());
  AttentionBackward(q_.data(), k_.data(), v_.data(), o.data(), lse.data(), r_.data(), c.batch, c.seq, c.heads,
                    c.kv_heads, c.dh, scale_, dq2.data(), dk2.data(), dv2.data());
  EXPECT_TRUE(BitwiseEqual("attention dq over a NaN-filled buffer", dq2, dq));
  EXPECT_TRUE(BitwiseEqual("attention dk over a NaN-filled buffer", dk2, dk));
  EXPECT_TRUE(BitwiseEqual("attention dv over a NaN-filled buffer", dv2, dv));
}

TEST_P(AttentionTest, FloatBackwardMatchesDouble) {
  const AttnCase& c = GetParam();
  std::vector<double> o(q_.size()), lse(c.batch * c.heads * c.seq), dq(q_.size()), dk(k_.size()), dv(v_.size());
  std::vector<double> r = r_;
  RoundToFloat(&r);
  AttentionForward(q_.data(), k_.data(), v_.data(), c.batch, c.seq, c.heads, c.kv_heads, c.dh, scale_, o.data(),
                   lse.data());
  AttentionBackward(q_.data(), k_.data(), v_.data(), o.data(), lse.data(), r.data(), c.batch, c.seq, c.heads,
                    c.kv_heads, c.dh, scale_, dq.data(), dk.data(), dv.data());
  std::vector<float> qf = Cast<float>(q_), kf = Cast<float>(k_), vf = Cast<float>(v_), rf = Cast<float>(r),
                     of(o.size()), lf(lse.size()), dqf(dq.size()), dkf(dk.size()), dvf(dv.size());
  AttentionForward(qf.data(), kf.data(), vf.data(), c.batch, c.seq, c.heads, c.kv_heads, c.dh, scale_, of.data(),
                   lf.data());
  AttentionBackward(qf.data(), kf.data(), vf.data(), of.data(), lf.data(), rf.data(), c.batch, c.seq, c.heads,
                    c.kv_heads, c.dh, scale_, dqf.data(), dkf.data(), dvf.data());
  // Same O(1) inputs; each gradient is a short sum (<= seq * group terms of <= dh products) of
  // fp32 values that carry the forward's ~1e-5 error: 1e-5 of the tensor's scale.
  // (With one token dq and dk are zero in exact arithmetic and only rounding noise remains: no scale.)
  if (c.seq > 1) {
    EXPECT_TRUE(AllClose("attention<float> dq", dqf, dq, 1e-5 * MaxAbs(dq), 1e-5));
    EXPECT_TRUE(AllClose("attention<float> dk", dkf, dk, 1e-5 * MaxAbs(dk), 1e-5));
  }
  EXPECT_TRUE(AllClose("attention<float> dv", dvf, dv, 1e-5 * MaxAbs(dv), 1e-5));
}

// GQA ratios 1, 2 and 4, batch > 1, a single-token sequence, and the longest test sequence.
INSTANTIATE_TEST_SUITE_P(Shapes, AttentionTest,
                         ::testing::Values(AttnCase{2, 6, 4, 4, 8}, AttnCase{2, 6, 4, 2, 8}, AttnCase{2, 6, 4, 1, 8},
                                           AttnCase{3, 9, 2, 1, 16}, AttnCase{2, 1, 2, 2, 4}),
                         [](const ::testing::TestParamInfo<AttnCase>& info) {
                           const AttnCase& c = info.param;
                           return "b" + std::to_string(c.batch) + "s" + std::to_string(c.seq) + "h" +
                                  std::to_string(c.heads) + "kv" + std::to_string(c.kv_heads) + "d" +
                                  std::to_string(c.dh);
                         });

// ---------------------------------------------------------------------------------------------- SwiGLU

TEST(SwiGluTest, ForwardMatchesFloat64Reference) {
  Rand rng(TestSeed(400));
  const int64_t n = 300;
  std::vector<double> g = rng.Vec(n, -8, 8), u = rng.Vec(n, -2, 2);  // both tails of silu
  RoundToFloat(&g);
  RoundToFloat(&u);
  const std::vector<double> want = ref::SwiGlu(g, u);
  std::vector<float> gf = Cast<float>(g), uf = Cast<float>(u), hf(n);
  SwiGluForward(gf.data(), uf.data(), n, hf.data());
  // Computed in double and rounded once to float.
  EXPECT_TRUE(AllClose("swiglu<float> h", hf, want, 0, 2 * kFloatUlp));
  std::vector<double> hd(n);
  SwiGluForward(g.data(), u.data(), n, hd.data());
  EXPECT_TRUE(AllClose("swiglu<double> h", hd, want, kDoubleAtol, kDoubleRtol));
}

TEST(SwiGluTest, BackwardMatchesFiniteDifferences) {
  Rand rng(TestSeed(410));
  const int64_t n = 200;
  std::vector<double> g = rng.Vec(n, -8, 8), u = rng.Vec(n, -2, 2);
  const std::vector<double> r = rng.Vec(n, -1, 1);
  std::vector<double> h(n);
  auto loss = [&] {
    SwiGluForward(g.data(), u.data(), n, h.data());
    return Dot(r, h.data());
  };
  std::vector<double> dg(n, kNaN), du(n, kNaN);  // written, not added
  SwiGluBackward(r.data(), g.data(), u.data(), n, dg.data(), du.data());
  EXPECT_TRUE(CheckGradient("swiglu dL/dg", &g, dg, loss, kFdEps, kFdAtol, kFdRtol));
  EXPECT_TRUE(CheckGradient("swiglu dL/du", &u, du, loss, kFdEps, kFdAtol, kFdRtol));
}

// ---------------------------------------------------------------------------------------------- AdamW

struct AdamWCase {
  double lr, beta1, beta2, eps, weight_decay;
  float grad_scale;
  int64_t first_step;
};

class AdamWUpdateTest : public ::testing::TestWithParam<AdamWCase> {};

TEST_P(AdamWUpdateTest, MatchesTorchFormulaOverSeveralSteps) {
  const AdamWCase& c = GetParam();
  Rand rng(TestSeed(500 + c.first_step));
  const int64_t n = 301;
  std::vector<float> p = Cast<float>(rng.Vec(n, -1, 1)), m(n, 0.f), v(n, 0.f);
  if (c.first_step > 1) {  // resume from a state that earlier steps left
    m = Cast<float>(rng.Vec(n, -0.1, 0.1));
    for (float& x : v) x = static_cast<float>(rng.Uniform(1e-6, 1e-2));
  }
  ref::AdamWState want(Cast<double>(p), Cast<double>(m), Cast<double>(v));
  // Gradient magnitudes from 1e-9 (below eps, where eps's placement decides the update) to 10; a
  // third of the elements keep their sign across steps, the rest change it at random.
  const std::vector<double> log_mag = rng.Vec(n, -9, 1);
  const std::vector<double> fixed_sign = rng.Signed(n, 1, 1);
  for (int64_t step = c.first_step; step < c.first_step + 6; ++step) {
    SCOPED_TRACE(::testing::Message() << "step " << step);
    std::vector<float> g(n);
    for (int64_t i = 0; i < n; ++i) {
      const double sign = i % 3 == 0 ? fixed_sign[i] : (rng.Bits32() & 1 ? 1.0 : -1.0);
      g[i] = static_cast<float>(sign * std::pow(10.0, log_mag[i]) * rng.Uniform(0.5, 1.0));
    }
    AdamWUpdate(p.data(), g.data(), m.data(), v.data(), n, c.lr, c.beta1, c.beta2, c.eps, c.weight_decay, step,
                c.grad_scale);
    ref::AdamWStep(&want, g, c.lr, c.beta1, c.beta2, c.eps, c.weight_decay, step, c.grad_scale);
    // Each step rounds a handful of fp32 operations per element; errors accumulate over at most
    // six steps and are relative to the magnitude of the terms (mag_*), not to values that cancel.
    const double k = 32 * kFloatUlp;
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_LE(std::fabs(m[i] - want.m[i]), k * want.mag_m[i])
          << "adam m[" << i << "]: engine " << m[i] << ", reference " << want.m[i];
      ASSERT_LE(std::fabs(v[i] - want.v[i]), k * want.v[i])
          << "adam v[" << i << "]: engine " << v[i] << ", reference " << want.v[i];
      ASSERT_LE(std::fabs(p[i] - want.p[i]), k * want.mag_p[i])
          << "param p[" << i << "]: engine " << p[i] << ", reference " << want.p[i] << ", g " << g[i];
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Hyper, AdamWUpdateTest,
                         ::testing::Values(AdamWCase{1e-2, 0.9, 0.95, 1e-8, 0.1, 0.37f, 1},
                                           AdamWCase{1e-3, 0.9, 0.999, 1e-8, 0.0, 1.0f, 1},
                                           AdamWCase{3e-2, 0.8, 0.99, 1e-6, 0.5, 2.5f, 11}));

}  // namespace
}  // namespace blockd::cpu
