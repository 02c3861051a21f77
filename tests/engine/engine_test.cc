// The Engine over the CPU backend: block lifecycle and its errors, budgets, weight loading through a
// TensorAssembler, dtypes on the way in and out, and seeded initialisation. Spans and activation
// handles (Forward, Backward, consumption, TTL, deletion, per-client limits) are in
// engine_span_test.cc; training (gradients, Step, clipping, checkpoints) in engine_train_test.cc.
#include "engine/engine.h"

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

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

// ------------------------------------------------------------------------------------ lifecycle

TEST_F(EngineTest, CreateGetListDelete) {
  const BlockConfig c = Config(/*qk_norm=*/true);
  ASSERT_OK(Create("b0", c, 7));
  ASSERT_OK(Create("layers.1/attn:x-y_Z", Config(false), 8));  // every allowed character class

  auto info = engine_->GetBlock("b0");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->spec.id, "b0");
  EXPECT_TRUE(info->spec.config == c);
  EXPECT_EQ(info->spec.layer_index, 3);
  EXPECT_EQ(info->spec.max_seq_len, 16);
  EXPECT_EQ(info->spec.precision, Precision::kFP32);
  // 16 + 256 (q) + 128 (k) + 128 (v) + 256 (o) + 4 + 4 (q/k norm) + 16 + 3 * 512 (MLP).
  EXPECT_EQ(info->parameter_count, 2344);
  EXPECT_EQ(info->memory_bytes, 2344 * 4 * 4) << "CPU blocks hold weights, gradients and two moments in fp32";
  EXPECT_TRUE(info->weights_loaded);
  EXPECT_TRUE(info->missing_weights.empty());
  EXPECT_FALSE(info->has_gradients);
  EXPECT_EQ(info->step, 0);
  EXPECT_EQ(engine_->GetBlock("layers.1/attn:x-y_Z")->parameter_count, 2336);

  std::vector<std::string> ids;
  for (const BlockInfo& i : engine_->ListBlocks()) ids.push_back(i.spec.id);
  EXPECT_EQ(ids, (std::vector<std::string>{"b0", "layers.1/attn:x-y_Z"}));
  EXPECT_EQ(engine_->BlockIds(), ids);

  const TensorMap before = Read("b0", TensorKind::kWeights);
  EXPECT_TRUE(HasError(Create("b0", c, 9), StatusCode::kAlreadyExists, "b0"));
  const TensorMap after = Read("b0", TensorKind::kWeights);
  for (const auto& [name, w] : before) EXPECT_TRUE(BitwiseEqual(name + " after a duplicate create", after.at(name), w));
  EXPECT_EQ(MemoryUsed(), BlockBytes(c) + BlockBytes(Config(false)));

  auto deleted = engine_->DeleteBlock("b0");
  ASSERT_TRUE(deleted.ok()) << deleted.status();
  EXPECT_EQ(*deleted, 0);
  EXPECT_TRUE(HasError(engine_->GetBlock("b0").status(), StatusCode::kNotFound, "b0"));
  EXPECT_TRUE(HasError(engine_->DeleteBlock("b0").status(), StatusCode::kNotFound, "b0"));
  EXPECT_EQ(engine_->ListBlocks().size(), 1u);
  EXPECT_EQ(engine_->Stats().blocks, 1);
  EXPECT_EQ(MemoryUsed(), BlockBytes(Config(false)));
}

struct BadCreate {
  std::string what;
  std::function<void(CreateBlockParams*)> mutate;
  StatusCode code;
  std::string needle;  // the field the message must name
};

