// The replica-group calls of the Engine: collective ids, JoinGroup (connect, then broadcast rank
// 0's state), GroupStep (all-reduce the mean of the gradients, then the ordinary step), GradNorm,
// LeaveGroup, GetGroup, ListGroups. Groups live in a GroupStore (group.h); the bytes move through
// a Collective (collective.h) of the provider that recognises the collective id: NCCL's for CUDA
// blocks (gradients reduced in place on the GPU), Gloo's for CPU blocks (and for CUDA blocks whose
// members share one GPU, when asked for by name: their gradients then travel through host memory).
//
// Every collective call of a group runs with the group's `mu` held, then the blocks' locks: all
// members call the same collectives in the same order. Before touching data, a group call first
// all-reduces one flag saying whether this member can go on (its blocks exist, have gradients),
// so that a member refusing makes every member refuse at once instead of leaving the others to
// time out. Nothing is written to a block until every collective of the call has completed.
#include <algorithm>
#include <cmath>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/match.h"
#include "absl/strings/str_join.h"
#include "base/echo.h"
#include "base/status_macros.h"
#include "engine/engine.h"
#include "engine/engine_internal.h"

namespace blockd {
namespace {

constexpr absl::Duration kDefaultGroupTimeout = absl::Seconds(60);
constexpr absl::Duration kMaxGroupTimeout = absl::Hours(1);
constexpr int64_t kMaxWorldSize = 1024;
// Gradients are all-reduced in buckets of this many floats (16 MiB), as DDP's buckets.
constexpr size_t kBucketFloats = size_t{4} << 20;

absl::Status ValidateGroupId(absl::string_view id) {
  const bool ok = !id.empty() && id.size() <= 128 && std::all_of(id.begin(), id.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
           c == ':' || c == '/' || c == '-';
  });
  if (ok) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("group_id ", Echo(id), " is not valid: expected 1..128 characters of [A-Za-z0-9._:/-]"));
}

// Runs one collective and accounts for it; a failure breaks the group for good.
template <class Fn>
absl::Status Timed(Group& g, CollectiveUse* use, size_t bytes, Fn fn) {
  const absl::Time start = absl::Now();
  absl::Status s = fn();
  use->seconds += absl::ToDoubleSeconds(absl::Now() - start);
  ++use->calls;
  if (!s.ok()) {
    use->aborted = true;
    g.Break(s.message());
    return absl::AbortedError(absl::StrCat("group ", g.id, ": ", s.message(), "; nothing was applied on this member, "
                                           "and the group is failed: LeaveGroup, then join a new group"));
  }
  use->bytes += static_cast<int64_t>(bytes);
  g.payload_bytes += static_cast<int64_t>(bytes);
  return absl::OkStatus();
}

// What every member must agree on, in words (compared byte for byte; shown when they differ).
// The backend is among them: a group is all CUDA blocks or all CPU blocks. Blocks pair up by
// position, each with its layer index and shape; not by id, since members on one daemon (one per
// GPU) hold the same layers under different ids.
template <class Entries>
std::string TermsOf(int64_t world_size, absl::string_view backend, const Entries& entries) {
  std::vector<std::string> blocks;
  for (const auto& e : entries) {
    const BlockConfig& c = e->spec.config;
    int64_t params = 0;
    for (const ParamSpec& p : e->params) params += p.numel();
    blocks.push_back(absl::StrCat("layer ", e->spec.layer_index, " (hidden ", c.hidden_size, ", heads ", c.num_attention_heads, "/",
                                  c.num_kv_heads, "x", c.head_dim, ", intermediate ", c.intermediate_size, ", ",
                                  e->params.size(), " tensors, ", params, " parameters)"));
  }
  return absl::StrCat("world_size ", world_size, " and ", backend, " blocks [", absl::StrJoin(blocks, ", "), "]");
}

// Whether a group moves parameter i's tensor of `kind` between members: weights always; gradients
// and moments only where the block trains the parameter (on a frozen block, its LoRA adapters).
bool Synced(const BlockSpec& spec, const ParamSpec& param, TensorKind kind) {
  return kind == TensorKind::kWeights || TrainsParam(spec, param);
}

