// Every CUDA kernel against the CPU ops run in float64 (engine/cpu/ops.h), on fresh random data.
// Tolerances: fp32 paths elementwise rtol 1e-5 (atol = rtol * max|ref|); bf16 paths norm-wise, bounds
// derived from bf16's unit roundoff u = 2^-8 = 3.9e-3 and stated at each test.
#include <cuda_bf16.h>

#include <cstring>
#include <string>
#include <type_traits>

#include "engine/cpu/ops.h"
#include "base/rope.h"
#include "base/dtype.h"
#include "kernels/adamw.cuh"
#include "kernels/attention.cuh"
#include "kernels/attention_fp32.cuh"
#include "kernels/attention_mma.cuh"
#include "kernels/bias.cuh"
#include "kernels/convert.cuh"
#include "kernels/gemm.h"
#include "kernels/rmsnorm.cuh"
#include "kernels/rope.cuh"
#include "kernels/swiglu.cuh"
#include "tests/gpu/gpu_test_util.h"

namespace blockd::testing {
namespace {

using bf16 = __nv_bfloat16;
constexpr double kFp32Rtol = 1e-5;


class RmsNormTest : public ::testing::TestWithParam<std::tuple<int, int>> {};

TEST_P(RmsNormTest, ForwardAndBackwardMatchFloat64) {
  SKIP_WITHOUT_GPU();
  const auto [rows, d] = GetParam();
  const double eps = 1e-6;
  auto x = RandomNormal(size_t(rows) * d, 1, 1.5f, 0.3f);
  auto w = RandomNormal(d, 2, 0.2f, 1.f);
  auto dy = RandomNormal(size_t(rows) * d, 3);
  auto res = RandomNormal(size_t(rows) * d, 4);
  auto dw0 = RandomNormal(d, 5);
  // float64 reference
  std::vector<double> xd(x.begin(), x.end()), wd(w.begin(), w.end()), dyd(dy.begin(), dy.end());
  std::vector<double> y_ref(x.size()), rstd_ref(rows), dx_ref(res.begin(), res.end()), dw_ref(dw0.begin(), dw0.end());
  cpu::RmsNormForward(xd.data(), wd.data(), rows, d, eps, y_ref.data(), rstd_ref.data());
  cpu::RmsNormBackward(dyd.data(), xd.data(), wd.data(), rstd_ref.data(), rows, d, dx_ref.data(), dw_ref.data());

  DeviceArray<float> dx_(x), dw_(w), drstd(rows), dy_(dy), dres(res), ddx(x.size()), ddw(dw0);
  DeviceArray<float> dws(kernels::rmsnorm_bwd_workspace_floats(d));
  DeviceArray<float> y32(x.size());
  DeviceArray<bf16> y16(x.size());
  y32.Poison();
  ddx.Poison();
  CUDA_ASSERT(kernels::launch_rmsnorm_fwd<float>(dx_.get(), dw_.get(), y32.get(), drstd.get(), rows, d, eps, 0));
  CUDA_ASSERT(kernels::launch_rmsnorm_fwd<bf16>(dx_.get(), dw_.get(), y16.get(), drstd.get(), rows, d, eps, 0));
  DeviceArray<bf16> ddx16(x.size());
  CUDA_ASSERT(kernels::launch_rmsnorm_bwd(dy_.get(), dx_.get(), dw_.get(), drstd.get(), dres.get(), ddx.get(),
                                          ddx16.get(), ddw.get(), /*accumulate_dw=*/true, dws.get(), rows, d, 0));
  CUDA_ASSERT(cudaDeviceSynchronize());
  ExpectClose("rmsnorm y fp32", y32.Download(), y_ref, kFp32Rtol);
  ExpectClose("rmsnorm rstd", drstd.Download(), rstd_ref, kFp32Rtol);
  // One rounding to bf16 of each output: norm-wise <= u.
  ExpectNormClose("rmsnorm y bf16", FromBf16(y16.Download()), y_ref, 3.9e-3);
  ExpectClose("rmsnorm dx (+ residual)", ddx.Download(), dx_ref, kFp32Rtol);
  ExpectClose("rmsnorm dw (accumulated)", ddw.Download(), dw_ref, kFp32Rtol);
  ExpectNormClose("rmsnorm dx bf16 copy", FromBf16(ddx16.Download()), dx_ref, 3.9e-3);
}

INSTANTIATE_TEST_SUITE_P(Shapes, RmsNormTest,
                         // Below 1024 rows the forward gives each row a block, from 1024 on a warp;
                         // rows of a multiple of 4 take float4 loads.
                         ::testing::Values(std::make_tuple(1, 64), std::make_tuple(37, 1000),
                                           std::make_tuple(300, 4096), std::make_tuple(1000, 24),
                                           std::make_tuple(3, 1001), std::make_tuple(1100, 70),
                                           std::make_tuple(1030, 4096)));

// The config of a RoPE test: theta 1e6 and the named rope_type with Llama 3.1's and Qwen2.5's values.
BlockConfig RopeConfig(int dh, const std::string& rope) {
  BlockConfig c;
  c.head_dim = dh;
  c.rope_theta = 1e6;
  if (rope == "llama3") c.rope_scaling = {"llama3", 8.0, 1.0, 4.0, 8192, 0, 0, 0};
  if (rope == "yarn") c.rope_scaling = {"yarn", 4.0, 0, 0, 32768, 0, 0, 0};
  if (rope == "linear") c.rope_scaling = {"linear", 2.0, 0, 0, 0, 0, 0, 0};
  return c;
}

class RopeTest : public ::testing::TestWithParam<std::tuple<int, bool, int64_t, const char*>> {};

TEST_P(RopeTest, QkNormRopeForwardAndBackwardMatchFloat64) {
  SKIP_WITHOUT_GPU();
  const auto [dh, qk_norm, offset, rope] = GetParam();
  const BlockConfig rc = RopeConfig(dh, rope);
  const std::vector<double> inv_freq = RopeInvFreq(rc);
  const double scale = RopeAttentionScaling(rc);
  // 38 tokens take the forward's warp per (token, head), 1040 its warp per token.
  for (int seq : {19, 520}) {
    const std::string at = " (" + std::to_string(2 * seq) + " tokens)";
    const int batch = 2, heads = 3;
    const int64_t tokens = int64_t(batch) * seq, stride = heads * dh + 40;  // a part inside a wider row
    const double eps = 1e-6;
    auto in = RandomNormal(tokens * stride, 11, 2.f);
    auto w = RandomNormal(dh, 12, 0.3f, 1.f);
    auto dout = RandomNormal(tokens * heads * dh, 13);
    auto dw0 = RandomNormal(dh, 14);
    // Reference: gather the part, norm per head, rotate (float64).
    std::vector<double> x(tokens * heads * dh);
    for (int64_t t = 0; t < tokens; ++t) {
      for (int i = 0; i < heads * dh; ++i) x[t * heads * dh + i] = in[t * stride + i];
    }
    std::vector<double> wd(w.begin(), w.end()), y(x.size()), rstd(tokens * heads);
    if (qk_norm) {
      cpu::RmsNormForward(x.data(), wd.data(), tokens * heads, dh, eps, y.data(), rstd.data());
    } else {
      y = x;
    }
    cpu::RopeForward(y.data(), batch, seq, heads, dh, offset, inv_freq.data(), scale);
    std::vector<double> g(dout.begin(), dout.end());
    cpu::RopeBackward(g.data(), batch, seq, heads, dh, offset, inv_freq.data(), scale);
    std::vector<double> dx_ref(x.size(), 0.0), dw_ref(dw0.begin(), dw0.end());
    if (qk_norm) {
      cpu::RmsNormBackward(g.data(), x.data(), wd.data(), rstd.data(), tokens * heads, dh, dx_ref.data(), dw_ref.data());
    } else {
      dx_ref = g;
    }

    DeviceArray<float> din(in), dwv(w), ddout(dout), ddw(dw0), dout_y(tokens * heads * dh), drstd(tokens * heads);
    DeviceArray<float2> table(seq * dh / 2);
    DeviceArray<double> dinv_freq(inv_freq);
    DeviceArray<float> ddin(tokens * stride), ws(kernels::qknorm_rope_bwd_workspace_floats(dh));
    dout_y.Poison();
    ddin.Poison();
    CUDA_ASSERT(kernels::launch_rope_table(table.get(), seq, dh, offset, dinv_freq.get(), scale, 0));
    CUDA_ASSERT(kernels::launch_qknorm_rope_fwd<float>(din.get(), stride, dout_y.get(), drstd.get(),
                                                       qk_norm ? dwv.get() : nullptr, table.get(), tokens, seq, heads, dh,
                                                       eps, 0));
    CUDA_ASSERT(kernels::launch_qknorm_rope_bwd<float>(ddout.get(), din.get(), stride, drstd.get(),
                                                       qk_norm ? dwv.get() : nullptr, table.get(), ddin.get(), ddw.get(),
                                                       /*accumulate=*/true, ws.get(), tokens, seq, heads, dh, 0));
    CUDA_ASSERT(cudaDeviceSynchronize());
    ExpectClose("rope y" + at, dout_y.Download(), y, kFp32Rtol);
    const auto dfull = ddin.Download();
    std::vector<float> dx(x.size());
    for (int64_t t = 0; t < tokens; ++t) {
      for (int i = 0; i < heads * dh; ++i) dx[t * heads * dh + i] = dfull[t * stride + i];
    }
    ExpectClose("rope dx" + at, dx, dx_ref, kFp32Rtol);
    if (qk_norm) ExpectClose("qk-norm dw (accumulated)" + at, ddw.Download(), dw_ref, kFp32Rtol);
  }
}

INSTANTIATE_TEST_SUITE_P(Configs, RopeTest,
                         ::testing::Values(std::make_tuple(64, true, int64_t{0}, "default"),
                                           std::make_tuple(128, true, int64_t{5000}, "default"),
                                           std::make_tuple(128, false, int64_t{3}, "default"),
                                           std::make_tuple(32, true, int64_t{1}, "default"),
                                           std::make_tuple(256, false, int64_t{100000}, "default"),
                                           std::make_tuple(128, false, int64_t{7000}, "llama3"),
                                           std::make_tuple(64, true, int64_t{40000}, "yarn"),
                                           std::make_tuple(128, true, int64_t{11}, "linear")));

// Qwen2's q|k|v bias inside wider rows: the add in fp32 (stored as float or bf16), and the column
// sums of the gradient, accumulated onto what dbias held, against float64 sums.
TEST(BiasTest, AddAndColumnSumsMatchFloat64) {
  SKIP_WITHOUT_GPU();
  for (int64_t rows : {int64_t{1}, int64_t{37}, int64_t{5000}}) {
    SCOPED_TRACE(::testing::Message() << "rows " << rows);
    const int width = 200;
    const int64_t stride = width + 24;
    const auto y0 = RandomNormal(rows * stride, 41);
    const auto bias = RandomNormal(width, 42);
    const auto db0 = RandomNormal(width, 43);
    DeviceArray<float> y(y0), b(bias), db(db0), ws(kernels::bias_bwd_workspace_floats(width));
    DeviceArray<bf16> y16(ToBf16(y0));
    CUDA_ASSERT(kernels::launch_add_bias<float>(y.get(), stride, b.get(), rows, width, 0));
    CUDA_ASSERT(kernels::launch_add_bias<bf16>(y16.get(), stride, b.get(), rows, width, 0));
    CUDA_ASSERT(kernels::launch_bias_bwd<float>(y.get(), stride, rows, width, db.get(), /*accumulate=*/true,
                                                ws.get(), 0));
    CUDA_ASSERT(cudaDeviceSynchronize());
    const auto got = y.Download(), got16 = FromBf16(y16.Download()), got_db = db.Download();
    const auto in16 = FromBf16(ToBf16(y0));
    std::vector<double> want(rows * stride), want16(rows * stride), want_db(db0.begin(), db0.end());
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < stride; ++j) {
        const int64_t i = r * stride + j;
        want[i] = double(y0[i]) + (j < width ? bias[j] : 0.0);
        want16[i] = double(in16[i]) + (j < width ? bias[j] : 0.0);
      }
    }
    // dbias reads the biased y back: sums of rows terms in fp32 on both sides of the reference.
    for (int64_t r = 0; r < rows; ++r) {
      for (int j = 0; j < width; ++j) want_db[j] += double(got[r * stride + j]);
    }
    ExpectClose("y + bias (fp32)", got, want, kFp32Rtol);
    // One bf16 rounding of the fp32 sum: relative 2^-8 of each element.
    for (int64_t i = 0; i < rows * stride; ++i) {
      ASSERT_LE(std::fabs(got16[i] - want16[i]), std::ldexp(std::fabs(want16[i]), -8) + 1e-30) << "element " << i;
    }
    // The sum of `rows` fp32 terms of O(1): error <= rows * 2^-24 * sum |terms|, below 1e-5 of
    // sqrt(rows) for random signs at these sizes; bounded by the worst case to stay exact.
    for (int j = 0; j < width; ++j) {
      double mag = std::fabs(db0[j]);
      for (int64_t r = 0; r < rows; ++r) mag += std::fabs(got[r * stride + j]);
      ASSERT_LE(std::fabs(got_db[j] - want_db[j]), double(rows + 1) * std::ldexp(1.0, -24) * mag) << "column " << j;
    }
  }
}