TEST_F(EngineTest, CreateRejectsBadIdsConfigsAndPrecisionsNamingTheField) {
  const std::vector<BadCreate> cases = {
      {"empty id", [](auto* p) { p->spec.id = ""; }, StatusCode::kInvalidArgument, "block_id"},
      {"space in id", [](auto* p) { p->spec.id = "a b"; }, StatusCode::kInvalidArgument, "block_id"},
      {"129-char id", [](auto* p) { p->spec.id = std::string(129, 'a'); }, StatusCode::kInvalidArgument, "block_id"},
      {"hidden 0", [](auto* p) { p->spec.config.hidden_size = 0; }, StatusCode::kInvalidArgument, "hidden_size"},
      {"heads 0", [](auto* p) { p->spec.config.num_attention_heads = 0; }, StatusCode::kInvalidArgument,
       "num_attention_heads"},
      {"kv 3 of 4", [](auto* p) { p->spec.config.num_kv_heads = 3; }, StatusCode::kInvalidArgument, "num_kv_heads"},
      {"odd head_dim", [](auto* p) { p->spec.config.head_dim = 5; }, StatusCode::kInvalidArgument, "head_dim"},
      {"intermediate 0", [](auto* p) { p->spec.config.intermediate_size = 0; }, StatusCode::kInvalidArgument,
       "intermediate_size"},
      {"eps negative", [](auto* p) { p->spec.config.rms_norm_eps = -1e-6; }, StatusCode::kInvalidArgument,
       "rms_norm_eps"},
      {"eps NaN", [](auto* p) { p->spec.config.rms_norm_eps = std::nan(""); }, StatusCode::kInvalidArgument,
       "rms_norm_eps"},
      {"theta 1", [](auto* p) { p->spec.config.rope_theta = 1; }, StatusCode::kInvalidArgument, "rope_theta"},
      {"theta inf", [](auto* p) { p->spec.config.rope_theta = INFINITY; }, StatusCode::kInvalidArgument,
       "rope_theta"},
      {"rope dynamic", [](auto* p) { p->spec.config.rope_scaling = {"dynamic", 2.0, 0, 0, 0, 0, 0, 0}; },
       StatusCode::kInvalidArgument, "config.rope_scaling.rope_type = \"dynamic\", expected default, linear, llama3 or yarn"},
      {"linear factor 0", [](auto* p) { p->spec.config.rope_scaling = {"linear", 0, 0, 0, 0, 0, 0, 0}; },
       StatusCode::kInvalidArgument, "config.rope_scaling.factor = 0, expected a finite number > 0 for rope_type linear"},
      {"llama3 no context", [](auto* p) { p->spec.config.rope_scaling = {"llama3", 8.0, 1.0, 4.0, 0, 0, 0, 0}; },
       StatusCode::kInvalidArgument, "config.rope_scaling.original_max_position_embeddings = 0"},
      {"llama3 high <= low", [](auto* p) { p->spec.config.rope_scaling = {"llama3", 8.0, 4.0, 1.0, 8192, 0, 0, 0}; },
       StatusCode::kInvalidArgument, "config.rope_scaling.high_freq_factor = 1 must exceed low_freq_factor = 4"},
      {"yarn beta NaN", [](auto* p) { p->spec.config.rope_scaling = {"yarn", 4.0, 0, 0, 4096, 0, std::nan(""), 0}; },
       StatusCode::kInvalidArgument, "config.rope_scaling.beta_fast = nan"},
      {"layer -1", [](auto* p) { p->spec.layer_index = -1; }, StatusCode::kInvalidArgument, "layer_index"},
      {"max_seq_len -2", [](auto* p) { p->spec.max_seq_len = -2; }, StatusCode::kInvalidArgument, "max_seq_len"},
      {"max_batch 1e5", [](auto* p) { p->spec.max_batch_size = 100000; }, StatusCode::kInvalidArgument,
       "max_batch_size"},
      {"device 1", [](auto* p) { p->spec.device = 1; }, StatusCode::kInvalidArgument, "device 1"},
      {"bf16", [](auto* p) { p->precision = Precision::kBF16; }, StatusCode::kUnimplemented, "bf16"},
      {"tf32", [](auto* p) { p->precision = Precision::kTF32; }, StatusCode::kUnimplemented, "tf32"},
  };
  for (const BadCreate& c : cases) {
    CreateBlockParams p;
    p.spec = Spec("b0", Config(true));
    p.seed = 1;
    c.mutate(&p);
    EXPECT_TRUE(HasError(engine_->CreateBlock(p).status(), c.code, c.needle)) << c.what;
  }
  EXPECT_TRUE(engine_->ListBlocks().empty());
  EXPECT_EQ(MemoryUsed(), 0);

  CreateBlockParams fp32;
  fp32.spec = Spec("b0", Config(true));
  fp32.precision = Precision::kFP32;
  fp32.seed = 1;
  EXPECT_OK(engine_->CreateBlock(fp32).status());
}

