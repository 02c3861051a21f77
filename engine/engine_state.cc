// A block's tensors and whole state, out and in: DownloadTensors' reads (by kind and name, with
// the versions that tell a download overtaken by a change), and the export and import of blocks'
// complete state that checkpoints, restores and replica groups use.
#include <cstring>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/echo.h"
#include "base/status_macros.h"
#include "engine/engine.h"
#include "engine/engine_internal.h"

namespace blockd {

namespace {

// A download names its block at every tensor: a block gone since the download began was deleted
// while it was downloaded, which is ABORTED like any other change (NOT_FOUND stays for a download
// whose block never was).
absl::Status DeletedWhileDownloaded(const absl::Status& s, absl::string_view id, TensorKind kind) {
  if (!absl::IsNotFound(s)) return s;
  return absl::AbortedError(absl::StrCat("block ", Echo(id), " was deleted while its ", TensorKindName(kind),
                                         " were downloaded: download again"));
}

}  // namespace

absl::StatusOr<std::vector<NamedTensor>> Engine::ReadTensors(absl::string_view id, TensorKind kind, DType dtype,
                                                             const std::vector<std::string>& names,
                                                             const TensorsVersion* unchanged_since) {
  absl::StatusOr<EntryPtr> found = Find(id);
  if (!found.ok()) {
    return unchanged_since != nullptr ? DeletedWhileDownloaded(found.status(), id, kind) : found.status();
  }
  EntryPtr e = *std::move(found);
  ASSIGN_OR_RETURN(std::vector<int> indices, TensorIndices(*e, kind, names));
  SpanLock lock({e});
  // Deleted between the lookup and the lock: the same answer as a lookup after the delete.
  if (absl::Status alive = lock.CheckAlive(); !alive.ok()) {
    return unchanged_since != nullptr ? DeletedWhileDownloaded(alive, id, kind) : alive;
  }
  if (unchanged_since != nullptr) {
    RETURN_IF_ERROR(CheckUnchanged(e->spec.id, e->serial, e->generations, kind, *unchanged_since));
  }
  const bool zeros = kind == TensorKind::kGradients && !e->HasGrad();
  std::vector<NamedTensor> out;
  std::vector<float> buf;
  for (int index : indices) {
    const ParamSpec& p = e->params[index];
    buf.assign(static_cast<size_t>(p.numel()), 0.f);
    if (!zeros) RETURN_IF_ERROR(e->block->ReadTensor(kind, index, buf.data()));
    NamedTensor t{p.name, p.shape, dtype, std::string(buf.size() * DTypeSize(dtype), '\0')};
    ConvertFromFloat32(buf.data(), buf.size(), dtype, t.bytes.data());
    out.push_back(std::move(t));
  }
  return out;
}

absl::StatusOr<std::vector<int>> Engine::TensorIndices(const Entry& e, TensorKind kind,
                                                       const std::vector<std::string>& names) const {
  const bool weights = kind == TensorKind::kWeights;
  std::vector<int> indices;
  if (names.empty()) {
    for (size_t i = 0; i < e.params.size(); ++i) {
      if (weights || TrainsParam(e.spec, e.params[i])) indices.push_back(static_cast<int>(i));
    }
    if (indices.empty()) return FrozenError(e.spec, absl::StrCat("it has no ", TensorKindName(kind), " to download"));
  }
  for (const std::string& name : names) {
    const int index = FindParam(e.params, name);
    if (index < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("block ", Echo(e.spec.id), " has no tensor \"", Echo(name), "\""));
    }
    if (!weights && !TrainsParam(e.spec, e.params[index])) {
      return FrozenError(e.spec, absl::StrCat(name, " has no ", TensorKindName(kind), " to download"));
    }
    indices.push_back(index);
  }
  return indices;
}

absl::StatusOr<std::vector<std::string>> Engine::TensorNames(absl::string_view id, TensorKind kind,
                                                             const std::vector<std::string>& names) {
  ASSIGN_OR_RETURN(EntryPtr e, Find(id));
  ASSIGN_OR_RETURN(std::vector<int> indices, TensorIndices(*e, kind, names));
  std::vector<std::string> out;
  for (int index : indices) out.push_back(e->params[index].name);
  return out;
}

absl::StatusOr<TensorsVersion> Engine::TensorsVersionOf(absl::string_view id, TensorKind kind) {
  ASSIGN_OR_RETURN(EntryPtr e, Find(id));
  return TensorsVersion{e->serial, e->generations.Of(kind)};
}

