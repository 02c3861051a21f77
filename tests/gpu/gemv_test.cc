// The skinny bf16 products (kernels/gemv.cuh) that GemmContext::Run takes for 1 to 4 rows, against
// float64 of the same bf16 inputs: every row count, output columns not a multiple of the block's
// 4, k not a multiple of a warp's 256-element step, and each epilogue a block uses (bf16 or fp32
// out, plus an fp32 residual C, added onto D); and the gate|up product with SwiGLU in its epilogue
// against the product then swiglu.cu, bit for bit. Linked into cuda_ops_test.
//
// Bounds: fp32 outputs elementwise rtol 1e-5 (atol = rtol * max|ref|), as the cuBLASLt products'
// test; bf16 outputs norm-wise 4e-3 (their rounding, at most 2^-9 relative per element).
#include <cuda_bf16.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/gemm.h"
#include "kernels/gemv.cuh"
#include "kernels/swiglu.cuh"
#include "tests/gpu/gpu_test_util.h"

namespace blockd::testing {
namespace {

using bf16 = __nv_bfloat16;
using kernels::GemmType;

class GemvTest : public ::testing::TestWithParam<int64_t> {};

TEST_P(GemvTest, SkinnyProductsMatchFloat64) {
  SKIP_WITHOUT_GPU();
  const int64_t m = GetParam(), n = 37, k = 4104;
  const auto a = RoundBf16(RandomNormal(m * k, 71)), b = RoundBf16(RandomNormal(n * k, 72));
  const auto c = RandomNormal(m * n, 73), d0 = RandomNormal(m * n, 74);
  std::vector<double> prod(m * n);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t l = 0; l < k; ++l) s += double(a[i * k + l]) * double(b[j * k + l]);
      prod[i * n + j] = s;
    }
  }
  void* ws = nullptr;
  CUDA_ASSERT(cudaMalloc(&ws, 1 << 20));
  kernels::GemmContext ctx;
  ASSERT_EQ(CUBLAS_STATUS_SUCCESS, ctx.Init(ws, 1 << 20));
  DeviceArray<bf16> da(ToBf16(a)), db(ToBf16(b));
  DeviceArray<float> dc(c), dd(m * n);
  DeviceArray<bf16> dd16(m * n);
  const kernels::LinearGemm linear{kernels::GemmMode::kBF16, m, k, n};
  auto run = [&](const kernels::GemmArgs& g) {
    EXPECT_TRUE(kernels::gemv_applies(g));
    EXPECT_EQ(CUBLAS_STATUS_SUCCESS, ctx.Run(g, 0));
    EXPECT_EQ(cudaSuccess, cudaDeviceSynchronize());
  };
  auto plus = [&](const std::vector<float>& add) {
    std::vector<double> r(prod);
    for (size_t i = 0; i < r.size(); ++i) r[i] += add[i];
    return r;
  };
  const std::string at = " (" + std::to_string(m) + " rows)";

  dd.Poison();
  run(linear.Forward(da.get(), db.get(), dd.get(), GemmType::kF32));
  ExpectClose("fp32 out" + at, dd.Download(), prod, 1e-5);

  dd.Poison();
  run(linear.Forward(da.get(), db.get(), dd.get(), GemmType::kF32).PlusC(dc.get()));
  ExpectClose("fp32 out plus C" + at, dd.Download(), plus(c), 1e-5);

  dd.Upload(d0);
  run(linear.Forward(da.get(), db.get(), dd.get(), GemmType::kF32).AddedToD(true));
  ExpectClose("added onto D" + at, dd.Download(), plus(d0), 1e-5);

  dd16.Poison();
  run(linear.Forward(da.get(), db.get(), dd16.get(), GemmType::kBF16));
  ExpectNormClose("bf16 out" + at, FromBf16(dd16.Download()), prod, 4e-3);
  cudaFree(ws);
}