// Floats of a block's trained gradients: what a group averages of it.
template <class Entry>
size_t TrainedGradientFloats(const Entry& e) {
  size_t n = 0;
  for (const ParamSpec& p : e.params) n += Synced(e.spec, p, TensorKind::kGradients) ? static_cast<size_t>(p.numel()) : 0;
  return n;
}

// Those gradients into `out` (TrainedGradientFloats of them), the parameters in order.
template <class Entry>
absl::Status ReadTrainedGradients(const Entry& e, float* out) {
  for (size_t i = 0; i < e.params.size(); ++i) {
    if (!Synced(e.spec, e.params[i], TensorKind::kGradients)) continue;
    RETURN_IF_ERROR(e.block->ReadTensor(TensorKind::kGradients, static_cast<int>(i), out));
    out += e.params[i].numel();
  }
  return absl::OkStatus();
}

// n floats become their mean over the group, in place: sums all-reduced in buckets, then divided
// by the world size. Every member divides the same sums by the same number: the means agree bit
// for bit.
absl::Status AllReduceMean(Group& g, CollectiveUse* use, float* data, size_t n) {
  for (size_t begin = 0; begin < n; begin += kBucketFloats) {
    const size_t count = std::min(kBucketFloats, n - begin);
    RETURN_IF_ERROR(Timed(g, use, count * sizeof(float), [&] { return g.collective->AllReduceSum(data + begin, count); }));
  }
  const float members = static_cast<float>(g.world_size);
  for (size_t i = 0; i < n; ++i) data[i] /= members;
  return absl::OkStatus();
}

}  // namespace

OverlapReduce::OverlapReduce(Group* g, std::vector<size_t> sizes)
    : sizes_(std::move(sizes)), has_(sizes_.size(), false), versions_(sizes_.size()) {
  size_t total = 0;
  for (size_t n : sizes_) {
    offsets_.push_back(total);
    total += n;
  }
  mean_.assign(total, 0.f);
  absl::MutexLock l(&join_mu_);
  thread_ = std::thread([this, g] { Run(g); });
}

void OverlapReduce::Ready(size_t k, std::pair<uint64_t, uint64_t> version) {
  absl::MutexLock l(&mu_);
  versions_[k] = version;
  has_[k] = true;
  cv_.SignalAll();
}

void OverlapReduce::Cancel() {
  absl::MutexLock l(&mu_);
  cancelled_ = true;
  cv_.SignalAll();
}

void OverlapReduce::Stop() {
  Cancel();
  absl::MutexLock l(&join_mu_);
  if (thread_.joinable()) thread_.join();
}

absl::Status OverlapReduce::Finish(std::vector<float>* mean, std::vector<std::pair<uint64_t, uint64_t>>* of,
                                   CollectiveUse* use) {
  {
    absl::MutexLock l(&join_mu_);
    if (thread_.joinable()) thread_.join();
  }
  use->Take(use_);
  if (!status_.ok()) return status_;
  *mean = std::move(mean_);
  absl::MutexLock l(&mu_);
  *of = versions_;
  return absl::OkStatus();
}

void OverlapReduce::Run(Group* g) {
  // Last block first: a span's backward hands them over in that order, so each block's all-reduce
  // runs while the blocks before it compute theirs.
  for (size_t k = sizes_.size(); k-- > 0;) {
    {
      absl::MutexLock l(&mu_);
      while (!has_[k] && !cancelled_) cv_.Wait(&mu_);
      if (!has_[k]) {
        status_ = absl::CancelledError("the Backward that started the group's averaging failed before its end");
        return;
      }
    }
    status_ = AllReduceMean(*g, &use_, Slot(k), sizes_[k]);
    if (!status_.ok()) return;
  }
}

void Engine::AddCollectiveProvider(std::unique_ptr<CollectiveProvider> provider) {
  absl::MutexLock l(&providers_mu_);
  const std::string name(provider->backend());
  providers_[name] = std::move(provider);
}

absl::StatusOr<CollectiveProvider*> Engine::ProviderFor(absl::string_view name) {
  if (name == "nccl" && backend_->name() != "cuda") {
    return absl::FailedPreconditionError(absl::StrCat(
        "NCCL collectives reduce GPU memory, and this daemon's blocks are on the ", backend_->name(),
        " backend: a group of CPU blocks uses \"gloo\" (a group is all CUDA or all CPU members)"));
  }
  absl::MutexLock l(&providers_mu_);
  auto it = providers_.find(name);
  if (it != providers_.end()) return it->second.get();
  return absl::UnimplementedError(absl::StrCat("this daemon has no ", name == "nccl" ? "NCCL" : "Gloo",
                                               " collectives (built without them)"));
}

