// Reliability-test support: the real `blockd` executable as a child process, so tests can SIGKILL
// it, restart it, and read its resident memory from /proc.
//
// It listens on 127.0.0.1:0 and the port is read back from its log ("(port N)"), so parallel
// tests never race for a port. The log goes to a file that tests read (and print on failure).
//
//   auto d = DaemonProcess::Start(BLOCKD_PATH, {"--checkpoint_dir=/tmp/ck"}, "/tmp/ck.log");
//   ASSERT_TRUE(d.ok()) << d.status();
//   auto client = Client::Connect({.target = (*d)->target()});
//   (*d)->Kill();                               // SIGKILL: the crash checkpoints must survive
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace blockd::testing {

class DaemonProcess {
 public:
  // Starts `binary --listen=127.0.0.1:0 --metrics_listen= --backend=cpu <args>` with stdout and
  // stderr appended to `log_path`, and waits until it serves (or exits, or `timeout` passes).
  static absl::StatusOr<std::unique_ptr<DaemonProcess>> Start(const std::string& binary,
                                                              const std::vector<std::string>& args,
                                                              const std::string& log_path,
                                                              absl::Duration timeout = absl::Seconds(60));
  // Starts it and waits for it to exit on its own (e.g. refusing a corrupt checkpoint); returns
  // the exit status as waitpid reports it, or an error when it is still running after `timeout`.
  static absl::StatusOr<int> RunToExit(const std::string& binary, const std::vector<std::string>& args,
                                       const std::string& log_path, absl::Duration timeout = absl::Seconds(60));
  ~DaemonProcess();  // SIGKILL if still running

  pid_t pid() const { return pid_; }
  int port() const { return port_; }
  std::string target() const;
  bool running();

  // SIGKILL and reap.
  void Kill();
  // SIGTERM, wait up to `timeout` (then SIGKILL); the waitpid status.
  int Terminate(absl::Duration timeout = absl::Seconds(30));
  // VmRSS of the process from /proc/PID/status, in bytes; -1 when it cannot be read.
  int64_t RssBytes() const;
  std::string Log() const;

 private:
  DaemonProcess() = default;
  pid_t pid_ = -1;
  int port_ = 0;
  std::string log_path_;
  size_t log_start_ = 0;  // where this run's lines begin in the (appended) log
};

std::string ReadFileOrEmpty(const std::string& path);

}  // namespace blockd::testing
