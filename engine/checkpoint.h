// Checkpoints of blocks: weights, AdamW moments, step counters, specs and AdamW settings, written
// atomically to a directory and verified when read back.
//
// On disk, under `dir`:
//   dir/<name>/manifest.json          format, sequence, automatic (no name given: rotates),
//                                     blocks (spec, step, AdamW, file, sha256, bytes),
//                                     manifest_sha256 (of the rest of the manifest, canonical JSON)
//   dir/<name>/<block>.safetensors    "weights/<param>", "adam_m/<param>", "adam_v/<param>" (float32)
//   dir/LATEST                        the name of the newest complete checkpoint
// A checkpoint is written into dir/.tmp-<name>-<nonce>, every file and the directory fsynced, then
// renamed into place, and LATEST replaced by rename: a crash at any instant leaves the previous
// checkpoint intact and LATEST naming a complete one. Restore verifies every checksum and refuses
// a corrupt or partial checkpoint (a flipped byte, a truncated or missing file, no manifest, a
// LATEST naming nothing) with DATA_LOSS naming what is wrong; NOT_FOUND only when there is no
// checkpoint at all, or none of the name asked for.
//
//   ASSIGN_OR_RETURN(auto ckpt, MakeFileCheckpointer(&engine, "/var/lib/blockd", /*every_steps=*/100));
//   ASSIGN_OR_RETURN(CheckpointResult saved, ckpt->Save({}, ""));     // all blocks, a fresh name
//   ASSIGN_OR_RETURN(CheckpointResult back, ckpt->Restore("", {}));  // the latest, all its blocks
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/engine.h"

namespace blockd {

struct CheckpointResult {
  std::string path;
  std::vector<std::string> block_ids;
  int64_t bytes = 0;
};

class Checkpointer {
 public:
  virtual ~Checkpointer() = default;
  // Saves `block_ids` (all blocks when empty) as checkpoint `name`; when empty, as an automatic
  // checkpoint ckpt-<sequence>, subject to rotation.
  virtual absl::StatusOr<CheckpointResult> Save(const std::vector<std::string>& block_ids, const std::string& name) = 0;
  // Restores `block_ids` (all in the checkpoint when empty) from `name` (LATEST when empty),
  // replacing blocks of the same ids. NOT_FOUND when there is no checkpoint.
  virtual absl::StatusOr<CheckpointResult> Restore(const std::string& name, const std::vector<std::string>& block_ids) = 0;
  // Called after each successful Step, for automatic checkpoints every N steps.
  virtual void AfterStep(const std::vector<std::string>& block_ids) = 0;
};

// `keep` (>= 1): after an automatic save (no name given: every_steps, or Save with an empty name),
// all but the newest `keep` automatic checkpoints are deleted. A checkpoint saved under a name
// the caller gave is never deleted by rotation. `every_steps` > 0: every block is saved after each
// every_steps-th successful Step.
absl::StatusOr<std::unique_ptr<Checkpointer>> MakeFileCheckpointer(Engine* engine, const std::string& dir,
                                                                   int64_t every_steps, int keep = 3);

// SHA-256 of `data` as 64 lowercase hex digits.
std::string Sha256Hex(absl::string_view data);

}  // namespace blockd
