// cuDNN's fused attention (kernels/cudnn_attention.h) beside blockd's native kernels, forward and
// backward, at block shapes and in the block's layout (v inside the qkv rows, dv written back into
// them). TFLOP/s count causal FLOPs: forward 2 * 2 * b * H * s^2 * dh / 2, backward 2.5x that.
//
//   BLOCKD_CUDNN_PATH=/path/to/libcudnn_graph.so.9 bench_cudnn_attention [--iters=20] [--shape=all|qwen|llama]
//
// Each row: the median of `iters` launches timed with CUDA events after 3 warm-up launches.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/attention.cuh"
#include "kernels/convert.cuh"
#include "kernels/cudnn_attention.h"

namespace {

using bf16 = __nv_bfloat16;
using blockd::kernels::CudnnAttention;
using blockd::kernels::CudnnAttentionPass;
using blockd::kernels::CudnnAttentionProblem;
using blockd::kernels::CudnnPlanInfo;
using blockd::kernels::CudnnStatus;

#define CHECK_CUDA(expr)                                                                                  \
  do {                                                                                                    \
    const cudaError_t e_ = (expr);                                                                        \
    if (e_ != cudaSuccess) {                                                                              \
      std::fprintf(stderr, "%s failed: %s at %s:%d\n", #expr, cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(1);                                                                                       \
    }                                                                                                     \
  } while (0)

#define CHECK_CUDNN(expr)                                                                            \
  do {                                                                                               \
    const CudnnStatus s_ = (expr);                                                                   \
    if (!s_.ok()) {                                                                                  \
      std::fprintf(stderr, "%s failed at %s:%d:\n%s\n", #expr, __FILE__, __LINE__, s_.message.c_str()); \
      std::exit(1);                                                                                  \
    }                                                                                                \
  } while (0)

int iters = 20;

double TimeMs(const std::function<void()>& fn) {
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) fn();
  std::vector<float> ms;
  for (int i = 0; i < iters; ++i) {
    CHECK_CUDA(cudaEventRecord(a));
    fn();
    CHECK_CUDA(cudaEventRecord(b));
    CHECK_CUDA(cudaEventSynchronize(b));
    float t = 0;
    CHECK_CUDA(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  CHECK_CUDA(cudaGetLastError());
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

void Row(const std::string& what, double ms, double flops) {
  std::printf("  %-36s %9.3f ms  %7.1f TFLOP/s\n", what.c_str(), ms, flops / ms / 1e9);
  std::fflush(stdout);
}

// A device array of n normal values (bf16 or fp32), freed at exit of the shape's scope.
template <class T>
std::shared_ptr<T> Random(size_t n, float scale, uint64_t seed) {
  std::vector<float> h(n);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.f, scale);
  for (float& x : h) x = d(rng);
  T* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)));
  if constexpr (std::is_same<T, float>::value) {
    CHECK_CUDA(cudaMemcpy(p, h.data(), n * 4, cudaMemcpyHostToDevice));
  } else {
    float* tmp = nullptr;
    CHECK_CUDA(cudaMalloc(&tmp, n * 4));
    CHECK_CUDA(cudaMemcpy(tmp, h.data(), n * 4, cudaMemcpyHostToDevice));
    CHECK_CUDA(blockd::kernels::launch_float_to_bf16(tmp, p, n, 0));
    CHECK_CUDA(cudaDeviceSynchronize());
    cudaFree(tmp);
  }
  return std::shared_ptr<T>(p, [](T* q) { cudaFree(q); });
}

void Bench(CudnnAttention& attn, const char* name, int B, int S, int H, int Hkv, int dh) {
  const int64_t N = int64_t(B) * S, qd = int64_t(H) * dh, kvd = int64_t(Hkv) * dh, qkv = qd + 2 * kvd;
  const float scale = 1.f / std::sqrt(float(dh));
  const double fwd_flops = 2.0 * 2.0 * B * H * double(S) * S * dh / 2;
  std::printf("%s: batch %d, seq %d, heads %d, kv_heads %d, head_dim %d\n", name, B, S, H, Hkv, dh);

  auto q = Random<bf16>(N * qd, 1.f, 1), k = Random<bf16>(N * kvd, 1.f, 2), qkvb = Random<bf16>(N * qkv, 1.f, 3);
  auto o = Random<bf16>(N * qd, 1.f, 4), d_o = Random<bf16>(N * qd, 1.f, 5), dq16 = Random<bf16>(N * qd, 1.f, 6);
  auto dk16 = Random<bf16>(N * kvd, 1.f, 7), dqkv = Random<bf16>(N * qkv, 1.f, 8);
  auto lse = Random<float>(size_t(B) * H * S, 1.f, 9), lse_native = Random<float>(size_t(B) * H * S, 1.f, 10);
  auto dq = Random<float>(N * qd, 1.f, 11), dk = Random<float>(N * kvd, 1.f, 12);
  auto delta = Random<float>(blockd::kernels::attention_bwd_workspace_floats(B, S, H, Hkv, dh), 1.f, 13);
  const bf16* v = qkvb.get() + qd + kvd;
  bf16* dv = dqkv.get() + qd + kvd;

  CudnnAttentionProblem p = CudnnAttentionProblem::Packed(B, S, H, Hkv, dh);
  p.v_stride = p.dv_stride = qkv;
  CudnnPlanInfo fi, bi;
  CHECK_CUDNN(attn.Prepare(p, CudnnAttentionPass::kForward, &fi));
  CHECK_CUDNN(attn.Prepare(p, CudnnAttentionPass::kBackward, &bi));
  std::printf("  cuDNN engines: forward %lld (workspace %zu B), backward %lld (workspace %zu B)\n",
              (long long)fi.engine_index, fi.workspace_bytes, (long long)bi.engine_index, bi.workspace_bytes);
  void* ws = nullptr;
  CHECK_CUDA(cudaMalloc(&ws, std::max<size_t>({fi.workspace_bytes, bi.workspace_bytes, 1})));

  // Forward first, so that each backward reads its own forward's statistics and a real o.
  Row("cuDNN forward", TimeMs([&] {
        CHECK_CUDNN(attn.Forward(p, {q.get(), k.get(), v, o.get(), lse.get()}, scale, ws, fi.workspace_bytes, 0));
      }),
      fwd_flops);
  auto native = blockd::kernels::AttentionArgs<bf16>::Causal(B, S, H, Hkv, dh, 0);
  native.scale = scale;
  native.q = q.get();
  native.q_stride = qd;
  native.k = k.get();
  native.k_stride = kvd;
  native.v = v;
  native.v_stride = qkv;
  native.o = o.get();
  native.o_stride = qd;
  native.lse = lse_native.get();
  native.d_o = d_o.get();
  native.do_stride = qd;
  native.dq = dq.get();
  native.dk = dk.get();
  native.dv = dv;
  native.dv_stride = qkv;
  native.workspace = delta.get();
  Row("native forward (mma.sync)", TimeMs([&] { CHECK_CUDA(blockd::kernels::launch_attention_fwd(native)); }),
      fwd_flops);
  Row("cuDNN backward", TimeMs([&] {
        CHECK_CUDNN(attn.Backward(p, {q.get(), k.get(), v, o.get(), lse.get(), d_o.get(), dq16.get(), dk16.get(), dv},
                                  scale, ws, bi.workspace_bytes, 0));
      }),
      2.5 * fwd_flops);
  Row("native backward (delta + mma.sync)", TimeMs([&] { CHECK_CUDA(blockd::kernels::launch_attention_bwd(native)); }),
      2.5 * fwd_flops);
  CHECK_CUDA(cudaDeviceSynchronize());
  cudaFree(ws);
}

}  // namespace

int main(int argc, char** argv) {
  std::string shape = "all";
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--iters=", 8) == 0) iters = std::max(1, std::atoi(argv[i] + 8));
    else if (std::strncmp(argv[i], "--shape=", 8) == 0) shape = argv[i] + 8;
    else {
      std::fprintf(stderr, "usage: %s [--iters=20] [--shape=all|qwen|llama]\n", argv[0]);
      return 2;
    }
  }
  const CudnnStatus avail = CudnnAttention::Available();
  if (!avail.ok()) {
    std::fprintf(stderr, "%s\n", avail.message.c_str());
    return 1;
  }
  std::unique_ptr<CudnnAttention> attn;
  CHECK_CUDNN(CudnnAttention::Create(&attn));
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s, %d iterations each (median)\n", prop.name, iters);
  if (shape == "all" || shape == "qwen") Bench(*attn, "Qwen3-0.6B-like", 8, 2048, 16, 8, 128);
  if (shape == "all" || shape == "llama") Bench(*attn, "Llama-3-8B-like", 1, 4096, 32, 8, 128);
  return 0;
}
