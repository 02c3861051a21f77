#include "engine/cuda/step_graph.h"

#include <algorithm>
#include <cstring>

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
  CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&g->meta_copied_, cudaEventDisableTiming));
  return std::unique_ptr<StepGraph>(std::move(g));
}

CudaStepGraph::~CudaStepGraph() {
  DeviceGuard guard(dev_->index);
  DropExec();
  if (meta_copied_ != nullptr) {
    cudaEventSynchronize(meta_copied_);
    cudaEventDestroy(meta_copied_);
  }
  if (meta_host_ != nullptr) cudaFreeHost(meta_host_);
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
  const size_t bytes = meta.size() * sizeof(int32_t);
  if (meta_.bytes() < bytes) {
    DropExec();  // it names the old buffer
    ASSIGN_OR_RETURN(meta_, DeviceBuffer::Allocate(dev_, std::max(bytes, 2 * meta_.bytes())));
  }
  // The last copy out of the staging ran long ago (its step's output was downloaded since).
  CUDA_RETURN_IF_ERROR(cudaEventSynchronize(meta_copied_));
  if (meta_host_bytes_ < bytes) {
    if (meta_host_ != nullptr) CUDA_RETURN_IF_ERROR(cudaFreeHost(meta_host_));
    meta_host_ = nullptr;
    meta_host_bytes_ = 0;
    const size_t want = std::max<size_t>({bytes, 2 * meta_host_bytes_, 4096});
    CUDA_RETURN_IF_ERROR(cudaHostAlloc(&meta_host_, want, cudaHostAllocDefault));
    meta_host_bytes_ = want;
  }
  std::memcpy(meta_host_, meta.data(), bytes);
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(meta_.get(), meta_host_, bytes, cudaMemcpyHostToDevice, dev_->stream));
  CUDA_RETURN_IF_ERROR(cudaEventRecord(meta_copied_, dev_->stream));
  return meta_.as<const int32_t>();
}

absl::Status CudaStepGraph::CopyIn(const Activation& input) {
  const size_t bytes = static_cast<size_t>(input.numel()) * sizeof(float);
  if (input_.bytes() < bytes) {
    DropExec();  // it reads the old buffer
    ASSIGN_OR_RETURN(input_, DeviceBuffer::Allocate(dev_, bytes));
  }
  const auto& in = static_cast<const CudaActivation&>(input);
  if (in.ready() != nullptr) CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(dev_->stream, in.ready(), 0));
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(input_.get(), in.data(), bytes, cudaMemcpyDeviceToDevice, dev_->stream));
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
                    DeviceBuffer::Adopt(dev_, input_.get(), static_cast<size_t>(batch * seq * width) * 4));
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
