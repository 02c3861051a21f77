#include "engine/cuda/step_graph.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "base/log.h"
#include "base/status_macros.h"
#include "engine/cuda/cuda_block.h"
#include "engine/cuda/cuda_status.h"
#include "kernels/convert.cuh"

namespace blockd::cuda {
namespace {
absl::Status Check(cudaError_t e, const char* what) { return CallStatus(e, what, __FILE__, __LINE__); }

size_t Aligned(size_t bytes) { return (bytes + 255) / 256 * 256; }

// An activation over the graph's input values, which it never frees.
class BorrowedInput {
 public:
  BorrowedInput(DeviceContext* dev, float* values, int64_t batch, int64_t seq, int64_t width)
      : act_(dev->index, batch, seq, width,
             DeviceBuffer::Adopt(dev, values, static_cast<size_t>(batch * seq * width) * sizeof(float))) {}
  ~BorrowedInput() { act_.ReleaseData().Release(); }
  const Activation& get() const { return act_; }

 private:
  CudaActivation act_;
};
}  // namespace

CudaStepGraph::Pinned::~Pinned() {
  if (ptr != nullptr) cudaFreeHost(ptr);
}

absl::Status CudaStepGraph::Pinned::Grow(size_t want) {
  if (want <= bytes) return absl::OkStatus();
  want = std::max<size_t>({want, 2 * bytes, 16 * 1024});
  if (ptr != nullptr) CUDA_RETURN_IF_ERROR(cudaFreeHost(ptr));
  ptr = nullptr;
  bytes = 0;
  CUDA_RETURN_IF_ERROR(cudaHostAlloc(&ptr, want, cudaHostAllocDefault));
  bytes = want;
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<StepGraph>> CudaStepGraph::Create(DeviceContext* dev) {
  DeviceGuard guard(dev->index);
  std::unique_ptr<CudaStepGraph> g(new CudaStepGraph(dev));
  CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&g->capture_stream_, cudaStreamNonBlocking));
  CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&g->done_, cudaEventDisableTiming));
  return std::unique_ptr<StepGraph>(std::move(g));
}

CudaStepGraph::~CudaStepGraph() {
  DeviceGuard guard(dev_->index);
  WaitIdle().IgnoreError();  // the pinned buffers are freed below
  DropExec();
  if (done_ != nullptr) cudaEventDestroy(done_);
  if (capture_stream_ != nullptr) cudaStreamDestroy(capture_stream_);
}

void CudaStepGraph::DropExec() {
  if (exec_ == nullptr) return;
  cudaEventSynchronize(done_);
  cudaGraphExecDestroy(exec_);
  exec_ = nullptr;
  output_ = nullptr;
}

absl::Status CudaStepGraph::WaitIdle() {
  if (!in_flight_) return absl::OkStatus();
  CUDA_RETURN_IF_ERROR(cudaEventSynchronize(done_));
  in_flight_ = false;
  return absl::OkStatus();
}

absl::StatusOr<const int32_t*> CudaStepGraph::StageMeta(const std::vector<int32_t>& meta) {
  DeviceGuard guard(dev_->index);
  RETURN_IF_ERROR(WaitIdle());
  const size_t bytes = meta.size() * sizeof(int32_t);
  if (bytes > meta_.bytes() || bytes > meta_host_.bytes) {
    DropExec();  // it names the old buffers
    meta_.Reset();  // until both are there: a failure here leaves none that a later step could write
    RETURN_IF_ERROR(meta_host_.Grow(bytes));
    ASSIGN_OR_RETURN(meta_, DeviceBuffer::Allocate(dev_, meta_host_.bytes));
  }
  if (bytes > 0) std::memcpy(meta_host_.ptr, meta.data(), bytes);
  meta_bytes_ = bytes;
  return meta_.as<const int32_t>();
}

absl::Status CudaStepGraph::ReserveIo(size_t wire_bytes, size_t value_bytes) {
  if (wire_bytes <= wire_cap_ && value_bytes <= value_cap_) return absl::OkStatus();
  RETURN_IF_ERROR(WaitIdle());
  DropExec();  // it names the old buffers
  const size_t wire_cap = Aligned(std::max(wire_bytes, wire_bytes > wire_cap_ ? 2 * wire_cap_ : wire_cap_));
  const size_t value_cap = Aligned(std::max(value_bytes, value_bytes > value_cap_ ? 2 * value_cap_ : value_cap_));
  // Until both buffers are there the capacities say none, so that a failure here leaves nothing
  // that a later step could write past.
  wire_cap_ = value_cap_ = 0;
  input_ = nullptr;
  RETURN_IF_ERROR(io_host_.Grow(2 * wire_cap));
  // The old buffer returns to the pool in stream order, after the kernels that used it.
  io_.Reset();
  ASSIGN_OR_RETURN(io_, DeviceBuffer::Allocate(dev_, 2 * wire_cap + value_cap));
  wire_cap_ = wire_cap;
  value_cap_ = value_cap;
  input_ = reinterpret_cast<float*>(io_.as<char>() + wire_cap_);
  return absl::OkStatus();
}

