#include "server/metrics_tls.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <prometheus/text_serializer.h>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "base/log.h"
#include "base/status_macros.h"
#include "server/credentials.h"

namespace blockd {
namespace {

constexpr size_t kMaxRequestBytes = 8192;

std::string SslError() {
  const unsigned long e = ERR_get_error();
  ERR_clear_error();
  if (e == 0) return "no details";
  char buf[256];
  ERR_error_string_n(e, buf, sizeof(buf));
  return buf;
}

}  // namespace

absl::StatusOr<std::unique_ptr<TlsMetricsServer>> TlsMetricsServer::Start(const std::string& listen,
                                                                         const std::string& cert_file,
                                                                         const std::string& key_file,
                                                                         std::shared_ptr<prometheus::Registry> registry,
                                                                         absl::Duration connection_deadline) {
  auto cert = ReadWholeFile(cert_file, "metrics TLS certificate");
  if (!cert.ok()) return cert.status();
  auto key = ReadWholeFile(key_file, "metrics TLS key");
  if (!key.ok()) return key.status();
  RETURN_IF_ERROR(CheckKeyMatchesCertificate(*cert, *key, cert_file, key_file, "--metrics_tls_"));

  std::unique_ptr<TlsMetricsServer> s(new TlsMetricsServer());
  s->registry_ = std::move(registry);
  s->connection_deadline_ = connection_deadline;
  s->ctx_ = SSL_CTX_new(TLS_server_method());
  if (s->ctx_ == nullptr) return absl::InternalError(absl::StrCat("metrics TLS: ", SslError()));
  SSL_CTX_set_min_proto_version(s->ctx_, TLS1_2_VERSION);
  if (SSL_CTX_use_certificate_chain_file(s->ctx_, cert_file.c_str()) != 1 ||
      SSL_CTX_use_PrivateKey_file(s->ctx_, key_file.c_str(), SSL_FILETYPE_PEM) != 1) {
    return absl::InvalidArgumentError(absl::StrCat("metrics TLS: cannot use ", cert_file, " and ", key_file, ": ",
                                                   SslError()));
  }

  const size_t colon = listen.rfind(':');
  int port = -1;
  if (colon == std::string::npos || !absl::SimpleAtoi(listen.substr(colon + 1), &port) || port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("--metrics_listen=", listen, ": expected HOST:PORT"));
  }
  std::string host = listen.substr(0, colon);
  if (host.empty() || host == "0.0.0.0" || host == "*") host = "0.0.0.0";
  addrinfo hints = {};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (getaddrinfo(host.c_str(), nullptr, &hints, &found) != 0 || found == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("--metrics_listen=", listen, ": cannot resolve ", host,
                                                   " to an IPv4 address"));
  }
  sockaddr_in addr = *reinterpret_cast<sockaddr_in*>(found->ai_addr);
  freeaddrinfo(found);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  s->listen_fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  const int one = 1;
  setsockopt(s->listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (s->listen_fd_ < 0 || bind(s->listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::listen(s->listen_fd_, 16) != 0) {
    return absl::UnavailableError(absl::StrCat("cannot serve metrics on ", listen, ": ", strerror(errno)));
  }
  socklen_t len = sizeof(addr);
  getsockname(s->listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len);
  s->port_ = ntohs(addr.sin_port);
  s->thread_ = std::thread([srv = s.get()] { srv->Run(); });
  return s;
}

TlsMetricsServer::~TlsMetricsServer() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
  if (listen_fd_ >= 0) close(listen_fd_);
  if (ctx_ != nullptr) SSL_CTX_free(ctx_);
}

void TlsMetricsServer::Run() {
  while (!stop_) {
    pollfd p = {listen_fd_, POLLIN, 0};
    if (poll(&p, 1, 200) <= 0) continue;  // wakes up to see stop_
    // Non-blocking, so that every wait is a poll bounded by the connection's deadline: a socket
    // timeout bounds one read only, and a client dripping a byte at a time never trips it.
    const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) continue;
    Serve(fd);
    close(fd);
  }
}

bool TlsMetricsServer::WaitFor(int fd, int ssl_error, absl::Time deadline) const {
  if (ssl_error != SSL_ERROR_WANT_READ && ssl_error != SSL_ERROR_WANT_WRITE) return false;
  pollfd p = {fd, static_cast<short>(ssl_error == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT), 0};
  while (!stop_) {
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) return false;
    // At most 200 ms at a time, to see stop_.
    const int r = poll(&p, 1, static_cast<int>(std::min<int64_t>(absl::ToInt64Milliseconds(left) + 1, 200)));
    if (r > 0) return true;
    if (r < 0 && errno != EINTR) return false;
  }
  return false;
}

void TlsMetricsServer::Serve(int fd) {
  const absl::Time deadline = absl::Now() + connection_deadline_;
  SSL* ssl = SSL_new(ctx_);
  if (ssl == nullptr) return;
  SSL_set_fd(ssl, fd);
  // Runs one OpenSSL operation until it succeeds (> 0), fails, or the deadline passes (<= 0).
  auto run = [&](auto op) {
    for (;;) {
      const int n = op();
      if (n > 0 || !WaitFor(fd, SSL_get_error(ssl, n), deadline)) return n;
    }
  };
  if (run([&] { return SSL_accept(ssl); }) == 1) {
    std::string request;
    char buf[1024];
    auto complete = [&] { return request.size() >= kMaxRequestBytes || absl::StrContains(request, "\r\n\r\n"); };
    while (!complete()) {
      const int n = run([&] { return SSL_read(ssl, buf, sizeof(buf)); });
      if (n <= 0) break;
      request.append(buf, static_cast<size_t>(n));
    }
    std::string status = "404 Not Found", body = "only GET /metrics is served here\n";
    if (!complete() && absl::Now() >= deadline) {
      status = "408 Request Timeout";
      body = "the request did not arrive in time\n";
    } else if (absl::StartsWith(request, "GET /metrics ") || absl::StartsWith(request, "GET /metrics?")) {
      status = "200 OK";
      body = prometheus::TextSerializer().Serialize(registry_->Collect());
    }
    const std::string reply = absl::StrCat("HTTP/1.1 ", status, "\r\nContent-Type: text/plain; version=0.0.4\r\n",
                                           "Content-Length: ", body.size(), "\r\nConnection: close\r\n\r\n", body);
    // A reply that cannot go out by the deadline is dropped (the 408 usually fits the socket's
    // buffer, so it goes even though the deadline has passed).
    run([&] { return SSL_write(ssl, reply.data(), static_cast<int>(reply.size())); });
    SSL_shutdown(ssl);  // one try: a client that does not answer the close_notify is not waited for
  }
  ERR_clear_error();  // a plaintext client, a failed handshake, a timeout: nothing more to say
  SSL_free(ssl);
}

}  // namespace blockd