TEST_F(EngineTest, MemoryBudgetAndMaxBlocksAreEnforced) {
  const BlockConfig c = Config(false);
  EngineOptions o;
  o.memory_budget_bytes = BlockBytes(c) * 3 / 2;
  Reset(o);
  ASSERT_OK(Create("b0", c, 1));
  EXPECT_TRUE(HasError(Create("b1", c, 1), StatusCode::kResourceExhausted, "block b1"));
  EXPECT_TRUE(HasError(engine_->GetBlock("b1").status(), StatusCode::kNotFound, "b1"));
  EXPECT_EQ(MemoryUsed(), BlockBytes(c));
  EXPECT_EQ(engine_->Stats().memory_budget[0], BlockBytes(c) * 3 / 2);
  ASSERT_OK(engine_->DeleteBlock("b0").status());
  EXPECT_EQ(MemoryUsed(), 0);
  EXPECT_OK(Create("b1", c, 1));

  o.memory_budget_bytes = 0;
  o.max_blocks = 2;
  Reset(o);
  ASSERT_OK(Create("b0", c, 1));
  ASSERT_OK(Create("b1", c, 1));
  EXPECT_TRUE(HasError(Create("b2", c, 1), StatusCode::kResourceExhausted, "max_blocks"));
  EXPECT_EQ(engine_->ListBlocks().size(), 2u);
}

TEST_F(EngineTest, KeptActivationsCountAgainstTheBudget) {
  const BlockConfig c = Config(true);
  // What the CPU backend keeps for one block at [kBatch, kSeq]: all of BlockActivations<float>.
  const ref::BlockWeights w = ToRef(c, RandomWeights(c));
  std::array<std::vector<float>, kNumParamIds> wf;
  cpu::BlockParamPtrs<const float> ptrs;
  for (int i = 0; i < kNumParamIds; ++i) {
    wf[i] = Cast<float>(w[i]);
    ptrs.p[i] = wf[i].empty() ? nullptr : wf[i].data();
  }
  const std::vector<float> x = RandomActivation(16);
  std::vector<float> y(x.size());
  cpu::BlockActivations<float> acts;
  cpu::BlockForward(c, ptrs, x.data(), kBatch, kSeq, 0, y.data(), &acts);
  const int64_t saved = static_cast<int64_t>(acts.bytes());

  EngineOptions o;
  o.memory_budget_bytes = 2 * BlockBytes(c) + saved + saved / 2;
  Reset(o);
  ASSERT_OK(Create("b0", c, 3));
  ASSERT_OK(Create("b1", c, 4));
  auto f1 = Forward({"b0"}, x, kBatch, kSeq, /*keep=*/true);
  ASSERT_TRUE(f1.ok()) << f1.status();
  EXPECT_EQ(MemoryUsed(), 2 * BlockBytes(c) + saved) << "the handle reserves exactly what the backend keeps";
  EXPECT_EQ(engine_->Stats().activations_held, 1);
  EXPECT_TRUE(HasError(Forward({"b0"}, x, kBatch, kSeq, true).status(), StatusCode::kResourceExhausted,
                       "activations"));
  // A Forward that keeps nothing still builds one block's activations while it runs.
  EXPECT_TRUE(HasError(Forward({"b0"}, x, kBatch, kSeq, false).status(), StatusCode::kResourceExhausted,
                       "working memory"));
  ASSERT_TRUE(Backward(f1->activation_id, RandomActivation(16), kBatch, kSeq).ok());
  EXPECT_EQ(MemoryUsed(), 2 * BlockBytes(c));
  auto no_keep = Forward({"b0"}, x, kBatch, kSeq, /*keep=*/false);
  ASSERT_TRUE(no_keep.ok()) << no_keep.status();
  EXPECT_TRUE(no_keep->activation_id.empty());
  EXPECT_TRUE(BitwiseEqual("output without keep_activations", no_keep->out, f1->out));
  EXPECT_EQ(MemoryUsed(), 2 * BlockBytes(c)) << "working memory is given back when the call returns";
  // Over a span, kept activations add up (2 x saved does not fit), working memory does not.
  EXPECT_OK(Forward({"b0", "b1"}, x, kBatch, kSeq, false).status());
  EXPECT_TRUE(HasError(Forward({"b0", "b1"}, x, kBatch, kSeq, true).status(), StatusCode::kResourceExhausted,
                       "activations"));
  EXPECT_OK(Forward({"b0"}, x, kBatch, kSeq, true).status());
}

// ------------------------------------------------------------------------------------ weights

