#include "engine/tensors_version.h"

#include "absl/strings/str_cat.h"

namespace blockd {
namespace {

absl::string_view DescribeChange(TensorChange change) {
  switch (change) {
    case TensorChange::kNone: return "none";
    case TensorChange::kLoadWeights: return "a LoadWeights wrote weights";
    case TensorChange::kBackward: return "a Backward wrote gradients";
    case TensorChange::kZeroGrad: return "a ZeroGrad cleared the gradients";
    case TensorChange::kStep: return "an optimizer Step updated the block";
  }
  return "?";
}

}  // namespace

absl::Status CheckUnchanged(absl::string_view block_id, uint64_t serial, const TensorGenerations& generations,
                            TensorKind kind, const TensorsVersion& seen) {
  const absl::string_view what = TensorKindName(kind);
  if (serial != seen.serial) {
    return absl::AbortedError(absl::StrCat("block ", block_id, " was deleted and created again (or restored) while its ",
                                           what, " were downloaded, so the tensors sent belong to two blocks: "
                                           "download again"));
  }
  const uint64_t changes = generations.Of(kind) - seen.generation;
  if (changes != 0) {
    return absl::AbortedError(absl::StrCat("block ", block_id, "'s ", what, " changed while they were downloaded (",
                                           changes, changes == 1 ? " change" : " changes", ", the last: ",
                                           DescribeChange(generations.Last(kind)),
                                           "), so the tensors sent mix two versions: download again"));
  }
  return absl::OkStatus();
}

}  // namespace blockd
