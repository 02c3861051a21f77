#include "base/echo.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace blockd {

std::string Echo(absl::string_view s) {
  const absl::string_view head = s.substr(0, kEchoMaxBytes);
  std::string out;
  out.reserve(head.size() + 24);
  for (const char c : head) {
    const auto u = static_cast<unsigned char>(c);
    if (u >= 0x20 && u < 0x7f) {
      out.push_back(c);
    } else {
      absl::StrAppendFormat(&out, "\\x%02x", u);
    }
  }
  if (s.size() > head.size()) absl::StrAppend(&out, "... (", s.size(), " bytes)");
  return out;
}

}  // namespace blockd
