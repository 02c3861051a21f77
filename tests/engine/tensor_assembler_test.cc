// engine/tensor_assembler.h, and the parameter table it validates against (base/block_config.h):
// chunks in any order and size assemble to the exact bytes; every bad chunk is refused with a
// message naming the tensor, and leaves the assembler as it was.
#include "engine/tensor_assembler.h"

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "base/block_config.h"
#include "gtest/gtest.h"
#include "tests/engine/test_util.h"

namespace blockd {
namespace {

using ::blockd::testing::Rand;
using ::blockd::testing::TestSeed;

BlockConfig SmallConfig(bool qk_norm) {
  BlockConfig c;
  c.hidden_size = 8;
  c.num_attention_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 2;
  c.intermediate_size = 12;
  c.qk_norm = qk_norm;
  return c;
}

::testing::AssertionResult Refused(const absl::Status& s, absl::string_view needle) {
  if (s.code() == absl::StatusCode::kInvalidArgument &&
      absl::string_view(s.message()).find(needle) != absl::string_view::npos) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "got " << s << ", expected INVALID_ARGUMENT containing \"" << needle << "\"";
}

std::string RandomBytes(Rand& rng, size_t n) {
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng.Bits32());
  return s;
}

TEST(BlockConfigTest, ParamsFollowHuggingFaceNamesAndShapes) {
  const BlockConfig c = SmallConfig(true);
  ASSERT_TRUE(ValidateBlockConfig(c).ok());
  const std::vector<ParamSpec> p = BlockParams(c);
  const std::vector<std::pair<std::string, std::vector<int64_t>>> want = {
      {"input_layernorm.weight", {8}},      {"self_attn.q_proj.weight", {8, 8}},
      {"self_attn.k_proj.weight", {4, 8}},  {"self_attn.v_proj.weight", {4, 8}},
      {"self_attn.o_proj.weight", {8, 8}},  {"self_attn.q_norm.weight", {2}},
      {"self_attn.k_norm.weight", {2}},     {"post_attention_layernorm.weight", {8}},
      {"mlp.gate_proj.weight", {12, 8}},    {"mlp.up_proj.weight", {12, 8}},
      {"mlp.down_proj.weight", {8, 12}}};
  ASSERT_EQ(p.size(), want.size());
  int64_t total = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    EXPECT_EQ(p[i].name, want[i].first);
    EXPECT_EQ(p[i].shape, want[i].second) << p[i].name;
    EXPECT_EQ(p[i].is_matrix, want[i].second.size() == 2) << p[i].name;
    EXPECT_EQ(FindParam(p, want[i].first), static_cast<int>(i));
    total += p[i].numel();
  }
  EXPECT_EQ(ParameterCount(c), total);
  EXPECT_EQ(FindParam(p, "mlp.gate.weight"), -1);
  const std::vector<ParamSpec> plain = BlockParams(SmallConfig(false));
  EXPECT_EQ(plain.size(), 9u);
  EXPECT_EQ(FindParam(plain, "self_attn.q_norm.weight"), -1);
  EXPECT_EQ(plain[5].id, ParamId::kPostNorm);
  EXPECT_EQ(ShapeString({2, 7, 64}), "[2,7,64]");
  EXPECT_EQ(ShapeString({}), "[]");
}

class TensorAssemblerTest : public ::testing::Test {
 protected:
  TensorAssemblerTest() : rng_(TestSeed(700)), params_(BlockParams(SmallConfig(true))) {
    up_ = RandomBytes(rng_, 12 * 8 * 4);    // mlp.up_proj.weight, float32
    norm_ = RandomBytes(rng_, 8 * 2);       // input_layernorm.weight, bfloat16
  }
  absl::Status AddUp(TensorAssembler& a, int64_t offset, int64_t len, const std::string* src = nullptr) {
    const std::string& s = src != nullptr ? *src : up_;
    return a.Add("mlp.up_proj.weight", DType::kFloat32, {12, 8}, offset, s.data() + std::max<int64_t>(offset, 0),
                 static_cast<size_t>(len));
  }
  Rand rng_;
  std::vector<ParamSpec> params_;
  std::string up_, norm_;
};

