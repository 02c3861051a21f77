// Assembles whole parameter tensors from the chunks of a LoadWeights stream, validating each chunk
// as it comes: a known name, the block's shape, one dtype per tensor, offsets inside the tensor, no
// overlap with an earlier chunk. Finish() then requires every started tensor to be fully covered.
// Nothing touches a block until Finish() succeeds, so a bad stream changes nothing.
//
//   TensorAssembler a("b0", BlockParams(config));
//   for (chunk : stream) RETURN_IF_ERROR(a.Add(chunk.name, dtype, shape, chunk.offset, data, size));
//   ASSIGN_OR_RETURN(std::vector<AssembledTensor> tensors, a.Finish());
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/statusor.h"
#include "base/block_config.h"
#include "base/dtype.h"

namespace blockd {

struct AssembledTensor {
  int index = 0;  // into the block's BlockParams
  DType dtype = DType::kFloat32;
  std::string bytes;
};

class TensorAssembler {
 public:
  TensorAssembler(std::string block_id, std::vector<ParamSpec> params);

  absl::Status Add(absl::string_view name, DType dtype, const std::vector<int64_t>& shape, int64_t offset,
                   const void* data, size_t size);
  absl::StatusOr<std::vector<AssembledTensor>> Finish();
  int64_t bytes_staged() const { return bytes_staged_; }

 private:
  struct Pending {
    AssembledTensor tensor;
    std::map<int64_t, int64_t> covered;  // start -> end of byte ranges received
    int64_t received = 0;
  };
  std::string block_id_;
  std::vector<ParamSpec> params_;
  std::map<int, Pending> pending_;
  int64_t bytes_staged_ = 0;
};

}  // namespace blockd
