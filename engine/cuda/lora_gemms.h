// PEFT's LoRA beside a CUDA block's projections, as cuBLASLt products (the math: engine/cpu/lora.h).
//
// A site is one of the block's products whose input feeds some targets: q|k|v (input n1), o (the
// attention's output), gate|up (n2) and down (h). Each target's output is a column range of the
// site's output. The targets' A matrices of one site lie adjacent in the block's storage, so one
// product makes the site's U = x [A_1; A_2; ...]^T for all of them, and one product each gives
// dA and the input gradient's share; only the B products go target by target. U is kept by the
// forward for the backward (rank columns per target: r/in of x's bytes), so the backward never
// recomputes it.
//
//   forward:   U = x A^T;              y[:, col_j] (+)= s U_j B_j^T
//   backward:  dU_j = s dY_j B_j;      dB_j (+)= s dY_j^T U_j;     dA (+)= dU^T x;     dx = dU A
//
// Where the adapters write first (the forward's B products where the targets cover the site's
// output, the backward's dx always), the base product then adds onto them in its epilogue (beta 1),
// which hides that read under its compute; only adding afterwards would cost a separate read and
// write of the whole output.
#pragma once

#include <cstdint>
#include <vector>

#include "base/block_config.h"
#include "kernels/gemm.h"

namespace blockd::cuda {

enum class LoraSite : uint8_t { kQkv, kO, kGateUp, kDown };
inline constexpr LoraSite kLoraSites[] = {LoraSite::kQkv, LoraSite::kO, LoraSite::kGateUp, LoraSite::kDown};

// One target of a site: the adapters' ids, the columns of the site's output it adds to.
struct LoraSiteTarget {
  ParamId a, b;
  int64_t col = 0, out = 0;
};

// The targets of `lora` at `site` in kLoraTargets order, with the site's input width and the first
// column of U (rank columns per target, all sites' targets in kLoraTargets order).
struct LoraSiteShape {
  std::vector<LoraSiteTarget> targets;
  int64_t in = 0;
  int64_t u_col = 0;
};
LoraSiteShape LoraSiteOf(LoraSite site, const BlockConfig& c, const LoraConfig& lora);
// Columns of U (and dU): rank times the number of targets.
int64_t LoraUColumns(const LoraConfig& lora);

// A site's products over `rows` tokens, with the pointers of one call.
struct LoraSiteGemms {
  kernels::GemmMode mode = kernels::GemmMode::kFP32;
  kernels::GemmType t = kernels::GemmType::kF32;  // the compute dtype: x, U, dU, A and B
  int64_t rows = 0, rank = 0, u_ld = 0;
  float scale = 1.f;
  LoraSiteShape shape;
  const void* a = nullptr;            // the site's A matrices, stacked [targets * rank, in]
  float* da = nullptr;                // their gradient
  std::vector<const void*> b;         // by target: B [out, rank]
  std::vector<float*> db;             // by target: its gradient

  bool empty() const { return shape.targets.empty(); }
  // Whether the targets' columns are all `width` columns of the site's output.
  bool Covers(int64_t width) const;
  // U = x A^T into u [rows, u_ld] (the site's columns), then y [rows, ldy] += s U_j B_j^T (or =,
  // leaving the other columns alone, unless `add`).
  std::vector<kernels::GemmArgs> Forward(const void* x, void* u, void* y, int64_t ldy, kernels::GemmType y_type,
                                         bool add) const;
  // From the site output's gradient dy [rows, ld_dy] and the forward's x and U: dU into du, the
  // adapters' gradients (overwritten unless `accumulate`) and dx [rows, in] = dU A (overwritten:
  // the base product's dY W adds onto it).
  std::vector<kernels::GemmArgs> Backward(const void* x, const void* u, const void* dy, int64_t ld_dy, void* du,
                                          void* dx, kernels::GemmType dx_type, bool accumulate) const;
};

}  // namespace blockd::cuda
