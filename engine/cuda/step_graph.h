// The CUDA backend's StepGraph (engine/backend.h): a session's span step on one device captured
// as a CUDA graph and replayed while its key holds.
//
// The capture runs on the graph's own stream (CaptureScope makes it this thread's Stream() of the
// device), so other threads' work on the device neither waits nor lands in the graph; the replay
// runs on the device's stream like every other step. The graph reads its input from a buffer of
// its own (the step's input is copied in before each replay) and allocates the blocks' outputs
// itself (memory nodes, at addresses fixed for the executable graph): the last one is the step's
// output, adopted by the activation Run returns and freed in stream order when that goes.
#pragma once

#include <cuda_runtime.h>

#include <memory>

#include "engine/backend.h"
#include "engine/cuda/device.h"
#include "engine/cuda/step_workspace.h"

namespace blockd::cuda {

class CudaStepGraph : public StepGraph {
 public:
  static absl::StatusOr<std::unique_ptr<StepGraph>> Create(DeviceContext* dev);
  ~CudaStepGraph() override;

  absl::StatusOr<const int32_t*> UploadMeta(const std::vector<int32_t>& meta) override;
  absl::StatusOr<std::unique_ptr<Activation>> Run(const StepGraphKey& key, const Activation& input,
                                                  const Launches& launches) override;
  Counts counts() const override { return counts_; }

 private:
  explicit CudaStepGraph(DeviceContext* dev) : dev_(dev) {}
  // Captures `launches` over input_ into exec_ (replacing the one before); an error when the
  // step cannot be captured, after which nothing of the attempt remains.
  absl::Status Capture(const StepGraphKey& key, int64_t batch, int64_t seq, int64_t width, const Launches& launches);
  // Launches exec_ on the device's stream; the output as an activation.
  absl::StatusOr<std::unique_ptr<Activation>> Replay();
  // Waits for the last replay, then destroys exec_.
  void DropExec();
  // Copies the input into input_ (dropping exec_ if that had to move).
  absl::Status CopyIn(const Activation& input);

  DeviceContext* dev_;
  cudaStream_t capture_stream_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
  cudaEvent_t replayed_ = nullptr;  // after the last replay
  StepGraphKey key_;                // exec_'s
  StepGraphKey seen_;               // the last key run eagerly: its shape is warm
  bool refused_ = false;            // refused_key_ could not be captured: it runs eagerly
  StepGraphKey refused_key_;
  // The graph's input (Scratch) and tables (Upload, through pinned staging); exec_ names both
  // addresses, so either moving drops it.
  StepWorkspace buffers_{dev_};
  void* input_ = nullptr;
  const void* meta_ = nullptr;
  void* output_ = nullptr;          // exec_'s output, allocated by each replay
  int64_t out_batch_ = 0, out_seq_ = 0, out_width_ = 0;
  Counts counts_;
};

}  // namespace blockd::cuda
