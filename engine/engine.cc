#include "engine/engine.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <set>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "engine/engine_internal.h"
#include "engine/init.h"
#include "base/echo.h"
#include "base/log.h"
#include "base/status_macros.h"

namespace blockd {

absl::string_view TensorKindName(TensorKind k) {
  switch (k) {
    case TensorKind::kWeights: return "weights";
    case TensorKind::kGradients: return "gradients";
    case TensorKind::kAdamM: return "adam_m";
    case TensorKind::kAdamV: return "adam_v";
  }
  return "?";
}

namespace {
std::atomic<uint64_t> next_serial{1};

// Whether the block holds any gradient (TrainsParam): a frozen block does not.
bool TrainsAny(const BlockSpec& spec, const std::vector<ParamSpec>& params) {
  return std::any_of(params.begin(), params.end(), [&](const ParamSpec& p) { return TrainsParam(spec, p); });
}
}  // namespace

uint64_t NextBlockSerial() { return next_serial.fetch_add(1); }

absl::Status FrozenError(const BlockSpec& spec, absl::string_view what) {
  return absl::FailedPreconditionError(absl::StrCat(
      "block ", spec.id, " is frozen: it holds weights only, no gradients or AdamW state, so ", what,
      " (create it without frozen to train it)"));
}


Engine::Engine(std::unique_ptr<Backend> backend, EngineOptions options)
    : backend_(std::move(backend)),
      options_(options),
      budget_([&] {
        std::map<int, int64_t> limits;
        for (const DeviceInfo& d : backend_->devices()) {
          limits[d.index] = options.memory_budget_bytes > 0
                                ? options.memory_budget_bytes
                                : static_cast<int64_t>(0.9 * static_cast<double>(d.memory_total_bytes));
        }
        return limits;
      }()) {}

Engine::~Engine() = default;

absl::StatusOr<Engine::EntryPtr> Engine::Find(absl::string_view id, bool renew_lease) {
  EntryPtr e;
  {
    absl::MutexLock lock(&registry_mu_);
    auto it = blocks_.find(id);
    if (it == blocks_.end()) return absl::NotFoundError(absl::StrCat("block ", Echo(id), " not found"));
    e = it->second;
  }
  if (renew_lease) e->lease.Renew(options_.lease_clock());
  return e;
}

absl::StatusOr<std::vector<Engine::EntryPtr>> Engine::FindAll(const std::vector<std::string>& ids,
                                                              bool allow_repeats, bool renew_lease) {
  if (ids.empty()) return absl::InvalidArgumentError("block_ids is empty: name at least one block");
  if (static_cast<int64_t>(ids.size()) > options_.max_span_blocks) {
    return absl::InvalidArgumentError(
        absl::StrCat("block_ids names ", ids.size(), " blocks, at most ", options_.max_span_blocks, " allowed"));
  }
  std::vector<EntryPtr> out;
  std::set<absl::string_view> seen;
  for (const std::string& id : ids) {
    if (!allow_repeats && !seen.insert(id).second) {
      return absl::InvalidArgumentError(absl::StrCat("block_ids names block ", Echo(id), " twice"));
    }
    ASSIGN_OR_RETURN(EntryPtr e, Find(id, renew_lease));
    out.push_back(std::move(e));
  }
  return out;
}

BlockInfo Engine::InfoLocked(const Entry& e) const {
  BlockInfo info;
  info.spec = e.spec;
  info.parameter_count = ParameterCount(e.spec.config, e.spec.lora);
  info.memory_bytes = static_cast<int64_t>(e.block->memory_bytes());
  info.attention = e.block->attention();
  info.missing_weights = e.Missing();
  info.weights_loaded = info.missing_weights.empty();
  info.ttl = e.lease.ttl();
  info.idle = e.lease.Idle(options_.lease_clock());
  absl::MutexLock l(&e.state_mu);
  info.has_gradients = e.has_grad;
  info.step = e.step;
  return info;
}

absl::StatusOr<BlockInfo> Engine::CreateBlock(const CreateBlockParams& params) {
  BlockSpec spec = params.spec;
  RETURN_IF_ERROR(ValidateBlockId(spec.id));
  FillUnsetConfigDefaults(&spec.config);
  RETURN_IF_ERROR(ValidateBlockConfig(spec.config));
  if (spec.lora.requested()) {
    RETURN_IF_ERROR(ValidateLoraConfig(spec.lora, spec.config));
    NormaliseLoraConfig(&spec.lora);
  }
  if (spec.max_seq_len == 0) spec.max_seq_len = options_.default_max_seq_len;
  if (spec.max_batch_size == 0) spec.max_batch_size = options_.default_max_batch_size;
  RETURN_IF_ERROR(ValidateSpecRanges(spec));
  spec.precision = params.precision.value_or(backend_->default_precision());
  RETURN_IF_ERROR(backend_->Supports(spec));
  if (params.ttl < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("ttl = ", absl::FormatDuration(params.ttl), ", expected >= 0 (0: no lease)"));
  }
  {
    absl::MutexLock lock(&registry_mu_);
    if (blocks_.count(spec.id) != 0) {
      return absl::AlreadyExistsError(absl::StrCat("block ", Echo(spec.id), " already exists"));
    }
    if (static_cast<int64_t>(blocks_.size()) >= options_.max_blocks) {
      return absl::ResourceExhaustedError(
          absl::StrCat("the server already holds ", blocks_.size(), " blocks (limit --max_blocks=", options_.max_blocks, ")"));
    }
  }

