#include "engine/cuda/step_graph.h"

#include "absl/strings/str_cat.h"
#include "base/log.h"
#include "base/status_macros.h"
#include "engine/cuda/cuda_block.h"
#include "engine/cuda/cuda_status.h"

namespace blockd::cuda {
namespace {
absl::Status Check(cudaError_t e, const char* what) { return CallStatus(e, what, __FILE__, __LINE__); }
}  // namespace

absl::StatusOr<std::unique_ptr<StepGraph>> CudaStepGraph::Create(DeviceContext* dev) {
  DeviceGuard guard(dev->index);
  std::unique_ptr<CudaStepGraph> g(new CudaStepGraph(dev));
  CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&g->capture_stream_, cudaStreamNonBlocking));
  CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&g->replayed_, cudaEventDisableTiming));
  return std::unique_ptr<StepGraph>(std::move(g));
}

CudaStepGraph::~CudaStepGraph() {
  DeviceGuard guard(dev_->index);
  DropExec();
  if (replayed_ != nullptr) cudaEventDestroy(replayed_);
  if (capture_stream_ != nullptr) cudaStreamDestroy(capture_stream_);
}

void CudaStepGraph::DropExec() {
  if (exec_ == nullptr) return;
  cudaEventSynchronize(replayed_);
  cudaGraphExecDestroy(exec_);
  exec_ = nullptr;
  output_ = nullptr;
}

absl::StatusOr<const int32_t*> CudaStepGraph::UploadMeta(const std::vector<int32_t>& meta) {
  DeviceGuard guard(dev_->index);
  ASSIGN_OR_RETURN(const void* at, buffers_.Upload(meta.data(), meta.size() * sizeof(int32_t)));
  if (at != meta_) {
    DropExec();  // it names the old buffer
    meta_ = at;
  }
  return static_cast<const int32_t*>(at);
}

absl::Status CudaStepGraph::CopyIn(const Activation& input) {
  const size_t bytes = static_cast<size_t>(input.numel()) * sizeof(float);
  ASSIGN_OR_RETURN(char* at, buffers_.Scratch(bytes));
  if (at != input_) {
    DropExec();  // it reads the old buffer
    input_ = at;
  }
  const auto& in = static_cast<const CudaActivation&>(input);
  if (in.ready() != nullptr) CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(dev_->stream, in.ready(), 0));
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(input_, in.data(), bytes, cudaMemcpyDeviceToDevice, dev_->stream));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Activation>> CudaStepGraph::Run(const StepGraphKey& key, const Activation& input,
                                                               const Launches& launches) {
  DeviceGuard guard(dev_->index);
  if (exec_ != nullptr && key == key_) {
    RETURN_IF_ERROR(CopyIn(input));  // the key fixes the input's size: exec_ stays
    ++counts_.replayed;
    return Replay();
  }
  if (!key.SameShape(seen_) || (refused_ && key == refused_key_)) {
    // First sight of the shape (it warms the blocks' scratch), or a key that capture refused.
    seen_ = key;
    ++counts_.eager;
    return launches(input);
  }
  RETURN_IF_ERROR(CopyIn(input));
  if (absl::Status st = Capture(key, input.batch(), input.seq(), input.width(), launches); !st.ok()) {
    BLOCKD_LOG(kInfo, "a session step runs eagerly: capturing it failed: ", st.ToString());
    refused_ = true;
    refused_key_ = key;
    ++counts_.refused;
    ++counts_.eager;
    return launches(input);
  }
  ++counts_.captured;
  return Replay();
}

absl::Status CudaStepGraph::Capture(const StepGraphKey& key, int64_t batch, int64_t seq, int64_t width,
                                    const Launches& launches) {
  DropExec();
  // The graph's input: input_, lent to an activation for the capture (never freed through it).
  CudaActivation in(dev_->index, batch, seq, width,
                    DeviceBuffer::Adopt(dev_, input_, static_cast<size_t>(batch * seq * width) * 4));
  CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(capture_stream_, cudaStreamCaptureModeThreadLocal));
  absl::StatusOr<std::unique_ptr<Activation>> y;
  {
    CaptureScope scope(dev_, capture_stream_);
    y = launches(in);
  }
  void* output = nullptr;
  if (y.ok()) {
    output = static_cast<CudaActivation&>(**y).ReleaseData().Release();  // the graph's, not freed here
    y->reset();
  }
  cudaGraph_t graph = nullptr;
  const cudaError_t ended = cudaStreamEndCapture(capture_stream_, &graph);
  in.ReleaseData().Release();
  absl::Status st = !y.ok() ? y.status() : Check(ended, "cudaStreamEndCapture");
  if (st.ok() && output == nullptr) st = absl::InternalError("the captured step has no output");
  if (st.ok()) {
    // Every replay allocates the graph's memory again; the activation Run returns frees it, and
    // AutoFreeOnLaunch covers a replay whose output was dropped without that.
    st = Check(cudaGraphInstantiateWithFlags(&exec_, graph, cudaGraphInstantiateFlagAutoFreeOnLaunch),
               "cudaGraphInstantiateWithFlags");
  }
  if (graph != nullptr) cudaGraphDestroy(graph);
  if (!st.ok()) {
    exec_ = nullptr;
    cudaGetLastError();  // capture errors are not sticky; leave none for the next launch to report
    return st;
  }
  key_ = key;
  output_ = output;
  out_batch_ = batch;
  out_seq_ = seq;
  out_width_ = width;
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Activation>> CudaStepGraph::Replay() {
  CUDA_RETURN_IF_ERROR(cudaGraphLaunch(exec_, dev_->stream));
  CUDA_RETURN_IF_ERROR(cudaEventRecord(replayed_, dev_->stream));
  auto out = std::make_unique<CudaActivation>(
      dev_->index, out_batch_, out_seq_, out_width_,
      DeviceBuffer::Adopt(dev_, output_, static_cast<size_t>(out_batch_ * out_seq_ * out_width_) * 4));
  RETURN_IF_ERROR(out->MarkReady(dev_->stream));
  return std::unique_ptr<Activation>(std::move(out));
}

}  // namespace blockd::cuda