// cuDNN's attention backward writes dq and dk in bf16 (engine/cuda/attention_dispatch.cc): the
// backward reading bf16 gradients must compute exactly what it computes from the same values in
// fp32 (the arithmetic is fp32 either way), on the vector paths (dh 64, 128) and the generic one.
TEST(RopeBf16GradTest, Bf16GradientsGiveTheSameBitsAsTheirFp32Values) {
  SKIP_WITHOUT_GPU();
  for (int dh : {64, 128, 24}) {
    const int batch = 2, seq = 21, heads = 3;
    const int64_t tokens = int64_t(batch) * seq, stride = heads * dh + 40;
    const auto in = ToBf16(RandomNormal(tokens * stride, 31, 2.f));
    const auto w = RandomNormal(dh, 32, 0.3f, 1.f);
    const auto dout16 = ToBf16(RandomNormal(tokens * heads * dh, 33));
    DeviceArray<bf16> din(in), dout_b(dout16), y(tokens * heads * dh), dx_f(tokens * stride), dx_b(tokens * stride);
    DeviceArray<float> dout_f(FromBf16(dout16)), dw(w), rstd(tokens * heads), dw_f(dh), dw_b(dh);
    DeviceArray<float> ws(kernels::qknorm_rope_bwd_workspace_floats(dh));
    DeviceArray<float2> table(seq * dh / 2);
    DeviceArray<double> inv_freq(RopeInvFreq(RopeConfig(dh, "default")));
    dx_f.Poison();
    dx_b.Poison();
    CUDA_ASSERT(kernels::launch_rope_table(table.get(), seq, dh, 0, inv_freq.get(), 1.0, 0));
    CUDA_ASSERT(kernels::launch_qknorm_rope_fwd<bf16>(din.get(), stride, y.get(), rstd.get(), dw.get(), table.get(),
                                                      tokens, seq, heads, dh, 1e-6f, 0));
    CUDA_ASSERT(kernels::launch_qknorm_rope_bwd<bf16>(dout_f.get(), din.get(), stride, rstd.get(), dw.get(),
                                                      table.get(), dx_f.get(), dw_f.get(), false, ws.get(), tokens,
                                                      seq, heads, dh, 0));
    CUDA_ASSERT(kernels::launch_qknorm_rope_bwd<bf16>(dout_b.get(), din.get(), stride, rstd.get(), dw.get(),
                                                      table.get(), dx_b.get(), dw_b.get(), false, ws.get(), tokens,
                                                      seq, heads, dh, 0));
    CUDA_ASSERT(cudaDeviceSynchronize());
    const auto a = FromBf16(dx_f.Download()), b = FromBf16(dx_b.Download());
    for (int64_t t = 0; t < tokens; ++t) {
      for (int i = 0; i < heads * dh; ++i) {
        ASSERT_EQ(std::memcmp(&a[t * stride + i], &b[t * stride + i], 4), 0)
            << "dh " << dh << ": din[" << t << "][" << i << "] from fp32 " << a[t * stride + i] << ", from bf16 "
            << b[t * stride + i];
      }
    }
    const auto wa = dw_f.Download(), wb = dw_b.Download();
    ASSERT_EQ(std::memcmp(wa.data(), wb.data(), wa.size() * 4), 0) << "dh " << dh << ": qk-norm dw differs";
  }
}

