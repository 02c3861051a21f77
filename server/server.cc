#include "server/server.h"

#include "engine/collective_gloo.h"
#ifdef BLOCKD_HAVE_CUDA
#include "engine/collective_nccl.h"
#endif

#include <sched.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <vector>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/resource_quota.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/log.h"
#include "base/status_macros.h"
#include "engine/checkpoint.h"
#include "server/reflection_v1.h"

namespace blockd {
namespace {

constexpr char kServiceName[] = "blockd.v1.BlockService";
constexpr char kGuardedPrefix[] = "/blockd.v1.BlockService/";

// The cores this process may use: the CPUs it may run on (its affinity: taskset, a cpuset, a
// static CPU manager), or fewer under a CPU quota (a Kubernetes CPU limit, systemd's CPUQuota) on
// its cgroup or any cgroup above it, v2 or v1; a spinning worker would spend one of them.
double UsableCores() {
  double cores = std::thread::hardware_concurrency();
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) cores = CPU_COUNT(&set);
  auto quota = [&cores](const std::string& dir) {
    std::ifstream v2(dir + "/cpu.max");
    std::string max;
    double period = 0;
    if (v2 >> max >> period && period > 0) {
      const double q = std::strtod(max.c_str(), nullptr);  // "max": no quota, reads as 0
      if (q > 0) cores = std::min(cores, q / period);
    }
    std::ifstream v1_quota(dir + "/cpu.cfs_quota_us"), v1_period(dir + "/cpu.cfs_period_us");
    double q = -1, p = 0;
    if (v1_quota >> q && v1_period >> p && q > 0 && p > 0) cores = std::min(cores, q / p);
  };
  // /proc/self/cgroup: "0::/path" (v2), "N:cpu,cpuacct:/path" (v1); the mounts hold each level.
  std::ifstream self("/proc/self/cgroup");
  if (!self.is_open()) {
    for (const char* dir : {"/sys/fs/cgroup", "/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"}) quota(dir);
  }
  for (std::string line; std::getline(self, line);) {
    const size_t a = line.find(':'), b = a == std::string::npos ? a : line.find(':', a + 1);
    if (b == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, b - a - 1);
    std::string path = line.substr(b + 1);
    std::vector<std::string> roots;
    if (controllers.empty()) {
      roots = {"/sys/fs/cgroup"};
    } else if (absl::StrContains(absl::StrCat(",", controllers, ","), ",cpu,")) {
      roots = {"/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpuacct,cpu"};
    } else {
      continue;
    }
    for (;;) {  // the cgroup and each one above it
      for (const std::string& root : roots) quota(path == "/" ? root : root + path);
      if (path.empty() || path == "/") break;
      const size_t slash = path.rfind('/');
      path = slash == 0 || slash == std::string::npos ? "/" : path.substr(0, slash);
    }
  }
  return cores;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Server>> Server::Start(ServerOptions options, std::unique_ptr<Backend> backend) {
  if (options.worker_spin_us < -1 || options.worker_spin_us > 1000000) {
    return absl::InvalidArgumentError(absl::StrCat("worker_spin_us = ", options.worker_spin_us,
                                                   ", expected -1 (auto), 0 (sleep at once) or up to 1000000"));
  }
  std::unique_ptr<Server> s(new Server());
  s->options_ = options;
  ASSIGN_OR_RETURN(s->metrics_, Metrics::Start(options.metrics_listen, options.metrics_tls));  // empty: no port
  // Every launch of session steps feeds the launch-size histograms, besides any hook of the caller's.
  EngineOptions engine_options = options.engine;
  engine_options.on_infer_batch = [metrics = s->metrics_.get(), also = options.engine.on_infer_batch](
                                      int64_t sessions, int64_t rows) {
    metrics->SessionLaunch(sessions, rows);
    if (also) also(sessions, rows);
  };
  s->engine_ = std::make_unique<Engine>(std::move(backend), engine_options);
  GlooOptions gloo;
  gloo.advertise_host = options.collective_host;
  s->engine_->AddCollectiveProvider(MakeGlooProvider(gloo));
#ifdef BLOCKD_HAVE_CUDA
  // Groups of CUDA blocks; the engine refuses NCCL ids on a daemon whose backend is the CPU.
  NcclOptions nccl;
  nccl.advertise_host = options.collective_host;
  s->engine_->AddCollectiveProvider(MakeNcclProvider(nccl));
#endif
  ASSIGN_OR_RETURN(std::unique_ptr<Authenticator> auth, Authenticator::FromFiles({options.token_file, options.auth_token_file, options.admin_token_file}));
  s->auth_ = std::move(auth);
  s->auth_log_ = std::make_unique<RateLimitedLog>(/*per_minute=*/20);
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
  // A spinning worker takes a core while the daemon waits for calls: only where there are cores
  // to spare, unless asked.
  const double usable = UsableCores();
  const int spin_us = options.worker_spin_us >= 0 ? options.worker_spin_us : usable >= 8 ? 1000 : 0;
  BLOCKD_LOG(kDebug, "idle workers watch for calls for ", spin_us, " us before they sleep (", usable,
             " usable cores)");
  s->pool_ = std::make_unique<ThreadPool>(threads, absl::Microseconds(spin_us));
  options.service.identity_from_credentials = s->auth_->enabled() || !options.tls.client_ca_file.empty();
  s->service_ = std::make_unique<BlockServiceImpl>(s->engine_.get(), s->metrics_.get(), s->pool_.get(),
                                                    s->auth_.get(), s->checkpointer_.get(), options.service);

  ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> creds,
                   MakeServerCredentials(options.tls, s->auth_, kGuardedPrefix,
                                         [srv = s.get()](absl::string_view method, const absl::Status& why) {
                                           srv->OnAuthFailure(method, why);
                                         }));
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();  // grpc.reflection.v1alpha
  s->reflection_v1_ = MakeReflectionV1Service();                // grpc.reflection.v1, the same answers
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen, creds, &s->port_);
  // Bounds what gRPC holds for calls before any handler admits them (read buffers, requests
  // still arriving), whoever sends them: under pressure it shrinks windows and drops idle
  // connections instead of growing without limit.
  const int64_t grpc_memory = options.grpc_memory_bytes > 0
                                  ? options.grpc_memory_bytes
                                  : std::max<int64_t>(int64_t{2} << 30, 8 * options.service.max_message_bytes);
  grpc::ResourceQuota quota("blockd");
  quota.Resize(static_cast<size_t>(grpc_memory));
  builder.SetResourceQuota(quota);
  builder.RegisterService(s->reflection_v1_.get());
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

void Server::OnAuthFailure(absl::string_view method, const absl::Status& why) {
  metrics_->AuthFailed(why.message());
  auth_log_->Warn(absl::StrCat("refused a call to ", method, ": ", why.message()));
}

void Server::Housekeeping() {
  bool serving = true;
  do {
    const int64_t expired = engine_->ExpireActivations();
    if (expired > 0) BLOCKD_LOG(kInfo, "expired ", expired, " activation handles past their TTL");
    const int64_t sessions_expired = engine_->ExpireSessions();
    if (sessions_expired > 0) BLOCKD_LOG(kInfo, "closed ", sessions_expired, " inference sessions past their TTL");
    const int64_t regions_expired = service_->shared_memory().Expire();
    if (regions_expired > 0) BLOCKD_LOG(kInfo, "unregistered ", regions_expired, " shared-memory regions past their TTL");
    metrics_->shm_regions->Set(static_cast<double>(service_->shared_memory().regions()));
    metrics_->shm_bytes->Set(static_cast<double>(service_->shared_memory().registered_bytes()));
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

int64_t Server::inflight_calls() const { return service_->inflight(); }

}  // namespace blockd
