// Continuous batching of inference-session steps over the CPU backend: sessions stepping
// concurrently from threads (different batch sizes, lengths trimmed apart so rows sit at different
// positions and cross page boundaries, forks sharing pages with their parent in the same launch,
// hypo_ids) give bitwise the outputs of the same steps run one at a time on an engine that never
// batches; the launch counter shows the steps really merged; a bad step among them fails alone.
// The gathering window is long (a bound, never waited out): a leader launches as soon as every
// step on its way has joined, and a barrier (step_barrier.h) makes every step of a round count as
// on its way before any joins, so the merge does not depend on thread timing. A lone step among
// idle sessions does not wait the window at all.
#include <cstring>
#include <limits>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "engine/engine.h"
#include "gtest/gtest.h"
#include "tests/engine/engine_fixture.h"
#include "tests/engine/step_barrier.h"

namespace blockd::testing {
namespace {

using absl::StatusCode;

constexpr int64_t kMaxLen = 48;  // three KV pages of 16 tokens

struct Outcome {
  absl::Status status;
  std::vector<float> out;
  int64_t length = 0;
};

// One step of one session: its id, input and hypo_ids.
struct StepIn {
  std::string id;
  std::vector<float> x;
  int64_t batch = 0, n = 0;
  std::vector<int32_t> hypo;
};

class SessionBatchingTest : public EngineFixture {
 protected:
  SessionBatchingTest() {
    Reset(Batching(absl::Seconds(60)));
    EngineOptions solo;
    solo.infer_batch_window = absl::ZeroDuration();
    solo_ = std::make_unique<Engine>(MakeCpuBackend(), solo);
  }

  // Options of the batching engine, its launches recorded in launches_.
  EngineOptions Batching(absl::Duration window) {
    EngineOptions o;
    o.infer_batch_window = window;
    o.on_infer_batch = [this](int64_t sessions, int64_t rows) {
      absl::MutexLock l(&launches_mu_);
      launches_.push_back({sessions, rows});
    };
    o.on_infer_step_arrived = [this] { barrier_.Arrive(); };
    return o;
  }

  // The same blocks (same seeds) on both engines.
  void CreateSpan(const BlockConfig& c, const std::vector<std::string>& ids) {
    for (Engine* e : {engine_.get(), solo_.get()}) {
      for (size_t i = 0; i < ids.size(); ++i) {
        CreateBlockParams p;
        p.spec = Spec(ids[i], c);
        p.spec.max_seq_len = kMaxLen;
        p.spec.max_batch_size = 16;
        p.seed = 21 + i;
        ASSERT_TRUE(e->CreateBlock(p).ok());
      }
    }
  }

  void OpenBoth(const std::vector<std::string>& ids, const std::string& id, int64_t batch) {
    for (Engine* e : {engine_.get(), solo_.get()}) {
      OpenSessionArgs a;
      a.session_id = id;
      a.block_ids = ids;
      a.batch_size = batch;
      a.max_length = kMaxLen;
      a.client = "alice";
      ASSERT_TRUE(e->OpenSession(a).ok());
    }
  }

  static Outcome Run(Engine& e, const StepIn& s) {
    InferStepArgs a;
    a.session_id = s.id;
    a.client = "alice";
    a.hidden_states = TensorArg{DType::kFloat32, {s.batch, s.n, s.x.empty() ? 0 : static_cast<int64_t>(s.x.size()) /
                                                                                      (s.batch * s.n)},
                                s.x.data(), s.x.size() * 4};
    a.hypo_ids = s.hypo;
    std::string bytes;
    InferStepOutput o;
    o.output.data = &bytes;
    Outcome r;
    r.status = e.InferStep(a, &o);
    r.out.resize(bytes.size() / 4);
    if (!r.out.empty()) std::memcpy(r.out.data(), bytes.data(), r.out.size() * 4);  // none for a refused step
    r.length = o.length;
    return r;
  }