absl::StatusOr<std::pair<std::string, std::string>> Engine::GetCollectiveId(absl::string_view backend,
                                                                            absl::Duration ttl) {
  std::string name(backend);
  if (name.empty()) name = backend_->name() == "cuda" ? "nccl" : "gloo";
  if (name != "gloo" && name != "nccl") {
    return absl::InvalidArgumentError(
        absl::StrCat("backend \"", Echo(backend), "\", expected \"gloo\", \"nccl\" or \"\" (the blocks' own)"));
  }
  ASSIGN_OR_RETURN(CollectiveProvider * provider, ProviderFor(name));
  ASSIGN_OR_RETURN(std::string id, provider->NewId(ttl));
  return std::make_pair(std::move(id), name);
}

absl::StatusOr<GroupInfo> Engine::JoinGroup(const JoinGroupArgs& args, CollectiveUse* use) {
  RETURN_IF_ERROR(ValidateGroupId(args.group_id));
  if (args.world_size < 1 || args.world_size > kMaxWorldSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("world_size = ", args.world_size, ", expected 1..", kMaxWorldSize));
  }
  if (args.rank < 0 || args.rank >= args.world_size) {
    return absl::InvalidArgumentError(absl::StrCat("rank = ", args.rank, ", expected 0..", args.world_size - 1,
                                                   " for world_size ", args.world_size));
  }
  if (args.timeout < absl::ZeroDuration() || args.timeout > kMaxGroupTimeout) {
    return absl::InvalidArgumentError(absl::StrCat("timeout_ms = ", absl::ToInt64Milliseconds(args.timeout),
                                                   ", expected 0..", absl::ToInt64Milliseconds(kMaxGroupTimeout),
                                                   " (0: 60000)"));
  }
  if (args.block_ids.empty()) {
    return absl::InvalidArgumentError("block_ids is empty: name the blocks this member holds for the group");
  }
  if (args.collective_id.empty()) {
    return absl::InvalidArgumentError("collective_id is empty: ask rank 0's daemon with GetCollectiveId");
  }
  // The id says its library; anything else is Gloo's to parse (and refuse with the expected form).
  ASSIGN_OR_RETURN(CollectiveProvider * provider,
                   ProviderFor(absl::StartsWith(args.collective_id, "blockd-nccl/") ? "nccl" : "gloo"));
  ASSIGN_OR_RETURN(std::vector<EntryPtr> entries, FindAll(args.block_ids, /*allow_repeats=*/false));
  // One NCCL communicator drives one GPU: a member's blocks are all on it.
  int device = -1;
  if (provider->backend() == "nccl") {
    device = entries[0]->spec.device;
    for (const EntryPtr& e : entries) {
      if (e->spec.device == device) continue;
      return absl::InvalidArgumentError(absl::StrCat(
          "block ", entries[0]->spec.id, " is on GPU ", device, " and block ", e->spec.id, " on GPU ",
          e->spec.device, ": an NCCL group member's blocks are on one GPU (a GPU per member: join one group "
          "member per GPU)"));
    }
  }
  if (args.rank == 0) {
    for (const EntryPtr& e : entries) {
      const std::vector<std::string> missing = e->Missing();
      if (!missing.empty()) {
        return absl::FailedPreconditionError(absl::StrCat("block ", e->spec.id, " of rank 0 lacks weights (",
                                                          absl::StrJoin(missing, ", "),
                                                          "): rank 0's weights are what the join broadcasts"));
      }
    }
  }
  auto g = std::make_shared<Group>();
  g->owner = args.client;
  g->id = args.group_id;
  g->rank = static_cast<int>(args.rank);
  g->world_size = static_cast<int>(args.world_size);
  g->backend = std::string(provider->backend());
  g->block_ids = args.block_ids;
  for (const EntryPtr& e : entries) g->block_serials.push_back(e->serial);
  g->timeout = args.timeout == absl::ZeroDuration() ? kDefaultGroupTimeout : args.timeout;
  RETURN_IF_ERROR(groups_.Add(g, options_.max_groups_per_client));
  auto fail = [&](absl::Status s) {
    groups_.RemoveMember(g);
    return s;
  };

  absl::MutexLock group_lock(&g->mu);
  const absl::Time start = absl::Now();
  absl::StatusOr<std::unique_ptr<Collective>> c =
      provider->Connect(args.collective_id, g->rank, g->world_size,
                        TermsOf(args.world_size, backend_->name(), entries), g->timeout, device);
  use->seconds += absl::ToDoubleSeconds(absl::Now() - start);
  if (!c.ok()) {
    use->aborted = c.status().code() == absl::StatusCode::kAborted;
    return fail(c.status());
  }
  g->collective = *std::move(c);

  // Rank 0's weights, moments and step counters, as one header and one flat buffer.
  SpanLock lock(entries);
  absl::Status alive = lock.CheckAlive();
  if (!alive.ok()) return fail(alive);
  size_t total = 0;
  for (const EntryPtr& e : entries) {
    for (const ParamSpec& p : e->params) total += (TrainsParam(e->spec, p) ? 3 : 1) * static_cast<size_t>(p.numel());
  }
  std::vector<int64_t> steps(entries.size(), 0);
  std::vector<float> state(total);
  constexpr TensorKind kKinds[] = {TensorKind::kWeights, TensorKind::kAdamM, TensorKind::kAdamV};
  if (g->rank == 0) {
    size_t off = 0;
    for (size_t b = 0; b < entries.size(); ++b) {
      {
        absl::MutexLock l(&entries[b]->state_mu);
        steps[b] = entries[b]->step;
      }
      for (TensorKind kind : kKinds) {
        for (size_t i = 0; i < entries[b]->params.size(); ++i) {
          if (!Synced(entries[b]->spec, entries[b]->params[i], kind)) continue;
          absl::Status s = entries[b]->block->ReadTensor(kind, static_cast<int>(i), state.data() + off);
          if (!s.ok()) return fail(s);
          off += static_cast<size_t>(entries[b]->params[i].numel());
        }
      }
    }
  }
  absl::Status s = Timed(*g, use, steps.size() * sizeof(int64_t), [&] {
    return g->collective->Broadcast(steps.data(), steps.size() * sizeof(int64_t), 0);
  });
  if (s.ok()) {
    s = Timed(*g, use, state.size() * sizeof(float),
              [&] { return g->collective->Broadcast(state.data(), state.size() * sizeof(float), 0); });
  }
  if (!s.ok()) return fail(s);
  if (g->rank != 0) {
    size_t off = 0;
    for (size_t b = 0; b < entries.size(); ++b) {
      Entry& e = *entries[b];
      e.generations.Bump(TensorChange::kLoadWeights);
      e.generations.Bump(TensorChange::kStep);
      for (TensorKind kind : kKinds) {
        for (size_t i = 0; i < e.params.size(); ++i) {
          if (!Synced(e.spec, e.params[i], kind)) continue;
          // The CPU backend's writes cannot fail; a backend's that could would leave this member
          // half-written, so the group is failed rather than used.
          absl::Status w = e.block->WriteTensor(kind, static_cast<int>(i), state.data() + off);
          if (!w.ok()) return fail(w);
          off += static_cast<size_t>(e.params[i].numel());
        }
      }
      absl::MutexLock l(&e.state_mu);
      e.step = steps[b];
      std::fill(e.loaded.begin(), e.loaded.end(), true);
    }
  }
  g->joined = true;
  return InfoOf(*g);
}

