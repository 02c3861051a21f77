// The backend interface: what a device (the CPU, a CUDA GPU) must provide to hold and train blocks.
//
// A Backend creates Blocks and moves activations between host bytes and its own memory; a Block
// owns its fp32 master weights, gradients and AdamW moments and runs forward, backward and AdamW.
// Bookkeeping (names, budgets, step counters, whether gradients exist, activation handles) stays in
// the Engine, so a backend is only arithmetic and memory. The CPU backend is the oracle for all.
//
//   auto block = backend->CreateBlock(spec);
//   auto x = backend->Upload(0, DType::kBFloat16, bytes, {batch, seq, hidden});
//   std::unique_ptr<SavedActivations> saved;
//   auto y = (*block)->Forward(*std::move(x), /*position_offset=*/0, &saved);
//   auto dx = (*block)->Backward(*saved, **dy, /*accumulate=*/false);
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "base/block_config.h"
#include "base/dtype.h"

namespace blockd {

// What CreateBlock asks a backend for.
struct BlockSpec {
  std::string id;
  BlockConfig config;
  int64_t layer_index = 0;
  int64_t max_seq_len = 0;
  int64_t max_batch_size = 0;
  Precision precision = Precision::kFP32;
  int device = 0;
  // Weights only, in the compute dtype: no gradients, no AdamW moments. Forward, Backward (the
  // input gradient alone) and sessions run; the Engine refuses Step and ZeroGrad.
  bool frozen = false;
  // LoRA adapters on some projections (rank 0: none); the Engine validates and normalises it.
  // Their parameters follow the base ones in BlockParams(config, lora) and are always trained.
  LoraConfig lora;
};

// Whether a block of `spec` trains `param`, i.e. holds its gradient and AdamW moments: every
// parameter of a trainable block; of a frozen one, only its LoRA adapters.
inline bool TrainsParam(const BlockSpec& spec, const ParamSpec& param) {
  return !spec.frozen || IsLoraParam(param.id);
}

enum class TensorKind : uint8_t { kWeights, kGradients, kAdamM, kAdamV };
absl::string_view TensorKindName(TensorKind k);  // "weights", "gradients", "adam_m", "adam_v"

struct AdamWHyper {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;
  bool decay_norm_weights = false;
};

// One AdamW update: the hyperparameters, the 1-based step number used for bias correction, and
// the factor that global-norm clipping multiplies every gradient by (1 when not clipping).
struct AdamWUpdate {
  AdamWHyper hyper;
  int64_t step = 1;
  float grad_scale = 1.f;
};

struct DeviceInfo {
  int index = 0;
  std::string kind;  // "cpu" or "cuda"
  std::string name;
  int64_t memory_total_bytes = 0;
  std::string compute_capability;
};

// An activation [batch, seq, width] held in a backend's memory.
class Activation {
 public:
  Activation(int device, int64_t batch, int64_t seq, int64_t width)
      : device_(device), batch_(batch), seq_(seq), width_(width) {}
  virtual ~Activation() = default;
  int device() const { return device_; }
  int64_t batch() const { return batch_; }
  int64_t seq() const { return seq_; }
  int64_t width() const { return width_; }
  int64_t numel() const { return batch_ * seq_ * width_; }

