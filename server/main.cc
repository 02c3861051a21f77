// blockd: serves transformer decoder blocks over gRPC. See README.md for the flags.
//   blockd --listen=0.0.0.0:50051 --metrics_listen=0.0.0.0:9464 --backend=auto
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "base/log.h"
#include "base/malloc_tuning.h"
#include "server/backend_select.h"
#include "server/server.h"

ABSL_FLAG(std::string, listen, "0.0.0.0:50051", "gRPC address ADDR:PORT");
ABSL_FLAG(std::string, collective_host, "",
          "Name or address other replica-group members reach this daemon by, for Gloo's rendezvous store "
          "and connections (empty: this host's name)");
ABSL_FLAG(std::string, metrics_listen, "0.0.0.0:9464",
          "Prometheus metrics address ADDR:PORT (empty: off; 127.0.0.1:9464 keeps it on the host)");
ABSL_FLAG(std::string, metrics_tls_cert, "", "PEM certificate chain (and key, unless --metrics_tls_key): /metrics over HTTPS only");
ABSL_FLAG(std::string, metrics_tls_key, "", "PEM private key for --metrics_tls_cert");
ABSL_FLAG(std::string, backend, "auto", "auto (CUDA when a GPU works, else CPU), cpu or cuda");
ABSL_FLAG(std::string, attention, "auto",
          "attention kernels of bf16 CUDA blocks: auto (cuDNN's fused attention when it loads and accepts the "
          "block, else blockd's own), cudnn (required: refuse to start or to create a block without it) or native");
ABSL_FLAG(int64_t, max_message_bytes, 256ll << 20, "largest gRPC message accepted or sent");
ABSL_FLAG(int64_t, memory_budget_bytes, 0, "per-device memory budget for blocks and activations (0: 90% of the device)");
ABSL_FLAG(absl::Duration, activation_ttl, absl::Minutes(10), "activation handles not used by Backward within this are freed");
ABSL_FLAG(int64_t, max_blocks, 4096, "most blocks held at once");
ABSL_FLAG(int64_t, max_activations_per_client, 256, "most activation handles one client may hold");
ABSL_FLAG(absl::Duration, session_ttl, absl::Minutes(10), "inference sessions opened with ttl_seconds 0 close after this long without a call");
ABSL_FLAG(int64_t, max_sessions_per_client, 64, "most inference sessions one client may hold open");
ABSL_FLAG(bool, allow_shared_memory, false,
          "let clients on this host pass Forward/Backward/InferStep tensors through POSIX shared-memory regions "
          "they register (RegisterSharedMemory) instead of inside messages");
ABSL_FLAG(int64_t, max_shared_memory_regions_per_client, 16, "shared-memory regions one client may register");
ABSL_FLAG(int64_t, max_shared_memory_bytes_per_client, 16ll << 30, "bytes of shared-memory regions one client may register");
ABSL_FLAG(absl::Duration, shared_memory_ttl, absl::Minutes(10), "shared-memory regions no call used for this long are unregistered");
ABSL_FLAG(absl::Duration, infer_batch_window, absl::Microseconds(200),
          "steps of sessions on the same blocks arriving within this run as one batched launch (0: off)");
ABSL_FLAG(int64_t, infer_batch_max_rows, 256, "most rows in one batched launch of session steps");
ABSL_FLAG(bool, infer_graphs, true,
          "replay a session's decode steps over a span on one GPU as one captured CUDA graph");
ABSL_FLAG(int64_t, max_concurrent_rpcs, 256, "calls served at once; more get RESOURCE_EXHAUSTED");
ABSL_FLAG(int64_t, max_concurrent_rpcs_per_client, 0,
          "calls one client identity may have in flight (0: max(1, max_concurrent_rpcs / 4))");
ABSL_FLAG(absl::Duration, stream_idle_timeout, absl::Seconds(60),
          "LoadWeights/DownloadTensors streams idle this long end with DEADLINE_EXCEEDED (0: never)");
ABSL_FLAG(absl::Duration, stream_max_duration, absl::Minutes(30),
          "LoadWeights/DownloadTensors streams end with DEADLINE_EXCEEDED after this long (0: never)");
ABSL_FLAG(int64_t, grpc_memory_bytes, 0,
          "memory gRPC may hold for calls not yet admitted (0: max(2 GiB, 8 x max_message_bytes))");
