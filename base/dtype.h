// Element types on the wire and in files, and host conversions between them and float32.
//
// bfloat16 rounds to nearest, ties to even (NaN stays NaN); float16 is IEEE binary16, also
// round-to-nearest-even, with subnormals and overflow to infinity.
//   std::vector<float> x(n);
//   RETURN_IF_ERROR(ConvertToFloat32(DType::kBFloat16, bytes.data(), n, x.data()));
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include "absl/strings/string_view.h"

namespace blockd {

enum class DType : uint8_t { kFloat32, kBFloat16, kFloat16 };

inline size_t DTypeSize(DType t) { return t == DType::kFloat32 ? 4 : 2; }
absl::string_view DTypeName(DType t);  // "float32", "bfloat16", "float16"

inline uint16_t Float32ToBFloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float BFloat16ToFloat32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t Float32ToFloat16(float f);
float Float16ToFloat32(uint16_t h);

// n elements of `src` (in `src_type`) to float32. Unaligned sources are fine.
void ConvertToFloat32(DType src_type, const void* src, size_t n, float* dst);
// n float32 elements to `dst_type` at `dst`.
void ConvertFromFloat32(const float* src, size_t n, DType dst_type, void* dst);
// True when no element is NaN or infinite.
bool AllFinite(const float* x, size_t n);

}  // namespace blockd
