#include "engine/cuda/cuda_backend.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "engine/cuda/attention_dispatch.h"
#include "engine/cuda/cuda_block.h"
#include "engine/cuda/cuda_status.h"
#include "engine/cuda/device.h"
#include "engine/cuda/peer_memory.h"
#include "engine/cuda/step_graph.h"
#include "engine/cuda/step_workspace.h"
#include "base/parallel_copy.h"
#include "base/status_macros.h"
#include "kernels/attention.cuh"
#include "kernels/convert.cuh"

namespace blockd {
namespace {

using cuda::CudaActivation;
using cuda::DeviceBuffer;
using cuda::DeviceContext;
using cuda::DeviceGuard;
using cuda::WireOf;


// Copies between the device and pageable memory (a request's or a reply's bytes) go through the
// driver's own staging and ran at ~1.3 GB/s on the GPU host; a pinned buffer that the bytes pass
// through moves them at memcpy speed plus a full-rate DMA. The host side moves the bytes itself
// (HostRead, HostWrite: a memcpy from a request, a pread from a shared-memory region), a piece at
// a time, so that one piece's DMA runs while the next is read or the last one written. Each copy
// takes a buffer of its own from a small free list (so concurrent calls' transfers do not queue
// behind one another), grown on demand; at most kKeep buffers are kept (an upload and a download
// for each of several calls in flight: allocating and freeing pinned memory costs milliseconds).
class PinnedStaging {
 public:
  ~PinnedStaging() {
    for (const Buffer& b : free_) cudaFreeHost(b.ptr);
  }
  // Copies `bytes` from `read` to device `dst` on `dev`'s upload stream and waits for the copy.
  absl::Status CopyToDevice(DeviceContext* dev, void* dst, const HostRead& read, size_t bytes) {
    ASSIGN_OR_RETURN(Buffer b, Take(bytes));
    absl::Status s;
    for (size_t at = 0; s.ok() && at < bytes; at += kPiece) {
      const size_t n = std::min(kPiece, bytes - at);
      char* piece = static_cast<char*>(b.ptr) + at;
      s = read(piece, at, n);
      if (s.ok()) {
        s = CudaStatus(
            cudaMemcpyAsync(static_cast<char*>(dst) + at, piece, n, cudaMemcpyHostToDevice, dev->upload_stream));
      }
    }
    // Before the buffer goes back to the list, a failed read included: earlier pieces may be in flight.
    const absl::Status synced = dev->Sync(dev->upload_stream);
    Give(b, synced.ok());
    return s.ok() ? synced : s;
  }
  // Hands `bytes` of device `src`, copied on `dev`'s download stream (after what it already waits
  // for), to `write` piece by piece: each piece but the last as its copy lands (its event), the
  // last once the stream is done (a small download, one piece, needs no event).
  absl::Status CopyToHost(DeviceContext* dev, const HostWrite& write, const void* src, size_t bytes) {
    ASSIGN_OR_RETURN(Buffer b, Take(bytes));
    const size_t pieces = (bytes + kPiece - 1) / kPiece;
    std::vector<cudaEvent_t> landed(pieces > 1 ? pieces - 1 : 0, nullptr);
    absl::Status s;
    for (size_t i = 0; s.ok() && i < pieces; ++i) {
      const size_t at = i * kPiece;
      s = CudaStatus(cudaMemcpyAsync(static_cast<char*>(b.ptr) + at, static_cast<const char*>(src) + at,
                                     std::min(kPiece, bytes - at), cudaMemcpyDeviceToHost, dev->download_stream));
      if (s.ok() && i < landed.size()) s = CudaStatus(cudaEventCreateWithFlags(&landed[i], cudaEventDisableTiming));
      if (s.ok() && i < landed.size()) s = CudaStatus(cudaEventRecord(landed[i], dev->download_stream));
    }
    for (size_t i = 0; s.ok() && i < landed.size(); ++i) {
      s = CudaStatus(cudaEventSynchronize(landed[i]));
      if (s.ok()) s = write(static_cast<const char*>(b.ptr) + i * kPiece, i * kPiece, kPiece);
    }
    const absl::Status synced = dev->Sync(dev->download_stream);
    if (s.ok() && synced.ok() && pieces > 0) {
      const size_t at = (pieces - 1) * kPiece;
      s = write(static_cast<const char*>(b.ptr) + at, at, bytes - at);
    }
    for (cudaEvent_t e : landed) {
      if (e != nullptr) cudaEventDestroy(e);
    }
    Give(b, synced.ok());
    return s.ok() ? synced : s;
  }

