// The Engine's side of StepGraph (engine_sessions.cc) on the CPU backend, through a backend that
// hands out recording graphs: which steps go through a session's graph, the keys they carry (a new
// one per 64-position bucket, per token count and after a fork grows the pages), the tables they
// stage (every row's start, then its page table padded to whole buckets) and, with infer_graphs
// off, the one staging per span with every step run eagerly. The CUDA graphs themselves
// are tested against block-by-block launches by tests/gpu/cuda_session_test.cc.
#include <limits>
#include <string>
#include <vector>

#include "base/status_macros.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/engine.h"
#include "gtest/gtest.h"
#include "tests/engine/engine_fixture.h"

namespace blockd::testing {
namespace {

// Runs every step's launches as they come and records what the Engine gave it.
class RecordingGraph : public StepGraph {
 public:
  absl::StatusOr<const int32_t*> StageMeta(const std::vector<int32_t>& meta) override {
    metas.push_back(meta);
    return metas.back().data();  // the CPU blocks read the host tables; nothing reads this
  }
  absl::StatusOr<std::unique_ptr<Activation>> Run(const StepGraphKey& key, const Activation& input,
                                                  const Launches& launches) override {
    return absl::InternalError("the Engine runs its steps through RunHost");
  }
  absl::Status RunHost(const StepGraphKey& key, const HostStep& step, const Launches& launches,
                       bool capture) override {
    keys.push_back(key);
    captures.push_back(capture);
    ++counts_.eager;
    // UploadChecked: the Engine found the values finite (the CPU's Upload would check them again).
    ASSIGN_OR_RETURN(auto x, cpu_->UploadChecked(0, step.dtype, step.input, step.batch, step.seq, step.width));
    ASSIGN_OR_RETURN(auto y, launches(*x));
    output = step.output;
    return cpu_->Download(*y, step.dtype, &queued);
  }
  absl::Status FinishHost() override {
    if (output == nullptr) return absl::InternalError("FinishHost without a RunHost");
    *output = std::move(queued);
    output = nullptr;
    return absl::OkStatus();
  }
  Counts counts() const override { return counts_; }

  std::vector<std::vector<int32_t>> metas;
  std::vector<StepGraphKey> keys;
  std::vector<bool> captures;  // each RunHost's `capture`
  std::string queued;          // RunHost's output until FinishHost
  std::string* output = nullptr;

 private:
  Counts counts_;
  std::unique_ptr<Backend> cpu_ = MakeCpuBackend();
};

// The CPU backend, with a RecordingGraph for every session that asks.
class GraphBackend : public Backend {
 public:
  absl::string_view name() const override { return cpu_->name(); }
  std::vector<DeviceInfo> devices() const override { return cpu_->devices(); }
  Precision default_precision() const override { return cpu_->default_precision(); }
  absl::Status Supports(const BlockSpec& spec) const override { return cpu_->Supports(spec); }
  size_t BlockBytes(const BlockSpec& spec) const override { return cpu_->BlockBytes(spec); }
  absl::StatusOr<std::unique_ptr<Block>> CreateBlock(const BlockSpec& spec) override {
    return cpu_->CreateBlock(spec);
  }
  absl::StatusOr<std::unique_ptr<Activation>> Upload(int device, DType dtype, const void* data, int64_t batch,
                                                     int64_t seq, int64_t width) override {
    return cpu_->Upload(device, dtype, data, batch, seq, width);
  }
  absl::StatusOr<std::unique_ptr<Activation>> UploadChecked(int device, DType dtype, const void* data,
                                                            int64_t batch, int64_t seq, int64_t width) override {
    return cpu_->UploadChecked(device, dtype, data, batch, seq, width);
  }
  absl::Status Download(const Activation& a, DType dtype, std::string* dst) override {
    return cpu_->Download(a, dtype, dst);
  }
  absl::StatusOr<std::unique_ptr<Activation>> ToDevice(const Activation& a, int device) override {
    return cpu_->ToDevice(a, device);
  }
  absl::StatusOr<std::unique_ptr<StepGraph>> NewStepGraph(int device) override {
    auto g = std::make_unique<RecordingGraph>();
    graphs->push_back(g.get());
    return std::unique_ptr<StepGraph>(std::move(g));
  }

