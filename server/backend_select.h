// Picks the backend for --backend=auto|cpu|cuda and says why, for the log and GetServerInfo.
//   ASSIGN_OR_RETURN(BackendChoice choice, SelectBackend("auto"));
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/backend.h"

namespace blockd {

struct BackendChoice {
  std::unique_ptr<Backend> backend;
  std::string reason;
  AttentionInfo attention;  // what bf16 blocks' attention runs (--attention) and why
};

// "cuda" fails when the CUDA backend is not built in or no GPU works; "auto" then falls back to
// the CPU backend, and `reason` says so. `attention` (--attention=auto|cudnn|native) picks the CUDA
// backend's attention kernels; "cudnn" fails when cuDNN cannot run there, or on the CPU backend.
absl::StatusOr<BackendChoice> SelectBackend(const std::string& which, const std::string& attention = "auto");

}  // namespace blockd
