// server/thread_pool: every submitted task runs exactly once, on up to `threads` threads at once,
// in submission order on one thread; Submit() never waits for a worker; destruction runs what is
// still queued before it joins. Each with and without a spinning worker (ThreadPool's `spin`); work
// queued while a worker spins wakes the others. (The pool has no queue limit or per-task
// deadline: admission, the concurrent-RPC limit and expired deadlines, is BlockServiceImpl::Admit()'s
// job.)
#include "server/thread_pool.h"

#include <atomic>
#include <memory>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace blockd {
namespace {

// The pool under test with the case's `spin`: none (workers sleep at once), or a worker watching
// the queue for 2 ms.
class TestPool : public ThreadPool {
 public:
  explicit TestPool(int threads) : ThreadPool(threads, spin) {}
  static absl::Duration spin;
};
absl::Duration TestPool::spin;

class ThreadPoolTest : public ::testing::TestWithParam<absl::Duration> {
 protected:
  void SetUp() override { TestPool::spin = GetParam(); }
};

TEST_P(ThreadPoolTest, RunsEveryTaskExactlyOnceFromManySubmitters) {
  constexpr int kSubmitters = 4, kPerSubmitter = 500;
  std::vector<std::atomic<int>> runs(kSubmitters * kPerSubmitter);
  {
    TestPool pool(3);
    std::vector<std::thread> submitters;
    for (int s = 0; s < kSubmitters; ++s) {
      submitters.emplace_back([&, s] {
        for (int i = 0; i < kPerSubmitter; ++i) pool.Submit([&runs, k = s * kPerSubmitter + i] { ++runs[k]; });
      });
    }
    for (std::thread& t : submitters) t.join();
  }  // the destructor drains the queue
  for (size_t k = 0; k < runs.size(); ++k) ASSERT_EQ(runs[k].load(), 1) << "task " << k;
}

// Four tasks that each wait for all four to have started can only finish on four threads at once.
TEST_P(ThreadPoolTest, RunsUpToItsThreadCountAtOnce) {
  constexpr int kThreads = 4;
  absl::Mutex mu;
  int started = 0, saw_all = 0, done = 0;
  std::set<std::thread::id> threads;
  TestPool pool(kThreads);  // declared last: joined before what its tasks touch goes away
  for (int i = 0; i < kThreads; ++i) {
    pool.Submit([&] {
      absl::MutexLock lock(&mu);
      ++started;
      threads.insert(std::this_thread::get_id());
      if (mu.AwaitWithTimeout(absl::Condition(+[](int* n) { return *n == kThreads; }, &started), absl::Seconds(30))) {
        ++saw_all;
      }
      ++done;
    });
  }
  absl::MutexLock lock(&mu);
  ASSERT_TRUE(mu.AwaitWithTimeout(absl::Condition(+[](int* n) { return *n == kThreads; }, &done), absl::Seconds(60)));
  EXPECT_EQ(saw_all, kThreads) << "the tasks did not all run at the same time";
  EXPECT_EQ(threads.size(), static_cast<size_t>(kThreads));
}

TEST_P(ThreadPoolTest, OneThreadRunsTasksInSubmissionOrder) {
  std::vector<int> order;  // only the pool's one thread writes it, and the destructor joins it
  {
    TestPool pool(1);
    for (int i = 0; i < 200; ++i) pool.Submit([&order, i] { order.push_back(i); });
  }
  ASSERT_EQ(order.size(), 200u);
  for (int i = 0; i < 200; ++i) ASSERT_EQ(order[i], i);
}

// gRPC's callback threads hand work to the pool; Submit() must return while every worker is busy.
TEST_P(ThreadPoolTest, SubmitDoesNotWaitForABusyPool) {
  absl::Notification release;
  std::atomic<int> ran{0};
  TestPool pool(1);
  pool.Submit([&] { release.WaitForNotification(); });
  for (int i = 0; i < 10000; ++i) pool.Submit([&] { ++ran; });
  EXPECT_EQ(ran.load(), 0) << "tasks ran while the only worker was blocked";
  release.Notify();
}

TEST_P(ThreadPoolTest, DestructionRunsWhatIsQueuedThenJoins) {
  absl::Notification release;
  std::atomic<int> ran{0};
  auto pool = std::make_unique<TestPool>(2);
  for (int i = 0; i < 2; ++i) pool->Submit([&] { release.WaitForNotification(); ++ran; });
  for (int i = 0; i < 1000; ++i) pool->Submit([&] { ++ran; });
  std::thread destroyer([&] { pool.reset(); });
  absl::SleepFor(absl::Milliseconds(50));  // let the destructor start while both workers are blocked
  EXPECT_EQ(ran.load(), 0);
  release.Notify();
  destroyer.join();
  EXPECT_EQ(ran.load(), 1002) << "tasks queued before destruction were dropped";
}

// One task at a time, each submitted at a random moment around the end of the previous one's
// spin: every one must run (a lost wake-up leaves a task queued with every worker asleep, and the
// wait below times out). A smoke test: the moment a spinner gives up is too short to hit often.
TEST_P(ThreadPoolTest, WorkHandedOverAroundTheSpinsEndRuns) {
  const absl::Duration spin = GetParam() > absl::ZeroDuration() ? absl::Microseconds(200) : absl::ZeroDuration();
  ThreadPool pool(2, spin);
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> after_us(0, 400);
  for (int i = 0; i < 1000; ++i) {
    absl::Notification done;
    pool.Submit([&done] { done.Notify(); });
    ASSERT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(10))) << "task " << i << " never ran";
    absl::SleepFor(absl::Microseconds(after_us(rng)));
  }
}

// Rounds of as many tasks as threads, each waiting for all of its round to start, submitted at
// once while a worker spins (the pause between rounds is shorter than the spin): the worker that
// takes the first must wake the others for the rest, which no Submit woke.
TEST_P(ThreadPoolTest, WorkQueuedWhileAWorkerSpinsWakesTheOthers) {
  constexpr int kThreads = 4;
  TestPool pool(kThreads);
  for (int round = 0; round < 200; ++round) {
    absl::Mutex mu;
    int started = 0, saw_all = 0, done = 0;
    for (int i = 0; i < kThreads; ++i) {
      pool.Submit([&] {
        absl::MutexLock lock(&mu);
        ++started;
        if (mu.AwaitWithTimeout(absl::Condition(+[](int* n) { return *n == kThreads; }, &started),
                                absl::Seconds(2))) {
          ++saw_all;
        }
        ++done;
      });
    }
    absl::MutexLock lock(&mu);
    ASSERT_TRUE(mu.AwaitWithTimeout(absl::Condition(+[](int* n) { return *n == kThreads; }, &done), absl::Seconds(60)));
    ASSERT_EQ(saw_all, kThreads) << "round " << round << ": tasks gave up waiting for others that were queued "
                                 << "with no worker woken to run them";
    mu.Unlock();
    absl::SleepFor(absl::Microseconds(500));
    mu.Lock();
  }
}

INSTANTIATE_TEST_SUITE_P(Spin, ThreadPoolTest, ::testing::Values(absl::ZeroDuration(), absl::Milliseconds(2)),
                         [](const ::testing::TestParamInfo<absl::Duration>& p) {
                           return p.param > absl::ZeroDuration() ? std::string("Spinning") : std::string("Sleeping");
                         });

}  // namespace
}  // namespace blockd
