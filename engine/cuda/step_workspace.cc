#include "engine/cuda/step_workspace.h"

#include <algorithm>
#include <cstring>

#include "base/status_macros.h"
#include "engine/cuda/cuda_status.h"

namespace blockd::cuda {

StepWorkspace::~StepWorkspace() {
  for (Slot& s : slots_) {
    if (s.copied != nullptr) {
      cudaEventSynchronize(s.copied);  // the copy out of the pinned slot has run
      cudaEventDestroy(s.copied);
    }
    if (s.host != nullptr) cudaFreeHost(s.host);
  }
}

absl::StatusOr<char*> StepWorkspace::Scratch(size_t bytes) {
  if (scratch_.bytes() < bytes) {
    if (dev_->capturing()) {
      // A capture keeps the scratch's address: StepGraph runs this step eagerly instead.
      return absl::FailedPreconditionError("a captured step would grow the block's step scratch");
    }
    ++generation_;
    // The old scratch returns to the pool in stream order, after the kernels that use it.
    ASSIGN_OR_RETURN(scratch_, DeviceBuffer::Allocate(dev_, std::max(bytes, 2 * scratch_.bytes())));
  }
  return scratch_.as<char>();
}

absl::StatusOr<const void*> StepWorkspace::Upload(const void* host, size_t bytes) {
  if (dev_->capturing()) {
    // A capture would replay this copy from a staging slot that later steps rewrite.
    return absl::FailedPreconditionError("a captured step copies its tables through StepGraph::StageMeta");
  }
  if (meta_.bytes() < bytes) {
    ASSIGN_OR_RETURN(meta_, DeviceBuffer::Allocate(dev_, std::max(bytes, 2 * meta_.bytes())));
  }
  Slot& s = slots_[static_cast<size_t>(next_slot_)];
  next_slot_ = (next_slot_ + 1) % kSlots;
  if (s.copied == nullptr) {
    CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&s.copied, cudaEventDisableTiming));
  } else {
    // Done long ago unless the host is kSlots steps of this block ahead of the device.
    CUDA_RETURN_IF_ERROR(cudaEventSynchronize(s.copied));
  }
  if (s.bytes < bytes) {
    const size_t want = std::max<size_t>({bytes, 2 * s.bytes, 16 * 1024});
    if (s.host != nullptr) CUDA_RETURN_IF_ERROR(cudaFreeHost(s.host));  // rare: the tables grew
    s.host = nullptr;
    s.bytes = 0;
    CUDA_RETURN_IF_ERROR(cudaHostAlloc(&s.host, want, cudaHostAllocDefault));
    s.bytes = want;
  }
  std::memcpy(s.host, host, bytes);
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(meta_.get(), s.host, bytes, cudaMemcpyHostToDevice, dev_->Stream()));
  CUDA_RETURN_IF_ERROR(cudaEventRecord(s.copied, dev_->Stream()));
  return static_cast<const void*>(meta_.get());
}

}  // namespace blockd::cuda