  auto e = std::make_shared<Entry>(params.ttl, options_.lease_clock());
  e->spec = spec;
  e->serial = NextBlockSerial();
  e->params = BlockParams(spec.config, spec.lora);
  ASSIGN_OR_RETURN(e->reservation, budget_.Reserve(spec.device, static_cast<int64_t>(backend_->BlockBytes(spec)),
                                                   absl::StrCat("block ", spec.id)));
  ASSIGN_OR_RETURN(e->block, backend_->CreateBlock(spec));
  {
    absl::MutexLock l(&e->state_mu);
    e->loaded.assign(e->params.size(), params.seed.has_value());
    // Adapters start as PEFT starts them whether or not the base is seeded: a base imported with
    // LoadWeights is then ready to fine-tune. Unseeded, A's seed comes from the block id.
    for (size_t i = 0; i < e->params.size(); ++i) {
      if (IsLoraParam(e->params[i].id)) e->loaded[i] = true;
    }
  }
  const uint64_t adapter_seed = params.seed.value_or(std::hash<std::string>{}(spec.id));
  for (size_t i = 0; i < e->params.size(); ++i) {
    const bool adapter = IsLoraParam(e->params[i].id);
    if (!params.seed.has_value() && !adapter) continue;
    std::vector<float> w(static_cast<size_t>(e->params[i].numel()));
    InitParam(adapter ? adapter_seed : *params.seed, e->params[i], w.data());
    RETURN_IF_ERROR(e->block->WriteTensor(TensorKind::kWeights, static_cast<int>(i), w.data()));
  }
  absl::MutexLock lock(&registry_mu_);
  if (!blocks_.emplace(spec.id, e).second) {
    return absl::AlreadyExistsError(absl::StrCat("block ", Echo(spec.id), " already exists"));
  }
  return InfoLocked(*e);
}

absl::StatusOr<BlockInfo> Engine::GetBlock(absl::string_view id) {
  // The idle time as it was before this call renewed the lease (after, it would always read 0).
  ASSIGN_OR_RETURN(EntryPtr e, Find(id, /*renew_lease=*/false));
  BlockInfo info = InfoLocked(*e);
  e->lease.Renew(options_.lease_clock());
  return info;
}

std::vector<BlockInfo> Engine::ListBlocks() {
  std::vector<EntryPtr> entries;
  {
    absl::MutexLock lock(&registry_mu_);
    for (const auto& [id, e] : blocks_) entries.push_back(e);
  }
  std::vector<BlockInfo> out;
  for (const EntryPtr& e : entries) out.push_back(InfoLocked(*e));
  return out;
}

std::vector<std::string> Engine::BlockIds() {
  absl::MutexLock lock(&registry_mu_);
  std::vector<std::string> ids;
  for (const auto& [id, e] : blocks_) ids.push_back(id);
  return ids;
}

