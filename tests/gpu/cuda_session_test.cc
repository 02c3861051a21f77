// Inference sessions on the CUDA backend against CUDA Forward of the whole sequence and against
// the CPU backend's sessions (the oracle): prefill, single-token decode, a multi-token step on a
// cached prefix (the paged kernel's prefill case), trim and redo, fork, hypo_ids reordering,
// Qwen3-like (QK-norm, GQA) and Llama-like (GQA, llama3 RoPE scaling) configs, fp32 and bf16, and
// a long decode that splits the paged attention over the sequence; sessions of several families
// (and a fork) stepping concurrently in one batched launch, each equal to its own solo step.
//
// Bounds as cuda_block_test.cc: FP32 elementwise rtol 1e-5 (atol = rtol * max|ref|), BF16
// norm-wise 3.1e-2.
#include <cuda_runtime.h>

#include <cstring>
#include <iostream>
#include <thread>

#include "base/dtype.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/engine.h"
#include "tests/engine/step_barrier.h"
#include "tests/gpu/gpu_test_util.h"

namespace blockd::testing {
namespace {

struct SessionCase {
  std::string name;
  BlockConfig config;
  Precision precision;
  int64_t batch, seq;
};

std::ostream& operator<<(std::ostream& os, const SessionCase& c) { return os << c.name; }

// One engine with the span {"a", "b"} and helpers for its session calls.
class Side {
 public:
  // The CPU side computes in fp32 whatever the case's precision (it is the oracle).
  Side(std::unique_ptr<Backend> backend, const SessionCase& k, Precision precision, EngineOptions options = {})
      : engine_(std::move(backend), std::move(options)), k_(k) {
    for (const char* id : {"a", "b"}) {
      CreateBlockParams p;
      p.spec.id = id;
      p.spec.config = k.config;
      p.spec.max_seq_len = k.seq + 8;
      p.spec.max_batch_size = 16;  // four sessions of 3 rows in one launch
      p.precision = precision;
      p.seed = id[0];
      EXPECT_TRUE(engine_.CreateBlock(p).ok());
    }
  }
  int64_t d() const { return k_.config.hidden_size; }

  std::vector<float> Forward(const std::vector<float>& x, int64_t batch, int64_t seq) {
    std::string y;
    ForwardArgs args;
    args.block_ids = {"a", "b"};
    args.input = {DType::kFloat32, {batch, seq, d()}, x.data(), x.size() * 4};
    ForwardOutput fo;
    fo.output.data = &y;
    absl::Status s = engine_.Forward(args, &fo);
    EXPECT_TRUE(s.ok()) << s;
    std::vector<float> out(y.size() / 4);
    std::memcpy(out.data(), y.data(), y.size());
    return out;
  }
  std::string Open(const std::string& id) {
    OpenSessionArgs a;
    a.session_id = id;
    a.block_ids = {"a", "b"};
    a.batch_size = k_.batch;
    a.max_length = k_.seq;
    a.client = "alice";
    auto info = engine_.OpenSession(a);
    EXPECT_TRUE(info.ok()) << info.status();
    return id;
  }
  std::vector<float> Step(const std::string& id, const std::vector<float>& x, int64_t n,
                          std::vector<int32_t> hypo = {}) {
    const std::string bytes =
        StepBytes(id, DType::kFloat32, std::string(reinterpret_cast<const char*>(x.data()), x.size() * 4), n,
                  std::move(hypo));
    std::vector<float> out(bytes.size() / 4);
    std::memcpy(out.data(), bytes.data(), bytes.size());
    return out;
  }
  // The same with the step's bytes in `dtype`, in and out, as the wire has them.
  std::string StepBytes(const std::string& id, DType dtype, const std::string& x, int64_t n,
                        std::vector<int32_t> hypo = {}) {
    InferStepArgs a;
    a.session_id = id;
    a.client = "alice";
    a.hidden_states = TensorArg{dtype, {k_.batch, n, d()}, x.data(), x.size()};
    a.hypo_ids = std::move(hypo);
    std::string bytes;
    InferStepOutput o;
    o.output.data = &bytes;
    absl::Status s = engine_.InferStep(a, &o);
    EXPECT_TRUE(s.ok()) << s;
    EXPECT_EQ(o.output.dtype, dtype);
    return bytes;
  }
  Engine& engine() { return engine_; }

