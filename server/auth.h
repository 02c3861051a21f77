// Who a caller is and what it may do. Clients send `authorization: Bearer <token>`; each token
// names a principal (the identity the quotas and activation handles are keyed by) and a role.
// Roles nest: read < train < admin.
//
//   read   GetServerInfo, ListBlocks, GetBlock, Forward without keep_activations,
//          DownloadTensors of weights
//   train  + Forward with keep_activations, Backward, ReleaseActivations, ZeroGrad, Step,
//          DownloadTensors of gradients and AdamW moments
//   admin  + CreateBlock, LoadWeights, DeleteBlock, SaveCheckpoint, RestoreCheckpoint
//
// Token files:
//   --token_file        lines `NAME ROLE TOKEN` (e.g. `alice train 3f9c...`): the principal is NAME
//   --auth_token_file   one token per line: principals token-1, token-2, ...; role train when an
//                       admin token exists, else admin (before roles, such tokens could call every
//                       RPC when no admin file was given, and deployments rely on that)
//   --admin_token_file  one token per line: principals admin-1, ...; role admin
// `#` starts a comment; tokens are at least 16 characters and compared in constant time. Health and
// reflection are separate services and stay open for probes.
//
//   ASSIGN_OR_RETURN(auto auth, Authenticator::FromFiles({.token_file = "/etc/blockd/tokens"}));
//   ASSIGN_OR_RETURN(Principal who, auth->Check(metadata_value));
//   RETURN_IF_ERROR(Authorize(who, Role::kTrain, "Step"));
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace blockd {

// What an RPC needs, and what a principal holds. Ordered: a role includes the ones below it.
enum class Role { kRead = 0, kTrain = 1, kAdmin = 2 };
const char* RoleName(Role r);                       // "read", "train", "admin"
bool ParseRole(absl::string_view name, Role* role);  // false for anything else

struct Principal {
  std::string name;  // the quota and ownership key
  Role role = Role::kAdmin;
};

// PERMISSION_DENIED naming the RPC, the role it needs and the caller's role when `who` lacks it.
absl::Status Authorize(const Principal& who, Role needed, absl::string_view rpc);

struct AuthFiles {
  std::string token_file;        // NAME ROLE TOKEN lines
  std::string auth_token_file;   // legacy: one token per line
  std::string admin_token_file;  // legacy: one admin token per line
};

class Authenticator {
 public:
  // No tokens at all: authentication is off.
  Authenticator() = default;
  static absl::StatusOr<std::unique_ptr<Authenticator>> FromFiles(const AuthFiles& files);
  bool enabled() const { return !tokens_.empty(); }

  // `authorization` is the request's metadata value (empty when absent). UNAUTHENTICATED for a
  // missing or unknown token.
  absl::StatusOr<Principal> Check(absl::string_view authorization) const;

 private:
  struct Token {
    std::string value;
    Principal who;
  };
  std::vector<Token> tokens_;
};

// Constant-time equality for secrets: the time taken depends on the lengths only.
bool ConstantTimeEquals(absl::string_view a, absl::string_view b);

// Logs at most `per_minute` lines a minute and says how many it left out, so a client hammering
// the port with bad tokens cannot flood the log (or the disk under it).
class RateLimitedLog {
 public:
  explicit RateLimitedLog(int per_minute) : per_minute_(per_minute) {}
  void Warn(absl::string_view message);

 private:
  const int per_minute_;
  absl::Mutex mu_;
  absl::Time window_start_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  int logged_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t suppressed_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace blockd
