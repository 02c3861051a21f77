// The CUDA backend's StepGraph (engine/backend.h): a session's span step on one device captured
// as a CUDA graph and replayed while its key holds.
//
// The capture runs on the graph's own stream (CaptureScope makes it this thread's Stream() of the
// device), so other threads' work on the device neither waits nor lands in the graph; the replay
// runs on the device's stream like every other step. The graph reads its tables and input from
// buffers of its own, at addresses fixed while their sizes hold: the tables (StageMeta) and
// RunHost's input wire bytes from pinned host memory, copied by the graph's first nodes; Run's
// input copied in from the caller's activation before each replay. The blocks' outputs are the
// graph's own allocations (memory nodes): RunHost's graph converts the last one into its output
// wire bytes, copies them to pinned host memory and frees it; Run's returns it, adopted by the
// activation it gives back and freed in stream order when that goes.
#pragma once

#include <cuda_runtime.h>

#include <functional>
#include <memory>
#include <string>

#include "engine/backend.h"
#include "engine/cuda/device.h"

namespace blockd::cuda {

class CudaStepGraph : public StepGraph {
 public:
  static absl::StatusOr<std::unique_ptr<StepGraph>> Create(DeviceContext* dev);
  ~CudaStepGraph() override;

  absl::StatusOr<const int32_t*> StageMeta(const std::vector<int32_t>& meta) override;
  absl::StatusOr<std::unique_ptr<Activation>> Run(const StepGraphKey& key, const Activation& input,
                                                  const Launches& launches) override;
  absl::Status RunHost(const StepGraphKey& key, const HostStep& step, const Launches& launches,
                       bool capture) override;
  absl::Status FinishHost() override;
  Counts counts() const override { return counts_; }

 private:
  // What a capture holds besides its key: Run's or RunHost's, the wire dtype and the tables' size.
  struct Io {
    bool host = false;
    DType dtype = DType::kFloat32;
    size_t meta_bytes = 0;
    bool operator==(const Io& o) const { return host == o.host && dtype == o.dtype && meta_bytes == o.meta_bytes; }
    bool operator!=(const Io& o) const { return !(*this == o); }
  };
  enum class Mode { kEager, kCapture, kReplay };
  // A pinned host buffer, freed with the graph.
  struct Pinned {
    void* ptr = nullptr;
    size_t bytes = 0;
    ~Pinned();
    absl::Status Grow(size_t want);
  };

  explicit CudaStepGraph(DeviceContext* dev) : dev_(dev) {}
  // How this step runs: replayed while exec_ holds its key and io; eagerly at the first sight of a
  // shape (it warms the blocks' scratch) or for a key that capture refused; else captured.
  Mode Choose(const StepGraphKey& key, const Io& io);
  // Captures `body` (the whole step, queued on the thread's Stream()) into exec_, replacing the
  // one before; an error when the step cannot be captured, after which nothing of the attempt
  // remains.
  absl::Status Capture(const StepGraphKey& key, const Io& io, const std::function<absl::Status()>& body);
  // After a capture failed: logged, counted, its key run eagerly from now on.
  void Refused(const StepGraphKey& key, const absl::Status& why);
  // RunHost's whole step on the thread's Stream(): tables and input in, `launches`, output out.
  absl::Status EnqueueHost(const HostStep& step, const Launches& launches);
  // Run's body, by `mode`: eagerly from `input`; else its input copied into input_ and the
  // capture (made now for kCapture) launched.
  absl::StatusOr<std::unique_ptr<Activation>> QueueDevice(const StepGraphKey& key, const Io& io, Mode mode,
                                                          const Activation& input, const Launches& launches);
  // The tables copied in, then `launches` from `input` (eagerly, or inside a capture).
  absl::StatusOr<std::unique_ptr<Activation>> EnqueueDevice(const Activation& input, const Launches& launches);
  // The input's wire bytes and fp32 values on the device, the output's wire bytes, and RunHost's
  // pinned input and output; grown (dropping exec_, which names them) when a step needs more.
  absl::Status ReserveIo(size_t wire_bytes, size_t value_bytes);
  // Waits for the last Run's work (its copy out of the pinned tables) if it may still run.
  absl::Status WaitIdle();
  // Waits for the last replay, then destroys exec_.
  void DropExec();

  DeviceContext* dev_;
  cudaStream_t capture_stream_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
  cudaEvent_t done_ = nullptr;      // after the last step's work
  bool in_flight_ = false;          // a Run returned before done_ was reached
  StepGraphKey key_;                // exec_'s
  Io exec_io_;
  StepGraphKey seen_;               // the last key run eagerly: its shape is warm
  Io seen_io_;
  bool refused_ = false;            // refused_key_ could not be captured: it runs eagerly
  StepGraphKey refused_key_;
  Pinned meta_host_;                // the staged tables
  DeviceBuffer meta_;               // their copy on the device
  size_t meta_bytes_ = 0;
  Pinned io_host_;                  // RunHost's input wire bytes, then its output's
  DeviceBuffer io_;                 // input wire bytes, input values (input_), output wire bytes
  size_t wire_cap_ = 0, value_cap_ = 0;
  float* input_ = nullptr;          // the graph's input values, in io_
  std::string* host_output_ = nullptr;  // the queued RunHost's, and its size
  size_t host_output_bytes_ = 0;
  void* output_ = nullptr;          // Run's exec_'s output, allocated by each replay
  int64_t out_batch_ = 0, out_seq_ = 0, out_width_ = 0;
  Counts counts_;
};

}  // namespace blockd::cuda