absl::Status Engine::LeaveGroup(absl::string_view group_id, absl::string_view caller) {
  if (groups_.Remove(group_id, caller) == 0) {
    return absl::NotFoundError(absl::StrCat("no group ", Echo(group_id), " on this daemon"));
  }
  return absl::OkStatus();
}

absl::StatusOr<GroupInfo> Engine::GetGroup(absl::string_view group_id, absl::string_view caller) {
  std::shared_ptr<Group> g = groups_.Find(group_id, caller);
  if (g == nullptr) return absl::NotFoundError(absl::StrCat("no group ", Echo(group_id), " on this daemon"));
  return InfoOf(*g);
}

std::vector<GroupInfo> Engine::ListGroups(absl::string_view caller) {
  std::vector<GroupInfo> out;
  for (const std::shared_ptr<Group>& g : groups_.OwnedBy(caller)) out.push_back(InfoOf(*g));
  return out;
}

absl::StatusOr<std::vector<Engine::EntryPtr>> Engine::GroupEntries(const Group& g) {
  ASSIGN_OR_RETURN(std::vector<EntryPtr> entries, FindAll(g.block_ids, /*allow_repeats=*/false));
  for (size_t i = 0; i < entries.size(); ++i) {
    if (entries[i]->serial != g.block_serials[i]) {
      return absl::FailedPreconditionError(absl::StrCat("block ", g.block_ids[i], " was deleted and created again ",
                                                        "since group ", g.id, " formed: join a new group"));
    }
  }
  return entries;
}

