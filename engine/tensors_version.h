// Which version of a block's tensors a reader saw, so that reads spread over several calls can
// tell whether they still belong together. DownloadTensors reads one tensor per call (a stream
// holds one tensor, never a copy of the block); a LoadWeights, Backward, ZeroGrad or Step between
// two reads, or the block deleted and created again under its id, would hand the client a mix.
//
// A version is the block's serial (every block gets a new one, a re-created or restored block
// too) and a generation per kind of tensor, which the Engine bumps, with the block locked, before
// every change to tensors of that kind. Per kind, so that a weights download is not aborted by the
// Backward calls of training running beside it: only what the reader reads counts.
//
//   TensorGenerations gens;                                   // one per block, in the Engine
//   gens.Bump(TensorChange::kBackward);                       // with the block locked
//   const uint64_t seen = gens.Of(TensorKind::kGradients);    // a reader, at its start
//   RETURN_IF_ERROR(CheckUnchanged(id, serial, gens, TensorKind::kGradients, {serial, seen}));  // before each read
#pragma once

#include <atomic>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "engine/backend.h"

namespace blockd {

// What changed a block's tensors.
enum class TensorChange : uint8_t {
  kNone,         // nothing since the block was created
  kLoadWeights,  // weights
  kBackward,     // gradients (added to, or written when there were none)
  kZeroGrad,     // gradients (cleared)
  kStep,         // weights, AdamW moments, and gradients (consumed)
};

struct TensorsVersion {
  uint64_t serial = 0;      // the block: another block under the same id has another serial
  uint64_t generation = 0;  // how many changes its tensors of one kind have seen
};

// Lock-free counters: bumping costs one atomic add per kind the change touches.
class TensorGenerations {
 public:
  void Bump(TensorChange change) {
    for (TensorKind kind : {TensorKind::kWeights, TensorKind::kGradients, TensorKind::kAdamM, TensorKind::kAdamV}) {
      if (!Touches(change, kind)) continue;
      Slot& s = slots_[static_cast<int>(kind)];
      s.last.store(change, std::memory_order_relaxed);
      s.generation.fetch_add(1, std::memory_order_release);
    }
  }
  uint64_t Of(TensorKind kind) const { return slots_[static_cast<int>(kind)].generation.load(std::memory_order_acquire); }
  // The latest change to tensors of `kind`.
  TensorChange Last(TensorKind kind) const { return slots_[static_cast<int>(kind)].last.load(std::memory_order_relaxed); }

  static bool Touches(TensorChange change, TensorKind kind) {
    switch (change) {
      case TensorChange::kNone: return false;
      case TensorChange::kLoadWeights: return kind == TensorKind::kWeights;
      case TensorChange::kBackward:
      case TensorChange::kZeroGrad: return kind == TensorKind::kGradients;
      case TensorChange::kStep: return true;
    }
    return false;
  }

 private:
  struct Slot {
    std::atomic<uint64_t> generation{0};
    std::atomic<TensorChange> last{TensorChange::kNone};
  };
  Slot slots_[4];
};

// OK when the tensors of `kind` of block `block_id`, now at `serial` with `generations`, are still
// at `seen`; else ABORTED saying what changed (the block deleted and created again, or how many
// changes and which was the last) and to download again.
absl::Status CheckUnchanged(absl::string_view block_id, uint64_t serial, const TensorGenerations& generations,
                            TensorKind kind, const TensorsVersion& seen);

}  // namespace blockd
