// The Engine's inference sessions: open, step (alone or batched with other sessions' steps on the
// same span: RunStepBatch, gathered by step_batcher.h), trim, fork, close, list, expire. Kept apart
// from engine.cc (training and the block registry); the store is session.h, the cache kv_cache.h.
#include <algorithm>
#include <cmath>
#include <map>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/echo.h"
#include "base/finite.h"
#include "base/log.h"
#include "base/status_macros.h"
#include "engine/engine.h"
#include "engine/engine_internal.h"

namespace blockd {
namespace {

// The most new tokens per row of a step that a session replays as a captured launch (StepGraph):
// decoding, speculative or not; a longer chunk is prefill-like and launches once.
constexpr int64_t kGraphMaxNewTokens = 16;

// One message for every miss, so a caller cannot tell another identity's session from none.
absl::Status SessionNotFound(absl::string_view id) {
  return absl::NotFoundError(absl::StrCat("session ", Echo(id), " not found (unknown, closed or expired)"));
}

absl::Status ValidateSessionId(absl::string_view id, absl::string_view field) {
  const bool ok_chars = std::all_of(id.begin(), id.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
           c == ':' || c == '/' || c == '-';
  });
  if (id.size() > 128 || !ok_chars) {
    return absl::InvalidArgumentError(absl::StrCat(field, " \"", Echo(id),
                                                   "\" is not valid: expected 1-128 characters of [A-Za-z0-9._:/-] "
                                                   "(or empty: the server picks one)"));
  }
  return absl::OkStatus();
}

// What a retry of a step must repeat: the input's dtype, shape and bytes, and hypo_ids (FNV-1a,
// 64 bits: it tells a client's mistake from a retry, it is no defence against an adversary, who
// could only mislead itself).
uint64_t StepFingerprint(const InferStepArgs& a) {
  uint64_t h = 14695981039346656037ull;
  auto mix = [&h](const void* p, size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  };
  const int dtype = static_cast<int>(a.hidden_states.dtype);
  mix(&dtype, sizeof dtype);
  mix(a.hidden_states.shape.data(), a.hidden_states.shape.size() * sizeof(int64_t));
  if (a.hidden_states.size > 0) mix(a.hidden_states.data, a.hidden_states.size);
  const uint64_t hypos = a.hypo_ids.size();
  mix(&hypos, sizeof hypos);
  mix(a.hypo_ids.data(), a.hypo_ids.size() * sizeof(int32_t));
  return h;
}

SessionInfo SessionInfoOf(const Session& s) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  SessionInfo info;
  info.session_id = s.id;
  info.block_ids = s.block_ids;
  info.batch_size = s.batch_size;
  info.max_length = s.max_length;
  info.length = s.length;
  info.kv_bytes = s.kv_bytes;
  info.ttl = s.ttl;
  info.expires = s.expires();
  return info;
}

}  // namespace

// One session's step on its way to a launch: alone, or batched with other sessions' steps on the
// same span. The session's lock is held by the thread that made it until the step is committed,
// so the leader of a batch may read `committed` while it runs the batch.
struct Engine::PendingStep {
  explicit PendingStep(KvCache cache) : scratch(std::move(cache)) {}
  const KvCache* committed = nullptr;  // the session's cache before the step
  KvCache scratch;                     // the cache the step writes (committed, reordered by hypo_ids)
  int64_t start = 0;                   // the session's length: every row's first new position
  int64_t new_tokens = 0;
  const TensorArg* input = nullptr;
  std::string* output = nullptr;       // the step's output bytes (the reply's)
  absl::Status status;
  int64_t rows = 0;                    // StepBatcher's
  bool batch_done = false;
  StepGraph* graph = nullptr;          // the session's (Session::graph)
};