TEST_F(EngineTest, ForwardBeforeWeightsAreLoadedFailsPrecondition) {
  const BlockConfig c = Config(true);
  ASSERT_OK(Create("b0", c, std::nullopt));
  auto info = engine_->GetBlock("b0");
  ASSERT_TRUE(info.ok());
  EXPECT_FALSE(info->weights_loaded);
  std::vector<std::string> all;
  for (const ParamSpec& p : BlockParams(c)) all.push_back(p.name);
  EXPECT_EQ(info->missing_weights, all);
  const std::vector<float> x = RandomActivation(16);
  EXPECT_TRUE(HasError(Forward({"b0"}, x, kBatch, kSeq, false).status(), StatusCode::kFailedPrecondition,
                       "self_attn.q_norm.weight"));

  TensorMap w = RandomWeights(c);
  TensorMap all_but_down = w;
  all_but_down.erase("mlp.down_proj.weight");
  ASSERT_OK(Load("b0", all_but_down));
  EXPECT_EQ(engine_->GetBlock("b0")->missing_weights, std::vector<std::string>{"mlp.down_proj.weight"});
  EXPECT_TRUE(HasError(Forward({"b0"}, x, kBatch, kSeq, true).status(), StatusCode::kFailedPrecondition,
                       "mlp.down_proj.weight"));
  EXPECT_EQ(engine_->Stats().activations_held, 0);
  ASSERT_OK(Load("b0", {{"mlp.down_proj.weight", w.at("mlp.down_proj.weight")}}));
  EXPECT_TRUE(engine_->GetBlock("b0")->weights_loaded);
  EXPECT_OK(Forward({"b0"}, x, kBatch, kSeq, false).status());
}

TEST_F(EngineTest, LoadWeightsAssemblesChunksInAnyOrderAndDtype) {
  const BlockConfig c = Config(true);
  ASSERT_OK(Create("b0", c, std::nullopt));
  const TensorMap w = RandomWeights(c);
  ASSERT_OK(Load("b0", w, /*chunk_bytes=*/7));  // chunks that split floats, delivered last first
  const TensorMap got = Read("b0", TensorKind::kWeights);
  ASSERT_EQ(got.size(), w.size());
  for (const auto& [name, values] : w) EXPECT_TRUE(BitwiseEqual(name + " loaded in 7-byte chunks", got.at(name), values));

  // bfloat16 and float16 tensors are widened to fp32 exactly.
  auto params = engine_->BlockParamsOf("b0");
  ASSERT_TRUE(params.ok());
  TensorAssembler a("b0", *params);
  const std::vector<float> up = w.at("mlp.up_proj.weight"), gate = w.at("mlp.gate_proj.weight");
  std::vector<uint16_t> up_bf16(up.size()), gate_f16(gate.size());
  std::vector<float> up_want(up.size()), gate_want(gate.size());
  for (size_t i = 0; i < up.size(); ++i) {
    up_bf16[i] = RefBFloat16Bits(-up[i]);
    const uint32_t bits = static_cast<uint32_t>(up_bf16[i]) << 16;
    std::memcpy(&up_want[i], &bits, 4);
    gate_f16[i] = Float32ToFloat16(gate[i]);
    gate_want[i] = Float16ToFloat32(gate_f16[i]);
  }
  ASSERT_OK(a.Add("mlp.up_proj.weight", DType::kBFloat16, {32, 16}, 0, up_bf16.data(), up_bf16.size() * 2));
  ASSERT_OK(a.Add("mlp.gate_proj.weight", DType::kFloat16, {32, 16}, 100, reinterpret_cast<char*>(gate_f16.data()) + 100,
                  gate_f16.size() * 2 - 100));
  ASSERT_OK(a.Add("mlp.gate_proj.weight", DType::kFloat16, {32, 16}, 0, gate_f16.data(), 100));
  auto tensors = a.Finish();
  ASSERT_TRUE(tensors.ok()) << tensors.status();
  auto loaded = engine_->LoadWeights("b0", std::move(*tensors));
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(*loaded, (std::vector<std::string>{"mlp.gate_proj.weight", "mlp.up_proj.weight"}));
  const TensorMap got2 = Read("b0", TensorKind::kWeights);
  EXPECT_TRUE(BitwiseEqual("up_proj loaded as bfloat16", got2.at("mlp.up_proj.weight"), up_want));
  EXPECT_TRUE(BitwiseEqual("gate_proj loaded as float16", got2.at("mlp.gate_proj.weight"), gate_want));
  EXPECT_TRUE(BitwiseEqual("down_proj untouched", got2.at("mlp.down_proj.weight"), w.at("mlp.down_proj.weight")));
}