 private:
  Engine engine_;
  SessionCase k_;
};

// A Side on a CUDA backend of its own; null (with a failure) when there is none.
std::unique_ptr<Side> CudaSide(const SessionCase& k, EngineOptions options) {
  auto backend = MakeCudaBackend();
  EXPECT_TRUE(backend.ok()) << backend.status();
  if (!backend.ok()) return nullptr;
  return std::make_unique<Side>(std::move(backend).value(), k, k.precision, std::move(options));
}

// Tokens [t0, t1) of x [batch, seq, d].
std::vector<float> Slice(const std::vector<float>& x, int64_t batch, int64_t seq, int64_t d, int64_t t0, int64_t t1) {
  std::vector<float> out;
  for (int64_t b = 0; b < batch; ++b) {
    out.insert(out.end(), x.begin() + (b * seq + t0) * d, x.begin() + (b * seq + t1) * d);
  }
  return out;
}

// Writes part [batch, t1 - t0, d] into tokens [t0, t1) of x [batch, seq, d].
void Place(std::vector<float>* x, const std::vector<float>& part, int64_t batch, int64_t seq, int64_t d, int64_t t0,
           int64_t t1) {
  for (int64_t b = 0; b < batch; ++b) {
    std::copy(part.begin() + b * (t1 - t0) * d, part.begin() + (b + 1) * (t1 - t0) * d, x->begin() + (b * seq + t0) * d);
  }
}

class CudaSessionTest : public ::testing::TestWithParam<SessionCase> {};

TEST_P(CudaSessionTest, StepsMatchForwardAndTheCpuBackend) {
  SKIP_WITHOUT_GPU();
  const SessionCase& k = GetParam();
  auto gpu_backend = MakeCudaBackend();
  ASSERT_TRUE(gpu_backend.ok()) << gpu_backend.status();
  Side gpu(std::move(gpu_backend).value(), k, k.precision);
  Side cpu(MakeCpuBackend(), k, Precision::kFP32);
  const int64_t B = k.batch, S = k.seq, d = k.config.hidden_size;
  const auto x = RandomNormal(B * S * d, 91);
  const std::vector<float> ref = gpu.Forward(x, B, S);
  const std::vector<float> cpu_ref = cpu.Forward(x, B, S);

  // Prefill 17 (a fresh batch: Forward's attention), decode one at a time, a 5-token step over the
  // cached prefix, then decode to the end.
  std::vector<int64_t> cuts = {0, 17};
  for (int64_t t = 18; t <= 24; ++t) cuts.push_back(t);
  cuts.push_back(29);
  for (int64_t t = 30; t <= S; ++t) cuts.push_back(t);
  std::vector<float> got(x.size()), got_cpu(x.size());
  gpu.Open("s");
  cpu.Open("s");
  for (size_t i = 1; i < cuts.size(); ++i) {
    const auto part = Slice(x, B, S, d, cuts[i - 1], cuts[i]);
    Place(&got, gpu.Step("s", part, cuts[i] - cuts[i - 1]), B, S, d, cuts[i - 1], cuts[i]);
    Place(&got_cpu, cpu.Step("s", part, cuts[i] - cuts[i - 1]), B, S, d, cuts[i - 1], cuts[i]);
  }
  Check(k.name + " session vs CUDA Forward", k.precision, got, ref);
  Check(k.name + " CUDA session vs CPU session", k.precision, got, got_cpu);
  Check(k.name + " CPU session vs CPU Forward", Precision::kFP32, got_cpu, cpu_ref);

  // Trim back to 20 and redo the rest in one step: the same outputs.
  ASSERT_TRUE(gpu.engine().TrimSession("s", "alice", 20).ok());
  const auto redo = gpu.Step("s", Slice(x, B, S, d, 20, S), S - 20);
  Check(k.name + " after trim", k.precision, redo, Slice(ref, B, S, d, 20, S));

  // Fork at 24 and continue both with the same tokens: both equal Forward.
  ASSERT_TRUE(gpu.engine().TrimSession("s", "alice", 24).ok());
  ASSERT_TRUE(gpu.engine().ForkSession("s", "alice", "f").ok());
  const auto next = Slice(x, B, S, d, 24, 26);
  const auto from_s = gpu.Step("s", next, 2);
  const auto from_f = gpu.Step("f", next, 2);
  Check(k.name + " original after fork", k.precision, from_s, Slice(ref, B, S, d, 24, 26));
  Check(k.name + " fork", k.precision, from_f, Slice(ref, B, S, d, 24, 26));

  // Beam reorder: row i continues row hypo[i]'s prefix (of 26 tokens) with a new token.
  const std::vector<int32_t> hypo = {static_cast<int32_t>(B - 1), 0, 0};
  const auto fresh = RandomNormal(B * d, 92);
  std::vector<float> beams(B * 27 * d);
  for (int64_t r = 0; r < B; ++r) {
    const int64_t from = hypo[static_cast<size_t>(r)];
    std::copy(x.begin() + from * S * d, x.begin() + (from * S + 26) * d, beams.begin() + r * 27 * d);
    std::copy(fresh.begin() + r * d, fresh.begin() + (r + 1) * d, beams.begin() + (r * 27 + 26) * d);
  }
  const auto beam_ref = Slice(gpu.Forward(beams, B, 27), B, 27, d, 26, 27);
  Check(k.name + " hypo_ids", k.precision, gpu.Step("f", fresh, 1, hypo), beam_ref);
  // The original, which shares its pages with the fork, is unchanged by the fork's writes.
  const auto s_next = gpu.Step("s", Slice(x, B, S, d, 26, 27), 1);
  Check(k.name + " original after the fork's reorder", k.precision, s_next, Slice(ref, B, S, d, 26, 27));
}

// Continuous batching on CUDA: four sessions (three families, one fork sharing its parent's
// pages; rows at different lengths; hypo_ids on one step) step at once from threads and run as
// one launch per block, whose rows name pages of several stores; each output equals the same
// step run alone on an engine that never batches.
TEST_P(CudaSessionTest, ConcurrentSessionsEachEqualTheirSoloStep) {
  SKIP_WITHOUT_GPU();
  const SessionCase& k = GetParam();
  EngineOptions batching;
  batching.infer_batch_window = absl::Seconds(60);  // a bound: the launch goes once all four joined
  StepBarrier barrier;  // every step of a round is on its way before any joins (step_barrier.h)
  batching.on_infer_step_arrived = [&barrier] { barrier.Arrive(); };
  EngineOptions alone;
  alone.infer_batch_window = absl::ZeroDuration();
  const std::unique_ptr<Side> batched_side = CudaSide(k, batching), solo_side = CudaSide(k, alone);
  ASSERT_TRUE(batched_side && solo_side);
  Side &batched = *batched_side, &solo = *solo_side;
  const int64_t B = k.batch, d = k.config.hidden_size;
  const std::vector<std::string> ids = {"s0", "s1", "s2"};
  for (Side* side : {&batched, &solo}) {
    for (const std::string& id : ids) side->Open(id);
  }
  // Prefill 17 tokens on each (one launch of fresh rows), then set the lengths apart and fork s0.
  std::vector<std::vector<float>> prompts;
  for (size_t i = 0; i < ids.size(); ++i) prompts.push_back(RandomNormal(B * 17 * d, 200 + i));
  std::vector<std::vector<float>> got(ids.size());
  {
    barrier.Expect(static_cast<int64_t>(ids.size()));
    std::vector<std::thread> threads;
    for (size_t i = 0; i < ids.size(); ++i) {
      threads.emplace_back([&, i] { got[i] = batched.Step(ids[i], prompts[i], 17); });
    }
    for (std::thread& t : threads) t.join();
  }
  for (size_t i = 0; i < ids.size(); ++i) {
    Check(k.name + " batched prefill " + ids[i], k.precision, got[i], solo.Step(ids[i], prompts[i], 17));
  }
  for (Side* side : {&batched, &solo}) {
    ASSERT_TRUE(side->engine().TrimSession("s1", "alice", 9).ok());
    ASSERT_TRUE(side->engine().TrimSession("s2", "alice", 16).ok());
    ASSERT_TRUE(side->engine().ForkSession("s0", "alice", "f0").ok());
  }
  const int64_t launches_before = batched.engine().Stats().infer_launches;
  const std::vector<std::string> all = {"s0", "s1", "s2", "f0"};
  barrier.Expect(static_cast<int64_t>(all.size()));
  for (int step = 0; step < 4; ++step) {
    std::vector<std::vector<float>> x, out(all.size());
    for (size_t i = 0; i < all.size(); ++i) x.push_back(RandomNormal(B * d, 300 + 10 * step + i));
    const std::vector<int32_t> hypo = {static_cast<int32_t>(B - 1), 0, 0};
    std::vector<std::thread> threads;
    for (size_t i = 0; i < all.size(); ++i) {
      threads.emplace_back([&, i] {
        out[i] = batched.Step(all[i], x[i], 1, all[i] == "f0" && step == 1 ? hypo : std::vector<int32_t>{});
      });
    }
    for (std::thread& t : threads) t.join();
    for (size_t i = 0; i < all.size(); ++i) {
      const auto ref = solo.Step(all[i], x[i], 1, all[i] == "f0" && step == 1 ? hypo : std::vector<int32_t>{});
      Check(k.name + " batched decode " + std::to_string(step) + " " + all[i], k.precision, out[i], ref);
    }
  }
  const EngineStats stats = batched.engine().Stats();
  EXPECT_EQ(stats.infer_launches - launches_before, 4) << "each decode step of the four sessions: one launch";
  EXPECT_EQ(stats.infer_last_batch_sessions, 4);
}

std::vector<SessionCase> Cases() {
  BlockConfig llama = Config(128, 8, 2, 16, 192, false);
  llama.rope_scaling.rope_type = "llama3";
  llama.rope_scaling.factor = 8;
  llama.rope_scaling.low_freq_factor = 1;
  llama.rope_scaling.high_freq_factor = 4;
  llama.rope_scaling.original_max_position_embeddings = 16;
  const BlockConfig qwen3 = Config(96, 6, 2, 16, 160, true);
  const BlockConfig qwen3_dh64 = Config(256, 4, 2, 64, 320, true);
  return {
      {"qwen3_fp32", qwen3, Precision::kFP32, 3, 40},
      {"llama_fp32", llama, Precision::kFP32, 3, 40},
      {"qwen3_dh64_bf16", qwen3_dh64, Precision::kBF16, 3, 40},
      {"llama_bf16", llama, Precision::kBF16, 3, 40},
      // 300 positions: the decode steps split the attention over the sequence.
      {"llama_long_fp32", llama, Precision::kFP32, 3, 300},
  };
}

INSTANTIATE_TEST_SUITE_P(Configs, CudaSessionTest, ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<SessionCase>& i) { return i.param.name; });

// Decode steps replayed as a captured CUDA graph (infer_graphs, the default) give the same bits as
// the same steps launched block by block: across buckets of lengths (new captures), a trim back, a
// fork (the family's pages grow: a new capture), hypo_ids and 2-token steps; and they do replay.
TEST(CudaSessionGraphTest, ReplaysEqualBlockByBlockLaunches) {
  SKIP_WITHOUT_GPU();
  for (SessionCase k : {Cases()[3], Cases()[4]}) {  // bf16 (tensor-core attention) and fp32
    k.seq = 300;
    EngineOptions graphs;
    graphs.infer_batch_window = absl::ZeroDuration();
    EngineOptions eager = graphs;
    eager.infer_graphs = false;
    const std::unique_ptr<Side> g_side = CudaSide(k, graphs), e_side = CudaSide(k, eager);
    ASSERT_TRUE(g_side && e_side);
    Side &g = *g_side, &e = *e_side;
    const int64_t B = k.batch, d = k.config.hidden_size;
    uint64_t seed = 500;
    auto both = [&](const std::string& id, int64_t n, std::vector<int32_t> hypo = {}) {
      const auto x = RandomNormal(B * n * d, seed++);
      const auto a = g.Step(id, x, n, hypo);
      const auto b = e.Step(id, x, n, hypo);
      ASSERT_EQ(a.size(), b.size());
      EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * 4), 0) << k.name << " " << id << " step " << seed;
    };
    for (Side* side : {&g, &e}) side->Open("s");
    both("s", 20);                              // prefill
    for (int t = 20; t < 150; ++t) both("s", 1);  // buckets 1 to 3
    for (Side* side : {&g, &e}) {
      ASSERT_TRUE(side->engine().TrimSession("s", "alice", 100).ok());
      ASSERT_TRUE(side->engine().ForkSession("s", "alice", "f").ok());
    }
    const std::vector<int32_t> hypo = {static_cast<int32_t>(B - 1), 0, 0};
    for (int i = 0; i < 50; ++i) {  // s to 200, f to 210
      both("s", 1);
      both("s", 1);
      both("f", i % 5 == 0 ? 2 : 1, i == 10 ? hypo : std::vector<int32_t>{});  // now and then a 2-token key
      both("f", 1);
    }
    const EngineStats gs = g.engine().Stats(), es = e.engine().Stats();
    EXPECT_GT(gs.infer_graph_replays, 200) << k.name;  // of 340 decode steps
    EXPECT_GE(gs.infer_graph_captures, 5) << k.name;
    EXPECT_EQ(es.infer_graph_replays + es.infer_graph_captures + es.infer_graph_eager, 0) << k.name;
    std::cout << k.name << ": " << gs.infer_graph_replays << " replays, " << gs.infer_graph_captures
              << " captures, " << gs.infer_graph_eager << " steps launched block by block\n";
  }
}