 private:
  static constexpr size_t kKeep = 8;
  static constexpr size_t kPiece = size_t{8} << 20;
  struct Buffer {
    void* ptr = nullptr;
    size_t capacity = 0;
  };

  static absl::Status CudaStatus(cudaError_t e) {
    CUDA_RETURN_IF_ERROR(e);
    return absl::OkStatus();
  }

  // The smallest free buffer that holds `bytes`, or a new one.
  absl::StatusOr<Buffer> Take(size_t bytes) {
    {
      absl::MutexLock lock(&mu_);
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->capacity >= bytes && (best == free_.end() || it->capacity < best->capacity)) best = it;
      }
      if (best != free_.end()) {
        Buffer b = *best;
        free_.erase(best);
        return b;
      }
    }
    Buffer b;
    CUDA_RETURN_IF_ERROR(cudaHostAlloc(&b.ptr, bytes, cudaHostAllocPortable));
    b.capacity = bytes;
    return b;
  }

  // Back to the list (the smallest goes when it is full); freed after a failed copy, whose DMA
  // may not have finished.
  void Give(Buffer b, bool reusable) {
    if (reusable) {
      absl::MutexLock lock(&mu_);
      free_.push_back(b);
      if (free_.size() <= kKeep) return;
      auto smallest = std::min_element(free_.begin(), free_.end(),
                                       [](const Buffer& x, const Buffer& y) { return x.capacity < y.capacity; });
      b = *smallest;
      free_.erase(smallest);
    }
    cudaFreeHost(b.ptr);
  }

  absl::Mutex mu_;
  std::vector<Buffer> free_ ABSL_GUARDED_BY(mu_);
};

class CudaBackend : public Backend {
 public:
  CudaBackend(std::vector<std::unique_ptr<DeviceContext>> devices, const CudaBackendOptions& options)
      : devices_(std::move(devices)), staging_(devices_.size()), options_(options) {
    for (const auto& d : devices_) step_inputs_.push_back(std::make_unique<StepInputs>(d.get()));
  }

  absl::string_view name() const override { return "cuda"; }

  std::vector<DeviceInfo> devices() const override {
    std::vector<DeviceInfo> out;
    for (const auto& d : devices_) {
      DeviceInfo info;
      info.index = d->index;
      info.kind = "cuda";
      info.name = d->props.name;
      info.memory_total_bytes = static_cast<int64_t>(d->props.totalGlobalMem);
      info.compute_capability = absl::StrCat(d->props.major, ".", d->props.minor);
      out.push_back(info);
    }
    return out;
  }

  Precision default_precision() const override { return Precision::kBF16; }

  absl::Status Supports(const BlockSpec& spec) const override {
    if (spec.device < 0 || spec.device >= static_cast<int>(devices_.size())) {
      return absl::InvalidArgumentError(absl::StrCat("device ", spec.device, " does not exist: backend cuda has ",
                                                     devices_.size(), " GPU(s), 0..", devices_.size() - 1));
    }
    if (spec.config.head_dim > kernels::kAttentionMaxHeadDim) {
      return absl::UnimplementedError(absl::StrCat("backend cuda supports head_dim up to ",
                                                   kernels::kAttentionMaxHeadDim, ", got ", spec.config.head_dim));
    }
    if (spec.config.hidden_size > 32768) {
      return absl::UnimplementedError(
          absl::StrCat("backend cuda supports hidden_size up to 32768, got ", spec.config.hidden_size));
    }
    return absl::OkStatus();
  }

