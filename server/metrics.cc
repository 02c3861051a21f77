#include "server/metrics.h"

#include <algorithm>
#include <exception>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace blockd {
namespace {

const char* CodeName(grpc::StatusCode code) {
  static const char* kNames[] = {"OK",
                                 "CANCELLED",
                                 "UNKNOWN",
                                 "INVALID_ARGUMENT",
                                 "DEADLINE_EXCEEDED",
                                 "NOT_FOUND",
                                 "ALREADY_EXISTS",
                                 "PERMISSION_DENIED",
                                 "RESOURCE_EXHAUSTED",
                                 "FAILED_PRECONDITION",
                                 "ABORTED",
                                 "OUT_OF_RANGE",
                                 "UNIMPLEMENTED",
                                 "INTERNAL",
                                 "UNAVAILABLE",
                                 "DATA_LOSS",
                                 "UNAUTHENTICATED"};
  const int i = static_cast<int>(code);
  return i >= 0 && i <= 16 ? kNames[i] : "UNKNOWN";
}

}  // namespace

Metrics::~Metrics() = default;

absl::StatusOr<std::unique_ptr<Metrics>> Metrics::Start(const std::string& listen, const MetricsTls& tls) {
  std::unique_ptr<Metrics> m(new Metrics());
  m->registry_ = std::make_shared<prometheus::Registry>();
  auto& reg = *m->registry_;
  m->requests_ = &prometheus::BuildCounter().Name("blockd_requests_total").Help("RPCs finished, by method and status code").Register(reg);
  m->duration_ = &prometheus::BuildHistogram().Name("blockd_request_duration_seconds").Help("RPC latency, by method").Register(reg);
  m->inflight_ = &prometheus::BuildGauge().Name("blockd_inflight_requests").Help("RPCs being served now").Register(reg).Add({});
  auto& tokens = prometheus::BuildCounter().Name("blockd_tokens_total").Help("Tokens through blocks (batch * seq * blocks), by pass").Register(reg);
  m->tokens_forward = &tokens.Add({{"pass", "forward"}});
  m->tokens_backward = &tokens.Add({{"pass", "backward"}});
  m->sessions_ = &prometheus::BuildGauge().Name("blockd_sessions_open").Help("Inference sessions open").Register(reg).Add({});
  m->groups_ = &prometheus::BuildGauge().Name("blockd_groups").Help("Replica groups on this daemon (any state)").Register(reg).Add({});
  m->group_collectives_ = &prometheus::BuildCounter().Name("blockd_group_collectives_total").Help("Collective operations of replica groups, by RPC").Register(reg);
  m->group_bytes_ = &prometheus::BuildCounter().Name("blockd_group_collective_bytes_total").Help("Payload bytes of replica-group collectives").Register(reg).Add({});
  m->group_aborted_ = &prometheus::BuildCounter().Name("blockd_group_collectives_aborted_total").Help("Group calls answered ABORTED: a collective failed (a member died or stalled)").Register(reg).Add({});
  m->group_seconds_ = &prometheus::BuildHistogram().Name("blockd_group_collective_seconds").Help("Time in collectives per group call").Register(reg).Add(
      {}, prometheus::Histogram::BucketBoundaries{0.001, 0.01, 0.1, 0.5, 1, 5, 30, 120});
  auto& session_tokens = prometheus::BuildCounter().Name("blockd_session_tokens_total").Help("Tokens appended to inference sessions (rows * new tokens), by phase: decode (one token per row) or prefill").Register(reg);
  m->session_tokens_prefill_ = &session_tokens.Add({{"phase", "prefill"}});
  m->session_tokens_decode_ = &session_tokens.Add({{"phase", "decode"}});
  auto& step = prometheus::BuildHistogram().Name("blockd_session_step_seconds").Help("Inference step latency in the engine (replayed retries excluded), by batch size (rows)").Register(reg);
  for (int64_t rows : {1, 2, 5, 17, 65, 257}) {
    m->session_step_[BatchBucket(rows)] =
        &step.Add({{"batch", BatchBucket(rows)}},
                  prometheus::Histogram::BucketBoundaries{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                                          0.05, 0.1, 0.25, 0.5, 1, 2.5, 10});
  }
  // Powers of two: a launch's sessions are bounded by the worker threads, its rows by
  // --infer_batch_max_rows (256 by default).
  const prometheus::Histogram::BucketBoundaries sizes{1, 2, 4, 8, 16, 32, 64, 128, 256, 512};
  m->launch_sessions_ = &prometheus::BuildHistogram().Name("blockd_session_launch_sessions").Help("Inference steps of different sessions run as one launch (continuous batching), per launch").Register(reg).Add({}, sizes);
  m->launch_rows_ = &prometheus::BuildHistogram().Name("blockd_session_launch_rows").Help("Rows of inference steps run as one launch (continuous batching), per launch").Register(reg).Add({}, sizes);
  m->session_refused_ = &prometheus::BuildCounter().Name("blockd_session_opens_refused_total").Help("OpenSession and ForkSession calls refused, by reason").Register(reg);
  for (const char* reason : {"memory", "client_limit", "invalid_argument", "not_found", "failed_precondition", "id_in_use", "other"}) {
    m->session_refused_->Add({{"reason", reason}});
  }
  m->kv_reserved_ = &prometheus::BuildGauge().Name("blockd_kv_cache_reserved_bytes").Help("Bytes inference sessions' KV caches hold reserved against the memory budget, by device").Register(reg);
  m->kv_available_ = &prometheus::BuildGauge().Name("blockd_kv_cache_available_bytes").Help("Bytes a new inference session may still reserve (the budget less everything in use), by device").Register(reg);
  m->kv_pages_used_ = &prometheus::BuildGauge().Name("blockd_kv_cache_pages_used").Help("KV cache pages written by open sessions (shared pages counted once)").Register(reg).Add({});
  m->kv_bytes_used_ = &prometheus::BuildGauge().Name("blockd_kv_cache_used_bytes").Help("Bytes of the KV cache pages written by open sessions (within their reservations)").Register(reg).Add({});
  m->optimizer_steps = &prometheus::BuildCounter().Name("blockd_optimizer_steps_total").Help("Block AdamW steps applied").Register(reg).Add({});
  m->blocks_ = &prometheus::BuildGauge().Name("blockd_blocks").Help("Blocks resident").Register(reg).Add({});
  m->memory_used_ = &prometheus::BuildGauge().Name("blockd_memory_used_bytes").Help("Bytes reserved by blocks and activations, by device").Register(reg);
  m->memory_budget_ = &prometheus::BuildGauge().Name("blockd_memory_budget_bytes").Help("Memory budget, by device").Register(reg);
  m->device_memory_ = &prometheus::BuildGauge().Name("blockd_device_memory_total_bytes").Help("Total memory of each device").Register(reg);
  m->activations_ = &prometheus::BuildGauge().Name("blockd_activations_held").Help("Activation handles held for Backward").Register(reg).Add({});
  m->bytes_received = &prometheus::BuildCounter().Name("blockd_bytes_received_total").Help("Request bytes received").Register(reg).Add({});
  m->bytes_sent = &prometheus::BuildCounter().Name("blockd_bytes_sent_total").Help("Reply bytes sent").Register(reg).Add({});
  auto& auth = prometheus::BuildCounter().Name("blockd_auth_failures_total").Help("Calls refused on their headers, by reason").Register(reg);
  m->auth_missing_ = &auth.Add({{"reason", "missing_token"}});
  m->auth_unknown_ = &auth.Add({{"reason", "unknown_token"}});
  m->streams_expired = &prometheus::BuildCounter().Name("blockd_streams_expired_total").Help("Streams ended for stalling or running too long").Register(reg).Add({});
  auto& tensor_bytes = prometheus::BuildCounter().Name("blockd_tensor_bytes_total").Help("Activation bytes of Forward, Backward and InferStep tensors, by transport (inline in the message, a POSIX shared-memory region, or CUDA IPC device memory) and direction").Register(reg);
  m->tensor_bytes_inline_in = &tensor_bytes.Add({{"transport", "inline"}, {"direction", "in"}});
  m->tensor_bytes_inline_out = &tensor_bytes.Add({{"transport", "inline"}, {"direction", "out"}});
  m->tensor_bytes_shm_in = &tensor_bytes.Add({{"transport", "shared_memory"}, {"direction", "in"}});
  m->tensor_bytes_shm_out = &tensor_bytes.Add({{"transport", "shared_memory"}, {"direction", "out"}});
  m->tensor_bytes_ipc_in = &tensor_bytes.Add({{"transport", "cuda_ipc"}, {"direction", "in"}});
  m->tensor_bytes_ipc_out = &tensor_bytes.Add({{"transport", "cuda_ipc"}, {"direction", "out"}});
  m->shm_regions = &prometheus::BuildGauge().Name("blockd_shared_memory_regions").Help("Shared-memory regions registered").Register(reg).Add({});
  m->shm_bytes = &prometheus::BuildGauge().Name("blockd_shared_memory_bytes").Help("Bytes of the shared-memory regions registered").Register(reg).Add({});
  m->healthy_ = &prometheus::BuildGauge().Name("blockd_backend_healthy").Help("1 while the backend's device works, 0 after a sticky device error").Register(reg).Add({});
  if (listen.empty()) {  // counters still count; nobody scrapes and no port is opened
    if (!tls.cert_file.empty()) return absl::InvalidArgumentError("--metrics_tls_cert needs --metrics_listen");
    return m;
  }
  if (!tls.cert_file.empty()) {
    auto https = TlsMetricsServer::Start(listen, tls.cert_file, tls.key_file.empty() ? tls.cert_file : tls.key_file,
                                         m->registry_);
    if (!https.ok()) return https.status();
    m->https_ = std::move(*https);
    m->port_ = m->https_->port();
    return m;
  }
  try {
    m->exposer_ = std::make_unique<prometheus::Exposer>(listen);
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("cannot serve metrics on ", listen, ": ", e.what()));
  }
  m->exposer_->RegisterCollectable(m->registry_);
  const auto ports = m->exposer_->GetListeningPorts();
  m->port_ = ports.empty() ? 0 : ports[0];
  return m;
}