// A step in bf16 or fp16 bytes through the graph (the input converted and the output rounded
// inside the captured launch, StepGraph::RunHost) gives the fp32 step of the same values, rounded
// to the dtype: eagerly, when captured and when replayed, and with a key that changes dtype.
TEST(CudaSessionGraphTest, HalfBytesThroughTheGraphEqualTheFloat32StepRounded) {
  SKIP_WITHOUT_GPU();
  SessionCase k = Cases()[3];  // llama_bf16
  EngineOptions o;
  o.infer_batch_window = absl::ZeroDuration();
  const std::unique_ptr<Side> side = CudaSide(k, o);
  ASSERT_TRUE(side);
  const int64_t B = k.batch, d = k.config.hidden_size;
  side->Open("half");
  side->Open("full");
  // The steps: a prefill (Upload and Download, no graph), then decode steps: eager, captured,
  // replayed; fp16 (its own capture: eager, captured, replayed); bf16 again.
  std::vector<std::pair<DType, int64_t>> steps = {{DType::kBFloat16, 12}};
  for (int t = 0; t < 6; ++t) steps.push_back({DType::kBFloat16, 1});
  for (int t = 0; t < 4; ++t) steps.push_back({DType::kFloat16, 1});
  for (int t = 0; t < 3; ++t) steps.push_back({DType::kBFloat16, 1});
  // The fp32 session first, so that the half session's graph counts stand alone.
  std::vector<std::vector<float>> xs, fulls;
  uint64_t seed = 900;
  for (const auto& [dtype, n] : steps) {
    std::vector<float> x = RandomNormal(B * n * d, seed++);
    std::string wire(x.size() * DTypeSize(dtype), '\0');
    ConvertFromFloat32(x.data(), x.size(), dtype, wire.data());
    ConvertToFloat32(dtype, wire.data(), x.size(), x.data());  // the values the wire carries
    fulls.push_back(side->Step("full", x, n));
    xs.push_back(std::move(x));
  }
  const EngineStats before = side->engine().Stats();
  for (size_t i = 0; i < steps.size(); ++i) {
    const auto [dtype, n] = steps[i];
    std::string wire(xs[i].size() * DTypeSize(dtype), '\0');
    ConvertFromFloat32(xs[i].data(), xs[i].size(), dtype, wire.data());
    const std::string got = side->StepBytes("half", dtype, wire, n);
    std::string want(fulls[i].size() * DTypeSize(dtype), '\0');
    ConvertFromFloat32(fulls[i].data(), fulls[i].size(), dtype, want.data());
    ASSERT_EQ(got.size(), want.size());
    EXPECT_EQ(got, want) << "step " << i << (dtype == DType::kBFloat16 ? " bf16" : " fp16");
  }
  const EngineStats after = side->engine().Stats();
  // bf16: eager, captured, 4 replays; fp16: eager, captured, 2 replays; bf16: eager, captured, 1.
  EXPECT_EQ(after.infer_graph_captures - before.infer_graph_captures, 3);
  EXPECT_EQ(after.infer_graph_replays - before.infer_graph_replays, 7);
  EXPECT_EQ(after.infer_graph_eager - before.infer_graph_eager, 3);
}

}  // namespace
}  // namespace blockd::testing
