#include "engine/collective_nccl.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "base/status_macros.h"
#include "engine/cuda/cuda_status.h"
#include "engine/cuda/device.h"
#include "engine/tcp_store.h"

namespace blockd {
namespace {

constexpr absl::string_view kIdMagic = "blockd-nccl/1";
// Host-memory calls are staged through a device buffer of at most this many bytes at a time.
constexpr size_t kStagingBytes = size_t{64} << 20;
// A wait looks at the stream and the communicator in a loop that yields the core for its first
// kSpin (as the CUDA runtime's own waits spin: an all-reduce of 64 MB takes ~300 us, and sleeping
// would add tens of us to each), then sleeps kPoll between looks, short next to any timeout.
constexpr absl::Duration kSpin = absl::Milliseconds(10);
constexpr absl::Duration kPoll = absl::Microseconds(50);

class Poller {
 public:
  void Wait() {
    if (absl::Now() - start_ < kSpin) {
      std::this_thread::yield();
    } else {
      absl::SleepFor(kPoll);
    }
  }

 private:
  const absl::Time start_ = absl::Now();
};

std::string NcclError(ncclResult_t r, ncclComm_t comm) {
  std::string s = ncclGetErrorString(r);
  const char* last = comm != nullptr ? ncclGetLastError(comm) : nullptr;
  if (last != nullptr && last[0] != '\0') absl::StrAppend(&s, " (", last, ")");
  return s;
}

// The GPU's UUID, as nvidia-smi -L prints it: what tells two members on one GPU apart from two on
// different GPUs, whatever CUDA_VISIBLE_DEVICES each daemon was started with.
absl::StatusOr<std::string> GpuUuid(int device) {
  cudaDeviceProp props{};
  CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&props, device));
  const auto* u = reinterpret_cast<const unsigned char*>(props.uuid.bytes);
  std::string s = "GPU-";
  for (int i = 0; i < 16; ++i) {
    absl::StrAppendFormat(&s, "%02x", u[i]);
    if (i == 3 || i == 5 || i == 7 || i == 9) s += '-';
  }
  char bus[32] = {0};
  if (cudaDeviceGetPCIBusId(bus, sizeof(bus) - 1, device) == cudaSuccess) absl::StrAppend(&s, " (bus ", bus, ")");
  return s;
}

class NcclCollective final : public Collective {
 public:
  NcclCollective(ncclComm_t comm, int rank, int world_size, int device, cudaStream_t stream, cudaEvent_t done,
                 absl::Duration timeout)
      : comm_(comm), rank_(rank), world_size_(world_size), device_(device), stream_(stream), done_(done),
        timeout_(timeout) {}

  ~NcclCollective() override {
    cuda::DeviceGuard guard(device_);
    // Abort rather than destroy: ncclCommDestroy may wait on members that already left or died.
    if (comm_ != nullptr) ncclCommAbort(comm_);
    if (staging_ != nullptr) cudaFree(staging_);
    cudaEventDestroy(done_);
    if (ready_ != nullptr) cudaEventDestroy(ready_);
    cudaStreamDestroy(stream_);
  }

  absl::string_view backend() const override { return "nccl"; }
  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  int64_t payload_bytes() const override { return payload_bytes_; }
  bool on_device() const override { return true; }

  absl::Status AllReduceSum(float* data, size_t n) override { return Staged(data, n * sizeof(float), ncclFloat32); }
  absl::Status AllReduceSum(double* data, size_t n) override {
    return Staged(data, n * sizeof(double), ncclFloat64);
  }
  absl::Status Broadcast(void* data, size_t bytes, int root) override {
    return Staged(data, bytes, ncclUint8, root);
  }

  absl::Status AllReduceMeanOnDevice(float* device_data, size_t n, void* stream) override {
    RETURN_IF_ERROR(Usable());
    if (n == 0) return absl::OkStatus();
    cuda::DeviceGuard guard(device_);
    auto st = static_cast<cudaStream_t>(stream);
    const ncclResult_t r = ncclAllReduce(device_data, device_data, n, ncclFloat32, ncclAvg, comm_, st);
    RETURN_IF_ERROR(Finish(r, "all-reduce", n * sizeof(float), st));
    payload_bytes_ += static_cast<int64_t>(n * sizeof(float));
    return absl::OkStatus();
  }

