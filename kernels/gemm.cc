#include "kernels/gemm.h"

#include "kernels/gemv.cuh"

namespace blockd::kernels {
namespace {

cudaDataType_t CudaType(GemmType t) { return t == GemmType::kBF16 ? CUDA_R_16BF : CUDA_R_32F; }

#define LT_TRY(expr)                                    \
  do {                                                  \
    cublasStatus_t lt_status_ = (expr);                 \
    if (lt_status_ != CUBLAS_STATUS_SUCCESS) return lt_status_; \
  } while (0)

// The largest power of two (at most 256) dividing every pointer: algorithms needing more are excluded.
uint32_t Alignment(const GemmArgs& g) {
  uintptr_t bits = reinterpret_cast<uintptr_t>(g.a) | reinterpret_cast<uintptr_t>(g.b) |
                   reinterpret_cast<uintptr_t>(g.c) | reinterpret_cast<uintptr_t>(g.d) | 256;
  return static_cast<uint32_t>(bits & (~bits + 1));
}

}  // namespace

GemmContext::~GemmContext() {
  for (auto& [key, p] : plans_) {
    cublasLtMatrixLayoutDestroy(p.a);
    cublasLtMatrixLayoutDestroy(p.b);
    cublasLtMatrixLayoutDestroy(p.c);
    cublasLtMatrixLayoutDestroy(p.d);
    cublasLtMatmulDescDestroy(p.op);
  }
  if (handle_ != nullptr) cublasLtDestroy(handle_);
}

cublasStatus_t GemmContext::Init(void* workspace, size_t workspace_bytes) {
  workspace_ = workspace;
  workspace_bytes_ = workspace_bytes;
  return cublasLtCreate(&handle_);
}

// Row-major D = op(A) op(B) is column-major D^T = op(B)^T op(A)^T: cuBLASLt sees B first.
cublasStatus_t GemmContext::MakePlan(const GemmArgs& g, uint32_t alignment, Plan* plan) {
  const cudaDataType_t ab_type = g.mode == GemmMode::kBF16 ? CUDA_R_16BF : CUDA_R_32F;
  const cublasComputeType_t compute = g.mode == GemmMode::kTF32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  LT_TRY(cublasLtMatmulDescCreate(&plan->op, compute, CUDA_R_32F));
  const cublasOperation_t op_first = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_second = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  LT_TRY(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSA, &op_first, sizeof(op_first)));
  LT_TRY(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSB, &op_second, sizeof(op_second)));
  // Column-major shapes of the stored operands.
  const uint64_t cm_m = g.n, cm_n = g.m, cm_k = g.k;
  LT_TRY(cublasLtMatrixLayoutCreate(&plan->a, ab_type, g.trans_b ? cm_k : cm_m, g.trans_b ? cm_m : cm_k, g.ldb));
  LT_TRY(cublasLtMatrixLayoutCreate(&plan->b, ab_type, g.trans_a ? cm_n : cm_k, g.trans_a ? cm_k : cm_n, g.lda));
  const int64_t ldc = g.c != nullptr ? g.ldc : g.ldd;
  LT_TRY(cublasLtMatrixLayoutCreate(&plan->c, CudaType(g.c != nullptr ? g.c_type : g.d_type), cm_m, cm_n, ldc));
  LT_TRY(cublasLtMatrixLayoutCreate(&plan->d, CudaType(g.d_type), cm_m, cm_n, g.ldd));

  cublasLtMatmulPreference_t pref = nullptr;
  LT_TRY(cublasLtMatmulPreferenceCreate(&pref));
  cublasStatus_t s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                          &workspace_bytes_, sizeof(workspace_bytes_));
  for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES}) {
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatmulPreferenceSetAttribute(pref, attr, &alignment, sizeof(alignment));
  }
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  if (s == CUBLAS_STATUS_SUCCESS) {
    s = cublasLtMatmulAlgoGetHeuristic(handle_, plan->op, plan->a, plan->b, plan->c, plan->d, pref, 1, &result,
                                       &found);
  }
  cublasLtMatmulPreferenceDestroy(pref);
  if (s != CUBLAS_STATUS_SUCCESS) return s;
  if (found == 0) return CUBLAS_STATUS_NOT_SUPPORTED;
  plan->algo = result.algo;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t GemmContext::Run(const GemmArgs& g, cudaStream_t stream) {
  if (g.m == 0 || g.n == 0) return CUBLAS_STATUS_SUCCESS;
  if (gemv_applies(g)) {  // a decode step's skinny products: a stream over the weights (gemv.cuh)
    return launch_gemv(g, stream) == cudaSuccess ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED;
  }
  const Key key{static_cast<int>(g.mode), g.trans_a, g.trans_b, g.m, g.n, g.k, g.lda, g.ldb,
                g.c != nullptr ? g.ldc : -1, g.ldd, static_cast<int>(g.c_type), static_cast<int>(g.d_type),
                g.beta != 0.f, Alignment(g)};
  Plan plan;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = plans_.find(key);
    if (it == plans_.end()) {
      Plan fresh;
      const cublasStatus_t s = MakePlan(g, std::get<13>(key), &fresh);
      if (s != CUBLAS_STATUS_SUCCESS) {
        cublasLtMatrixLayoutDestroy(fresh.a);
        cublasLtMatrixLayoutDestroy(fresh.b);
        cublasLtMatrixLayoutDestroy(fresh.c);
        cublasLtMatrixLayoutDestroy(fresh.d);
        cublasLtMatmulDescDestroy(fresh.op);
        return s;
      }
      it = plans_.emplace(key, fresh).first;
    }
    plan = it->second;
  }
  const void* c = g.c != nullptr ? g.c : g.d;
  return cublasLtMatmul(handle_, plan.op, &g.alpha, g.b, plan.a, g.a, plan.b, &g.beta, c, plan.c, g.d, plan.d,
                        &plan.algo, workspace_, workspace_bytes_, stream);
}

}  // namespace blockd::kernels
