// Bearer-token authentication for BlockService. Clients send `authorization: Bearer <token>`.
// Tokens come from files of one token per line (`#` starts a comment); they are compared in
// constant time. When an admin token file is given, admin RPCs (CreateBlock, LoadWeights,
// DeleteBlock, Save/RestoreCheckpoint) need one of its tokens. Health and reflection are separate
// services and stay open for probes.
//
//   ASSIGN_OR_RETURN(auto auth, Authenticator::FromFiles("/etc/blockd/tokens", "/etc/blockd/admin"));
//   ASSIGN_OR_RETURN(std::string who, auth->Check(metadata_value, /*admin=*/true));
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace blockd {

class Authenticator {
 public:
  // No tokens at all: every call is let in (identity "anonymous").
  Authenticator() = default;
  // Either path may be empty. A token in the admin file is also a user token.
  static absl::StatusOr<std::unique_ptr<Authenticator>> FromFiles(const std::string& token_file,
                                                                  const std::string& admin_token_file);
  bool enabled() const { return !users_.empty(); }

  // `authorization` is the request's metadata value (or empty when absent). Returns the caller's
  // identity ("token-3", "admin-1"), UNAUTHENTICATED for a missing or unknown token, and
  // PERMISSION_DENIED for a user token on an admin RPC.
  absl::StatusOr<std::string> Check(absl::string_view authorization, bool admin) const;

 private:
  struct Token {
    std::string value;
    std::string identity;
    bool admin = false;
  };
  std::vector<Token> users_;
  bool admin_required_ = false;
};

// Constant-time equality for secrets: the time taken depends on the lengths only.
bool ConstantTimeEquals(absl::string_view a, absl::string_view b);

}  // namespace blockd
