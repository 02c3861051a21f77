// The reference backend: blocks in host memory, fp32 arithmetic, BLAS matrix products.
//
// It is the oracle every other backend is checked against, and what blockd runs on a machine
// without a GPU. It supports PRECISION_FP32 only; other precisions are UNIMPLEMENTED here.
//   std::unique_ptr<Backend> cpu = MakeCpuBackend();
#pragma once

#include <memory>

#include "engine/backend.h"

namespace blockd {

std::unique_ptr<Backend> MakeCpuBackend();

}  // namespace blockd
