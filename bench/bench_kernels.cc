// Per-kernel timings at a block's shapes, plus the device's ceilings, so that a block's time can
// be split into its parts and each part set against its floor (FLOPs over the bf16 or fp32 matrix
// rate, bytes over copy bandwidth).
//
//   bench_kernels [--shape=qwen|llama] [--iters=20]
//
// Each row: the median of `iters` launches timed with CUDA events after warm-up, on random data,
// with achieved TFLOP/s (matrix work) or GB/s (bytes read + written once).
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "base/rope.h"
#include "kernels/adamw.cuh"
#include "kernels/attention.cuh"
#include "kernels/attention_fp32.cuh"
#include "kernels/convert.cuh"
#include "kernels/gemm.h"
#include "kernels/rmsnorm.cuh"
#include "kernels/rope.cuh"
#include "kernels/swiglu.cuh"

namespace {

using bf16 = __nv_bfloat16;
using blockd::kernels::AttentionArgs;
using blockd::kernels::GemmContext;
using blockd::kernels::GemmMode;
using blockd::kernels::GemmType;
using blockd::kernels::LinearGemm;

#define CHECK(expr)                                                                              \
  do {                                                                                           \
    auto e_ = (expr);                                                                            \
    if (static_cast<int>(e_) != 0) {                                                             \
      std::fprintf(stderr, "%s failed (%d) at %s:%d\n", #expr, static_cast<int>(e_), __FILE__, __LINE__); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

int iters = 20;

double TimeMs(const std::function<void()>& fn) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  for (int i = 0; i < 3; ++i) fn();
  std::vector<float> ms;
  for (int i = 0; i < iters; ++i) {
    cudaEventRecord(a);
    fn();
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float t;
    cudaEventElapsedTime(&t, a, b);
    ms.push_back(t);
  }
  CHECK(cudaGetLastError());
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

void Row(const std::string& what, double ms, double flops, double bytes) {
  std::printf("%-44s %9.3f ms", what.c_str(), ms);
  if (flops > 0) std::printf("  %7.1f TFLOP/s", flops / ms / 1e9);
  if (bytes > 0) std::printf("  %7.1f GB/s", bytes / ms / 1e6);
  std::printf("\n");
  std::fflush(stdout);
}

template <class T>
T* Random(size_t n, float scale = 1.f) {
  std::vector<float> h(n);
  std::mt19937 rng(n);
  std::normal_distribution<float> d(0.f, scale);
  for (float& x : h) x = d(rng);
  T* p = nullptr;
  CHECK(cudaMalloc(&p, n * sizeof(T)));
  if constexpr (std::is_same<T, float>::value) {
    CHECK(cudaMemcpy(p, h.data(), n * 4, cudaMemcpyHostToDevice));
  } else {
    float* tmp;
    CHECK(cudaMalloc(&tmp, n * 4));
    CHECK(cudaMemcpy(tmp, h.data(), n * 4, cudaMemcpyHostToDevice));
    CHECK(blockd::kernels::launch_float_to_bf16(tmp, p, n, 0));
    CHECK(cudaDeviceSynchronize());
    cudaFree(tmp);
  }
  return p;
}

// The products of one linear layer [out, in] over `rows` tokens, bf16 (as PRECISION_BF16 runs them).
LinearGemm Bf16(int64_t rows, int64_t in, int64_t out) { return {GemmMode::kBF16, rows, in, out}; }

}  // namespace

int main(int argc, char** argv) {
  std::string shape = "qwen";
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--shape=", 0) == 0) shape = a.substr(8);
    if (a.rfind("--iters=", 0) == 0) iters = std::stoi(a.substr(8));
  }
  int64_t B = 8, S = 2048, d = 1024, H = 16, Hkv = 8, dh = 128, f = 3072;
  if (shape == "llama") B = 1, S = 4096, d = 4096, H = 32, Hkv = 8, dh = 128, f = 14336;
  const int64_t N = B * S, qd = H * dh, kvd = Hkv * dh, qkv = qd + 2 * kvd;
  std::printf("shape %s: tokens %ld hidden %ld heads %ld/%ld head_dim %ld ffn %ld\n", shape.c_str(), N, d, H, Hkv,
              dh, f);

  void* ws;
  CHECK(cudaMalloc(&ws, 32 << 20));
  GemmContext ctx;
  CHECK(ctx.Init(ws, 32 << 20));
  auto gemm = [&](const blockd::kernels::GemmArgs& g) { CHECK(ctx.Run(g, 0)); };

  // Ceilings: device copy, bf16 8192^3, fp32 SGEMM 4096^3.
  {
    const size_t n = size_t(1) << 30;
    char *src, *dst;
    CHECK(cudaMalloc(&src, n));
    CHECK(cudaMalloc(&dst, n));
    CHECK(cudaMemset(src, 1, n));
    Row("ceiling: device copy 1 GiB", TimeMs([&] { cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, 0); }), 0,
        2.0 * n);
    cudaFree(src);
    cudaFree(dst);
    bf16* a = Random<bf16>(8192 * 8192);
    bf16* b = Random<bf16>(8192 * 8192);
    bf16* c;
    CHECK(cudaMalloc(&c, 8192ull * 8192 * 2));
    Row("ceiling: bf16 GEMM 8192^3",
        TimeMs([&] { gemm(Bf16(8192, 8192, 8192).Forward(a, b, c, GemmType::kBF16)); }),
        2.0 * 8192 * 8192 * 8192, 0);
    cudaFree(a);
    cudaFree(b);
    cudaFree(c);
    float* fa = Random<float>(4096 * 4096);
    float* fb = Random<float>(4096 * 4096);
    float* fc;
    CHECK(cudaMalloc(&fc, 4096ull * 4096 * 4));
    Row("ceiling: fp32 SGEMM 4096^3",
        TimeMs([&] { gemm(LinearGemm{GemmMode::kFP32, 4096, 4096, 4096}.Forward(fa, fb, fc, GemmType::kF32)); }),
        2.0 * 4096 * 4096 * 4096, 0);
    cudaFree(fa);
    cudaFree(fb);
    cudaFree(fc);
  }

  // Activations and weights of one block.
  float* x = Random<float>(N * d);
  float* w_norm = Random<float>(std::max(d, dh), 0.1f);
  bf16* n1 = Random<bf16>(N * d);
  float* rstd = Random<float>(N * std::max(H, Hkv));
  bf16* wqkv = Random<bf16>(qkv * d, 0.03f);
  bf16* qkvb = Random<bf16>(N * qkv);
  bf16* q = Random<bf16>(N * qd);
  bf16* k = Random<bf16>(N * kvd);
  bf16* o = Random<bf16>(N * qd);
  float* lse = Random<float>(B * H * S);
  float* delta = Random<float>(blockd::kernels::attention_bwd_workspace_floats(B, S, H, Hkv, dh));
  bf16* wo = Random<bf16>(d * qd, 0.03f);
  float* r1 = Random<float>(N * d);
  bf16* wgu = Random<bf16>(2 * f * d, 0.03f);
  bf16* gu = Random<bf16>(N * 2 * f);
  bf16* h = Random<bf16>(N * f);
  bf16* wd = Random<bf16>(d * f, 0.03f);
  float* out = Random<float>(N * d);
  float* dwf = Random<float>(2 * f * d);
  float* dq = Random<float>(N * qd);
  float* dk = Random<float>(N * kvd);
  float* rms_ws = Random<float>(blockd::kernels::rmsnorm_bwd_workspace_floats(d));
  float* qk_ws = Random<float>(blockd::kernels::qknorm_rope_bwd_workspace_floats(dh));
  float2* table;
  CHECK(cudaMalloc(&table, S * dh / 2 * sizeof(float2)));
  double* inv_freq;  // plain RoPE, theta 1e6: the table kernel costs the same for every rope_type
  {
    blockd::BlockConfig rc;
    rc.head_dim = dh;
    rc.rope_theta = 1e6;
    const std::vector<double> f = blockd::RopeInvFreq(rc);
    CHECK(cudaMalloc(&inv_freq, f.size() * sizeof(double)));
    CHECK(cudaMemcpy(inv_freq, f.data(), f.size() * sizeof(double), cudaMemcpyHostToDevice));
  }
  CHECK(blockd::kernels::launch_rope_table(table, S, dh, 0, inv_freq, 1.0, 0));
  // q and k dense, v (and dv) inside wider rows such as q|k|v, o and d_o dense.
  auto attention = [&](auto* q_in, auto* k_in, auto* v_in, int64_t v_stride, auto* o_out) {
    using T = std::remove_pointer_t<decltype(o_out)>;
    auto a = AttentionArgs<T>::Causal(B, S, H, Hkv, dh, /*stream=*/0);
    a.q = q_in;
    a.q_stride = qd;
    a.k = k_in;
    a.k_stride = kvd;
    a.v = v_in;
    a.v_stride = v_stride;
    a.o = o_out;
    a.o_stride = qd;
    a.lse = lse;
    a.d_o = o_out;
    a.do_stride = qd;
    a.dq = dq;
    a.dk = dk;
    a.dv = v_in;
    a.dv_stride = v_stride;
    a.workspace = delta;
    return a;
  };
  const double attn_flops = 2.0 * B * S * S * H * dh;  // causal QK^T and PV

  std::printf("-- forward --\n");
  Row("rmsnorm fwd (fp32 -> bf16)", TimeMs([&] { blockd::kernels::launch_rmsnorm_fwd<bf16>(x, w_norm, n1, rstd, N, d, 1e-6f, 0); }),
      0, N * d * 6.0);
  Row("gemm qkv = n1 Wqkv^T", TimeMs([&] { gemm(Bf16(N, d, qkv).Forward(n1, wqkv, qkvb, GemmType::kBF16)); }),
      2.0 * N * qkv * d, 0);
  Row("qk-norm + rope fwd (q and k)", TimeMs([&] {
        blockd::kernels::launch_qknorm_rope_fwd<bf16>(qkvb, qkv, q, rstd, w_norm, table, N, S, H, dh, 1e-6f, 0);
        blockd::kernels::launch_qknorm_rope_fwd<bf16>(qkvb + qd, qkv, k, rstd, w_norm, table, N, S, Hkv, dh, 1e-6f, 0);
      }),
      0, N * (qd + kvd) * 4.0);
  Row("attention fwd (tensor cores)", TimeMs([&] {
        blockd::kernels::launch_attention_fwd(attention(q, k, qkvb + qd + kvd, qkv, o));
      }),
      attn_flops, 0);
  Row("gemm r1 = x + o Wo^T", TimeMs([&] { gemm(Bf16(N, qd, d).Forward(o, wo, r1, GemmType::kF32).PlusC(x)); }),
      2.0 * N * d * qd, 0);
  Row("gemm gu = n2 Wgu^T", TimeMs([&] { gemm(Bf16(N, d, 2 * f).Forward(n1, wgu, gu, GemmType::kBF16)); }),
      2.0 * N * 2 * f * d, 0);
  Row("swiglu fwd", TimeMs([&] { blockd::kernels::launch_swiglu_fwd<bf16>(gu, h, N, f, 0); }), 0, N * f * 6.0);
  Row("gemm out = r1 + h Wd^T", TimeMs([&] { gemm(Bf16(N, f, d).Forward(h, wd, out, GemmType::kF32).PlusC(r1)); }),
      2.0 * N * d * f, 0);

  std::printf("-- backward --\n");
  Row("convert dy fp32 -> bf16", TimeMs([&] { blockd::kernels::launch_float_to_bf16(x, n1, N * d, 0); }), 0, N * d * 6.0);
  // The transfers' wire conversions (convert.cuh): 8 values per access where both buffers are
  // 16-byte aligned, one at a time where not (the same kernels, one element in).
  using blockd::kernels::kWireBFloat16;
  Row("wire bf16 -> fp32, aligned",
      TimeMs([&] { blockd::kernels::launch_to_float(kWireBFloat16, n1, x, N * d, nullptr, 0); }), 0, N * d * 6.0);
  Row("wire bf16 -> fp32, unaligned", TimeMs([&] {
        blockd::kernels::launch_to_float(kWireBFloat16, n1 + 1, x + 1, N * d - 1, nullptr, 0);
      }),
      0, N * d * 6.0);
  Row("wire fp32 -> bf16, aligned",
      TimeMs([&] { blockd::kernels::launch_from_float(x, kWireBFloat16, n1, N * d, 0); }), 0, N * d * 6.0);
  Row("wire fp32 -> bf16, unaligned", TimeMs([&] {
        blockd::kernels::launch_from_float(x + 1, kWireBFloat16, n1 + 1, N * d - 1, 0);
      }),
      0, N * d * 6.0);
  Row("gemm dWd += dy^T h", TimeMs([&] { gemm(Bf16(N, f, d).BackwardWeight(n1, h, dwf, true)); }),
      2.0 * N * d * f, 0);
  Row("gemm dh = dy Wd", TimeMs([&] { gemm(Bf16(N, f, d).BackwardInput(n1, wd, h, GemmType::kBF16)); }),
      2.0 * N * d * f, 0);
  Row("swiglu bwd", TimeMs([&] { blockd::kernels::launch_swiglu_bwd<bf16>(h, gu, gu, N, f, 0); }), 0, N * f * 10.0);
  Row("gemm dWgu += dgu^T n2", TimeMs([&] { gemm(Bf16(N, d, 2 * f).BackwardWeight(gu, n1, dwf, true)); }),
      2.0 * N * 2 * f * d, 0);
  Row("gemm dn2 = dgu Wgu", TimeMs([&] { gemm(Bf16(N, d, 2 * f).BackwardInput(gu, wgu, out, GemmType::kF32)); }),
      2.0 * N * 2 * f * d, 0);
  Row("rmsnorm bwd (+ residual, + bf16 copy)", TimeMs([&] {
        blockd::kernels::launch_rmsnorm_bwd(out, x, w_norm, rstd, r1, r1, n1, w_norm, true, rms_ws, N, d, 0);
      }),
      0, N * d * 16.0);
  Row("gemm dWo += dr1^T o", TimeMs([&] { gemm(Bf16(N, qd, d).BackwardWeight(n1, o, dwf, true)); }),
      2.0 * N * d * qd, 0);
  Row("gemm do = dr1 Wo", TimeMs([&] { gemm(Bf16(N, qd, d).BackwardInput(n1, wo, o, GemmType::kBF16)); }),
      2.0 * N * d * qd, 0);
  Row("attention bwd (delta + tensor cores)", TimeMs([&] {
        blockd::kernels::launch_attention_bwd(attention(q, k, qkvb + qd + kvd, qkv, o));
      }),
      2.5 * attn_flops, 0);
  Row("qk-norm + rope bwd (q and k)", TimeMs([&] {
        blockd::kernels::launch_qknorm_rope_bwd<bf16>(dq, qkvb, qkv, rstd, w_norm, table, qkvb, w_norm, true, qk_ws, N, S, H, dh, 0);
        blockd::kernels::launch_qknorm_rope_bwd<bf16>(dk, qkvb + qd, qkv, rstd, w_norm, table, qkvb + qd, w_norm, true, qk_ws, N, S, Hkv, dh, 0);
      }),
      0, N * (qd + kvd) * 8.0);
  Row("gemm dWqkv += dqkv^T n1", TimeMs([&] { gemm(Bf16(N, d, qkv).BackwardWeight(qkvb, n1, dwf, true)); }),
      2.0 * N * qkv * d, 0);
  Row("gemm dn1 = dqkv Wqkv", TimeMs([&] { gemm(Bf16(N, d, qkv).BackwardInput(qkvb, wqkv, out, GemmType::kF32)); }),
      2.0 * N * qkv * d, 0);

  std::printf("-- fp32 path (PRECISION_FP32) --\n");
  {
    float* qf = Random<float>(N * qd);
    float* kf = Random<float>(N * kvd);
    float* vf = Random<float>(N * kvd);
    float* of = Random<float>(N * qd);
    // The SIMT kernels run every head_dim; launch_attention_* picks the register-tiled ones for
    // fp32 at head_dim 64/128.
    const std::string fp32_path =
        blockd::kernels::attention_fp32_supports(attention(qf, kf, vf, kvd, of)) ? "register-tiled" : "simt";
    Row("attention fwd fp32 (simt)", TimeMs([&] {
          blockd::kernels::launch_attention_fwd_simt(attention(qf, kf, vf, kvd, of));
        }),
        attn_flops, 0);
    Row("attention fwd fp32 (" + fp32_path + ")", TimeMs([&] {
          blockd::kernels::launch_attention_fwd(attention(qf, kf, vf, kvd, of));
        }),
        attn_flops, 0);
    Row("attention bwd fp32 (delta + simt)", TimeMs([&] {
          blockd::kernels::launch_attention_bwd_simt(attention(qf, kf, vf, kvd, of));
        }),
        2.5 * attn_flops, 0);
    Row("attention bwd fp32 (delta + " + fp32_path + ")", TimeMs([&] {
          blockd::kernels::launch_attention_bwd(attention(qf, kf, vf, kvd, of));
        }),
        2.5 * attn_flops, 0);
    float* wf = Random<float>(2 * f * d, 0.03f);
    float* guf;
    CHECK(cudaMalloc(&guf, N * 2 * f * 4));
    const LinearGemm gate_up_fp32{GemmMode::kFP32, N, d, 2 * f};
    Row("gemm gu fp32 (SGEMM)", TimeMs([&] { gemm(gate_up_fp32.Forward(x, wf, guf, GemmType::kF32)); }),
        2.0 * N * 2 * f * d, 0);
  }

  std::printf("-- optimizer --\n");
  {
    const int64_t P = qkv * d + d * qd + 3 * f * d + 2 * d + 2 * dh;
    float* p = Random<float>(P, 0.02f);
    float* g = Random<float>(P, 0.001f);
    float* m = Random<float>(P, 0.0001f);
    float* v;
    CHECK(cudaMalloc(&v, P * 4));
    CHECK(cudaMemset(v, 0, P * 4));
    bf16* pb;
    CHECK(cudaMalloc(&pb, P * 2));
    blockd::kernels::AdamWDeviceParams hp = blockd::kernels::MakeAdamWParams(1e-3, 0.9, 0.999, 1e-8, 0.01, 3, 1.f, P);
    blockd::kernels::AdamWDeviceParams* dhp;
    CHECK(cudaMalloc(&dhp, sizeof(hp)));
    CHECK(cudaMemcpy(dhp, &hp, sizeof(hp), cudaMemcpyHostToDevice));
    Row("adamw fp32 (28 B/param)", TimeMs([&] { blockd::kernels::launch_adamw(p, g, m, v, nullptr, P, dhp, 0); }), 0, P * 28.0);
    Row("adamw + bf16 copy (30 B/param)", TimeMs([&] { blockd::kernels::launch_adamw(p, g, m, v, pb, P, dhp, 0); }), 0, P * 30.0);
    double* sws;
    CHECK(cudaMalloc(&sws, 8 * (blockd::kernels::sum_squares_workspace_doubles() + 1)));
    Row("grad sum of squares", TimeMs([&] {
          blockd::kernels::launch_sum_squares(g, P, sws, sws + blockd::kernels::sum_squares_workspace_doubles(), 0);
        }),
        0, P * 4.0);
  }
  return 0;
}