  // The steps on the batching engine, all at once from threads; then on the solo engine one at a time.
  std::pair<std::vector<Outcome>, std::vector<Outcome>> RunBoth(const std::vector<StepIn>& steps) {
    std::vector<Outcome> batched(steps.size()), solo(steps.size());
    barrier_.Expect(static_cast<int64_t>(steps.size()));
    std::vector<std::thread> threads;
    for (size_t i = 0; i < steps.size(); ++i) {
      threads.emplace_back([&, i] { batched[i] = Run(*engine_, steps[i]); });
    }
    for (std::thread& t : threads) t.join();
    for (size_t i = 0; i < steps.size(); ++i) solo[i] = Run(*solo_, steps[i]);
    return {batched, solo};
  }

  // Bitwise: a row computed beside other sessions' rows must be the row computed alone.
  static void ExpectSame(const std::vector<StepIn>& steps, const std::vector<Outcome>& batched,
                         const std::vector<Outcome>& solo, const std::string& phase) {
    for (size_t i = 0; i < steps.size(); ++i) {
      ASSERT_TRUE(batched[i].status.ok()) << phase << " session " << steps[i].id << ": " << batched[i].status;
      ASSERT_TRUE(solo[i].status.ok()) << phase << " session " << steps[i].id << " (solo): " << solo[i].status;
      EXPECT_EQ(batched[i].length, solo[i].length) << phase << " session " << steps[i].id;
      ASSERT_EQ(batched[i].out.size(), solo[i].out.size()) << phase << " session " << steps[i].id;
      for (size_t k = 0; k < solo[i].out.size(); ++k) {
        if (std::memcmp(&batched[i].out[k], &solo[i].out[k], 4) != 0) {
          ADD_FAILURE() << phase << " session " << steps[i].id << " output[" << k << "]: batched "
                        << batched[i].out[k] << ", alone " << solo[i].out[k];
          break;
        }
      }
    }
  }

  StepIn Decode(const std::string& id, int64_t batch, int64_t hidden, std::vector<int32_t> hypo = {}) {
    return StepIn{id, Cast<float>(rng_.Vec(batch * hidden, -1, 1)), batch, 1, std::move(hypo)};
  }

  std::vector<std::pair<int64_t, int64_t>> TakeLaunches() {
    absl::MutexLock l(&launches_mu_);
    return std::exchange(launches_, {});
  }

  void TrimBoth(const std::string& id, int64_t length) {
    for (Engine* e : {engine_.get(), solo_.get()}) ASSERT_TRUE(e->TrimSession(id, "alice", length).ok());
  }

