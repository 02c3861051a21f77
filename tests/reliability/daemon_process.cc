#include "tests/reliability/daemon_process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace blockd::testing {
namespace {

// fork + exec with the log file as stdout and stderr. Only async-signal-safe calls in the child.
absl::StatusOr<pid_t> Spawn(const std::string& binary, const std::vector<std::string>& args,
                            const std::string& log_path) {
  std::vector<std::string> all = {binary, "--listen=127.0.0.1:0", "--metrics_listen=", "--backend=cpu"};
  all.insert(all.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : all) argv.push_back(a.data());
  argv.push_back(nullptr);
  const int log_fd = open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (log_fd < 0) return absl::InternalError(absl::StrCat("cannot open ", log_path));
  const pid_t pid = fork();
  if (pid < 0) {
    close(log_fd);
    return absl::InternalError("fork failed");
  }
  if (pid == 0) {
    dup2(log_fd, STDOUT_FILENO);
    dup2(log_fd, STDERR_FILENO);
    execv(argv[0], argv.data());
    _exit(127);
  }
  close(log_fd);
  return pid;
}

}  // namespace

std::string ReadFileOrEmpty(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

absl::StatusOr<std::unique_ptr<DaemonProcess>> DaemonProcess::Start(const std::string& binary,
                                                                    const std::vector<std::string>& args,
                                                                    const std::string& log_path,
                                                                    absl::Duration timeout) {
  std::unique_ptr<DaemonProcess> d(new DaemonProcess());
  d->log_path_ = log_path;
  d->log_start_ = ReadFileOrEmpty(log_path).size();
  auto pid = Spawn(binary, args, log_path);
  if (!pid.ok()) return pid.status();
  d->pid_ = *pid;
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    if (!d->running()) {
      return absl::InternalError(absl::StrCat("blockd exited before serving:\n", d->Log()));
    }
    const std::string log = d->Log();
    const size_t at = log.find("(port ");
    if (at != std::string::npos) {
      const size_t end = log.find(')', at);
      int port = 0;
      if (end != std::string::npos && absl::SimpleAtoi(log.substr(at + 6, end - at - 6), &port) && port > 0) {
        d->port_ = port;
        return d;
      }
    }
    absl::SleepFor(absl::Milliseconds(10));
  }
  d->Kill();
  return absl::DeadlineExceededError(absl::StrCat("blockd did not serve within ", absl::FormatDuration(timeout),
                                                  ":\n", d->Log()));
}

absl::StatusOr<int> DaemonProcess::RunToExit(const std::string& binary, const std::vector<std::string>& args,
                                             const std::string& log_path, absl::Duration timeout) {
  auto pid = Spawn(binary, args, log_path);
  if (!pid.ok()) return pid.status();
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    int status = 0;
    if (waitpid(*pid, &status, WNOHANG) == *pid) return status;
    absl::SleepFor(absl::Milliseconds(10));
  }
  kill(*pid, SIGKILL);
  waitpid(*pid, nullptr, 0);
  return absl::DeadlineExceededError("blockd was still running (it was expected to exit)");
}

DaemonProcess::~DaemonProcess() { Kill(); }

std::string DaemonProcess::target() const { return absl::StrCat("127.0.0.1:", port_); }

bool DaemonProcess::running() {
  if (pid_ <= 0) return false;
  int status = 0;
  const pid_t r = waitpid(pid_, &status, WNOHANG);
  if (r == pid_) {
    pid_ = -1;
    return false;
  }
  return true;
}

void DaemonProcess::Kill() {
  if (pid_ <= 0) return;
  kill(pid_, SIGKILL);
  waitpid(pid_, nullptr, 0);
  pid_ = -1;
}

int DaemonProcess::Terminate(absl::Duration timeout) {
  if (pid_ <= 0) return -1;
  kill(pid_, SIGTERM);
  const absl::Time deadline = absl::Now() + timeout;
  int status = 0;
  while (absl::Now() < deadline) {
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return status;
    }
    absl::SleepFor(absl::Milliseconds(10));
  }
  Kill();
  return -1;
}

int64_t DaemonProcess::RssBytes() const {
  if (pid_ <= 0) return -1;
  std::ifstream in(absl::StrCat("/proc/", pid_, "/status"));
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) {
      std::istringstream fields(line.substr(6));
      int64_t kb = -1;
      fields >> kb;
      return kb < 0 ? -1 : kb * 1024;
    }
  }
  return -1;
}

std::string DaemonProcess::Log() const {
  const std::string all = ReadFileOrEmpty(log_path_);
  return all.size() > log_start_ ? all.substr(log_start_) : std::string();
}

}  // namespace blockd::testing
