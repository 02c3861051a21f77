// Continuous batching over gRPC: four clients, each with its own session on the same span, step
// at once on their own Infer streams against a server that batches; every response is byte for
// byte the one a server that never batches gives for the same steps, one at a time, and the
// server's engine counted one launch per round of steps. The gathering window is long (a bound,
// never waited out): a leader launches as soon as every step on its way has joined, and a barrier
// in the engine's on_infer_step_arrived hook makes the four steps of a round all be on their way
// before any joins, so the rounds merge whatever the streams' timing.
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "tests/engine/step_barrier.h"
#include "tests/integration/harness.h"

namespace blockd::testing {
namespace {

constexpr int64_t kHidden = 32, kMaxLen = 32, kPrompt = 8, kDecode = 6;

std::unique_ptr<Server> StartWithWindow(absl::Duration window, StepBarrier* barrier = nullptr,
                                        bool with_metrics = false) {
  ServerOptions o = LoopbackOptions(with_metrics);
  o.worker_threads = 8;  // a step waiting for its batch holds a worker
  o.engine.infer_batch_window = window;
  if (barrier != nullptr) o.engine.on_infer_step_arrived = [barrier] { barrier->Arrive(); };
  return StartServer(std::move(o));
}

v1::InferStepRequest StepRequest(const std::string& id, v1::Tensor x) {
  v1::InferStepRequest r;
  r.set_session_id(id);
  *r.mutable_hidden_states() = std::move(x);
  return r;
}

TEST(SessionBatchingRpc, ConcurrentStreamsAnswerWhatStepsOneAtATimeAnswer) {
  StepBarrier barrier;
  auto batched = StartWithWindow(absl::Seconds(60), &barrier);
  auto solo = StartWithWindow(absl::ZeroDuration());
  ASSERT_TRUE(batched && solo);
  const std::vector<std::string> names = {"alice", "bob", "carol", "dave"};
  const std::vector<int64_t> batch = {1, 2, 1, 3};
  std::vector<std::unique_ptr<Client>> on_batched, on_solo;
  for (const std::string& n : names) {
    on_batched.push_back(ConnectTo(*batched, {.client_id = n}));
    on_solo.push_back(ConnectTo(*solo, {.client_id = n}));
  }
  for (Client* c : {on_batched[0].get(), on_solo[0].get()}) {
    for (int i = 0; i < 2; ++i) {
      ASSERT_OK(c->CreateBlock(CreateRequest(absl::StrCat("b", i), TinyConfig(/*qk_norm=*/true), 17 + i,
                                             /*max_batch_size=*/8, /*max_seq_len=*/kMaxLen))
                    .status());
    }
  }
  // Each client's steps: a prompt, then one token at a time.
  std::vector<std::vector<v1::Tensor>> steps(names.size());
  for (size_t i = 0; i < names.size(); ++i) {
    steps[i].push_back(RandomTensor({batch[i], kPrompt, kHidden}, 100 + i));
    for (int t = 0; t < kDecode; ++t) steps[i].push_back(RandomTensor({batch[i], 1, kHidden}, 200 + 10 * i + t));
  }
  auto open = [&](Client& c, size_t i) {
    v1::OpenSessionRequest r;
    r.set_session_id(absl::StrCat("sess-", names[i]));
    r.add_block_ids("b0");
    r.add_block_ids("b1");
    r.set_batch_size(batch[i]);
    r.set_max_length(kMaxLen);
    return c.OpenSession(r).status();
  };
  for (size_t i = 0; i < names.size(); ++i) {
    ASSERT_OK(open(*on_batched[i], i));
    ASSERT_OK(open(*on_solo[i], i));
  }

  barrier.Expect(static_cast<int64_t>(names.size()));  // every round: the four streams' steps
  std::vector<std::vector<std::string>> got(names.size());
  std::vector<absl::Status> failed(names.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < names.size(); ++i) {
    threads.emplace_back([&, i] {
      auto stream = on_batched[i]->OpenInferStream();
      if (!stream.ok()) {
        failed[i] = stream.status();
        return;
      }
      for (const v1::Tensor& x : steps[i]) {
        auto y = (*stream)->Step(StepRequest(absl::StrCat("sess-", names[i]), x));
        if (!y.ok()) {
          failed[i] = y.status();
          return;
        }
        got[i].push_back(y->hidden_states().data());
      }
      failed[i] = (*stream)->Close();
    });
  }
  for (std::thread& t : threads) t.join();

  for (size_t i = 0; i < names.size(); ++i) {
    ASSERT_OK(failed[i]) << names[i];
    ASSERT_EQ(got[i].size(), steps[i].size()) << names[i];
    for (size_t t = 0; t < steps[i].size(); ++t) {
      auto y = on_solo[i]->InferStep(StepRequest(absl::StrCat("sess-", names[i]), steps[i][t]));
      ASSERT_OK(y.status()) << names[i] << " step " << t << " alone";
      EXPECT_TRUE(y->hidden_states().data() == got[i][t])
          << names[i] << " step " << t << ": the batched output differs from the same step alone";
    }
  }
  // One launch per round: the prompts together, then each decode step of the four together.
  const EngineStats stats = batched->engine().Stats();
  EXPECT_EQ(stats.infer_launches, 1 + kDecode);
  EXPECT_EQ(stats.infer_launched_steps, static_cast<int64_t>(names.size()) * (1 + kDecode));
  EXPECT_EQ(solo->engine().Stats().infer_last_batch_sessions, 1);
}

// /metrics shows the sizes of launches: two clients' steps (1 and 2 rows) batched into one launch,
// then one step alone, are two observations of blockd_session_launch_sessions (2 and 1) and of
// blockd_session_launch_rows (3 and 2).
TEST(SessionBatchingRpc, MetricsCountTheSessionsAndRowsOfEachLaunch) {
  StepBarrier barrier;
  auto server = StartWithWindow(absl::Seconds(60), &barrier, /*with_metrics=*/true);
  ASSERT_NE(server, nullptr);
  ASSERT_GT(server->metrics_port(), 0);
  auto alice = ConnectTo(*server, {.client_id = "alice"});
  auto bob = ConnectTo(*server, {.client_id = "bob"});
  ASSERT_OK(alice->CreateBlock(CreateRequest("b0", TinyConfig(), 17, /*max_batch_size=*/8, kMaxLen)).status());
  const std::vector<Client*> clients = {alice.get(), bob.get()};
  const std::vector<int64_t> rows = {1, 2};
  for (size_t i = 0; i < clients.size(); ++i) {
    v1::OpenSessionRequest r;
    r.set_session_id("s");  // the same id: each identity has its own
    r.add_block_ids("b0");
    r.set_batch_size(rows[i]);
    r.set_max_length(kMaxLen);
    ASSERT_OK(clients[i]->OpenSession(r).status());
  }
  barrier.Expect(2);
  std::vector<absl::Status> got(clients.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < clients.size(); ++i) {
    threads.emplace_back([&, i] {
      got[i] = clients[i]->InferStep(StepRequest("s", RandomTensor({rows[i], 3, kHidden}, 300 + i))).status();
    });
  }
  for (std::thread& t : threads) t.join();
  for (const absl::Status& st : got) ASSERT_OK(st);
  barrier.Expect(0);
  ASSERT_OK(bob->InferStep(StepRequest("s", RandomTensor({2, 1, kHidden}, 310))).status());
  EXPECT_EQ(server->engine().Stats().infer_launches, 2);

  const std::string body = HttpGetBody(server->metrics_port(), "/metrics");
  ASSERT_FALSE(body.empty()) << "no 200 reply from the metrics port " << server->metrics_port();
  EXPECT_NE(body.find("# TYPE blockd_session_launch_sessions histogram"), std::string::npos) << body;
  EXPECT_NE(body.find("# TYPE blockd_session_launch_rows histogram"), std::string::npos) << body;
  EXPECT_EQ(MetricValue(body, "blockd_session_launch_sessions_count", {}), 2) << body;
  EXPECT_EQ(MetricValue(body, "blockd_session_launch_sessions_sum", {}), 3) << body;
  EXPECT_EQ(MetricValue(body, "blockd_session_launch_sessions_bucket", {"le=\"1\""}), 1) << body;
  EXPECT_EQ(MetricValue(body, "blockd_session_launch_sessions_bucket", {"le=\"2\""}), 2) << body;
  EXPECT_EQ(MetricValue(body, "blockd_session_launch_rows_count", {}), 2) << body;
  EXPECT_EQ(MetricValue(body, "blockd_session_launch_rows_sum", {}), 5) << body;
  EXPECT_EQ(MetricValue(body, "blockd_session_launch_rows_bucket", {"le=\"2\""}), 1) << body;
  EXPECT_EQ(MetricValue(body, "blockd_session_launch_rows_bucket", {"le=\"4\""}), 2) << body;
}

}  // namespace
}  // namespace blockd::testing