ABSL_FLAG(int64_t, default_max_seq_len, 4096, "max_seq_len of a block created with 0");
ABSL_FLAG(int64_t, default_max_batch_size, 8, "max_batch_size of a block created with 0");
ABSL_FLAG(int, worker_threads, 0, "threads running engine work (0: max(4, cores))");
ABSL_FLAG(int, worker_spin_us, -1,
          "microseconds an idle worker watches for the next call before it sleeps, one worker at a time, so "
          "that a call following closely (a decode step) starts at once (0: sleep at once; -1: 1000 where 8 or "
          "more cores are usable, hardware threads or a cgroup CPU quota, else 0)");
ABSL_FLAG(std::string, log_level, "info", "debug, info, warning or error");
ABSL_FLAG(absl::Duration, drain_grace, absl::ZeroDuration(), "on SIGTERM, report NOT_SERVING this long before closing the listener");
ABSL_FLAG(absl::Duration, shutdown_timeout, absl::Seconds(30), "on SIGTERM, how long in-flight calls may take to finish");
ABSL_FLAG(std::string, checkpoint_dir, "", "directory for SaveCheckpoint/RestoreCheckpoint (empty: checkpoints off)");
ABSL_FLAG(int64_t, checkpoint_every_steps, 0, "save every block after every N successful Steps (0: never)");
ABSL_FLAG(int, checkpoint_keep, 3, "automatic checkpoints kept (the newest N); checkpoints saved under a name are never deleted");
ABSL_FLAG(bool, restore_on_start, false, "restore the latest checkpoint of --checkpoint_dir at start");
ABSL_FLAG(std::string, tls_cert, "", "PEM certificate chain: serve TLS");
ABSL_FLAG(std::string, tls_key, "", "PEM private key for --tls_cert");
ABSL_FLAG(std::string, tls_client_ca, "", "PEM CA: require client certificates it signed (mutual TLS)");
ABSL_FLAG(std::string, token_file, "", "bearer tokens with roles, lines `NAME ROLE TOKEN` (role: read, train, admin)");
ABSL_FLAG(std::string, auth_token_file, "",
          "bearer tokens, one per line: role train (admin when no admin token exists)");
ABSL_FLAG(std::string, admin_token_file, "", "bearer tokens, one per line: role admin");

