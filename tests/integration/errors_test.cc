// ARCHITECTURE.md's error model ("Errors"), code by code, against a real server: each failing call
// returns the documented gRPC code with a message that says what was expected and what came, and
// leaves the server's state exactly as it was (weights, gradients, moments, steps, handles, memory).
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "tests/integration/harness.h"

namespace blockd::testing {
namespace {

using absl::StatusCode;

class Errors : public ::testing::Test {
 protected:
  void SetUp() override { Start(LoopbackOptions()); }
  void Start(ServerOptions o) {
    client_.reset();
    server_.reset();
    server_ = StartServer(std::move(o));
    ASSERT_NE(server_, nullptr);
    client_ = ConnectTo(*server_);
    ASSERT_NE(client_, nullptr);
  }
  void Create(const std::string& id, std::optional<uint64_t> seed = 1, int64_t hidden = 32) {
    ASSERT_OK(client_->CreateBlock(CreateRequest(id, TinyConfig(false, hidden), seed)).status());
  }
  int64_t ActivationsHeld() {
    auto info = client_->GetServerInfo();
    EXPECT_TRUE(info.ok()) << info.status().ToString();
    return info.ok() ? info->activations_held() : -1;
  }
  int64_t MemoryUsed() {
    auto info = client_->GetServerInfo();
    EXPECT_TRUE(info.ok()) << info.status().ToString();
    return info.ok() ? info->devices(0).memory_used_bytes() : -1;
  }
  std::vector<std::string> BlockIds() {
    std::vector<std::string> ids;
    auto blocks = client_->ListBlocks();
    EXPECT_TRUE(blocks.ok()) << blocks.status().ToString();
    if (blocks.ok()) {
      for (const v1::BlockInfo& b : *blocks) ids.push_back(b.block_id());
    }
    return ids;
  }