void Metrics::AuthFailed(absl::string_view reason) {
  (absl::StartsWith(reason, "missing") ? auth_missing_ : auth_unknown_)->Increment();
}

const char* Metrics::BatchBucket(int64_t rows) {
  if (rows <= 1) return "1";
  if (rows <= 4) return "2-4";
  if (rows <= 16) return "5-16";
  if (rows <= 64) return "17-64";
  if (rows <= 256) return "65-256";
  return "257+";
}

void Metrics::SessionStep(int64_t rows, int64_t new_tokens, double seconds) {
  (new_tokens == 1 ? session_tokens_decode_ : session_tokens_prefill_)->Increment(static_cast<double>(rows * new_tokens));
  session_step_.at(BatchBucket(rows))->Observe(seconds);
}

void Metrics::SessionLaunch(int64_t sessions, int64_t rows) {
  launch_sessions_->Observe(static_cast<double>(sessions));
  launch_rows_->Observe(static_cast<double>(rows));
}

const char* Metrics::RefusalReason(const absl::Status& why) {
  switch (why.code()) {
    case absl::StatusCode::kResourceExhausted:
      // The per-client cap names its flag; every other refusal of this code is the memory budget.
      return absl::StrContains(why.message(), "--max_sessions_per_client") ? "client_limit" : "memory";
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
      return "invalid_argument";
    case absl::StatusCode::kNotFound:
      return "not_found";
    case absl::StatusCode::kFailedPrecondition:
      return "failed_precondition";
    case absl::StatusCode::kAlreadyExists:
      return "id_in_use";
    default:
      return "other";
  }
}