void Engine::RunStepBatch(const std::vector<EntryPtr>& span, const std::vector<PendingStep*>& members) {
  auto fail = [&members](const absl::Status& st) {
    for (PendingStep* m : members) m->status = st;
  };
  const absl::Time t_start = absl::Now();
  const PendingStep& lead = *members[0];
  const bool alone = members.size() == 1;
  const int64_t hidden = span[0]->spec.config.hidden_size, n = lead.new_tokens;
  const DType dtype = lead.input->dtype;
  int64_t rows = 0;
  for (const PendingStep* m : members) rows += m->rows;

  // A session's decode step (alone, onto its prefix, few new tokens, a span on one device) goes
  // through its StepGraph whole: one copy of the tables for every block, its bytes in and out
  // with them (StepGraph::RunHost), and with infer_graphs the span replayed as one captured
  // launch while the key holds. The table's width is padded so that the key moves once per
  // kStepGraphPositions positions, as the blocks' attention plan does then.
  StepGraph* graph = alone && lead.start > 0 && n <= kGraphMaxNewTokens ? lead.graph : nullptr;
  // One upload of every member's rows, in member order: [rows, n, hidden].
  const void* data = lead.input->data;
  std::string joined;
  if (!alone) {
    for (const PendingStep* m : members) joined.append(static_cast<const char*>(m->input->data), m->input->size);
    data = joined.data();
  }
  // Batching checked every member's values before it joined (once per step); alone, Upload does,
  // or here for the graph's step, whose bytes go to the device inside the graph.
  const bool checked = options_.infer_batch_window > absl::ZeroDuration();
  std::unique_ptr<Activation> x;
  if (graph != nullptr) {
    if (!checked) {
      if (absl::Status st = CheckFinite(dtype, data, static_cast<size_t>(rows * n * hidden), static_cast<size_t>(hidden));
          !st.ok()) {
        return fail(absl::Status(st.code(), absl::StrCat("hidden_states ", st.message())));
      }
    }
  } else {
    auto x_or = checked ? backend_->UploadChecked(span[0]->spec.device, dtype, data, rows, n, hidden)
                        : backend_->Upload(span[0]->spec.device, dtype, data, rows, n, hidden);
    if (!x_or.ok()) {
      return fail(absl::Status(x_or.status().code(), absl::StrCat("hidden_states ", x_or.status().message())));
    }
    x = std::move(x_or).value();
  }
  const absl::Time t_uploaded = absl::Now();

  std::vector<int64_t> start;
  start.reserve(static_cast<size_t>(rows));
  for (const PendingStep* m : members) start.insert(start.end(), static_cast<size_t>(m->rows), m->start);
  SpanLock lock(span);
  if (absl::Status st = lock.CheckAlive(); !st.ok()) return fail(st);
  // The page tables of every row, members in order, each naming pages of its own family's stores.
  std::vector<std::vector<int32_t>> tables(members.size());
  std::vector<int64_t> widths(members.size());
  int64_t width = 0;
  std::vector<int32_t> meta;  // graph's: the starts, then the padded tables
  for (size_t i = 0; i < members.size(); ++i) {
    PendingStep& m = *members[i];
    if (absl::Status st = m.scratch.PrepareWrite(*m.committed, m.start, n); !st.ok()) return fail(st);
    if (graph != nullptr) {
      meta = m.scratch.DeviceMeta(m.start, &widths[i]);
      tables[i].assign(meta.begin() + rows, meta.end());
    } else {
      tables[i] = m.scratch.Table(&widths[i]);
    }
    width = std::max(width, widths[i]);
  }
  std::vector<int32_t> table;
  if (alone) {
    table = std::move(tables[0]);
  } else {
    table.assign(static_cast<size_t>(rows * width), -1);
    int64_t row = 0;
    for (size_t i = 0; i < members.size(); ++i) {
      for (int64_t r = 0; r < members[i]->rows; ++r, ++row) {
        std::copy_n(tables[i].begin() + r * widths[i], widths[i], table.begin() + row * width);
      }
    }
  }
  StepGraphKey key;
  const int32_t* device_meta = nullptr;
  if (graph != nullptr) {
    auto staged = graph->StageMeta(meta);
    if (!staged.ok()) return fail(staged.status());
    device_meta = *staged;
    key = lead.scratch.GraphKey(lead.start, n, width);
    for (const EntryPtr& e : span) key.generation += e->block->launch_generation();
  }
  std::vector<KvPageStore*> row_pages(alone ? 0 : static_cast<size_t>(rows));
  // The span's launches, block after block, from `input` on.
  auto launches = [&](const Activation& input) -> absl::StatusOr<std::unique_ptr<Activation>> {
    const Activation* in = &input;
    std::unique_ptr<Activation> y;  // the last block's output, once there is one
    for (size_t b = 0; b < span.size(); ++b) {
      if (in->device() != span[b]->spec.device) {
        ASSIGN_OR_RETURN(std::unique_ptr<Activation> moved, backend_->ToDevice(*in, span[b]->spec.device));
        y = std::move(moved);
        in = y.get();
      }
      KvBlockView view = lead.scratch.View(static_cast<int64_t>(b), table, width);
      view.device_meta = device_meta;
      if (!alone) {
        size_t row = 0;
        for (const PendingStep* m : members) {
          std::fill_n(row_pages.begin() + row, m->rows, m->scratch.Store(static_cast<int64_t>(b)));
          row += static_cast<size_t>(m->rows);
        }
        view.row_pages = row_pages.data();
      }
      ASSIGN_OR_RETURN(std::unique_ptr<Activation> out, span[b]->block->InferStep(*in, start, view));
      y = std::move(out);
      in = y.get();
    }
    return y;
  };
  const absl::Time t_prepared = absl::Now();
  if (graph != nullptr) {
    // Queued under the blocks' locks; waited for, its output written into the reply, without them.
    const StepGraph::Counts before = graph->counts();
    members[0]->status =
        graph->RunHost(key, {dtype, data, rows, n, hidden, lead.output}, launches, options_.infer_graphs);
    const StepGraph::Counts after = graph->counts();
    lock.Unlock();
    if (members[0]->status.ok()) members[0]->status = graph->FinishHost();
    if (!members[0]->status.ok()) return;
    if (options_.infer_graphs) {
      infer_graph_replays_.fetch_add(after.replayed - before.replayed);
      infer_graph_captures_.fetch_add(after.captured - before.captured);
      infer_graph_eager_.fetch_add(after.eager - before.eager);
    }
    BLOCKD_LOG(kDebug, "Infer step of ", span.size(), " blocks [", rows, ",", n, "], 1 session(s), through the ",
               options_.infer_graphs ? "graph" : "graph eagerly", ": check ",
               absl::ToDoubleMicroseconds(t_uploaded - t_start), " us, tables ",
               absl::ToDoubleMicroseconds(t_prepared - t_uploaded), " us, run ",
               absl::ToDoubleMicroseconds(absl::Now() - t_prepared), " us");
    return Launched(members.size(), rows);
  }
  absl::StatusOr<std::unique_ptr<Activation>> y = launches(*x);
  if (!y.ok()) return fail(y.status());
  x = std::move(y).value();
  lock.Unlock();
  const absl::Time t_launched = absl::Now();

  if (alone) {
    // Nothing to split: the output goes straight into the reply.
    members[0]->status = backend_->Download(*x, dtype, lead.output);
    if (!members[0]->status.ok()) return;
  } else {
    std::string all;
    if (absl::Status st = backend_->Download(*x, dtype, &all); !st.ok()) return fail(st);
    size_t offset = 0;
    for (PendingStep* m : members) {
      const size_t bytes = static_cast<size_t>(m->rows * n * hidden) * DTypeSize(dtype);
      m->output->assign(all, offset, bytes);
      offset += bytes;
    }
  }
  BLOCKD_LOG(kDebug, "Infer step of ", span.size(), " blocks [", rows, ",", n, "], ", members.size(),
             " session(s): upload ", absl::ToDoubleMicroseconds(t_uploaded - t_start), " us, tables ",
             absl::ToDoubleMicroseconds(t_prepared - t_uploaded), " us, launch ",
             absl::ToDoubleMicroseconds(t_launched - t_prepared), " us, compute + download ",
             absl::ToDoubleMicroseconds(absl::Now() - t_launched), " us");
  Launched(members.size(), rows);
}