absl::StatusOr<int64_t> Engine::DeleteBlock(absl::string_view id, absl::Duration only_if_idle) {
  const bool conditional = only_if_idle > absl::ZeroDuration();
  ASSIGN_OR_RETURN(EntryPtr e, Find(id, /*renew_lease=*/!conditional));  // not the lease it judges
  absl::MutexLock block_lock(&e->mu);  // waits for calls running on the block
  {
    absl::MutexLock l(&e->state_mu);
    if (e->deleted) return absl::NotFoundError(absl::StrCat("block ", Echo(id), " not found"));
    // Judged with the block locked: a call that names it from now on finds it deleted.
    const absl::Duration idle = e->lease.Idle(options_.lease_clock());
    if (conditional && idle < only_if_idle) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "block %s was named by a call %.1f s ago, less than the %.1f s it must be idle: not deleted", Echo(id),
          absl::ToDoubleSeconds(idle), absl::ToDoubleSeconds(only_if_idle)));
    }
    e->deleted = true;
  }
  return RemoveDeleted(*e);
}

absl::Status Engine::RenewLease(absl::string_view id) { return Find(id).status(); }

int64_t Engine::RemoveDeleted(const Entry& e) {
  {
    absl::MutexLock lock(&registry_mu_);
    // ImportBlocks may already have put a new block under this id: leave that one.
    auto it = blocks_.find(e.spec.id);
    if (it != blocks_.end() && it->second.get() == &e) blocks_.erase(it);
  }
  sessions_.CloseReferencing(e.serial);  // their K/V came from this block's weights
  groups_.BreakReferencing(e.serial, absl::StrCat("block ", e.spec.id, " was deleted"));
  return activations_.EraseReferencing(e.serial);
}

std::vector<std::string> Engine::ExpireBlocks() {
  std::vector<EntryPtr> candidates;
  {
    const absl::Time now = options_.lease_clock();
    absl::MutexLock lock(&registry_mu_);
    for (const auto& [id, e] : blocks_) {
      if (e->lease.Expired(now)) candidates.push_back(e);
    }
  }
  std::vector<std::string> expired;
  for (const EntryPtr& e : candidates) {
    // A call holding the block is using it even if it started longer than the TTL ago; waiting for
    // it would also stall the sweep behind a long Forward. The next sweep looks again.
    if (!e->mu.TryLock()) continue;
    bool remove;
    {
      absl::MutexLock l(&e->state_mu);
      // A call may have renewed the lease since the scan.
      remove = !e->deleted && e->lease.Expired(options_.lease_clock());
      if (remove) e->deleted = true;
    }
    if (remove) {
      RemoveDeleted(*e);
      expired.push_back(e->spec.id);
    }
    e->mu.Unlock();
  }
  return expired;
}

absl::StatusOr<std::vector<ParamSpec>> Engine::BlockParamsOf(absl::string_view id) {
  ASSIGN_OR_RETURN(EntryPtr e, Find(id));
  return e->params;
}

absl::StatusOr<std::vector<std::string>> Engine::LoadWeights(absl::string_view id,
                                                             std::vector<AssembledTensor> tensors) {
  ASSIGN_OR_RETURN(EntryPtr e, Find(id));
  // Convert and check everything before touching the block. The tensors were staged against the
  // block's parameter table when the stream began; if the block was deleted and created again
  // with another config meanwhile, they no longer fit it.
  std::vector<std::vector<float>> values(tensors.size());
  for (size_t t = 0; t < tensors.size(); ++t) {
    const int index = tensors[t].index;
    if (index < 0 || index >= static_cast<int>(e->params.size()) ||
        tensors[t].bytes.size() != static_cast<size_t>(e->params[index].numel()) * DTypeSize(tensors[t].dtype)) {
      return absl::AbortedError(absl::StrCat("block ", Echo(id),
                                             " was deleted and created again while its weights were streaming; "
                                             "send them again"));
    }
    const ParamSpec& p = e->params[index];
    values[t].resize(static_cast<size_t>(p.numel()));
    ConvertToFloat32(tensors[t].dtype, tensors[t].bytes.data(), values[t].size(), values[t].data());
    if (!AllFinite(values[t].data(), values[t].size())) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", p.name, " has non-finite values"));
    }
  }
  SpanLock lock({e});
  RETURN_IF_ERROR(lock.CheckAlive());
  e->generations.Bump(TensorChange::kLoadWeights);
  std::vector<std::string> names;
  for (size_t t = 0; t < tensors.size(); ++t) {
    RETURN_IF_ERROR(e->block->WriteTensor(TensorKind::kWeights, tensors[t].index, values[t].data()));
    names.push_back(e->params[tensors[t].index].name);
  }
  absl::MutexLock l(&e->state_mu);
  for (const AssembledTensor& t : tensors) e->loaded[t.index] = true;
  return names;
}

