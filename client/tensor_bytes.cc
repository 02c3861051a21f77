#include "client/tensor_bytes.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace blockd {
namespace wire {

int64_t DTypeBytes(v1::DType t) {
  switch (t) {
    case v1::DTYPE_FLOAT32: return 4;
    case v1::DTYPE_BFLOAT16:
    case v1::DTYPE_FLOAT16: return 2;
    default: return 0;
  }
}

std::string DTypeName(v1::DType t) {
  switch (t) {
    case v1::DTYPE_FLOAT32: return "float32";
    case v1::DTYPE_BFLOAT16: return "bfloat16";
    case v1::DTYPE_FLOAT16: return "float16";
    default: {
      const std::string& name = v1::DType_Name(t);
      return name.empty() ? absl::StrCat("dtype ", static_cast<int>(t)) : name;
    }
  }
}

bool ParseDType(absl::string_view text, v1::DType* out) {
  const std::string s = absl::AsciiStrToLower(text);
  if (s == "float32" || s == "fp32" || s == "f32") {
    *out = v1::DTYPE_FLOAT32;
  } else if (s == "bfloat16" || s == "bf16") {
    *out = v1::DTYPE_BFLOAT16;
  } else if (s == "float16" || s == "fp16" || s == "f16" || s == "half") {
    *out = v1::DTYPE_FLOAT16;
  } else {
    return false;
  }
  return true;
}

int64_t NumElements(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return -1;
    if (d != 0 && n > std::numeric_limits<int64_t>::max() / d) return -1;
    n *= d;
  }
  return n;
}

std::string ShapeString(const std::vector<int64_t>& shape) { return absl::StrCat("[", absl::StrJoin(shape, ","), "]"); }

uint16_t Float32ToBFloat16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if (std::isnan(f)) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // keep it a (quiet) NaN
  // Round to nearest even on the 16 bits that are dropped.
  const uint32_t lsb = (bits >> 16) & 1u;
  bits += 0x7fffu + lsb;
  return static_cast<uint16_t>(bits >> 16);
}

float BFloat16ToFloat32(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// binary16 by arithmetic rather than bit surgery: frexp splits the value, nearbyint rounds the
// significand to 10 bits (ties to even under the default rounding mode), a carry of the
// significand into the exponent falls out of adding the two fields.
uint16_t Float32ToFloat16(float f) {
  const uint16_t sign = std::signbit(f) ? 0x8000u : 0u;
  if (std::isnan(f)) return static_cast<uint16_t>(sign | 0x7e00u);
  const double a = std::fabs(static_cast<double>(f));
  if (a >= 65520.0) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds past the largest half
  if (a < std::ldexp(1.0, -14)) {                                   // subnormal (or zero)
    const double m = std::nearbyint(std::ldexp(a, 24));            // units of 2^-24
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(m));   // m == 1024 is the smallest normal
  }
  int e2 = 0;
  const double fr = std::frexp(a, &e2);                      // a = fr * 2^e2, fr in [0.5, 1)
  const double m = std::nearbyint((fr * 2.0 - 1.0) * 1024);  // 10-bit fraction, may round to 1024
  const uint32_t exponent = static_cast<uint32_t>(e2 - 1 + 15);
  return static_cast<uint16_t>(sign | ((exponent << 10) + static_cast<uint32_t>(m)));
}

float Float16ToFloat32(uint16_t h) {
  const bool negative = (h & 0x8000u) != 0;
  const int exponent = (h >> 10) & 0x1f;
  const int fraction = h & 0x3ff;
  float v;
  if (exponent == 0x1f) {
    v = fraction == 0 ? std::numeric_limits<float>::infinity() : std::numeric_limits<float>::quiet_NaN();
  } else if (exponent == 0) {
    v = static_cast<float>(std::ldexp(static_cast<double>(fraction), -24));
  } else {
    v = static_cast<float>(std::ldexp(static_cast<double>(1024 + fraction), exponent - 25));
  }
  return negative ? -v : v;
}

std::string EncodeFloat32(const float* values, size_t n, v1::DType dtype) {
  std::string out(n * static_cast<size_t>(DTypeBytes(dtype)), '\0');
  char* p = out.data();
  switch (dtype) {
    case v1::DTYPE_FLOAT32:
      if (n > 0) std::memcpy(p, values, n * 4);
      break;
    case v1::DTYPE_BFLOAT16:
      for (size_t i = 0; i < n; ++i) {
        const uint16_t h = Float32ToBFloat16(values[i]);
        std::memcpy(p + 2 * i, &h, 2);
      }
      break;
    case v1::DTYPE_FLOAT16:
      for (size_t i = 0; i < n; ++i) {
        const uint16_t h = Float32ToFloat16(values[i]);
        std::memcpy(p + 2 * i, &h, 2);
      }
      break;
    default: break;
  }
  return out;
}

absl::StatusOr<std::vector<float>> DecodeToFloat32(v1::DType dtype, absl::string_view bytes) {
  const int64_t size = DTypeBytes(dtype);
  if (size == 0) return absl::InvalidArgumentError(absl::StrCat("cannot decode ", DTypeName(dtype)));
  if (bytes.size() % static_cast<size_t>(size) != 0) {
    return absl::InvalidArgumentError(absl::StrCat(bytes.size(), " bytes are not a whole number of ",
                                                   DTypeName(dtype), " elements"));
  }
  std::vector<float> out(bytes.size() / static_cast<size_t>(size));
  for (size_t i = 0; i < out.size(); ++i) {
    if (dtype == v1::DTYPE_FLOAT32) {
      std::memcpy(&out[i], bytes.data() + 4 * i, 4);
    } else {
      uint16_t h;
      std::memcpy(&h, bytes.data() + 2 * i, 2);
      out[i] = dtype == v1::DTYPE_BFLOAT16 ? BFloat16ToFloat32(h) : Float16ToFloat32(h);
    }
  }
  return out;
}

v1::Tensor MakeTensor(v1::DType dtype, const std::vector<int64_t>& shape, const std::vector<float>& values) {
  v1::Tensor t;
  t.set_dtype(dtype);
  for (int64_t d : shape) t.add_shape(d);
  t.set_data(EncodeFloat32(values.data(), values.size(), dtype));
  return t;
}

std::vector<int64_t> ShapeOf(const v1::Tensor& t) { return std::vector<int64_t>(t.shape().begin(), t.shape().end()); }

absl::StatusOr<std::vector<float>> TensorToFloat32(const v1::Tensor& t) {
  const std::vector<int64_t> shape = ShapeOf(t);
  const int64_t n = NumElements(shape);
  const int64_t size = DTypeBytes(t.dtype());
  if (n < 0 || size == 0 || static_cast<int64_t>(t.data().size()) != n * size) {
    return absl::InvalidArgumentError(absl::StrCat("tensor of shape ", ShapeString(shape), " and ",
                                                   DTypeName(t.dtype()), " has ", t.data().size(),
                                                   " bytes of data"));
  }
  return DecodeToFloat32(t.dtype(), t.data());
}

}  // namespace wire
}  // namespace blockd
