// cuDNN attention (kernels/cudnn_attention.h) against the float64 CPU reference and against
// blockd's native kernels on the same bf16 inputs, in the block's layout (q and k packed, v inside
// the wider qkv rows, dv written back into qkv-wide rows). Skips itself without a GPU or without
// cuDNN (set BLOCKD_CUDNN_PATH to libcudnn_graph.so.9 or its folder to pick one).
//
// Bounds are the native bf16 test's (cuda_ops_test.cc), u = 2^-8: o norm-wise <= 2u, lse <= 1e-5,
// dq, dk, dv <= 4u; and cuDNN's largest elementwise error at most 4x the native kernels' (plus
// u/8 of the tensor's largest magnitude, so that a native error of zero does not make it 0).
// Full (non-causal) attention and fp16, which the native kernels lack, are checked against a
// direct float64 evaluation with the same bounds in units of the type's roundoff.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>

#include "base/dtype.h"
#include "engine/cpu/ops.h"
#include "kernels/attention.cuh"
#include "kernels/cudnn_attention.h"
#include "tests/gpu/gpu_test_util.h"

namespace blockd::testing {
namespace {

using bf16 = __nv_bfloat16;
using kernels::CudnnAttention;
using kernels::CudnnAttentionDType;
using kernels::CudnnAttentionPass;
using kernels::CudnnAttentionProblem;
using kernels::CudnnPlanInfo;
using kernels::CudnnStatus;
constexpr double u = 1.0 / 256;


// Columns [offset, offset + width) of rows of `stride`.
template <class T>
std::vector<T> Columns(const std::vector<T>& rows, int64_t n_rows, int64_t stride, int64_t offset, int64_t width) {
  std::vector<T> out(n_rows * width);
  for (int64_t r = 0; r < n_rows; ++r) {
    std::copy_n(rows.begin() + r * stride + offset, width, out.begin() + r * width);
  }
  return out;
}

struct Errors {
  double norm_rel = 0, max_abs = 0, max_rel = 0, max_ref = 0;  // max_rel: max_abs / max|ref|
  bool finite = true;
};

Errors Measure(const std::vector<float>& got, const std::vector<double>& ref) {
  Errors e;
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double d = double(got[i]) - ref[i];
    e.finite = e.finite && std::isfinite(got[i]);
    num += d * d;
    den += ref[i] * ref[i];
    e.max_abs = std::max(e.max_abs, std::fabs(d));
    e.max_ref = std::max(e.max_ref, std::fabs(ref[i]));
  }
  e.norm_rel = std::sqrt(num / std::max(den, 1e-300));
  e.max_rel = e.max_abs / std::max(e.max_ref, 1e-300);
  return e;
}

// Prints both implementations' errors against the float64 reference and checks cuDNN's: norm-wise
// within `bound`, finite, and its worst element of the native kernels' order.
void Report(const std::string& what, const std::vector<float>& cudnn, const std::vector<float>& native,
            const std::vector<double>& ref, double bound) {
  ASSERT_EQ(cudnn.size(), ref.size()) << what;
  ASSERT_EQ(native.size(), ref.size()) << what;
  const Errors c = Measure(cudnn, ref), n = Measure(native, ref);
  std::printf("  %-4s cudnn: norm rel %.3g  max abs %.3g  max abs/max|ref| %.3g | native: norm rel %.3g  max abs "
              "%.3g  max abs/max|ref| %.3g | max|ref| %.3g\n",
              what.c_str(), c.norm_rel, c.max_abs, c.max_rel, n.norm_rel, n.max_abs, n.max_rel, c.max_ref);
  EXPECT_TRUE(c.finite) << what << ": cuDNN's result has non-finite values (unwritten or overflowed)";
  EXPECT_LE(c.norm_rel, bound) << what << ": cuDNN norm-wise relative error vs float64";
  EXPECT_LE(n.norm_rel, bound) << what << ": native norm-wise relative error vs float64";
  const double same_order = 4 * n.max_abs + u / 8 * c.max_ref;
  EXPECT_LE(c.max_abs, same_order) << what << ": cuDNN's worst element error " << c.max_abs
                                   << " is not of the native kernels' order (" << n.max_abs << ")";
}

#define ASSERT_CUDNN_OK(expr)                                          \
  do {                                                                 \
    const CudnnStatus st_ = (expr);                                    \
    ASSERT_TRUE(st_.ok()) << #expr << "\n" << st_.message;             \
  } while (0)

// Skips the test when cuDNN cannot be loaded, saying why.
#define SKIP_WITHOUT_CUDNN()                                                  \
  do {                                                                        \
    SKIP_WITHOUT_GPU();                                                       \
    const CudnnStatus avail_ = CudnnAttention::Available();                   \
    if (!avail_.ok()) GTEST_SKIP() << "no cuDNN: " << avail_.message;         \
  } while (0)

// The cuDNN files this process has mapped (which copy of the engine libraries cuDNN found).
std::string LoadedCudnnFiles() {
  std::ifstream maps("/proc/self/maps");
  std::string line, out;
  std::vector<std::string> seen;
  while (std::getline(maps, line)) {
    const size_t at = line.find('/');
    if (at == std::string::npos || line.find("libcudnn", at) == std::string::npos) continue;
    const std::string path = line.substr(at);
    if (std::find(seen.begin(), seen.end(), path) != seen.end()) continue;
    seen.push_back(path);
    out += "    " + path + "\n";
  }
  return out;
}

struct Case {
  int batch, seq, heads, kv_heads, dh;
};

class CudnnAttentionTest : public ::testing::TestWithParam<Case> {};

TEST_P(CudnnAttentionTest, MatchesFloat64AndNativeKernels) {
  SKIP_WITHOUT_CUDNN();
  const Case c = GetParam();
  std::printf("case b=%d s=%d H=%d Hkv=%d dh=%d\n", c.batch, c.seq, c.heads, c.kv_heads, c.dh);
  std::unique_ptr<CudnnAttention> attn;
  ASSERT_CUDNN_OK(CudnnAttention::Create(&attn));

  const int64_t tokens = int64_t(c.batch) * c.seq, qd = int64_t(c.heads) * c.dh, kvd = int64_t(c.kv_heads) * c.dh;
  const int64_t qkv = qd + 2 * kvd, v_off = qd + kvd;  // v as the block holds it: the last part of qkv rows
  const float scale = 1.f / std::sqrt(float(c.dh));
  const auto q = RoundBf16(RandomNormal(tokens * qd, 41, 1.5f));
  const auto k = RoundBf16(RandomNormal(tokens * kvd, 42, 1.5f));
  const auto qkv_rows = RoundBf16(RandomNormal(tokens * qkv, 43));
  const auto d_o = RoundBf16(RandomNormal(tokens * qd, 44));
  const auto v = Columns(qkv_rows, tokens, qkv, v_off, kvd);

  // float64 reference on exactly the bf16 inputs; the backward reads o rounded to bf16, as both
  // implementations will.
  std::vector<double> qd64(q.begin(), q.end()), kd64(k.begin(), k.end()), vd64(v.begin(), v.end());
  std::vector<double> dod64(d_o.begin(), d_o.end());
  std::vector<double> o_ref(tokens * qd), lse_ref(int64_t(c.batch) * c.heads * c.seq);
  cpu::AttentionForward(qd64.data(), kd64.data(), vd64.data(), c.batch, c.seq, c.heads, c.kv_heads, c.dh,
                        double(scale), o_ref.data(), lse_ref.data());
  const auto o16 = RoundBf16(std::vector<float>(o_ref.begin(), o_ref.end()));
  std::vector<double> o16d(o16.begin(), o16.end());
  std::vector<double> dq_ref(tokens * qd), dk_ref(tokens * kvd), dv_ref(tokens * kvd);
  cpu::AttentionBackward(qd64.data(), kd64.data(), vd64.data(), o16d.data(), lse_ref.data(), dod64.data(), c.batch,
                         c.seq, c.heads, c.kv_heads, c.dh, double(scale), dq_ref.data(), dk_ref.data(),
                         dv_ref.data());

  DeviceArray<bf16> bq(ToBf16(q)), bk(ToBf16(k)), bqkv(ToBf16(qkv_rows)), bdo(ToBf16(d_o)), bo16(ToBf16(o16));
  const bf16* bv = bqkv.get() + v_off;
  const size_t rows = size_t(c.batch) * c.heads * c.seq;

  // Forward: cuDNN and native.
  CudnnAttentionProblem p = CudnnAttentionProblem::Packed(c.batch, c.seq, c.heads, c.kv_heads, c.dh);
  p.v_stride = qkv;
  p.dv_stride = qkv;
  CudnnPlanInfo fwd_info, bwd_info;
  ASSERT_CUDNN_OK(attn->Prepare(p, CudnnAttentionPass::kForward, &fwd_info));
  ASSERT_CUDNN_OK(attn->Prepare(p, CudnnAttentionPass::kBackward, &bwd_info));
  std::printf("  %s: forward engine %lld, workspace %zu B; backward engine %lld, workspace %zu B\n",
              fwd_info.library.c_str(), (long long)fwd_info.engine_index, fwd_info.workspace_bytes,
              (long long)bwd_info.engine_index, bwd_info.workspace_bytes);
  DeviceArray<char> ws(std::max(fwd_info.workspace_bytes, bwd_info.workspace_bytes));
  DeviceArray<bf16> o_c(tokens * qd), o_n(tokens * qd);
  DeviceArray<float> lse_c(rows), lse_n(rows);
  o_c.Poison();
  lse_c.Poison();
  o_n.Poison();
  ASSERT_CUDNN_OK(attn->Forward(p, {bq.get(), bk.get(), bv, o_c.get(), lse_c.get()}, scale, ws.get(),
                                fwd_info.workspace_bytes, 0));
  // The native kernels over the same tensors: q [tokens, qd], k [tokens, kvd], v inside qkv rows.
  auto native = kernels::AttentionArgs<bf16>::Causal(c.batch, c.seq, c.heads, c.kv_heads, c.dh, 0);
  native.scale = scale;
  native.q = bq.get();
  native.q_stride = qd;
  native.k = bk.get();
  native.k_stride = kvd;
  native.v = bv;
  native.v_stride = qkv;
  native.o = o_n.get();
  native.o_stride = qd;
  native.lse = lse_n.get();
  CUDA_ASSERT(kernels::launch_attention_fwd(native));
  CUDA_ASSERT(cudaDeviceSynchronize());
  Report("o", FromBf16(o_c.Download()), FromBf16(o_n.Download()), o_ref, 2 * u);
  Report("lse", lse_c.Download(), lse_n.Download(), lse_ref, 1e-5);

  // Backward from the reference o (rounded), each with its own forward's statistics.
  DeviceArray<bf16> dq_c(tokens * qd), dk_c(tokens * kvd), dqkv_c(tokens * qkv), dqkv_n(tokens * qkv);
  DeviceArray<float> dq_n(tokens * qd), dk_n(tokens * kvd), dq_x(tokens * qd), dk_x(tokens * kvd);
  DeviceArray<float> delta(kernels::attention_bwd_workspace_floats(c.batch, c.seq, c.heads, c.kv_heads, c.dh));
  for (auto* a : {&dq_c, &dk_c, &dqkv_c, &dqkv_n}) a->Poison();
  for (auto* a : {&dq_n, &dk_n, &dq_x, &dk_x}) a->Poison();
  ASSERT_CUDNN_OK(attn->Backward(p,
                                 {bq.get(), bk.get(), bv, bo16.get(), lse_c.get(), bdo.get(), dq_c.get(),
                                  dk_c.get(), dqkv_c.get() + v_off},
                                 scale, ws.get(), bwd_info.workspace_bytes, 0));
  native.o = bo16.get();
  native.d_o = bdo.get();
  native.do_stride = qd;
  native.dq = dq_n.get();
  native.dk = dk_n.get();
  native.dv = dqkv_n.get() + v_off;
  native.dv_stride = qkv;
  native.workspace = delta.get();
  CUDA_ASSERT(kernels::launch_attention_bwd(native));
  CUDA_ASSERT(cudaDeviceSynchronize());
  const auto dv_c = Columns(FromBf16(dqkv_c.Download()), tokens, qkv, v_off, kvd);
  const auto dv_n = Columns(FromBf16(dqkv_n.Download()), tokens, qkv, v_off, kvd);
  Report("dq", FromBf16(dq_c.Download()), dq_n.Download(), dq_ref, 4 * u);
  Report("dk", FromBf16(dk_c.Download()), dk_n.Download(), dk_ref, 4 * u);
  Report("dv", dv_c, dv_n, dv_ref, 4 * u);
  // cuDNN wrote dv's columns only: the q and k parts of its qkv-wide rows keep their poison.
  const auto dqkv_c_all = FromBf16(dqkv_c.Download());
  size_t written_outside = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t i = 0; i < v_off; ++i) written_outside += !std::isnan(dqkv_c_all[t * qkv + i]);
  }
  EXPECT_EQ(written_outside, 0u) << "cuDNN's dV wrote outside its columns of the qkv-wide rows";

  // The statistics are interchangeable: the native backward from cuDNN's lse meets the same bounds.
  native.lse = lse_c.get();
  native.dq = dq_x.get();
  native.dk = dk_x.get();
  CUDA_ASSERT(kernels::launch_attention_bwd(native));
  CUDA_ASSERT(cudaDeviceSynchronize());
  const Errors xq = Measure(dq_x.Download(), dq_ref), xk = Measure(dk_x.Download(), dk_ref);
  std::printf("  native backward from cuDNN's lse: dq norm rel %.3g, dk norm rel %.3g\n", xq.norm_rel, xk.norm_rel);
  EXPECT_LE(xq.norm_rel, 4 * u) << "native dq from cuDNN's statistics";
  EXPECT_LE(xk.norm_rel, 4 * u) << "native dk from cuDNN's statistics";

  // A second call of the same problem reuses the cached plans.
  ASSERT_CUDNN_OK(attn->Forward(p, {bq.get(), bk.get(), bv, o_c.get(), lse_c.get()}, scale, ws.get(),
                                fwd_info.workspace_bytes, 0));
  CUDA_ASSERT(cudaDeviceSynchronize());
  EXPECT_EQ(attn->cached_plans(), 2u);
  std::printf("  cuDNN files mapped:\n%s", LoadedCudnnFiles().c_str());
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudnnAttentionTest,
                         ::testing::Values(Case{2, 256, 8, 2, 64}, Case{1, 1024, 32, 8, 128}, Case{2, 200, 8, 2, 128},
                                           Case{3, 77, 4, 4, 64}),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           const Case& c = info.param;
                           return "b" + std::to_string(c.batch) + "_s" + std::to_string(c.seq) + "_H" +
                                  std::to_string(c.heads) + "_Hkv" + std::to_string(c.kv_heads) + "_dh" +
                                  std::to_string(c.dh);
                         });

