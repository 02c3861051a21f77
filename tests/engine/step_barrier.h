// A reusable barrier for EngineOptions::on_infer_step_arrived: the tests of continuous batching
// make N concurrent steps all count as on their way before any joins its batch, so the N meet in
// one launch whatever the threads' timing (a leader waits only for steps on their way).
//
//   StepBarrier barrier;
//   options.on_infer_step_arrived = [&barrier] { barrier.Arrive(); };
//   barrier.Expect(4);   // then four threads step at once; the next round: Expect again
#pragma once

#include <cstdint>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace blockd::testing {

class StepBarrier {
 public:
  // From now on every `n` arrivals are a round that waits for all of its n (0: arrivals pass at
  // once). Set it before the round's steps are sent.
  void Expect(int64_t n) {
    absl::MutexLock l(&mu_);
    need_ = n;
    arrived_ = 0;
  }
  // Waits until the expected number arrived in this round (at most `bound`, so a test that sends
  // fewer steps than it announced fails on its assertions instead of hanging).
  void Arrive(absl::Duration bound = absl::Seconds(60)) {
    absl::MutexLock l(&mu_);
    if (need_ <= 0) return;
    const int64_t round = round_;
    if (++arrived_ >= need_) {
      ++round_;
      arrived_ = 0;
      cv_.SignalAll();
      return;
    }
    const absl::Time deadline = absl::Now() + bound;
    while (round_ == round) {
      if (cv_.WaitWithDeadline(&mu_, deadline)) return;  // timed out
    }
  }

 private:
  absl::Mutex mu_;
  absl::CondVar cv_;
  int64_t need_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t arrived_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t round_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace blockd::testing
