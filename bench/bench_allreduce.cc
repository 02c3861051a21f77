// The NCCL provider's gradient all-reduce (Collective::AllReduceMeanOnDevice, what a group Step
// runs per block) over every visible GPU of this host, one member per GPU in one process, at sizes
// 1 MB .. 1 GB of fp32. Prints, per size, the time and the bus bandwidth as nccl-tests define it
// (bytes * 2(n-1)/n / time), beside which bench/allreduce_torch.py prints torch.distributed's
// NCCL all-reduce of the same sizes on the same GPUs (issue 15's baseline).
//   bench_allreduce [--max_mb=1024] [--iters=20]
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "engine/collective_nccl.h"

namespace {

int Flag(int argc, char** argv, const char* name, int fallback) {
  const std::string prefix = std::string("--") + name + "=";
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], prefix.c_str(), prefix.size()) == 0) return std::atoi(argv[i] + prefix.size());
  }
  return fallback;
}

}  // namespace

int main(int argc, char** argv) {
  const int max_mb = Flag(argc, argv, "max_mb", 1024);
  const int iters = Flag(argc, argv, "iters", 20);
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n < 1) {
    std::fprintf(stderr, "no GPU\n");
    return 1;
  }
  auto provider = blockd::MakeNcclProvider({.advertise_host = "127.0.0.1"});
  auto id = provider->NewId(absl::Minutes(5));
  if (!id.ok()) {
    std::fprintf(stderr, "%s\n", id.status().ToString().c_str());
    return 1;
  }
  std::printf("# NCCL %s, %d GPU(s), blockd provider all-reduce (ncclAvg, fp32, in place)\n",
              blockd::NcclVersion().c_str(), n);
  std::printf("%-10s %-12s %-12s %s\n", "bytes", "time_us", "algbw_GB/s", "busbw_GB/s");
  std::vector<std::unique_ptr<blockd::Collective>> members(n);
  std::vector<std::string> errors(n);
  {
    std::vector<std::thread> threads;
    for (int r = 0; r < n; ++r) {
      threads.emplace_back([&, r] {
        auto c = provider->Connect(*id, r, n, "bench", absl::Seconds(120), r);
        if (c.ok()) members[r] = *std::move(c);
        else errors[r] = c.status().ToString();
      });
    }
    for (auto& t : threads) t.join();
  }
  for (int r = 0; r < n; ++r) {
    if (!errors[r].empty()) {
      std::fprintf(stderr, "rank %d: %s\n", r, errors[r].c_str());
      return 1;
    }
  }
  const size_t max_bytes = size_t(max_mb) << 20;
  std::vector<float*> bufs(n);
  std::vector<cudaStream_t> streams(n);
  for (int r = 0; r < n; ++r) {
    cudaSetDevice(r);
    if (cudaMalloc(&bufs[r], max_bytes) != cudaSuccess || cudaStreamCreate(&streams[r]) != cudaSuccess) {
      std::fprintf(stderr, "cannot allocate %zu bytes on GPU %d\n", max_bytes, r);
      return 1;
    }
    cudaMemset(bufs[r], 0, max_bytes);
  }
  std::atomic<int> failed{0};
  for (size_t bytes = size_t(1) << 20; bytes <= max_bytes; bytes *= 4) {
    const size_t count = bytes / sizeof(float);
    std::vector<double> seconds(n);
    std::vector<std::thread> threads;
    for (int r = 0; r < n; ++r) {
      threads.emplace_back([&, r] {
        cudaSetDevice(r);
        for (int w = 0; w < 3; ++w) {
          if (!members[r]->AllReduceMeanOnDevice(bufs[r], count, streams[r]).ok()) ++failed;
        }
        const auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < iters; ++i) {
          absl::Status s = members[r]->AllReduceMeanOnDevice(bufs[r], count, streams[r]);
          if (!s.ok()) {
            std::fprintf(stderr, "rank %d: %s\n", r, s.ToString().c_str());
            ++failed;
            return;
          }
        }
        seconds[r] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
      });
    }
    for (auto& t : threads) t.join();
    if (failed != 0) return 1;
    double t = 0;
    for (double s : seconds) t = std::max(t, s);
    const double algbw = bytes / t / 1e9;
    std::printf("%-10zu %-12.1f %-12.2f %.2f\n", bytes, t * 1e6, algbw, algbw * 2.0 * (n - 1) / n);
    std::fflush(stdout);
  }
  return 0;
}