class SwiGluTest : public ::testing::TestWithParam<int64_t> {};

TEST_P(SwiGluTest, ForwardAndBackwardMatchFloat64) {
  SKIP_WITHOUT_GPU();
  const int64_t tokens = 33, f = GetParam();  // 517: the scalar kernels; 1024: the 16-byte vector ones
  auto gu = RandomNormal(tokens * 2 * f, 21, 2.f);
  auto dh = RandomNormal(tokens * f, 22);
  std::vector<double> g(tokens * f), u(tokens * f), dhd(dh.begin(), dh.end());
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t c = 0; c < f; ++c) {
      g[t * f + c] = gu[t * 2 * f + c];
      u[t * f + c] = gu[t * 2 * f + f + c];
    }
  }
  std::vector<double> h_ref(tokens * f), dg_ref(tokens * f), du_ref(tokens * f);
  cpu::SwiGluForward(g.data(), u.data(), tokens * f, h_ref.data());
  cpu::SwiGluBackward(dhd.data(), g.data(), u.data(), tokens * f, dg_ref.data(), du_ref.data());
  std::vector<double> dgu_ref(tokens * 2 * f);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t c = 0; c < f; ++c) {
      dgu_ref[t * 2 * f + c] = dg_ref[t * f + c];
      dgu_ref[t * 2 * f + f + c] = du_ref[t * f + c];
    }
  }
  DeviceArray<float> dgu(gu), ddh(dh), h(tokens * f), dgu_out(tokens * 2 * f);
  h.Poison();
  dgu_out.Poison();
  CUDA_ASSERT(kernels::launch_swiglu_fwd<float>(dgu.get(), h.get(), tokens, f, 0));
  CUDA_ASSERT(kernels::launch_swiglu_bwd<float>(ddh.get(), dgu.get(), dgu_out.get(), tokens, f, 0));
  CUDA_ASSERT(cudaDeviceSynchronize());
  ExpectClose("swiglu h", h.Download(), h_ref, kFp32Rtol);
  ExpectClose("swiglu dgate|dup", dgu_out.Download(), dgu_ref, kFp32Rtol);
  // bf16 storage: inputs rounded to bf16, each output rounded once: norm-wise <= 2u.
  const auto gu16 = RoundBf16(gu);
  DeviceArray<bf16> bgu(ToBf16(gu16)), bh(tokens * f);
  CUDA_ASSERT(kernels::launch_swiglu_fwd<bf16>(bgu.get(), bh.get(), tokens, f, 0));
  CUDA_ASSERT(cudaDeviceSynchronize());
  std::vector<double> g16(tokens * f), u16(tokens * f), h16(tokens * f);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t c = 0; c < f; ++c) {
      g16[t * f + c] = gu16[t * 2 * f + c];
      u16[t * f + c] = gu16[t * 2 * f + f + c];
    }
  }
  cpu::SwiGluForward(g16.data(), u16.data(), tokens * f, h16.data());
  ExpectNormClose("swiglu h bf16", FromBf16(bh.Download()), h16, 2 * 3.9e-3);
}