absl::Status Engine::CheckTensorArg(const TensorArg& t, absl::string_view what, int64_t hidden,
                                    const Entry& first) const {
  if (t.shape.size() != 3 || t.shape[0] < 1 || t.shape[1] < 1 || t.shape[2] != hidden) {
    return absl::InvalidArgumentError(absl::StrCat(what, " shape ", ShapeString(t.shape), ", block ", first.spec.id,
                                                   " expects [batch>=1,seq>=1,", hidden, "]"));
  }
  const int64_t batch = t.shape[0], seq = t.shape[1];
  if (batch > first.spec.max_batch_size || seq > first.spec.max_seq_len) {
    return absl::InvalidArgumentError(absl::StrCat(what, " shape ", ShapeString(t.shape), " exceeds block ",
                                                   first.spec.id, "'s max_batch_size ", first.spec.max_batch_size,
                                                   " or max_seq_len ", first.spec.max_seq_len));
  }
  const uint64_t expected = static_cast<uint64_t>(batch * seq * hidden) * DTypeSize(t.dtype);
  if (t.size != expected) {
    return absl::InvalidArgumentError(absl::StrCat(what, " has ", t.size, " bytes of data, but shape ",
                                                   ShapeString(t.shape), " of ", DTypeName(t.dtype), " needs ",
                                                   expected));
  }
  return absl::OkStatus();
}