TEST_F(TensorAssemblerTest, AssemblesChunksInAnyOrderAndSize) {
  for (int trial = 0; trial < 20; ++trial) {
    TensorAssembler a("b0", params_);
    // Random cut points, including empty chunks, delivered in random order.
    std::vector<int64_t> cuts = {0, static_cast<int64_t>(up_.size())};
    for (int i = 0; i < 6; ++i) cuts.push_back(rng_.Int(0, static_cast<int64_t>(up_.size())));
    std::sort(cuts.begin(), cuts.end());
    std::vector<std::pair<int64_t, int64_t>> chunks;
    for (size_t i = 0; i + 1 < cuts.size(); ++i) chunks.emplace_back(cuts[i], cuts[i + 1] - cuts[i]);
    std::shuffle(chunks.begin(), chunks.end(), rng_.gen());
    for (auto [offset, len] : chunks) ASSERT_TRUE(AddUp(a, offset, len).ok()) << offset << "+" << len;
    ASSERT_TRUE(a.Add("input_layernorm.weight", DType::kBFloat16, {8}, 8, norm_.data() + 8, 8).ok());
    ASSERT_TRUE(a.Add("input_layernorm.weight", DType::kBFloat16, {8}, 0, norm_.data(), 8).ok());
    EXPECT_EQ(a.bytes_staged(), static_cast<int64_t>(up_.size() + norm_.size()));
    auto tensors = a.Finish();
    ASSERT_TRUE(tensors.ok()) << tensors.status();
    ASSERT_EQ(tensors->size(), 2u);
    // In parameter order.
    EXPECT_EQ((*tensors)[0].index, FindParam(params_, "input_layernorm.weight"));
    EXPECT_EQ((*tensors)[0].dtype, DType::kBFloat16);
    EXPECT_EQ((*tensors)[0].bytes, norm_);
    EXPECT_EQ((*tensors)[1].index, FindParam(params_, "mlp.up_proj.weight"));
    EXPECT_EQ((*tensors)[1].dtype, DType::kFloat32);
    EXPECT_EQ((*tensors)[1].bytes, up_) << "trial " << trial;
    EXPECT_EQ(a.bytes_staged(), 0);
  }
}

TEST_F(TensorAssemblerTest, RefusesBadChunksAndStaysUsable) {
  TensorAssembler a("b7", params_);
  const std::string garbage = RandomBytes(rng_, up_.size());
  EXPECT_TRUE(Refused(a.Add("mlp.up.weight", DType::kFloat32, {12, 8}, 0, up_.data(), 4),
                      "block b7 has no tensor \"mlp.up.weight\"; expected one of: input_layernorm.weight"));
  EXPECT_TRUE(Refused(a.Add("mlp.up_proj.weight", DType::kFloat32, {8, 12}, 0, up_.data(), 4),
                      "tensor mlp.up_proj.weight shape [8,12], block b7 expects [12,8]"));
  ASSERT_TRUE(AddUp(a, 64, 64).ok());  // [64, 128)
  EXPECT_TRUE(Refused(a.Add("mlp.up_proj.weight", DType::kBFloat16, {12, 8}, 0, up_.data(), 4),
                      "dtype bfloat16 differs from its earlier chunks' float32"));
  EXPECT_TRUE(Refused(AddUp(a, -4, 8, &garbage), "outside the tensor's 384 bytes"));
  EXPECT_TRUE(Refused(AddUp(a, 380, 8, &garbage), "outside the tensor's 384 bytes"));
  EXPECT_TRUE(Refused(AddUp(a, 0, 400, &garbage), "outside"));
  EXPECT_TRUE(Refused(a.Add("mlp.up_proj.weight", DType::kFloat32, {12, 8}, INT64_MAX - 2, garbage.data(), 8),
                      "outside the tensor's 384 bytes"));  // offset + size overflows int64
  EXPECT_TRUE(Refused(AddUp(a, 32, 40, &garbage), "chunk [32, 72) overlaps an earlier chunk [64, 128)"));
  EXPECT_TRUE(Refused(AddUp(a, 120, 16, &garbage), "chunk [120, 136) overlaps an earlier chunk [64, 128)"));
  EXPECT_TRUE(Refused(AddUp(a, 64, 64, &garbage), "overlaps"));
  EXPECT_TRUE(Refused(AddUp(a, 80, 8, &garbage), "overlaps"));
  EXPECT_TRUE(Refused(AddUp(a, 0, 384, &garbage), "overlaps"));
  // Chunks that touch the received range are fine; a gap is reported by Finish.
  ASSERT_TRUE(AddUp(a, 0, 64).ok());
  ASSERT_TRUE(AddUp(a, 128, 128).ok());
  EXPECT_TRUE(Refused(a.Finish().status(), "tensor mlp.up_proj.weight is incomplete: 256 of 384 bytes received"));

  TensorAssembler b("b7", params_);
  ASSERT_TRUE(AddUp(b, 64, 64).ok());
  EXPECT_TRUE(Refused(AddUp(b, 32, 40, &garbage), "overlaps"));
  ASSERT_TRUE(AddUp(b, 0, 64).ok());
  ASSERT_TRUE(AddUp(b, 128, 256).ok());
  auto tensors = b.Finish();
  ASSERT_TRUE(tensors.ok()) << tensors.status();
  EXPECT_EQ((*tensors)[0].bytes, up_) << "a refused chunk must not have been copied in";
}

TEST_F(TensorAssemblerTest, FinishNeedsAtLeastOneTensor) {
  TensorAssembler a("b0", params_);
  EXPECT_TRUE(Refused(a.Finish().status(), "LoadWeights for block b0 carried no tensors"));
}

}  // namespace
}  // namespace blockd
