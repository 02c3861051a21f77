// What an error message repeats of a string the client sent (a block id, a tensor or checkpoint
// name, an activation id, a client name).
//
// Errors say what came, but a client may send a 200 KB id: echoed whole, the message outgrows the
// client's metadata limit and the caller sees RESOURCE_EXHAUSTED instead of the real error, and
// logs fill with it. Every echo of a client string goes through Echo(), so the cap is one number.
//
//   return absl::NotFoundError(absl::StrCat("block ", Echo(id), " not found"));
//   // "block b0 not found"; a 20,000-byte id shows its first 128 bytes, then "... (20000 bytes)"
#pragma once

#include <cstddef>
#include <string>

#include "absl/strings/string_view.h"

namespace blockd {

// Longer than every valid id and name (128 characters), so a valid one is always echoed whole.
inline constexpr size_t kEchoMaxBytes = 128;

// `s` as an error message shows it: its first kEchoMaxBytes bytes followed by "... (N bytes)" when
// longer, with bytes outside printable ASCII written as \xNN so no control character or broken
// UTF-8 reaches a terminal or a log line.
std::string Echo(absl::string_view s);

}  // namespace blockd
