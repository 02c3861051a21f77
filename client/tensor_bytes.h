// Whole tensors as the client library hands them around, and the wire dtype helpers a client needs:
// element sizes, names, and host conversions between float32 and bfloat16 / float16 (base/dtype.h's
// codecs, the same ones the server uses: round to nearest, ties to even).
//
//   v1::Tensor x = wire::MakeTensor(v1::DTYPE_BFLOAT16, {2, 8, 64}, values);   // floats -> bf16 bytes
//   ASSIGN_OR_RETURN(std::vector<float> y, wire::TensorToFloat32(reply.output()));
//   TensorBytes w{"mlp.up_proj.weight", v1::DTYPE_FLOAT32, {128, 64}, bytes};
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "blockd/v1/block_service.pb.h"

namespace blockd {

// One whole named tensor: raw little-endian, row-major bytes of `dtype` in `shape`.
struct TensorBytes {
  std::string name;
  v1::DType dtype = v1::DTYPE_FLOAT32;
  std::vector<int64_t> shape;
  std::string data;
};

namespace wire {

// Bytes per element: 4 for FLOAT32, 2 for BFLOAT16/FLOAT16, 0 for anything else.
int64_t DTypeBytes(v1::DType t);
// "float32", "bfloat16", "float16", or the enum's proto name for others.
std::string DTypeName(v1::DType t);
// Accepts float32|fp32|f32, bfloat16|bf16, float16|fp16|f16 (any case).
bool ParseDType(absl::string_view text, v1::DType* out);

// Product of the dimensions (1 for a scalar); -1 when a dimension is negative or it overflows.
int64_t NumElements(const std::vector<int64_t>& shape);
// `n` floats as `dtype` bytes. `dtype` must have a size.
std::string EncodeFloat32(const float* values, size_t n, v1::DType dtype);
// Bytes of `dtype` to floats; INVALID_ARGUMENT for an unknown dtype or a size that is not a
// whole number of elements.
absl::StatusOr<std::vector<float>> DecodeToFloat32(v1::DType dtype, absl::string_view bytes);

v1::Tensor MakeTensor(v1::DType dtype, const std::vector<int64_t>& shape, const std::vector<float>& values);
// The tensor's values as floats; INVALID_ARGUMENT when the bytes do not match dtype and shape.
absl::StatusOr<std::vector<float>> TensorToFloat32(const v1::Tensor& t);
std::vector<int64_t> ShapeOf(const v1::Tensor& t);

}  // namespace wire
}  // namespace blockd
