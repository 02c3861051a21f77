// What the request fuzzers share: how a finding ends the run, the tiny block they drive, and the
// codes a refusal may carry (ARCHITECTURE.md, "Errors": never INTERNAL or UNKNOWN for a request).
//
//   blockd::fuzz::CheckCode(status, "Forward", {absl::StatusCode::kUnimplemented});
#pragma once

#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <string>

#include "absl/status/status.h"
#include "base/block_config.h"

namespace blockd::fuzz {

// Prints the finding and aborts, so libFuzzer keeps the input as a crash reproducer.
[[noreturn]] inline void Fail(const std::string& what) {
  std::fprintf(stderr, "fuzzer finding: %s\n", what.c_str());
  std::abort();
}

// hidden 8, two query heads sharing one kv head of 4, MLP 16.
inline BlockConfig TinyConfig(int64_t hidden, bool qk_norm) {
  BlockConfig c;
  c.hidden_size = hidden;
  c.num_attention_heads = 2;
  c.num_kv_heads = 1;
  c.head_dim = 4;
  c.intermediate_size = 16;
  c.qk_norm = qk_norm;
  return c;
}

// OK, or a code every request may get (INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS,
// FAILED_PRECONDITION, RESOURCE_EXHAUSTED), or one of `also`; anything else is a finding.
inline void CheckCode(const absl::Status& s, const char* op, std::initializer_list<absl::StatusCode> also) {
  switch (s.code()) {
    case absl::StatusCode::kOk:
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kNotFound:
    case absl::StatusCode::kAlreadyExists:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kResourceExhausted:
      return;
    default:
      for (absl::StatusCode c : also) {
        if (s.code() == c) return;
      }
      Fail(std::string(op) + " returned " + s.ToString());
  }
}

}  // namespace blockd::fuzz
