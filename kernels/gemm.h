// Row-major matrix products through cuBLASLt, with the residual add fused by C != D:
//   D[m, n] = alpha * op(A)[m, k] * op(B)[k, n] + beta * C[m, n]
// op(X) = X^T when trans_x. Weights are nn.Linear [out, in], so `x W^T` is trans_b = true.
// Operand types follow the mode: kFP32 (IEEE fp32, TF32 off), kTF32 (fp32 data, tf32 tensor
// cores), kBF16 (bf16 A and B, fp32 accumulation, C/D fp32 or bf16).
//
//   GemmContext ctx;  ctx.Init(workspace, bytes);
//   ctx.Run({.mode = GemmMode::kBF16, .trans_b = true, .m = N, .n = F, .k = D, .a = n2, .lda = D,
//            .b = w, .ldb = D, .d = gu, .ldd = F, .d_type = GemmType::kBF16}, stream);
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