  std::unique_ptr<Server> server_;
  std::unique_ptr<Client> client_;
};

std::vector<v1::TensorChunk> Whole(const std::string& block, const TensorBytes& t) {
  return {Chunk(block, t, 0, static_cast<int64_t>(t.data.size()))};
}

// ---- INVALID_ARGUMENT ----

TEST_F(Errors, ForwardWithBadShapeOrDtypeOrSizeIsInvalidArgument) {
  Create("b0");
  const BlockState before = StateOf(*client_, "b0");
  const int64_t memory = MemoryUsed();

  auto r = client_->Forward({"b0"}, RandomTensor({2, 7, 33}, 1), true);
  EXPECT_STATUS(r.status(), StatusCode::kInvalidArgument, "input shape [2,7,33]", "block b0 expects [batch>=1,seq>=1,32]");
  r = client_->Forward({"b0"}, RandomTensor({7, 32}, 1), true);
  EXPECT_STATUS(r.status(), StatusCode::kInvalidArgument, "input shape [7,32]", "expects [batch>=1,seq>=1,32]");

  v1::Tensor bad_dtype = RandomTensor({1, 4, 32}, 2);
  bad_dtype.set_dtype(v1::DTYPE_UNSPECIFIED);
  r = client_->Forward({"b0"}, bad_dtype, true);
  EXPECT_STATUS(r.status(), StatusCode::kInvalidArgument, "input.dtype is DTYPE_UNSPECIFIED",
                "expected DTYPE_FLOAT32, DTYPE_BFLOAT16 or DTYPE_FLOAT16");

  v1::Tensor short_data = RandomTensor({1, 4, 32}, 3);
  short_data.mutable_data()->resize(100);
  r = client_->Forward({"b0"}, short_data, true);
  EXPECT_STATUS(r.status(), StatusCode::kInvalidArgument, "input has 100 bytes of data", "[1,4,32] of float32 needs 512");

  std::vector<float> nan_input(4 * 32, 0.5f);
  nan_input[37] = NAN;
  r = client_->Forward({"b0"}, wire::MakeTensor(v1::DTYPE_FLOAT32, {1, 4, 32}, nan_input), true);
  EXPECT_STATUS(r.status(), StatusCode::kInvalidArgument, "non-finite", "element 37");

  r = client_->Forward({"b0"}, RandomTensor({9, 4, 32}, 4), true);  // default max_batch_size 8
  EXPECT_STATUS(r.status(), StatusCode::kInvalidArgument, "input shape [9,4,32] exceeds block b0's max_batch_size 8");

  v1::ForwardRequest negative;
  negative.add_block_ids("b0");
  *negative.mutable_input() = RandomTensor({1, 4, 32}, 5);
  negative.set_position_offset(-3);
  r = client_->Forward(negative);
  EXPECT_STATUS(r.status(), StatusCode::kInvalidArgument, "position_offset = -3");

  EXPECT_EQ(ActivationsHeld(), 0) << "a failed Forward left an activation handle";
  EXPECT_EQ(MemoryUsed(), memory) << "a failed Forward left memory reserved";
  EXPECT_EQ(DiffStates(before, StateOf(*client_, "b0")), "");
}

TEST_F(Errors, SpanWithTwoWidthsIsInvalidArgument) {
  Create("w32", 1, 32);
  Create("w64", 1, 64);
  auto r = client_->Forward({"w32", "w64"}, RandomTensor({1, 4, 32}, 1), false);
  EXPECT_STATUS(r.status(), StatusCode::kInvalidArgument, "block w64 has hidden_size 64, but block w32 has 32",
                "a span needs one hidden_size");
  r = client_->Forward(std::vector<std::string>{}, RandomTensor({1, 4, 32}, 1), false);
  EXPECT_STATUS(r.status(), StatusCode::kInvalidArgument, "block_ids is empty");
}

TEST_F(Errors, CreateWithBadConfigOrIdIsInvalidArgumentAndCreatesNothing) {
  v1::BlockConfig c = TinyConfig();
  c.set_num_attention_heads(3);
  EXPECT_STATUS(client_->CreateBlock(CreateRequest("x", c, 1)).status(), StatusCode::kInvalidArgument,
                "config.num_attention_heads = 3 is not a multiple of config.num_kv_heads = 2");
  c = TinyConfig();
  c.set_head_dim(7);
  EXPECT_STATUS(client_->CreateBlock(CreateRequest("x", c, 1)).status(), StatusCode::kInvalidArgument,
                "config.head_dim = 7, expected an even number");
  c = TinyConfig();
  c.set_hidden_size(0);
  EXPECT_STATUS(client_->CreateBlock(CreateRequest("x", c, 1)).status(), StatusCode::kInvalidArgument,
                "config.hidden_size = 0, expected 1..65536");
  c = TinyConfig();
  c.set_rms_norm_eps(-1e-6);  // 0 is not an error: it means the default, 1e-6
  EXPECT_STATUS(client_->CreateBlock(CreateRequest("x", c, 1)).status(), StatusCode::kInvalidArgument,
                "config.rms_norm_eps = -1e-06, expected a number in (0, 1)");
  EXPECT_STATUS(client_->CreateBlock(CreateRequest("bad id!", TinyConfig(), 1)).status(),
                StatusCode::kInvalidArgument, "block_id \"bad id!\" is not valid",
                "expected 1-128 characters of [A-Za-z0-9._:/-]");
  EXPECT_STATUS(client_->CreateBlock(CreateRequest("", TinyConfig(), 1)).status(), StatusCode::kInvalidArgument,
                "block_id \"\" is not valid");
  v1::CreateBlockRequest seq = CreateRequest("x", TinyConfig(), 1, 0, -5);
  EXPECT_STATUS(client_->CreateBlock(seq).status(), StatusCode::kInvalidArgument, "max_seq_len = -5, expected 1..1048576");
  v1::CreateBlockRequest device = CreateRequest("x", TinyConfig(), 1);
  device.set_device(3);
  EXPECT_STATUS(client_->CreateBlock(device).status(), StatusCode::kInvalidArgument, "device 3 does not exist");
  EXPECT_TRUE(BlockIds().empty()) << "a failed CreateBlock left a block";
  EXPECT_EQ(MemoryUsed(), 0) << "a failed CreateBlock left memory reserved";
}

TEST_F(Errors, BadLoadWeightsStreamsAreInvalidArgumentAndChangeNothing) {
  Create("L");
  const BlockState before = StateOf(*client_, "L");
  const std::vector<TensorBytes> w = RandomWeights(TinyConfig(), 3);
  const TensorBytes& up = w[7];  // mlp.up_proj.weight [64,32]
  ASSERT_EQ(up.name, "mlp.up_proj.weight");
  const TensorBytes& norm = w[0];

  auto expect_refused = [&](std::vector<v1::TensorChunk> chunks, std::vector<std::string> parts) {
    // A good whole tensor goes first: the bad chunk after it must keep it from being applied.
    std::vector<v1::TensorChunk> stream = Whole("L", norm);
    stream.insert(stream.end(), chunks.begin(), chunks.end());
    auto r = client_->LoadWeightsChunks(stream);
    EXPECT_TRUE(StatusIs(r.status(), StatusCode::kInvalidArgument, parts));
    EXPECT_EQ(DiffStates(before, StateOf(*client_, "L")), "") << "a refused LoadWeights changed block L";
  };

  TensorBytes unknown = up;
  unknown.name = "mlp.nope.weight";
  expect_refused(Whole("L", unknown), {"block L has no tensor \"mlp.nope.weight\"", "expected one of: input_layernorm.weight"});
  TensorBytes transposed = up;
  transposed.shape = {32, 64};
  expect_refused(Whole("L", transposed), {"tensor mlp.up_proj.weight shape [32,64], block L expects [64,32]"});
  TensorBytes no_dtype = up;
  no_dtype.dtype = v1::DTYPE_UNSPECIFIED;
  expect_refused(Whole("L", no_dtype), {"tensor mlp.up_proj.weight dtype is DTYPE_UNSPECIFIED"});
  expect_refused({Chunk("L", up, 0, 1000)}, {"tensor mlp.up_proj.weight is incomplete: 1000 of 8192 bytes received"});
  expect_refused({Chunk("L", up, 0, 4096), Chunk("L", up, 4000, 4192)},
                 {"tensor mlp.up_proj.weight chunk [4000, 8192) overlaps an earlier chunk [0, 4096)"});
  expect_refused({Chunk("L", up, 8000, 192), [&] {
                    v1::TensorChunk c = Chunk("L", up, 8000, 192);
                    c.set_offset(8100);
                    return c;
                  }()},
                 {"chunk covers bytes [8100, 8292), outside the tensor's 8192 bytes"});
  v1::TensorChunk other_block = Whole("L", up)[0];
  other_block.set_block_id("M");
  expect_refused({other_block}, {"chunk for block M in a LoadWeights stream for block L"});
  TensorBytes inf = up;
  std::vector<float> values = Floats(inf.data);
  values[5] = INFINITY;
  inf.data = wire::EncodeFloat32(values.data(), values.size(), v1::DTYPE_FLOAT32);
  expect_refused(Whole("L", inf), {"tensor mlp.up_proj.weight has non-finite values"});
  // Over the server's chunk limit (4 MiB).
  v1::TensorChunk big = Whole("L", up)[0];
  big.mutable_data()->resize((4 << 20) + 1);
  expect_refused({big}, {"chunk of 4194305 bytes exceeds the 4194304-byte chunk limit"});
  EXPECT_STATUS(client_->LoadWeightsChunks({}).status(), StatusCode::kInvalidArgument, "carried no chunks");
}

TEST_F(Errors, StepWithBadHyperparametersIsInvalidArgumentAndChangesNothing) {
  Create("s0");
  Create("s1", 2);
  TrainStep(*client_, {"s0"}, RandomTensor({1, 4, 32}, 1), 2);
  TrainStep(*client_, {"s1"}, RandomTensor({1, 4, 32}, 3), 4);
  const BlockState before = StateOf(*client_, "s0");
  ASSERT_TRUE(before.has_gradients);

  auto step = [&](auto mutate) {
    v1::StepRequest r;
    r.add_block_ids("s0");
    mutate(r);
    return client_->Step(r).status();
  };
  EXPECT_STATUS(step([](v1::StepRequest& r) { r.mutable_adamw()->set_lr(-1); }), StatusCode::kInvalidArgument,
                "adamw.lr = -1, expected a finite number >= 0");
  EXPECT_STATUS(step([](v1::StepRequest& r) { r.mutable_adamw()->set_beta1(1); }), StatusCode::kInvalidArgument,
                "adamw.beta1 = 1, expected a number in [0, 1)");
  EXPECT_STATUS(step([](v1::StepRequest& r) { r.mutable_adamw()->set_eps(0); }), StatusCode::kInvalidArgument,
                "adamw.eps = 0, expected a finite number > 0");
  EXPECT_STATUS(step([](v1::StepRequest& r) { r.mutable_adamw()->set_weight_decay(NAN); }),
                StatusCode::kInvalidArgument, "adamw.weight_decay = nan");
  EXPECT_STATUS(step([](v1::StepRequest& r) { r.set_max_grad_norm(-1); }), StatusCode::kInvalidArgument,
                "max_grad_norm = -1, expected a finite number >= 0");
  EXPECT_STATUS(step([](v1::StepRequest& r) { r.add_block_ids("s0"); }), StatusCode::kInvalidArgument,
                "block_ids names block s0 twice");
  // One good block and one unknown: nothing steps.
  EXPECT_STATUS(step([](v1::StepRequest& r) { r.add_block_ids("ghost"); }), StatusCode::kNotFound,
                "block ghost not found");
  EXPECT_EQ(DiffStates(before, StateOf(*client_, "s0")), "") << "a refused Step changed s0";
  EXPECT_STATUS(client_->ZeroGrad({}), StatusCode::kInvalidArgument, "block_ids is empty");
}

TEST_F(Errors, BackwardWithBadGradientKeepsTheHandleUsable) {
  Create("g0");
  auto y = client_->Forward({"g0"}, RandomTensor({1, 8, 32}, 1), true);
  ASSERT_OK(y.status());
  const BlockState before = StateOf(*client_, "g0");
  auto r = client_->Backward(y->activation_id(), RandomTensor({1, 4, 32}, 2));
  EXPECT_STATUS(r.status(), StatusCode::kInvalidArgument, "grad_output shape [1,4,32], the forward output was [1,8,32]");
  v1::Tensor bad_dtype = RandomTensor({1, 8, 32}, 2);
  bad_dtype.set_dtype(static_cast<v1::DType>(9));
  r = client_->Backward(y->activation_id(), bad_dtype);
  EXPECT_STATUS(r.status(), StatusCode::kInvalidArgument, "grad_output.dtype is 9");
  EXPECT_EQ(DiffStates(before, StateOf(*client_, "g0")), "") << "a refused Backward changed g0";
  EXPECT_EQ(ActivationsHeld(), 1);
  ASSERT_OK(client_->Backward(y->activation_id(), RandomTensor({1, 8, 32}, 3)).status());
  EXPECT_EQ(ActivationsHeld(), 0);
}

TEST_F(Errors, DownloadWithBadKindNameOrChunkIsInvalidArgument) {
  Create("d0");
  v1::DownloadTensorsRequest r;
  r.set_block_id("d0");
  EXPECT_STATUS(client_->DownloadTensors(r).status(), StatusCode::kInvalidArgument, "kind = 0",
                "expected TENSOR_KIND_WEIGHTS, TENSOR_KIND_GRADIENTS, TENSOR_KIND_ADAM_M or TENSOR_KIND_ADAM_V");
  r.set_kind(v1::TENSOR_KIND_WEIGHTS);
  r.add_names("nope.weight");
  EXPECT_STATUS(client_->DownloadTensors(r).status(), StatusCode::kInvalidArgument, "block d0 has no tensor \"nope.weight\"");
  r.clear_names();
  r.set_chunk_bytes(10);
  EXPECT_STATUS(client_->DownloadTensors(r).status(), StatusCode::kInvalidArgument, "chunk_bytes = 10, expected 1024..4194304");
  r.set_chunk_bytes(0);
  r.set_dtype(static_cast<v1::DType>(7));
  EXPECT_STATUS(client_->DownloadTensors(r).status(), StatusCode::kInvalidArgument, "dtype is 7");
}

// ---- NOT_FOUND ----

TEST_F(Errors, UnknownBlocksAndActivationsAreNotFound) {
  Create("n0");
  const BlockState before = StateOf(*client_, "n0");
  EXPECT_STATUS(client_->GetBlock("nope").status(), StatusCode::kNotFound, "block nope not found");
  EXPECT_STATUS(client_->DeleteBlock("nope").status(), StatusCode::kNotFound, "block nope not found");
  EXPECT_STATUS(client_->Forward({"n0", "nope"}, RandomTensor({1, 4, 32}, 1), true).status(), StatusCode::kNotFound,
                "block nope not found");
  EXPECT_STATUS(client_->ZeroGrad({"nope"}), StatusCode::kNotFound, "block nope not found");
  EXPECT_STATUS(client_->DownloadTensors("nope", v1::TENSOR_KIND_WEIGHTS).status(), StatusCode::kNotFound,
                "block nope not found");
  EXPECT_STATUS(client_->LoadWeights("nope", RandomWeights(TinyConfig(), 1)).status(), StatusCode::kNotFound,
                "block nope not found");
  EXPECT_STATUS(client_->Backward("act-unknown", RandomTensor({1, 4, 32}, 1)).status(), StatusCode::kNotFound,
                "activation act-unknown not found (already used by Backward, released, or expired)");
  EXPECT_STATUS(client_->ReleaseActivations("act-unknown"), StatusCode::kNotFound, "activation act-unknown not found");

  // A handle is used once.
  auto y = client_->Forward({"n0"}, RandomTensor({1, 4, 32}, 2), true);
  ASSERT_OK(y.status());
  ASSERT_OK(client_->Backward(y->activation_id(), RandomTensor({1, 4, 32}, 3)).status());
  const BlockState after_backward = StateOf(*client_, "n0");
  EXPECT_STATUS(client_->Backward(y->activation_id(), RandomTensor({1, 4, 32}, 3)).status(), StatusCode::kNotFound,
                absl::StrCat("activation ", y->activation_id(), " not found"));
  EXPECT_EQ(DiffStates(after_backward, StateOf(*client_, "n0")), "") << "a second Backward on a used handle changed n0";
  // Deleting a block ends the handles that run through it.
  auto y2 = client_->Forward({"n0"}, RandomTensor({1, 4, 32}, 4), true);
  ASSERT_OK(y2.status());
  ASSERT_OK(client_->DeleteBlock("n0").status());
  EXPECT_STATUS(client_->Backward(y2->activation_id(), RandomTensor({1, 4, 32}, 5)).status(), StatusCode::kNotFound);
  (void)before;
}

// ---- ALREADY_EXISTS ----

TEST_F(Errors, CreatingAnExistingIdIsAlreadyExistsAndKeepsTheBlock) {
  Create("a0", 1);
  TrainStep(*client_, {"a0"}, RandomTensor({1, 4, 32}, 1), 2);
  const BlockState before = StateOf(*client_, "a0");
  auto info_before = client_->GetBlock("a0");
  ASSERT_OK(info_before.status());
  const int64_t memory = MemoryUsed();
  EXPECT_STATUS(client_->CreateBlock(CreateRequest("a0", TinyConfig(true, 64), 9)).status(),
                StatusCode::kAlreadyExists, "block a0 already exists");
  auto info_after = client_->GetBlock("a0");
  ASSERT_OK(info_after.status());
  info_after->clear_idle_seconds();  // the time since the last call moves; the block's state must not
  info_before->clear_idle_seconds();
  EXPECT_EQ(info_after->SerializeAsString(), info_before->SerializeAsString()) << info_after->DebugString();
  EXPECT_EQ(DiffStates(before, StateOf(*client_, "a0")), "");
  EXPECT_EQ(MemoryUsed(), memory);
}

// ---- FAILED_PRECONDITION ----

TEST_F(Errors, WeightsNotLoadedIsFailedPrecondition) {
  Create("u0", std::nullopt);
  auto r = client_->Forward({"u0"}, RandomTensor({1, 4, 32}, 1), true);
  EXPECT_STATUS(r.status(), StatusCode::kFailedPrecondition,
                "block u0 has weights not loaded: input_layernorm.weight, self_attn.q_proj.weight");
  // After a partial load only the rest is missing.
  std::vector<TensorBytes> w = RandomWeights(TinyConfig(), 2);
  ASSERT_OK(client_->LoadWeights("u0", {w.begin(), w.end() - 1}).status());
  r = client_->Forward({"u0"}, RandomTensor({1, 4, 32}, 1), true);
  EXPECT_STATUS(r.status(), StatusCode::kFailedPrecondition, "block u0 has weights not loaded: mlp.down_proj.weight");
  auto info = client_->GetBlock("u0");
  ASSERT_OK(info.status());
  EXPECT_FALSE(info->weights_loaded());
  ASSERT_EQ(info->missing_weights_size(), 1);
  EXPECT_EQ(info->missing_weights(0), "mlp.down_proj.weight");
  EXPECT_EQ(ActivationsHeld(), 0);
  ASSERT_OK(client_->LoadWeights("u0", {w.back()}).status());
  ASSERT_OK(client_->Forward({"u0"}, RandomTensor({1, 4, 32}, 1), false).status());
}

TEST_F(Errors, StepWithoutGradientsIsFailedPrecondition) {
  Create("p0");
  Create("p1", 2);
  TrainStep(*client_, {"p1"}, RandomTensor({1, 4, 32}, 1), 2);
  const BlockState p1 = StateOf(*client_, "p1");
  v1::StepRequest r;
  r.add_block_ids("p1");
  r.add_block_ids("p0");
  EXPECT_STATUS(client_->Step(r).status(), StatusCode::kFailedPrecondition,
                "block p0 has no gradients: run Backward through it first");
  EXPECT_EQ(DiffStates(p1, StateOf(*client_, "p1")), "") << "p1 stepped although p0 refused";
  // Step clears the gradients: a second Step has none.
  r.clear_block_ids();
  r.add_block_ids("p1");
  ASSERT_OK(client_->Step(r).status());
  EXPECT_STATUS(client_->Step(r).status(), StatusCode::kFailedPrecondition, "block p1 has no gradients");
  // Without --checkpoint_dir, checkpoints are a precondition failure too.
  EXPECT_STATUS(client_->SaveCheckpoint({}).status(), StatusCode::kFailedPrecondition, "checkpoints are disabled");
  EXPECT_STATUS(client_->RestoreCheckpoint({}).status(), StatusCode::kFailedPrecondition, "checkpoints are disabled");
}

// ---- RESOURCE_EXHAUSTED ----

TEST_F(Errors, MemoryBudgetIsResourceExhausted) {
  ServerOptions o = LoopbackOptions();
  // A tiny block holds 4 x 9280 floats (148,480 bytes): two fit in 400 KB, a third does not.
  o.engine.memory_budget_bytes = 400000;
  Start(o);
  ASSERT_OK(client_->CreateBlock(CreateRequest("r0", TinyConfig(), 1, /*max_batch_size=*/64, /*max_seq_len=*/512)).status());
  ASSERT_OK(client_->CreateBlock(CreateRequest("r1", TinyConfig(), 2)).status());
  const int64_t memory = MemoryUsed();
  EXPECT_STATUS(client_->CreateBlock(CreateRequest("r2", TinyConfig(), 3)).status(), StatusCode::kResourceExhausted,
                "block r2 needs 145.00 KiB on device 0", "memory budget is free");
  EXPECT_EQ(BlockIds(), (std::vector<std::string>{"r0", "r1"}));
  EXPECT_EQ(MemoryUsed(), memory);

  // Activations kept for Backward count too.
  const BlockState before = StateOf(*client_, "r0");
  auto y = client_->Forward({"r0"}, RandomTensor({64, 512, 32}, 4), true);
  EXPECT_STATUS(y.status(), StatusCode::kResourceExhausted, "the activations of this Forward needs",
                "memory budget is free");
  EXPECT_EQ(ActivationsHeld(), 0);
  EXPECT_EQ(MemoryUsed(), memory);
  EXPECT_EQ(DiffStates(before, StateOf(*client_, "r0")), "");
  // The same Forward without keeping activations holds nothing and goes through.
  ASSERT_OK(client_->Forward({"r0"}, RandomTensor({2, 16, 32}, 4), false).status());
}

TEST_F(Errors, ActivationHandlesPerClientAreResourceExhausted) {
  ServerOptions o = LoopbackOptions();
  o.engine.max_activations_per_client = 2;
  Start(o);
  Create("h0");
  auto a = ConnectTo(*server_, {.client_id = "trainer-a"});
  auto b = ConnectTo(*server_, {.client_id = "trainer-b"});
  const v1::Tensor x = RandomTensor({1, 4, 32}, 1);
  ASSERT_OK(a->Forward({"h0"}, x, true).status());
  ASSERT_OK(a->Forward({"h0"}, x, true).status());
  EXPECT_STATUS(a->Forward({"h0"}, x, true).status(), StatusCode::kResourceExhausted,
                "client trainer-a already holds 2 activation handles");
  EXPECT_EQ(ActivationsHeld(), 2);
  ASSERT_OK(b->Forward({"h0"}, x, true).status()) << "another client id has its own allowance";
  ASSERT_OK(a->Forward({"h0"}, x, false).status()) << "a Forward that keeps nothing is not limited";
}

TEST_F(Errors, MessagesOverTheSizeLimitAreResourceExhausted) {
  ServerOptions o = LoopbackOptions();
  o.service.max_message_bytes = 64 << 10;
  Start(o);
  Create("big", 1);
  const BlockState before = StateOf(*client_, "big");
  // [1,600,32] float32 is 76,800 bytes of data: over 64 KiB.
  auto r = client_->Forward({"big"}, RandomTensor({1, 600, 32}, 1), true);
  // The client names the tensor, its size and what to do; gRPC's own words stay in parentheses.
  EXPECT_STATUS(r.status(), StatusCode::kResourceExhausted,
                "over the server's message limit (Received message larger than max");
  EXPECT_EQ(ActivationsHeld(), 0);
  EXPECT_EQ(DiffStates(before, StateOf(*client_, "big")), "");
  // Under the limit it works; the client's own limit is enforced the same way.
  ASSERT_OK(client_->Forward({"big"}, RandomTensor({1, 400, 32}, 1), false).status());
  auto small = ConnectTo(*server_, {.max_message_bytes = 16 << 10});
  // [1,200,32] float32 is 25,600 bytes: over the client's 16 KiB.
  EXPECT_STATUS(small->Forward({"big"}, RandomTensor({1, 200, 32}, 1), false).status(), StatusCode::kResourceExhausted,
                "over the 16 KiB message limit");
}

// ---- UNIMPLEMENTED ----

TEST_F(Errors, Bf16PrecisionOnTheCpuBackendIsUnimplemented) {
  v1::CreateBlockRequest r = CreateRequest("bf", TinyConfig(), 1);
  r.set_precision(v1::PRECISION_BF16);
  EXPECT_STATUS(client_->CreateBlock(r).status(), StatusCode::kUnimplemented,
                "backend cpu computes in fp32 only; precision bf16 needs the cuda backend");
  r.set_precision(v1::PRECISION_TF32);
  EXPECT_STATUS(client_->CreateBlock(r).status(), StatusCode::kUnimplemented, "precision tf32 needs the cuda backend");
  EXPECT_TRUE(BlockIds().empty());
  EXPECT_EQ(MemoryUsed(), 0);
}

}  // namespace
}  // namespace blockd::testing