INSTANTIATE_TEST_SUITE_P(Widths, SwiGluTest, ::testing::Values(int64_t{517}, int64_t{1024}));

struct AttentionCase {
  int batch, seq, heads, kv_heads, dh;
};

class AttentionTest : public ::testing::TestWithParam<AttentionCase> {};

TEST_P(AttentionTest, ForwardAndBackwardMatchFloat64) {
  SKIP_WITHOUT_GPU();
  const AttentionCase c = GetParam();
  const int64_t tokens = int64_t(c.batch) * c.seq, qd = int64_t(c.heads) * c.dh, kvd = int64_t(c.kv_heads) * c.dh;
  const double scale = 1.0 / std::sqrt(double(c.dh));
  auto q = RandomNormal(tokens * qd, 31, 1.5f);
  auto k = RandomNormal(tokens * kvd, 32, 1.5f);
  auto v_wide = RandomNormal(tokens * (kvd + 16), 33);  // v sits inside wider rows
  auto d_o = RandomNormal(tokens * qd, 34);
  std::vector<double> qd_(q.begin(), q.end()), kd(k.begin(), k.end()), vd(tokens * kvd), dod(d_o.begin(), d_o.end());
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t i = 0; i < kvd; ++i) vd[t * kvd + i] = v_wide[t * (kvd + 16) + i];
  }
  std::vector<double> o_ref(tokens * qd), lse_ref(int64_t(c.batch) * c.heads * c.seq);
  cpu::AttentionForward(qd_.data(), kd.data(), vd.data(), c.batch, c.seq, c.heads, c.kv_heads, c.dh, scale,
                        o_ref.data(), lse_ref.data());
  std::vector<double> dq_ref(tokens * qd), dk_ref(tokens * kvd), dv_ref(tokens * kvd);
  cpu::AttentionBackward(qd_.data(), kd.data(), vd.data(), o_ref.data(), lse_ref.data(), dod.data(), c.batch, c.seq,
                         c.heads, c.kv_heads, c.dh, scale, dq_ref.data(), dk_ref.data(), dv_ref.data());

  DeviceArray<float> dq_in(q), dk_in(k), dv_in(v_wide), ddo(d_o), o(tokens * qd), lse(lse_ref.size());
  DeviceArray<float> dq(tokens * qd), dk(tokens * kvd), dv(tokens * (kvd + 16));
  DeviceArray<float> delta(kernels::attention_bwd_workspace_floats(c.batch, c.seq, c.heads, c.kv_heads, c.dh));
  o.Poison();
  dq.Poison();
  dk.Poison();
  dv.Poison();
  // q, k, dq, dk dense; v and dv inside rows 16 elements wider, as v sits inside q|k|v in a block.
  auto args = [&](auto* q_, auto* k_, auto* v_, auto* o_, auto* do_, auto* dv_) {
    using T = std::remove_pointer_t<decltype(o_)>;
    auto a = kernels::AttentionArgs<T>::Causal(c.batch, c.seq, c.heads, c.kv_heads, c.dh, /*stream=*/0);
    EXPECT_EQ(a.scale, static_cast<float>(scale));
    a.q = q_;
    a.q_stride = qd;
    a.k = k_;
    a.k_stride = kvd;
    a.v = v_;
    a.v_stride = kvd + 16;
    a.o = o_;
    a.o_stride = qd;
    a.lse = lse.get();
    a.d_o = do_;
    a.do_stride = qd;
    a.dq = dq.get();
    a.dk = dk.get();
    a.dv = dv_;
    a.dv_stride = kvd + 16;
    a.workspace = delta.get();
    return a;
  };
  const std::string path32 =
      kernels::attention_fp32_supports(args(dq_in.get(), dk_in.get(), dv_in.get(), o.get(), ddo.get(), dv.get()))
          ? " fp32 (register-tiled)"
          : " fp32 (simt)";
  CUDA_ASSERT(kernels::launch_attention_fwd(args(dq_in.get(), dk_in.get(), dv_in.get(), o.get(), ddo.get(), dv.get())));
  CUDA_ASSERT(cudaDeviceSynchronize());
  // Backward reads the reference o so that its inputs are exactly the CPU's.
  std::vector<float> o_ref_f(o_ref.begin(), o_ref.end());
  DeviceArray<float> do_ref(o_ref_f);
  CUDA_ASSERT(
      kernels::launch_attention_bwd(args(dq_in.get(), dk_in.get(), dv_in.get(), do_ref.get(), ddo.get(), dv.get())));
  CUDA_ASSERT(cudaDeviceSynchronize());
  ExpectClose("attention o" + path32, o.Download(), o_ref, kFp32Rtol);
  ExpectClose("attention lse" + path32, lse.Download(), lse_ref, kFp32Rtol);
  ExpectClose("attention dq" + path32, dq.Download(), dq_ref, kFp32Rtol);
  ExpectClose("attention dk" + path32, dk.Download(), dk_ref, kFp32Rtol);
  const auto dv_wide = dv.Download();
  std::vector<float> dv_got(tokens * kvd);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t i = 0; i < kvd; ++i) dv_got[t * kvd + i] = dv_wide[t * (kvd + 16) + i];
  }
  ExpectClose("attention dv" + path32, dv_got, dv_ref, kFp32Rtol);

  // bf16 activations (tensor cores for head_dim 64 and 128, SIMT otherwise): inputs rounded to
  // bf16 first, so that the float64 reference sees exactly what the kernels see. Forward: the
  // probabilities enter P V rounded to bf16 (<= u each, u = 2^-8) and o is rounded once on output:
  // norm-wise <= 2u. Backward: P and dS enter the products rounded (u each), dO and the saved o are
  // bf16, and dv is rounded on output: <= 4u. lse is fp32 arithmetic throughout: 1e-5.
  constexpr double u = 1.0 / 256;
  const auto q16 = RoundBf16(q), k16 = RoundBf16(k), v16 = RoundBf16(v_wide), do16 = RoundBf16(d_o);
  std::vector<double> q16d(q16.begin(), q16.end()), k16d(k16.begin(), k16.end()), v16d(tokens * kvd);
  std::vector<double> do16d(do16.begin(), do16.end());
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t i = 0; i < kvd; ++i) v16d[t * kvd + i] = v16[t * (kvd + 16) + i];
  }
  std::vector<double> o16_ref(tokens * qd), lse16(lse_ref.size());
  cpu::AttentionForward(q16d.data(), k16d.data(), v16d.data(), c.batch, c.seq, c.heads, c.kv_heads, c.dh, scale,
                        o16_ref.data(), lse16.data());
  // The backward reference reads o as the kernel will: rounded to bf16.
  std::vector<float> o16f(o16_ref.begin(), o16_ref.end());
  o16f = RoundBf16(o16f);
  std::vector<double> o16d(o16f.begin(), o16f.end());
  std::vector<double> dq16(tokens * qd), dk16(tokens * kvd), dv16(tokens * kvd);
  cpu::AttentionBackward(q16d.data(), k16d.data(), v16d.data(), o16d.data(), lse16.data(), do16d.data(), c.batch,
                         c.seq, c.heads, c.kv_heads, c.dh, scale, dq16.data(), dk16.data(), dv16.data());
  DeviceArray<bf16> bq(ToBf16(q16)), bk(ToBf16(k16)), bv(ToBf16(v16)), bo(tokens * qd), bdo(ToBf16(do16));
  DeviceArray<bf16> bo_ref(ToBf16(o16f)), bdv(tokens * (kvd + 16));
  bo.Poison();
  bdv.Poison();
  dq.Poison();
  dk.Poison();
  CUDA_ASSERT(kernels::launch_attention_fwd(args(bq.get(), bk.get(), bv.get(), bo.get(), bdo.get(), bdv.get())));
  CUDA_ASSERT(cudaDeviceSynchronize());
  const std::string path = kernels::attention_mma_supports(c.dh) ? " bf16 (tensor cores)" : " bf16 (simt)";
  ExpectNormClose("attention o" + path, FromBf16(bo.Download()), o16_ref, 2 * u);
  ExpectNormClose("attention lse" + path, lse.Download(), lse16, 1e-5);
  CUDA_ASSERT(kernels::launch_attention_bwd(args(bq.get(), bk.get(), bv.get(), bo_ref.get(), bdo.get(), bdv.get())));
  CUDA_ASSERT(cudaDeviceSynchronize());
  ExpectNormClose("attention dq" + path, dq.Download(), dq16, 4 * u);
  ExpectNormClose("attention dk" + path, dk.Download(), dk16, 4 * u);
  const auto bdv_wide = FromBf16(bdv.Download());
  std::vector<float> dv16_got(tokens * kvd);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t i = 0; i < kvd; ++i) dv16_got[t * kvd + i] = bdv_wide[t * (kvd + 16) + i];
  }
  ExpectNormClose("attention dv" + path, dv16_got, dv16, 4 * u);
}

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionTest,
                         ::testing::Values(AttentionCase{2, 37, 4, 2, 64}, AttentionCase{1, 128, 8, 2, 128},
                                           AttentionCase{3, 5, 2, 2, 32}, AttentionCase{1, 300, 4, 1, 256},
                                           AttentionCase{2, 64, 16, 8, 128}, AttentionCase{1, 2, 4, 4, 64},
                                           AttentionCase{1, 1000, 4, 2, 128}, AttentionCase{3, 129, 6, 3, 64},
                                           AttentionCase{1, 333, 2, 1, 32},
                                           // The register-tiled fp32 kernels (head_dim 64/128): seq
                                           // off their 64/128-row blocks, GQA ratios 1, 2 and 4.
                                           AttentionCase{1, 515, 4, 4, 128}, AttentionCase{2, 190, 8, 2, 128},
                                           AttentionCase{1, 77, 6, 3, 128}, AttentionCase{2, 200, 8, 2, 64},
                                           AttentionCase{1, 300, 2, 2, 64}, AttentionCase{1, 450, 4, 2, 64}));