absl::Status Engine::ReduceGradients(Group& g, const std::vector<EntryPtr>& entries, std::vector<float>* mean,
                                     CollectiveUse* use) {
  if (g.collective->on_device()) return ReduceGradientsInPlace(g, entries, use);
  size_t total = 0;
  for (const EntryPtr& e : entries) total += TrainedGradientFloats(*e);
  mean->assign(total, 0.f);
  size_t off = 0;
  for (const EntryPtr& e : entries) {
    RETURN_IF_ERROR(ReadTrainedGradients(*e, mean->data() + off));
    off += TrainedGradientFloats(*e);
  }
  return AllReduceMean(g, use, mean->data(), total);
}

absl::Status Engine::ReduceGradientsInPlace(Group& g, const std::vector<EntryPtr>& entries, CollectiveUse* use) {
  std::vector<DeviceGradients> grads;
  for (const EntryPtr& e : entries) {
    grads.push_back(e->block->device_gradients());
    if (grads.back().data == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat("block ", e->spec.id, " holds no gradients on a GPU for ",
                                                        g.collective->backend(), " to reduce"));
    }
  }
  // One call per block: its gradients are one buffer, NCCL's own chunks pipeline it.
  for (size_t b = 0; b < entries.size(); ++b) {
    entries[b]->generations.Bump(TensorChange::kBackward);  // they become the group's mean
    absl::Status s = Timed(g, use, grads[b].count * sizeof(float), [&] {
      return g.collective->AllReduceMeanOnDevice(grads[b].data, grads[b].count, grads[b].stream);
    });
    if (!s.ok()) {
      // Weights and moments are untouched, but the gradients are part averaged: not this member's.
      for (const EntryPtr& e : entries) e->SetHasGrad(false);
      return absl::Status(s.code(), absl::StrCat(s.message(), "; the gradients were being averaged in place on the "
                                                 "GPU and are discarded: run Backward again"));
    }
  }
  return absl::OkStatus();
}

namespace {

// The member a call found, if it is joined and working; else why not.
absl::StatusOr<std::shared_ptr<Group>> Usable(std::shared_ptr<Group> g) {
  if (!g->joined) return absl::FailedPreconditionError(absl::StrCat("group ", g->id, " is still joining"));
  if (g->broken) {
    return absl::FailedPreconditionError(absl::StrCat("group ", g->id, " failed (", g->Failure(),
                                                      "): LeaveGroup, then join a new group with a new collective id"));
  }
  return g;
}

// All members say at once whether they can go on: FAILED_PRECONDITION everywhere if one cannot.
// In the same all-reduce they say whether they hold the group's cached mean gradients of their
// current gradients; `*all_have_mean` only if every one does, so all take the same collectives.
absl::Status Agree(Group& g, const absl::Status& local, bool have_mean, bool* all_have_mean, CollectiveUse* use) {
  double counts[2] = {local.ok() ? 0.0 : 1.0, have_mean ? 0.0 : 1.0};  // refusals, members without
  RETURN_IF_ERROR(Timed(g, use, sizeof(counts), [&] { return g.collective->AllReduceSum(counts, 2); }));
  *all_have_mean = counts[1] == 0;
  if (!local.ok()) return local;
  if (counts[0] > 0) {
    return absl::FailedPreconditionError(absl::StrCat(counts[0], " other member(s) of group ", g.id,
                                                      " refused this call (see their answers); nothing changed"));
  }
  return absl::OkStatus();
}

// Which gradients a cached mean was reduced from: each block's serial and gradient generation.
template <class Entries>
std::vector<std::pair<uint64_t, uint64_t>> GradientVersions(const Entries& entries) {
  std::vector<std::pair<uint64_t, uint64_t>> out;
  for (const auto& e : entries) out.emplace_back(e->serial, e->generations.Of(TensorKind::kGradients));
  return out;
}

}  // namespace