  std::shared_ptr<std::vector<RecordingGraph*>> graphs = std::make_shared<std::vector<RecordingGraph*>>();

 private:
  std::unique_ptr<Backend> cpu_ = MakeCpuBackend();
};

class StepGraphTest : public ::testing::Test {
 protected:
  void Start(bool graphs) {
    auto backend = std::make_unique<GraphBackend>();
    graphs_ = backend->graphs;
    EngineOptions o;
    o.infer_batch_window = absl::ZeroDuration();
    o.infer_graphs = graphs;
    engine_ = std::make_unique<Engine>(std::move(backend), o);
    for (const char* id : {"a", "b"}) {
      CreateBlockParams p;
      p.spec = Spec(id, Config(/*qk_norm=*/true));
      p.spec.max_seq_len = 256;
      p.seed = id[0];
      ASSERT_TRUE(engine_->CreateBlock(p).ok());
    }
    OpenSessionArgs a;
    a.session_id = "s";
    a.block_ids = {"a", "b", "a"};  // a block twice: one graph for the span all the same
    a.batch_size = kRows;
    a.max_length = 256;
    a.client = "alice";
    ASSERT_TRUE(engine_->OpenSession(a).ok());
  }
  void Step(const std::string& id, int64_t n) {
    const std::vector<float> x(static_cast<size_t>(kRows * n * 16), 0.25f);
    InferStepArgs a;
    a.session_id = id;
    a.client = "alice";
    a.hidden_states = TensorArg{DType::kFloat32, {kRows, n, 16}, x.data(), x.size() * 4};
    std::string bytes;
    InferStepOutput out;
    out.output.data = &bytes;
    const absl::Status s = engine_->InferStep(a, &out);
    ASSERT_TRUE(s.ok()) << s;
  }
  RecordingGraph& Graph(size_t i) { return *graphs_->at(i); }

