// ParallelCopy (base/parallel_copy.h): every byte lands where memcpy would put it, at sizes below,
// at and above the slicing threshold (ragged last slices included), and with many callers at once
// sharing the pool; source bytes outside the range are never written.
#include "base/parallel_copy.h"

#include <cstdint>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace blockd {
namespace {

std::string RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng());
  return s;
}

TEST(ParallelCopyTest, CopiesEveryByteAtEverySize) {
  const size_t slice = kParallelCopyMinSlice;
  for (size_t n : {size_t{0}, size_t{1}, slice - 1, slice, 2 * slice - 1, 2 * slice, 3 * slice + 7, 4 * slice,
                   8 * slice + 12345, size_t{33554432} + 3}) {
    SCOPED_TRACE(n);
    const std::string src = RandomBytes(n, static_cast<uint32_t>(n));
    // Guard bytes on both sides of the destination stay as they were.
    std::string dst(n + 64, '\x5a');
    ParallelCopy(dst.data() + 32, src.data(), n);
    EXPECT_EQ(dst.compare(32, n, src), 0);
    EXPECT_EQ(dst.substr(0, 32), std::string(32, '\x5a'));
    EXPECT_EQ(dst.substr(32 + n), std::string(32, '\x5a'));
  }
}

TEST(ParallelCopyTest, ManyCallersAtOnceShareThePool) {
  constexpr int kCallers = 12;
  const size_t n = 5 * kParallelCopyMinSlice + 999;
  std::vector<std::string> src, dst;
  for (int i = 0; i < kCallers; ++i) {
    src.push_back(RandomBytes(n, 100 + i));
    dst.push_back(std::string(n, '\0'));
  }
  std::vector<std::thread> callers;
  for (int i = 0; i < kCallers; ++i) {
    callers.emplace_back([&, i] {
      for (int round = 0; round < 5; ++round) ParallelCopy(dst[i].data(), src[i].data(), n);
    });
  }
  for (std::thread& t : callers) t.join();
  for (int i = 0; i < kCallers; ++i) EXPECT_TRUE(dst[i] == src[i]) << "caller " << i;
}

}  // namespace
}  // namespace blockd
