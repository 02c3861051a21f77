// A fixed pool of worker threads for the engine work of RPCs, so gRPC's callback threads never
// block on a Forward. Submit() never blocks; the destructor runs what was queued, then joins.
//   ThreadPool pool(8);
//   pool.Submit([=] { reactor->Finish(Run(request)); });
#pragma once

#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"

namespace blockd {

class ThreadPool {
 public:
  explicit ThreadPool(int threads);
  ~ThreadPool();
  void Submit(std::function<void()> fn);

 private:
  void Loop();
  absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace blockd