  // The attention's cuDNN workspace is a call's, not the block's (attention_dispatch.h).
  size_t BlockBytes(const BlockSpec& spec) const override { return cuda::CudaBlockBytes(spec); }

  absl::StatusOr<std::unique_ptr<Block>> CreateBlock(const BlockSpec& spec) override {
    return cuda::CreateCudaBlock(spec, devices_[spec.device].get(), options_.attention);
  }

  // The first device speaks for all: each one loaded the same cuDNN or failed the same way.
  AttentionInfo Attention() const { return cuda::DescribeAttention(options_.attention, *devices_.front()); }

  // Upload and Download run on the device's copy streams (device.h): a transfer neither queues
  // behind other calls' compute nor holds it up.
  absl::StatusOr<std::unique_ptr<Activation>> Upload(int device, DType dtype, const void* data, int64_t batch,
                                                     int64_t seq, int64_t width) override {
    return UploadFrom(device, dtype, [data](void* dst, size_t at, size_t n) {
      ParallelCopy(dst, static_cast<const char*>(data) + at, n);
      return absl::OkStatus();
    }, batch, seq, width);
  }

  absl::StatusOr<std::unique_ptr<Activation>> UploadFrom(int device, DType dtype, const HostRead& read, int64_t batch,
                                                         int64_t seq, int64_t width) override {
    return UploadWith(device, dtype, batch, seq, width, [&](DeviceContext* dev, void* staging, size_t bytes) {
      return staging_[device].CopyToDevice(dev, staging, read, bytes);
    });
  }

  // A session step's rows, which the engine already found finite (base/finite.h): up to
  // kStepInputBytes go through a pinned ring on the compute stream (StepWorkspace::Upload) and
  // are converted there, so that the step's kernels follow in stream order and the host never
  // waits. Upload's path waits for its copy stream, to read back the non-finite count and to free
  // its staging: a round trip to the GPU before each decode step could launch. Larger inputs (a
  // prefill) take that path.
  absl::StatusOr<std::unique_ptr<Activation>> UploadChecked(int device, DType dtype, const void* data, int64_t batch,
                                                            int64_t seq, int64_t width) override {
    const int64_t n = batch * seq * width;
    const size_t bytes = static_cast<size_t>(n) * DTypeSize(dtype);
    if (bytes > kStepInputBytes || n <= 0) return Upload(device, dtype, data, batch, seq, width);
    DeviceContext* dev = devices_[device].get();
    DeviceGuard guard(dev->index);
    StepInputs& in = *step_inputs_[device];
    // One ring per device, its device buffer rewritten by the next upload: each upload's
    // conversion is queued before the next one's copy.
    absl::MutexLock lock(&in.mu);
    ASSIGN_OR_RETURN(const void* wire, in.ring.Upload(data, bytes));
    ASSIGN_OR_RETURN(DeviceBuffer values, DeviceBuffer::Allocate(dev, static_cast<size_t>(n) * sizeof(float)));
    CUDA_RETURN_IF_ERROR(
        kernels::launch_to_float(WireOf(dtype), wire, values.as<float>(), n, /*nonfinite=*/nullptr, dev->Stream()));
    return std::unique_ptr<Activation>(std::make_unique<CudaActivation>(device, batch, seq, width, std::move(values)));
  }

