#include "base/log.h"

#include <atomic>
#include <cstdio>

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace blockd {
namespace {
std::atomic<int> min_level{static_cast<int>(LogLevel::kInfo)};
constexpr const char* kNames[] = {"DEBUG", "INFO", "WARNING", "ERROR"};
}  // namespace

void SetLogLevel(LogLevel level) { min_level = static_cast<int>(level); }
bool LogEnabled(LogLevel level) { return static_cast<int>(level) >= min_level.load(std::memory_order_relaxed); }

bool ParseLogLevel(absl::string_view name, LogLevel* level) {
  const absl::string_view names[] = {"debug", "info", "warning", "error"};
  for (int i = 0; i < 4; ++i) {
    if (name == names[i]) {
      *level = static_cast<LogLevel>(i);
      return true;
    }
  }
  return false;
}

void Log(LogLevel level, absl::string_view message) {
  const std::string when = absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::Now(), absl::UTCTimeZone());
  std::fprintf(stderr, "%s %s blockd: %.*s\n", when.c_str(), kNames[static_cast<int>(level)],
               static_cast<int>(message.size()), message.data());
}

}  // namespace blockd
