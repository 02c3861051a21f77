// StepBatcher on its own: who leads, who joins, when a batch closes (every expected step came,
// max_rows reached, a step that does not fit, the window), and that Finish wakes the members.
// Windows are long bounds that the tests never wait out, except the one test of the window itself.
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

// Each thread joins with its step; a leader marks its batch's steps as run by it, then finishes.
void JoinAndRun(StepBatcher<FakeStep>& batcher, FakeStep* s, const std::string& key, int64_t expected,
                int64_t max_rows) {
  std::vector<FakeStep*> batch = batcher.Join(key, s, expected, max_rows);
  if (batch.empty()) return;
  EXPECT_EQ(batch[0], s) << "the leader comes first in its batch";
  for (FakeStep* m : batch) m->ran_by = s->id;
  batcher.Finish(key, batch);
}

TEST(StepBatcherTest, AWindowOfZeroRunsEveryStepAlone) {
  StepBatcher<FakeStep> batcher(absl::ZeroDuration());
  FakeStep s{.id = 1};
  JoinAndRun(batcher, &s, "k", /*expected=*/5, /*max_rows=*/8);
  EXPECT_EQ(s.ran_by, 1);
}

TEST(StepBatcherTest, ALeaderLaunchesOnceEveryExpectedStepJoined) {
  StepBatcher<FakeStep> batcher(absl::Seconds(60));
  std::vector<FakeStep> steps(4);
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    steps[i].id = i;
    threads.emplace_back([&, i] { JoinAndRun(batcher, &steps[i], "k", /*expected=*/4, /*max_rows=*/8); });
  }
  for (std::thread& t : threads) t.join();
  const int leader = steps[0].ran_by;
  for (const FakeStep& s : steps) EXPECT_EQ(s.ran_by, leader) << "step " << s.id << " ran in another batch";
}

TEST(StepBatcherTest, MaxRowsSplitsBatchesAndKeysNeverMix) {
  StepBatcher<FakeStep> batcher(absl::Seconds(60));
  // Four steps of 2 rows with max_rows 4: each batch closes full, with two steps.
  std::vector<FakeStep> steps(4);
  for (int i = 0; i < 4; ++i) steps[i] = FakeStep{.id = i, .rows = 2};
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] { JoinAndRun(batcher, &steps[i], "k", /*expected=*/100, /*max_rows=*/4); });
  }
  // Another key alone: it never waits for the first key's steps (expected 1: full at once).
  FakeStep other{.id = 9};
  JoinAndRun(batcher, &other, "other", /*expected=*/1, /*max_rows=*/4);
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
  FakeStep first{.id = 1, .rows = 3};
  std::thread t([&] { JoinAndRun(batcher, &first, "k", /*expected=*/100, /*max_rows=*/4); });
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (batcher.OpenRows("k") != 3 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(1));
  ASSERT_EQ(batcher.OpenRows("k"), 3) << "the first step never opened its batch";
  // 3 + 4 rows > 4: the open batch launches as it is; this step (4 rows: full at once) runs alone.
  FakeStep second{.id = 2, .rows = 4};
  JoinAndRun(batcher, &second, "k", /*expected=*/100, /*max_rows=*/4);
  t.join();
  EXPECT_EQ(first.ran_by, 1);
  EXPECT_EQ(second.ran_by, 2);
  EXPECT_EQ(batcher.OpenRows("k"), 0);
}

TEST(StepBatcherTest, TheWindowBoundsTheWaitForStepsThatNeverCome) {
  StepBatcher<FakeStep> batcher(absl::Milliseconds(20));
  FakeStep s{.id = 3};
  JoinAndRun(batcher, &s, "k", /*expected=*/10, /*max_rows=*/8);  // nine more never come
  EXPECT_EQ(s.ran_by, 3);
}

}  // namespace
}  // namespace blockd
