// A test fixture for the Engine over the CPU backend: small configs, and helpers that turn the
// Engine's byte-level API (TensorArg, TensorOut, chunks through a TensorAssembler) into vectors.
//
//   class MyTest : public EngineFixture {};
//   TEST_F(MyTest, X) {
//     ASSERT_OK(Create("b0", Config(/*qk_norm=*/true), /*seed=*/7));
//     auto y = Forward({"b0"}, x, 2, 5, /*keep=*/true);
//   }
#pragma once

#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "base/block_config.h"
#include "engine/cpu/cpu_backend.h"
#include "base/dtype.h"
#include "engine/engine.h"
#include "engine/tensor_assembler.h"
#include "gtest/gtest.h"
#include "tests/engine/reference.h"
#include "tests/engine/test_util.h"

#define ASSERT_OK(expr)                              \
  do {                                               \
    const ::absl::Status assert_ok_ = (expr);        \
    ASSERT_TRUE(assert_ok_.ok()) << assert_ok_;      \
  } while (0)
#define EXPECT_OK(expr)                              \
  do {                                               \
    const ::absl::Status expect_ok_ = (expr);        \
    EXPECT_TRUE(expect_ok_.ok()) << expect_ok_;      \
  } while (0)

namespace blockd::testing {

// Asserts the status code and that the message contains `substring` (what the user needs to see).
inline ::testing::AssertionResult HasError(const absl::Status& s, absl::StatusCode code, absl::string_view substring) {
  if (s.code() == code && absl::string_view(s.message()).find(substring) != absl::string_view::npos) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "got " << s << "; expected " << absl::StatusCodeToString(code)
                                       << " with a message containing \"" << substring << "\"";
}

inline BlockConfig Config(bool qk_norm, int64_t kv_heads = 2) {
  BlockConfig c;
  c.hidden_size = 16;
  c.num_attention_heads = 4;
  c.num_kv_heads = kv_heads;
  c.head_dim = 4;
  c.intermediate_size = 32;
  c.rms_norm_eps = 1e-6;
  c.rope_theta = 10000;
  c.qk_norm = qk_norm;
  return c;
}

inline BlockSpec Spec(const std::string& id, const BlockConfig& c) {
  BlockSpec s;
  s.id = id;
  s.config = c;
  s.layer_index = 3;
  s.max_seq_len = 16;
  s.max_batch_size = 4;
  return s;
}

using TensorMap = std::map<std::string, std::vector<float>>;

class EngineFixture : public ::testing::Test {
 protected:
  static constexpr int64_t kBatch = 2, kSeq = 5;

  // Each test draws its own inputs (seeded by its name, so a failure reproduces).
  EngineFixture()
      : rng_(TestSeed(std::hash<std::string>()(::testing::UnitTest::GetInstance()->current_test_info()->name()))) {
    Reset({});
  }

  void Reset(EngineOptions options) { engine_ = std::make_unique<Engine>(MakeCpuBackend(), options); }

  absl::Status Create(const std::string& id, const BlockConfig& c, std::optional<uint64_t> seed) {
    CreateBlockParams p;
    p.spec = Spec(id, c);
    p.seed = seed;
    return engine_->CreateBlock(p).status();
  }

  // The block's tensors of `kind` as float32, by name.
  TensorMap Read(const std::string& id, TensorKind kind) {
    TensorMap out;
    auto tensors = engine_->ReadTensors(id, kind, DType::kFloat32, {});
    EXPECT_TRUE(tensors.ok()) << tensors.status();
    if (!tensors.ok()) return out;
    for (const NamedTensor& t : *tensors) {
      std::vector<float> v(t.bytes.size() / 4);
      std::memcpy(v.data(), t.bytes.data(), t.bytes.size());
      out[t.name] = std::move(v);
    }
    return out;
  }

  // Random weights for `c`: norm weights in [0.5, 1.5], matrices in 1.5x nn.Linear's range.
  TensorMap RandomWeights(const BlockConfig& c) {
    TensorMap w;
    for (const ParamSpec& p : BlockParams(c)) {
      const double bound = p.is_matrix ? 1.5 / std::sqrt(static_cast<double>(p.shape[1])) : 0;
      w[p.name] = Cast<float>(p.is_matrix ? rng_.Vec(p.numel(), -bound, bound) : rng_.Vec(p.numel(), 0.5, 1.5));
    }
    return w;
  }

