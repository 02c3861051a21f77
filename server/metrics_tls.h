// /metrics over HTTPS, served by blockd itself with OpenSSL: prometheus-cpp's civetweb cannot do
// it on Debian 12 (it dlopens libssl expecting OpenSSL 1.1 and calls a null function on OpenSSL 3
// at the first HTTPS request). One thread serves one connection at a time: a scraper every few
// seconds is the whole load. Each connection has one overall deadline (5 s from its accept) for
// its TLS handshake, its request and the reply, however it drips its bytes, then it is closed: a
// client that stalls or sends a byte every few seconds holds the endpoint for at most that long,
// and a scrape queued behind it still fits in Prometheus' default 10 s scrape timeout. Only
// `GET /metrics` is answered (a request not complete by the deadline gets 408).
//
//   ASSIGN_OR_RETURN(auto https, TlsMetricsServer::Start("0.0.0.0:9464", cert, key, registry));
//   https->port();
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include <prometheus/registry.h>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

typedef struct ssl_ctx_st SSL_CTX;

namespace blockd {

class TlsMetricsServer {
 public:
  // `listen` is "HOST:PORT" (an IPv4 address or a name; port 0 picks one). The key must belong to
  // the certificate: a mismatch is named at start.
  static absl::StatusOr<std::unique_ptr<TlsMetricsServer>> Start(const std::string& listen,
                                                                 const std::string& cert_file,
                                                                 const std::string& key_file,
                                                                 std::shared_ptr<prometheus::Registry> registry,
                                                                 absl::Duration connection_deadline = absl::Seconds(5));
  ~TlsMetricsServer();
  int port() const { return port_; }

 private:
  TlsMetricsServer() = default;
  void Run();
  void Serve(int fd);
  // Waits until `fd` is ready for what OpenSSL asked for (`ssl_error`, SSL_ERROR_WANT_READ or
  // _WRITE); false on any other error, past `deadline`, or when the server stops.
  bool WaitFor(int fd, int ssl_error, absl::Time deadline) const;

  std::shared_ptr<prometheus::Registry> registry_;
  absl::Duration connection_deadline_;
  SSL_CTX* ctx_ = nullptr;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace blockd