void Engine::Launched(size_t sessions, int64_t rows) {
  infer_launches_.fetch_add(1);
  infer_launched_steps_.fetch_add(static_cast<int64_t>(sessions));
  infer_last_batch_sessions_.store(static_cast<int64_t>(sessions));
  if (options_.on_infer_batch) options_.on_infer_batch(static_cast<int64_t>(sessions), rows);
}

absl::StatusOr<SessionInfo> Engine::OpenSession(const OpenSessionArgs& args) {
  if (args.batch_size < 1 || args.batch_size > 65536) {
    return absl::InvalidArgumentError(absl::StrCat("batch_size = ", args.batch_size, ", expected 1..65536"));
  }
  if (args.max_length < 1 || args.max_length > (1 << 20)) {
    return absl::InvalidArgumentError(absl::StrCat("max_length = ", args.max_length, ", expected 1..1048576"));
  }
  if (args.ttl < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("ttl = ", absl::FormatDuration(args.ttl), ", expected >= 0 (0: the server's default)"));
  }
  RETURN_IF_ERROR(ValidateSessionId(args.session_id, "session_id"));
  ASSIGN_OR_RETURN(std::vector<EntryPtr> span, FindAll(args.block_ids, /*allow_repeats=*/true));
  const BlockSpec& s0 = span[0]->spec;
  std::vector<std::unique_ptr<KvPageStore>> stores;
  std::map<int, int64_t> page_bytes_per_device;
  for (const EntryPtr& e : span) {
    const BlockSpec& s = e->spec;
    if (s.config.hidden_size != s0.config.hidden_size) {
      return absl::InvalidArgumentError(absl::StrCat("block ", s.id, " has hidden_size ", s.config.hidden_size,
                                                     ", but block ", s0.id, " has ", s0.config.hidden_size,
                                                     ": a span needs one hidden_size"));
    }
    if (args.batch_size > s.max_batch_size || args.max_length > s.max_seq_len) {
      return absl::InvalidArgumentError(absl::StrCat("batch_size ", args.batch_size, " and max_length ",
                                                     args.max_length, " exceed block ", s.id, "'s max_batch_size ",
                                                     s.max_batch_size, " or max_seq_len ", s.max_seq_len));
    }
    std::vector<std::string> missing = e->Missing();
    if (!missing.empty()) {
      return absl::FailedPreconditionError(
          absl::StrCat("block ", s.id, " has weights not loaded: ", absl::StrJoin(missing, ", ")));
    }
    ASSIGN_OR_RETURN(std::unique_ptr<KvPageStore> store, e->block->NewKvPageStore());
    page_bytes_per_device[s.device] += store->page_bytes();
    stores.push_back(std::move(store));
  }
  std::string id = args.session_id;
  if (id.empty()) {
    ASSIGN_OR_RETURN(id, NewResourceId("sess-"));
  }

  // The whole cache up front, so that a generation never runs out of memory half way.
  std::vector<MemoryReservation> reservations;
  std::map<int, int64_t> kv_bytes;
  int64_t total = 0;
  for (const auto& [device, page_bytes] : page_bytes_per_device) {
    const int64_t bytes = KvCache::ReservedBytes(page_bytes, args.batch_size, args.max_length);
    ASSIGN_OR_RETURN(MemoryReservation r,
                     budget_.Reserve(device, bytes, absl::StrCat("the KV cache of session ", Echo(id))));
    reservations.push_back(std::move(r));
    kv_bytes[device] = bytes;
    total += bytes;
  }
  auto cache_or = KvCache::Create(std::move(stores), args.batch_size, args.max_length, std::move(reservations));
  if (!cache_or.ok()) {
    return absl::Status(cache_or.status().code(), absl::StrCat("the KV cache of session ", Echo(id), ": ",
                                                               cache_or.status().message()));
  }
  cache_or->CountPagesIn(kv_pages_);  // the engine's KV gauges
  auto s = std::make_shared<Session>(std::move(cache_or).value());
  s->owner = args.client;
  s->id = id;
  s->block_ids = args.block_ids;
  for (const EntryPtr& e : span) s->block_serials.push_back(e->serial);
  s->batch_size = args.batch_size;
  s->max_length = args.max_length;
  s->ttl = args.ttl > absl::ZeroDuration() ? args.ttl : options_.default_session_ttl;
  s->kv_bytes_per_device = std::move(kv_bytes);
  s->kv_bytes = total;
  s->Renew(absl::Now());
  SessionInfo info = SessionInfoOf(*s);
  RETURN_IF_ERROR(sessions_.Add(std::move(s), options_.max_sessions_per_client));
  return info;
}

