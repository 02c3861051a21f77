#include "base/parallel_copy.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>

namespace blockd {
namespace {

// Copies n bytes starting `from` bytes into the concatenation of `pieces` to dst.
void GatherPieces(char* dst, const absl::string_view* pieces, size_t count, size_t from, size_t n) {
  size_t i = 0;
  for (; i < count && from >= pieces[i].size(); ++i) from -= pieces[i].size();
  for (; n > 0 && i < count; ++i, from = 0) {
    const size_t take = std::min(n, pieces[i].size() - from);
    std::memcpy(dst, pieces[i].data() + from, take);
    dst += take;
    n -= take;
  }
}

// One ParallelCopy: its slices are taken by index, by the caller and the pool alike.
struct Copy {
  char* dst;
  const char* src;  // contiguous source, or
  const absl::string_view* pieces = nullptr;  // its pieces, the copy starting `from` bytes in
  size_t piece_count = 0, from = 0;
  size_t n, slice;
  int slices;
  std::atomic<int> next{0};
  std::atomic<int> done{0};
  std::mutex mu;
  std::condition_variable all_done;

  // Copies slices until none is left to take.
  void Work() {
    for (int i; (i = next.fetch_add(1)) < slices;) {
      const size_t at = static_cast<size_t>(i) * slice;
      const size_t len = std::min(slice, n - at);
      if (pieces == nullptr) {
        std::memcpy(dst + at, src + at, len);
      } else {
        GatherPieces(dst + at, pieces, piece_count, from + at, len);
      }
      if (done.fetch_add(1) + 1 == slices) {
        std::lock_guard<std::mutex> lock(mu);
        all_done.notify_all();
      }
    }
  }
};

// kParallelCopyMaxThreads - 1 threads that help with the copies queued, for the process's life.
class CopyPool {
 public:
  CopyPool() {
    for (int i = 0; i + 1 < kParallelCopyMaxThreads; ++i) std::thread([this] { Run(); }).detach();
  }
  // Queued once per helper it could use; a helper finding nothing left to take moves on.
  void Offer(const std::shared_ptr<Copy>& c, int helpers) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (int i = 0; i < helpers; ++i) queue_.push_back(c);
    }
    if (helpers == 1) {
      ready_.notify_one();
    } else {
      ready_.notify_all();
    }
  }

 private:
  void Run() {
    for (;;) {
      std::shared_ptr<Copy> c;
      {
        std::unique_lock<std::mutex> lock(mu_);
        ready_.wait(lock, [this] { return !queue_.empty(); });
        c = std::move(queue_.front());
        queue_.pop_front();
      }
      c->Work();
    }
  }

  std::mutex mu_;
  std::condition_variable ready_;
  std::deque<std::shared_ptr<Copy>> queue_;
};

}  // namespace

namespace {

// Runs `c` (dst, n and its source set) on the caller and the pool.
void Run(std::shared_ptr<Copy> c) {
  const size_t slices = std::min<size_t>(kParallelCopyMaxThreads, c->n / kParallelCopyMinSlice);
  c->slices = static_cast<int>(std::max<size_t>(slices, 1));
  c->slice = (c->n + c->slices - 1) / c->slices;
  if (c->slices > 1) {
    static CopyPool* pool = new CopyPool();  // never destroyed: its threads run until exit
    pool->Offer(c, c->slices - 1);
  }
  c->Work();
  std::unique_lock<std::mutex> lock(c->mu);
  c->all_done.wait(lock, [&] { return c->done.load() == c->slices; });
}

}  // namespace

void ParallelCopy(void* dst, const void* src, size_t n) {
  if (n / kParallelCopyMinSlice <= 1) {
    std::memcpy(dst, src, n);
    return;
  }
  auto c = std::make_shared<Copy>();
  c->dst = static_cast<char*>(dst);
  c->src = static_cast<const char*>(src);
  c->n = n;
  Run(std::move(c));
}

void ParallelGather(void* dst, absl::Span<const absl::string_view> pieces, size_t from, size_t n) {
  if (n / kParallelCopyMinSlice <= 1) {
    GatherPieces(static_cast<char*>(dst), pieces.data(), pieces.size(), from, n);
    return;
  }
  auto c = std::make_shared<Copy>();
  c->dst = static_cast<char*>(dst);
  c->pieces = pieces.data();
  c->piece_count = pieces.size();
  c->from = from;
  c->n = n;
  Run(std::move(c));
}

}  // namespace blockd