TEST_F(EngineTest, RejectedLoadsChangeNothing) {
  const BlockConfig c = Config(true);
  ASSERT_OK(Create("b0", c, std::nullopt));
  ASSERT_OK(Create("fresh", c, std::nullopt));
  ASSERT_OK(Load("b0", RandomWeights(c)));
  const TensorMap before = Read("b0", TensorKind::kWeights);
  const std::vector<ParamSpec> params = *engine_->BlockParamsOf("b0");
  const TensorMap next = RandomWeights(c);
  const std::vector<float>& up = next.at("mlp.up_proj.weight");
  auto check_unchanged = [&](const std::string& what) {
    const TensorMap now = Read("b0", TensorKind::kWeights);
    for (const auto& [name, w] : before) EXPECT_TRUE(BitwiseEqual(name + " after " + what, now.at(name), w));
    EXPECT_TRUE(engine_->GetBlock("b0")->weights_loaded);
  };

  {  // A name the block does not have: the message lists what it expected.
    TensorAssembler a("b0", params);
    EXPECT_TRUE(HasError(a.Add("mlp.gate.weight", DType::kFloat32, {32, 16}, 0, up.data(), 64),
                         StatusCode::kInvalidArgument, "no tensor \"mlp.gate.weight\""));
    EXPECT_TRUE(HasError(a.Add("mlp.gate.weight", DType::kFloat32, {32, 16}, 0, up.data(), 64),
                         StatusCode::kInvalidArgument, "mlp.up_proj.weight"));
  }
  {  // The transposed shape.
    TensorAssembler a("b0", params);
    EXPECT_TRUE(HasError(a.Add("mlp.up_proj.weight", DType::kFloat32, {16, 32}, 0, up.data(), 64),
                         StatusCode::kInvalidArgument, "expects [32,16]"));
  }
  {  // Overlapping chunks: [0, 64) then [32, 96).
    TensorAssembler a("b0", params);
    ASSERT_OK(a.Add("mlp.up_proj.weight", DType::kFloat32, {32, 16}, 0, up.data(), 64));
    EXPECT_TRUE(HasError(a.Add("mlp.up_proj.weight", DType::kFloat32, {32, 16}, 32,
                               reinterpret_cast<const char*>(up.data()) + 32, 64),
                         StatusCode::kInvalidArgument, "overlaps"));
  }
  {  // A gap: [0, 64) and [128, end).
    TensorAssembler a("b0", params);
    ASSERT_OK(a.Add("mlp.up_proj.weight", DType::kFloat32, {32, 16}, 0, up.data(), 64));
    ASSERT_OK(a.Add("mlp.up_proj.weight", DType::kFloat32, {32, 16}, 128, reinterpret_cast<const char*>(up.data()) + 128,
                    up.size() * 4 - 128));
    EXPECT_TRUE(HasError(a.Finish().status(), StatusCode::kInvalidArgument, "incomplete"));
  }
  // Non-finite values in the second of two complete tensors: neither is written.
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    TensorMap two = {{"mlp.down_proj.weight", next.at("mlp.down_proj.weight")}, {"mlp.up_proj.weight", up}};
    two["mlp.up_proj.weight"][77] = bad;
    EXPECT_TRUE(HasError(Load("b0", two), StatusCode::kInvalidArgument, "mlp.up_proj.weight"));
    check_unchanged("a load with a non-finite value");
    EXPECT_TRUE(HasError(Load("fresh", two), StatusCode::kInvalidArgument, "non-finite"));
    EXPECT_EQ(engine_->GetBlock("fresh")->missing_weights.size(), params.size());
  }
  check_unchanged("rejected chunks");
  EXPECT_TRUE(HasError(Load("nope", next), StatusCode::kNotFound, "nope"));
}

// BUG (engine.cc, reported): LoadWeights trusts AssembledTensor::index and the byte count. If the
// block is deleted and recreated with another config between BlockParamsOf and LoadWeights (as a
// LoadWeights stream racing DeleteBlock + CreateBlock can), it reads past the staged bytes (a heap
// over-read under ASan) or indexes past the parameter table. Enable once fixed.
TEST_F(EngineTest, LoadWeightsRefusesTensorsStagedForAnotherIncarnation) {
  BlockConfig c = Config(false);
  ASSERT_OK(Create("b0", c, 1));
  auto params = engine_->BlockParamsOf("b0");
  ASSERT_TRUE(params.ok());
  TensorAssembler a("b0", *params);
  const std::vector<float> down = RandomWeights(c).at("mlp.down_proj.weight");
  ASSERT_OK(a.Add("mlp.down_proj.weight", DType::kFloat32, {16, 32}, 0, down.data(), down.size() * 4));
  auto staged = a.Finish();
  ASSERT_TRUE(staged.ok());
  ASSERT_OK(engine_->DeleteBlock("b0").status());
  c.intermediate_size = 64;  // down_proj is now [16, 64]
  ASSERT_OK(Create("b0", c, 1));
  const TensorMap before = Read("b0", TensorKind::kWeights);
  const absl::Status s = engine_->LoadWeights("b0", std::move(*staged)).status();
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.code(), absl::StatusCode::kInternal) << s;
  const TensorMap after = Read("b0", TensorKind::kWeights);
  for (const auto& [name, v] : before) EXPECT_TRUE(BitwiseEqual(name + " after a stale load", after.at(name), v));
}


