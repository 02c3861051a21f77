// Scratch of a CUDA block's inference steps (CudaBlock::InferStep), kept from one step to the next
// so that a warmed decode step allocates nothing and never waits: device scratch grown (doubling)
// when a step needs more, freed in stream order; and the step's starts and page tables copied to
// the device by one async copy from pinned host memory (a pageable copy is staged by the driver
// and may wait), through a ring of staging slots each guarded by an event, so that a slot is
// rewritten only after its previous copy ran (in practice long before: a block's next step).
//
// Every use is on the device's one stream, so reusing the scratch in the next step is ordered
// after the kernels of this one; the engine runs one step at a time per block (SpanLock).
//
//   StepWorkspace ws(dev);
//   ASSIGN_OR_RETURN(char* scratch, ws.Scratch(bytes));         // this step's buffers, carved
//   ASSIGN_OR_RETURN(const int32_t* meta, ws.Upload(host.data(), host.size() * 4));
#pragma once

#include <cuda_runtime.h>

#include <array>
#include <cstddef>

#include "absl/status/statusor.h"
#include "engine/cuda/device.h"

namespace blockd::cuda {

class StepWorkspace {
 public:
  explicit StepWorkspace(DeviceContext* dev) : dev_(dev) {}
  ~StepWorkspace();
  StepWorkspace(const StepWorkspace&) = delete;
  StepWorkspace& operator=(const StepWorkspace&) = delete;

  // Device scratch of at least `bytes` (256-byte aligned), valid until the next call.
  absl::StatusOr<char*> Scratch(size_t bytes);
  // Copies `bytes` from `host` to device memory in stream order; the result is valid for the
  // kernels issued before the next call.
  absl::StatusOr<const void*> Upload(const void* host, size_t bytes);
  size_t device_bytes() const { return scratch_.bytes() + meta_.bytes(); }
  // Counts the scratch's moves (Block::launch_generation). While a StepGraph captures, Scratch
  // refuses to grow and Upload refuses: FAILED_PRECONDITION, and the step runs eagerly.
  uint64_t generation() const { return generation_; }

 private:
  struct Slot {
    void* host = nullptr;  // pinned
    size_t bytes = 0;
    cudaEvent_t copied = nullptr;  // recorded after the slot's last copy
  };
  static constexpr int kSlots = 2;

  DeviceContext* dev_;
  DeviceBuffer scratch_;
  DeviceBuffer meta_;
  std::array<Slot, kSlots> slots_{};
  int next_slot_ = 0;
  uint64_t generation_ = 0;
};

// Consecutive 256-byte aligned pieces of one allocation: Take() with base null measures.
class Carver {
 public:
  explicit Carver(char* base = nullptr) : base_(base) {}
  template <class T>
  T* Take(size_t bytes) {
    T* p = base_ == nullptr ? nullptr : reinterpret_cast<T*>(base_ + used_);
    used_ += (bytes + 255) / 256 * 256;
    return p;
  }
  size_t used() const { return used_; }

 private:
  char* base_;
  size_t used_ = 0;
};

}  // namespace blockd::cuda