  // On stream_, after an event of `after`: NCCL's kernels run beside the block's stream.
  absl::Status QueueAllReduceMeanOnDevice(float* device_data, size_t n, void* after) override {
    RETURN_IF_ERROR(Usable());
    if (n == 0) return absl::OkStatus();
    cuda::DeviceGuard guard(device_);
    if (ready_ == nullptr) CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
    CUDA_RETURN_IF_ERROR(cudaEventRecord(ready_, static_cast<cudaStream_t>(after)));
    CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream_, ready_, 0));
    const ncclResult_t r = ncclAllReduce(device_data, device_data, n, ncclFloat32, ncclAvg, comm_, stream_);
    RETURN_IF_ERROR(Queued(r, "all-reduce", n * sizeof(float), absl::Now() + timeout_));
    queued_bytes_ += n * sizeof(float);
    payload_bytes_ += static_cast<int64_t>(n * sizeof(float));
    return absl::OkStatus();
  }
  absl::Status WaitQueued() override {
    const size_t bytes = std::exchange(queued_bytes_, 0);
    if (bytes == 0) return absl::OkStatus();
    RETURN_IF_ERROR(Usable());
    cuda::DeviceGuard guard(device_);
    return Complete("all-reduce", bytes, stream_, absl::Now() + timeout_);
  }

 private:
  absl::Status Usable() const {
    if (comm_ == nullptr) {
      return absl::AbortedError(absl::StrCat("the group's NCCL communicator failed earlier and was aborted: ", reason_));
    }
    return absl::OkStatus();
  }

  // An all-reduce (sum; root < 0) or a broadcast from `root` of host bytes, in chunks through the
  // staging buffer. The copy back waits for the collective first: a copy to pageable memory blocks
  // until the stream gets there, which a dead peer would make never.
  absl::Status Staged(void* host, size_t bytes, ncclDataType_t type, int root = -1) {
    RETURN_IF_ERROR(Usable());
    if (bytes == 0) return absl::OkStatus();
    cuda::DeviceGuard guard(device_);
    if (staging_ == nullptr) {
      staging_bytes_ = kStagingBytes;
      CUDA_RETURN_IF_ERROR(cudaMalloc(&staging_, staging_bytes_));
    }
    const size_t elem = type == ncclFloat64 ? 8 : type == ncclFloat32 ? 4 : 1;
    auto* p = static_cast<char*>(host);
    for (size_t begin = 0; begin < bytes; begin += staging_bytes_) {
      const size_t chunk = std::min(staging_bytes_, bytes - begin);
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(staging_, p + begin, chunk, cudaMemcpyHostToDevice, stream_));
      const ncclResult_t r =
          root < 0 ? ncclAllReduce(staging_, staging_, chunk / elem, type, ncclSum, comm_, stream_)
                   : ncclBroadcast(staging_, staging_, chunk / elem, type, root, comm_, stream_);
      RETURN_IF_ERROR(Finish(r, root < 0 ? "all-reduce" : "broadcast", chunk, stream_));
      // On our own stream (returns once copied, pageable memory), not the legacy default stream,
      // which would also wait for the device's other streams.
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(p + begin, staging_, chunk, cudaMemcpyDeviceToHost, stream_));
      CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    }
    payload_bytes_ += static_cast<int64_t>(bytes);
    return absl::OkStatus();
  }

  // Waits until the call NCCL answered `issued` is queued and then done on `stream`, watching the
  // communicator for a peer's failure; past the group's timeout, aborts it.
  absl::Status Finish(ncclResult_t issued, const char* what, size_t bytes, cudaStream_t stream) {
    const absl::Time deadline = absl::Now() + timeout_;
    RETURN_IF_ERROR(Queued(issued, what, bytes, deadline));
    return Complete(what, bytes, stream, deadline);
  }

  // Waits until the call NCCL answered `issued` is queued: a non-blocking communicator may still be
  // queueing it, and takes no other call before.
  absl::Status Queued(ncclResult_t issued, const char* what, size_t bytes, absl::Time deadline) {
    Poller poll;
    ncclResult_t state = issued;
    while (state == ncclInProgress) {
      if (absl::Now() > deadline) return Fail(what, bytes, "it was not queued within the timeout");
      poll.Wait();
      ncclCommGetAsyncError(comm_, &state);
    }
    if (state != ncclSuccess) return Fail(what, bytes, NcclError(state, comm_));
    return absl::OkStatus();
  }

  // Waits until what is queued on `stream` is done, watching the communicator for a peer's
  // failure; past `deadline`, aborts it.
  absl::Status Complete(const char* what, size_t bytes, cudaStream_t stream, absl::Time deadline) {
    Poller poll;
    ncclResult_t state = ncclSuccess;
    CUDA_RETURN_IF_ERROR(cudaEventRecord(done_, stream));
    for (;;) {
      const cudaError_t e = cudaEventQuery(done_);
      if (e == cudaSuccess) return absl::OkStatus();
      if (e != cudaErrorNotReady) {
        CUDA_RETURN_IF_ERROR(e);
      }
      ncclCommGetAsyncError(comm_, &state);
      if (state != ncclSuccess && state != ncclInProgress) return Fail(what, bytes, NcclError(state, comm_));
      if (absl::Now() > deadline) return Fail(what, bytes, "it did not complete within the timeout");
      poll.Wait();
    }
  }

  // The communicator is broken for good: abort it (its kernels return, the stream moves on).
  absl::Status Fail(const char* what, size_t bytes, const std::string& why) {
    reason_ = why;
    ncclCommAbort(comm_);
    comm_ = nullptr;
    return absl::AbortedError(absl::StrCat("NCCL ", what, " of ", bytes, " bytes failed (a member died, stalled past ",
                                           "the group's timeout of ", absl::ToInt64Milliseconds(timeout_),
                                           " ms, or left): ", why));
  }

  ncclComm_t comm_;
  const int rank_, world_size_, device_;
  cudaStream_t stream_;  // host-staged and queued calls; AllReduceMeanOnDevice's go on their block's stream
  cudaEvent_t done_;
  cudaEvent_t ready_ = nullptr;  // a queued call's point on its block's stream
  size_t queued_bytes_ = 0;      // queued since the last WaitQueued
  const absl::Duration timeout_;
  void* staging_ = nullptr;
  size_t staging_bytes_ = 0;
  int64_t payload_bytes_ = 0;
  std::string reason_;
};

