// Every RPC of blockd.v1.BlockService succeeding against a real server on loopback, through
// blockd::Client: the whole lifecycle, chunked LoadWeights and DownloadTensors round trips,
// bf16 on the wire, spans, Step's clipping reply, checkpoints, concurrency and the metrics port.
#include <cmath>
#include <filesystem>
#include <set>
#include <thread>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "server/backend_select.h"
#include "tests/integration/harness.h"

namespace blockd::testing {
namespace {

constexpr char kService[] = "blockd.v1.BlockService";

TEST(Rpc, EveryRpcSucceeds) {
  ServerOptions o = LoopbackOptions();
  o.checkpoint_dir = MakeTempDir("rpc-ckpt");
  o.service.attention_backend = "native";
  o.service.attention_reason = "backend cpu: its own attention";
  auto server = StartServer(o);
  ASSERT_NE(server, nullptr);
  auto client = ConnectTo(*server, {.client_id = "lifecycle"});
  ASSERT_NE(client, nullptr);
  const v1::BlockConfig config = TinyConfig(/*qk_norm=*/true);

  auto health = client->Health();
  ASSERT_OK(health.status());
  EXPECT_EQ(*health, HealthStatus::kServing);
  auto service_health = client->Health(kService);
  ASSERT_OK(service_health.status());
  EXPECT_EQ(*service_health, HealthStatus::kServing);

  auto info = client->GetServerInfo();
  ASSERT_OK(info.status());
  EXPECT_EQ(info->version(), "integration-test");
  EXPECT_EQ(info->backend(), "cpu");
  EXPECT_EQ(info->backend_reason(), o.service.backend_reason);
  EXPECT_EQ(info->attention_backend(), "native");
  EXPECT_EQ(info->attention_reason(), o.service.attention_reason);
  EXPECT_EQ(server->metrics_port(), 0) << "no metrics_listen, yet a metrics port is open";
  ASSERT_EQ(info->devices_size(), 1);
  EXPECT_EQ(info->devices(0).kind(), "cpu");
  EXPECT_EQ(info->devices(0).memory_budget_bytes(), o.engine.memory_budget_bytes);
  EXPECT_EQ(info->limits().max_message_bytes(), o.service.max_message_bytes);
  EXPECT_EQ(info->limits().max_chunk_bytes(), o.service.max_chunk_bytes);
  EXPECT_EQ(info->blocks(), 0);

  v1::CreateBlockRequest create = CreateRequest("b0", config, 11, /*max_batch_size=*/4, /*max_seq_len=*/64);
  create.set_layer_index(5);
  create.set_precision(v1::PRECISION_FP32);
  auto created = client->CreateBlock(create);
  ASSERT_OK(created.status());
  EXPECT_EQ(created->block_id(), "b0");
  EXPECT_EQ(created->config().SerializeAsString(), config.SerializeAsString()) << created->config().DebugString();
  EXPECT_EQ(created->layer_index(), 5);
  EXPECT_EQ(created->precision(), v1::PRECISION_FP32);
  EXPECT_EQ(created->device(), 0);
  EXPECT_EQ(created->parameter_count(), ExpectedParameterCount(config));
  EXPECT_GT(created->memory_bytes(), 0);
  EXPECT_EQ(created->attention_backend(), "native");  // the CPU block's own attention
  EXPECT_FALSE(created->attention_reason().empty());
  EXPECT_TRUE(created->weights_loaded());
  EXPECT_EQ(created->missing_weights_size(), 0);
  EXPECT_EQ(created->step(), 0);
  EXPECT_EQ(created->max_batch_size(), 4);
  EXPECT_EQ(created->max_seq_len(), 64);
  EXPECT_FALSE(created->has_gradients());
  EXPECT_EQ(created->backend(), "cpu");

  auto listed = client->ListBlocks();
  ASSERT_OK(listed.status());
  ASSERT_EQ(listed->size(), 1u);
  EXPECT_EQ((*listed)[0].block_id(), "b0");
  auto got = client->GetBlock("b0");
  ASSERT_OK(got.status());
  EXPECT_EQ(got->ttl_seconds(), 0) << "no lease was asked for";
  // Everything else is as created; idle_seconds is the time since the last call, so it moves.
  got->clear_idle_seconds();
  created->clear_idle_seconds();
  EXPECT_EQ(got->SerializeAsString(), created->SerializeAsString());

  const v1::Tensor x = RandomTensor({2, 8, 32}, 1);
  auto y = client->Forward({"b0"}, x, /*keep_activations=*/false);
  ASSERT_OK(y.status());
  EXPECT_EQ(wire::ShapeOf(y->output()), (std::vector<int64_t>{2, 8, 32}));
  EXPECT_EQ(y->output().dtype(), v1::DTYPE_FLOAT32);
  EXPECT_TRUE(y->activation_id().empty());
  EXPECT_NE(y->output().data(), x.data()) << "the block did nothing to its input";

  auto kept = client->Forward({"b0"}, x, /*keep_activations=*/true);
  ASSERT_OK(kept.status());
  ASSERT_FALSE(kept->activation_id().empty());
  EXPECT_EQ(kept->output().data(), y->output().data()) << "keep_activations changed the output";
  auto released = client->Forward({"b0"}, x, /*keep_activations=*/true);
  ASSERT_OK(released.status());
  info = client->GetServerInfo();
  ASSERT_OK(info.status());
  EXPECT_EQ(info->activations_held(), 2);
  ASSERT_OK(client->ReleaseActivations(released->activation_id()));

  auto dx = client->Backward(kept->activation_id(), RandomTensor({2, 8, 32}, 2));
  ASSERT_OK(dx.status());
  EXPECT_EQ(wire::ShapeOf(dx->grad_input()), (std::vector<int64_t>{2, 8, 32}));
  info = client->GetServerInfo();
  ASSERT_OK(info.status());
  EXPECT_EQ(info->activations_held(), 0) << "Backward and ReleaseActivations should free both handles";
  got = client->GetBlock("b0");
  ASSERT_OK(got.status());
  EXPECT_TRUE(got->has_gradients());

  ASSERT_OK(client->ZeroGrad({"b0"}));
  got = client->GetBlock("b0");
  ASSERT_OK(got.status());
  EXPECT_FALSE(got->has_gradients());

  TrainStep(*client, {"b0"}, x, 3);
  const Snapshot before_step = Download(*client, "b0", v1::TENSOR_KIND_WEIGHTS);
  v1::StepRequest step;
  step.add_block_ids("b0");
  step.mutable_adamw()->set_lr(1e-2);
  auto stepped = client->Step(step);
  ASSERT_OK(stepped.status());
  EXPECT_FALSE(stepped->skipped());
  EXPECT_GT(stepped->grad_norm(), 0);
  EXPECT_EQ(stepped->clip_coefficient(), 1.0);
  ASSERT_EQ(stepped->steps_size(), 1);
  EXPECT_EQ(stepped->steps(0).block_id(), "b0");
  EXPECT_EQ(stepped->steps(0).step(), 1);
  const Snapshot after_step = Download(*client, "b0", v1::TENSOR_KIND_WEIGHTS);
  EXPECT_FALSE(DiffSnapshots(before_step, after_step).empty()) << "Step did not change the weights";

  auto weights = client->DownloadTensors("b0", v1::TENSOR_KIND_WEIGHTS);
  ASSERT_OK(weights.status());
  const std::vector<ParamShape> expected = ExpectedParams(config);
  ASSERT_EQ(weights->size(), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ((*weights)[i].name, expected[i].name);
    EXPECT_EQ((*weights)[i].shape, expected[i].shape) << expected[i].name;
    EXPECT_EQ((*weights)[i].dtype, v1::DTYPE_FLOAT32);
  }

  auto saved = client->SaveCheckpoint([] {
    v1::SaveCheckpointRequest r;
    r.set_name("lifecycle");
    return r;
  }());
  ASSERT_OK(saved.status());
  EXPECT_EQ(std::vector<std::string>(saved->block_ids().begin(), saved->block_ids().end()),
            std::vector<std::string>{"b0"});
  EXPECT_GT(saved->bytes(), 0);

  auto loaded = client->LoadWeights("b0", RandomWeights(config, 4));
  ASSERT_OK(loaded.status());
  EXPECT_EQ(loaded->block_id(), "b0");
  EXPECT_EQ(loaded->loaded_size(), static_cast<int>(expected.size()));

  auto restored = client->RestoreCheckpoint([] {
    v1::RestoreCheckpointRequest r;
    r.set_name("lifecycle");
    return r;
  }());
  ASSERT_OK(restored.status());
  EXPECT_EQ(restored->path(), saved->path());
  EXPECT_EQ(DiffSnapshots(after_step, Download(*client, "b0", v1::TENSOR_KIND_WEIGHTS)), "")
      << "RestoreCheckpoint did not bring back the saved weights";

  auto handle = client->Forward({"b0"}, x, /*keep_activations=*/true);
  ASSERT_OK(handle.status());
  auto deleted = client->DeleteBlock("b0");
  ASSERT_OK(deleted.status());
  EXPECT_EQ(deleted->activations_released(), 1);
  listed = client->ListBlocks();
  ASSERT_OK(listed.status());
  EXPECT_TRUE(listed->empty());
}

TEST(Rpc, ChunkedLoadWeightsRoundTripsBitwise) {
  auto server = StartServer(LoopbackOptions());
  ASSERT_NE(server, nullptr);
  // 1000-byte chunks cut float32 elements in two: the server must reassemble by byte offset.
  auto client = ConnectTo(*server, {.chunk_bytes = 1000});
  ASSERT_NE(client, nullptr);
  const v1::BlockConfig config = TinyConfig(/*qk_norm=*/true);
  auto created = client->CreateBlock(CreateRequest("w", config, std::nullopt));
  ASSERT_OK(created.status());
  EXPECT_FALSE(created->weights_loaded());
  EXPECT_EQ(created->missing_weights_size(), static_cast<int>(ExpectedParams(config).size()));

  for (v1::DType dtype : {v1::DTYPE_FLOAT32, v1::DTYPE_BFLOAT16, v1::DTYPE_FLOAT16}) {
    SCOPED_TRACE(wire::DTypeName(dtype));
    const std::vector<TensorBytes> sent = RandomWeights(config, 21, dtype);
    int64_t total = 0;
    for (const TensorBytes& t : sent) total += static_cast<int64_t>(t.data.size());
    std::vector<std::pair<int64_t, int64_t>> progress;
    auto r = client->LoadWeights("w", sent, [&](int64_t done, int64_t all) { progress.emplace_back(done, all); });
    ASSERT_OK(r.status());
    ASSERT_EQ(r->loaded_size(), static_cast<int>(sent.size()));
    ASSERT_FALSE(progress.empty());
    EXPECT_EQ(progress.back(), std::make_pair(total, total)) << "progress did not end at the total";
    EXPECT_GT(progress.size(), static_cast<size_t>(total / 1000)) << "the stream was not chunked at 1000 bytes";
    for (size_t i = 1; i < progress.size(); ++i) ASSERT_GE(progress[i].first, progress[i - 1].first);

    // Same dtype back: bitwise the bytes that were sent (float32 masters hold bf16/f16 exactly).
    v1::DownloadTensorsRequest req;
    req.set_block_id("w");
    req.set_kind(v1::TENSOR_KIND_WEIGHTS);
    req.set_dtype(dtype);
    req.set_chunk_bytes(1024);
    std::vector<std::pair<int64_t, int64_t>> down_progress;
    auto got = client->DownloadTensors(req, [&](int64_t done, int64_t all) { down_progress.emplace_back(done, all); });
    ASSERT_OK(got.status());
    ASSERT_EQ(got->size(), sent.size());
    for (size_t i = 0; i < sent.size(); ++i) {
      EXPECT_EQ((*got)[i].name, sent[i].name);
      EXPECT_EQ((*got)[i].dtype, dtype);
      EXPECT_EQ((*got)[i].shape, sent[i].shape) << sent[i].name;
      EXPECT_TRUE((*got)[i].data == sent[i].data) << sent[i].name << " did not round-trip bitwise";
    }
    ASSERT_FALSE(down_progress.empty());
    EXPECT_EQ(down_progress.back(), std::make_pair(total, total));
    // As float32: exactly the decoded values.
    const Snapshot f32 = Download(*client, "w", v1::TENSOR_KIND_WEIGHTS);
    for (const TensorBytes& t : sent) {
      auto values = wire::DecodeToFloat32(t.dtype, t.data);
      ASSERT_OK(values.status());
      EXPECT_EQ(f32.at(t.name), wire::EncodeFloat32(values->data(), values->size(), v1::DTYPE_FLOAT32))
          << t.name << " as float32 is not the decoded " << wire::DTypeName(dtype);
    }
  }
  auto info = client->GetBlock("w");
  ASSERT_OK(info.status());
  EXPECT_TRUE(info->weights_loaded());

  // A subset by name.
  v1::DownloadTensorsRequest some;
  some.set_block_id("w");
  some.set_kind(v1::TENSOR_KIND_WEIGHTS);
  some.add_names("mlp.down_proj.weight");
  some.add_names("self_attn.k_norm.weight");
  auto subset = client->DownloadTensors(some);
  ASSERT_OK(subset.status());
  ASSERT_EQ(subset->size(), 2u);
  EXPECT_EQ((*subset)[0].name, "mlp.down_proj.weight");
  EXPECT_EQ((*subset)[1].name, "self_attn.k_norm.weight");
}

TEST(Rpc, Bf16OnTheWireMatchesFloat32Rounded) {
  auto server = StartServer(LoopbackOptions());
  ASSERT_NE(server, nullptr);
  auto client = ConnectTo(*server);
  ASSERT_NE(client, nullptr);
  // Twin blocks: one driven in float32, one in bfloat16, with bf16-representable inputs.
  ASSERT_OK(client->CreateBlock(CreateRequest("f32", TinyConfig(), 5)).status());
  ASSERT_OK(client->CreateBlock(CreateRequest("bf16", TinyConfig(), 5)).status());
  const v1::Tensor x16 = RandomTensor({2, 6, 32}, 31, v1::DTYPE_BFLOAT16);
  const v1::Tensor x32 = wire::MakeTensor(v1::DTYPE_FLOAT32, {2, 6, 32}, Floats(x16));
  const v1::Tensor g16 = RandomTensor({2, 6, 32}, 32, v1::DTYPE_BFLOAT16);
  const v1::Tensor g32 = wire::MakeTensor(v1::DTYPE_FLOAT32, {2, 6, 32}, Floats(g16));

  auto y32 = client->Forward({"f32"}, x32, true);
  auto y16 = client->Forward({"bf16"}, x16, true);
  ASSERT_OK(y32.status());
  ASSERT_OK(y16.status());
  EXPECT_EQ(y16->output().dtype(), v1::DTYPE_BFLOAT16) << "the reply must use the request's dtype";
  EXPECT_EQ(y16->output().data().size(), 2u * 6 * 32 * 2);
  const std::vector<float> y32v = Floats(y32->output());
  EXPECT_EQ(y16->output().data(), wire::EncodeFloat32(y32v.data(), y32v.size(), v1::DTYPE_BFLOAT16))
      << "bf16 output is not the float32 output rounded to nearest even";

  auto dx32 = client->Backward(y32->activation_id(), g32);
  auto dx16 = client->Backward(y16->activation_id(), g16);
  ASSERT_OK(dx32.status());
  ASSERT_OK(dx16.status());
  EXPECT_EQ(dx16->grad_input().dtype(), v1::DTYPE_BFLOAT16);
  const std::vector<float> dx32v = Floats(dx32->grad_input());
  EXPECT_EQ(dx16->grad_input().data(), wire::EncodeFloat32(dx32v.data(), dx32v.size(), v1::DTYPE_BFLOAT16))
      << "bf16 grad_input is not the float32 grad_input rounded";
  EXPECT_EQ(DiffSnapshots(Download(*client, "f32", v1::TENSOR_KIND_GRADIENTS),
                          Download(*client, "bf16", v1::TENSOR_KIND_GRADIENTS)),
            "")
      << "weight gradients differ between the bf16 and float32 wire paths";
  // Gradients downloaded as bf16 are the float32 ones rounded.
  const Snapshot g_f32 = Download(*client, "f32", v1::TENSOR_KIND_GRADIENTS);
  const Snapshot g_bf16 = Download(*client, "f32", v1::TENSOR_KIND_GRADIENTS, v1::DTYPE_BFLOAT16);
  for (const auto& [name, bytes] : g_f32) {
    const std::vector<float> v = Floats(bytes);
    EXPECT_EQ(g_bf16.at(name), wire::EncodeFloat32(v.data(), v.size(), v1::DTYPE_BFLOAT16)) << name;
  }
}

TEST(Rpc, SpanOfTwoBlocksEqualsTheChain) {
  auto server = StartServer(LoopbackOptions());
  ASSERT_NE(server, nullptr);
  auto client = ConnectTo(*server);
  ASSERT_NE(client, nullptr);
  for (const char* id : {"a0", "b0"}) ASSERT_OK(client->CreateBlock(CreateRequest(id, TinyConfig(), 100)).status());
  for (const char* id : {"a1", "b1"}) ASSERT_OK(client->CreateBlock(CreateRequest(id, TinyConfig(), 200)).status());
  const v1::Tensor x = RandomTensor({1, 9, 32}, 41);
  const v1::Tensor g = RandomTensor({1, 9, 32}, 42);
  constexpr int64_t kOffset = 7;

  auto span = client->Forward({"a0", "a1"}, x, true, kOffset);
  ASSERT_OK(span.status());
  auto h0 = client->Forward({"b0"}, x, true, kOffset);
  ASSERT_OK(h0.status());
  auto h1 = client->Forward({"b1"}, h0->output(), true, kOffset);
  ASSERT_OK(h1.status());
  EXPECT_EQ(span->output().data(), h1->output().data()) << "span [a0,a1] differs from b0 then b1";
  auto no_offset = client->Forward({"a0", "a1"}, x, false, 0);
  ASSERT_OK(no_offset.status());
  EXPECT_NE(no_offset->output().data(), span->output().data()) << "position_offset had no effect";

  auto dspan = client->Backward(span->activation_id(), g);
  ASSERT_OK(dspan.status());
  auto d1 = client->Backward(h1->activation_id(), g);
  ASSERT_OK(d1.status());
  auto d0 = client->Backward(h0->activation_id(), d1->grad_input());
  ASSERT_OK(d0.status());
  EXPECT_EQ(dspan->grad_input().data(), d0->grad_input().data()) << "span grad_input differs from the chain's";
  EXPECT_EQ(DiffSnapshots(Download(*client, "a0", v1::TENSOR_KIND_GRADIENTS),
                          Download(*client, "b0", v1::TENSOR_KIND_GRADIENTS)),
            "");
  EXPECT_EQ(DiffSnapshots(Download(*client, "a1", v1::TENSOR_KIND_GRADIENTS),
                          Download(*client, "b1", v1::TENSOR_KIND_GRADIENTS)),
            "");
}

double SumSquares(const Snapshot& s) {
  double ss = 0;
  for (const auto& [name, bytes] : s) {
    for (float v : Floats(bytes)) ss += static_cast<double>(v) * v;
  }
  return ss;
}

TEST(Rpc, StepReportsAndAppliesGlobalNormClipping) {
  auto server = StartServer(LoopbackOptions());
  ASSERT_NE(server, nullptr);
  auto client = ConnectTo(*server);
  ASSERT_NE(client, nullptr);
  ASSERT_OK(client->CreateBlock(CreateRequest("c0", TinyConfig(), 1)).status());
  ASSERT_OK(client->CreateBlock(CreateRequest("c1", TinyConfig(), 2)).status());
  TrainStep(*client, {"c0", "c1"}, RandomTensor({2, 5, 32}, 51), 52);
  const Snapshot g0 = Download(*client, "c0", v1::TENSOR_KIND_GRADIENTS);
  const Snapshot g1 = Download(*client, "c1", v1::TENSOR_KIND_GRADIENTS);
  const double norm = std::sqrt(SumSquares(g0) + SumSquares(g1));
  ASSERT_GT(norm, 0);

  v1::StepRequest req;
  req.add_block_ids("c0");
  req.add_block_ids("c1");
  req.mutable_adamw()->set_lr(1e-3);
  req.set_max_grad_norm(norm / 4);
  auto r = client->Step(req);
  ASSERT_OK(r.status());
  EXPECT_FALSE(r->skipped());
  EXPECT_NEAR(r->grad_norm(), norm, 1e-6 * norm) << "grad_norm is the global norm before clipping";
  const double coef = (norm / 4) / (norm + 1e-6);
  EXPECT_NEAR(r->clip_coefficient(), coef, 1e-6);
  ASSERT_EQ(r->steps_size(), 2);
  EXPECT_EQ(r->steps(0).step(), 1);
  EXPECT_EQ(r->steps(1).step(), 1);

  // First AdamW step: m = (1 - beta1) * g * coef, v = (1 - beta2) * (g * coef)^2.
  for (const auto& [id, grads] : {std::pair{"c0", &g0}, std::pair{"c1", &g1}}) {
    const Snapshot m = Download(*client, id, v1::TENSOR_KIND_ADAM_M);
    const Snapshot v = Download(*client, id, v1::TENSOR_KIND_ADAM_V);
    for (const auto& [name, bytes] : *grads) {
      const std::vector<float> g = Floats(bytes), mv = Floats(m.at(name)), vv = Floats(v.at(name));
      for (size_t i = 0; i < g.size(); ++i) {
        const double gc = g[i] * coef;
        ASSERT_NEAR(mv[i], 0.1 * gc, 1e-6 * std::fabs(0.1 * gc) + 1e-12) << id << " adam_m " << name << "[" << i << "]";
        ASSERT_NEAR(vv[i], 0.001 * gc * gc, 1e-5 * (0.001 * gc * gc) + 1e-18) << id << " adam_v " << name << "[" << i << "]";
      }
    }
  }
  auto info = client->GetBlock("c1");
  ASSERT_OK(info.status());
  EXPECT_EQ(info->step(), 1);
  EXPECT_FALSE(info->has_gradients()) << "Step clears the gradients";

  // A norm below the limit is not clipped.
  TrainStep(*client, {"c0"}, RandomTensor({1, 3, 32}, 53), 54);
  v1::StepRequest loose;
  loose.add_block_ids("c0");
  loose.set_max_grad_norm(1e9);
  auto r2 = client->Step(loose);
  ASSERT_OK(r2.status());
  EXPECT_EQ(r2->clip_coefficient(), 1.0);
  EXPECT_EQ(r2->steps(0).step(), 2);
}

TEST(Rpc, NonFiniteGradientsSkipTheStep) {
  auto server = StartServer(LoopbackOptions());
  ASSERT_NE(server, nullptr);
  auto client = ConnectTo(*server);
  ASSERT_NE(client, nullptr);
  ASSERT_OK(client->CreateBlock(CreateRequest("n0", TinyConfig(), 3)).status());
  auto y = client->Forward({"n0"}, RandomTensor({1, 4, 32}, 61), true);
  ASSERT_OK(y.status());
  // Huge (finite) grad_output: the weight gradients overflow float32.
  std::vector<float> huge(4 * 32, 3e38f);
  for (size_t i = 0; i < huge.size(); i += 2) huge[i] = -3e38f;
  ASSERT_OK(client->Backward(y->activation_id(), wire::MakeTensor(v1::DTYPE_FLOAT32, {1, 4, 32}, huge)).status());
  const BlockState before = StateOf(*client, "n0");
  v1::StepRequest req;
  req.add_block_ids("n0");
  auto r = client->Step(req);
  ASSERT_OK(r.status());
  EXPECT_TRUE(r->skipped()) << "grad_norm " << r->grad_norm();
  EXPECT_FALSE(std::isfinite(r->grad_norm()));
  EXPECT_EQ(DiffStates(before, StateOf(*client, "n0")), "") << "a skipped step changed the block";
}

TEST(Rpc, ConcurrentTrainingMatchesSerialTraining) {
  auto server = StartServer(LoopbackOptions());
  ASSERT_NE(server, nullptr);
  auto client = ConnectTo(*server);
  ASSERT_NE(client, nullptr);
  constexpr int kThreads = 4, kSteps = 3;
  for (int t = 0; t < kThreads; ++t) {
    ASSERT_OK(client->CreateBlock(CreateRequest(absl::StrCat("par", t), TinyConfig(), 9)).status());
    ASSERT_OK(client->CreateBlock(CreateRequest(absl::StrCat("ser", t), TinyConfig(), 9)).status());
  }
  auto train = [](Client& c, const std::string& id, int t) {
    for (int s = 0; s < kSteps; ++s) {
      TrainStep(c, {id}, RandomTensor({2, 8, 32}, 1000 + 10 * t + s), 2000 + 10 * t + s);
      v1::StepRequest req;
      req.add_block_ids(id);
      req.mutable_adamw()->set_lr(1e-2);
      auto r = c.Step(req);
      if (!r.ok()) ADD_FAILURE() << id << " Step: " << r.status().ToString();
    }
  };
  std::atomic<bool> done{false};
  std::thread reader([&] {  // reads race the training calls
    auto c = ConnectTo(*server);
    while (!done) {
      if (!c->ListBlocks().ok() || !c->GetServerInfo().ok()) ADD_FAILURE() << "a read failed during training";
    }
  });
  // Odd trainers have a channel each; even ones share one client whose calls are spread over
  // three connections (each call takes the first one with nothing in flight).
  auto shared = ConnectTo(*server, {.client_id = "trainers", .connections = 3});
  ASSERT_NE(shared, nullptr);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      if (t % 2 == 0) {
        train(*shared, absl::StrCat("par", t), t);
        return;
      }
      auto c = ConnectTo(*server, {.client_id = absl::StrCat("trainer-", t)});
      train(*c, absl::StrCat("par", t), t);
    });
  }
  for (std::thread& t : threads) t.join();
  done = true;
  reader.join();
  for (int t = 0; t < kThreads; ++t) train(*client, absl::StrCat("ser", t), t);
  for (int t = 0; t < kThreads; ++t) {
    const std::string par = absl::StrCat("par", t), ser = absl::StrCat("ser", t);
    auto info = client->GetBlock(par);
    ASSERT_OK(info.status());
    EXPECT_EQ(info->step(), kSteps);
    EXPECT_EQ(DiffStates(StateOf(*client, ser), StateOf(*client, par)), "")
        << par << " trained concurrently differs from " << ser << " trained alone";
  }
}