 private:
  int device_;
  int64_t batch_, seq_, width_;
};

// Host bytes the caller moves itself, a piece at a time and in order: `bytes` of them, `offset`
// bytes into the tensor. A POSIX shared-memory slice that could not be pinned (PinHostMemory) is
// read (pread) straight into the backend's pinned staging and written (pwrite) straight out of it
// (UploadFrom, DownloadTo): no pageable copy between the client's region and the DMA.
using HostRead = std::function<absl::Status(void* dst, size_t offset, size_t bytes)>;
using HostWrite = std::function<absl::Status(const void* src, size_t offset, size_t bytes)>;

// Device memory of another process on this host, shared through CUDA IPC and opened by the
// backend (Backend::OpenPeerMemory). Destroying it closes the mapping (cudaIpcCloseMemHandle).
// Activations move between it and the backend's own memory device to device (UploadPeer,
// DownloadPeer): a same-GPU client's tensors never cross PCIe. Or host memory pinned for DMA
// (Backend::PinHostMemory: a POSIX shared-memory region's mapping), which every device reads and
// writes by DMA, never the CPU.
class PeerMemory {
 public:
  static constexpr int kHost = -1;  // device() of pinned host memory
  virtual ~PeerMemory() = default;
  virtual int device() const = 0;
  // Whether `d`'s copies reach this memory: it lives on device `d`, or it is pinned host memory.
  bool ReachableFrom(int d) const { return device() == d || device() == kHost; }
  // Bytes usable from the handle's address: the allocation's, as the driver reports it.
  virtual int64_t bytes() const = 0;
};

// Which attention kernels a block runs ("native": the backend's own; "cudnn": cuDNN's fused
// attention) and why, for BlockInfo and the log.
struct AttentionInfo {
  std::string backend;
  std::string reason;
};

// What one block's Forward kept for its Backward.
class SavedActivations {
 public:
  virtual ~SavedActivations() = default;
  virtual size_t bytes() const = 0;
};

// One block's storage for the KV pages of a session family (a session and its forks), in the
// backend's memory and the block's compute dtype: page `id` holds K then V of kKvPageTokens
// positions, kv_dim values each (after QK-norm and RoPE). The page tables (which page holds which
// positions of a row), reference counts and copy-on-write live on the host in KvCache
// (engine/kv_cache.h), which calls CopyPage before a step writes a page that is shared.
constexpr int64_t kKvPageTokens = 16;

class KvPageStore {
 public:
  virtual ~KvPageStore() = default;
  virtual int64_t page_bytes() const = 0;
  virtual int64_t pages() const = 0;
  // Adds `pages` pages, ids pages()..pages()+pages-1. Called while no step runs on the block.
  virtual absl::Status Grow(int64_t pages) = 0;
  // Page `to` becomes a copy of page `from` (in stream order on a device).
  virtual absl::Status CopyPage(int32_t from, int32_t to) = 0;
};

// A StepGraph keeps a captured step while its rows' longest length stays within one multiple of
// this many positions (KvBlockView::device_meta).
constexpr int64_t kStepGraphPositions = 64;

// What Block::InferStep reads and writes of the cache: the block's pages and, on the host, a page
// table of `table_width` page ids per row (-1 past the row's pages). The pages holding the step's
// new positions are the row's own (the caller copied shared ones first), so the step writes them
// in place. Rows are independent, so the rows of several sessions share one step (continuous
// batching): each row names its page ids in its own family's store, `row_pages[row]`; a step of
// one family leaves `row_pages` null and every row reads `pages`.
//
// `device_meta`, when set, is the same starts and table already on the step's device, [rows] int32
// then [rows, table_width] (StepGraph::StageMeta: one copy for a whole span, at an address a
// captured step keeps); the block then plans its attention for the longest row rounded up to
// kStepGraphPositions, so that a captured step's launches change only once per that many.
struct KvBlockView {
  KvPageStore* pages = nullptr;
  KvPageStore* const* row_pages = nullptr;  // [rows], or null: `pages` for every row
  const int32_t* table = nullptr;           // [rows, table_width]
  int64_t table_width = 0;
  const int32_t* device_meta = nullptr;     // see above; only for a step of one store (row_pages null)
  int32_t page(int64_t row, int64_t pos) const { return table[row * table_width + pos / kKvPageTokens]; }
  KvPageStore* store(int64_t row) const { return row_pages != nullptr ? row_pages[row] : pages; }
};

// A block's gradients where they live on a GPU: one contiguous fp32 buffer of every gradient it
// holds, the device, and the stream (a cudaStream_t) that orders the block's work on them. Device
// collectives (NCCL) reduce them in place there; `data` is null where a backend keeps them in host
// memory (the CPU) and collectives go through ReadTensor/WriteTensor instead.
struct DeviceGradients {
  float* data = nullptr;
  size_t count = 0;
  int device = -1;
  void* stream = nullptr;
};

class Block {
 public:
  virtual ~Block() = default;

  // Bytes of backend memory this block holds: weights, gradients, moments, workspaces.
  virtual size_t memory_bytes() const = 0;
  // Bytes a Forward that keeps activations holds for this block at [batch, seq].
  virtual size_t SavedBytes(int64_t batch, int64_t seq) const = 0;
  virtual AttentionInfo attention() const { return {"native", "the backend's own attention"}; }