// 0 is what an omitted proto3 field reads as: CreateBlock takes it as Hugging Face's default and
// reports the value in force; a negative value is still refused.
TEST_F(EngineTest, CreateTakesZeroEpsAndThetaAsHuggingFaceDefaults) {
  BlockConfig c = Config(false);
  c.rms_norm_eps = 0;
  c.rope_theta = 0;
  CreateBlockParams p;
  p.spec = Spec("z0", c);
  p.seed = 1;
  auto info = engine_->CreateBlock(p);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->spec.config.rms_norm_eps, 1e-6);
  EXPECT_EQ(info->spec.config.rope_theta, 10000.0);
  EXPECT_EQ(engine_->GetBlock("z0")->spec.config.rms_norm_eps, 1e-6);
  for (auto [eps, theta, field] : {std::tuple{-1e-6, 0.0, "rms_norm_eps"}, std::tuple{0.0, -10000.0, "rope_theta"}}) {
    c.rms_norm_eps = eps;
    c.rope_theta = theta;
    p.spec = Spec("z1", c);
    EXPECT_TRUE(HasError(engine_->CreateBlock(p).status(), StatusCode::kInvalidArgument, field));
  }
  EXPECT_EQ(engine_->ListBlocks().size(), 1u);
}

// A client's 200 KB id must not come back whole in the error (it would outgrow gRPC's metadata).
TEST_F(EngineTest, LongIdsAndNamesAreEchoedShort) {
  ASSERT_OK(Create("b0", Config(false), 1));
  const std::string huge(200000, 'x');
  const std::vector<float> x = RandomActivation(16);
  for (const absl::Status& s :
       {engine_->GetBlock(huge).status(), engine_->DeleteBlock(huge).status(),
        Forward({"b0", huge}, x, kBatch, kSeq, false).status(),
        engine_->ReadTensors("b0", TensorKind::kWeights, DType::kFloat32, {huge}).status(),
        engine_->ReleaseActivations(huge, "")}) {
    EXPECT_TRUE(s.code() == StatusCode::kNotFound || s.code() == StatusCode::kInvalidArgument) << s.code();
    EXPECT_NE(s.message().find("(200000 bytes)"), std::string::npos) << s.message().substr(0, 300);
    EXPECT_LT(s.message().size(), 400u) << s.message().substr(0, 400);
  }
  CreateBlockParams p;
  p.spec = Spec(huge, Config(false));
  const absl::Status bad_id = engine_->CreateBlock(p).status();
  EXPECT_TRUE(HasError(bad_id, StatusCode::kInvalidArgument, "(200000 bytes)"));
  EXPECT_LT(bad_id.message().size(), 400u);
}

// ------------------------------------------------------------------------------------ dtypes

std::vector<uint16_t> ToBits(const std::string& bytes) {
  std::vector<uint16_t> v(bytes.size() / 2);
  std::memcpy(v.data(), bytes.data(), bytes.size());
  return v;
}