absl::Status Engine::InferStep(const InferStepArgs& args, InferStepOutput* out) {
  // Steps are batched across sessions into host buffers: CUDA IPC tensors serve Forward and Backward.
  if (args.hidden_states.peer != nullptr || out->output.peer != nullptr) {
    return absl::FailedPreconditionError(
        "InferStep takes hidden states inline or in POSIX shared memory, not in CUDA IPC memory (which Forward and "
        "Backward take)");
  }
  if (args.hidden_states.read || out->output.write) {  // the server copies a step's slice (small) itself
    return absl::InternalError("InferStep takes its hidden states as bytes, not through a HostRead or HostWrite");
  }
  const absl::Time t_called = absl::Now();
  std::shared_ptr<Session> s = sessions_.Find(args.session_id, args.client, t_called);
  if (s == nullptr) return SessionNotFound(args.session_id);
  absl::MutexLock session_lock(&s->mu);
  if (s->closed) return SessionNotFound(args.session_id);
  s->Renew(t_called);
  const uint64_t fingerprint = args.step_id != 0 ? StepFingerprint(args) : 0;
  if (args.step_id != 0 && args.step_id == s->last_step_id) {
    // A retry sends the same request again; another request under the same id is a client's bug
    // that a replay would hide (the caller would take the old step's output for this one's).
    if (fingerprint != s->last_fingerprint) {
      return absl::InvalidArgumentError(absl::StrCat(
          "step_id ", args.step_id, " repeats session ", Echo(s->id), "'s last step, but hidden_states ",
          ShapeString(args.hidden_states.shape), " of ", DTypeName(args.hidden_states.dtype), " (or its bytes or ",
          "hypo_ids) differ from that step's ", ShapeString(s->last_shape), " of ", DTypeName(s->last_dtype),
          ": a retry must repeat the request exactly; a new step needs a new step_id"));
    }
    out->output.dtype = s->last_dtype;
    out->output.shape = s->last_shape;
    *out->output.data = s->last_output;
    out->length = s->length;
    out->step_id = s->last_step_id;
    out->replayed = true;
    return absl::OkStatus();
  }

  const TensorArg& t = args.hidden_states;
  ASSIGN_OR_RETURN(std::vector<EntryPtr> span, FindAll(s->block_ids, /*allow_repeats=*/true));
  const int64_t hidden = span[0]->spec.config.hidden_size;
  if (t.shape.size() != 3 || t.shape[0] != s->batch_size || t.shape[1] < 1 || t.shape[2] != hidden) {
    return absl::InvalidArgumentError(absl::StrCat("hidden_states shape ", ShapeString(t.shape), ", session ",
                                                   Echo(s->id), " expects [", s->batch_size, ",new_tokens>=1,",
                                                   hidden, "]"));
  }
  const int64_t batch = t.shape[0], fresh = t.shape[1];
  // With batching on, the step is on its way to its batch from here: a leader of its key waits for
  // it, and whatever refuses it before it joins lets that leader go (Leave).
  const bool batching = options_.infer_batch_window > absl::ZeroDuration();
  std::string key;
  if (batching) {
    key = absl::StrCat(fresh, "/", DTypeName(t.dtype));
    for (uint64_t serial : s->block_serials) absl::StrAppend(&key, "/", serial);
    step_batcher_.Arrive(key);
    if (options_.on_infer_step_arrived) options_.on_infer_step_arrived();
  }
  absl::Cleanup leave = [&] {
    if (batching) step_batcher_.Leave(key);
  };
  // Before the byte count: bounds new_tokens, so batch * fresh * hidden cannot overflow.
  if (fresh > s->max_length - s->length) {
    return absl::OutOfRangeError(absl::StrCat("session ", Echo(s->id), " holds ", s->length, " tokens per row; ",
                                              fresh, " more would pass its max_length ", s->max_length,
                                              " (trim it or open a longer one)"));
  }
  const uint64_t expected = static_cast<uint64_t>(batch * fresh * hidden) * DTypeSize(t.dtype);
  if (t.size != expected) {
    return absl::InvalidArgumentError(absl::StrCat("hidden_states has ", t.size, " bytes of data, but shape ",
                                                   ShapeString(t.shape), " of ", DTypeName(t.dtype), " needs ",
                                                   expected));
  }
  if (!args.hypo_ids.empty()) {
    if (static_cast<int64_t>(args.hypo_ids.size()) != batch) {
      return absl::InvalidArgumentError(absl::StrCat("hypo_ids has ", args.hypo_ids.size(),
                                                     " entries, expected batch_size = ", batch, " (or none)"));
    }
    for (size_t i = 0; i < args.hypo_ids.size(); ++i) {
      if (args.hypo_ids[i] < 0 || args.hypo_ids[i] >= batch) {
        return absl::InvalidArgumentError(absl::StrCat("hypo_ids[", i, "] = ", args.hypo_ids[i],
                                                       ", expected a row index 0..", batch - 1));
      }
    }
  }
  for (size_t b = 0; b < span.size(); ++b) {
    if (span[b]->serial != s->block_serials[b]) return SessionNotFound(args.session_id);
  }

  if (!s->graph_made) {
    s->graph_made = true;
    const int device = span[0]->spec.device;
    const bool one_device =
        std::all_of(span.begin(), span.end(), [device](const EntryPtr& e) { return e->spec.device == device; });
    if (one_device) {
      auto graph = backend_->NewStepGraph(device);
      if (!graph.ok()) return graph.status();
      s->graph = std::move(graph).value();
    }
  }

  // The step works on a copy of the page tables: a failure leaves the session's cache as it was
  // (the step wrote only positions past its length, in pages no one else reads), and a successful
  // one replaces it.
  PendingStep me(s->cache);
  if (!args.hypo_ids.empty()) me.scratch.Reorder(args.hypo_ids);
  me.committed = &s->cache;
  me.start = s->length;
  me.new_tokens = fresh;
  me.input = &t;
  me.output = out->output.data;
  me.rows = batch;
  me.graph = s->graph.get();
  std::vector<PendingStep*> members = {&me};
  if (batching) {
    // Everything that can fail for this step alone is checked before it joins a batch, so that a
    // bad step never fails the others: the shape and range above, and here its values.
    if (absl::Status st = CheckFinite(t.dtype, t.data, t.size / DTypeSize(t.dtype), static_cast<size_t>(hidden));
        !st.ok()) {
      return absl::Status(st.code(), absl::StrCat("hidden_states ", st.message()));
    }
    // A launch holds no more rows than the blocks were sized for (workspaces, cuDNN plans).
    int64_t max_rows = options_.infer_batch_max_rows;
    for (const EntryPtr& e : span) max_rows = std::min(max_rows, e->spec.max_batch_size);
    std::move(leave).Cancel();  // joining ends its way
    members = step_batcher_.Join(key, &me, max_rows);
  }
  const absl::Time t_joined = absl::Now();
  if (!members.empty()) {  // this step leads its batch (or runs alone)
    RunStepBatch(span, members);
    step_batcher_.Finish(members);
  }
  const absl::Time t_batched = absl::Now();
  RETURN_IF_ERROR(me.status);
  out->output.dtype = t.dtype;
  out->output.shape = t.shape;

  s->cache = std::move(me.scratch);
  s->length += fresh;
  s->last_step_id = args.step_id;
  if (args.step_id != 0) {
    s->last_output = *out->output.data;
    s->last_dtype = t.dtype;
    s->last_shape = t.shape;
    s->last_fingerprint = fingerprint;
  } else {
    s->last_output.clear();
  }
  s->Renew(absl::Now());
  out->length = s->length;
  out->step_id = args.step_id;
  BLOCKD_LOG(kDebug, "Session step of ", span.size(), " blocks: found, checked and batched in ",
             absl::ToDoubleMicroseconds(t_joined - t_called), " us, committed in ",
             absl::ToDoubleMicroseconds(absl::Now() - t_batched), " us");
  out->new_tokens = batch * fresh;
  return absl::OkStatus();
}