TEST(Rpc, CheckpointSaveAndRestoreRoundTrip) {
  ServerOptions o = LoopbackOptions();
  o.checkpoint_dir = MakeTempDir("ckpt");
  auto server = StartServer(o);
  ASSERT_NE(server, nullptr);
  auto client = ConnectTo(*server);
  ASSERT_NE(client, nullptr);
  for (const char* id : {"k0", "k1"}) {
    ASSERT_OK(client->CreateBlock(CreateRequest(id, TinyConfig(true), 17)).status());
  }
  TrainStep(*client, {"k0", "k1"}, RandomTensor({1, 6, 32}, 71), 72);
  v1::StepRequest step;
  step.add_block_ids("k0");
  step.add_block_ids("k1");
  ASSERT_OK(client->Step(step).status());
  const BlockState k0 = StateOf(*client, "k0"), k1 = StateOf(*client, "k1");

  v1::SaveCheckpointRequest save;
  save.set_name("one");
  auto saved = client->SaveCheckpoint(save);
  ASSERT_OK(saved.status());
  EXPECT_NE(saved->path().find(o.checkpoint_dir), std::string::npos) << saved->path();
  EXPECT_EQ(saved->block_ids_size(), 2);

  // Change both blocks, delete one; restoring brings back exactly what was saved.
  TrainStep(*client, {"k0", "k1"}, RandomTensor({1, 6, 32}, 73), 74);
  ASSERT_OK(client->Step(step).status());
  ASSERT_OK(client->DeleteBlock("k1").status());
  ASSERT_FALSE(DiffStates(k0, StateOf(*client, "k0")).empty());

  v1::RestoreCheckpointRequest restore;  // empty name: the latest
  auto restored = client->RestoreCheckpoint(restore);
  ASSERT_OK(restored.status());
  EXPECT_EQ(restored->path(), saved->path());
  EXPECT_EQ(restored->block_ids_size(), 2);
  EXPECT_EQ(DiffStates(k0, StateOf(*client, "k0")), "") << "k0 after restore";
  EXPECT_EQ(DiffStates(k1, StateOf(*client, "k1")), "") << "k1 after restore";
  auto info = client->GetBlock("k1");
  ASSERT_OK(info.status());
  EXPECT_EQ(info->step(), 1);
  EXPECT_TRUE(info->config().qk_norm());

  // Restoring one block by name leaves the other alone.
  TrainStep(*client, {"k0", "k1"}, RandomTensor({1, 6, 32}, 75), 76);
  ASSERT_OK(client->Step(step).status());
  const BlockState k0_changed = StateOf(*client, "k0");
  restore.set_name("one");
  restore.add_block_ids("k1");
  restored = client->RestoreCheckpoint(restore);
  ASSERT_OK(restored.status());
  EXPECT_EQ(std::vector<std::string>(restored->block_ids().begin(), restored->block_ids().end()),
            std::vector<std::string>{"k1"});
  EXPECT_EQ(DiffStates(k1, StateOf(*client, "k1")), "");
  EXPECT_EQ(DiffStates(k0_changed, StateOf(*client, "k0")), "") << "restoring k1 touched k0";
}