// Which fp32 shapes the register-tiled kernels take (the rest fall back to SIMT, which the shapes
// above cover): head_dim 64 or 128, and every row 16-byte aligned for float4 and cp.async.
TEST(AttentionFp32Test, TakesHeadDim64And128WithAlignedRowsOnly) {
  alignas(16) static float buf[64];
  auto args = [&](int dh) {
    auto a = kernels::AttentionArgs<float>::Causal(1, 8, 4, 2, dh, /*stream=*/0);
    a.q = a.k = a.v = a.d_o = buf;
    a.o = a.dq = a.dk = a.dv = buf;
    a.q_stride = a.o_stride = a.do_stride = 4 * dh;
    a.k_stride = a.v_stride = a.dv_stride = 2 * dh;
    return a;
  };
  EXPECT_TRUE(kernels::attention_fp32_supports(args(64)));
  EXPECT_TRUE(kernels::attention_fp32_supports(args(128)));
  EXPECT_FALSE(kernels::attention_fp32_supports(args(32)));
  EXPECT_FALSE(kernels::attention_fp32_supports(args(256)));
  auto odd_stride = args(128);
  odd_stride.v_stride = 2 * 128 + 2;  // v inside rows whose length is not a multiple of 4 floats
  EXPECT_FALSE(kernels::attention_fp32_supports(odd_stride));
  auto odd_base = args(64);
  odd_base.v = buf + 1;  // v starting 4 bytes into a 16-byte word
  EXPECT_FALSE(kernels::attention_fp32_supports(odd_base));
  auto forward_only = args(64);
  forward_only.d_o = nullptr;  // the forward leaves the backward's pointers unset
  forward_only.dq = forward_only.dk = forward_only.dv = nullptr;
  EXPECT_TRUE(kernels::attention_fp32_supports(forward_only));
}