TEST_F(EngineTest, BFloat16ActivationsRoundTrip) {
  // Two blocks with the same weights: one driven in bfloat16, one in float32 with the same values.
  ASSERT_OK(Create("bf16", Config(true), 11));
  ASSERT_OK(Create("f32", Config(true), 11));
  std::vector<uint16_t> x16, dy16;
  std::vector<float> x32, dy32;
  for (float v : RandomActivation(16, 2.0)) {
    x16.push_back(RefBFloat16Bits(v));
    x32.push_back(BFloat16ToFloat32(x16.back()));
  }
  for (float v : RandomActivation(16)) {
    dy16.push_back(RefBFloat16Bits(v));
    dy32.push_back(BFloat16ToFloat32(dy16.back()));
  }
  ForwardArgs args;
  args.block_ids = {"bf16"};
  args.input = TensorArg{DType::kBFloat16, {kBatch, kSeq, 16}, x16.data(), x16.size() * 2};
  args.keep_activations = true;
  std::string y_bytes;
  ForwardOutput out;
  out.output.data = &y_bytes;
  ASSERT_OK(engine_->Forward(args, &out));
  EXPECT_EQ(out.output.dtype, DType::kBFloat16);
  EXPECT_EQ(out.output.shape, (std::vector<int64_t>{kBatch, kSeq, 16}));
  ASSERT_EQ(y_bytes.size(), x16.size() * 2);

  auto f32 = Forward({"f32"}, x32, kBatch, kSeq, true);
  ASSERT_TRUE(f32.ok());
  std::vector<uint16_t> want;
  for (float v : f32->out) want.push_back(RefBFloat16Bits(v));
  EXPECT_TRUE(BitwiseEqual("bfloat16 output vs the rounded float32 output", ToBits(y_bytes), want));

  TensorArg g{DType::kBFloat16, {kBatch, kSeq, 16}, dy16.data(), dy16.size() * 2};
  std::string dx_bytes;
  TensorOut dx;
  dx.data = &dx_bytes;
  ASSERT_OK(engine_->Backward(out.activation_id, "", g, &dx));
  EXPECT_EQ(dx.dtype, DType::kBFloat16);
  EXPECT_EQ(dx.shape, (std::vector<int64_t>{kBatch, kSeq, 16}));
  auto dx32 = Backward(f32->activation_id, dy32, kBatch, kSeq);
  ASSERT_TRUE(dx32.ok());
  want.clear();
  for (float v : *dx32) want.push_back(RefBFloat16Bits(v));
  EXPECT_TRUE(BitwiseEqual("bfloat16 grad_input vs the rounded float32 one", ToBits(dx_bytes), want));
  const TensorMap ga = Read("bf16", TensorKind::kGradients), gb = Read("f32", TensorKind::kGradients);
  for (const auto& [name, v] : ga) EXPECT_TRUE(BitwiseEqual("gradient " + name + " (bf16 vs f32 wire)", v, gb.at(name)));
}

// The CPU backend writes a bfloat16 reply a slice at a time (so that the reply's bytes are written
// once, not zero-filled first): an activation of several slices, the last one partial, must come
// back as every element rounded, in order; and float32 as the values themselves.
TEST(CpuBackendDownloadTest, BFloat16SpanningSeveralSlicesIsEveryElementRounded) {
  std::unique_ptr<Backend> cpu = MakeCpuBackend();
  const int64_t batch = 3, seq = 7, width = 1001;  // 21021 elements: 2 full slices of 8192 and a partial one
  std::vector<float> x(static_cast<size_t>(batch * seq * width));
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37 * static_cast<double>(i)) * (1.0 + i % 13);
  auto a = cpu->Upload(0, DType::kFloat32, x.data(), batch, seq, width);
  ASSERT_OK(a.status());
  std::string bytes = "stale bytes from an earlier reply";
  ASSERT_OK(cpu->Download(**a, DType::kBFloat16, &bytes));
  std::vector<uint16_t> want;
  for (float v : x) want.push_back(RefBFloat16Bits(v));
  EXPECT_TRUE(BitwiseEqual("bfloat16 download vs each element rounded", ToBits(bytes), want));
  ASSERT_OK(cpu->Download(**a, DType::kFloat32, &bytes));
  ASSERT_EQ(bytes.size(), x.size() * sizeof(float));
  EXPECT_EQ(std::memcmp(bytes.data(), x.data(), bytes.size()), 0) << "float32 download differs from the values";
}