  // CUDA IPC: the client's bytes are copied device to device into the staging buffer (any
  // alignment, and the client may reuse its tensor once the call returns), after the work the
  // client recorded on its IPC event. A pinned shared-memory region: one DMA across PCIe.
  absl::StatusOr<std::unique_ptr<Activation>> UploadPeer(int device, DType dtype, const PeerMemory& peer,
                                                         int64_t offset, int64_t batch, int64_t seq,
                                                         int64_t width) override {
    const auto& p = static_cast<const cuda::CudaPeerMemory&>(peer);
    if (!p.ReachableFrom(device)) return absl::FailedPreconditionError("CUDA IPC memory of another device");
    return UploadWith(device, dtype, batch, seq, width, [&](DeviceContext* dev, void* staging, size_t bytes) {
      RETURN_IF_ERROR(p.WaitOn(dev->upload_stream));
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(staging, p.at(offset), bytes, cudaMemcpyDefault, dev->upload_stream));
      return absl::OkStatus();
    });
  }

  absl::StatusOr<std::unique_ptr<PeerMemory>> PinHostMemory(void* ptr, size_t bytes) override {
    ASSIGN_OR_RETURN(auto pinned, cuda::PinCudaHostMemory(devices_.front().get(), ptr, bytes));
    return std::unique_ptr<PeerMemory>(std::move(pinned));
  }

  absl::StatusOr<std::unique_ptr<PeerMemory>> OpenPeerMemory(int device, absl::string_view mem_handle,
                                                            absl::string_view event_handle) override {
    if (device < 0 || device >= static_cast<int>(devices_.size())) {
      return absl::FailedPreconditionError(absl::StrCat("device ", device, ": this daemon has CUDA devices 0..",
                                                        devices_.size() - 1));
    }
    ASSIGN_OR_RETURN(auto peer, cuda::OpenCudaPeerMemory(devices_[device].get(), mem_handle, event_handle));
    return std::unique_ptr<PeerMemory>(std::move(peer));
  }

 private:
  // Upload's body: `fill` puts the request's wire bytes into the staging buffer on the device's
  // upload stream; they are then converted to fp32 and checked for non-finite values.
  template <class Fill>
  absl::StatusOr<std::unique_ptr<Activation>> UploadWith(int device, DType dtype, int64_t batch, int64_t seq,
                                                         int64_t width, Fill fill) {
    DeviceContext* dev = devices_[device].get();
    DeviceGuard guard(dev->index);
    const int64_t n = batch * seq * width;
    // The values are read next by the compute stream (after this returns), which frees them.
    cudaStream_t up = dev->upload_stream;
    ASSIGN_OR_RETURN(DeviceBuffer values, DeviceBuffer::AllocateForCopy(dev, n * sizeof(float), up, dev->stream));
    const size_t flag_at = (n * DTypeSize(dtype) + 15) / 16 * 16;  // the counter needs 4-byte alignment
    ASSIGN_OR_RETURN(DeviceBuffer staging,
                     DeviceBuffer::AllocateForCopy(dev, flag_at + sizeof(unsigned), up, up));
    auto* nonfinite = reinterpret_cast<unsigned*>(staging.as<char>() + flag_at);
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(nonfinite, 0, sizeof(unsigned), up));
    RETURN_IF_ERROR(fill(dev, staging.get(), static_cast<size_t>(n * DTypeSize(dtype))));
    CUDA_RETURN_IF_ERROR(
        kernels::launch_to_float(WireOf(dtype), staging.get(), values.as<float>(), n, nonfinite, up));
    unsigned bad = 0;
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(&bad, nonfinite, sizeof(bad), cudaMemcpyDeviceToHost, up));
    RETURN_IF_ERROR(dev->Sync(up));
    if (bad != 0) return absl::InvalidArgumentError(absl::StrCat("has ", bad, " non-finite values (NaN or inf)"));
    return std::unique_ptr<Activation>(std::make_unique<CudaActivation>(device, batch, seq, width, std::move(values)));
  }

 public:
  // *dst is reserved and appended to, not zero-filled first.
  absl::Status Download(const Activation& a, DType dtype, std::string* dst) override {
    dst->clear();
    dst->reserve(static_cast<size_t>(a.numel()) * DTypeSize(dtype));
    return DownloadTo(a, dtype, [dst](const void* src, size_t, size_t n) {
      dst->append(static_cast<const char*>(src), n);
      return absl::OkStatus();
    });
  }

  absl::Status DownloadTo(const Activation& a, DType dtype, const HostWrite& write) override {
    const auto& ca = static_cast<const CudaActivation&>(a);
    DeviceContext* dev = devices_[a.device()].get();
    DeviceGuard guard(dev->index);
    const int64_t n = a.numel();
    RETURN_IF_ERROR(WaitProduced(ca, dev, dev->download_stream));
    cudaStream_t down = dev->download_stream;
    if (dtype == DType::kFloat32) return staging_[a.device()].CopyToHost(dev, write, ca.data(), n * 4);
    ASSIGN_OR_RETURN(DeviceBuffer staging,
                     DeviceBuffer::AllocateForCopy(dev, n * DTypeSize(dtype), down, down));
    CUDA_RETURN_IF_ERROR(kernels::launch_from_float(ca.data(), WireOf(dtype), staging.get(), n, down));
    return staging_[a.device()].CopyToHost(dev, write, staging.get(), n * DTypeSize(dtype));
  }

  // CUDA IPC: device to device into the client's memory, after the client's recorded work (it may
  // still read what it last had there); a pinned shared-memory region: one DMA across PCIe. Done
  // when this returns.
  absl::Status DownloadPeer(const Activation& a, DType dtype, PeerMemory& peer, int64_t offset) override {
    const auto& ca = static_cast<const CudaActivation&>(a);
    const auto& p = static_cast<const cuda::CudaPeerMemory&>(peer);
    if (!p.ReachableFrom(a.device())) return absl::FailedPreconditionError("CUDA IPC memory of another device");
    DeviceContext* dev = devices_[a.device()].get();
    DeviceGuard guard(dev->index);
    const int64_t n = a.numel();
    cudaStream_t down = dev->download_stream;
    RETURN_IF_ERROR(WaitProduced(ca, dev, down));
    RETURN_IF_ERROR(p.WaitOn(down));
    if (dtype == DType::kFloat32) {
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(p.at(offset), ca.data(), n * 4, cudaMemcpyDefault, down));
      return dev->Sync(down);
    }
    ASSIGN_OR_RETURN(DeviceBuffer staging, DeviceBuffer::AllocateForCopy(dev, n * DTypeSize(dtype), down, down));
    CUDA_RETURN_IF_ERROR(kernels::launch_from_float(ca.data(), WireOf(dtype), staging.get(), n, down));
    CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(p.at(offset), staging.get(), n * DTypeSize(dtype), cudaMemcpyDefault, down));
    return dev->Sync(down);
  }

 private:
  // Makes `stream` wait for the kernels that produced `a`; without their mark, for all the compute
  // queued so far.
  absl::Status WaitProduced(const CudaActivation& ca, DeviceContext* dev, cudaStream_t stream) {
    cudaEvent_t produced = ca.ready();
    cudaEvent_t now = nullptr;
    if (produced == nullptr) {
      CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&now, cudaEventDisableTiming));
      produced = now;
      if (cudaError_t e = cudaEventRecord(now, dev->stream); e != cudaSuccess) {
        cudaEventDestroy(now);
        CUDA_RETURN_IF_ERROR(e);
      }
    }
    const cudaError_t waited = cudaStreamWaitEvent(stream, produced, 0);
    if (now != nullptr) cudaEventDestroy(now);  // released once the wait has used it
    CUDA_RETURN_IF_ERROR(waited);
    return absl::OkStatus();
  }

 public:
  absl::StatusOr<std::unique_ptr<StepGraph>> NewStepGraph(int device) override {
    if (device < 0 || device >= static_cast<int>(devices_.size())) {
      return absl::InvalidArgumentError(absl::StrCat("device ", device, " does not exist"));
    }
    return cuda::CudaStepGraph::Create(devices_[device].get());
  }

  absl::StatusOr<std::unique_ptr<Activation>> ToDevice(const Activation& a, int device) override {
    if (device < 0 || device >= static_cast<int>(devices_.size())) {
      return absl::InvalidArgumentError(absl::StrCat("device ", device, " does not exist"));
    }
    const auto& ca = static_cast<const CudaActivation&>(a);
    DeviceContext* src = devices_[a.device()].get();
    DeviceContext* dst = devices_[device].get();
    RETURN_IF_ERROR(src->Sync());  // the producer's work is done before the copy reads it
    DeviceGuard guard(dst->index);
    ASSIGN_OR_RETURN(std::unique_ptr<CudaActivation> out, cuda::NewActivation(dst, a.batch(), a.seq(), a.width()));
    CUDA_RETURN_IF_ERROR(
        cudaMemcpyPeerAsync(out->data(), dst->index, ca.data(), src->index, a.numel() * 4, dst->stream));
    RETURN_IF_ERROR(dst->Sync());
    return std::unique_ptr<Activation>(std::move(out));
  }

  bool healthy() const override { return !cuda::CudaBroken(); }

  int64_t TransferPoolPeakBytes(int device, bool reset) const {
    if (device < 0 || device >= static_cast<int>(devices_.size())) return -1;
    cudaMemPool_t pool = devices_[device]->copy_pool;
    uint64_t peak = 0;
    if (cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &peak) != cudaSuccess) return -1;
    if (reset) {
      uint64_t zero = 0;
      cudaMemPoolSetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &zero);
    }
    return static_cast<int64_t>(peak);
  }

  int64_t DeviceMemoryUsed(int device) const override {
    DeviceGuard guard(device);
    size_t free_bytes = 0, total = 0;
    if (cudaMemGetInfo(&free_bytes, &total) != cudaSuccess) return 0;
    return static_cast<int64_t>(total - free_bytes);
  }

 private:
  std::vector<std::unique_ptr<DeviceContext>> devices_;
  std::vector<PinnedStaging> staging_;
  // UploadChecked's pinned ring and device buffer, per device; destroyed before the devices.
  static constexpr size_t kStepInputBytes = size_t{1} << 20;
  struct StepInputs {
    explicit StepInputs(DeviceContext* dev) : ring(dev) {}
    absl::Mutex mu;
    cuda::StepWorkspace ring ABSL_GUARDED_BY(mu);
  };
  std::vector<std::unique_ptr<StepInputs>> step_inputs_;
  CudaBackendOptions options_;
};

}  // namespace