// Waits for a non-blocking communicator's setup until `deadline`; aborts it on failure.
absl::Status AwaitInit(ncclComm_t comm, ncclResult_t issued, absl::Time deadline, absl::Duration timeout) {
  ncclResult_t state = issued;
  while (state == ncclInProgress && absl::Now() <= deadline) {
    absl::SleepFor(kPoll);
    ncclCommGetAsyncError(comm, &state);
  }
  if (state == ncclSuccess) return absl::OkStatus();
  const std::string why = state == ncclInProgress ? "not every member's GPU connected" : NcclError(state, comm);
  if (comm != nullptr) ncclCommAbort(comm);
  return absl::AbortedError(absl::StrCat("the group's NCCL communicator did not form within ",
                                         absl::FormatDuration(timeout), ": ", why));
}

class NcclProvider final : public CollectiveProvider {
 public:
  explicit NcclProvider(const NcclOptions& options)
      : stores_(std::string(kIdMagic), options.advertise_host, options.max_pending_ids) {
    // Before NCCL's first call, and inherited by anything this daemon starts: see the header.
    ::setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);
  }

  absl::string_view backend() const override { return "nccl"; }
  absl::StatusOr<std::string> NewId(absl::Duration ttl) override { return stores_.NewId(ttl); }
  void Sweep() override { stores_.Sweep(); }

  absl::StatusOr<std::unique_ptr<Collective>> Connect(const std::string& id, int rank, int world_size,
                                                      const std::string& terms, absl::Duration timeout,
                                                      int device) override {
    ASSIGN_OR_RETURN(StoreAddress p, ParseStoreId(id, kIdMagic, "NCCL"));
    if (device < 0) {
      return absl::FailedPreconditionError("NCCL groups reduce GPU memory: this member's blocks are not on a GPU");
    }
    const absl::Time deadline = absl::Now() + timeout;
    ASSIGN_OR_RETURN(const std::string gpu, GpuUuid(device));
    ncclUniqueId uid;
    try {
      TcpStoreClient store(p.host, p.port, p.nonce, deadline);
      RETURN_IF_ERROR(ClaimRankAndAgree(store, rank, world_size, terms));
      store.set(absl::StrCat("blockd/gpu/", rank), std::vector<char>(gpu.begin(), gpu.end()));
      // Every member reads every GPU, so all reach the same verdict without another round.
      std::vector<std::string> gpus;
      for (int r = 0; r < world_size; ++r) {
        const std::vector<char> v = store.get(absl::StrCat("blockd/gpu/", r));
        gpus.emplace_back(v.begin(), v.end());
        for (int q = 0; q < r; ++q) {
          if (gpus[q].substr(0, 40) != gpus[r].substr(0, 40)) continue;  // "GPU-" and the 36-character UUID
          return absl::FailedPreconditionError(absl::StrCat(
              "ranks ", q, " and ", r, " are both on ", gpus[r], ": NCCL cannot run two members of one group on one "
              "GPU; give each member its own GPU, or form the group with backend \"gloo\" (host memory)"));
        }
      }
      if (rank == 0) {
        const ncclResult_t r = ncclGetUniqueId(&uid);
        if (r != ncclSuccess) return absl::InternalError(absl::StrCat("ncclGetUniqueId: ", NcclError(r, nullptr)));
        store.set("blockd/nccl-id", std::vector<char>(uid.internal, uid.internal + sizeof(uid.internal)));
      } else {
        const std::vector<char> v = store.get("blockd/nccl-id");
        if (v.size() != sizeof(uid.internal)) return absl::InternalError("rank 0 published a malformed NCCL id");
        std::memcpy(uid.internal, v.data(), v.size());
      }
    } catch (const std::exception& e) {
      return absl::AbortedError(absl::StrCat("the group did not form within ", absl::FormatDuration(timeout),
                                             " (every member must call JoinGroup with the same collective id): ",
                                             e.what()));
    }
    cuda::DeviceGuard guard(device);
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;  // setup and collectives return at once; we poll, bounded by the timeout
    ncclComm_t comm = nullptr;
    const ncclResult_t issued = ncclCommInitRankConfig(&comm, world_size, uid, rank, &config);
    RETURN_IF_ERROR(AwaitInit(comm, issued, deadline, timeout));
    stores_.Connected(p.nonce);  // every member had the NCCL id: rank 0's store may close
    cudaStream_t stream = nullptr;
    cudaEvent_t done = nullptr;
    absl::Status s = cuda::CallStatus(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
                                      "cudaStreamCreateWithFlags", __FILE__, __LINE__);
    if (s.ok()) {
      s = cuda::CallStatus(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), "cudaEventCreateWithFlags",
                           __FILE__, __LINE__);
    }
    if (!s.ok()) {
      ncclCommAbort(comm);
      if (stream != nullptr) cudaStreamDestroy(stream);
      return s;
    }
    return std::unique_ptr<Collective>(new NcclCollective(comm, rank, world_size, device, stream, done, timeout));
  }

 private:
  PendingStores stores_;
};

}  // namespace

std::unique_ptr<CollectiveProvider> MakeNcclProvider(const NcclOptions& options) {
  return std::make_unique<NcclProvider>(options);
}

std::string NcclVersion() {
  int v = 0;
  if (ncclGetVersion(&v) != ncclSuccess) return "unknown";
  return absl::StrCat(v / 10000, ".", v / 100 % 100, ".", v % 100);
}

}  // namespace blockd