absl::StatusOr<Engine::Overlap> Engine::StartOverlap(absl::string_view group_id, absl::string_view caller,
                                                     const std::vector<EntryPtr>& span) {
  std::vector<std::string> ids;
  for (const EntryPtr& e : span) ids.push_back(e->spec.id);
  ASSIGN_OR_RETURN(std::shared_ptr<Group> found, groups_.FindMember(group_id, caller, ids, "Backward"));
  ASSIGN_OR_RETURN(std::shared_ptr<Group> g, Usable(std::move(found)));
  if (ids.size() != g->block_ids.size()) {
    return absl::InvalidArgumentError(absl::StrCat("the span names a block of group ", g->id,
                                                   " twice: a Backward that averages over the group runs each of "
                                                   "its blocks once"));
  }
  absl::MutexLock group_lock(&g->mu);
  Overlap out;
  out.group = g;
  if (g->collective->on_device()) {
    // In place on the GPU, within the Backward (DeviceOverlapBlock): every member queues each
    // block's all-reduce as its backward is queued, so the blocks must come in the group's order.
    for (size_t i = 0; i < span.size(); ++i) {
      if (span[i]->spec.id != g->block_ids[i]) {
        return absl::InvalidArgumentError(absl::StrCat(
            "a Backward that averages over ", g->collective->backend(), " group ", g->id, " runs its blocks in the ",
            "group's order [", absl::StrJoin(g->block_ids, ", "), "]; block ", i, " of the span is ", span[i]->spec.id));
      }
      if (span[i]->block->device_gradients().data == nullptr) {
        return absl::FailedPreconditionError(
            absl::StrCat("block ", span[i]->spec.id, " holds no gradients on a GPU to average"));
      }
    }
    g->mean_grads = {};
    g->mean_grads_of.clear();
    g->mean_in_place = false;
    out.on_device = true;
    return out;
  }
  ASSIGN_OR_RETURN(std::vector<EntryPtr> entries, GroupEntries(*g));
  std::vector<size_t> sizes;
  for (const EntryPtr& e : entries) sizes.push_back(TrainedGradientFloats(*e));
  for (const EntryPtr& e : span) {
    out.group_index.push_back(static_cast<size_t>(
        std::find(g->block_ids.begin(), g->block_ids.end(), e->spec.id) - g->block_ids.begin()));
  }
  // An earlier averaging still in flight ends first (its mean is stale: this Backward adds to
  // the gradients), as does any cached mean.
  if (g->overlap != nullptr) g->overlap->Stop();
  g->mean_grads = {};
  g->mean_grads_of.clear();
  g->mean_in_place = false;
  g->overlap = std::make_shared<OverlapReduce>(g.get(), std::move(sizes));
  out.reduce = g->overlap;
  return out;
}

void Engine::OverlapBlockReady(OverlapReduce& overlap, size_t group_index, Entry& e) {
  // The CPU backend's reads cannot fail; a failed one leaves the averaging to time out on the
  // other members, as a member that dies would.
  if (!ReadTrainedGradients(e, overlap.Slot(group_index)).ok()) {
    overlap.Cancel();
    return;
  }
  overlap.Ready(group_index, {e.serial, e.generations.Of(TensorKind::kGradients)});
}

absl::Status Engine::DeviceOverlapBlock(Overlap& overlap, Entry& e) {
  Group& g = *overlap.group;
  const DeviceGradients d = e.block->device_gradients();
  return Timed(g, &g.backward_use, d.count * sizeof(float),
               [&] { return g.collective->QueueAllReduceMeanOnDevice(d.data, d.count, d.stream); });
}