namespace {

// Peer memory (CUDA IPC) is read and written on the device it lives on: the client's tensors
// would otherwise cross between GPUs behind the daemon's back.
absl::Status CheckPeerDevice(const PeerMemory* peer, absl::string_view what, int device, absl::string_view block) {
  if (peer == nullptr || peer->ReachableFrom(device)) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(what, " is CUDA IPC memory on device ", peer->device(),
                                                    ", but block ", Echo(block), " is on device ", device,
                                                    ": register memory of the block's device"));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Activation>> Engine::UploadArg(int device, const TensorArg& t, int64_t batch,
                                                              int64_t seq, int64_t width) {
  if (t.peer != nullptr) return backend_->UploadPeer(device, t.dtype, *t.peer, t.peer_offset, batch, seq, width);
  if (t.read) return backend_->UploadFrom(device, t.dtype, t.read, batch, seq, width);
  return backend_->Upload(device, t.dtype, t.data, batch, seq, width);
}

absl::Status Engine::DownloadOut(const Activation& a, DType dtype, TensorOut* out) {
  if (out->peer != nullptr) return backend_->DownloadPeer(a, dtype, *out->peer, out->peer_offset);
  if (out->write) return backend_->DownloadTo(a, dtype, out->write);
  return backend_->Download(a, dtype, out->data);
}

absl::Status Engine::Forward(const ForwardArgs& args, ForwardOutput* out) {
  ASSIGN_OR_RETURN(std::vector<EntryPtr> span, FindAll(args.block_ids, /*allow_repeats=*/true));
  const BlockConfig& c0 = span[0]->spec.config;
  for (const EntryPtr& e : span) {
    if (e->spec.config.hidden_size != c0.hidden_size) {
      return absl::InvalidArgumentError(absl::StrCat("block ", e->spec.id, " has hidden_size ",
                                                     e->spec.config.hidden_size, ", but block ", span[0]->spec.id,
                                                     " has ", c0.hidden_size, ": a span needs one hidden_size"));
    }
    RETURN_IF_ERROR(CheckTensorArg(args.input, "input", c0.hidden_size, *e));
  }
  if (args.position_offset < 0 || args.position_offset > (int64_t{1} << 40)) {
    return absl::InvalidArgumentError(
        absl::StrCat("position_offset = ", args.position_offset, ", expected 0..", int64_t{1} << 40));
  }
  RETURN_IF_ERROR(CheckPeerDevice(args.input.peer, "input", span.front()->spec.device, span.front()->spec.id));
  RETURN_IF_ERROR(CheckPeerDevice(out->output.peer, "output", span.back()->spec.device, span.back()->spec.id));
  const int64_t batch = args.input.shape[0], seq = args.input.shape[1];
  if (args.keep_activations &&
      activations_.CountForClient(args.client) >= options_.max_activations_per_client) {
    return absl::ResourceExhaustedError(absl::StrCat("client ", Echo(args.client), " already holds ",
                                                     options_.max_activations_per_client,
                                                     " activation handles; call Backward or ReleaseActivations"));
  }

  // The input's host-to-device copy and the output's copy back touch no block state, so they run
  // outside the blocks' locks: one micro-batch's transfers overlap another's compute.
  const absl::Time t_start = absl::Now();
  auto x_or = UploadArg(span[0]->spec.device, args.input, batch, seq, c0.hidden_size);
  if (!x_or.ok()) return absl::Status(x_or.status().code(), absl::StrCat("input ", x_or.status().message()));
  std::unique_ptr<Activation> x = std::move(x_or).value();

  SpanLock lock(span);
  RETURN_IF_ERROR(lock.CheckAlive());
  for (const EntryPtr& e : span) {
    std::vector<std::string> missing = e->Missing();
    if (!missing.empty()) {
      return absl::FailedPreconditionError(absl::StrCat("block ", e->spec.id, " has weights not loaded: ",
                                                        absl::StrJoin(missing, ", ")));
    }
  }
  // A block's forward builds its saved activations whether or not they are kept (then frees them
  // before the next block runs), so a Forward that keeps nothing still needs the largest of them
  // for the duration of the call. Reserving it first turns an input too large for the budget into
  // RESOURCE_EXHAUSTED instead of an allocation failure.
  auto handle = std::make_unique<ActivationHandle>();
  {
    std::map<int, int64_t> per_device;
    for (const EntryPtr& e : span) {
      const int64_t bytes = static_cast<int64_t>(e->block->SavedBytes(batch, seq));
      int64_t& total = per_device[e->spec.device];
      total = args.keep_activations ? total + bytes : std::max(total, bytes);
    }
    for (const auto& [device, bytes] : per_device) {
      ASSIGN_OR_RETURN(MemoryReservation r,
                       budget_.Reserve(device, bytes,
                                       args.keep_activations ? "the activations of this Forward"
                                                             : "the working memory of this Forward"));
      handle->reservations.push_back(std::move(r));
    }
  }

  const absl::Time t_uploaded = absl::Now();
  for (const EntryPtr& e : span) {
    if (x->device() != e->spec.device) {
      ASSIGN_OR_RETURN(x, backend_->ToDevice(*x, e->spec.device));
    }
    std::unique_ptr<SavedActivations> saved;
    ASSIGN_OR_RETURN(x, e->block->Forward(std::move(x), args.position_offset,
                                          args.keep_activations ? &saved : nullptr));
    if (args.keep_activations) handle->saved.push_back(std::move(saved));
  }
  lock.Unlock();  // x is this call's own; work queued on the device runs in order
  const absl::Time t_launched = absl::Now();
  out->output.dtype = args.input.dtype;
  out->output.shape = args.input.shape;
  RETURN_IF_ERROR(DownloadOut(*x, args.input.dtype, &out->output));
  out->tokens = batch * seq * static_cast<int64_t>(span.size());
  BLOCKD_LOG(kDebug, "Forward of ", span.size(), " blocks [", batch, ",", seq, "]: upload ",
             absl::ToDoubleMilliseconds(t_uploaded - t_start), " ms, launch (blocks locked) ",
             absl::ToDoubleMilliseconds(t_launched - t_uploaded), " ms, compute + download ",
             absl::ToDoubleMilliseconds(absl::Now() - t_launched), " ms");

  if (args.keep_activations) {
    for (const EntryPtr& e : span) {
      handle->block_ids.push_back(e->spec.id);
      handle->block_serials.push_back(e->serial);
    }
    handle->batch = batch;
    handle->seq = seq;
    handle->width = c0.hidden_size;
    handle->device = x->device();
    handle->owner = args.client;
    handle->expires = absl::Now() + options_.activation_ttl;
    ASSIGN_OR_RETURN(out->activation_id, activations_.Add(std::move(handle), options_.max_activations_per_client));
  }
  return absl::OkStatus();
}

absl::Status Engine::Backward(absl::string_view activation_id, absl::string_view caller, const TensorArg& grad_output,
                              TensorOut* grad_input, absl::string_view group_id) {
  ASSIGN_OR_RETURN(ActivationHandle * handle, activations_.Acquire(activation_id, caller));
  if (!group_id.empty() && groups_.Find(group_id, caller) == nullptr) {
    activations_.Return(activation_id);  // a bad request: the handle stays usable
    return absl::NotFoundError(absl::StrCat("no group ", Echo(group_id), " on this daemon (JoinGroup first)"));
  }
  absl::Status s;
  try {
    s = RunSpanBackward(*handle, grad_output, grad_input, group_id, caller);
  } catch (...) {
    // A backend allocation failed (the service turns it into RESOURCE_EXHAUSTED): give the handle
    // back rather than leave it marked in use for ever.
    activations_.Return(activation_id);
    throw;
  }
  // A bad request leaves the handle usable; success (or a deleted block) consumes it.
  if (s.ok() || s.code() == absl::StatusCode::kNotFound) {
    activations_.Erase(activation_id);
  } else {
    activations_.Return(activation_id);
  }
  return s;
}

absl::Status Engine::RunSpanBackward(ActivationHandle& h, const TensorArg& grad_output, TensorOut* grad_input,
                                     absl::string_view group_id, absl::string_view caller) {
  const std::vector<int64_t> expected = {h.batch, h.seq, h.width};
  if (grad_output.shape != expected) {
    return absl::InvalidArgumentError(absl::StrCat("grad_output shape ", ShapeString(grad_output.shape),
                                                   ", the forward output was ", ShapeString(expected)));
  }
  const uint64_t bytes = static_cast<uint64_t>(h.batch * h.seq * h.width) * DTypeSize(grad_output.dtype);
  if (grad_output.size != bytes) {
    return absl::InvalidArgumentError(absl::StrCat("grad_output has ", grad_output.size, " bytes of data, but shape ",
                                                   ShapeString(expected), " of ", DTypeName(grad_output.dtype),
                                                   " needs ", bytes));
  }
  std::vector<EntryPtr> span;
  for (size_t i = 0; i < h.block_ids.size(); ++i) {
    auto e = Find(h.block_ids[i]);
    if (!e.ok() || (*e)->serial != h.block_serials[i]) {
      return absl::NotFoundError(absl::StrCat("block ", h.block_ids[i], " was deleted after this Forward"));
    }
    span.push_back(*std::move(e));
  }
  RETURN_IF_ERROR(CheckPeerDevice(grad_output.peer, "grad_output", h.device, span.back()->spec.id));
  RETURN_IF_ERROR(CheckPeerDevice(grad_input->peer, "grad_input", span.front()->spec.device, span.front()->spec.id));
  // As in Forward, the transfers run outside the blocks' locks.
  const absl::Time t_start = absl::Now();
  auto g_or = UploadArg(h.device, grad_output, h.batch, h.seq, h.width);
  if (!g_or.ok()) return absl::Status(g_or.status().code(), absl::StrCat("grad_output ", g_or.status().message()));
  std::unique_ptr<Activation> g = std::move(g_or).value();
  // Last of the checks: from here a Backward naming a group has its averaging under way, and a
  // failure below leaves the group broken (the other members' averaging waits for this one's).
  Overlap overlap;
  // On a device collective the averaging is this Backward's own (a collective call, as Step is):
  // the group's collective is its until it returns, taken before the blocks' locks as group calls do.
  std::unique_ptr<absl::MutexLock> group_lock;
  if (!group_id.empty()) {
    ASSIGN_OR_RETURN(overlap, StartOverlap(group_id, caller, span));
    if (overlap.on_device) group_lock = std::make_unique<absl::MutexLock>(&overlap.group->mu);
  }
  // However this Backward ends before its last block (a status or an exception), the averaging
  // stops waiting, and the group is failed here as on the members whose averaging waits for ours.
  bool handed_all = false;
  absl::Cleanup abandon = [&] {
    if (overlap.group == nullptr || handed_all) return;
    if (overlap.reduce != nullptr) overlap.reduce->Cancel();
    overlap.group->Break("a Backward averaging over the group failed before its last block");
  };
  SpanLock lock(span);
  const absl::Time t_locked = absl::Now();
  absl::Status s = lock.CheckAlive();
  for (size_t i = span.size(); s.ok() && i-- > 0;) {
    Entry& e = *span[i];
    if (g->device() != e.spec.device) {
      absl::StatusOr<std::unique_ptr<Activation>> moved = backend_->ToDevice(*g, e.spec.device);
      if (!moved.ok()) {
        s = moved.status();
        break;
      }
      g = *std::move(moved);
    }
    e.generations.Bump(TensorChange::kBackward);
    absl::StatusOr<std::unique_ptr<Activation>> next = e.block->Backward(*h.saved[i], *g, /*accumulate=*/e.HasGrad());
    if (!next.ok()) {
      s = next.status();
      break;
    }
    g = *std::move(next);
    if (TrainsAny(e.spec, e.params)) e.SetHasGrad(true);  // a frozen block only passes dL/dx on
    if (overlap.reduce != nullptr) OverlapBlockReady(*overlap.reduce, overlap.group_index[i], e);
    if (overlap.on_device) s = DeviceOverlapBlock(overlap, e);
  }
  if (overlap.on_device) s = FinishDeviceOverlap(overlap, span, s);
  if (!s.ok()) return s;
  handed_all = true;
  lock.Unlock();
  group_lock.reset();
  const absl::Time t_launched = absl::Now();
  grad_input->tokens = h.batch * h.seq * static_cast<int64_t>(span.size());
  grad_input->dtype = grad_output.dtype;
  grad_input->shape = expected;
  RETURN_IF_ERROR(DownloadOut(*g, grad_output.dtype, grad_input));
  BLOCKD_LOG(kDebug, "Backward of ", span.size(), " blocks [", h.batch, ",", h.seq, "]: upload + wait for the blocks ",
             absl::ToDoubleMilliseconds(t_locked - t_start), " ms, launch (blocks locked) ",
             absl::ToDoubleMilliseconds(t_launched - t_locked), " ms, compute + download ",
             absl::ToDoubleMilliseconds(absl::Now() - t_launched), " ms");
  return absl::OkStatus();
}

absl::Status Engine::ReleaseActivations(absl::string_view activation_id, absl::string_view caller) {
  ASSIGN_OR_RETURN(ActivationHandle * handle, activations_.Acquire(activation_id, caller));
  (void)handle;
  activations_.Erase(activation_id);
  return absl::OkStatus();
}

absl::Status Engine::ZeroGrad(const std::vector<std::string>& block_ids) {
  ASSIGN_OR_RETURN(std::vector<EntryPtr> entries, FindAll(block_ids, /*allow_repeats=*/true));
  for (const EntryPtr& e : entries) {
    if (!TrainsAny(e->spec, e->params)) return FrozenError(e->spec, "ZeroGrad has nothing to clear");
  }
  SpanLock lock(entries);
  RETURN_IF_ERROR(lock.CheckAlive());
  for (const EntryPtr& e : entries) {
    if (e->HasGrad()) e->generations.Bump(TensorChange::kZeroGrad);
    e->SetHasGrad(false);
  }
  return absl::OkStatus();
}

absl::StatusOr<StepResult> Engine::Step(const std::vector<std::string>& block_ids, const AdamWHyper& hyper,
                                        double max_grad_norm, double clip_coefficient) {
  RETURN_IF_ERROR(ValidateAdamW(hyper, max_grad_norm));
  RETURN_IF_ERROR(ValidateClipCoefficient(clip_coefficient, max_grad_norm));
  ASSIGN_OR_RETURN(std::vector<EntryPtr> entries, FindAll(block_ids, /*allow_repeats=*/false));
  for (const EntryPtr& e : entries) {
    if (!TrainsAny(e->spec, e->params)) return FrozenError(e->spec, "Step has nothing to update");
  }
  SpanLock lock(entries);
  RETURN_IF_ERROR(lock.CheckAlive());
  for (const EntryPtr& e : entries) {
    if (!e->HasGrad()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "block ", e->spec.id, " has no gradients: run Backward through it first (Step and ZeroGrad clear them)"));
    }
  }
  return StepLocked(entries, hyper, max_grad_norm, clip_coefficient);
}

