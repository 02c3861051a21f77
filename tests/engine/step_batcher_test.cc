// StepBatcher on its own: who leads, who joins, when a batch closes (every step on its way came,
// max_rows reached, a step that does not fit, a step that left, the window), and that Finish
// wakes the members. Windows are long bounds that the tests never wait out, except the one test
// of the window itself; the tests that a step does not wait check that it came back well before
// its window would have passed.
#include "engine/step_batcher.h"

#include <algorithm>
#include <thread>
#include <vector>

#include "absl/time/clock.h"
#include "gtest/gtest.h"

namespace blockd {
namespace {

struct FakeStep {
  int id = 0;
  int64_t rows = 1;
  bool batch_done = false;
  int ran_by = -1;  // the leader that ran it
};

// Each thread joins with its step (which arrived before); a leader marks its batch's steps as run
// by it, then finishes.
void JoinAndRun(StepBatcher<FakeStep>& batcher, FakeStep* s, const std::string& key, int64_t max_rows) {
  std::vector<FakeStep*> batch = batcher.Join(key, s, max_rows);
  if (batch.empty()) return;
  EXPECT_EQ(batch[0], s) << "the leader comes first in its batch";
  for (FakeStep* m : batch) m->ran_by = s->id;
  batcher.Finish(batch);
}

void ArriveN(StepBatcher<FakeStep>& batcher, const std::string& key, int n) {
  for (int i = 0; i < n; ++i) batcher.Arrive(key);
}

TEST(StepBatcherTest, AWindowOfZeroRunsEveryStepAlone) {
  StepBatcher<FakeStep> batcher(absl::ZeroDuration());
  ArriveN(batcher, "k", 5);
  FakeStep s{.id = 1};
  JoinAndRun(batcher, &s, "k", /*max_rows=*/8);
  EXPECT_EQ(s.ran_by, 1);
}

TEST(StepBatcherTest, ALeaderLaunchesOnceEveryStepOnItsWayJoined) {
  StepBatcher<FakeStep> batcher(absl::Seconds(60));
  ArriveN(batcher, "k", 4);
  std::vector<FakeStep> steps(4);
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    steps[i].id = i;
    threads.emplace_back([&, i] { JoinAndRun(batcher, &steps[i], "k", /*max_rows=*/8); });
  }
  for (std::thread& t : threads) t.join();
  const int leader = steps[0].ran_by;
  for (const FakeStep& s : steps) EXPECT_EQ(s.ran_by, leader) << "step " << s.id << " ran in another batch";
}

TEST(StepBatcherTest, MaxRowsSplitsBatchesAndKeysNeverMix) {
  StepBatcher<FakeStep> batcher(absl::Seconds(60));
  // Four steps of 2 rows with max_rows 4: each batch closes full, with two steps.
  ArriveN(batcher, "k", 4);
  std::vector<FakeStep> steps(4);
  for (int i = 0; i < 4; ++i) steps[i] = FakeStep{.id = i, .rows = 2};
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] { JoinAndRun(batcher, &steps[i], "k", /*max_rows=*/4); });
  }
  // Another key alone: it never waits for the first key's steps (none other of its key: at once).
  batcher.Arrive("other");
  FakeStep other{.id = 9};
  JoinAndRun(batcher, &other, "other", /*max_rows=*/4);
  EXPECT_EQ(other.ran_by, 9);
  for (std::thread& t : threads) t.join();
  std::vector<int> leaders;
  for (const FakeStep& s : steps) leaders.push_back(s.ran_by);
  std::sort(leaders.begin(), leaders.end());
  EXPECT_EQ(leaders[0], leaders[1]);
  EXPECT_EQ(leaders[2], leaders[3]);
  EXPECT_NE(leaders[1], leaders[2]) << "four steps of 2 rows need two batches of at most 4 rows";
}

TEST(StepBatcherTest, AStepThatDoesNotFitLaunchesTheOpenBatchAndLeadsTheNext) {
  StepBatcher<FakeStep> batcher(absl::Seconds(60));
  ArriveN(batcher, "k", 2);  // both steps are on their way: the first waits for the second
  FakeStep first{.id = 1, .rows = 3};
  std::thread t([&] { JoinAndRun(batcher, &first, "k", /*max_rows=*/4); });
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (batcher.OpenRows("k") != 3 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(1));
  ASSERT_EQ(batcher.OpenRows("k"), 3) << "the first step never opened its batch";
  // 3 + 4 rows > 4: the open batch launches as it is; this step (4 rows: full at once) runs alone.
  FakeStep second{.id = 2, .rows = 4};
  JoinAndRun(batcher, &second, "k", /*max_rows=*/4);
  t.join();
  EXPECT_EQ(first.ran_by, 1);
  EXPECT_EQ(second.ran_by, 2);
  EXPECT_EQ(batcher.OpenRows("k"), 0);
}

TEST(StepBatcherTest, TheWindowBoundsTheWaitForStepsThatNeverCome) {
  StepBatcher<FakeStep> batcher(absl::Milliseconds(20));
  ArriveN(batcher, "k", 10);
  FakeStep s{.id = 3};
  JoinAndRun(batcher, &s, "k", /*max_rows=*/8);  // nine more arrived but never come
  EXPECT_EQ(s.ran_by, 3);
}

// Nothing else on its way: the step launches at once, however long the window.
TEST(StepBatcherTest, ALoneStepDoesNotWaitTheWindow) {
  const absl::Duration window = absl::Seconds(60);
  StepBatcher<FakeStep> batcher(window);
  for (int i = 0; i < 3; ++i) {
    const absl::Time start = absl::Now();
    batcher.Arrive("k");
    FakeStep s{.id = i};
    JoinAndRun(batcher, &s, "k", /*max_rows=*/8);
    EXPECT_EQ(s.ran_by, i);
    EXPECT_LT(absl::Now() - start, window / 2) << "step " << i << " waited for steps that were not coming";
  }
  EXPECT_EQ(batcher.Coming("k"), 0);
}

// A step that arrived and then left (refused before joining) lets the leader waiting for it go.
TEST(StepBatcherTest, AStepThatLeavesLetsItsLeaderLaunch) {
  const absl::Duration window = absl::Seconds(60);
  StepBatcher<FakeStep> batcher(window);
  ArriveN(batcher, "k", 2);
  FakeStep first{.id = 1};
  const absl::Time start = absl::Now();
  std::thread t([&] { JoinAndRun(batcher, &first, "k", /*max_rows=*/8); });
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (batcher.OpenRows("k") != 1 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(1));
  ASSERT_EQ(batcher.OpenRows("k"), 1) << "the first step should wait for the second, on its way";
  EXPECT_EQ(batcher.Coming("k"), 1);
  batcher.Leave("k");
  t.join();
  EXPECT_EQ(first.ran_by, 1);
  EXPECT_LT(absl::Now() - start, window / 2) << "the leader waited out its window for a step that left";
  EXPECT_EQ(batcher.Coming("k"), 0);
  EXPECT_EQ(batcher.OpenRows("k"), 0);
}

}  // namespace
}  // namespace blockd