TEST_F(EngineTest, ReadTensorsInBFloat16IsTheRoundedFloat32) {
  const BlockConfig c = Config(true);
  ASSERT_OK(Create("b0", c, std::nullopt));
  TensorMap w = RandomWeights(c);
  // Exact ties and their neighbours in the norm weights: 0x3f808000 lies halfway between the
  // bfloat16 values 0x3f80 and 0x3f81 and must go to the even one.
  const uint32_t ties[] = {0x3f808000u, 0x3f818000u, 0x3f808001u, 0x3f807fffu, 0xbf808000u, 0xbf818000u};
  for (size_t i = 0; i < 6; ++i) std::memcpy(&w["input_layernorm.weight"][i], &ties[i], 4);
  ASSERT_OK(Load("b0", w));
  TrainPass({"b0"}, RandomActivation(16), RandomActivation(16));

  for (TensorKind kind : {TensorKind::kWeights, TensorKind::kGradients}) {
    SCOPED_TRACE(std::string(TensorKindName(kind)));
    const TensorMap f32 = Read("b0", kind);
    auto b16 = engine_->ReadTensors("b0", kind, DType::kBFloat16, {});
    ASSERT_TRUE(b16.ok()) << b16.status();
    ASSERT_EQ(b16->size(), f32.size());
    for (const NamedTensor& t : *b16) {
      EXPECT_EQ(t.dtype, DType::kBFloat16);
      const std::vector<float>& src = f32.at(t.name);
      ASSERT_EQ(t.bytes.size(), src.size() * 2) << t.name;
      std::vector<uint16_t> want;
      for (float v : src) want.push_back(RefBFloat16Bits(v));
      EXPECT_TRUE(BitwiseEqual(t.name + " in bfloat16", ToBits(t.bytes), want));
    }
  }
  const std::vector<uint16_t> norm = ToBits((*engine_->ReadTensors("b0", TensorKind::kWeights, DType::kBFloat16,
                                                                    {"input_layernorm.weight"}))[0]
                                                .bytes);
  EXPECT_EQ(norm[0], 0x3f80);
  EXPECT_EQ(norm[1], 0x3f82);
  EXPECT_EQ(norm[2], 0x3f81);
  EXPECT_EQ(norm[3], 0x3f80);
  EXPECT_EQ(norm[4], 0xbf80);
  EXPECT_EQ(norm[5], 0xbf82);

  auto some = engine_->ReadTensors("b0", TensorKind::kWeights, DType::kFloat32,
                                   {"mlp.up_proj.weight", "input_layernorm.weight"});
  ASSERT_TRUE(some.ok());
  ASSERT_EQ(some->size(), 2u);
  EXPECT_EQ((*some)[0].name, "mlp.up_proj.weight");
  EXPECT_EQ((*some)[0].shape, (std::vector<int64_t>{32, 16}));
  EXPECT_EQ((*some)[1].name, "input_layernorm.weight");
  EXPECT_TRUE(HasError(engine_->ReadTensors("b0", TensorKind::kWeights, DType::kFloat32, {"mlp.up.weight"}).status(),
                       StatusCode::kInvalidArgument, "mlp.up.weight"));
  EXPECT_TRUE(HasError(engine_->ReadTensors("nope", TensorKind::kWeights, DType::kFloat32, {}).status(),
                       StatusCode::kNotFound, "nope"));
}

// ------------------------------------------------------------------------------------ seeded init

TEST_F(EngineTest, SeededInitIsDeterministicAndInRange) {
  const BlockConfig c = Config(true);
  ASSERT_OK(Create("a", c, 42));
  ASSERT_OK(Create("b", c, 42));
  ASSERT_OK(Create("c", c, 43));
  const TensorMap wa = Read("a", TensorKind::kWeights), wb = Read("b", TensorKind::kWeights),
                  wc = Read("c", TensorKind::kWeights);
  Reset({});
  ASSERT_OK(Create("elsewhere", c, 42));
  const TensorMap wd = Read("elsewhere", TensorKind::kWeights);

  for (const ParamSpec& p : BlockParams(c)) {
    SCOPED_TRACE(p.name);
    const std::vector<float>& v = wa.at(p.name);
    EXPECT_TRUE(BitwiseEqual(p.name + ", same seed", wb.at(p.name), v));
    EXPECT_TRUE(BitwiseEqual(p.name + ", same seed in another engine", wd.at(p.name), v));
    if (!p.is_matrix) {
      for (float x : v) ASSERT_EQ(x, 1.0f) << "norm weights start at 1";
      continue;
    }
    // Uniform in [-1/sqrt(in), 1/sqrt(in)] (nn.Linear's range): inside it, reaching near both
    // ends, with mean |w| near bound / 2, and a different stream for another seed.
    const double bound = 1.0 / std::sqrt(static_cast<double>(p.shape[1]));
    double lo = 0, hi = 0, mean_abs = 0;
    int same_as_other_seed = 0;
    for (size_t i = 0; i < v.size(); ++i) {
      ASSERT_LE(std::fabs(v[i]), bound * (1 + kFloatUlp)) << "element " << i;
      lo = std::min<double>(lo, v[i]);
      hi = std::max<double>(hi, v[i]);
      mean_abs += std::fabs(v[i]) / v.size();
      same_as_other_seed += v[i] == wc.at(p.name)[i];
    }
    EXPECT_GT(hi, 0.9 * bound);
    EXPECT_LT(lo, -0.9 * bound);
    EXPECT_NEAR(mean_abs, bound / 2, 0.1 * bound);
    EXPECT_LT(same_as_other_seed, 3) << "seed 43 should give other values";
  }
  // Each matrix has its own stream.
  const std::vector<float>&k = wa.at("self_attn.k_proj.weight"), &v = wa.at("self_attn.v_proj.weight");
  EXPECT_FALSE(BitwiseEqual("", k, v));
}

}  // namespace
}  // namespace blockd::testing