namespace {

constexpr char kVersion[] = "0.1.0";

// SIGTERM/SIGINT may land on any thread (libraries start threads before main), so the handler
// only writes the signal number to a pipe that one thread reads.
int signal_pipe[2] = {-1, -1};

void OnSignal(int sig) {
  const unsigned char b = static_cast<unsigned char>(sig);
  [[maybe_unused]] ssize_t n = write(signal_pipe[1], &b, 1);
}

int Run(bool malloc_tuned) {
  blockd::LogLevel level;
  if (!blockd::ParseLogLevel(absl::GetFlag(FLAGS_log_level), &level)) {
    std::fprintf(stderr, "--log_level=%s: expected debug, info, warning or error\n",
                 absl::GetFlag(FLAGS_log_level).c_str());
    return 2;
  }
  blockd::SetLogLevel(level);
  BLOCKD_LOG(kDebug, malloc_tuned ? "malloc tuned for large buffers" : "malloc left at glibc's defaults");

  if (pipe(signal_pipe) != 0) return 1;
  struct sigaction sa = {};
  sa.sa_handler = OnSignal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  signal(SIGPIPE, SIG_IGN);

  auto choice = blockd::SelectBackend(absl::GetFlag(FLAGS_backend), absl::GetFlag(FLAGS_attention));
  if (!choice.ok()) {
    BLOCKD_LOG(kError, choice.status().message());
    return 1;
  }
  BLOCKD_LOG(kInfo, "backend ", choice->backend->name(), ": ", choice->reason);
  BLOCKD_LOG(kInfo, "attention ", choice->attention.backend, ": ", choice->attention.reason);

  blockd::ServerOptions o;
  o.listen = absl::GetFlag(FLAGS_listen);
  o.metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  o.collective_host = absl::GetFlag(FLAGS_collective_host);
  o.metrics_tls = {absl::GetFlag(FLAGS_metrics_tls_cert), absl::GetFlag(FLAGS_metrics_tls_key)};
  o.worker_threads = absl::GetFlag(FLAGS_worker_threads);
  o.worker_spin_us = absl::GetFlag(FLAGS_worker_spin_us);
  o.drain_grace = absl::GetFlag(FLAGS_drain_grace);
  o.shutdown_timeout = absl::GetFlag(FLAGS_shutdown_timeout);
  o.checkpoint_dir = absl::GetFlag(FLAGS_checkpoint_dir);
  o.checkpoint_every_steps = absl::GetFlag(FLAGS_checkpoint_every_steps);
  o.checkpoint_keep = absl::GetFlag(FLAGS_checkpoint_keep);
  o.restore_on_start = absl::GetFlag(FLAGS_restore_on_start);
  o.tls = {absl::GetFlag(FLAGS_tls_cert), absl::GetFlag(FLAGS_tls_key), absl::GetFlag(FLAGS_tls_client_ca)};
  o.token_file = absl::GetFlag(FLAGS_token_file);
  o.auth_token_file = absl::GetFlag(FLAGS_auth_token_file);
  o.admin_token_file = absl::GetFlag(FLAGS_admin_token_file);
  o.grpc_memory_bytes = absl::GetFlag(FLAGS_grpc_memory_bytes);
  o.service.version = kVersion;
  o.service.backend_reason = choice->reason;
  o.service.attention_backend = choice->attention.backend;
  o.service.attention_reason = choice->attention.reason;
  o.service.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  o.service.max_concurrent_rpcs = absl::GetFlag(FLAGS_max_concurrent_rpcs);
  o.service.max_concurrent_rpcs_per_client = absl::GetFlag(FLAGS_max_concurrent_rpcs_per_client);
  o.service.stream_idle_timeout = absl::GetFlag(FLAGS_stream_idle_timeout);
  o.service.stream_max_duration = absl::GetFlag(FLAGS_stream_max_duration);
  o.service.shared_memory.allowed = absl::GetFlag(FLAGS_allow_shared_memory);
  o.service.shared_memory.max_regions_per_client = absl::GetFlag(FLAGS_max_shared_memory_regions_per_client);
  o.service.shared_memory.max_bytes_per_client = absl::GetFlag(FLAGS_max_shared_memory_bytes_per_client);
  o.service.shared_memory.ttl = absl::GetFlag(FLAGS_shared_memory_ttl);
  o.engine.memory_budget_bytes = absl::GetFlag(FLAGS_memory_budget_bytes);
  o.engine.activation_ttl = absl::GetFlag(FLAGS_activation_ttl);
  o.engine.max_blocks = absl::GetFlag(FLAGS_max_blocks);
  o.engine.max_activations_per_client = absl::GetFlag(FLAGS_max_activations_per_client);
  o.engine.default_session_ttl = absl::GetFlag(FLAGS_session_ttl);
  o.engine.max_sessions_per_client = absl::GetFlag(FLAGS_max_sessions_per_client);
  o.engine.infer_batch_window = absl::GetFlag(FLAGS_infer_batch_window);
  o.engine.infer_batch_max_rows = absl::GetFlag(FLAGS_infer_batch_max_rows);
  o.engine.infer_graphs = absl::GetFlag(FLAGS_infer_graphs);
  o.engine.default_max_seq_len = absl::GetFlag(FLAGS_default_max_seq_len);
  o.engine.default_max_batch_size = absl::GetFlag(FLAGS_default_max_batch_size);

  auto server = blockd::Server::Start(o, std::move(choice->backend));
  if (!server.ok()) {
    BLOCKD_LOG(kError, "cannot start: ", server.status().message());
    return 1;
  }
  std::thread signal_thread([&] {
    unsigned char sig = 0;
    while (read(signal_pipe[0], &sig, 1) != 1) {
    }
    BLOCKD_LOG(kInfo, "received ", sig == SIGTERM ? "SIGTERM" : "SIGINT");
    (*server)->Drain();
  });
  (*server)->Wait();
  signal_thread.join();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const bool malloc_tuned = blockd::TuneMallocForLargeBuffers();
  absl::SetProgramUsageMessage("blockd: transformer decoder blocks resident on a GPU, trained over gRPC");
  absl::ParseCommandLine(argc, argv);
  return Run(malloc_tuned);
}