// Full (non-causal) attention and fp16 activations, which blockd's native kernels do not have:
// against a direct float64 evaluation of softmax(q k^T * scale [+ causal mask]) v and its gradient.
struct Variant {
  bool causal;
  CudnnAttentionDType dtype;
  int batch, seq, heads, kv_heads, dh;
};

class CudnnAttentionVariantTest : public ::testing::TestWithParam<Variant> {};

std::vector<uint16_t> Encode(const std::vector<float>& v, CudnnAttentionDType t) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if (t == CudnnAttentionDType::kBf16) {
      out[i] = Float32ToBFloat16(v[i]);
    } else {
      out[i] = static_cast<__half_raw>(__float2half_rn(v[i])).x;
    }
  }
  return out;
}

std::vector<float> Decode(const std::vector<uint16_t>& v, CudnnAttentionDType t) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if (t == CudnnAttentionDType::kBf16) {
      out[i] = BFloat16ToFloat32(v[i]);
    } else {
      __half_raw r;
      r.x = v[i];
      out[i] = __half2float(__half(r));
    }
  }
  return out;
}

// Packed rows: q, o, d_o [tokens, H*D]; k, v [tokens, Hkv*D]. `o_in` is the o the backward reads.
void DirectAttention(const Variant& c, const std::vector<double>& q, const std::vector<double>& k,
                     const std::vector<double>& v, const std::vector<double>& d_o, double scale,
                     std::vector<double>* o, std::vector<double>* lse, const std::vector<double>* o_in,
                     std::vector<double>* dq, std::vector<double>* dk, std::vector<double>* dv) {
  const int64_t S = c.seq, D = c.dh, qd = int64_t(c.heads) * D, kvd = int64_t(c.kv_heads) * D;
  const int group = c.heads / c.kv_heads;
  std::vector<double> p(S);
  for (int b = 0; b < c.batch; ++b) {
    for (int h = 0; h < c.heads; ++h) {
      const int64_t qo = int64_t(b) * S * qd + h * D, ko = int64_t(b) * S * kvd + (h / group) * D;
      for (int64_t i = 0; i < S; ++i) {
        const int64_t n = c.causal ? i + 1 : S;
        double mx = -INFINITY;
        for (int64_t j = 0; j < n; ++j) {
          double dot = 0;
          for (int64_t e = 0; e < D; ++e) dot += q[qo + i * qd + e] * k[ko + j * kvd + e];
          p[j] = dot * scale;
          mx = std::max(mx, p[j]);
        }
        double sum = 0;
        for (int64_t j = 0; j < n; ++j) sum += std::exp(p[j] - mx);
        const double l = mx + std::log(sum);
        for (int64_t j = 0; j < n; ++j) p[j] = std::exp(p[j] - l);
        if (o_in == nullptr) {
          (*lse)[(int64_t(b) * c.heads + h) * S + i] = l;
          for (int64_t e = 0; e < D; ++e) {
            double acc = 0;
            for (int64_t j = 0; j < n; ++j) acc += p[j] * v[ko + j * kvd + e];
            (*o)[qo + i * qd + e] = acc;
          }
          continue;
        }
        double delta = 0;
        for (int64_t e = 0; e < D; ++e) delta += d_o[qo + i * qd + e] * (*o_in)[qo + i * qd + e];
        for (int64_t j = 0; j < n; ++j) {
          double dp = 0;
          for (int64_t e = 0; e < D; ++e) dp += d_o[qo + i * qd + e] * v[ko + j * kvd + e];
          const double ds = p[j] * (dp - delta) * scale;
          for (int64_t e = 0; e < D; ++e) {
            (*dq)[qo + i * qd + e] += ds * k[ko + j * kvd + e];
            (*dk)[ko + j * kvd + e] += ds * q[qo + i * qd + e];
            (*dv)[ko + j * kvd + e] += p[j] * d_o[qo + i * qd + e];
          }
        }
      }
    }
  }
}

