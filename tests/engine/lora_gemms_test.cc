// The CUDA block's LoRA products (engine/cuda/lora_gemms.h) without a GPU: each GemmArgs they
// build runs through CBLAS here, and the results must equal the CPU backend's LoRA math
// (engine/cpu/lora.h) target by target: every site, the targets' columns in the site's output and
// in U, a rank (3) that makes every offset odd, the adapters' products added to the output or
// written over their columns, dx written, and gradients written then accumulated. What the
// GPU adds (cuBLASLt's own arithmetic) is checked by tests/gpu/lora_cuda_test.cc.
#include "engine/cuda/lora_gemms.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "engine/cpu/gemm.h"
#include "engine/cpu/lora.h"

namespace blockd::cuda {
namespace {

using Vec = std::vector<float>;

Vec Random(size_t n, std::mt19937_64* rng) {
  std::normal_distribution<float> dist;
  Vec v(n);
  for (float& x : v) x = dist(*rng);
  return v;
}

void RunOnCpu(const std::vector<kernels::GemmArgs>& gs) {
  for (const kernels::GemmArgs& g : gs) {
    ASSERT_EQ(g.c, nullptr) << "the LoRA products add to D in place";
    ASSERT_EQ(g.mode, kernels::GemmMode::kFP32);
    ASSERT_EQ(g.d_type, kernels::GemmType::kF32);
    cpu::Gemm(g.trans_a, g.trans_b, g.m, g.n, g.k, g.alpha, static_cast<const float*>(g.a), g.lda,
              static_cast<const float*>(g.b), g.ldb, g.beta, static_cast<float*>(g.d), g.ldd);
  }
}

void ExpectNear(const Vec& got, const Vec& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double scale = 0;
  for (float w : want) scale = std::max(scale, std::fabs(double(w)));
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_NEAR(got[i], want[i], 1e-5 * scale) << what << " [" << i << "]";
  }
}

// Columns [col, col + out) of x [rows, width].
Vec Columns(const Vec& x, int64_t rows, int64_t width, int64_t col, int64_t out) {
  Vec v;
  for (int64_t r = 0; r < rows; ++r) v.insert(v.end(), x.begin() + r * width + col, x.begin() + r * width + col + out);
  return v;
}
void SetColumns(Vec* x, const Vec& part, int64_t rows, int64_t width, int64_t col, int64_t out) {
  for (int64_t r = 0; r < rows; ++r) {
    std::copy(part.begin() + r * out, part.begin() + (r + 1) * out, x->begin() + r * width + col);
  }
}

// q 16 wide, k and v 8, MLP 24: every site's widths differ.
BlockConfig SmallConfig() {
  BlockConfig c;
  c.hidden_size = 16;
  c.num_attention_heads = 2;
  c.num_kv_heads = 1;
  c.head_dim = 8;
  c.intermediate_size = 24;
  return c;
}

int64_t SiteWidth(LoraSite site, const BlockConfig& c) {
  switch (site) {
    case LoraSite::kQkv: return c.q_dim() + 2 * c.kv_dim();
    case LoraSite::kGateUp: return 2 * c.intermediate_size;
    default: return c.hidden_size;
  }
}

TEST(LoraGemmsTest, EverySiteEqualsTheCpuLoraMath) {
  const BlockConfig c = SmallConfig();
  LoraConfig lora{3, 4.5, {"q_proj", "v_proj", "o_proj", "up_proj", "down_proj"}};
  const int64_t rows = 5, rank = 3, u_ld = LoraUColumns(lora);
  ASSERT_EQ(u_ld, 15);
  const float s = 1.5f;
  std::mt19937_64 rng(11);
  const std::vector<std::pair<LoraSite, int64_t>> want_u_col = {
      {LoraSite::kQkv, 0}, {LoraSite::kO, 6}, {LoraSite::kGateUp, 9}, {LoraSite::kDown, 12}};
  for (const auto& [site, u_col] : want_u_col) {
    SCOPED_TRACE(static_cast<int>(site));
    LoraSiteGemms g;
    g.shape = LoraSiteOf(site, c, lora);
    ASSERT_FALSE(g.empty());
    EXPECT_EQ(g.shape.u_col, u_col);
    const int64_t in = g.shape.in, width = SiteWidth(site, c), k = static_cast<int64_t>(g.shape.targets.size());
    g.rows = rows;
    g.rank = rank;
    g.u_ld = u_ld;
    g.scale = s;
    Vec a = Random(k * rank * in, &rng), da = Random(a.size(), &rng);
    std::vector<Vec> b, db;
    for (const LoraSiteTarget& t : g.shape.targets) {
      b.push_back(Random(t.out * rank, &rng));
      db.push_back(Random(t.out * rank, &rng));
    }
    g.a = a.data();
    g.da = da.data();
    for (size_t j = 0; j < b.size(); ++j) {
      g.b.push_back(b[j].data());
      g.db.push_back(db[j].data());
    }
    const Vec x = Random(rows * in, &rng), y0 = Random(rows * width, &rng), dy = Random(rows * width, &rng),
              dx0 = Random(rows * in, &rng);
    Vec u(rows * u_ld, NAN), du(rows * u_ld, NAN);

    // Added to y, and written over the targets' columns (the others left alone).
    Vec y = y0, y_written = y0;
    RunOnCpu(g.Forward(x.data(), u.data(), y.data(), width, kernels::GemmType::kF32, /*add=*/true));
    RunOnCpu(g.Forward(x.data(), u.data(), y_written.data(), width, kernels::GemmType::kF32, /*add=*/false));
    Vec want_y = y0, want_written = y0;
    for (bool accumulate : {false, true}) {
      Vec dx = dx0;
      const Vec da_before = da;
      std::vector<Vec> db_before = db;
      RunOnCpu(g.Backward(x.data(), u.data(), dy.data(), width, du.data(), dx.data(), kernels::GemmType::kF32,
                          accumulate));
      Vec want_da = accumulate ? da_before : Vec(da.size(), 0.f);
      Vec want_dx_now(dx0.size(), 0.f);  // dx = dU A, overwritten
      for (size_t j = 0; j < g.shape.targets.size(); ++j) {
        const LoraSiteTarget& t = g.shape.targets[j];
        const float* a_j = a.data() + j * rank * in;
        if (!accumulate) {
          Vec yj = Columns(want_y, rows, width, t.col, t.out);
          cpu::LoraForward(x.data(), a_j, b[j].data(), rows, in, t.out, rank, s, yj.data());
          SetColumns(&want_y, yj, rows, width, t.col, t.out);
          Vec only(rows * t.out, 0.f);
          cpu::LoraForward(x.data(), a_j, b[j].data(), rows, in, t.out, rank, s, only.data());
          SetColumns(&want_written, only, rows, width, t.col, t.out);
        }
        Vec want_db = accumulate ? db_before[j] : Vec(db[j].size(), 0.f);
        const Vec dyj = Columns(dy, rows, width, t.col, t.out);
        cpu::LoraBackward(x.data(), a_j, b[j].data(), dyj.data(), rows, in, t.out, rank, s, want_dx_now.data(),
                          want_da.data() + j * rank * in, want_db.data());
        ExpectNear(db[j], want_db, "dB of target " + std::to_string(j));
      }
      ExpectNear(da, want_da, "dA");
      ExpectNear(dx, want_dx_now, "dx");
    }
    ExpectNear(y, want_y, "y");
    ExpectNear(y_written, want_written, "y written");
    EXPECT_EQ(g.Covers(width), site != LoraSite::kQkv && site != LoraSite::kGateUp) << "q|v of q|k|v, up of gate|up";
  }
}

TEST(LoraGemmsTest, SitesWithoutTargetsMakeNoProducts) {
  const BlockConfig c = SmallConfig();
  const LoraConfig lora{2, 2, {"k_proj"}};
  EXPECT_EQ(LoraSiteOf(LoraSite::kQkv, c, lora).targets.size(), 1u);
  EXPECT_EQ(LoraSiteOf(LoraSite::kQkv, c, lora).targets[0].col, 16);
  for (LoraSite site : {LoraSite::kO, LoraSite::kGateUp, LoraSite::kDown}) {
    LoraSiteGemms g;
    g.shape = LoraSiteOf(site, c, lora);
    EXPECT_TRUE(g.empty());
    EXPECT_TRUE(g.Forward(nullptr, nullptr, nullptr, 0, kernels::GemmType::kF32, true).empty());
  }
  EXPECT_EQ(LoraUColumns(LoraConfig{}), 0);
  EXPECT_TRUE(LoraSiteOf(LoraSite::kQkv, c, LoraConfig{}).targets.empty());
}

}  // namespace
}  // namespace blockd::cuda
