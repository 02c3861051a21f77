// A small leveled logger to stderr (abseil 20220623 has no logging library).
//   BLOCKD_LOG(kInfo, "listening on ", address);
#pragma once

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace blockd {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

void SetLogLevel(LogLevel level);
bool LogEnabled(LogLevel level);
// "debug", "info", "warning", "error"; false when `name` is none of them.
bool ParseLogLevel(absl::string_view name, LogLevel* level);
void Log(LogLevel level, absl::string_view message);

}  // namespace blockd

#define BLOCKD_LOG(level, ...)                                                     \
  do {                                                                             \
    if (::blockd::LogEnabled(::blockd::LogLevel::level)) {                         \
      ::blockd::Log(::blockd::LogLevel::level, ::absl::StrCat(__VA_ARGS__));       \
    }                                                                              \
  } while (0)