// --checkpoint_keep rotates automatic checkpoints only: one the user named survives any number of
// later automatic saves and restores as saved.
TEST(Rpc, NamedCheckpointsSurviveAutomaticRotation) {
  ServerOptions o = LoopbackOptions();
  o.checkpoint_dir = MakeTempDir("ckpt-keep");
  o.checkpoint_every_steps = 1;
  o.checkpoint_keep = 2;
  auto server = StartServer(o);
  ASSERT_NE(server, nullptr);
  auto client = ConnectTo(*server);
  ASSERT_NE(client, nullptr);
  ASSERT_OK(client->CreateBlock(CreateRequest("k0", TinyConfig(), 17)).status());
  v1::StepRequest step;
  step.add_block_ids("k0");
  TrainStep(*client, {"k0"}, RandomTensor({1, 6, 32}, 81), 82);
  ASSERT_OK(client->Step(step).status());  // automatic checkpoint 1
  const BlockState good = StateOf(*client, "k0");
  v1::SaveCheckpointRequest save;
  save.set_name("good");
  ASSERT_OK(client->SaveCheckpoint(save).status());
  for (int i = 0; i < 5; ++i) {  // five automatic checkpoints after it
    TrainStep(*client, {"k0"}, RandomTensor({1, 6, 32}, 83 + i), 90 + i);
    ASSERT_OK(client->Step(step).status());
  }
  std::set<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(o.checkpoint_dir)) {
    if (e.is_directory() && e.path().filename().string()[0] != '.') names.insert(e.path().filename().string());
  }
  EXPECT_EQ(names, (std::set<std::string>{"good", "ckpt-00000006", "ckpt-00000007"}))
      << "expected the named checkpoint and the newest 2 automatic ones";
  v1::RestoreCheckpointRequest restore;
  restore.set_name("good");
  ASSERT_OK(client->RestoreCheckpoint(restore).status()) << "the named checkpoint was rotated away";
  EXPECT_EQ(DiffStates(good, StateOf(*client, "k0")), "") << "k0 restored from good";
}

