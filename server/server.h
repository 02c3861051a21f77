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
#include "server/metrics.h"
#include "server/service.h"
#include "server/thread_pool.h"

namespace blockd {

struct TlsOptions {
  std::string cert_file, key_file;  // both set: serve TLS
  std::string client_ca_file;       // set: require client certificates signed by this CA (mTLS)
};

struct ServerOptions {
  std::string listen = "0.0.0.0:50051";
  std::string metrics_listen = "0.0.0.0:9464";  // empty: no metrics endpoint
  int worker_threads = 0;                       // 0: max(4, hardware threads)
  absl::Duration housekeeping_period = absl::Seconds(1);
  absl::Duration drain_grace = absl::ZeroDuration();         // NOT_SERVING before the listener stops
  absl::Duration shutdown_timeout = absl::Seconds(30);       // for in-flight calls to finish
  std::string auth_token_file, admin_token_file;
  TlsOptions tls;
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

  // Health NOT_SERVING and UNAVAILABLE for new calls; after drain_grace the listener stops and
  // in-flight calls get up to shutdown_timeout to finish. Idempotent; returns when stopped.
  void Drain();
  // Blocks until Drain() has finished.
  void Wait();

 private:
  Server() = default;
  void Housekeeping();

  ServerOptions options_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<Authenticator> auth_;
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
