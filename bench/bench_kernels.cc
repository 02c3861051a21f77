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
#include <vector>

#include "kernels/adamw.cuh"
#include "kernels/attention.cuh"
#include "kernels/convert.cuh"
#include "kernels/gemm.h"
#include "kernels/rmsnorm.cuh"
#include "kernels/rope.cuh"
#include "kernels/swiglu.cuh"

namespace {

using bf16 = __nv_bfloat16;
using blockd::kernels::GemmArgs;
using blockd::kernels::GemmContext;
using blockd::kernels::GemmMode;
using blockd::kernels::GemmType;

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

struct Gemm {
  GemmContext* ctx;
  void Run(GemmMode mode, bool ta, bool tb, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda, const void* b,
           int64_t ldb, void* d, int64_t ldd, GemmType dt, float beta = 0.f, const void* c = nullptr) {
    GemmArgs g;
    g.mode = mode;
    g.trans_a = ta;
    g.trans_b = tb;
    g.m = m;
    g.n = n;
    g.k = k;
    g.a = a;
    g.lda = lda;
    g.b = b;
    g.ldb = ldb;
    g.beta = beta;
    g.c = c;
    g.ldc = ldd;
    g.d = d;
    g.ldd = ldd;
    g.d_type = dt;
    CHECK(ctx->Run(g, 0));
  }
};

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
  Gemm gemm{&ctx};

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
        TimeMs([&] { gemm.Run(GemmMode::kBF16, false, true, 8192, 8192, 8192, a, 8192, b, 8192, c, 8192, GemmType::kBF16); }),
        2.0 * 8192 * 8192 * 8192, 0);
    cudaFree(a);
    cudaFree(b);
    cudaFree(c);
    float* fa = Random<float>(4096 * 4096);
    float* fb = Random<float>(4096 * 4096);
    float* fc;
    CHECK(cudaMalloc(&fc, 4096ull * 4096 * 4));
    Row("ceiling: fp32 SGEMM 4096^3",
        TimeMs([&] { gemm.Run(GemmMode::kFP32, false, true, 4096, 4096, 4096, fa, 4096, fb, 4096, fc, 4096, GemmType::kF32); }),
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
  CHECK(blockd::kernels::launch_rope_table(table, S, dh, 0, 1e6, 0));
  const float scale = 1.f / std::sqrt(float(dh));
  const double attn_flops = 2.0 * B * S * S * H * dh;  // causal QK^T and PV

  std::printf("-- forward --\n");
  Row("rmsnorm fwd (fp32 -> bf16)", TimeMs([&] { blockd::kernels::launch_rmsnorm_fwd<bf16>(x, w_norm, n1, rstd, N, d, 1e-6f, 0); }),
      0, N * d * 6.0);
  Row("gemm qkv = n1 Wqkv^T", TimeMs([&] { gemm.Run(GemmMode::kBF16, false, true, N, qkv, d, n1, d, wqkv, d, qkvb, qkv, GemmType::kBF16); }),
      2.0 * N * qkv * d, 0);
  Row("qk-norm + rope fwd (q and k)", TimeMs([&] {
        blockd::kernels::launch_qknorm_rope_fwd<bf16>(qkvb, qkv, q, rstd, w_norm, table, N, S, H, dh, 1e-6f, 0);
        blockd::kernels::launch_qknorm_rope_fwd<bf16>(qkvb + qd, qkv, k, rstd, w_norm, table, N, S, Hkv, dh, 1e-6f, 0);
      }),
      0, N * (qd + kvd) * 4.0);
  Row("attention fwd (tensor cores)", TimeMs([&] {
        blockd::kernels::launch_attention_fwd<bf16>(q, qd, k, kvd, qkvb + qd + kvd, qkv, o, qd, lse, B, S, H, Hkv, dh, scale, 0);
      }),
      attn_flops, 0);
  Row("gemm r1 = x + o Wo^T", TimeMs([&] { gemm.Run(GemmMode::kBF16, false, true, N, d, qd, o, qd, wo, qd, r1, d, GemmType::kF32, 1.f, x); }),
      2.0 * N * d * qd, 0);
  Row("gemm gu = n2 Wgu^T", TimeMs([&] { gemm.Run(GemmMode::kBF16, false, true, N, 2 * f, d, n1, d, wgu, d, gu, 2 * f, GemmType::kBF16); }),
      2.0 * N * 2 * f * d, 0);
  Row("swiglu fwd", TimeMs([&] { blockd::kernels::launch_swiglu_fwd<bf16>(gu, h, N, f, 0); }), 0, N * f * 6.0);
  Row("gemm out = r1 + h Wd^T", TimeMs([&] { gemm.Run(GemmMode::kBF16, false, true, N, d, f, h, f, wd, f, out, d, GemmType::kF32, 1.f, r1); }),
      2.0 * N * d * f, 0);
  Row("copy x (saved input)", TimeMs([&] { cudaMemcpyAsync(out, x, N * d * 4, cudaMemcpyDeviceToDevice, 0); }), 0, N * d * 8.0);

  std::printf("-- backward --\n");
  Row("convert dy fp32 -> bf16", TimeMs([&] { blockd::kernels::launch_float_to_bf16(x, n1, N * d, 0); }), 0, N * d * 6.0);
  Row("gemm dWd += dy^T h", TimeMs([&] { gemm.Run(GemmMode::kBF16, true, false, d, f, N, n1, d, h, f, dwf, f, GemmType::kF32, 1.f); }),
      2.0 * N * d * f, 0);
  Row("gemm dh = dy Wd", TimeMs([&] { gemm.Run(GemmMode::kBF16, false, false, N, f, d, n1, d, wd, f, h, f, GemmType::kBF16); }),
      2.0 * N * d * f, 0);
  Row("swiglu bwd", TimeMs([&] { blockd::kernels::launch_swiglu_bwd<bf16>(h, gu, gu, N, f, 0); }), 0, N * f * 10.0);
  Row("gemm dWgu += dgu^T n2", TimeMs([&] { gemm.Run(GemmMode::kBF16, true, false, 2 * f, d, N, gu, 2 * f, n1, d, dwf, d, GemmType::kF32, 1.f); }),
      2.0 * N * 2 * f * d, 0);
  Row("gemm dn2 = dgu Wgu", TimeMs([&] { gemm.Run(GemmMode::kBF16, false, false, N, d, 2 * f, gu, 2 * f, wgu, d, out, d, GemmType::kF32); }),
      2.0 * N * 2 * f * d, 0);
  Row("rmsnorm bwd (+ residual, + bf16 copy)", TimeMs([&] {
        blockd::kernels::launch_rmsnorm_bwd(out, x, w_norm, rstd, r1, r1, n1, w_norm, true, rms_ws, N, d, 0);
      }),
      0, N * d * 16.0);
  Row("gemm dWo += dr1^T o", TimeMs([&] { gemm.Run(GemmMode::kBF16, true, false, d, qd, N, n1, d, o, qd, dwf, qd, GemmType::kF32, 1.f); }),
      2.0 * N * d * qd, 0);
  Row("gemm do = dr1 Wo", TimeMs([&] { gemm.Run(GemmMode::kBF16, false, false, N, qd, d, n1, d, wo, qd, o, qd, GemmType::kBF16); }),
      2.0 * N * d * qd, 0);
  Row("attention bwd (delta + tensor cores)", TimeMs([&] {
        blockd::kernels::launch_attention_bwd<bf16>(q, qd, k, kvd, qkvb + qd + kvd, qkv, o, qd, lse, o, qd, dq, dk,
                                                    qkvb + qd + kvd, qkv, delta, B, S, H, Hkv, dh, scale, 0);
      }),
      2.5 * attn_flops, 0);
  Row("qk-norm + rope bwd (q and k)", TimeMs([&] {
        blockd::kernels::launch_qknorm_rope_bwd<bf16>(dq, qkvb, qkv, rstd, w_norm, table, qkvb, w_norm, true, qk_ws, N, S, H, dh, 0);
        blockd::kernels::launch_qknorm_rope_bwd<bf16>(dk, qkvb + qd, qkv, rstd, w_norm, table, qkvb + qd, w_norm, true, qk_ws, N, S, Hkv, dh, 0);
      }),
      0, N * (qd + kvd) * 8.0);
  Row("gemm dWqkv += dqkv^T n1", TimeMs([&] { gemm.Run(GemmMode::kBF16, true, false, qkv, d, N, qkvb, qkv, n1, d, dwf, d, GemmType::kF32, 1.f); }),
      2.0 * N * qkv * d, 0);
  Row("gemm dn1 = dqkv Wqkv", TimeMs([&] { gemm.Run(GemmMode::kBF16, false, false, N, d, qkv, qkvb, qkv, wqkv, d, out, d, GemmType::kF32); }),
      2.0 * N * qkv * d, 0);

  std::printf("-- fp32 path (PRECISION_FP32) --\n");
  {
    float* qf = Random<float>(N * qd);
    float* kf = Random<float>(N * kvd);
    float* vf = Random<float>(N * kvd);
    float* of = Random<float>(N * qd);
    Row("attention fwd fp32 (simt)", TimeMs([&] {
          blockd::kernels::launch_attention_fwd<float>(qf, qd, kf, kvd, vf, kvd, of, qd, lse, B, S, H, Hkv, dh, scale, 0);
        }),
        attn_flops, 0);
    Row("attention bwd fp32 (simt)", TimeMs([&] {
          blockd::kernels::launch_attention_bwd<float>(qf, qd, kf, kvd, vf, kvd, of, qd, lse, of, qd, dq, dk, vf, kvd,
                                                       delta, B, S, H, Hkv, dh, scale, 0);
        }),
        2.5 * attn_flops, 0);
    float* wf = Random<float>(2 * f * d, 0.03f);
    float* guf;
    CHECK(cudaMalloc(&guf, N * 2 * f * 4));
    Row("gemm gu fp32 (SGEMM)", TimeMs([&] { gemm.Run(GemmMode::kFP32, false, true, N, 2 * f, d, x, d, wf, d, guf, 2 * f, GemmType::kF32); }),
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