absl::Status Engine::FinishDeviceOverlap(Overlap& overlap, const std::vector<EntryPtr>& span, absl::Status s) {
  Group& g = *overlap.group;
  // Whatever was queued ends first (or the communicator is aborted): nothing of NCCL's still
  // writes the gradients after this returns.
  const absl::Time start = absl::Now();
  absl::Status waited = g.collective->WaitQueued();
  g.backward_use.seconds += absl::ToDoubleSeconds(absl::Now() - start);
  if (!waited.ok()) {
    g.backward_use.aborted = true;
    g.Break(waited.message());
    if (s.ok()) {
      s = absl::AbortedError(absl::StrCat("group ", g.id, ": ", waited.message(), "; the group is failed: LeaveGroup, "
                                          "then join a new group"));
    }
  }
  if (!s.ok()) {
    g.Break(absl::StrCat("a Backward averaging over the group failed: ", s.message()));
    // Part averaged, part not: not this member's gradients, nor the group's mean.
    for (const EntryPtr& e : span) e->SetHasGrad(false);
    return s;
  }
  g.mean_grads_of = GradientVersions(span);  // the span is in the group's order
  g.mean_in_place = true;
  return absl::OkStatus();
}

namespace {

// Finishes the averaging a Backward started, if any: its mean becomes the group's cached one (the
// one GradNorm and Step reuse). ABORTED when a collective failed (the group is broken); a
// cancelled one (its Backward failed) leaves no mean. A device collective's averaging finished
// within its Backward: only its metrics come here.
absl::Status TakeOverlap(Group& g, CollectiveUse* use) ABSL_EXCLUSIVE_LOCKS_REQUIRED(g.mu) {
  use->Take(g.backward_use);
  if (g.overlap == nullptr) return absl::OkStatus();
  std::shared_ptr<OverlapReduce> overlap = std::move(g.overlap);
  std::vector<float> mean;
  std::vector<std::pair<uint64_t, uint64_t>> of;
  absl::Status s = overlap->Finish(&mean, &of, use);
  if (s.ok()) {
    g.mean_grads = std::move(mean);
    g.mean_grads_of = std::move(of);
    g.mean_in_place = false;
  }
  return s.code() == absl::StatusCode::kCancelled ? absl::OkStatus() : s;
}

}  // namespace

absl::StatusOr<std::shared_ptr<Group>> Engine::GroupForCall(absl::string_view group_id, absl::string_view caller,
                                                             const std::vector<std::string>& block_ids,
                                                             const char* rpc) {
  ASSIGN_OR_RETURN(std::shared_ptr<Group> g, groups_.FindMember(group_id, caller, block_ids, rpc));
  {
    // A Backward's averaging that broke the group and that no call reported yet: its ABORTED.
    absl::MutexLock group_lock(&g->mu);
    if (g->broken) {
      CollectiveUse use;
      RETURN_IF_ERROR(TakeOverlap(*g, &use));
    }
  }
  return Usable(std::move(g));
}

absl::Status Engine::StartGroupCall(Group& g, std::vector<EntryPtr>* entries, std::unique_ptr<SpanLock>* lock,
                                    bool* reuse_mean, CollectiveUse* use) {
  RETURN_IF_ERROR(TakeOverlap(g, use));
  if (g.broken) return absl::FailedPreconditionError(absl::StrCat("group ", g.id, " failed: ", g.Failure()));
  absl::StatusOr<std::vector<EntryPtr>> found = GroupEntries(g);
  absl::Status local = found.status();
  if (local.ok()) {
    *entries = *std::move(found);
    *lock = std::make_unique<SpanLock>(*entries);
    local = (*lock)->CheckAlive();
    for (size_t i = 0; local.ok() && i < entries->size(); ++i) {
      if (!(*entries)[i]->HasGrad()) {
        local = absl::FailedPreconditionError(absl::StrCat("block ", (*entries)[i]->spec.id,
                                                           " has no gradients: run Backward through it first"));
      }
    }
  }
  const bool have_mean = local.ok() && (!g.mean_grads.empty() || g.mean_in_place) &&
                         g.mean_grads_of == GradientVersions(*entries);
  return Agree(g, local, have_mean, reuse_mean, use);
}