TEST_P(GemvTest, SwiGluEpilogueGivesTheBitsOfTheProductThenSwiGlu) {
  SKIP_WITHOUT_GPU();
  const int64_t m = GetParam(), f = 37, k = 1032;  // an odd f: the last block has one gate row
  const auto x = RoundBf16(RandomNormal(m * k, 81)), w = RoundBf16(RandomNormal(2 * f * k, 82, 0.05f));
  void* ws = nullptr;
  CUDA_ASSERT(cudaMalloc(&ws, 1 << 20));
  kernels::GemmContext ctx;
  ASSERT_EQ(CUBLAS_STATUS_SUCCESS, ctx.Init(ws, 1 << 20));
  DeviceArray<bf16> dx(ToBf16(x)), dw(ToBf16(w)), gu(m * 2 * f), h(m * f), gu_fused(m * 2 * f), h_fused(m * f);
  const kernels::LinearGemm up{kernels::GemmMode::kBF16, m, k, 2 * f};
  gu.Poison();
  h.Poison();
  ASSERT_EQ(CUBLAS_STATUS_SUCCESS, ctx.Run(up.Forward(dx.get(), dw.get(), gu.get(), GemmType::kBF16), 0));
  CUDA_ASSERT(kernels::launch_swiglu_fwd<bf16>(gu.get(), h.get(), m, f, 0));
  const kernels::GemmArgs g = up.Forward(dx.get(), dw.get(), gu_fused.get(), GemmType::kBF16);
  ASSERT_TRUE(kernels::gemv_swiglu_applies(g));
  gu_fused.Poison();
  h_fused.Poison();
  CUDA_ASSERT(kernels::launch_gemv_swiglu(g, h_fused.get(), f, 0));
  CUDA_ASSERT(cudaDeviceSynchronize());
  auto bits = [](const std::vector<bf16>& v) {
    std::vector<uint16_t> b(v.size());
    std::memcpy(b.data(), v.data(), v.size() * sizeof(uint16_t));
    return b;
  };
  EXPECT_EQ(bits(gu_fused.Download()), bits(gu.Download())) << "gate|up, " << m << " rows";
  EXPECT_EQ(bits(h_fused.Download()), bits(h.Download())) << "h, " << m << " rows";
  cudaFree(ws);
}

INSTANTIATE_TEST_SUITE_P(Rows, GemvTest, ::testing::Values(int64_t{1}, int64_t{2}, int64_t{3}, int64_t{4}));

TEST(GemvTest, OtherProductsStayWithCublasLt) {
  const kernels::LinearGemm five{kernels::GemmMode::kBF16, 5, 4096, 64};
  alignas(16) static bf16 x[8], w[8];
  EXPECT_FALSE(kernels::gemv_applies(five.Forward(x, w, nullptr, GemmType::kF32)));  // 5 rows
  const kernels::LinearGemm one{kernels::GemmMode::kBF16, 1, 4096, 64};
  EXPECT_TRUE(kernels::gemv_applies(one.Forward(x, w, nullptr, GemmType::kF32)));
  EXPECT_FALSE(kernels::gemv_applies(one.BackwardInput(x, w, nullptr, GemmType::kF32)));  // dy W, not x W^T
  const kernels::LinearGemm fp32{kernels::GemmMode::kFP32, 1, 4096, 64};
  EXPECT_FALSE(kernels::gemv_applies(fp32.Forward(x, w, nullptr, GemmType::kF32)));
  const kernels::LinearGemm odd{kernels::GemmMode::kBF16, 1, 4100, 64};  // k not a multiple of 8
  EXPECT_FALSE(kernels::gemv_applies(odd.Forward(x, w, nullptr, GemmType::kF32)));
  EXPECT_FALSE(kernels::gemv_applies(one.Forward(x + 1, w, nullptr, GemmType::kF32)));  // A not 16-byte aligned
  kernels::GemmArgs scaled = one.Forward(x, w, nullptr, GemmType::kF32);
  scaled.alpha = 0.5f;
  EXPECT_FALSE(kernels::gemv_applies(scaled));
}

}  // namespace
}  // namespace blockd::testing
