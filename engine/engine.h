// The block engine: named blocks on one backend, spans, activation handles, AdamW steps.
//
// The Engine is what the gRPC service calls. It owns the bookkeeping every backend shares: block
// ids and their locks, the memory budget, activation handles and their TTL, whether gradients
// exist, per-block step counters, and the validation that makes every call either succeed or leave
// the state exactly as it was. Calls on different blocks run in parallel; calls on one block are
// serialised by that block's lock.
//
//   Engine engine(MakeCpuBackend(), EngineOptions{});
//   ASSIGN_OR_RETURN(BlockInfo info, engine.CreateBlock({.spec = spec, .seed = 7}));
//   ForwardOutput out;
//   RETURN_IF_ERROR(engine.Forward({.block_ids = {"b0"}, .input = x, .keep_activations = true}, &out));
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "engine/activation_store.h"
#include "engine/backend.h"
#include "engine/block_lease.h"
#include "engine/collective.h"
#include "engine/group.h"
#include "engine/memory_budget.h"
#include "engine/session.h"
#include "engine/step_batcher.h"
#include "engine/tensor_assembler.h"
#include "engine/tensors_version.h"

namespace blockd {

struct EngineOptions {
  int64_t memory_budget_bytes = 0;  // per device; 0: 90% of the device's memory
  absl::Duration activation_ttl = absl::Minutes(10);
  int64_t max_blocks = 4096;
  int64_t max_activations_per_client = 256;
  int64_t default_max_seq_len = 4096;
  int64_t default_max_batch_size = 8;
  int64_t max_span_blocks = 1024;
  // Time source of block leases; tests inject a fake clock to step past a TTL without sleeping.
  // (Activation handle TTLs still read absl::Now().)
  std::function<absl::Time()> lease_clock = absl::Now;
  absl::Duration default_session_ttl = absl::Minutes(10);  // OpenSession with ttl 0
  int64_t max_sessions_per_client = 64;
  int64_t max_groups_per_client = 16;
  // Continuous batching (engine_sessions.cc): steps of different sessions on the same span (and
  // the same new_tokens and dtype) arriving within this window run as one launch per block, of at
  // most `infer_batch_max_rows` rows (and the blocks' max_batch_size). 0: every step runs alone. A step waits at most the window,
  // and only for steps of its kind already on their way (step_batcher.h): never for idle sessions.
  absl::Duration infer_batch_window = absl::Microseconds(200);
  int64_t infer_batch_max_rows = 256;
  // A session whose span lies on one device replays its decode steps (up to 16 new tokens a row,
  // onto a cached prefix, not batched with others) as one captured launch (StepGraph), where the
  // backend captures them (CUDA graphs). Off, the same steps launch block by block, with the same
  // arguments (one table upload per span), so both give the same bits.
  bool infer_graphs = true;
  // Tests: called (with batching on) by each step as it counts as on its way to its batch, before
  // its values are checked and it joins; a barrier here makes concurrent steps meet in one launch
  // whatever the threads' timing (tests/engine/step_barrier.h).
  std::function<void()> on_infer_step_arrived;
  // Called after each launch of session steps with its sessions and rows (a metrics histogram).
  std::function<void(int64_t sessions, int64_t rows)> on_infer_batch;
};

struct CreateBlockParams {
  BlockSpec spec;  // precision: std::nullopt below means the backend's default
  std::optional<Precision> precision;
  std::optional<uint64_t> seed;  // set: deterministic init; unset: weights must be loaded
  // > 0: ExpireBlocks() deletes the block once no call has named it for this long. 0: no lease.
  absl::Duration ttl = absl::ZeroDuration();
};

struct BlockInfo {
  BlockSpec spec;
  int64_t parameter_count = 0;
  int64_t memory_bytes = 0;
  bool weights_loaded = false;
  std::vector<std::string> missing_weights;
  bool has_gradients = false;
  int64_t step = 0;
  absl::Duration ttl = absl::ZeroDuration();   // the lease (0: none)
  absl::Duration idle = absl::ZeroDuration();  // since the last call that named the block
  AttentionInfo attention;  // the block's attention kernels and why
};

// Host bytes of a tensor in a request: a view, not owned. With `peer` set, the `size` bytes are
// at `peer_offset` of a same-GPU client's device memory (CUDA IPC) instead, and `data` is unused;
// with `read` set, `read` copies them (a POSIX shared-memory slice, backend.h's HostRead).
struct TensorArg {
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  size_t size = 0;  // bytes
  const PeerMemory* peer = nullptr;
  int64_t peer_offset = 0;
  HostRead read = nullptr;
};

struct ForwardArgs {
  std::vector<std::string> block_ids;
  TensorArg input;
  bool keep_activations = false;
  int64_t position_offset = 0;
  // Who asks: the kept handle belongs to this identity (only it may Backward or release it) and
  // counts against its per-client handle limit.
  std::string client;
};

// Output bytes go straight into `data` (e.g. a reply's bytes field): no extra copy.
struct TensorOut {
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  std::string* data = nullptr;
  // Set: the output goes device to device to `peer_offset` of this CUDA IPC memory instead of
  // `data` (the caller checked that it holds the output).
  PeerMemory* peer = nullptr;
  int64_t peer_offset = 0;
  // Set: the output's bytes go to `write` instead of `data` (a POSIX shared-memory slice).
  HostWrite write = nullptr;
  // Set by Backward: tokens run back through blocks (batch * seq * blocks), as ForwardOutput's.
  int64_t tokens = 0;
};

struct OpenSessionArgs {
  std::string session_id;  // "": the engine picks a random one
  std::vector<std::string> block_ids;
  int64_t batch_size = 0;
  int64_t max_length = 0;
  absl::Duration ttl = absl::ZeroDuration();  // 0: EngineOptions::default_session_ttl
  std::string client;                          // the owner
};

struct InferStepArgs {
  std::string session_id;
  std::string client;
  TensorArg hidden_states;       // [batch_size, new_tokens, hidden]
  std::vector<int32_t> hypo_ids;  // empty, or batch_size row indices
  int64_t step_id = 0;           // 0: none; else repeating the last one replays its output
};

struct InferStepOutput {
  TensorOut output;
  int64_t length = 0;  // tokens per row after the step
  int64_t step_id = 0;
  bool replayed = false;  // a retry answered from the last step's output
  int64_t new_tokens = 0;  // tokens appended (batch * new), 0 when replayed
};

struct ForwardOutput {
  TensorOut output;
  std::string activation_id;
  int64_t tokens = 0;
};

struct StepResult {
  double grad_norm = 0;
  bool skipped = false;
  double clip_coefficient = 1;
  std::vector<std::pair<std::string, int64_t>> steps;  // block id, its step counter after
  CollectiveUse collectives;  // a group Step's all-reduces
};

struct JoinGroupArgs {
  std::string group_id;
  int64_t rank = 0;
  int64_t world_size = 0;
  std::string collective_id;
  std::vector<std::string> block_ids;
  absl::Duration timeout = absl::ZeroDuration();  // 0: 60 s
  std::string client;                              // the owner
};

struct GradNormResult {
  double sum_of_squares = 0;
  bool finite = true;
  CollectiveUse collectives;
};

struct NamedTensor {
  std::string name;
  std::vector<int64_t> shape;
  DType dtype = DType::kFloat32;
  std::string bytes;
};

// Everything needed to recreate one block elsewhere (checkpoints).
struct BlockState {
  BlockSpec spec;
  std::optional<AdamWHyper> last_adamw;
  int64_t step = 0;
  std::vector<NamedTensor> weights;         // float32, every parameter
  std::vector<NamedTensor> adam_m, adam_v;  // float32, the trained parameters (none when frozen)
  std::vector<std::string> missing_weights;  // never loaded (their values are zeros)
};

struct EngineStats {
  int64_t blocks = 0;
  int64_t activations_held = 0;
  int64_t sessions_open = 0;
  int64_t groups = 0;
  // Launches of session steps (one per batch, however many sessions it joined), the steps they
  // ran (their ratio is the mean batch size) and the sessions in the latest launch.
  int64_t infer_launches = 0;
  int64_t infer_launched_steps = 0;
  int64_t infer_last_batch_sessions = 0;
  // Of the launches of one session's span on one device (StepGraph): replays of a captured step,
  // captures, and those that ran the blocks' launches one by one (a new key, or capture refused).
  int64_t infer_graph_replays = 0;
  int64_t infer_graph_captures = 0;
  int64_t infer_graph_eager = 0;
  std::map<int, int64_t> memory_used;    // device -> bytes reserved
  std::map<int, int64_t> memory_budget;  // device -> bytes
  // The sessions' KV caches: reserved against the budget at open (per device), and the pages
  // written so far (a page shared by forks or beams counted once).
  std::map<int, int64_t> kv_reserved;  // device -> bytes
  int64_t kv_pages_in_use = 0;
  int64_t kv_bytes_in_use = 0;
};

class Engine {
 public:
  Engine(std::unique_ptr<Backend> backend, EngineOptions options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  Backend& backend() { return *backend_; }
  const EngineOptions& options() const { return options_; }

  // Every call below that names a block, successful or not, renews its lease (CreateBlockParams::ttl);
  // ListBlocks, ExportBlocks and a DeleteBlock with `only_if_idle` only look, so an operator's
  // listing or a periodic checkpoint never keeps an abandoned block alive.
  absl::StatusOr<BlockInfo> CreateBlock(const CreateBlockParams& params);
  // BlockInfo::idle is the idle time as it was before this call renewed the lease.
  absl::StatusOr<BlockInfo> GetBlock(absl::string_view id);
  std::vector<BlockInfo> ListBlocks();
  // Deletes the block and every activation handle that runs through it; returns how many. With
  // `only_if_idle` > 0, only if no call has named the block for that long, judged with the block
  // locked (FAILED_PRECONDITION otherwise, and the lease is not renewed): what a garbage collector
  // that listed idle blocks a moment ago needs, as one of them may have been used since.
  absl::StatusOr<int64_t> DeleteBlock(absl::string_view id, absl::Duration only_if_idle = absl::ZeroDuration());
  // Renews the block's lease, for a call that uses it for long (a LoadWeights stream as its chunks
  // arrive); NOT_FOUND when there is no such block.
  absl::Status RenewLease(absl::string_view id);

  // The parameter table of block `id`, to validate a LoadWeights stream against.
  absl::StatusOr<std::vector<ParamSpec>> BlockParamsOf(absl::string_view id);
  // Writes whole tensors (from a TensorAssembler) atomically; returns their names.
  absl::StatusOr<std::vector<std::string>> LoadWeights(absl::string_view id, std::vector<AssembledTensor> tensors);

  absl::Status Forward(const ForwardArgs& args, ForwardOutput* out);
  // Consumes the handle on success; on a bad request the handle stays usable. `caller` must be the
  // identity that ran the Forward (ForwardArgs::client): for anyone else the handle is NOT_FOUND,
  // as if it did not exist, and stays untouched.
  // `group_id` (optional): the caller's replica group holding exactly the span's blocks; each
  // block's gradients start being averaged over the group as its backward finishes (host
  // collectives; a device collective averages at GradNorm/Step as without it), and the group's
  // next GradNorm or Step takes that mean. Use it for the last micro-batch before a group Step.
  absl::Status Backward(absl::string_view activation_id, absl::string_view caller, const TensorArg& grad_output,
                        TensorOut* grad_input, absl::string_view group_id = "");
  // Frees `caller`'s handle; NOT_FOUND as for Backward.
  absl::Status ReleaseActivations(absl::string_view activation_id, absl::string_view caller);
  absl::Status ZeroGrad(const std::vector<std::string>& block_ids);
  // `clip_coefficient` > 0 scales the gradients by it instead of clipping by max_grad_norm (a
  // client that computed the global norm over daemons with GradNorm); give at most one of them.
  absl::StatusOr<StepResult> Step(const std::vector<std::string>& block_ids, const AdamWHyper& hyper,
                                  double max_grad_norm, double clip_coefficient = 0);
  // A consistent copy of the named tensors (all when `names` is empty) of `kind` in `dtype`. With
  // `unchanged_since`, ABORTED (naming what changed: see CheckTensorsVersion) when the tensors are no
  // longer at that version, checked under the block's lock, so a reader that reads one tensor per
  // call never gets a mix.
  absl::StatusOr<std::vector<NamedTensor>> ReadTensors(absl::string_view id, TensorKind kind, DType dtype,
                                                       const std::vector<std::string>& names,
                                                       const TensorsVersion* unchanged_since = nullptr);
  // The names of block `id`'s tensors of `kind`: `names` checked, or all when empty. A frozen
  // block's parameters have weights only: other kinds are FAILED_PRECONDITION.
  absl::StatusOr<std::vector<std::string>> TensorNames(absl::string_view id, TensorKind kind,
                                                       const std::vector<std::string>& names);
  // The version block `id`'s tensors of `kind` are at (engine/tensors_version.h).
  absl::StatusOr<TensorsVersion> TensorsVersionOf(absl::string_view id, TensorKind kind);
  // OK when block `id`'s tensors of `kind` are still at `version`; else ABORTED saying what changed
  // (the block deleted and created again, or which call changed them) and to read again.
  absl::Status CheckTensorsVersion(absl::string_view id, TensorKind kind, const TensorsVersion& version);

  // A consistent copy of the blocks (all locked at once): weights, moments, steps, specs.
  absl::StatusOr<std::vector<BlockState>> ExportBlocks(const std::vector<std::string>& ids);
  // Creates (or, with `replace`, recreates) the blocks of `states`; all or nothing.
  absl::Status ImportBlocks(const std::vector<BlockState>& states, bool replace);
  std::vector<std::string> BlockIds();

  // Drops handles whose TTL has passed; returns how many.
  int64_t ExpireActivations();
  // Deletes the blocks whose lease has run out, as DeleteBlock does (their handles go too); returns
  // their ids. A block that a call is computing with right now is left for the next sweep.
  std::vector<std::string> ExpireBlocks();
  EngineStats Stats();

  // Inference sessions (engine_sessions.cc; the store in session.h). Every call names `caller`:
  // another identity's session reads as unknown (NOT_FOUND), as activation handles do.
  absl::StatusOr<SessionInfo> OpenSession(const OpenSessionArgs& args);
  absl::Status InferStep(const InferStepArgs& args, InferStepOutput* out);
  absl::StatusOr<SessionInfo> TrimSession(absl::string_view id, absl::string_view caller, int64_t length);
  absl::StatusOr<SessionInfo> ForkSession(absl::string_view id, absl::string_view caller,
                                          absl::string_view new_id);
  absl::Status CloseSession(absl::string_view id, absl::string_view caller);
  std::vector<SessionInfo> ListSessions(absl::string_view caller);
  // Closes the sessions whose TTL has passed; returns how many.
  int64_t ExpireSessions();
  int64_t SessionCount() { return sessions_.size(); }

  // Replica groups (engine_groups.cc; the store in group.h). Collectives come from the providers
  // added here (the server adds Gloo's at start); another identity's group reads as unknown.
  void AddCollectiveProvider(std::unique_ptr<CollectiveProvider> provider);
  // A new collective id on the daemon that will be rank 0. backend "" picks the one for this
  // engine's blocks (Gloo for CPU; NCCL for CUDA, not built yet: UNIMPLEMENTED).
  absl::StatusOr<std::pair<std::string, std::string>> GetCollectiveId(absl::string_view backend,
                                                                      absl::Duration ttl);
  // Blocks until all members joined (or the timeout), then broadcasts rank 0's weights, moments
  // and step counters to every member. Nothing changes on a member unless the broadcast completed.
  absl::StatusOr<GroupInfo> JoinGroup(const JoinGroupArgs& args, CollectiveUse* use);
  absl::Status LeaveGroup(absl::string_view group_id, absl::string_view caller);
  absl::StatusOr<GroupInfo> GetGroup(absl::string_view group_id, absl::string_view caller);
  std::vector<GroupInfo> ListGroups(absl::string_view caller);
  // Step of a group's blocks (`block_ids` empty: all of them, else exactly them): all-reduces the
  // mean of the gradients first, then steps as Step does, identically on every member. ABORTED,
  // with nothing applied, when a collective fails; the group is then failed for good.
  absl::StatusOr<StepResult> GroupStep(absl::string_view group_id, absl::string_view caller,
                                       const std::vector<std::string>& block_ids, const AdamWHyper& hyper,
                                       double max_grad_norm, double clip_coefficient);
  // Sum of squares of the blocks' gradients and whether all are finite; with `group_id`, of the
  // group's mean gradients (what its Step would clip by), computed by every member at once.
  absl::StatusOr<GradNormResult> GradNorm(const std::vector<std::string>& block_ids, absl::string_view group_id,
                                          absl::string_view caller);
  int64_t GroupCount() { return groups_.size(); }

 private:
  struct Entry;
  using EntryPtr = std::shared_ptr<Entry>;
  class SpanLock;
  struct PendingStep;  // engine_sessions.cc

  // Both renew the lease of what they find unless `renew_lease` is false.
  absl::StatusOr<EntryPtr> Find(absl::string_view id, bool renew_lease = true);
  absl::StatusOr<std::vector<EntryPtr>> FindAll(const std::vector<std::string>& ids, bool allow_repeats,
                                                bool renew_lease = true);
  // With e->mu held and e marked deleted: takes it out of the registry and frees the activation
  // handles through it; returns how many.
  int64_t RemoveDeleted(const Entry& e);
  BlockInfo InfoLocked(const Entry& e) const;
  absl::StatusOr<std::vector<int>> TensorIndices(const Entry& e, TensorKind kind,
                                                 const std::vector<std::string>& names) const;
  absl::Status CheckTensorArg(const TensorArg& t, absl::string_view what, int64_t hidden, const Entry& first) const;
  // A request tensor into the backend, from host bytes or peer memory (CUDA IPC); an output back.
  absl::StatusOr<std::unique_ptr<Activation>> UploadArg(int device, const TensorArg& t, int64_t batch, int64_t seq,
                                                        int64_t width);
  absl::Status DownloadOut(const Activation& a, DType dtype, TensorOut* out);
  absl::StatusOr<EntryPtr> NewEntryFromState(const BlockState& state);
  absl::Status RunSpanBackward(ActivationHandle& handle, const TensorArg& grad_output, TensorOut* grad_input,
                               absl::string_view group_id, absl::string_view caller);
  // A Backward's averaging over its group: a thread of host all-reduces (`reduce`), or for a
  // device collective (`on_device`) all-reduces queued beside the backward on the GPU.
  struct Overlap {
    std::shared_ptr<Group> group;
    std::shared_ptr<OverlapReduce> reduce;
    std::vector<size_t> group_index;  // [i]: the group's index of span block i
    bool on_device = false;
  };
  // Backward with a group: the group checked against the span, and its averaging installed.
  absl::StatusOr<Overlap> StartOverlap(absl::string_view group_id, absl::string_view caller,
                                       const std::vector<EntryPtr>& span);
  // The caller's member of the group holding `block_ids` for a group Step or GradNorm (`rpc`),
  // found once: the ABORTED of a Backward's averaging that broke it and that no call reported yet,
  // else the member if it is joined and working, else why not.
  absl::StatusOr<std::shared_ptr<Group>> GroupForCall(absl::string_view group_id, absl::string_view caller,
                                                      const std::vector<std::string>& block_ids, const char* rpc);
  // Hands block `e`'s trained gradients (final for this Backward; its lock held) to the averaging.
  void OverlapBlockReady(OverlapReduce& overlap, size_t group_index, Entry& e);
  // On a device collective, with the group's mu held for the whole Backward: queues block `e`'s
  // all-reduce after its backward; then, the span done (or failed with `s`), waits for them, and
  // the blocks' gradients are the group's mean (or, on failure, dropped and the group broken).
  absl::Status DeviceOverlapBlock(Overlap& overlap, Entry& e);
  absl::Status FinishDeviceOverlap(Overlap& overlap, const std::vector<EntryPtr>& span, absl::Status s);
  // The sum of the locked blocks' GradSquaredNorm, every block's started before the first is read:
  // one wait for the device, not one per block.
  static absl::StatusOr<double> SumGradSquares(const std::vector<EntryPtr>& entries);
  // Step's arithmetic on blocks locked by the caller that all have gradients.
  absl::StatusOr<StepResult> StepLocked(const std::vector<EntryPtr>& entries, const AdamWHyper& hyper,
                                        double max_grad_norm, double clip_coefficient);
  // The group's blocks, checked to be the ones that joined.
  absl::StatusOr<std::vector<EntryPtr>> GroupEntries(const Group& g);
  // With g.mu held: the group's blocks, locked, after every member said it can go on (its blocks
  // exist and have gradients); FAILED_PRECONDITION on every member if one cannot. `*reuse_mean`:
  // whether every member still holds g.mean_grads of its blocks' current gradients.
  absl::Status StartGroupCall(Group& g, std::vector<EntryPtr>* entries, std::unique_ptr<SpanLock>* lock,
                              bool* reuse_mean, CollectiveUse* use) ABSL_EXCLUSIVE_LOCKS_REQUIRED(g.mu);
  // All-reduces the mean of the blocks' gradients (locked by the caller) into `mean`.
  absl::Status ReduceGradients(Group& g, const std::vector<EntryPtr>& entries, std::vector<float>* mean,
                               CollectiveUse* use) ABSL_EXCLUSIVE_LOCKS_REQUIRED(g.mu);
  // A device collective's (NCCL's) way: the blocks' gradients become the mean in place on the GPU;
  // on failure they are discarded (part averaged), weights and moments untouched.
  absl::Status ReduceGradientsInPlace(Group& g, const std::vector<EntryPtr>& entries, CollectiveUse* use)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(g.mu);
  // The provider of "gloo" or "nccl": FAILED_PRECONDITION for NCCL on a daemon without CUDA blocks,
  // UNIMPLEMENTED when this daemon was built without it.
  absl::StatusOr<CollectiveProvider*> ProviderFor(absl::string_view name);
  // Runs the steps of `members` (sessions on `span`, one new_tokens and dtype) as one launch per
  // block and sets each member's status and output; a failure fails every member.
  void RunStepBatch(const std::vector<EntryPtr>& span, const std::vector<PendingStep*>& members);
  // Counts a launch of `sessions` sessions' steps, `rows` rows in all (stats, on_infer_batch).
  void Launched(size_t sessions, int64_t rows);

  std::unique_ptr<Backend> backend_;
  EngineOptions options_;
  MemoryBudget budget_;
  ActivationStore activations_;
  SessionStore sessions_;
  GroupStore groups_;
  StepBatcher<PendingStep> step_batcher_{options_.infer_batch_window};
  std::atomic<int64_t> infer_launches_{0}, infer_launched_steps_{0}, infer_last_batch_sessions_{0};
  std::atomic<int64_t> infer_graph_replays_{0}, infer_graph_captures_{0}, infer_graph_eager_{0};
  absl::Mutex providers_mu_;
  std::map<std::string, std::unique_ptr<CollectiveProvider>, std::less<>> providers_ ABSL_GUARDED_BY(providers_mu_);
  std::shared_ptr<KvPageCounter> kv_pages_ = std::make_shared<KvPageCounter>();  // every session's pages

  absl::Mutex registry_mu_;
  std::map<std::string, EntryPtr, std::less<>> blocks_ ABSL_GUARDED_BY(registry_mu_);
};

// Validates a block id: 1..128 characters of [A-Za-z0-9._:/-].
absl::Status ValidateBlockId(absl::string_view id);
// Validates a spec's layer_index, max_seq_len and max_batch_size ranges, naming the bad field.
absl::Status ValidateSpecRanges(const BlockSpec& spec);
// Validates AdamW hyperparameters and max_grad_norm, naming the bad field.
absl::Status ValidateAdamW(const AdamWHyper& h, double max_grad_norm);
// Validates a Step's clip_coefficient (0: unset, else in (0, 1]) and that max_grad_norm is not also set.
absl::Status ValidateClipCoefficient(double clip_coefficient, double max_grad_norm);

}  // namespace blockd