void Metrics::SessionOpenRefused(const absl::Status& why) {
  session_refused_->Add({{"reason", RefusalReason(why)}}).Increment();
}

void Metrics::RequestStarted() { inflight_->Increment(); }

void Metrics::RequestDone(const std::string& method, grpc::StatusCode code, double seconds) {
  inflight_->Decrement();
  requests_->Add({{"method", method}, {"code", CodeName(code)}}).Increment();
  prometheus::Histogram* h;
  {
    absl::MutexLock lock(&mu_);
    auto& slot = histograms_[method];
    if (slot == nullptr) {
      slot = &duration_->Add({{"method", method}},
                             prometheus::Histogram::BucketBoundaries{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                                     0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60});
    }
    h = slot;
  }
  h->Observe(seconds);
}

void Metrics::UpdateEngineGauges(const EngineStats& stats, Backend& backend) {
  blocks_->Set(static_cast<double>(stats.blocks));
  activations_->Set(static_cast<double>(stats.activations_held));
  sessions_->Set(static_cast<double>(stats.sessions_open));
  groups_->Set(static_cast<double>(stats.groups));
  const std::string kind(backend.name());
  for (const auto& [device, bytes] : stats.memory_used) {
    const std::string label = absl::StrCat(kind, ":", device);
    memory_used_->Add({{"device", label}}).Set(static_cast<double>(bytes));
    memory_budget_->Add({{"device", label}}).Set(static_cast<double>(stats.memory_budget.at(device)));
  }
  for (const auto& [device, bytes] : stats.kv_reserved) {
    const std::string label = absl::StrCat(kind, ":", device);
    kv_reserved_->Add({{"device", label}}).Set(static_cast<double>(bytes));
    const int64_t free = stats.memory_budget.count(device) != 0
                             ? stats.memory_budget.at(device) - stats.memory_used.at(device) : 0;
    kv_available_->Add({{"device", label}}).Set(static_cast<double>(std::max<int64_t>(0, free)));
  }
  kv_pages_used_->Set(static_cast<double>(stats.kv_pages_in_use));
  kv_bytes_used_->Set(static_cast<double>(stats.kv_bytes_in_use));
  for (const DeviceInfo& d : backend.devices()) {
    device_memory_->Add({{"device", absl::StrCat(kind, ":", d.index)}}).Set(static_cast<double>(d.memory_total_bytes));
  }
  healthy_->Set(backend.healthy() ? 1 : 0);
}

void Metrics::GroupCollectives(const std::string& rpc, const CollectiveUse& use) {
  if (use.calls > 0) group_collectives_->Add({{"rpc", rpc}}).Increment(static_cast<double>(use.calls));
  group_bytes_->Increment(static_cast<double>(use.bytes));
  if (use.calls > 0) group_seconds_->Observe(use.seconds);
  if (use.aborted) group_aborted_->Increment();
}

}  // namespace blockd
