#include "server/metrics.h"

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
  m->tokens_generated = &prometheus::BuildCounter().Name("blockd_session_tokens_total").Help("Tokens appended to inference sessions (batch * new tokens)").Register(reg).Add({});
  m->sessions_ = &prometheus::BuildGauge().Name("blockd_sessions_open").Help("Inference sessions open").Register(reg).Add({});
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
  auto& tensor_bytes = prometheus::BuildCounter().Name("blockd_tensor_bytes_total").Help("Activation bytes of Forward, Backward and InferStep tensors, by transport (inline in the message, or a shared-memory region) and direction").Register(reg);
  m->tensor_bytes_inline_in = &tensor_bytes.Add({{"transport", "inline"}, {"direction", "in"}});
  m->tensor_bytes_inline_out = &tensor_bytes.Add({{"transport", "inline"}, {"direction", "out"}});
  m->tensor_bytes_shm_in = &tensor_bytes.Add({{"transport", "shared_memory"}, {"direction", "in"}});
  m->tensor_bytes_shm_out = &tensor_bytes.Add({{"transport", "shared_memory"}, {"direction", "out"}});
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
  const std::string kind(backend.name());
  for (const auto& [device, bytes] : stats.memory_used) {
    const std::string label = absl::StrCat(kind, ":", device);
    memory_used_->Add({{"device", label}}).Set(static_cast<double>(bytes));
    memory_budget_->Add({{"device", label}}).Set(static_cast<double>(stats.memory_budget.at(device)));
  }
  for (const DeviceInfo& d : backend.devices()) {
    device_memory_->Add({{"device", absl::StrCat(kind, ":", d.index)}}).Set(static_cast<double>(d.memory_total_bytes));
  }
  healthy_->Set(backend.healthy() ? 1 : 0);
}

}  // namespace blockd
