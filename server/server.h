// The blockd server: BlockService, grpc.health.v1, server reflection and the metrics exposer
// around one Engine, with a housekeeping thread (activation TTLs, block leases, gauges, health) and a drain.
// main() and the integration tests both start it through Server::Start.
//
//   ServerOptions o;  o.listen = "127.0.0.1:0";  o.metrics_listen = "127.0.0.1:0";
//   ASSIGN_OR_RETURN(auto server, Server::Start(o, MakeCpuBackend()));
//   ... server->port() ...
//   server->Drain();  // NOT_SERVING, UNAVAILABLE for new calls, finish in-flight, stop
#pragma once

#include <memory>
#include <string>
#include <thread>

#include <grpcpp/server.h>

#include "absl/status/statusor.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "engine/engine.h"
#include "server/auth.h"
#include "server/credentials.h"
#include "server/metrics.h"
#include "server/service.h"
#include "server/thread_pool.h"

namespace blockd {

struct ServerOptions {
  std::string listen = "0.0.0.0:50051";
  std::string metrics_listen = "0.0.0.0:9464";  // empty: no metrics endpoint
  std::string collective_host;                  // replica groups: how peers reach us ("": hostname)
  MetricsTls metrics_tls;                       // set: /metrics over HTTPS only
  int worker_threads = 0;                       // 0: max(4, hardware threads)
  int worker_spin_us = -1;                      // ThreadPool's spin; -1: 1000 with 8+ usable cores, else 0
  absl::Duration housekeeping_period = absl::Seconds(1);
  absl::Duration drain_grace = absl::ZeroDuration();         // NOT_SERVING before the listener stops
  absl::Duration shutdown_timeout = absl::Seconds(30);       // for in-flight calls to finish
  std::string token_file;                        // NAME ROLE TOKEN lines (server/auth.h)
  std::string auth_token_file, admin_token_file;  // one token per line: train and admin
  TlsOptions tls;
  // Bytes gRPC may hold for calls (read buffers, messages not yet handed to a handler) across all
  // connections; past it gRPC shrinks flow-control windows and reclaims idle connections.
  // 0: max(2 GiB, 8 x --max_message_bytes): well above what admitted calls of a busy GPU daemon
  // hold, since past the quota gRPC also cancels streams ("Buffers full").
  int64_t grpc_memory_bytes = 0;
  std::string checkpoint_dir;
  int64_t checkpoint_every_steps = 0;
  int checkpoint_keep = 3;  // automatic checkpoints kept; named ones are never rotated away
  bool restore_on_start = false;
  ServiceOptions service;
  EngineOptions engine;
};

class Server {
 public:
  static absl::StatusOr<std::unique_ptr<Server>> Start(ServerOptions options, std::unique_ptr<Backend> backend);
  ~Server();

  int port() const { return port_; }
  int metrics_port() const { return metrics_ ? metrics_->port() : 0; }
  Engine& engine() { return *engine_; }
  // Calls being served now, refused ones included until their status is sent.
  int64_t inflight_calls() const;

  // Health NOT_SERVING and UNAVAILABLE for new calls; after drain_grace the listener stops and
  // in-flight calls get up to shutdown_timeout to finish. Idempotent; returns when stopped.
  void Drain();
  // Blocks until Drain() has finished.
  void Wait();

 private:
  Server() = default;
  void Housekeeping();
  void OnAuthFailure(absl::string_view method, const absl::Status& why);

  ServerOptions options_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<Metrics> metrics_;
  std::shared_ptr<const Authenticator> auth_;
  std::unique_ptr<RateLimitedLog> auth_log_;
  std::unique_ptr<grpc::Service> reflection_v1_;
  std::unique_ptr<Checkpointer> checkpointer_;
  std::unique_ptr<ThreadPool> pool_;
  std::unique_ptr<BlockServiceImpl> service_;
  std::unique_ptr<grpc::Server> grpc_server_;
  int port_ = 0;
  absl::Mutex drain_mu_;
  bool drained_ ABSL_GUARDED_BY(drain_mu_) = false;
  absl::Notification stop_housekeeping_;
  absl::Notification stopped_;
  std::thread housekeeping_;
};

}  // namespace blockd