// rms_norm_eps and rope_theta left out of a CreateBlock (proto3 reads them as 0, as grpcurl sends
// them) mean Hugging Face's 1e-6 and 10000: BlockInfo reports them, and the block computes exactly
// as one created with them spelled out.
TEST(Rpc, CreateBlockTakesUnsetEpsAndThetaAsHuggingFaceDefaults) {
  auto server = StartServer(LoopbackOptions());
  ASSERT_NE(server, nullptr);
  auto client = ConnectTo(*server);
  ASSERT_NE(client, nullptr);
  v1::BlockConfig unset = TinyConfig();
  unset.clear_rms_norm_eps();
  unset.clear_rope_theta();
  v1::BlockConfig spelled = TinyConfig();
  spelled.set_rms_norm_eps(1e-6);
  spelled.set_rope_theta(10000);
  auto created = client->CreateBlock(CreateRequest("d0", unset, 5));
  ASSERT_OK(created.status());
  EXPECT_EQ(created->config().rms_norm_eps(), 1e-6);
  EXPECT_EQ(created->config().rope_theta(), 10000.0);
  auto got = client->GetBlock("d0");
  ASSERT_OK(got.status());
  EXPECT_EQ(got->config().rms_norm_eps(), 1e-6);
  EXPECT_EQ(got->config().rope_theta(), 10000.0);
  ASSERT_OK(client->CreateBlock(CreateRequest("d1", spelled, 5)).status());
  const v1::Tensor x = RandomTensor({2, 7, 32}, 9);
  auto y0 = client->Forward({"d0"}, x, false), y1 = client->Forward({"d1"}, x, false);
  ASSERT_OK(y0.status());
  ASSERT_OK(y1.status());
  EXPECT_EQ(y0->output().data(), y1->output().data()) << "the defaulted block computes differently";
}