absl::Status Engine::CheckTensorsVersion(absl::string_view id, TensorKind kind, const TensorsVersion& version) {
  absl::StatusOr<EntryPtr> e = Find(id);
  if (!e.ok()) return DeletedWhileDownloaded(e.status(), id, kind);
  return CheckUnchanged((*e)->spec.id, (*e)->serial, (*e)->generations, kind, version);
}

absl::StatusOr<std::vector<BlockState>> Engine::ExportBlocks(const std::vector<std::string>& ids) {
  ASSIGN_OR_RETURN(std::vector<EntryPtr> entries, FindAll(ids, /*allow_repeats=*/false, /*renew_lease=*/false));
  SpanLock lock(entries);
  RETURN_IF_ERROR(lock.CheckAlive());
  std::vector<BlockState> states;
  std::vector<float> buf;
  for (const EntryPtr& e : entries) {
    BlockState state;
    state.spec = e->spec;
    {
      absl::MutexLock l(&e->state_mu);
      state.step = e->step;
      state.last_adamw = e->last_adamw;
    }
    state.missing_weights = e->Missing();
    for (size_t i = 0; i < e->params.size(); ++i) {
      const ParamSpec& p = e->params[i];
      buf.resize(static_cast<size_t>(p.numel()));
      for (auto [kind, dst] : {std::pair{TensorKind::kWeights, &state.weights},
                               std::pair{TensorKind::kAdamM, &state.adam_m},
                               std::pair{TensorKind::kAdamV, &state.adam_v}}) {
        if (kind != TensorKind::kWeights && !TrainsParam(e->spec, p)) continue;  // frozen: weights only
        RETURN_IF_ERROR(e->block->ReadTensor(kind, static_cast<int>(i), buf.data()));
        dst->push_back({p.name, p.shape, DType::kFloat32,
                        std::string(reinterpret_cast<const char*>(buf.data()), buf.size() * 4)});
      }
    }
    states.push_back(std::move(state));
  }
  return states;
}