TEST_P(CudnnAttentionVariantTest, MatchesFloat64) {
  SKIP_WITHOUT_CUDNN();
  const Variant c = GetParam();
  const bool bf = c.dtype == CudnnAttentionDType::kBf16;
  std::printf("variant %s %s b=%d s=%d H=%d Hkv=%d dh=%d\n", c.causal ? "causal" : "full", bf ? "bf16" : "fp16",
              c.batch, c.seq, c.heads, c.kv_heads, c.dh);
  // Unit roundoff of the activation type; the bounds are the bf16 test's in units of it.
  const double ur = bf ? 1.0 / 256 : 1.0 / 2048;
  std::unique_ptr<CudnnAttention> attn;
  ASSERT_CUDNN_OK(CudnnAttention::Create(&attn));
  const int64_t tokens = int64_t(c.batch) * c.seq, qd = int64_t(c.heads) * c.dh, kvd = int64_t(c.kv_heads) * c.dh;
  const float scale = 1.f / std::sqrt(float(c.dh));
  auto round = [&](const std::vector<float>& x) { return Decode(Encode(x, c.dtype), c.dtype); };
  const auto q = round(RandomNormal(tokens * qd, 51, 1.5f)), k = round(RandomNormal(tokens * kvd, 52, 1.5f));
  const auto v = round(RandomNormal(tokens * kvd, 53)), d_o = round(RandomNormal(tokens * qd, 54));
  const std::vector<double> q64(q.begin(), q.end()), k64(k.begin(), k.end()), v64(v.begin(), v.end());
  const std::vector<double> do64(d_o.begin(), d_o.end());
  std::vector<double> o_ref(tokens * qd), lse_ref(int64_t(c.batch) * c.heads * c.seq);
  DirectAttention(c, q64, k64, v64, do64, scale, &o_ref, &lse_ref, nullptr, nullptr, nullptr, nullptr);
  const auto o_rounded = round(std::vector<float>(o_ref.begin(), o_ref.end()));
  const std::vector<double> o_in(o_rounded.begin(), o_rounded.end());
  std::vector<double> dq_ref(tokens * qd, 0.0), dk_ref(tokens * kvd, 0.0), dv_ref(tokens * kvd, 0.0);
  DirectAttention(c, q64, k64, v64, do64, scale, nullptr, nullptr, &o_in, &dq_ref, &dk_ref, &dv_ref);

  CudnnAttentionProblem p = CudnnAttentionProblem::Packed(c.batch, c.seq, c.heads, c.kv_heads, c.dh);
  p.causal = c.causal;
  p.dtype = c.dtype;
  CudnnPlanInfo fi, bi;
  ASSERT_CUDNN_OK(attn->Prepare(p, CudnnAttentionPass::kForward, &fi));
  ASSERT_CUDNN_OK(attn->Prepare(p, CudnnAttentionPass::kBackward, &bi));
  std::printf("  forward engine %lld, backward engine %lld\n", (long long)fi.engine_index,
              (long long)bi.engine_index);
  DeviceArray<uint16_t> dq_in(Encode(q, c.dtype)), dk_in(Encode(k, c.dtype)), dv_in(Encode(v, c.dtype));
  DeviceArray<uint16_t> ddo(Encode(d_o, c.dtype)), do_ref(Encode(o_rounded, c.dtype)), o(tokens * qd);
  DeviceArray<uint16_t> dq(tokens * qd), dk(tokens * kvd), dv(tokens * kvd);
  DeviceArray<float> lse(lse_ref.size());
  DeviceArray<char> ws(std::max(fi.workspace_bytes, bi.workspace_bytes));
  for (auto* a : {&o, &dq, &dk, &dv}) a->Poison();
  lse.Poison();
  ASSERT_CUDNN_OK(attn->Forward(p, {dq_in.get(), dk_in.get(), dv_in.get(), o.get(), lse.get()}, scale, ws.get(),
                                fi.workspace_bytes, 0));
  ASSERT_CUDNN_OK(attn->Backward(p,
                                 {dq_in.get(), dk_in.get(), dv_in.get(), do_ref.get(), lse.get(), ddo.get(), dq.get(),
                                  dk.get(), dv.get()},
                                 scale, ws.get(), bi.workspace_bytes, 0));
  CUDA_ASSERT(cudaDeviceSynchronize());
  ExpectNormClose("variant o", Decode(o.Download(), c.dtype), o_ref, 2 * ur);
  ExpectNormClose("variant lse", lse.Download(), lse_ref, 1e-5);
  ExpectNormClose("variant dq", Decode(dq.Download(), c.dtype), dq_ref, 4 * ur);
  ExpectNormClose("variant dk", Decode(dk.Download(), c.dtype), dk_ref, 4 * ur);
  ExpectNormClose("variant dv", Decode(dv.Download(), c.dtype), dv_ref, 4 * ur);
}