TEST(Rpc, MetricsEndpointCountsRequests) {
  auto server = StartServer(LoopbackOptions(/*with_metrics=*/true));
  ASSERT_NE(server, nullptr);
  ASSERT_GT(server->metrics_port(), 0);
  ASSERT_NE(server->metrics_port(), server->port());
  auto client = ConnectTo(*server);
  ASSERT_NE(client, nullptr);
  for (int i = 0; i < 3; ++i) ASSERT_OK(client->GetServerInfo().status());
  EXPECT_FALSE(client->GetBlock("missing").ok());
  ASSERT_OK(client->CreateBlock(CreateRequest("m0", TinyConfig(), 1)).status());
  ASSERT_OK(client->Forward({"m0"}, RandomTensor({2, 3, 32}, 81), false).status());

  const std::string body = HttpGetBody(server->metrics_port(), "/metrics");
  ASSERT_FALSE(body.empty()) << "no 200 reply from the metrics port " << server->metrics_port();
  EXPECT_NE(body.find("# TYPE blockd_requests_total counter"), std::string::npos) << body.substr(0, 2000);
  EXPECT_EQ(MetricValue(body, "blockd_requests_total", {"method=\"GetServerInfo\"", "code=\"OK\""}), 3) << body;
  EXPECT_EQ(MetricValue(body, "blockd_requests_total", {"method=\"GetBlock\"", "code=\"NOT_FOUND\""}), 1) << body;
  EXPECT_EQ(MetricValue(body, "blockd_tokens_total", {"pass=\"forward\""}), 6) << body;
  EXPECT_NE(body.find("blockd_request_duration_seconds_bucket"), std::string::npos);
}