  static constexpr int64_t kRows = 2;
  std::shared_ptr<std::vector<RecordingGraph*>> graphs_;
  std::unique_ptr<Engine> engine_;
};

TEST_F(StepGraphTest, DecodeStepsCarryKeysThatMoveWithBucketsTokensAndForks) {
  ASSERT_NO_FATAL_FAILURE(Start(/*graphs=*/true));
  ASSERT_NO_FATAL_FAILURE(Step("s", 10));  // a prefill: not through the graph
  ASSERT_EQ(graphs_->size(), 1u);
  EXPECT_TRUE(Graph(0).keys.empty());
  for (int t = 10; t < 70; ++t) ASSERT_NO_FATAL_FAILURE(Step("s", 1));
  const RecordingGraph& g = Graph(0);
  ASSERT_EQ(g.keys.size(), 60u);
  ASSERT_EQ(g.metas.size(), 60u);  // one staging per step for the whole span of three
  EXPECT_EQ(g.captures, std::vector<bool>(60, true));
  for (size_t i = 0; i < g.keys.size(); ++i) {
    const int64_t start = 10 + static_cast<int64_t>(i);
    const StepGraphKey& k = g.keys[i];
    EXPECT_EQ(k.rows, kRows);
    EXPECT_EQ(k.new_tokens, 1);
    EXPECT_EQ(k.length_bucket, (start + 1 + 63) / 64) << "start " << start;
    EXPECT_EQ(k.table_width % 4, 0) << "whole 64-position buckets of 16-token pages";
    EXPECT_GE(k.table_width * 16, k.length_bucket * 64);
    // Every row's start, then its page table: pages for its positions, -1 after.
    const std::vector<int32_t>& meta = g.metas[i];
    ASSERT_EQ(static_cast<int64_t>(meta.size()), kRows + kRows * k.table_width);
    for (int64_t r = 0; r < kRows; ++r) {
      EXPECT_EQ(meta[r], start);
      for (int64_t p = 0; p < k.table_width; ++p) {
        const int32_t page = meta[kRows + r * k.table_width + p];
        if (p * 16 < start + 1) {
          EXPECT_GE(page, 0) << "row " << r << " page " << p;
        } else {
          EXPECT_EQ(page, -1) << "row " << r << " page " << p;
        }
      }
    }
  }
  // Within a bucket the key holds; across, it moves.
  EXPECT_TRUE(g.keys[0] == g.keys[52]);   // starts 10 and 62: lengths 11 and 63
  EXPECT_FALSE(g.keys[53] == g.keys[54]);  // lengths 64 and 65

  // Two new tokens: another key. Seventeen: prefill-like, not through the graph.
  const StepGraphKey before = g.keys.back();
  ASSERT_NO_FATAL_FAILURE(Step("s", 2));
  EXPECT_EQ(g.keys.back().new_tokens, 2);
  ASSERT_NO_FATAL_FAILURE(Step("s", 17));
  EXPECT_EQ(g.keys.size(), 61u);

  // A fork grows the family's stores: the parent's next key names more pages; the fork has a
  // graph of its own.
  ASSERT_TRUE(engine_->ForkSession("s", "alice", "f").ok());
  ASSERT_NO_FATAL_FAILURE(Step("s", 1));
  EXPECT_GT(g.keys.back().pages, before.pages);
  ASSERT_NO_FATAL_FAILURE(Step("f", 1));
  ASSERT_EQ(graphs_->size(), 2u);
  EXPECT_EQ(Graph(1).keys.size(), 1u);
  EXPECT_EQ(Graph(1).keys[0].pages, g.keys.back().pages);
}

// With batching off nothing checked a graph step's values before it reached the Engine's launch,
// and the graph takes them to the device as bytes: the Engine checks them itself, and a bad step
// reaches neither the tables nor the graph and leaves the session as it was.
TEST_F(StepGraphTest, ANonFiniteDecodeStepIsRefusedBeforeTheGraph) {
  ASSERT_NO_FATAL_FAILURE(Start(/*graphs=*/true));
  ASSERT_NO_FATAL_FAILURE(Step("s", 10));
  ASSERT_NO_FATAL_FAILURE(Step("s", 1));
  std::vector<float> x(static_cast<size_t>(kRows * 16), 0.5f);
  x[21] = std::numeric_limits<float>::quiet_NaN();
  InferStepArgs a;
  a.session_id = "s";
  a.client = "alice";
  a.hidden_states = TensorArg{DType::kFloat32, {kRows, 1, 16}, x.data(), x.size() * 4};
  std::string bytes;
  InferStepOutput out;
  out.output.data = &bytes;
  const absl::Status s = engine_->InferStep(a, &out);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("non-finite value (nan) at element 21"), std::string::npos) << s;
  EXPECT_EQ(Graph(0).keys.size(), 1u) << "the bad step reached the graph";
  EXPECT_EQ(Graph(0).metas.size(), 1u);
  const auto sessions = engine_->ListSessions("alice");
  ASSERT_EQ(sessions.size(), 1u);
  EXPECT_EQ(sessions[0].length, 11);
}

TEST_F(StepGraphTest, WithGraphsOffTheSpanStillStagesItsTablesOnceAndRunsEagerly) {
  ASSERT_NO_FATAL_FAILURE(Start(/*graphs=*/false));
  ASSERT_NO_FATAL_FAILURE(Step("s", 10));
  for (int t = 0; t < 5; ++t) ASSERT_NO_FATAL_FAILURE(Step("s", 1));
  ASSERT_EQ(graphs_->size(), 1u);
  EXPECT_EQ(Graph(0).metas.size(), 5u);
  EXPECT_EQ(Graph(0).captures, std::vector<bool>(5, false)) << "every step eagerly, none captured";
  const EngineStats stats = engine_->Stats();
  EXPECT_EQ(stats.infer_graph_replays + stats.infer_graph_captures + stats.infer_graph_eager, 0);
}

}  // namespace
}  // namespace blockd::testing