TEST(AdamWTest, MatchesCpuUpdateAndSumSquares) {
  SKIP_WITHOUT_GPU();
  const int64_t n = 100003, decay_end = 70001;
  auto p = RandomNormal(n, 41), g = RandomNormal(n, 42, 0.01f), m = RandomNormal(n, 43, 0.001f);
  auto v = RandomNormal(n, 44, 1e-5f);
  for (float& x : v) x = std::fabs(x);
  std::vector<float> cp = p, cm = m, cv = v;
  const double lr = 3e-4, b1 = 0.9, b2 = 0.95, eps = 1e-8, wd = 0.1;
  const int64_t step = 7;
  const float scale = 0.37f;
  cpu::AdamWUpdate(cp.data(), g.data(), cm.data(), cv.data(), decay_end, lr, b1, b2, eps, wd, step, scale);
  cpu::AdamWUpdate(cp.data() + decay_end, g.data() + decay_end, cm.data() + decay_end, cv.data() + decay_end,
                   n - decay_end, lr, b1, b2, eps, 0.0, step, scale);
  DeviceArray<float> dp(p), dg(g), dm(m), dv(v);
  DeviceArray<bf16> dp16(n);
  const kernels::AdamWDeviceParams hp = kernels::MakeAdamWParams(lr, b1, b2, eps, wd, step, scale, decay_end);
  DeviceArray<kernels::AdamWDeviceParams> dhp(std::vector<kernels::AdamWDeviceParams>{hp});
  CUDA_ASSERT(kernels::launch_adamw(dp.get(), dg.get(), dm.get(), dv.get(), dp16.get(), n, dhp.get(), 0));
  DeviceArray<double> ws(kernels::sum_squares_workspace_doubles()), ss(1);
  CUDA_ASSERT(kernels::launch_sum_squares(dg.get(), n, ws.get(), ss.get(), 0));
  CUDA_ASSERT(cudaDeviceSynchronize());
  // Same fp32 operations as the CPU; only fused multiply-adds may round differently (~1 ulp).
  ExpectClose("adamw p", dp.Download(), ToDouble(cp), 1e-6);
  ExpectClose("adamw m", dm.Download(), ToDouble(cm), 1e-6);
  ExpectClose("adamw v", dv.Download(), ToDouble(cv), 1e-6);
  ExpectNormClose("adamw bf16 copy", FromBf16(dp16.Download()), ToDouble(cp), 3.9e-3);
  double ref = 0;
  for (float x : g) ref += double(x) * x;
  EXPECT_NEAR(ss.Download()[0], ref, 1e-12 * ref);
}

