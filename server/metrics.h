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

namespace blockd {

class Metrics {
 public:
  // Starts the HTTP exposer on `listen` ("host:port"; port 0 picks one); empty: no exposer, port 0.
  static absl::StatusOr<std::unique_ptr<Metrics>> Start(const std::string& listen);

  int port() const { return port_; }
  void RequestStarted();
  void RequestDone(const std::string& method, grpc::StatusCode code, double seconds);
  // Gauges that describe the engine's state; polled off the request path.
  void UpdateEngineGauges(const EngineStats& stats, Backend& backend);

  prometheus::Counter* tokens_forward = nullptr;
  prometheus::Counter* tokens_backward = nullptr;
  prometheus::Counter* optimizer_steps = nullptr;
  prometheus::Counter* bytes_received = nullptr;
  prometheus::Counter* bytes_sent = nullptr;

 private:
  Metrics() = default;

  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  int port_ = 0;
  prometheus::Family<prometheus::Counter>* requests_ = nullptr;
  prometheus::Family<prometheus::Histogram>* duration_ = nullptr;
  prometheus::Family<prometheus::Gauge>* memory_used_ = nullptr;
  prometheus::Family<prometheus::Gauge>* memory_budget_ = nullptr;
  prometheus::Family<prometheus::Gauge>* device_memory_ = nullptr;
  prometheus::Gauge* inflight_ = nullptr;
  prometheus::Gauge* blocks_ = nullptr;
  prometheus::Gauge* activations_ = nullptr;
  prometheus::Gauge* healthy_ = nullptr;

  absl::Mutex mu_;
  std::map<std::string, prometheus::Histogram*> histograms_ ABSL_GUARDED_BY(mu_);
};

}  // namespace blockd