  std::unique_ptr<Engine> solo_;
  StepBarrier barrier_;  // the batching engine's steps of a round meet here before joining
  absl::Mutex launches_mu_;
  std::vector<std::pair<int64_t, int64_t>> launches_ ABSL_GUARDED_BY(launches_mu_);  // (sessions, rows)
};

TEST_F(SessionBatchingTest, ConcurrentStepsEqualTheSameStepsRunOneAtATime) {
  const BlockConfig c = Config(/*qk_norm=*/true, /*kv_heads=*/2);
  const int64_t d = c.hidden_size;
  CreateSpan(c, {"b0", "b1"});
  const std::vector<std::string> span = {"b0", "b1"};
  const std::vector<std::pair<std::string, int64_t>> sessions = {{"s0", 1}, {"s1", 2}, {"s2", 1}, {"s3", 3}};
  for (const auto& [id, batch] : sessions) OpenBoth(span, id, batch);

  // One prefill of 20 tokens each, in one launch (the rows all fresh).
  std::vector<StepIn> steps;
  for (const auto& [id, batch] : sessions) steps.push_back({id, Cast<float>(rng_.Vec(batch * 20 * d, -1, 1)), batch, 20, {}});
  auto [b, s] = RunBoth(steps);
  ExpectSame(steps, b, s, "prefill");
  auto launches = TakeLaunches();
  ASSERT_EQ(launches.size(), 1u) << "the four prefills should have run as one launch";
  EXPECT_EQ(launches[0].first, 4);
  EXPECT_EQ(launches[0].second, 7);

  // Lengths trimmed apart, so the rows of one launch sit at different positions, some about to
  // cross into a new page; then decode steps, all sessions at once.
  TrimBoth("s0", 15);
  TrimBoth("s1", 20);
  TrimBoth("s2", 9);
  TrimBoth("s3", 16);
  for (int step = 0; step < 3; ++step) {
    steps.clear();
    for (const auto& [id, batch] : sessions) steps.push_back(Decode(id, batch, d));
    auto [bd, sd] = RunBoth(steps);
    ExpectSame(steps, bd, sd, "decode " + std::to_string(step));
  }
  launches = TakeLaunches();
  ASSERT_EQ(launches.size(), 3u) << "each decode step of the four sessions should be one launch";
  for (const auto& [n, rows] : launches) {
    EXPECT_EQ(n, 4);
    EXPECT_EQ(rows, 7);
  }
  EngineStats stats = engine_->Stats();
  EXPECT_EQ(stats.infer_launches, 4);
  EXPECT_EQ(stats.infer_launched_steps, 16);
  EXPECT_EQ(stats.infer_last_batch_sessions, 4);
}

TEST_F(SessionBatchingTest, ForksAndHypoIdsStayExactInOneLaunch) {
  const BlockConfig c = Config(/*qk_norm=*/false, /*kv_heads=*/1);
  const int64_t d = c.hidden_size;
  CreateSpan(c, {"b0"});
  OpenBoth({"b0"}, "beam", 3);
  OpenBoth({"b0"}, "other", 2);
  std::vector<StepIn> steps = {{"beam", Cast<float>(rng_.Vec(3 * 18 * d, -1, 1)), 3, 18, {}},
                               {"other", Cast<float>(rng_.Vec(2 * 18 * d, -1, 1)), 2, 18, {}}};
  auto [b, s] = RunBoth(steps);
  ExpectSame(steps, b, s, "prefill");
  // A fork shares the parent's pages (its family's store): both step in the same launch as a
  // session of another family, each copying the shared partial page before writing it.
  for (Engine* e : {engine_.get(), solo_.get()}) ASSERT_TRUE(e->ForkSession("beam", "alice", "beam-fork").ok());
  TakeLaunches();
  for (int step = 0; step < 3; ++step) {
    steps = {Decode("beam", 3, d, {2, 0, 0}), Decode("beam-fork", 3, d, step == 1 ? std::vector<int32_t>{1, 1, 2}
                                                                                    : std::vector<int32_t>{}),
             Decode("other", 2, d)};
    auto [bd, sd] = RunBoth(steps);
    ExpectSame(steps, bd, sd, "decode " + std::to_string(step));
  }
  auto launches = TakeLaunches();
  ASSERT_EQ(launches.size(), 3u);
  for (const auto& [n, rows] : launches) {
    EXPECT_EQ(n, 3);
    EXPECT_EQ(rows, 8);
  }
}

TEST_F(SessionBatchingTest, ABadStepFailsAloneAndLeavesItsSessionAsItWas) {
  // The bad step is on its way, then refused before it joins: the good steps' leader stops waiting
  // for it at once (the window is a bound never waited out).
  Reset(Batching(absl::Seconds(60)));
  const BlockConfig c = Config(/*qk_norm=*/true);
  const int64_t d = c.hidden_size;
  CreateSpan(c, {"b0"});
  for (const char* id : {"good0", "bad", "good1"}) OpenBoth({"b0"}, id, 2);
  std::vector<StepIn> steps;
  for (const char* id : {"good0", "bad", "good1"}) steps.push_back({id, Cast<float>(rng_.Vec(2 * 5 * d, -1, 1)), 2, 5, {}});
  auto [b, s] = RunBoth(steps);
  ExpectSame(steps, b, s, "prefill");
  TakeLaunches();

  std::vector<StepIn> bad_steps = {Decode("good0", 2, d), Decode("bad", 2, d), Decode("good1", 2, d)};
  bad_steps[1].x[d + 3] = std::numeric_limits<float>::quiet_NaN();
  std::vector<Outcome> got(3);
  barrier_.Expect(3);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < 3; ++i) threads.emplace_back([&, i] { got[i] = Run(*engine_, bad_steps[i]); });
  for (std::thread& t : threads) t.join();
  EXPECT_TRUE(HasError(got[1].status, StatusCode::kInvalidArgument, "hidden_states has a non-finite value"));
  // The good steps ran, as they run alone.
  std::vector<StepIn> good = {bad_steps[0], bad_steps[2]};
  std::vector<Outcome> good_got = {got[0], got[2]};
  std::vector<Outcome> good_solo = {Run(*solo_, good[0]), Run(*solo_, good[1])};
  ExpectSame(good, good_got, good_solo, "decode beside a bad step");
  const auto launches = TakeLaunches();
  ASSERT_EQ(launches.size(), 1u) << "the good steps should have run as one launch";
  EXPECT_EQ(launches[0].first, 2) << "the bad step must not have joined the launch";

