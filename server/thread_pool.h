// A fixed pool of worker threads for the engine work of RPCs, so gRPC's callback threads never
// block on a Forward. Submit() never blocks; the destructor runs what was queued, then joins.
//   ThreadPool pool(8, absl::Milliseconds(1));
//   pool.Submit([=] { reactor->Finish(Run(request)); });
//
// With `spin` > 0, a worker that runs out of work watches the queue for that long before it
// sleeps (one such worker at a time): a call that follows the last one closely, as a decode step
// follows its predecessor's reply, starts without a wake-up and on a thread still running. On
// the GPU host a sleeping worker took 34-49 us to wake and ran the step's host work 3-4x slower
// than a running one (bench/RESULTS.md). Submit wakes a sleeping worker only when none watches.
#pragma once

#include <atomic>
#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace blockd {

class ThreadPool {
 public:
  explicit ThreadPool(int threads, absl::Duration spin = absl::ZeroDuration());
  ~ThreadPool();
  void Submit(std::function<void()> fn);

 private:
  void Loop();
  // Watches for queued work (or stopping) until `spin_` passes, then clears spinning_.
  void Spin();

  const absl::Duration spin_;
  absl::Mutex mu_;
  absl::CondVar work_;  // signalled when work is queued and no worker spins, and when stopping
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::atomic<size_t> queued_{0};      // queue_.size(), read by the spinning worker without mu_
  std::atomic<bool> spinning_{false};  // a worker watches the queue (Spin)
  std::atomic<bool> stopping_hint_{false};  // stopping_, read by the spinning worker without mu_
  std::vector<std::thread> threads_;
};

}  // namespace blockd