absl::StatusOr<SessionInfo> Engine::TrimSession(absl::string_view id, absl::string_view caller, int64_t length) {
  std::shared_ptr<Session> s = sessions_.Find(id, caller, absl::Now());
  if (s == nullptr) return SessionNotFound(id);
  absl::MutexLock session_lock(&s->mu);
  if (s->closed) return SessionNotFound(id);
  s->Renew(absl::Now());
  if (length < 0) {
    return absl::InvalidArgumentError(absl::StrCat("length = ", length, ", expected 0..", s->length));
  }
  if (length > s->length) {
    return absl::OutOfRangeError(absl::StrCat("length = ", length, ", but session ", Echo(id), " holds only ",
                                              s->length, " tokens per row; trim can only shorten"));
  }
  s->cache.Trim(length);
  s->length = length;
  // The last step's output no longer describes the cache: a repeat of its id runs as a new step.
  s->last_step_id = 0;
  s->last_output.clear();
  return SessionInfoOf(*s);
}

absl::StatusOr<SessionInfo> Engine::ForkSession(absl::string_view id, absl::string_view caller,
                                                absl::string_view new_id) {
  RETURN_IF_ERROR(ValidateSessionId(new_id, "new_session_id"));
  std::shared_ptr<Session> s = sessions_.Find(id, caller, absl::Now());
  if (s == nullptr) return SessionNotFound(id);
  absl::MutexLock session_lock(&s->mu);
  if (s->closed) return SessionNotFound(id);
  s->Renew(absl::Now());
  std::string fork_id(new_id);
  if (fork_id.empty()) {
    ASSIGN_OR_RETURN(fork_id, NewResourceId("sess-"));
  }
  // Before the pool grows (which only the family's end gives back): the refusals Add would make.
  RETURN_IF_ERROR(sessions_.CheckRoom(fork_id, s->owner, options_.max_sessions_per_client));
  // The fork shares every page until one side writes it, and adds a full reservation to the
  // family's pool: after the fork either side may write every page of its own.
  std::vector<MemoryReservation> mine;
  for (const auto& [device, bytes] : s->kv_bytes_per_device) {
    ASSIGN_OR_RETURN(MemoryReservation r,
                     budget_.Reserve(device, bytes, absl::StrCat("the KV cache of session ", Echo(fork_id))));
    mine.push_back(std::move(r));
  }
  {
    // Growing the stores must not race a step of another session of the family on these blocks.
    ASSIGN_OR_RETURN(std::vector<EntryPtr> span, FindAll(s->block_ids, /*allow_repeats=*/true));
    SpanLock lock(span);
    RETURN_IF_ERROR(s->cache.GrowFamily(s->batch_size, s->max_length, std::move(mine)));
  }
  auto f = std::make_shared<Session>(s->cache);
  f->owner = s->owner;
  f->id = fork_id;
  f->block_ids = s->block_ids;
  f->block_serials = s->block_serials;
  f->batch_size = s->batch_size;
  f->max_length = s->max_length;
  f->ttl = s->ttl;
  f->kv_bytes_per_device = s->kv_bytes_per_device;
  f->kv_bytes = s->kv_bytes;
  {
    absl::MutexLock fork_lock(&f->mu);
    f->length = s->length;
  }
  f->Renew(absl::Now());
  SessionInfo info = SessionInfoOf(*f);
  RETURN_IF_ERROR(sessions_.Add(std::move(f), options_.max_sessions_per_client));
  return info;
}

absl::Status Engine::CloseSession(absl::string_view id, absl::string_view caller) {
  if (!sessions_.Remove(id, caller)) return SessionNotFound(id);
  return absl::OkStatus();
}

std::vector<SessionInfo> Engine::ListSessions(absl::string_view caller) {
  std::vector<SessionInfo> out;
  for (const std::shared_ptr<Session>& s : sessions_.OwnedBy(caller)) {
    absl::MutexLock l(&s->mu);
    out.push_back(SessionInfoOf(*s));
  }
  return out;
}

int64_t Engine::ExpireSessions() { return sessions_.Expire(absl::Now()); }

}  // namespace blockd