// blockd_tokens_total counts batch * seq per block, as its HELP text says, in both passes: a
// two-block span on a [2,5,hidden] input adds 20 forward and 20 backward tokens.
TEST(Rpc, TokensMetricCountsEveryBlockOfASpanInBothPasses) {
  auto server = StartServer(LoopbackOptions(/*with_metrics=*/true));
  ASSERT_NE(server, nullptr);
  auto client = ConnectTo(*server);
  ASSERT_NE(client, nullptr);
  ASSERT_OK(client->CreateBlock(CreateRequest("t0", TinyConfig(), 1)).status());
  ASSERT_OK(client->CreateBlock(CreateRequest("t1", TinyConfig(), 2)).status());
  TrainStep(*client, {"t0", "t1"}, RandomTensor({2, 5, 32}, 91), 92);

  const std::string body = HttpGetBody(server->metrics_port(), "/metrics");
  ASSERT_FALSE(body.empty()) << "no 200 reply from the metrics port " << server->metrics_port();
  EXPECT_EQ(MetricValue(body, "blockd_tokens_total", {"pass=\"forward\""}), 20) << body;
  EXPECT_EQ(MetricValue(body, "blockd_tokens_total", {"pass=\"backward\""}), 20) << body;
}

// --attention: the CPU backend has only its own attention, so "cudnn" is refused at start there
// (on a CUDA build without a GPU too), "native" and "auto" are reported, a bad value is refused.
TEST(SelectBackendAttention, CpuBackendRefusesCudnnAndReportsNative) {
  auto native = SelectBackend("cpu", "native");
  ASSERT_OK(native.status());
  EXPECT_EQ(native->attention.backend, "native");
  EXPECT_FALSE(native->attention.reason.empty());
  auto cudnn = SelectBackend("cpu", "cudnn");
  EXPECT_EQ(cudnn.status().code(), absl::StatusCode::kFailedPrecondition) << cudnn.status();
  EXPECT_NE(std::string(cudnn.status().message()).find("--attention=cudnn"), std::string::npos) << cudnn.status();
  EXPECT_EQ(SelectBackend("cpu", "fast").status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace blockd::testing