absl::StatusOr<Engine::EntryPtr> Engine::NewEntryFromState(const BlockState& state) {
  const BlockSpec& spec = state.spec;
  RETURN_IF_ERROR(ValidateBlockId(spec.id));
  RETURN_IF_ERROR(ValidateBlockConfig(spec.config));
  if (spec.lora.requested()) {
    RETURN_IF_ERROR(ValidateLoraConfig(spec.lora, spec.config));
    LoraConfig normal = spec.lora;
    NormaliseLoraConfig(&normal);
    if (!(normal == spec.lora)) {  // the adapters' order in the state follows the normal order
      return absl::InvalidArgumentError(absl::StrCat("block ", Echo(spec.id), " state lists lora.target_modules [",
                                                     absl::StrJoin(spec.lora.target_modules, " "),
                                                     "] out of the order q k v o gate up down"));
    }
  }
  RETURN_IF_ERROR(ValidateSpecRanges(spec));
  RETURN_IF_ERROR(backend_->Supports(spec));
  // Checkpoints do not carry leases: a restored block has none.
  auto e = std::make_shared<Entry>(absl::ZeroDuration(), options_.lease_clock());
  e->spec = spec;
  e->serial = NextBlockSerial();
  e->params = BlockParams(spec.config, spec.lora);
  for (const std::string& name : state.missing_weights) {
    if (FindParam(e->params, name) < 0) {
      return absl::InvalidArgumentError(absl::StrCat("block ", Echo(spec.id),
                                                     " state names an unknown missing weight \"", Echo(name), "\""));
    }
  }
  // Every tensor of every kind must be present with the right shape; moments of the trained
  // parameters only (BlockState's order: BlockParams order, frozen parameters left out).
  std::vector<const ParamSpec*> trained;
  for (const ParamSpec& p : e->params) {
    if (TrainsParam(spec, p)) trained.push_back(&p);
  }
  std::vector<const ParamSpec*> all;
  for (const ParamSpec& p : e->params) all.push_back(&p);
  auto check = [&](const std::vector<NamedTensor>& ts, const std::vector<const ParamSpec*>& want,
                   absl::string_view kind) -> absl::Status {
    if (ts.size() != want.size()) {
      return absl::InvalidArgumentError(absl::StrCat("block ", spec.id, " state has ", ts.size(), " ", kind,
                                                     " tensors, expected ", want.size(),
                                                     spec.frozen ? " (the block is frozen)" : ""));
    }
    for (size_t i = 0; i < ts.size(); ++i) {
      const ParamSpec& p = *want[i];
      if (ts[i].name != p.name || ts[i].shape != p.shape || ts[i].dtype != DType::kFloat32 ||
          ts[i].bytes.size() != static_cast<size_t>(p.numel()) * 4) {
        return absl::InvalidArgumentError(absl::StrCat("block ", spec.id, " state ", kind, " tensor ", Echo(ts[i].name),
                                                       " ", ShapeString(ts[i].shape), " does not match ", p.name, " ",
                                                       ShapeString(p.shape), " float32"));
      }
    }
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(check(state.weights, all, "weights"));
  RETURN_IF_ERROR(check(state.adam_m, trained, "adam_m"));
  RETURN_IF_ERROR(check(state.adam_v, trained, "adam_v"));
  if (state.step < 0) return absl::InvalidArgumentError(absl::StrCat("block ", spec.id, " state has step ", state.step));
  ASSIGN_OR_RETURN(e->reservation, budget_.Reserve(spec.device, static_cast<int64_t>(backend_->BlockBytes(spec)),
                                                   absl::StrCat("block ", spec.id)));
  ASSIGN_OR_RETURN(e->block, backend_->CreateBlock(spec));
  std::vector<float> buf;
  size_t t = 0;  // index into the moments, which skip frozen parameters
  for (size_t i = 0; i < e->params.size(); ++i) {
    buf.resize(static_cast<size_t>(e->params[i].numel()));
    std::memcpy(buf.data(), state.weights[i].bytes.data(), buf.size() * 4);  // the bytes may be unaligned
    RETURN_IF_ERROR(e->block->WriteTensor(TensorKind::kWeights, static_cast<int>(i), buf.data()));
    if (!TrainsParam(spec, e->params[i])) continue;
    for (auto [kind, src] : {std::pair{TensorKind::kAdamM, &state.adam_m}, std::pair{TensorKind::kAdamV, &state.adam_v}}) {
      std::memcpy(buf.data(), (*src)[t].bytes.data(), buf.size() * 4);
      RETURN_IF_ERROR(e->block->WriteTensor(kind, static_cast<int>(i), buf.data()));
    }
    ++t;
  }
  absl::MutexLock l(&e->state_mu);
  e->loaded.assign(e->params.size(), true);
  for (const std::string& name : state.missing_weights) e->loaded[FindParam(e->params, name)] = false;
  e->step = state.step;
  e->last_adamw = state.last_adamw;
  return e;
}

absl::Status Engine::ImportBlocks(const std::vector<BlockState>& states, bool replace) {
  std::set<std::string> ids;
  for (const BlockState& st : states) {
    if (!ids.insert(st.spec.id).second) {
      return absl::InvalidArgumentError(absl::StrCat("block ", Echo(st.spec.id), " appears twice"));
    }
  }
  if (!replace) {
    absl::MutexLock lock(&registry_mu_);
    for (const std::string& id : ids) {
      if (blocks_.count(id) != 0) return absl::AlreadyExistsError(absl::StrCat("block ", Echo(id), " already exists"));
    }
  }
  std::vector<EntryPtr> fresh;
  for (const BlockState& st : states) {
    ASSIGN_OR_RETURN(EntryPtr e, NewEntryFromState(st));
    fresh.push_back(std::move(e));
  }
  std::vector<EntryPtr> old;
  {
    absl::MutexLock lock(&registry_mu_);
    if (!replace) {
      for (const EntryPtr& e : fresh) {
        if (blocks_.count(e->spec.id) != 0) {
          return absl::AlreadyExistsError(absl::StrCat("block ", Echo(e->spec.id), " already exists"));
        }
      }
    }
    int64_t added = 0;
    for (const EntryPtr& e : fresh) added += blocks_.count(e->spec.id) == 0;
    if (static_cast<int64_t>(blocks_.size()) + added > options_.max_blocks) {
      return absl::ResourceExhaustedError(absl::StrCat("restoring would hold ", blocks_.size() + added,
                                                       " blocks (limit --max_blocks=", options_.max_blocks, ")"));
    }
    for (const EntryPtr& e : fresh) {
      auto it = blocks_.find(e->spec.id);
      if (it != blocks_.end()) {
        old.push_back(it->second);
        it->second = e;
      } else {
        blocks_.emplace(e->spec.id, e);
      }
    }
  }
  for (const EntryPtr& o : old) {
    absl::MutexLock block_lock(&o->mu);
    {
      absl::MutexLock l(&o->state_mu);
      o->deleted = true;
    }
    activations_.EraseReferencing(o->serial);
    sessions_.CloseReferencing(o->serial);
    groups_.BreakReferencing(o->serial, absl::StrCat("block ", o->spec.id, " was restored from a checkpoint"));
  }
  return absl::OkStatus();
}

}  // namespace blockd
