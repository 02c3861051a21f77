// What the gRPC benchmarks' mains share: a steady clock in seconds, and Check, which prints a
// failed call's status and exits (a benchmark has nothing to recover).
//
//   auto client = Check(blockd::Client::Connect(options), "connect");
//   Check(client->CloseSession(id), "close session");
#pragma once

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace blockd::bench {

inline double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

template <class T>
T Check(absl::StatusOr<T> s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, s.status().ToString().c_str());
    std::exit(1);
  }
  return *std::move(s);
}

inline void Check(const absl::Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, s.ToString().c_str());
    std::exit(1);
  }
}

}  // namespace blockd::bench
