// Helpers for the gpu tests (and the engine benchmark): skipping without a GPU, device buffers,
// random data, the block configs of the cases (`Config`), and the comparison every test uses (elementwise atol + rtol*|ref| with atol = rtol * max|ref|, plus the
// norm-wise relative error), reporting the tensor, the worst element and both errors.
//
// Why atol scales with the tensor's largest magnitude: an element of a matrix product, a softmax
// backward or a norm is a sum whose rounding error scales with the terms summed into it, which
// are of the size of the tensor's large entries, not of that element's own (possibly cancelled)
// value. The norm-wise error is bounded by rtol as well.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "base/block_config.h"
#include "base/dtype.h"

namespace blockd::testing {

#define SKIP_WITHOUT_GPU()                                                   \
  do {                                                                       \
    int n_ = 0;                                                              \
    if (cudaGetDeviceCount(&n_) != cudaSuccess || n_ == 0) {                 \
      cudaGetLastError();                                                    \
      GTEST_SKIP() << "no CUDA device";                                      \
    }                                                                        \
  } while (0)

#define CUDA_ASSERT(expr) ASSERT_EQ(cudaSuccess, (expr)) << #expr << ": " << cudaGetErrorString(cudaGetLastError())

// Host copies of bf16 device data and back, as the kernels read and write it.
inline std::vector<__nv_bfloat16> ToBf16(const std::vector<float>& v) {
  std::vector<__nv_bfloat16> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    const uint16_t h = Float32ToBFloat16(v[i]);
    std::memcpy(static_cast<void*>(&out[i]), &h, 2);
  }
  return out;
}

inline std::vector<float> FromBf16(const std::vector<__nv_bfloat16>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    uint16_t h;
    std::memcpy(&h, static_cast<const void*>(&v[i]), 2);
    out[i] = BFloat16ToFloat32(h);
  }
  return out;
}

// Rounds through bf16, as the kernels see bf16 inputs.
inline std::vector<float> RoundBf16(const std::vector<float>& v) { return FromBf16(ToBf16(v)); }

inline std::vector<float> RandomNormal(size_t n, uint64_t seed, float scale = 1.f, float mean = 0.f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(mean, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

struct Comparison {
  double norm_rel = 0;      // ||got - ref|| / ||ref||
  double worst_ratio = 0;   // max_i |got_i - ref_i| / (atol + rtol |ref_i|)
  size_t worst_index = 0;
  double worst_got = 0, worst_ref = 0;
};

inline Comparison Compare(const std::vector<float>& got, const std::vector<double>& ref, double rtol) {
  Comparison c;
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    num += (got[i] - ref[i]) * (got[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  c.norm_rel = std::sqrt(num / std::max(den, 1e-300));
  double max_ref = 0;
  for (double r : ref) max_ref = std::max(max_ref, std::fabs(r));
  const double atol = rtol * max_ref;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double bound = atol + rtol * std::fabs(ref[i]);
    const double ratio = std::isfinite(got[i]) ? std::fabs(got[i] - ref[i]) / bound : INFINITY;
    if (ratio > c.worst_ratio || !std::isfinite(ratio)) {
      c.worst_ratio = ratio;
      c.worst_index = i;
      c.worst_got = got[i];
      c.worst_ref = ref[i];
    }
  }
  return c;
}

inline std::string Describe(const std::string& what, const Comparison& c) {
  return absl::StrFormat("%s: norm-wise rel err %.3g, worst element [%d] got %.9g ref %.9g (%.3g x its bound)",
                         what, c.norm_rel, c.worst_index, c.worst_got, c.worst_ref, c.worst_ratio);
}

// Elementwise |got - ref| <= rtol * (max|ref| + |ref|) everywhere, and norm-wise <= rtol.
inline void ExpectClose(const std::string& what, const std::vector<float>& got, const std::vector<double>& ref,
                        double rtol) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  const Comparison c = Compare(got, ref, rtol);
  ::testing::Test::RecordProperty(what, absl::StrFormat("%.3g", c.norm_rel));
  std::printf("  %-48s norm rel %.3g  worst/bound %.3g\n", what.c_str(), c.norm_rel, c.worst_ratio);
  EXPECT_LE(c.worst_ratio, 1.0) << Describe(what, c) << " (rtol " << rtol << ")";
  EXPECT_LE(c.norm_rel, rtol) << Describe(what, c);
}

// Norm-wise only: ||got - ref|| / ||ref|| <= bound (for reduced precisions).
inline void ExpectNormClose(const std::string& what, const std::vector<float>& got, const std::vector<double>& ref,
                            double bound) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  const Comparison c = Compare(got, ref, 1.0);
  ::testing::Test::RecordProperty(what, absl::StrFormat("%.3g", c.norm_rel));
  std::printf("  %-48s norm rel %.3g (bound %.3g)\n", what.c_str(), c.norm_rel, bound);
  bool finite = true;
  for (float g : got) finite = finite && std::isfinite(g);
  EXPECT_TRUE(finite) << what << " has non-finite values";
  EXPECT_LE(c.norm_rel, bound) << Describe(what, c);
}

inline std::vector<double> ToDouble(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

// A GPU result against the CPU backend's (or the same backend's other path): elementwise within
// `bound` (ExpectClose) or, where rounding is bf16's, norm-wise (ExpectNormClose).
inline void Check(const std::string& what, const std::vector<float>& got, const std::vector<float>& ref, double bound,
                  bool elementwise) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  if (elementwise) {
    ExpectClose(what, got, ToDouble(ref), bound);
  } else {
    ExpectNormClose(what, got, ToDouble(ref), bound);
  }
}

// The bound of a block's output by precision: fp32 and tf32 elementwise 1e-5 of the output's
// scale; bf16 norm-wise 3.1e-2.
inline void Check(const std::string& what, Precision p, const std::vector<float>& got, const std::vector<float>& ref) {
  Check(what, got, ref, p == Precision::kBF16 ? 3.1e-2 : 1e-5, /*elementwise=*/p != Precision::kBF16);
}

// A block config of the test cases and benchmarks: d hidden, h heads of dh, kv kv-heads, f the MLP
// width, qk QK-norm; eps 1e-6 and rope_theta 1e6 (Qwen3's).
inline BlockConfig Config(int64_t d, int64_t h, int64_t kv, int64_t dh, int64_t f, bool qk) {
  BlockConfig c;
  c.hidden_size = d;
  c.num_attention_heads = h;
  c.num_kv_heads = kv;
  c.head_dim = dh;
  c.intermediate_size = f;
  c.rms_norm_eps = 1e-6;
  c.rope_theta = 1e6;
  c.qk_norm = qk;
  return c;
}

// A device buffer for tests.
template <class T>
class DeviceArray {
 public:
  explicit DeviceArray(size_t n) : n_(n) {
    if (cudaMalloc(&p_, std::max<size_t>(n, 1) * sizeof(T)) != cudaSuccess) p_ = nullptr;
  }
  DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) { Upload(host); }
  ~DeviceArray() { cudaFree(p_); }
  DeviceArray(const DeviceArray&) = delete;
  T* get() const { return p_; }
  void Upload(const std::vector<T>& host) { cudaMemcpy(p_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice); }
  std::vector<T> Download() const {
    std::vector<T> h(n_);
    cudaMemcpy(h.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost);
    return h;
  }
  // Poison: every element a NaN pattern, so unwritten outputs show.
  void Poison() { cudaMemset(p_, 0xff, n_ * sizeof(T)); }

 private:
  T* p_ = nullptr;
  size_t n_;
};

}  // namespace blockd::testing
