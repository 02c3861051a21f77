#include "server/server.h"

#include <fstream>
#include <sstream>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/log.h"
#include "base/status_macros.h"
#include "engine/checkpoint.h"

namespace blockd {
namespace {

constexpr char kServiceName[] = "blockd.v1.BlockService";

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> Credentials(const TlsOptions& tls) {
  if (tls.cert_file.empty() && tls.key_file.empty()) {
    if (!tls.client_ca_file.empty()) return absl::InvalidArgumentError("--tls_client_ca needs --tls_cert and --tls_key");
    return grpc::InsecureServerCredentials();
  }
  if (tls.cert_file.empty() || tls.key_file.empty()) {
    return absl::InvalidArgumentError("TLS needs both --tls_cert and --tls_key");
  }
  grpc::SslServerCredentialsOptions ssl;
  ASSIGN_OR_RETURN(std::string cert, ReadFile(tls.cert_file));
  ASSIGN_OR_RETURN(std::string key, ReadFile(tls.key_file));
  ssl.pem_key_cert_pairs.push_back({key, cert});
  if (!tls.client_ca_file.empty()) {
    ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadFile(tls.client_ca_file));
    ssl.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(ssl);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Server>> Server::Start(ServerOptions options, std::unique_ptr<Backend> backend) {
  std::unique_ptr<Server> s(new Server());
  s->options_ = options;
  s->engine_ = std::make_unique<Engine>(std::move(backend), options.engine);
  ASSIGN_OR_RETURN(s->metrics_, Metrics::Start(options.metrics_listen));  // empty: counters only, no port
  ASSIGN_OR_RETURN(s->auth_, Authenticator::FromFiles(options.auth_token_file, options.admin_token_file));
  if (!options.checkpoint_dir.empty()) {
    ASSIGN_OR_RETURN(s->checkpointer_,
                     MakeFileCheckpointer(s->engine_.get(), options.checkpoint_dir, options.checkpoint_every_steps,
                                          options.checkpoint_keep));
    if (options.restore_on_start) {
      auto restored = s->checkpointer_->Restore("", {});
      if (restored.ok()) {
        BLOCKD_LOG(kInfo, "restored ", restored->block_ids.size(), " blocks from ", restored->path);
      } else if (restored.status().code() == absl::StatusCode::kNotFound) {
        BLOCKD_LOG(kInfo, "no checkpoint to restore in ", options.checkpoint_dir);
      } else {
        return restored.status();
      }
    }
  }
  const int threads = options.worker_threads > 0
                          ? options.worker_threads
                          : std::max(4, static_cast<int>(std::thread::hardware_concurrency()));
  s->pool_ = std::make_unique<ThreadPool>(threads);
  s->service_ = std::make_unique<BlockServiceImpl>(s->engine_.get(), s->metrics_.get(), s->pool_.get(),
                                                    s->auth_.get(), s->checkpointer_.get(), options.service);

  ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> creds, Credentials(options.tls));
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen, creds, &s->port_);
  builder.SetMaxReceiveMessageSize(static_cast<int>(std::min<int64_t>(options.service.max_message_bytes, INT32_MAX)));
  builder.SetMaxSendMessageSize(static_cast<int>(std::min<int64_t>(options.service.max_message_bytes, INT32_MAX)));
  // Activations are tens of MB: large HTTP/2 frames and a deep per-stream window (as the clients set).
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_FRAME_SIZE, (1 << 24) - 1);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 64 << 20);
  builder.RegisterService(s->service_.get());
  s->grpc_server_ = builder.BuildAndStart();
  if (s->grpc_server_ == nullptr || s->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.listen));
  }
  grpc::HealthCheckServiceInterface* health = s->grpc_server_->GetHealthCheckService();
  health->SetServingStatus(true);
  health->SetServingStatus(kServiceName, true);
  s->housekeeping_ = std::thread([srv = s.get()] { srv->Housekeeping(); });
  BLOCKD_LOG(kInfo, "serving blockd.v1.BlockService on ", options.listen, " (port ", s->port_, "), metrics on port ",
             s->metrics_port(), ", backend ", s->engine_->backend().name());
  return s;
}

void Server::Housekeeping() {
  bool serving = true;
  do {
    const int64_t expired = engine_->ExpireActivations();
    if (expired > 0) BLOCKD_LOG(kInfo, "expired ", expired, " activation handles past their TTL");
    const std::vector<std::string> leased_out = engine_->ExpireBlocks();
    if (!leased_out.empty()) {
      BLOCKD_LOG(kInfo, "deleted blocks idle past their lease: ", absl::StrJoin(leased_out, ", "));
    }
    metrics_->UpdateEngineGauges(engine_->Stats(), engine_->backend());
    if (serving && !engine_->backend().healthy()) {
      serving = false;
      BLOCKD_LOG(kError, "the ", engine_->backend().name(), " device is broken (sticky error): health is NOT_SERVING");
      grpc_server_->GetHealthCheckService()->SetServingStatus(false);
    }
  } while (!stop_housekeeping_.WaitForNotificationWithTimeout(options_.housekeeping_period));
}

void Server::Drain() {
  if (grpc_server_ == nullptr) return;  // Start failed before serving: nothing to drain
  {
    absl::MutexLock lock(&drain_mu_);
    if (drained_) return;
    drained_ = true;
  }
  BLOCKD_LOG(kInfo, "draining: health NOT_SERVING, new calls UNAVAILABLE, ", service_->inflight(), " in flight");
  grpc_server_->GetHealthCheckService()->SetServingStatus(false);
  service_->SetDraining();
  if (options_.drain_grace > absl::ZeroDuration()) absl::SleepFor(options_.drain_grace);
  grpc_server_->Shutdown(std::chrono::system_clock::now() +
                         std::chrono::milliseconds(absl::ToInt64Milliseconds(options_.shutdown_timeout)));
  grpc_server_->Wait();
  stop_housekeeping_.Notify();
  if (housekeeping_.joinable()) housekeeping_.join();
  pool_.reset();  // runs what is queued, then joins
  BLOCKD_LOG(kInfo, "stopped");
  stopped_.Notify();
}

void Server::Wait() { stopped_.WaitForNotification(); }

Server::~Server() { Drain(); }

}  // namespace blockd