  // The bad session is as it was: its next good step equals the same step alone.
  steps = {Decode("bad", 2, d), Decode("good0", 2, d), Decode("good1", 2, d)};
  auto [ba, sa] = RunBoth(steps);
  ExpectSame(steps, ba, sa, "after the bad step");
  EXPECT_EQ(ba[0].length, 6);
}

TEST_F(SessionBatchingTest, StepsOfDifferentLengthsOrSpansDoNotMerge) {
  const BlockConfig c = Config(/*qk_norm=*/false);
  const int64_t d = c.hidden_size;
  Reset(Batching(absl::Seconds(60)));  // each key has no other step on its way: none waits
  CreateSpan(c, {"b0", "b1"});
  OpenBoth({"b0"}, "a", 1);
  OpenBoth({"b0"}, "b", 1);
  OpenBoth({"b1"}, "c", 1);
  std::vector<StepIn> steps = {{"a", Cast<float>(rng_.Vec(3 * d, -1, 1)), 1, 3, {}},
                               {"b", Cast<float>(rng_.Vec(4 * d, -1, 1)), 1, 4, {}},
                               {"c", Cast<float>(rng_.Vec(3 * d, -1, 1)), 1, 3, {}}};
  auto [b, s] = RunBoth(steps);
  ExpectSame(steps, b, s, "prefill");
  auto launches = TakeLaunches();
  EXPECT_EQ(launches.size(), 3u) << "different new_tokens or another span must each run alone";
  for (const auto& [n, rows] : launches) EXPECT_EQ(n, 1);
}

// One session generating among several open and idle ones on the same span (two never stepped,
// two stepped once long before): its steps are the only ones on their way, so each launches at
// once instead of waiting the gathering window for sessions that are not coming.
TEST_F(SessionBatchingTest, ALoneStepAmongIdleSessionsDoesNotWaitTheWindow) {
  const absl::Duration window = absl::Seconds(3);
  Reset(Batching(window));
  const BlockConfig c = Config(/*qk_norm=*/false);
  const int64_t d = c.hidden_size;
  CreateSpan(c, {"b0", "b1"});
  for (const char* id : {"active", "idle0", "idle1", "idle2", "idle3"}) OpenBoth({"b0", "b1"}, id, 2);
  for (const char* id : {"idle2", "idle3"}) {
    ASSERT_TRUE(Run(*engine_, {id, Cast<float>(rng_.Vec(2 * 4 * d, -1, 1)), 2, 4, {}}).status.ok());
  }
  TakeLaunches();
  std::vector<StepIn> steps = {{"active", Cast<float>(rng_.Vec(2 * 5 * d, -1, 1)), 2, 5, {}}};
  for (int i = 0; i < 4; ++i) steps.push_back(Decode("active", 2, d));
  for (size_t i = 0; i < steps.size(); ++i) {
    const absl::Time start = absl::Now();
    const Outcome got = Run(*engine_, steps[i]);
    const absl::Duration took = absl::Now() - start;
    ASSERT_TRUE(got.status.ok()) << "step " << i << ": " << got.status;
    EXPECT_LT(took, window) << "step " << i << " of the only active session waited out the gathering window";
    EXPECT_EQ(got.out, Run(*solo_, steps[i]).out) << "step " << i;
  }
  const auto launches = TakeLaunches();
  ASSERT_EQ(launches.size(), steps.size());
  for (const auto& [n, rows] : launches) {
    EXPECT_EQ(n, 1);
    EXPECT_EQ(rows, 2);
  }
}

}  // namespace
}  // namespace blockd::testing
