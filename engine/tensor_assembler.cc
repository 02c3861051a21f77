#include "engine/tensor_assembler.h"

#include <cstdint>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/echo.h"

namespace blockd {

TensorAssembler::TensorAssembler(std::string block_id, std::vector<ParamSpec> params)
    : block_id_(std::move(block_id)), params_(std::move(params)) {}

absl::Status TensorAssembler::Add(absl::string_view name, DType dtype, const std::vector<int64_t>& shape,
                                  int64_t offset, const void* data, size_t size) {
  const int index = FindParam(params_, name);
  if (index < 0) {
    std::vector<std::string> names;
    for (const ParamSpec& p : params_) names.push_back(p.name);
    return absl::InvalidArgumentError(absl::StrCat("block ", block_id_, " has no tensor \"", Echo(name),
                                                   "\"; expected one of: ", absl::StrJoin(names, ", ")));
  }
  const ParamSpec& spec = params_[index];
  if (shape != spec.shape) {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", name, " shape ", ShapeString(shape), ", block ",
                                                   block_id_, " expects ", ShapeString(spec.shape)));
  }
  const int64_t total = spec.numel() * static_cast<int64_t>(DTypeSize(dtype));
  auto [it, fresh] = pending_.try_emplace(index);
  Pending& p = it->second;
  if (fresh) {
    p.tensor.index = index;
    p.tensor.dtype = dtype;
    p.tensor.bytes.resize(total);
    bytes_staged_ += total;
  } else if (p.tensor.dtype != dtype) {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", name, " chunk dtype ", DTypeName(dtype),
                                                   " differs from its earlier chunks' ", DTypeName(p.tensor.dtype)));
  }
  const int64_t len = static_cast<int64_t>(size);
  if (offset < 0 || len > total || offset > total - len) {
    // offset + len overflows int64 for offsets near 2^63 (signed overflow is UB): say so instead.
    const std::string end = offset <= INT64_MAX - len ? absl::StrCat(offset + len) : "beyond 2^63";
    return absl::InvalidArgumentError(absl::StrCat("tensor ", name, " chunk covers bytes [", offset, ", ", end,
                                                   "), outside the tensor's ", total, " bytes (",
                                                   ShapeString(spec.shape), " ", DTypeName(dtype), ")"));
  }
  if (len == 0) return absl::OkStatus();
  const int64_t end = offset + len;
  // The first range starting at or after `offset`, and the one before it, are the only candidates.
  auto next = p.covered.lower_bound(offset);
  if (next != p.covered.end() && next->first < end) {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", name, " chunk [", offset, ", ", end,
                                                   ") overlaps an earlier chunk [", next->first, ", ",
                                                   next->second, ")"));
  }
  if (next != p.covered.begin()) {
    auto prev = std::prev(next);
    if (prev->second > offset) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", name, " chunk [", offset, ", ", end,
                                                     ") overlaps an earlier chunk [", prev->first, ", ",
                                                     prev->second, ")"));
    }
  }
  p.covered.emplace(offset, end);
  p.received += len;
  std::memcpy(p.tensor.bytes.data() + offset, data, size);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<AssembledTensor>> TensorAssembler::Finish() {
  if (pending_.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("LoadWeights for block ", block_id_, " carried no tensors"));
  }
  std::vector<AssembledTensor> out;
  for (auto& [index, p] : pending_) {
    const int64_t total = static_cast<int64_t>(p.tensor.bytes.size());
    if (p.received != total) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", params_[index].name, " is incomplete: ",
                                                     p.received, " of ", total, " bytes received"));
    }
    out.push_back(std::move(p.tensor));
  }
  pending_.clear();
  bytes_staged_ = 0;
  return out;
}

}  // namespace blockd