int64_t CudaTransferPoolPeakBytes(const Backend& backend, int device, bool reset) {
  const auto* cuda = dynamic_cast<const CudaBackend*>(&backend);
  return cuda != nullptr ? cuda->TransferPoolPeakBytes(device, reset) : -1;
}

absl::StatusOr<AttentionMode> ParseAttentionMode(absl::string_view name) {
  if (name == "auto") return AttentionMode::kAuto;
  if (name == "cudnn") return AttentionMode::kCudnn;
  if (name == "native") return AttentionMode::kNative;
  return absl::InvalidArgumentError(absl::StrCat("--attention=", name, ", expected auto, cudnn or native"));
}

absl::string_view AttentionModeName(AttentionMode mode) {
  switch (mode) {
    case AttentionMode::kAuto: return "auto";
    case AttentionMode::kCudnn: return "cudnn";
    case AttentionMode::kNative: return "native";
  }
  return "auto";
}

AttentionInfo CudaAttentionSummary(const Backend& backend) {
  const auto* cuda = dynamic_cast<const CudaBackend*>(&backend);
  return cuda != nullptr ? cuda->Attention() : AttentionInfo{};
}

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(const CudaBackendOptions& options) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return absl::FailedPreconditionError(absl::StrCat("no CUDA device: ", cudaGetErrorString(e)));
  }
  if (count == 0) return absl::FailedPreconditionError("no CUDA device");
  std::vector<std::unique_ptr<DeviceContext>> devices;
  for (int i = 0; i < count; ++i) {
    ASSIGN_OR_RETURN(std::unique_ptr<DeviceContext> dev, DeviceContext::Create(i));
    RETURN_IF_ERROR(cuda::InitAttention(options.attention, dev.get()));
    devices.push_back(std::move(dev));
  }
  return std::unique_ptr<Backend>(std::make_unique<CudaBackend>(std::move(devices), options));
}

}  // namespace blockd