CudaStepGraph::Mode CudaStepGraph::Choose(const StepGraphKey& key, const Io& io) {
  if (exec_ != nullptr && key == key_ && io == exec_io_) return Mode::kReplay;
  if (!key.SameShape(seen_) || io != seen_io_ || (refused_ && key == refused_key_)) {
    seen_ = key;
    seen_io_ = io;
    return Mode::kEager;
  }
  return Mode::kCapture;
}

void CudaStepGraph::Refused(const StepGraphKey& key, const absl::Status& why) {
  BLOCKD_LOG(kInfo, "a session step runs eagerly: capturing it failed: ", why.ToString());
  refused_ = true;
  refused_key_ = key;
  ++counts_.refused;
}

absl::Status CudaStepGraph::Capture(const StepGraphKey& key, const Io& io, const std::function<absl::Status()>& body) {
  DropExec();
  CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(capture_stream_, cudaStreamCaptureModeThreadLocal));
  absl::Status st;
  {
    CaptureScope scope(dev_, capture_stream_);
    st = body();
  }
  cudaGraph_t graph = nullptr;
  const cudaError_t ended = cudaStreamEndCapture(capture_stream_, &graph);
  if (st.ok()) st = Check(ended, "cudaStreamEndCapture");
  if (st.ok()) {
    // Every replay allocates the graph's memory again. RunHost's graph frees it itself; the
    // activation Run returns frees its output, and AutoFreeOnLaunch covers a replay whose output
    // was dropped without that.
    st = Check(cudaGraphInstantiateWithFlags(&exec_, graph, cudaGraphInstantiateFlagAutoFreeOnLaunch),
               "cudaGraphInstantiateWithFlags");
  }
  if (graph != nullptr) cudaGraphDestroy(graph);
  if (!st.ok()) {
    exec_ = nullptr;
    output_ = nullptr;
    cudaGetLastError();  // capture errors are not sticky; leave none for the next launch to report
    return st;
  }
  key_ = key;
  exec_io_ = io;
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Activation>> CudaStepGraph::EnqueueDevice(const Activation& input,
                                                                         const Launches& launches) {
  if (meta_bytes_ > 0) {
    CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(meta_.get(), meta_host_.ptr, meta_bytes_, cudaMemcpyHostToDevice, dev_->Stream()));
  }
  return launches(input);
}

absl::StatusOr<std::unique_ptr<Activation>> CudaStepGraph::Run(const StepGraphKey& key, const Activation& input,
                                                               const Launches& launches) {
  DeviceGuard guard(dev_->index);
  const Io io{/*host=*/false, DType::kFloat32, meta_bytes_};
  const size_t bytes = static_cast<size_t>(input.numel()) * sizeof(float);
  RETURN_IF_ERROR(ReserveIo(0, bytes));  // before Choose: moving the buffers drops exec_
  const Mode mode = Choose(key, io);
  // From here the device may read the pinned tables until done_, recorded on every way out.
  in_flight_ = true;
  absl::StatusOr<std::unique_ptr<Activation>> y = QueueDevice(key, io, mode, input, launches);
  const cudaError_t recorded = cudaEventRecord(done_, dev_->stream);
  if (y.ok() && recorded != cudaSuccess) return Check(recorded, "cudaEventRecord");
  return y;
}

absl::StatusOr<std::unique_ptr<Activation>> CudaStepGraph::QueueDevice(const StepGraphKey& key, const Io& io,
                                                                       Mode mode, const Activation& input,
                                                                       const Launches& launches) {
  const size_t bytes = static_cast<size_t>(input.numel()) * sizeof(float);
  std::unique_ptr<Activation> y;
  if (mode == Mode::kEager) {
    ++counts_.eager;
    ASSIGN_OR_RETURN(y, EnqueueDevice(input, launches));
  } else {
    const auto& in = static_cast<const CudaActivation&>(input);
    if (in.ready() != nullptr) CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(dev_->stream, in.ready(), 0));
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(input_, in.data(), bytes, cudaMemcpyDeviceToDevice, dev_->stream));
    absl::Status captured;
    if (mode == Mode::kCapture) {
      captured = Capture(key, io, [&]() -> absl::Status {
        BorrowedInput graph_in(dev_, input_, input.batch(), input.seq(), input.width());
        ASSIGN_OR_RETURN(std::unique_ptr<Activation> out, EnqueueDevice(graph_in.get(), launches));
        out_batch_ = out->batch();
        out_seq_ = out->seq();
        out_width_ = out->width();
        output_ = static_cast<CudaActivation&>(*out).ReleaseData().Release();  // the graph's, not freed here
        return absl::OkStatus();
      });
      if (!captured.ok()) Refused(key, captured);
    }
    if (!captured.ok()) {
      ++counts_.eager;
      ASSIGN_OR_RETURN(y, EnqueueDevice(input, launches));
    } else {
      ++(mode == Mode::kCapture ? counts_.captured : counts_.replayed);
      CUDA_RETURN_IF_ERROR(cudaGraphLaunch(exec_, dev_->stream));
      auto out = std::make_unique<CudaActivation>(
          dev_->index, out_batch_, out_seq_, out_width_,
          DeviceBuffer::Adopt(dev_, output_, static_cast<size_t>(out_batch_ * out_seq_ * out_width_) * 4));
      RETURN_IF_ERROR(out->MarkReady(dev_->stream));
      y = std::move(out);
    }
  }
  return y;
}

