// The one check that a tensor a client sent holds no NaN or infinity, with the one message for it
// (the caller names the tensor first: "hidden_states has a non-finite value (nan) at element 7").
// Used by the CPU backend's Upload and by a session step before it joins a batch.
//
//   RETURN_IF_ERROR(CheckFinite(values.data(), values.size()));        // float32 already
//   RETURN_IF_ERROR(CheckFinite(DType::kBFloat16, bytes, n, /*chunk=*/hidden));  // wire bytes
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/dtype.h"

namespace blockd {

// OK when no element of x[0..n) is NaN or infinite; else INVALID_ARGUMENT naming the first bad
// value and its index, counted from `first_index` (x's place in the whole tensor).
inline absl::Status CheckFinite(const float* x, size_t n, size_t first_index = 0) {
  if (AllFinite(x, n)) return absl::OkStatus();
  const float* bad = std::find_if(x, x + n, [](float v) { return !std::isfinite(v); });
  return absl::InvalidArgumentError(
      absl::StrCat("has a non-finite value (", *bad, ") at element ", first_index + (bad - x)));
}

// The same over n elements of `dtype` at `data`, converted `chunk` elements at a time (a token's
// hidden vector, say), so the check copies no more than a chunk of the tensor.
inline absl::Status CheckFinite(DType dtype, const void* data, size_t n, size_t chunk) {
  std::vector<float> part(std::max<size_t>(1, std::min(chunk, n)));
  const auto* bytes = static_cast<const char*>(data);
  for (size_t i = 0; i < n; i += part.size()) {
    const size_t m = std::min(part.size(), n - i);
    ConvertToFloat32(dtype, bytes + i * DTypeSize(dtype), m, part.data());
    if (absl::Status st = CheckFinite(part.data(), m, i); !st.ok()) return st;
  }
  return absl::OkStatus();
}

}  // namespace blockd