  // Whole tensor `index` of BlockParams(config) of `kind`, as fp32 on the host. A frozen block has
  // weights only: other kinds are FAILED_PRECONDITION (the Engine does not ask).
  virtual absl::Status WriteTensor(TensorKind kind, int index, const float* host) = 0;
  virtual absl::Status ReadTensor(TensorKind kind, int index, float* host) = 0;

  // y = block(x) for x [batch, seq, hidden]. With `saved`, keeps what Backward needs. Takes x, so
  // that a block keeping it for Backward holds its memory rather than a copy.
  virtual absl::StatusOr<std::unique_ptr<Activation>> Forward(std::unique_ptr<Activation> x, int64_t position_offset,
                                                              std::unique_ptr<SavedActivations>* saved) = 0;
  // Returns dL/dx for dL/dy = grad_out. Weight gradients are added to the existing ones when
  // `accumulate`, else they overwrite them (the Engine knows whether gradients exist). A frozen
  // block computes dL/dx only.
  virtual absl::StatusOr<std::unique_ptr<Activation>> Backward(const SavedActivations& saved,
                                                               const Activation& grad_out, bool accumulate) = 0;
  // One inference step: x [batch, new, hidden] holds tokens at positions start[r]..start[r]+new-1 of
  // row r; writes their K/V into `kv` and attends to the row's cached positions 0..start[r]-1 plus,
  // causally, to each other. No saved activations, no gradients.
  virtual absl::StatusOr<std::unique_ptr<Activation>> InferStep(const Activation& x,
                                                                const std::vector<int64_t>& start,
                                                                const KvBlockView& kv) = 0;
  // An empty page store for this block's K/V (KvPageStore::Grow adds the pages).
  virtual absl::StatusOr<std::unique_ptr<KvPageStore>> NewKvPageStore() = 0;
  // Changes whenever memory that InferStep's launches name moves (its kept scratch grew): a
  // StepGraph that captured this block's step must capture it again.
  virtual uint64_t launch_generation() const { return 0; }
  // See DeviceGradients; the default: none on a device.
  virtual DeviceGradients device_gradients() { return {}; }
  // Sum of squares of every gradient element, accumulated in double; not finite if any gradient is
  // not. StartGradSquaredNorm queues it on the block's device and GradSquaredNorm reads it, waiting
  // for it (or, with none started, computes it then): a span starts every block's sum before the
  // first read, so that it waits for the device once, not once per block.
  virtual absl::Status StartGradSquaredNorm() { return absl::OkStatus(); }
  virtual absl::StatusOr<double> GradSquaredNorm() = 0;
  // Decoupled AdamW on every parameter from the current gradients (decay on matrices only unless
  // decay_norm_weights). Leaves the gradients as they are; the Engine marks them consumed. Queued
  // on the block's device, as PyTorch's optimizer.step is: the host does not wait for it, and all
  // later work with the block (a Forward, a ReadTensor, a collective) runs after it.
  virtual absl::Status AdamWStep(const AdamWUpdate& update) = 0;
};

// What selects a captured span step (StepGraph): equal keys mean equal launches, given the same
// blocks. `generation` sums the span's Block::launch_generation().
struct StepGraphKey {
  int64_t rows = 0, new_tokens = 0, table_width = 0, length_bucket = 0, pages = 0;
  uint64_t generation = 0;
  // Equal but for the blocks' scratch: the same launches once the scratch is warm.
  bool SameShape(const StepGraphKey& o) const {
    return rows == o.rows && new_tokens == o.new_tokens && table_width == o.table_width &&
           length_bucket == o.length_bucket && pages == o.pages;
  }
  bool operator==(const StepGraphKey& o) const { return SameShape(o) && generation == o.generation; }
  bool operator!=(const StepGraphKey& o) const { return !(*this == o); }
};

// One session's inference steps over a span on one device, replayed as a single captured launch
// (a CUDA graph) instead of each block's launches, so that a deep span's decode step costs the
// host one launch. Run() runs `launches` (the span's InferStep calls, in order) eagerly the first
// time it sees a key's shape, which warms the blocks' scratch (and may move it: a new generation);
// captures them the second time; and from then on, while the key stays, replays the capture. A
// step that cannot be captured (a block's scratch would have to grow, a launch that capture
// refuses) runs eagerly, and so does its key until it changes.
//
// RunHost takes the step as the wire has it, host bytes in and out: the tables' and the input's
// copies to the device, the input's conversion, the launches, the output's conversion and its copy
// back are all in the one captured launch, so that a replayed step costs the host a copy into
// pinned memory, one launch, one wait and a copy out. It queues the step (the caller holds the
// span's blocks); FinishHost, after the caller let the blocks go, waits for it and writes the
// output. Run takes an input already on the device (a bench's floor) and returns the output there.
// Not thread-safe: the session's lock serialises its steps; the caller holds the span's blocks
// for StageMeta, Run and RunHost.
//
//   ASSIGN_OR_RETURN(const int32_t* meta, graph->StageMeta(host_meta));   // KvBlockView::device_meta
//   RETURN_IF_ERROR(graph->RunHost(key, {dtype, bytes, rows, n, hidden, &reply}, span, /*capture=*/true));
//   lock.Unlock();
//   RETURN_IF_ERROR(graph->FinishHost());                                  // reply holds the output
class StepGraph {
 public:
  using Launches = std::function<absl::StatusOr<std::unique_ptr<Activation>>(const Activation& input)>;
  // A step's rows as host bytes: [batch, seq, width] of `dtype`, already found finite (CheckFinite);
  // the output, of the same shape and dtype, replaces *output.
  struct HostStep {
    DType dtype = DType::kFloat32;
    const void* input = nullptr;
    int64_t batch = 0, seq = 0, width = 0;
    std::string* output = nullptr;
  };
  virtual ~StepGraph() = default;
  // Stages the step's starts and page tables (KvBlockView::device_meta) for the next Run or
  // RunHost, which copies them to the device before the launches; returns their device address,
  // which stays while their size does.
  virtual absl::StatusOr<const int32_t*> StageMeta(const std::vector<int32_t>& meta) = 0;
  virtual absl::StatusOr<std::unique_ptr<Activation>> Run(const StepGraphKey& key, const Activation& input,
                                                          const Launches& launches) = 0;
  // Queues the step; `capture` false: eagerly, whatever the key (EngineOptions::infer_graphs off).
  virtual absl::Status RunHost(const StepGraphKey& key, const HostStep& step, const Launches& launches,
                               bool capture) = 0;
  // Waits for the step the last RunHost queued and replaces its HostStep's *output with the output.
  virtual absl::Status FinishHost() = 0;
  // Steps run eagerly, captured and replayed so far (for tests and metrics).
  struct Counts {
    int64_t eager = 0, captured = 0, replayed = 0, refused = 0;
  };
  virtual Counts counts() const = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual absl::string_view name() const = 0;  // "cpu", "cuda"
  virtual std::vector<DeviceInfo> devices() const = 0;
  virtual Precision default_precision() const = 0;

