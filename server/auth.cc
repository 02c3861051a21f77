#include "server/auth.h"

#include <fstream>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "base/echo.h"
#include "base/log.h"

namespace blockd {
namespace {

constexpr size_t kMinTokenLength = 16;

// The non-comment lines of a token file, with their line numbers for error messages.
absl::StatusOr<std::vector<std::pair<int, std::string>>> ReadLines(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read token file ", path));
  std::vector<std::pair<int, std::string>> lines;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    absl::string_view t = absl::StripAsciiWhitespace(line);
    if (t.empty() || t[0] == '#') continue;
    lines.emplace_back(n, std::string(t));
  }
  if (lines.empty()) return absl::InvalidArgumentError(absl::StrCat("token file ", path, " holds no tokens"));
  return lines;
}

absl::Status CheckToken(absl::string_view token, const std::string& path, int line) {
  if (token.size() < kMinTokenLength) {
    return absl::InvalidArgumentError(
        absl::StrCat("token file ", path, " line ", line, ": tokens must be at least 16 characters"));
  }
  return absl::OkStatus();
}

bool ValidName(absl::string_view name) {
  if (name.empty() || name.size() > 64) return false;
  for (char c : name) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-' && c != '@') {
      return false;
    }
  }
  return true;
}

}  // namespace

const char* RoleName(Role r) {
  switch (r) {
    case Role::kRead:
      return "read";
    case Role::kTrain:
      return "train";
    case Role::kAdmin:
      return "admin";
  }
  return "unknown";
}

bool ParseRole(absl::string_view name, Role* role) {
  for (Role r : {Role::kRead, Role::kTrain, Role::kAdmin}) {
    if (name == RoleName(r)) {
      *role = r;
      return true;
    }
  }
  return false;
}

absl::Status Authorize(const Principal& who, Role needed, absl::string_view rpc) {
  if (static_cast<int>(who.role) >= static_cast<int>(needed)) return absl::OkStatus();
  return absl::PermissionDeniedError(absl::StrCat(rpc, " needs the ", RoleName(needed), " role; ", Echo(who.name),
                                                  " has the ", RoleName(who.role), " role"));
}

bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  if (a.size() != b.size()) return false;
  volatile unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff = diff | static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

absl::StatusOr<std::unique_ptr<Authenticator>> Authenticator::FromFiles(const AuthFiles& files) {
  auto auth = std::make_unique<Authenticator>();
  std::vector<Token> plain;  // from --auth_token_file; their role depends on whether admins exist
  bool any_admin = false;
  std::set<std::string> names;
  auto add = [&](Token t, const std::string& path, int line) -> absl::Status {
    for (const Token& other : auth->tokens_) {
      if (other.value == t.value) {
        return absl::InvalidArgumentError(absl::StrCat("token file ", path, " line ", line, ": the token of ",
                                                       t.who.name, " is also the token of ", other.who.name));
      }
    }
    if (!names.insert(t.who.name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("token file ", path, " line ", line, ": principal ", t.who.name, " is named twice"));
    }
    any_admin = any_admin || t.who.role == Role::kAdmin;
    auth->tokens_.push_back(std::move(t));
    return absl::OkStatus();
  };
  if (!files.token_file.empty()) {
    auto lines = ReadLines(files.token_file);
    if (!lines.ok()) return lines.status();
    for (const auto& [n, line] : *lines) {
      std::vector<std::string> f = absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
      Role role;
      if (f.size() != 3) {
        return absl::InvalidArgumentError(absl::StrCat("token file ", files.token_file, " line ", n,
                                                       ": expected `NAME ROLE TOKEN`, got ", f.size(), " fields"));
      }
      if (!ValidName(f[0])) {
        return absl::InvalidArgumentError(absl::StrCat("token file ", files.token_file, " line ", n, ": name \"", f[0],
                                                       "\" is not 1-64 characters of [A-Za-z0-9._@-]"));
      }
      if (!ParseRole(f[1], &role)) {
        return absl::InvalidArgumentError(absl::StrCat("token file ", files.token_file, " line ", n, ": role \"", f[1],
                                                       "\" is not read, train or admin"));
      }
      if (auto s = CheckToken(f[2], files.token_file, n); !s.ok()) return s;
      if (auto s = add({f[2], {f[0], role}}, files.token_file, n); !s.ok()) return s;
    }
  }
  if (!files.admin_token_file.empty()) {
    auto lines = ReadLines(files.admin_token_file);
    if (!lines.ok()) return lines.status();
    for (size_t i = 0; i < lines->size(); ++i) {
      const auto& [n, token] = (*lines)[i];
      if (auto s = CheckToken(token, files.admin_token_file, n); !s.ok()) return s;
      if (auto s = add({token, {absl::StrCat("admin-", i + 1), Role::kAdmin}}, files.admin_token_file, n); !s.ok()) {
        return s;
      }
    }
  }
  if (!files.auth_token_file.empty()) {
    auto lines = ReadLines(files.auth_token_file);
    if (!lines.ok()) return lines.status();
    const Role role = any_admin ? Role::kTrain : Role::kAdmin;
    for (size_t i = 0; i < lines->size(); ++i) {
      const auto& [n, token] = (*lines)[i];
      if (auto s = CheckToken(token, files.auth_token_file, n); !s.ok()) return s;
      // A token listed both here and in the admin file is the admin's (as before roles).
      bool is_admin = false;
      for (const Token& t : auth->tokens_) is_admin = is_admin || (t.value == token && t.who.role == Role::kAdmin);
      if (is_admin) continue;
      if (auto s = add({token, {absl::StrCat("token-", i + 1), role}}, files.auth_token_file, n); !s.ok()) return s;
    }
  }
  return auth;
}

absl::StatusOr<Principal> Authenticator::Check(absl::string_view authorization) const {
  if (tokens_.empty()) return Principal{"anonymous", Role::kAdmin};
  absl::string_view token = authorization;
  if (!absl::ConsumePrefix(&token, "Bearer ") && !absl::ConsumePrefix(&token, "bearer ")) {
    return absl::UnauthenticatedError("missing bearer token: send metadata 'authorization: Bearer <token>'");
  }
  // Compare against every token so the time does not tell which one matched.
  const Token* match = nullptr;
  for (const Token& t : tokens_) {
    if (ConstantTimeEquals(token, t.value)) match = &t;
  }
  if (match == nullptr) return absl::UnauthenticatedError("unknown bearer token");
  return match->who;
}

void RateLimitedLog::Warn(absl::string_view message) {
  int64_t left_out = 0;
  {
    absl::MutexLock lock(&mu_);
    const absl::Time now = absl::Now();
    if (now - window_start_ >= absl::Minutes(1)) {
      left_out = suppressed_;
      window_start_ = now;
      logged_ = 0;
      suppressed_ = 0;
    }
    if (logged_ >= per_minute_) {
      ++suppressed_;
      return;
    }
    ++logged_;
  }
  if (left_out > 0) {
    BLOCKD_LOG(kWarning, message, " (", left_out, " similar lines left out in the minute before)");
  } else {
    BLOCKD_LOG(kWarning, message);
  }
}

}  // namespace blockd
