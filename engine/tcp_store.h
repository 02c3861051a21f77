// The key-value store that Gloo's rendezvous needs, over plain TCP, hosted by rank 0's daemon.
//
// GetCollectiveId starts a TcpStoreServer on an ephemeral port; the collective id names the host,
// the port and a random 128-bit nonce. Every member (rank 0 too) connects a TcpStoreClient, says
// the nonce first (a connection that does not, within a few seconds, is closed: the port is open
// to anyone who can reach the daemon), publishes what the others need and reads theirs. The
// server lives until the group has connected or the id expires. Keys and values are bounded, and
// so are connections and the bytes stored, so a stranger cannot grow the daemon through it.
//
//   ASSIGN_OR_RETURN(auto server, TcpStoreServer::Start(nonce));     // rank 0's daemon
//   TcpStoreClient store("10.0.0.7", server->port(), nonce, deadline);
//   store.set("k", {'v'});  auto v = store.get("k");               // get waits until k is set
#pragma once

#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "gloo/rendezvous/store.h"

namespace blockd {

class TcpStoreServer {
 public:
  // Listens on every IPv4 address at an ephemeral port.
  static absl::StatusOr<std::unique_ptr<TcpStoreServer>> Start(std::string nonce);
  ~TcpStoreServer();  // stops the thread, closes every connection
  int port() const { return port_; }

 private:
  TcpStoreServer() = default;
  void Serve();

  std::string nonce_;
  int listen_fd_ = -1;
  int port_ = 0;
  int wake_[2] = {-1, -1};  // a pipe that ends Serve()
  std::thread thread_;
};

// One member's connection. Throws gloo::IoException on failure (Gloo's contract for a Store);
// every wait ends by the deadline given at construction at the latest.
class TcpStoreClient final : public gloo::rendezvous::Store {
 public:
  TcpStoreClient(const std::string& host, int port, const std::string& nonce, absl::Time deadline);
  ~TcpStoreClient() override;

  void set(const std::string& key, const std::vector<char>& data) override;
  std::vector<char> get(const std::string& key) override;
  void wait(const std::vector<std::string>& keys) override;
  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) override;
  // Sets `key` only if no one has: true when this call set it.
  bool add_if_absent(const std::string& key, const std::vector<char>& data);

 private:
  // One request and its reply; `found` is false for a key not (yet) set.
  std::vector<char> Call(char op, const std::string& key, const std::vector<char>& data, bool* found);
  int fd_ = -1;
  absl::Time deadline_;
};

// Where a collective id of a store-based provider points: "MAGIC HOST PORT NONCE".
struct StoreAddress {
  std::string host;
  int port = 0;
  std::string nonce;
};
// INVALID_ARGUMENT naming `library` ("Gloo", "NCCL") for an id not of that form.
absl::StatusOr<StoreAddress> ParseStoreId(const std::string& id, absl::string_view magic,
                                          absl::string_view library);

// The stores a daemon hosts for the ids it handed out (as rank 0) whose groups have not connected.
class PendingStores {
 public:
  PendingStores(std::string magic, std::string advertise_host, int64_t max_pending);
  // Starts a store and returns its id; RESOURCE_EXHAUSTED past `max_pending` ids.
  absl::StatusOr<std::string> NewId(absl::Duration ttl);
  const std::string& advertise_host() const { return advertise_host_; }
  // The group of this id has connected: its store closes (on rank 0's daemon; nothing elsewhere).
  void Connected(const std::string& nonce);
  // Closes the stores of expired ids.
  void Sweep();

 private:
  struct Pending {
    std::unique_ptr<TcpStoreServer> server;
    absl::Time expires;
  };
  const std::string magic_;
  std::string advertise_host_;
  const int64_t max_pending_;
  absl::Mutex mu_;
  std::map<std::string, Pending> pending_ ABSL_GUARDED_BY(mu_);
};

// The first step of every provider's Connect (CollectiveProvider::Connect says what it answers):
// claims `rank` in the store, compares this member's `terms` with rank 0's and waits until every
// member has said whether it agrees. Throws as the store does when the others do not come in time.
absl::Status ClaimRankAndAgree(TcpStoreClient& store, int rank, int world_size, const std::string& terms);

}  // namespace blockd
