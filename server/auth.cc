#include "server/auth.h"

#include <fstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

namespace blockd {
namespace {

absl::StatusOr<std::vector<std::string>> ReadTokens(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read token file ", path));
  std::vector<std::string> tokens;
  std::string line;
  while (std::getline(in, line)) {
    absl::string_view t = absl::StripAsciiWhitespace(line);
    if (t.empty() || t[0] == '#') continue;
    if (t.size() < 16) {
      return absl::InvalidArgumentError(absl::StrCat("token file ", path, ": tokens must be at least 16 characters"));
    }
    tokens.emplace_back(t);
  }
  if (tokens.empty()) return absl::InvalidArgumentError(absl::StrCat("token file ", path, " holds no tokens"));
  return tokens;
}

}  // namespace

bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  if (a.size() != b.size()) return false;
  volatile unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff = diff | static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

absl::StatusOr<std::unique_ptr<Authenticator>> Authenticator::FromFiles(const std::string& token_file,
                                                                        const std::string& admin_token_file) {
  auto auth = std::make_unique<Authenticator>();
  if (!token_file.empty()) {
    auto tokens = ReadTokens(token_file);
    if (!tokens.ok()) return tokens.status();
    for (size_t i = 0; i < tokens->size(); ++i) auth->users_.push_back({(*tokens)[i], absl::StrCat("token-", i + 1), false});
  }
  if (!admin_token_file.empty()) {
    auto tokens = ReadTokens(admin_token_file);
    if (!tokens.ok()) return tokens.status();
    for (size_t i = 0; i < tokens->size(); ++i) auth->users_.push_back({(*tokens)[i], absl::StrCat("admin-", i + 1), true});
    auth->admin_required_ = true;
  }
  return auth;
}

absl::StatusOr<std::string> Authenticator::Check(absl::string_view authorization, bool admin) const {
  if (users_.empty()) return std::string("anonymous");
  absl::string_view token = authorization;
  if (!absl::ConsumePrefix(&token, "Bearer ") && !absl::ConsumePrefix(&token, "bearer ")) {
    return absl::UnauthenticatedError("missing bearer token: send metadata 'authorization: Bearer <token>'");
  }
  // Compare against every token so the time does not tell which one matched. A token listed in
  // both files is an admin token.
  const Token* match = nullptr;
  for (const Token& t : users_) {
    if (ConstantTimeEquals(token, t.value) && (match == nullptr || (t.admin && !match->admin))) match = &t;
  }
  if (match == nullptr) return absl::UnauthenticatedError("unknown bearer token");
  if (admin && admin_required_ && !match->admin) {
    return absl::PermissionDeniedError("this RPC needs an admin token");
  }
  return match->identity;
}

}  // namespace blockd
