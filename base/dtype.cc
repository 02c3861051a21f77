#include "base/dtype.h"

#include <cmath>

namespace blockd {

absl::string_view DTypeName(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
  }
  return "?";
}

uint16_t Float32ToFloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {
    // Result is subnormal (or zero) in half precision: value = m * 2^-24 with m < 1024.
    // Shift the 24-bit significand right, rounding to nearest even.
    if (abs < 0x33000000u) return static_cast<uint16_t>(sign);  // < 2^-25: rounds to zero
    const uint32_t exp = abs >> 23;
    const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - exp;  // 14..24
    uint32_t half = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1);
    const uint32_t mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1u))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  // Normal: rebias exponent (127 -> 15) and round the 23-bit mantissa to 10 bits.
  uint32_t v = abs - (112u << 23);
  v += 0xfffu + ((v >> 13) & 1u);
  return static_cast<uint16_t>(sign | (v >> 13));
}

float Float16ToFloat32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);
  } else if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      u = sign | ((112u - e) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else {
    u = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

void ConvertToFloat32(DType src_type, const void* src, size_t n, float* dst) {
  const auto* bytes = static_cast<const uint8_t*>(src);
  switch (src_type) {
    case DType::kFloat32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::kBFloat16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, bytes + 2 * i, 2);
        dst[i] = BFloat16ToFloat32(h);
      }
      return;
    case DType::kFloat16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, bytes + 2 * i, 2);
        dst[i] = Float16ToFloat32(h);
      }
      return;
  }
}

void ConvertFromFloat32(const float* src, size_t n, DType dst_type, void* dst) {
  auto* bytes = static_cast<uint8_t*>(dst);
  switch (dst_type) {
    case DType::kFloat32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::kBFloat16:
      for (size_t i = 0; i < n; ++i) {
        const uint16_t h = Float32ToBFloat16(src[i]);
        std::memcpy(bytes + 2 * i, &h, 2);
      }
      return;
    case DType::kFloat16:
      for (size_t i = 0; i < n; ++i) {
        const uint16_t h = Float32ToFloat16(src[i]);
        std::memcpy(bytes + 2 * i, &h, 2);
      }
      return;
  }
}

bool AllFinite(const float* x, size_t n) {
  // Sum of x*0 is NaN iff some element is NaN or infinite; cheaper than isfinite per element.
  float acc = 0.f;
  for (size_t i = 0; i < n; ++i) acc += x[i] * 0.f;
  return acc == 0.f;
}

}  // namespace blockd
