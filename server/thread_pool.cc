#include "server/thread_pool.h"

#include <chrono>

namespace blockd {

ThreadPool::ThreadPool(int threads, absl::Duration spin) : spin_(spin) {
  for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { Loop(); });
}

ThreadPool::~ThreadPool() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    stopping_hint_.store(true);
  }
  work_.SignalAll();
  for (std::thread& t : threads_) t.join();
}

void ThreadPool::Submit(std::function<void()> fn) {
  bool wake = false;
  {
    absl::MutexLock lock(&mu_);
    queue_.push_back(std::move(fn));
    queued_.fetch_add(1);
    // A spinning worker clears spinning_ before it takes mu_ to look at the queue, so either it
    // finds this work there or this read sees it gone and wakes a sleeper. (A spinner the host
    // has descheduled delays the work until it runs again: latency on an oversubscribed host,
    // never a task left behind.)
    wake = !spinning_.load();
  }
  if (wake) work_.Signal();
}

void ThreadPool::Spin() {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point until = Clock::now() + absl::ToChronoNanoseconds(spin_);
  for (unsigned i = 0;; ++i) {
    if (queued_.load(std::memory_order_acquire) > 0 || stopping_hint_.load(std::memory_order_relaxed)) break;
    if ((i & 63) == 63 && Clock::now() >= until) break;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }
  spinning_.store(false);
}

void ThreadPool::Loop() {
  for (;;) {
    if (spin_ > absl::ZeroDuration() && !spinning_.exchange(true)) Spin();
    std::function<void()> fn;
    {
      absl::MutexLock lock(&mu_);
      while (!stopping_ && queue_.empty()) work_.Wait(&mu_);
      if (queue_.empty()) return;  // stopping, and nothing left to run
      fn = std::move(queue_.front());
      queue_.pop_front();
      queued_.fetch_sub(1);
      // More queued than this worker takes, and maybe no one awake to take it: pass it on.
      if (!queue_.empty()) work_.Signal();
    }
    fn();
  }
}

}  // namespace blockd