  // OK when this backend can run `spec`; otherwise why not (precision, device, sizes).
  virtual absl::Status Supports(const BlockSpec& spec) const = 0;
  // Bytes CreateBlock(spec) will take, for the memory budget.
  virtual size_t BlockBytes(const BlockSpec& spec) const = 0;
  virtual absl::StatusOr<std::unique_ptr<Block>> CreateBlock(const BlockSpec& spec) = 0;

  // Host bytes of `dtype`, shape [batch, seq, width], into an activation on `device`.
  // INVALID_ARGUMENT when an element is NaN or infinite.
  virtual absl::StatusOr<std::unique_ptr<Activation>> Upload(int device, DType dtype, const void* data,
                                                             int64_t batch, int64_t seq, int64_t width) = 0;
  // Upload of values the caller already found finite (CheckFinite, base/finite.h: a session step
  // is checked before it joins a batch, so that a bad step never fails the others), so a backend
  // whose check is a pass of its own skips it. Default: Upload, for a backend whose check rides on
  // the conversion it runs anyway (CUDA's kernel counts non-finite values as it converts).
  virtual absl::StatusOr<std::unique_ptr<Activation>> UploadChecked(int device, DType dtype, const void* data,
                                                                    int64_t batch, int64_t seq, int64_t width) {
    return Upload(device, dtype, data, batch, seq, width);
  }
  // Replaces *dst with the activation as host bytes of `dtype` (numel * DTypeSize(dtype) of them),
  // written once: a reply's bytes field is not zero-filled first.
  virtual absl::Status Download(const Activation& a, DType dtype, std::string* dst) = 0;
  // As Upload and Download, with the host bytes moved by `read` or `write` (HostRead). Default:
  // through a pageable copy, for a backend without staging of its own (the CPU's).
  virtual absl::StatusOr<std::unique_ptr<Activation>> UploadFrom(int device, DType dtype, const HostRead& read,
                                                                 int64_t batch, int64_t seq, int64_t width) {
    std::string bytes(static_cast<size_t>(batch * seq * width) * DTypeSize(dtype), '\0');
    absl::Status s = read(bytes.data(), 0, bytes.size());
    if (!s.ok()) return s;
    return Upload(device, dtype, bytes.data(), batch, seq, width);
  }
  virtual absl::Status DownloadTo(const Activation& a, DType dtype, const HostWrite& write) {
    std::string bytes;
    absl::Status s = Download(a, dtype, &bytes);
    return s.ok() ? write(bytes.data(), 0, bytes.size()) : s;
  }
  // CUDA IPC: opens another process's device memory (`mem_handle`, a cudaIpcMemHandle_t) on
  // `device`, with its IPC event (`event_handle`, a cudaIpcEventHandle_t, may be empty) that
  // UploadPeer waits on before reading. FAILED_PRECONDITION on a backend without device memory or
  // for memory that lives on another device; INVALID_ARGUMENT for a handle that does not open.
  virtual absl::StatusOr<std::unique_ptr<PeerMemory>> OpenPeerMemory(int device, absl::string_view mem_handle,
                                                                    absl::string_view event_handle) {
    (void)device, (void)mem_handle, (void)event_handle;
    return absl::FailedPreconditionError(
        "CUDA IPC memory needs the CUDA backend; this daemon runs on the CPU: register POSIX shared memory or send "
        "tensors inline");
  }
  // Pins `bytes` of host memory at `ptr` (a POSIX shared-memory region's mapping) for DMA: UploadPeer
  // and DownloadPeer then move activations between it and the device with no host copy. Only DMA
  // touches the memory, never the CPU, so a client that shrinks the object under the mapping cannot
  // fault the daemon (the pinned pages stay until the PeerMemory goes). FAILED_PRECONDITION where
  // the backend has no DMA (the CPU's) or the host refuses to pin.
  virtual absl::StatusOr<std::unique_ptr<PeerMemory>> PinHostMemory(void* ptr, size_t bytes) {
    (void)ptr, (void)bytes;
    return absl::FailedPreconditionError("this backend reads host memory with the CPU: nothing to pin");
  }
  // As Upload and Download, from or into `offset` of peer memory (bounds checked by the caller).
  // The caller checks that the peer memory lives on the activation's device (or is pinned host
  // memory, PeerMemory::kHost).
  virtual absl::StatusOr<std::unique_ptr<Activation>> UploadPeer(int device, DType dtype, const PeerMemory& peer,
                                                                 int64_t offset, int64_t batch, int64_t seq,
                                                                 int64_t width) {
    (void)device, (void)dtype, (void)peer, (void)offset, (void)batch, (void)seq, (void)width;
    return absl::UnimplementedError("this backend has no CUDA IPC memory");
  }
  // Returns once the bytes are in the peer's memory (the device work is done).
  virtual absl::Status DownloadPeer(const Activation& a, DType dtype, PeerMemory& peer, int64_t offset) {
    (void)a, (void)dtype, (void)peer, (void)offset;
    return absl::UnimplementedError("this backend has no CUDA IPC memory");
  }
  // The same activation on another device of this backend.
  virtual absl::StatusOr<std::unique_ptr<Activation>> ToDevice(const Activation& a, int device) = 0;
  // A StepGraph for steps of spans on `device`, or null where steps are not captured (the CPU).
  virtual absl::StatusOr<std::unique_ptr<StepGraph>> NewStepGraph(int device) {
    (void)device;
    return std::unique_ptr<StepGraph>();
  }

  // False once the device is broken beyond this process (a sticky CUDA error): health goes NOT_SERVING.
  virtual bool healthy() const { return true; }
  // Bytes the device itself reports in use, for gauges (0 when unknown).
  virtual int64_t DeviceMemoryUsed(int device) const { return 0; }
};

}  // namespace blockd