TEST(ConvertTest, WireConversionsRoundToNearestEvenAndCountNonFinite) {
  SKIP_WITHOUT_GPU();
  auto x = RandomNormal(4099, 51, 100.f);
  x[0] = 1.00390625f;               // exactly halfway between two bf16 values: ties to even
  x[1] = 1.01171875f;               // the other tie
  x[2] = -0.f;
  x[3] = 3.0e38f;
  const size_t n = x.size();
  DeviceArray<float> dx(x), back(n);
  DeviceArray<uint16_t> wire(n);
  CUDA_ASSERT(kernels::launch_from_float(dx.get(), kernels::kWireBFloat16, wire.get(), n, 0));
  CUDA_ASSERT(cudaDeviceSynchronize());
  const auto bits = wire.Download();
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(bits[i], Float32ToBFloat16(x[i])) << "element " << i << " = " << x[i];
  DeviceArray<unsigned> bad(std::vector<unsigned>{0});
  std::vector<uint16_t> with_nan = bits;
  with_nan[5] = 0x7fc0;  // NaN
  with_nan[9] = 0xff80;  // -inf
  wire.Upload(with_nan);
  CUDA_ASSERT(kernels::launch_to_float(kernels::kWireBFloat16, wire.get(), back.get(), n, bad.get(), 0));
  CUDA_ASSERT(cudaDeviceSynchronize());
  EXPECT_EQ(bad.Download()[0], 2u);
  const auto f = back.Download();
  for (size_t i = 10; i < n; ++i) ASSERT_EQ(f[i], BFloat16ToFloat32(bits[i])) << "element " << i;
}

// Both 2-byte wire types, with the buffers 16-byte aligned (8 values per access, then a tail) and
// not (one at a time): bitwise the host's conversions (base/dtype.h) both ways, non-finite counted.
TEST(ConvertTest, VectorAndScalarPathsMatchTheHostForBothHalfTypes) {
  SKIP_WITHOUT_GPU();
  const size_t n = 4096 + 13;
  auto x = RandomNormal(n + 1, 52, 1000.f);
  x[7] = 1.00390625f;  // a bf16 tie
  x[8] = 70000.f;      // past fp16's range: inf on the wire
  for (auto [type, dtype] : {std::pair{kernels::kWireBFloat16, DType::kBFloat16},
                             std::pair{kernels::kWireFloat16, DType::kFloat16}}) {
    for (size_t offset : {size_t{0}, size_t{1}}) {
      SCOPED_TRACE(std::string(DTypeName(dtype)) + (offset ? ", unaligned" : ", aligned"));
      DeviceArray<float> dx(x), back(n + 1);
      DeviceArray<uint16_t> wire(n + 1);
      CUDA_ASSERT(kernels::launch_from_float(dx.get() + offset, type, wire.get() + offset, n, 0));
      CUDA_ASSERT(cudaDeviceSynchronize());
      std::vector<uint16_t> want(n);
      ConvertFromFloat32(x.data() + offset, n, dtype, want.data());
      const auto got = wire.Download();
      for (size_t i = 0; i < n; ++i) ASSERT_EQ(got[offset + i], want[i]) << "element " << i;
      DeviceArray<unsigned> bad(std::vector<unsigned>{0});
      CUDA_ASSERT(kernels::launch_to_float(type, wire.get() + offset, back.get() + offset, n, bad.get(), 0));
      CUDA_ASSERT(cudaDeviceSynchronize());
      std::vector<float> want_back(n);
      ConvertToFloat32(dtype, want.data(), n, want_back.data());
      unsigned want_bad = 0;
      for (float v : want_back) want_bad += !std::isfinite(v);
      EXPECT_EQ(bad.Download()[0], want_bad);
      if (dtype == DType::kFloat16) {
        EXPECT_GE(want_bad, 1u);  // 70000 overflowed
      }
      const auto f = back.Download();
      for (size_t i = 0; i < n; ++i) {
        if (std::isnan(want_back[i])) continue;
        ASSERT_EQ(f[offset + i], want_back[i]) << "element " << i;
      }
    }
  }
}

// Row-major GEMM through cuBLASLt in each mode, all transposes, the residual as C != D.
class GemmTest : public ::testing::TestWithParam<std::tuple<bool, bool>> {};