absl::StatusOr<double> Engine::SumGradSquares(const std::vector<EntryPtr>& entries) {
  absl::Status s;
  size_t started = 0;
  for (; started < entries.size(); ++started) {
    s = entries[started]->block->StartGradSquaredNorm();
    if (!s.ok()) break;
  }
  // Every started sum is read, even after a failure, so that none is left for a later read.
  double sum = 0;
  for (size_t i = 0; i < started; ++i) {
    absl::StatusOr<double> ss = entries[i]->block->GradSquaredNorm();
    if (ss.ok()) {
      sum += *ss;
    } else if (s.ok()) {
      s = ss.status();
    }
  }
  if (!s.ok()) return s;
  return sum;
}

absl::StatusOr<StepResult> Engine::StepLocked(const std::vector<EntryPtr>& entries, const AdamWHyper& hyper,
                                              double max_grad_norm, double clip_coefficient) {
  const absl::Time t_start = absl::Now();
  ASSIGN_OR_RETURN(const double sum_squares, SumGradSquares(entries));
  const absl::Time t_norm = absl::Now();
  StepResult result;
  result.grad_norm = std::sqrt(sum_squares);
  if (!std::isfinite(result.grad_norm)) {
    result.skipped = true;
    result.clip_coefficient = 0;
    for (const EntryPtr& e : entries) {
      absl::MutexLock l(&e->state_mu);
      result.steps.emplace_back(e->spec.id, e->step);
    }
    return result;
  }
  // As torch.nn.utils.clip_grad_norm_: coefficient max_norm / (norm + 1e-6), applied only below 1.
  if (max_grad_norm > 0) result.clip_coefficient = std::min(1.0, max_grad_norm / (result.grad_norm + 1e-6));
  if (clip_coefficient > 0) result.clip_coefficient = clip_coefficient;
  for (const EntryPtr& e : entries) {
    int64_t step;
    {
      absl::MutexLock l(&e->state_mu);
      step = e->step + 1;
    }
    e->generations.Bump(TensorChange::kStep);
    RETURN_IF_ERROR(e->block->AdamWStep({hyper, step, static_cast<float>(result.clip_coefficient)}));
    absl::MutexLock l(&e->state_mu);
    e->step = step;
    e->has_grad = false;
    e->last_adamw = hyper;
    result.steps.emplace_back(e->spec.id, step);
  }
  // The updates are queued on the blocks' devices, not waited for: the reply goes while they run,
  // and every later call on these blocks queues its work after them.
  BLOCKD_LOG(kDebug, "Step of ", entries.size(), " blocks: gradient norm ", absl::ToDoubleMilliseconds(t_norm - t_start),
             " ms, AdamW queued in ", absl::ToDoubleMilliseconds(absl::Now() - t_norm), " ms");
  return result;
}

int64_t Engine::ExpireActivations() { return activations_.Expire(absl::Now()); }

EngineStats Engine::Stats() {
  EngineStats s;
  {
    absl::MutexLock lock(&registry_mu_);
    s.blocks = static_cast<int64_t>(blocks_.size());
  }
  s.activations_held = activations_.size();
  s.sessions_open = sessions_.size();
  s.groups = groups_.size();
  s.kv_reserved = sessions_.ReservedBytes();
  s.infer_launches = infer_launches_.load();
  s.infer_launched_steps = infer_launched_steps_.load();
  s.infer_last_batch_sessions = infer_last_batch_sessions_.load();
  s.infer_graph_replays = infer_graph_replays_.load();
  s.infer_graph_captures = infer_graph_captures_.load();
  s.infer_graph_eager = infer_graph_eager_.load();
  for (const DeviceInfo& d : backend_->devices()) {
    s.memory_used[d.index] = budget_.used(d.index);
    s.memory_budget[d.index] = budget_.limit(d.index);
    s.kv_reserved.emplace(d.index, 0);
  }
  s.kv_pages_in_use = kv_pages_->pages;
  s.kv_bytes_in_use = kv_pages_->bytes;
  return s;
}

}  // namespace blockd
