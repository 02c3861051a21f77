// Helpers shared by the engine unit tests: seeded random inputs (never all zeros), a closeness
// check of the form |actual - expected| <= atol + rtol * |expected| that names the tensor and the
// worst element when it fails, and a central-difference gradient check.
//
//   Rand rng(TestSeed(7));
//   std::vector<double> x = rng.Vec(n, -2, 2);
//   EXPECT_TRUE(AllClose("rmsnorm y", y, y_ref, /*atol=*/0, /*rtol=*/4 * kFloatUlp));
//   EXPECT_TRUE(CheckGradient("dL/dx", &x, dx, loss, kFdEps, kFdAtol, kFdRtol));
#pragma once

#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "gtest/gtest.h"

namespace blockd::testing {

// Unit roundoff of float32 (half an ulp of 1): the size of one correctly rounded fp32 operation.
inline constexpr double kFloatUlp = 5.9604644775390625e-08;  // 2^-24

// Fixed per-test seeds keep failures reproducible; BLOCKD_TEST_SEED=N draws a different set.
inline uint64_t TestSeed(uint64_t salt) {
  const char* env = std::getenv("BLOCKD_TEST_SEED");
  const uint64_t base = env != nullptr ? std::strtoull(env, nullptr, 10) : 0x5eedb10cull;
  return base * 0x9e3779b97f4a7c15ull + salt;
}

class Rand {
 public:
  explicit Rand(uint64_t seed) : gen_(seed) {}
  double Uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(gen_); }
  int64_t Int(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(gen_); }
  uint32_t Bits32() { return static_cast<uint32_t>(gen_()); }
  uint64_t Bits64() { return gen_(); }
  // n values uniform in [lo, hi).
  std::vector<double> Vec(size_t n, double lo, double hi) {
    std::vector<double> v(n);
    for (double& x : v) x = Uniform(lo, hi);
    return v;
  }
  // n values with magnitude uniform in [lo, hi) and a random sign: never zero when lo > 0.
  std::vector<double> Signed(size_t n, double lo, double hi) {
    std::vector<double> v(n);
    for (double& x : v) x = (gen_() & 1 ? 1 : -1) * Uniform(lo, hi);
    return v;
  }
  std::mt19937_64& gen() { return gen_; }

 private:
  std::mt19937_64 gen_;
};

template <class To, class From>
std::vector<To> Cast(const std::vector<From>& v) {
  return std::vector<To>(v.begin(), v.end());
}

// Rounds every element to float32 in place, so float and double code see the same inputs.
inline void RoundToFloat(std::vector<double>* v) {
  for (double& x : *v) x = static_cast<float>(x);
}

inline double MaxAbs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

// Passes when every |actual[i] - expected[i]| <= atol + rtol * |expected[i]| (and neither is NaN).
// A failure names the tensor, how many elements fail, the worst one (index, values, error,
// tolerance) and the largest absolute error overall.
template <class A, class E>
::testing::AssertionResult AllClose(absl::string_view what, const A* actual, const E* expected, size_t n, double atol,
                                    double rtol) {
  size_t bad = 0, worst = 0, max_err_at = 0;
  double worst_excess = -1, max_err = 0, max_ratio = 0;
  for (size_t i = 0; i < n; ++i) {
    const double a = static_cast<double>(actual[i]), e = static_cast<double>(expected[i]);
    const double err = std::fabs(a - e);
    const double tol = atol + rtol * std::fabs(e);
    if (tol > 0) max_ratio = std::max(max_ratio, err / tol);
    const bool ok = !std::isnan(a) && !std::isnan(e) && err <= tol;
    if (!(err <= max_err)) {
      max_err = err;
      max_err_at = i;
    }
    if (!ok) {
      ++bad;
      const double excess = std::isnan(err) ? std::numeric_limits<double>::infinity() : err - tol;
      if (excess > worst_excess) {
        worst_excess = excess;
        worst = i;
      }
    }
  }
  if (bad == 0) {
    // BLOCKD_TEST_REPORT=1 prints how much of each tolerance was used, to see the margins.
    if (std::getenv("BLOCKD_TEST_REPORT") != nullptr) {
      std::printf("[ margin   ] %.*s: max abs err %.3g, %.3g of the tolerance\n", static_cast<int>(what.size()),
                  what.data(), max_err, max_ratio);
    }
    return ::testing::AssertionSuccess();
  }
  const double a = static_cast<double>(actual[worst]), e = static_cast<double>(expected[worst]);
  return ::testing::AssertionFailure() << absl::StrCat(
             what, ": ", bad, " of ", n, " elements outside atol ", atol, " + rtol ", rtol,
             " * |expected|; worst at index ", worst, ": actual ", a, ", expected ", e, ", abs err ",
             std::fabs(a - e), ", tolerance ", atol + rtol * std::fabs(e), "; max abs err ", max_err, " at index ",
             max_err_at);
}

