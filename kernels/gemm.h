// Row-major matrix products through cuBLASLt, with the residual add fused by C != D:
//   D[m, n] = alpha * op(A)[m, k] * op(B)[k, n] + beta * C[m, n]
// op(X) = X^T when trans_x. Operand types follow the mode: kFP32 (IEEE fp32, TF32 off), kTF32
// (fp32 data, tf32 tensor cores), kBF16 (bf16 A and B, fp32 accumulation, C/D fp32 or bf16).
// A block's products are those of nn.Linear layers (weights [out, in]), built by LinearGemm:
//
//   GemmContext ctx;  ctx.Init(workspace, bytes);
//   const LinearGemm up{GemmMode::kBF16, /*rows=*/N, /*in=*/D, /*out=*/F};
//   ctx.Run(up.Forward(n2, w, gu, GemmType::kBF16), stream);                   // gu = n2 W^T
//   ctx.Run(up.BackwardInput(dgu, w, dn2, GemmType::kF32), stream);            // dn2 = dgu W
//   ctx.Run(up.BackwardWeight(dgu, n2, dw, /*accumulate=*/true), stream);      // dW += dgu^T n2
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

namespace blockd::kernels {

enum class GemmMode : uint8_t { kFP32, kTF32, kBF16 };
enum class GemmType : uint8_t { kF32, kBF16 };

struct GemmArgs {
  GemmMode mode = GemmMode::kFP32;
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;
  int64_t lda = 0;
  const void* b = nullptr;
  int64_t ldb = 0;
  float alpha = 1.f, beta = 0.f;
  const void* c = nullptr;  // read when beta != 0; null means c = d
  int64_t ldc = 0;
  GemmType c_type = GemmType::kF32;
  void* d = nullptr;
  int64_t ldd = 0;
  GemmType d_type = GemmType::kF32;

  // D = op(A) op(B), the one way to set the product's fields.
  static GemmArgs Product(GemmMode mode, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const void* a,
                          int64_t lda, const void* b, int64_t ldb, void* d, int64_t ldd, GemmType d_type) {
    GemmArgs g;
    g.mode = mode;
    g.trans_a = trans_a;
    g.trans_b = trans_b;
    g.m = m;
    g.n = n;
    g.k = k;
    g.a = a;
    g.lda = lda;
    g.b = b;
    g.ldb = ldb;
    g.d = d;
    g.ldd = ldd;
    g.d_type = d_type;
    return g;
  }
  // The same product plus C (a residual, laid out as D), written to D.
  GemmArgs PlusC(const void* c_in, GemmType c_in_type = GemmType::kF32) const {
    GemmArgs g = *this;
    g.beta = 1.f;
    g.c = c_in;
    g.ldc = ldd;
    g.c_type = c_in_type;
    return g;
  }
  // The same product added to what D holds when `accumulate`, else overwriting it.
  GemmArgs AddedToD(bool accumulate) const {
    GemmArgs g = *this;
    g.beta = accumulate ? 1.f : 0.f;
    g.c = nullptr;
    return g;
  }
};

// The three products of an nn.Linear layer y = x W^T, for W [out, in] and x [rows, in], all
// row-major and dense. The weight gradient is fp32 (it is the master weights' gradient).
struct LinearGemm {
  GemmMode mode = GemmMode::kFP32;
  int64_t rows = 0, in = 0, out = 0;

  // y [rows, out] = x W^T
  GemmArgs Forward(const void* x, const void* w, void* y, GemmType y_type) const {
    return GemmArgs::Product(mode, false, true, rows, out, in, x, in, w, in, y, out, y_type);
  }
  // dx [rows, in] = dy W
  GemmArgs BackwardInput(const void* dy, const void* w, void* dx, GemmType dx_type) const {
    return GemmArgs::Product(mode, false, false, rows, in, out, dy, out, w, in, dx, in, dx_type);
  }
  // dW [out, in] (+)= dy^T x
  GemmArgs BackwardWeight(const void* dy, const void* x, float* dw, bool accumulate) const {
    return GemmArgs::Product(mode, true, false, out, in, rows, dy, out, x, in, dw, in, GemmType::kF32)
        .AddedToD(accumulate);
  }
};

// One cuBLASLt handle, its workspace and a cache of descriptors and chosen algorithms per shape.
// Thread-safe; launches on the caller's stream (the workspace is used in stream order, so every
// caller must use the same stream, or give each stream its own context).
class GemmContext {
 public:
  GemmContext() = default;
  ~GemmContext();
  GemmContext(const GemmContext&) = delete;
  GemmContext& operator=(const GemmContext&) = delete;

  cublasStatus_t Init(void* workspace, size_t workspace_bytes);
  cublasStatus_t Run(const GemmArgs& args, cudaStream_t stream);

 private:
  struct Plan {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;
    cublasLtMatmulAlgo_t algo{};
  };
  // Mode, transposes, sizes, leading dimensions, types, beta != 0, and the pointers' alignment.
  using Key = std::tuple<int, bool, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, int,
                         bool, uint32_t>;
  cublasStatus_t MakePlan(const GemmArgs& args, uint32_t alignment, Plan* plan);

  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::mutex mu_;
  std::map<Key, Plan> plans_;
};

}  // namespace blockd::kernels
