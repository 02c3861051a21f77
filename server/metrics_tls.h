// /metrics over HTTPS, served by blockd itself with OpenSSL: prometheus-cpp's civetweb cannot do
// it on Debian 12 (it dlopens libssl expecting OpenSSL 1.1 and calls a null function on OpenSSL 3
// at the first HTTPS request). One thread serves one connection at a time: a scraper every few
// seconds is the whole load, and socket timeouts keep a client that stalls from holding it for
// more than a few seconds. Only `GET /metrics` is answered.
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

typedef struct ssl_ctx_st SSL_CTX;

namespace blockd {

class TlsMetricsServer {
 public:
  // `listen` is "HOST:PORT" (an IPv4 address or a name; port 0 picks one). The key must belong to
  // the certificate: a mismatch is named at start.
  static absl::StatusOr<std::unique_ptr<TlsMetricsServer>> Start(const std::string& listen,
                                                                 const std::string& cert_file,
                                                                 const std::string& key_file,
                                                                 std::shared_ptr<prometheus::Registry> registry);
  ~TlsMetricsServer();
  int port() const { return port_; }

 private:
  TlsMetricsServer() = default;
  void Run();
  void Serve(int fd);

  std::shared_ptr<prometheus::Registry> registry_;
  SSL_CTX* ctx_ = nullptr;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace blockd