template <class A, class E>
::testing::AssertionResult AllClose(absl::string_view what, const std::vector<A>& actual,
                                    const std::vector<E>& expected, double atol, double rtol) {
  if (actual.size() != expected.size()) {
    return ::testing::AssertionFailure()
           << what << ": " << actual.size() << " elements, expected " << expected.size();
  }
  return AllClose(what, actual.data(), expected.data(), actual.size(), atol, rtol);
}

// Byte-for-byte equality of two buffers, naming the first differing byte.
inline ::testing::AssertionResult BitwiseEqual(absl::string_view what, const void* a, size_t a_size, const void* b,
                                               size_t b_size) {
  if (a_size != b_size) {
    return ::testing::AssertionFailure() << what << ": " << a_size << " bytes vs " << b_size << " bytes";
  }
  const auto* pa = static_cast<const unsigned char*>(a);
  const auto* pb = static_cast<const unsigned char*>(b);
  for (size_t i = 0; i < a_size; ++i) {
    if (pa[i] != pb[i]) {
      return ::testing::AssertionFailure()
             << what << ": first difference at byte " << i << " of " << a_size << " (" << int(pa[i]) << " vs "
             << int(pb[i]) << ")";
    }
  }
  return ::testing::AssertionSuccess();
}

template <class T>
::testing::AssertionResult BitwiseEqual(absl::string_view what, const std::vector<T>& a, const std::vector<T>& b) {
  return BitwiseEqual(what, a.data(), a.size() * sizeof(T), b.data(), b.size() * sizeof(T));
}

// Central differences in double: perturbs (*x)[i] by +-eps, calls loss(), and compares the numeric
// gradient to `analytic`. Also refuses a vacuous check, where the whole gradient is negligible.
template <class Loss>
::testing::AssertionResult CheckGradient(absl::string_view what, std::vector<double>* x,
                                         const std::vector<double>& analytic, Loss&& loss, double eps, double atol,
                                         double rtol) {
  if (analytic.size() != x->size()) {
    return ::testing::AssertionFailure() << what << ": analytic gradient has " << analytic.size()
                                         << " elements, the input " << x->size();
  }
  std::vector<double> numeric(x->size());
  for (size_t i = 0; i < x->size(); ++i) {
    const double saved = (*x)[i];
    (*x)[i] = saved + eps;
    const double plus = loss();
    (*x)[i] = saved - eps;
    const double minus = loss();
    (*x)[i] = saved;
    numeric[i] = (plus - minus) / (2 * eps);
  }
  if (MaxAbs(numeric) < 1e-3) {
    return ::testing::AssertionFailure() << what << ": the numeric gradient is negligible (max |g| = "
                                         << MaxAbs(numeric) << "), so this check would prove nothing";
  }
  return AllClose(absl::StrCat(what, " (analytic vs central differences)"), analytic, numeric, atol, rtol);
}

// float32 -> bfloat16 bits, rounded to nearest with ties to even, decided in double between the two
// bfloat16 neighbours of f (written independently of base/dtype.h; NaN gives a quiet NaN).
inline uint16_t RefBFloat16Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return static_cast<uint16_t>((u >> 16) | 0x40);
  if (std::isinf(f)) return static_cast<uint16_t>(u >> 16);
  const uint32_t lo = u & 0xffff0000u, hi = lo + 0x10000u;  // toward zero, away from zero
  auto magnitude = [](uint32_t bits) {
    if ((bits & 0x7f800000u) == 0x7f800000u) return std::ldexp(1.0, 128);  // the "next" value after max
    float v;
    std::memcpy(&v, &bits, 4);
    return std::fabs(static_cast<double>(v));
  };
  const double a = std::fabs(static_cast<double>(f)), d_lo = a - magnitude(lo), d_hi = magnitude(hi) - a;
  if (d_lo < d_hi) return static_cast<uint16_t>(lo >> 16);
  if (d_hi < d_lo) return static_cast<uint16_t>(hi >> 16);
  return static_cast<uint16_t>(((lo >> 16) & 1) == 0 ? lo >> 16 : hi >> 16);
}

// sum_i r[i] * y[i], the random linear functional whose gradient w.r.t. y is r.
template <class T>
double Dot(const std::vector<double>& r, const T* y) {
  double s = 0;
  for (size_t i = 0; i < r.size(); ++i) s += r[i] * static_cast<double>(y[i]);
  return s;
}

}  // namespace blockd::testing