TEST_P(GemmTest, ModesMatchFloat64AndFp32HasNoTf32) {
  SKIP_WITHOUT_GPU();
  const auto [ta, tb] = GetParam();
  const int64_t m = 37, n = 53, k = 4096;
  auto a = RandomNormal(m * k, 61), b = RandomNormal(k * n, 62), c = RandomNormal(m * n, 63);
  // Reference in double: D = op(A) op(B) + C.
  std::vector<double> ref(m * n);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double s = c[i * n + j];
      for (int64_t l = 0; l < k; ++l) {
        const double av = ta ? a[l * m + i] : a[i * k + l];
        const double bv = tb ? b[j * k + l] : b[l * n + j];
        s += av * bv;
      }
      ref[i * n + j] = s;
    }
  }
  void* ws = nullptr;
  CUDA_ASSERT(cudaMalloc(&ws, 32 << 20));
  kernels::GemmContext ctx;
  ASSERT_EQ(CUBLAS_STATUS_SUCCESS, ctx.Init(ws, 32 << 20));
  DeviceArray<float> da(a), db(b), dc(c), dd(m * n);
  const auto a16 = RoundBf16(a), b16 = RoundBf16(b);
  DeviceArray<bf16> da16(ToBf16(a16)), db16(ToBf16(b16));
  auto run = [&](kernels::GemmMode mode) {
    const bool half = mode == kernels::GemmMode::kBF16;
    const void* a_in = half ? static_cast<const void*>(da16.get()) : da.get();
    const void* b_in = half ? static_cast<const void*>(db16.get()) : db.get();
    const kernels::GemmArgs g = kernels::GemmArgs::Product(mode, ta, tb, m, n, k, a_in, ta ? m : k, b_in,
                                                           tb ? k : n, dd.get(), n, kernels::GemmType::kF32)
                                    .PlusC(dc.get());
    dd.Poison();
    EXPECT_EQ(CUBLAS_STATUS_SUCCESS, ctx.Run(g, 0));
    EXPECT_EQ(cudaSuccess, cudaDeviceSynchronize());
    return dd.Download();
  };
  const auto fp32 = run(kernels::GemmMode::kFP32);
  const auto tf32 = run(kernels::GemmMode::kTF32);
  const auto bf = run(kernels::GemmMode::kBF16);
  // fp32 over k = 4096: error ~ sqrt(k) * 2^-24 * |terms| ~ 4e-6 of the rms; tf32 (u = 2^-11)
  // would be ~100x larger, so this bound also proves TF32 is off.
  ExpectClose("gemm fp32", fp32, ref, kFp32Rtol);
  const Comparison c32 = Compare(fp32, ref, 1.0), ctf = Compare(tf32, ref, 1.0);
  EXPECT_GT(ctf.norm_rel, 10 * c32.norm_rel) << "TF32 mode should be visibly less precise than FP32";
  ExpectNormClose("gemm tf32", tf32, ref, 2e-3);  // inputs rounded to tf32: u = 4.9e-4 each
  std::vector<double> ref16(m * n);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double s = c[i * n + j];
      for (int64_t l = 0; l < k; ++l) {
        s += double(ta ? a16[l * m + i] : a16[i * k + l]) * double(tb ? b16[j * k + l] : b16[l * n + j]);
      }
      ref16[i * n + j] = s;
    }
  }
  ExpectClose("gemm bf16 (of bf16-rounded inputs)", bf, ref16, kFp32Rtol);
  cudaFree(ws);
}

INSTANTIATE_TEST_SUITE_P(Transposes, GemmTest,
                         ::testing::Values(std::make_tuple(false, false), std::make_tuple(false, true),
                                           std::make_tuple(true, false), std::make_tuple(true, true)));

// The three products of an nn.Linear layer as the blocks build them (kernels::LinearGemm), against
// float64, at sizes where any swapped dimension or leading dimension shows: y = x W^T, dx = dy W,
// and dW = dy^T x both overwriting and accumulating.
TEST(LinearGemmTest, ForwardAndBackwardProductsMatchFloat64) {
  SKIP_WITHOUT_GPU();
  const int64_t rows = 29, in = 70, out = 45;
  auto x = RandomNormal(rows * in, 71), w = RandomNormal(out * in, 72), dy = RandomNormal(rows * out, 73);
  auto dw0 = RandomNormal(out * in, 74);
  std::vector<double> y_ref(rows * out, 0.0), dx_ref(rows * in, 0.0), dw_ref(out * in, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t o = 0; o < out; ++o) {
      for (int64_t i = 0; i < in; ++i) {
        y_ref[r * out + o] += double(x[r * in + i]) * w[o * in + i];
        dx_ref[r * in + i] += double(dy[r * out + o]) * w[o * in + i];
        dw_ref[o * in + i] += double(dy[r * out + o]) * x[r * in + i];
      }
    }
  }
  std::vector<double> dw_acc_ref(dw_ref);
  for (size_t i = 0; i < dw_acc_ref.size(); ++i) dw_acc_ref[i] += dw0[i];

  void* ws = nullptr;
  CUDA_ASSERT(cudaMalloc(&ws, 32 << 20));
  kernels::GemmContext ctx;
  ASSERT_EQ(CUBLAS_STATUS_SUCCESS, ctx.Init(ws, 32 << 20));
  DeviceArray<float> dx_in(x), dw_in(w), ddy(dy), y(rows * out), dx(rows * in), dw(dw0), dw_acc(dw0);
  y.Poison();
  dx.Poison();
  const kernels::LinearGemm linear{kernels::GemmMode::kFP32, rows, in, out};
  EXPECT_EQ(CUBLAS_STATUS_SUCCESS,
            ctx.Run(linear.Forward(dx_in.get(), dw_in.get(), y.get(), kernels::GemmType::kF32), 0));
  EXPECT_EQ(CUBLAS_STATUS_SUCCESS,
            ctx.Run(linear.BackwardInput(ddy.get(), dw_in.get(), dx.get(), kernels::GemmType::kF32), 0));
  EXPECT_EQ(CUBLAS_STATUS_SUCCESS, ctx.Run(linear.BackwardWeight(ddy.get(), dx_in.get(), dw.get(), false), 0));
  EXPECT_EQ(CUBLAS_STATUS_SUCCESS, ctx.Run(linear.BackwardWeight(ddy.get(), dx_in.get(), dw_acc.get(), true), 0));
  CUDA_ASSERT(cudaDeviceSynchronize());
  ExpectClose("linear y = x W^T", y.Download(), y_ref, kFp32Rtol);
  ExpectClose("linear dx = dy W", dx.Download(), dx_ref, kFp32Rtol);
  ExpectClose("linear dW = dy^T x (overwriting)", dw.Download(), dw_ref, kFp32Rtol);
  ExpectClose("linear dW += dy^T x (accumulating)", dw_acc.Download(), dw_acc_ref, kFp32Rtol);
  cudaFree(ws);
}

}  // namespace
}  // namespace blockd::testing