absl::StatusOr<StepResult> Engine::GroupStep(absl::string_view group_id, absl::string_view caller,
                                             const std::vector<std::string>& block_ids, const AdamWHyper& hyper,
                                             double max_grad_norm, double clip_coefficient) {
  RETURN_IF_ERROR(ValidateAdamW(hyper, max_grad_norm));
  RETURN_IF_ERROR(ValidateClipCoefficient(clip_coefficient, max_grad_norm));
  ASSIGN_OR_RETURN(std::shared_ptr<Group> g, GroupForCall(group_id, caller, block_ids, "Step"));
  absl::MutexLock group_lock(&g->mu);
  StepResult result;
  std::vector<EntryPtr> entries;
  std::unique_ptr<SpanLock> lock;
  bool reuse_mean = false;
  RETURN_IF_ERROR(StartGroupCall(*g, &entries, &lock, &reuse_mean, &result.collectives));
  // The GradNorm just before already averaged these gradients: its mean is every member's.
  std::vector<float> mean = std::move(g->mean_grads);
  g->mean_grads = {};
  g->mean_grads_of.clear();
  g->mean_in_place = false;
  if (!reuse_mean) RETURN_IF_ERROR(ReduceGradients(*g, entries, &mean, &result.collectives));
  size_t off = 0;
  // On a device collective the gradients already are the mean; else the mean goes back into them.
  for (size_t b = 0; !g->collective->on_device() && b < entries.size(); ++b) {
    Entry& e = *entries[b];
    e.generations.Bump(TensorChange::kBackward);
    for (size_t i = 0; i < e.params.size(); ++i) {
      if (!Synced(e.spec, e.params[i], TensorKind::kGradients)) continue;
      RETURN_IF_ERROR(e.block->WriteTensor(TensorKind::kGradients, static_cast<int>(i), mean.data() + off));
      off += static_cast<size_t>(e.params[i].numel());
    }
  }
  const CollectiveUse used = result.collectives;
  ASSIGN_OR_RETURN(result, StepLocked(entries, hyper, max_grad_norm, clip_coefficient));
  result.collectives = used;
  ++g->steps;
  return result;
}

absl::StatusOr<GradNormResult> Engine::GradNorm(const std::vector<std::string>& block_ids,
                                                absl::string_view group_id, absl::string_view caller) {
  GradNormResult result;
  if (group_id.empty()) {
    if (block_ids.empty()) return absl::InvalidArgumentError("block_ids is empty: name the blocks, or a group_id");
    ASSIGN_OR_RETURN(std::vector<EntryPtr> entries, FindAll(block_ids, /*allow_repeats=*/false));
    SpanLock lock(entries);
    RETURN_IF_ERROR(lock.CheckAlive());
    for (const EntryPtr& e : entries) {
      if (!e->HasGrad()) {
        return absl::FailedPreconditionError(
            absl::StrCat("block ", e->spec.id, " has no gradients: run Backward through it first"));
      }
    }
    ASSIGN_OR_RETURN(result.sum_of_squares, SumGradSquares(entries));
    result.finite = std::isfinite(result.sum_of_squares);
    return result;
  }
  ASSIGN_OR_RETURN(std::shared_ptr<Group> g, GroupForCall(group_id, caller, block_ids, "GradNorm"));
  absl::MutexLock group_lock(&g->mu);
  std::vector<EntryPtr> entries;
  std::unique_ptr<SpanLock> lock;
  bool reuse_mean = false;
  RETURN_IF_ERROR(StartGroupCall(*g, &entries, &lock, &reuse_mean, &result.collectives));
  if (!reuse_mean) {
    g->mean_grads.clear();
    g->mean_grads_of.clear();
    g->mean_in_place = false;
    RETURN_IF_ERROR(ReduceGradients(*g, entries, &g->mean_grads, &result.collectives));
    g->mean_grads_of = GradientVersions(entries);
    g->mean_in_place = g->collective->on_device();
  }
  for (float x : g->mean_grads) result.sum_of_squares += static_cast<double>(x) * x;
  if (g->mean_in_place) {  // the mean is the blocks' own gradients, on the GPU
    ASSIGN_OR_RETURN(const double ss, SumGradSquares(entries));
    result.sum_of_squares += ss;
  }
  result.finite = std::isfinite(result.sum_of_squares);
  return result;
}

}  // namespace blockd