INSTANTIATE_TEST_SUITE_P(Variants, CudnnAttentionVariantTest,
                         ::testing::Values(Variant{false, CudnnAttentionDType::kBf16, 2, 96, 4, 2, 64},
                                           Variant{true, CudnnAttentionDType::kFp16, 2, 96, 4, 2, 128},
                                           Variant{false, CudnnAttentionDType::kFp16, 1, 130, 4, 1, 64}),
                         [](const ::testing::TestParamInfo<Variant>& info) {
                           const Variant& c = info.param;
                           return std::string(c.causal ? "causal_" : "full_") +
                                  (c.dtype == CudnnAttentionDType::kBf16 ? "bf16_" : "fp16_") + "s" +
                                  std::to_string(c.seq) + "_dh" + std::to_string(c.dh);
                         });

TEST(CudnnAttentionArgs, RejectsBadShapesAndWorkspace) {
  SKIP_WITHOUT_CUDNN();
  std::unique_ptr<CudnnAttention> attn;
  ASSERT_CUDNN_OK(CudnnAttention::Create(&attn));
  CudnnPlanInfo info;
  CudnnAttentionProblem p = CudnnAttentionProblem::Packed(1, 64, 6, 4, 64);  // 6 heads over 4 kv heads
  EXPECT_EQ(attn->Prepare(p, CudnnAttentionPass::kForward, &info).code, CudnnStatus::Code::kInvalidArgument);
  p = CudnnAttentionProblem::Packed(1, 64, 4, 2, 64);
  p.q_stride = 64;  // narrower than a row of 4 heads
  EXPECT_EQ(attn->Prepare(p, CudnnAttentionPass::kForward, &info).code, CudnnStatus::Code::kInvalidArgument);
  p = CudnnAttentionProblem::Packed(1, 64, 4, 2, 64);
  ASSERT_CUDNN_OK(attn->Prepare(p, CudnnAttentionPass::kBackward, &info));
  ASSERT_GT(info.workspace_bytes, 0u) << "the backward's fp32 buffers live in the workspace";
  DeviceArray<bf16> t(64 * 4 * 64);
  DeviceArray<float> lse(4 * 64);
  const CudnnStatus st = attn->Backward(p, {t.get(), t.get(), t.get(), t.get(), lse.get(), t.get(), t.get(), t.get(),
                                            t.get()},
                                        0.125f, t.get(), info.workspace_bytes - 1, 0);
  EXPECT_EQ(st.code, CudnnStatus::Code::kInvalidArgument) << st.message;
}

}  // namespace
}  // namespace blockd::testing
