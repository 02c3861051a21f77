#include "client/tensor_bytes.h"

#include <limits>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "base/block_config.h"
#include "base/dtype.h"

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

namespace {

// The base codec's dtype for a wire dtype that has a size.
DType BaseDType(v1::DType t) {
  return t == v1::DTYPE_BFLOAT16 ? DType::kBFloat16 : t == v1::DTYPE_FLOAT16 ? DType::kFloat16 : DType::kFloat32;
}

}  // namespace

std::string EncodeFloat32(const float* values, size_t n, v1::DType dtype) {
  std::string out(n * static_cast<size_t>(DTypeBytes(dtype)), '\0');
  if (n > 0 && !out.empty()) ConvertFromFloat32(values, n, BaseDType(dtype), out.data());
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
  if (!out.empty()) ConvertToFloat32(BaseDType(dtype), bytes.data(), out.size(), out.data());
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