absl::Status CudaStepGraph::EnqueueHost(const HostStep& step, const Launches& launches) {
  cudaStream_t st = dev_->Stream();
  const int64_t n = step.batch * step.seq * step.width;
  const size_t wire = static_cast<size_t>(n) * DTypeSize(step.dtype);
  const kernels::WireType type = WireOf(step.dtype);
  char* in_wire = io_.as<char>();
  char* out_wire = io_.as<char>() + wire_cap_ + value_cap_;
  char* host_out = static_cast<char*>(io_host_.ptr) + wire_cap_;
  if (meta_bytes_ > 0) {
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(meta_.get(), meta_host_.ptr, meta_bytes_, cudaMemcpyHostToDevice, st));
  }
  if (step.dtype == DType::kFloat32) {
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(input_, io_host_.ptr, wire, cudaMemcpyHostToDevice, st));
  } else {
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(in_wire, io_host_.ptr, wire, cudaMemcpyHostToDevice, st));
    CUDA_RETURN_IF_ERROR(kernels::launch_to_float(type, in_wire, input_, n, /*nonfinite=*/nullptr, st));
  }
  absl::StatusOr<std::unique_ptr<Activation>> y;
  {
    BorrowedInput in(dev_, input_, step.batch, step.seq, step.width);
    y = launches(in.get());
  }
  if (!y.ok()) return y.status();
  const auto& out = static_cast<const CudaActivation&>(**y);
  if (out.numel() != n) {
    return absl::InternalError(absl::StrCat("a session step's output has ", out.numel(), " values, its input ", n));
  }
  if (step.dtype == DType::kFloat32) {
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host_out, out.data(), wire, cudaMemcpyDeviceToHost, st));
  } else {
    CUDA_RETURN_IF_ERROR(kernels::launch_from_float(out.data(), type, out_wire, n, st));
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host_out, out_wire, wire, cudaMemcpyDeviceToHost, st));
  }
  y->reset();  // freed in stream order: inside the graph when captured
  return absl::OkStatus();
}

absl::Status CudaStepGraph::RunHost(const StepGraphKey& key, const HostStep& step, const Launches& launches,
                                    bool capture) {
  DeviceGuard guard(dev_->index);
  const int64_t n = step.batch * step.seq * step.width;
  const size_t wire = static_cast<size_t>(n) * DTypeSize(step.dtype);
  host_output_ = nullptr;
  RETURN_IF_ERROR(WaitIdle());
  RETURN_IF_ERROR(ReserveIo(wire, static_cast<size_t>(n) * sizeof(float)));
  std::memcpy(io_host_.ptr, step.input, wire);
  const Io io{/*host=*/true, step.dtype, meta_bytes_};
  Mode mode = capture ? Choose(key, io) : Mode::kEager;
  if (mode == Mode::kCapture) {
    if (absl::Status st = Capture(key, io, [&] { return EnqueueHost(step, launches); }); !st.ok()) {
      Refused(key, st);
      mode = Mode::kEager;
    }
  }
  in_flight_ = true;  // from here the device may read the pinned buffers, until done_
  absl::Status queued;
  if (mode == Mode::kEager) {
    ++counts_.eager;
    queued = EnqueueHost(step, launches);
  } else {
    ++(mode == Mode::kCapture ? counts_.captured : counts_.replayed);
    queued = Check(cudaGraphLaunch(exec_, dev_->stream), "cudaGraphLaunch");
  }
  const cudaError_t recorded = cudaEventRecord(done_, dev_->stream);
  RETURN_IF_ERROR(queued);
  CUDA_RETURN_IF_ERROR(recorded);
  host_output_ = step.output;
  host_output_bytes_ = wire;
  return absl::OkStatus();
}

absl::Status CudaStepGraph::FinishHost() {
  if (host_output_ == nullptr) return absl::InternalError("FinishHost without a step queued by RunHost");
  std::string* output = std::exchange(host_output_, nullptr);
  DeviceGuard guard(dev_->index);
  RETURN_IF_ERROR(WaitIdle());
  output->assign(static_cast<const char*>(io_host_.ptr) + wire_cap_, host_output_bytes_);
  return absl::OkStatus();
}

}  // namespace blockd::cuda
