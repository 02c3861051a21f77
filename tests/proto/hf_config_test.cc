// BlockConfigFromHf against the shared cases of hf_configs.json (Python's BlockConfig.from_hf is
// held to the same file, word for word), and the proto <-> config mapping both ways.
#include <fstream>

#include <gtest/gtest.h>

#include "proto/config_convert.h"
#include "proto/hf_config.h"
#include "tests/proto/hf_config_cases.h"

namespace blockd {
namespace {

using nlohmann::json;

using testing::HfConfigCases;
using testing::HfConfigOf;

TEST(HfConfig, SharedCases) {
  const json all = HfConfigCases();
  ASSERT_GE(all["cases"].size(), 10u) << HF_CONFIGS_JSON;
  for (const json& c : all["cases"]) {
    const std::string name = c["name"];
    SCOPED_TRACE(name);
    auto got = BlockConfigFromHf(HfConfigOf(all, c));
    if (c.contains("error")) {
      ASSERT_FALSE(got.ok()) << name << " should be refused with: " << c["error"].get<std::string>();
      EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
      EXPECT_EQ(std::string(got.status().message()), c["error"].get<std::string>());
      continue;
    }
    ASSERT_TRUE(got.ok()) << got.status();
    const json& want = c["config"];
    EXPECT_EQ(got->hidden_size, want["hidden_size"].get<int64_t>());
    EXPECT_EQ(got->num_attention_heads, want["num_attention_heads"].get<int64_t>());
    EXPECT_EQ(got->num_kv_heads, want["num_kv_heads"].get<int64_t>());
    EXPECT_EQ(got->head_dim, want["head_dim"].get<int64_t>());
    EXPECT_EQ(got->intermediate_size, want["intermediate_size"].get<int64_t>());
    EXPECT_EQ(got->rms_norm_eps, want["rms_norm_eps"].get<double>());
    EXPECT_EQ(got->rope_theta, want["rope_theta"].get<double>());
    EXPECT_EQ(got->qk_norm, want["qk_norm"].get<bool>());
    EXPECT_EQ(got->attention_bias, want.value("attention_bias", false));
    const json rope = want.value("rope_scaling", json::object());
    EXPECT_EQ(got->rope_scaling.rope_type, rope.value("rope_type", ""));
    EXPECT_EQ(got->rope_scaling.factor, rope.value("factor", 0.0));
    EXPECT_EQ(got->rope_scaling.low_freq_factor, rope.value("low_freq_factor", 0.0));
    EXPECT_EQ(got->rope_scaling.high_freq_factor, rope.value("high_freq_factor", 0.0));
    EXPECT_EQ(got->rope_scaling.original_max_position_embeddings,
              rope.value("original_max_position_embeddings", int64_t{0}));
    EXPECT_EQ(got->rope_scaling.attention_factor, rope.value("attention_factor", 0.0));
    EXPECT_EQ(got->rope_scaling.beta_fast, rope.value("beta_fast", 0.0));
    EXPECT_EQ(got->rope_scaling.beta_slow, rope.value("beta_slow", 0.0));
    EXPECT_TRUE(ValidateBlockConfig(*got).ok()) << ValidateBlockConfig(*got);
  }
}

TEST(HfConfig, NumLayersAndFiles) {
  const json all = HfConfigCases();
  auto n = HfNumLayers(all["base"]);
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(*n, 3);
  json none = all["base"];
  none.erase("num_hidden_layers");
  EXPECT_EQ(HfNumLayers(none).status().message(), "config.json has no num_hidden_layers");
  EXPECT_EQ(ReadHfConfig("/nonexistent/config.json").status().code(), absl::StatusCode::kNotFound);
  const std::string path = ::testing::TempDir() + "/hf_config_test_list.json";
  std::ofstream(path) << "[1, 2]";
  EXPECT_EQ(ReadHfConfig(path).status().message(), path + " is not a JSON object");
}

TEST(ConfigConvert, RoundTripAndPrecisionNames) {
  BlockConfig c;
  c.hidden_size = 96;
  c.num_attention_heads = 6;
  c.num_kv_heads = 3;
  c.head_dim = 20;
  c.intermediate_size = 200;
  c.rms_norm_eps = 3e-6;
  c.rope_theta = 123456.5;
  c.qk_norm = true;
  const v1::BlockConfig wire = ToProto(c);
  EXPECT_EQ(wire.head_dim(), 20);
  EXPECT_EQ(wire.rope_theta(), 123456.5);
  EXPECT_FALSE(wire.has_rope_scaling()) << "plain RoPE leaves the message unset";
  EXPECT_TRUE(FromProto(wire) == c) << wire.DebugString();
  c.attention_bias = true;
  c.rope_scaling = {"yarn", 4.0, 0.5, 2.5, 32768, 1.25, 16, 2};
  const v1::BlockConfig scaled = ToProto(c);
  EXPECT_TRUE(scaled.attention_bias());
  EXPECT_EQ(scaled.rope_scaling().original_max_position_embeddings(), 32768);
  EXPECT_EQ(scaled.rope_scaling().beta_slow(), 2);
  EXPECT_TRUE(FromProto(scaled) == c) << scaled.DebugString();

  for (Precision p : {Precision::kFP32, Precision::kTF32, Precision::kBF16}) {
    auto back = FromProto(ToProto(p));
    ASSERT_TRUE(back.ok());
    EXPECT_EQ(**back, p);
    auto parsed = ParsePrecisionName(PrecisionName(ToProto(p)));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, ToProto(p)) << PrecisionName(p);
  }
  EXPECT_FALSE(FromProto(v1::PRECISION_UNSPECIFIED)->has_value());
  EXPECT_EQ(FromProto(static_cast<v1::Precision>(9)).status().message(), "precision = 9 is not a Precision");
  EXPECT_EQ(PrecisionName(v1::PRECISION_UNSPECIFIED), "default");
  EXPECT_EQ(*ParsePrecisionName("BF16"), v1::PRECISION_BF16);
  EXPECT_EQ(*ParsePrecisionName(""), v1::PRECISION_UNSPECIFIED);
  EXPECT_EQ(ParsePrecisionName("fp64").status().message(), "--precision=fp64: expected fp32, tf32 or bf16");
}

}  // namespace
}  // namespace blockd
