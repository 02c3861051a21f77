// LoRA on the CUDA backend against the CPU backend (the oracle, fp32), through the Engine: frozen
// and trainable blocks, FP32 and BF16, every target at rank 4 and three targets at rank 3 (odd
// column offsets in U and dU); the forward output, the input gradient, every trained gradient,
// the grad norm, one AdamW step (against torch's update of the GPU's own gradients), a frozen
// base bitwise unchanged, a frozen block's memory (the base in the compute dtype plus the
// adapters' state), and an inference session's prefill and decode steps.
//
// Weights and inputs are rounded through bf16 for the BF16 cases, so that the comparison is of
// the arithmetic. Bounds as cuda_block_test.cc: FP32 elementwise rtol 1e-5 (atol = rtol *
// max|ref|), BF16 norm-wise 3.1e-2.
#include <cuda_runtime.h>

#include <cmath>
#include <cstring>
#include <map>

#include "engine/cpu/cpu_backend.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/engine.h"
#include "engine/tensor_assembler.h"
#include "tests/gpu/engine_calls.h"
#include "tests/gpu/gpu_test_util.h"

namespace blockd::testing {
namespace {

struct LoraCase {
  std::string name;
  Precision precision;
  bool frozen;
  LoraConfig lora;
};
std::ostream& operator<<(std::ostream& os, const LoraCase& c) { return os << c.name; }

std::vector<float> Floats(const std::string& bytes) {
  std::vector<float> v(bytes.size() / 4);
  std::memcpy(v.data(), bytes.data(), bytes.size());
  return v;
}

constexpr int64_t kMaxSeq = 64, kMaxBatch = 8;

BlockConfig TestConfig() {
  BlockConfig c = Config(128, 4, 2, 32, 256, /*qk=*/true);
  c.attention_bias = true;
  return c;
}

// One engine with block "b" of the case and random weights (B random too: PEFT's zero B would hide
// every path through A), and its calls.
class Side {
 public:
  Side(std::unique_ptr<Backend> backend, const LoraCase& k, Precision precision,
       const std::map<std::string, std::vector<float>>& weights)
      : engine_(std::move(backend), EngineOptions{}) {
    CreateBlockParams p;
    p.spec.id = "b";
    p.spec.config = TestConfig();
    p.spec.frozen = k.frozen;
    p.spec.lora = k.lora;
    p.spec.max_seq_len = kMaxSeq;
    p.spec.max_batch_size = kMaxBatch;
    p.precision = precision;
    auto info = engine_.CreateBlock(p);
    EXPECT_TRUE(info.ok()) << info.status();
    std::vector<AssembledTensor> tensors;
    const std::vector<ParamSpec> params = BlockParams(p.spec.config, k.lora);
    for (size_t i = 0; i < params.size(); ++i) {
      const std::vector<float>& w = weights.at(params[i].name);
      tensors.push_back({static_cast<int>(i), DType::kFloat32, std::string(reinterpret_cast<const char*>(w.data()),
                                                                          w.size() * 4)});
    }
    auto missing = engine_.LoadWeights("b", std::move(tensors));
    EXPECT_TRUE(missing.ok()) << missing.status();
  }
  Engine& engine() { return engine_; }

  // Forward then Backward of x, dy [batch, seq, d]: the output and the input gradient.
  std::pair<std::vector<float>, std::vector<float>> ForwardBackward(const std::vector<float>& x,
                                                                    const std::vector<float>& dy, int64_t batch,
                                                                    int64_t seq) {
    std::string out, dx;
    testing::ForwardBackward(engine_, {"b"}, x, dy, {batch, seq, TestConfig().hidden_size}, &out, &dx);
    return {Floats(out), Floats(dx)};
  }

  std::map<std::string, std::vector<float>> Read(TensorKind kind) {
    std::map<std::string, std::vector<float>> out;
    auto t = engine_.ReadTensors("b", kind, DType::kFloat32, {});
    EXPECT_TRUE(t.ok()) << t.status();
    if (!t.ok()) return out;
    for (const NamedTensor& n : *t) out[n.name] = Floats(n.bytes);
    return out;
  }

