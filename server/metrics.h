// blockd's Prometheus metrics: every family registered once here, exposed on their own port.
//
//   ASSIGN_OR_RETURN(auto metrics, Metrics::Start("0.0.0.0:9464"));
//   metrics->RequestDone("Forward", grpc::StatusCode::OK, seconds);
//   metrics->tokens_forward->Increment(batch * seq * blocks);
#pragma once

#include <map>
#include <memory>
#include <string>

#include <grpcpp/support/status_code_enum.h>
#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "engine/engine.h"
#include "server/metrics_tls.h"

namespace blockd {

// /metrics over HTTPS: a PEM certificate chain and its key (empty key_file: the key is in cert_file).
struct MetricsTls {
  std::string cert_file, key_file;
};

class Metrics {
 public:
  // Starts the HTTP exposer on `listen` ("host:port"; port 0 picks one); empty: no exposer, port 0.
  // With `tls.cert_file`, /metrics is served over HTTPS only, by TlsMetricsServer (civetweb's TLS
  // crashes on Debian 12's OpenSSL 3; see metrics_tls.h).
  static absl::StatusOr<std::unique_ptr<Metrics>> Start(const std::string& listen, const MetricsTls& tls = {});

  ~Metrics();
  int port() const { return port_; }
  void RequestStarted();
  void RequestDone(const std::string& method, grpc::StatusCode code, double seconds);
  // Gauges that describe the engine's state; polled off the request path.
  void UpdateEngineGauges(const EngineStats& stats, Backend& backend);
  // A call refused on its headers (no token, an unknown token), by the reason's first words.
  void AuthFailed(absl::string_view reason);
  // The collectives one group call (JoinGroup, Step, GradNorm) ran, and whether one failed.
  void GroupCollectives(const std::string& rpc, const CollectiveUse& use);
  // An inference step that ran (not a replayed retry): `rows` x `new_tokens` tokens, counted as
  // decode when each row got one token, else prefill; its latency, by batch-size bucket.
  void SessionStep(int64_t rows, int64_t new_tokens, double seconds);
  // An OpenSession or ForkSession refused, by reason (memory, client_limit, invalid_argument, ...).
  void SessionOpenRefused(const absl::Status& why);
  // One launch of inference steps (EngineOptions::on_infer_batch): how many sessions' steps and
  // rows it ran together (blockd_session_launch_sessions, blockd_session_launch_rows).
  void SessionLaunch(int64_t sessions, int64_t rows);
  // The label SessionStep files a step of `rows` rows under: "1", "2-4", "5-16", "17-64", "65-256", "257+".
  static const char* BatchBucket(int64_t rows);
  static const char* RefusalReason(const absl::Status& why);

  prometheus::Counter* tokens_forward = nullptr;
  prometheus::Counter* tokens_backward = nullptr;
  prometheus::Counter* optimizer_steps = nullptr;
  prometheus::Counter* bytes_received = nullptr;
  prometheus::Counter* bytes_sent = nullptr;
  prometheus::Counter* streams_expired = nullptr;  // ended by the stream watchdog
  // Activation bytes of Forward/Backward/InferStep tensors, by transport and direction
  // (blockd_tensor_bytes_total{transport="inline"|"shared_memory"|"cuda_ipc", direction="in"|"out"}).
  prometheus::Counter* tensor_bytes_inline_in = nullptr;
  prometheus::Counter* tensor_bytes_inline_out = nullptr;
  prometheus::Counter* tensor_bytes_shm_in = nullptr;
  prometheus::Counter* tensor_bytes_shm_out = nullptr;
  prometheus::Counter* tensor_bytes_ipc_in = nullptr;  // transport="cuda_ipc"
  prometheus::Counter* tensor_bytes_ipc_out = nullptr;
  // Shared-memory regions registered now, and their bytes; set by the housekeeping thread.
  prometheus::Gauge* shm_regions = nullptr;
  prometheus::Gauge* shm_bytes = nullptr;

 private:
  Metrics() = default;

  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::unique_ptr<TlsMetricsServer> https_;
  int port_ = 0;
  prometheus::Family<prometheus::Counter>* requests_ = nullptr;
  prometheus::Family<prometheus::Histogram>* duration_ = nullptr;
  prometheus::Family<prometheus::Gauge>* memory_used_ = nullptr;
  prometheus::Family<prometheus::Gauge>* memory_budget_ = nullptr;
  prometheus::Family<prometheus::Gauge>* device_memory_ = nullptr;
  prometheus::Gauge* inflight_ = nullptr;
  prometheus::Gauge* blocks_ = nullptr;
  prometheus::Gauge* activations_ = nullptr;
  prometheus::Gauge* sessions_ = nullptr;
  prometheus::Gauge* groups_ = nullptr;
  prometheus::Family<prometheus::Counter>* group_collectives_ = nullptr;
  prometheus::Counter* group_bytes_ = nullptr;
  prometheus::Counter* group_aborted_ = nullptr;
  prometheus::Histogram* group_seconds_ = nullptr;
  prometheus::Counter* session_tokens_prefill_ = nullptr;
  prometheus::Counter* session_tokens_decode_ = nullptr;
  std::map<std::string, prometheus::Histogram*> session_step_;  // by batch bucket, all made at Start
  prometheus::Histogram* launch_sessions_ = nullptr;
  prometheus::Histogram* launch_rows_ = nullptr;
  prometheus::Family<prometheus::Counter>* session_refused_ = nullptr;
  prometheus::Family<prometheus::Gauge>* kv_reserved_ = nullptr;
  prometheus::Family<prometheus::Gauge>* kv_available_ = nullptr;
  prometheus::Gauge* kv_pages_used_ = nullptr;
  prometheus::Gauge* kv_bytes_used_ = nullptr;
  prometheus::Gauge* healthy_ = nullptr;
  prometheus::Counter* auth_missing_ = nullptr;
  prometheus::Counter* auth_unknown_ = nullptr;

  absl::Mutex mu_;
  std::map<std::string, prometheus::Histogram*> histograms_ ABSL_GUARDED_BY(mu_);
};

}  // namespace blockd