  // Streams `weights` (float32) in chunks of `chunk_bytes`, last chunk first, through a
  // TensorAssembler into LoadWeights, as the gRPC service does.
  absl::Status Load(const std::string& id, const TensorMap& weights, size_t chunk_bytes = 52) {
    auto params = engine_->BlockParamsOf(id);
    if (!params.ok()) return params.status();
    TensorAssembler assembler(id, *params);
    for (const auto& [name, values] : weights) {
      const int index = FindParam(*params, name);
      const std::vector<int64_t> shape = index >= 0 ? (*params)[index].shape : std::vector<int64_t>{};
      const size_t total = values.size() * 4;
      std::vector<size_t> starts;
      for (size_t at = 0; at < total; at += chunk_bytes) starts.push_back(at);
      for (auto it = starts.rbegin(); it != starts.rend(); ++it) {
        const size_t len = std::min(chunk_bytes, total - *it);
        absl::Status s = assembler.Add(name, DType::kFloat32, shape, static_cast<int64_t>(*it),
                                       reinterpret_cast<const char*>(values.data()) + *it, len);
        if (!s.ok()) return s;
      }
    }
    auto tensors = assembler.Finish();
    if (!tensors.ok()) return tensors.status();
    return engine_->LoadWeights(id, std::move(*tensors)).status();
  }

  struct ForwardResult {
    std::vector<float> out;
    std::string activation_id;
  };

  absl::StatusOr<ForwardResult> Forward(const std::vector<std::string>& ids, const std::vector<float>& x,
                                        int64_t batch, int64_t seq, bool keep, int64_t offset = 0,
                                        const std::string& client = "") {
    ForwardArgs args;
    args.block_ids = ids;
    args.input = TensorArg{DType::kFloat32, {batch, seq, static_cast<int64_t>(x.size()) / (batch * seq)}, x.data(),
                           x.size() * 4};
    args.keep_activations = keep;
    args.position_offset = offset;
    args.client = client;
    std::string bytes;
    ForwardOutput out;
    out.output.data = &bytes;
    absl::Status s = engine_->Forward(args, &out);
    if (!s.ok()) return s;
    EXPECT_EQ(out.output.dtype, DType::kFloat32);
    EXPECT_EQ(out.output.shape, args.input.shape);
    ForwardResult r;
    r.out.resize(bytes.size() / 4);
    std::memcpy(r.out.data(), bytes.data(), bytes.size());
    r.activation_id = out.activation_id;
    return r;
  }

  absl::StatusOr<std::vector<float>> Backward(const std::string& activation_id, const std::vector<float>& dy,
                                              int64_t batch, int64_t seq, const std::string& caller = "") {
    TensorArg g{DType::kFloat32, {batch, seq, static_cast<int64_t>(dy.size()) / (batch * seq)}, dy.data(),
                dy.size() * 4};
    std::string bytes;
    TensorOut out;
    out.data = &bytes;
    absl::Status s = engine_->Backward(activation_id, caller, g, &out);
    if (!s.ok()) return s;
    EXPECT_EQ(out.dtype, DType::kFloat32);
    EXPECT_EQ(out.shape, g.shape);
    std::vector<float> dx(bytes.size() / 4);
    std::memcpy(dx.data(), bytes.data(), bytes.size());
    return dx;
  }

  // Forward with activations kept, then Backward with `dy`: the block's gradients get one more term.
  void TrainPass(const std::vector<std::string>& ids, const std::vector<float>& x, const std::vector<float>& dy) {
    auto f = Forward(ids, x, kBatch, kSeq, /*keep=*/true);
    ASSERT_TRUE(f.ok()) << f.status();
    auto dx = Backward(f->activation_id, dy, kBatch, kSeq);
    ASSERT_TRUE(dx.ok()) << dx.status();
  }

  // Opens a session on `ids` for kBatch rows of kSeq tokens and runs x [kBatch, kSeq, hidden] as its
  // prefill; returns the step's output.
  absl::StatusOr<std::vector<float>> SessionPrefill(const std::vector<std::string>& ids, const std::vector<float>& x) {
    OpenSessionArgs open;
    open.block_ids = ids;
    open.batch_size = kBatch;
    open.max_length = kSeq;
    auto session = engine_->OpenSession(open);
    if (!session.ok()) return session.status();
    InferStepArgs step;
    step.session_id = session->session_id;
    step.hidden_states = TensorArg{DType::kFloat32, {kBatch, kSeq, static_cast<int64_t>(x.size()) / (kBatch * kSeq)},
                                   x.data(), x.size() * 4};
    std::string bytes;
    InferStepOutput out;
    out.output.data = &bytes;
    absl::Status s = engine_->InferStep(step, &out);
    if (!s.ok()) return s;
    std::vector<float> y(bytes.size() / 4);
    std::memcpy(y.data(), bytes.data(), bytes.size());
    return y;
  }

  std::vector<float> RandomActivation(int64_t hidden, double scale = 1.0) {
    return Cast<float>(rng_.Vec(kBatch * kSeq * hidden, -scale, scale));
  }

  // ref::BlockWeights (double) from named float tensors.
  static ref::BlockWeights ToRef(const BlockConfig& c, const TensorMap& w) {
    ref::BlockWeights out;
    for (const ParamSpec& p : BlockParams(c)) out[static_cast<int>(p.id)] = Cast<double>(w.at(p.name));
    return out;
  }

  Rand rng_;
  std::unique_ptr<Engine> engine_;
};

}  // namespace blockd::testing