  std::vector<float> InferStep(const std::string& session, const std::vector<float>& x, int64_t batch, int64_t n) {
    InferStepArgs a;
    a.session_id = session;
    a.client = "alice";
    a.hidden_states = TensorArg{DType::kFloat32, {batch, n, TestConfig().hidden_size}, x.data(), x.size() * 4};
    std::string bytes;
    InferStepOutput o;
    o.output.data = &bytes;
    absl::Status s = engine_.InferStep(a, &o);
    EXPECT_TRUE(s.ok()) << s;
    return Floats(bytes);
  }

 private:
  Engine engine_;
};

LoraConfig Lora(int32_t rank, double alpha, std::vector<std::string> targets) {
  LoraConfig l;
  l.rank = rank;
  l.alpha = alpha;
  l.target_modules = std::move(targets);
  return l;
}
const std::vector<std::string> kAll = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};

class CudaLoraTest : public ::testing::TestWithParam<LoraCase> {};

TEST_P(CudaLoraTest, MatchesTheCpuBackend) {
  SKIP_WITHOUT_GPU();
  const LoraCase& k = GetParam();
  const BlockConfig c = TestConfig();
  const bool bf16 = k.precision == Precision::kBF16;
  auto round = [&](std::vector<float> v) { return bf16 ? RoundBf16(v) : v; };
  std::map<std::string, std::vector<float>> weights;
  uint64_t seed = 100;
  for (const ParamSpec& p : BlockParams(c, k.lora)) {
    const float scale = p.is_matrix ? 1.f / std::sqrt(static_cast<float>(p.shape[1])) : 0.1f;
    weights[p.name] = round(RandomNormal(p.numel(), ++seed, scale, p.is_matrix ? 0.f : 1.f));
  }
  Side cpu(MakeCpuBackend(), k, Precision::kFP32, weights);
  auto backend = MakeCudaBackend();
  ASSERT_TRUE(backend.ok()) << backend.status();
  Side gpu(std::move(backend).value(), k, k.precision, weights);

  // Memory: a frozen block holds its base in the compute dtype; the adapters add their fp32
  // weights, gradients and moments (and a bf16 copy for BF16) and nothing else.
  if (k.frozen) {
    CreateBlockParams plain;
    plain.spec.id = "plain";
    plain.spec.config = c;
    plain.spec.frozen = true;
    plain.spec.max_seq_len = kMaxSeq;  // as "b": the same attention workspace
    plain.spec.max_batch_size = kMaxBatch;
    plain.precision = k.precision;
    auto info = gpu.engine().CreateBlock(plain);
    ASSERT_TRUE(info.ok()) << info.status();
    const int64_t adapters = ParameterCount(c, k.lora) - ParameterCount(c);
    EXPECT_EQ(gpu.engine().GetBlock("b")->memory_bytes - info->memory_bytes, (bf16 ? 18 : 16) * adapters);
    ASSERT_TRUE(gpu.engine().DeleteBlock("plain").ok());
  }

  const int64_t batch = 2, seq = 19, d = c.hidden_size;
  const auto x = round(RandomNormal(batch * seq * d, 7));
  const auto dy = round(RandomNormal(batch * seq * d, 8));
  auto [out_ref, dx_ref] = cpu.ForwardBackward(x, dy, batch, seq);
  auto [out, dx] = gpu.ForwardBackward(x, dy, batch, seq);
  Check("output", k.precision, out, out_ref);
  Check("input gradient", k.precision, dx, dx_ref);

  const auto g_ref = cpu.Read(TensorKind::kGradients);
  const auto g = gpu.Read(TensorKind::kGradients);
  ASSERT_EQ(g.size(), g_ref.size());
  for (const auto& [name, ref] : g_ref) {
    ASSERT_TRUE(g.count(name)) << name;
    // Only the adapters (and every parameter of a trainable block) have gradients.
    EXPECT_TRUE(!k.frozen || name.find(".lora_") != std::string::npos) << name;
    Check("gradient " + name, k.precision, g.at(name), ref);
  }

  // Sessions: a prefill of 5 tokens then three decoded tokens, each against the CPU's steps (before
  // the step below, while both sides hold the same weights).
  for (Side* s : {&cpu, &gpu}) {
    OpenSessionArgs a;
    a.session_id = "s";
    a.block_ids = {"b"};
    a.batch_size = batch;
    a.max_length = 8;
    a.client = "alice";
    auto info = s->engine().OpenSession(a);
    ASSERT_TRUE(info.ok()) << info.status();
  }
  const auto prompt = round(RandomNormal(batch * 5 * d, 9));
  Check("session prefill", k.precision, gpu.InferStep("s", prompt, batch, 5), cpu.InferStep("s", prompt, batch, 5));
  // Three decoded tokens: on CUDA the first runs block by block, the second is captured as a CUDA
  // graph with the adapters' products, the third replays it (StepGraph).
  for (int t = 0; t < 3; ++t) {
    const auto next = round(RandomNormal(batch * 1 * d, 10 + t));
    Check("session decode " + std::to_string(t), k.precision, gpu.InferStep("s", next, batch, 1),
          cpu.InferStep("s", next, batch, 1));
  }
  const EngineStats graphs = gpu.engine().Stats();
  EXPECT_EQ(graphs.infer_graph_captures, 1);
  EXPECT_EQ(graphs.infer_graph_replays, 1);

  // One AdamW step. Adam divides by sqrt(v) ~ |g|, so an element whose gradient is within rounding
  // of zero moves either way; comparing steps taken from the two backends' own gradients would
  // measure that. So the GPU's step is checked against torch's AdamW on the GPU's own gradients
  // (step 1: w (1 - lr wd) - lr g / (|g| + eps), decay on matrices), in double on the host.
  const auto w0 = gpu.Read(TensorKind::kWeights);
  AdamWHyper h;
  h.lr = 1e-2;
  h.weight_decay = 0.1;
  auto stepped_ref = cpu.engine().Step({"b"}, h, 0);
  auto stepped = gpu.engine().Step({"b"}, h, 0);
  ASSERT_TRUE(stepped_ref.ok() && stepped.ok()) << stepped_ref.status() << " " << stepped.status();
  EXPECT_NEAR(stepped->grad_norm, stepped_ref->grad_norm, (bf16 ? 3.1e-2 : 1e-5) * stepped_ref->grad_norm);
  const auto w1 = gpu.Read(TensorKind::kWeights), m1 = gpu.Read(TensorKind::kAdamM);
  for (const ParamSpec& p : BlockParams(c, k.lora)) {
    const std::vector<float>& before = w0.at(p.name);
    if (k.frozen && !IsLoraParam(p.id)) {
      // The base: exactly what was loaded (bf16 values already for BF16), before and after.
      EXPECT_TRUE(before == weights.at(p.name) && w1.at(p.name) == before) << "frozen base weight " << p.name;
      continue;
    }
    const std::vector<float>& grad = g.at(p.name);
    std::vector<float> update(before.size());
    std::vector<double> want(before.size()), want_m(before.size());
    const double decay = p.is_matrix ? h.weight_decay : 0.0;
    for (size_t e = 0; e < before.size(); ++e) {
      update[e] = w1.at(p.name)[e] - before[e];
      want[e] = -h.lr * decay * before[e] - h.lr * grad[e] / (std::fabs(double(grad[e])) + h.eps);
      want_m[e] = (1 - h.beta1) * grad[e];
    }
    ExpectClose("step update " + p.name, update, want, 1e-5);
    ExpectClose("adam_m " + p.name, m1.at(p.name), want_m, 1e-5);
  }

}

std::vector<LoraCase> Cases() {
  std::vector<LoraCase> out;
  for (Precision p : {Precision::kFP32, Precision::kBF16}) {
    for (bool frozen : {true, false}) {
      const std::string stem = std::string(p == Precision::kBF16 ? "bf16" : "fp32") + (frozen ? "_frozen" : "_trainable");
      out.push_back({stem + "_all_rank4", p, frozen, Lora(4, 8, kAll)});
      out.push_back({stem + "_q_v_down_rank3", p, frozen, Lora(3, 6, {"q_proj", "v_proj", "down_proj"})});
    }
  }
  return out;
}

INSTANTIATE_TEST_SUITE_P(Cases, CudaLoraTest, ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<LoraCase>& i) { return i.param.name; });

}  // namespace
}  // namespace blockd::testing
