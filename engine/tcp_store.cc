#include "engine/tcp_store.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "base/echo.h"
#include "base/status_macros.h"
#include "engine/owned.h"
#include "base/log.h"
#include "gloo/common/error.h"

namespace blockd {
namespace {

// Frames: op (1 byte), key length (u32), key, value length (u32), value. Replies: found (1 byte),
// value length (u32), value. Ops: 'H' hello (the key is the nonce), 'S' set, 'A' add if absent,
// 'G' get (found 0 while the key is not set).
constexpr size_t kMaxKey = 4096;
constexpr size_t kMaxValue = 1 << 20;
constexpr size_t kMaxStoredBytes = 16 << 20;
constexpr size_t kMaxConnections = 256;
constexpr absl::Duration kHelloTimeout = absl::Seconds(10);

void PutU32(std::string* out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
uint32_t GetU32(const char* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(static_cast<unsigned char>(p[i])) << (8 * i);
  return v;
}

// Writes all of `data`, waiting at most until `deadline`; false on error or timeout.
bool WriteAll(int fd, const char* data, size_t n, absl::Time deadline) {
  while (n > 0) {
    const ssize_t w = ::send(fd, data, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w > 0) {
      data += w;
      n -= static_cast<size_t>(w);
      continue;
    }
    if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return false;
    const int64_t ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (ms <= 0) return false;
    pollfd p{fd, POLLOUT, 0};
    ::poll(&p, 1, static_cast<int>(std::min<int64_t>(ms, 1000)));
  }
  return true;
}

// Reads exactly `n` bytes by `deadline`; false on error, end of stream or timeout.
bool ReadAll(int fd, char* data, size_t n, absl::Time deadline) {
  while (n > 0) {
    const int64_t ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (ms <= 0) return false;
    pollfd p{fd, POLLIN, 0};
    const int r = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(ms, 1000)));
    if (r < 0 && errno != EINTR) return false;
    if (r <= 0) continue;
    const ssize_t got = ::recv(fd, data, n, MSG_DONTWAIT);
    if (got == 0) return false;
    if (got < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) continue;
      return false;
    }
    data += got;
    n -= static_cast<size_t>(got);
  }
  return true;
}

bool ConstantTimeEqual(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

}  // namespace

absl::StatusOr<std::unique_ptr<TcpStoreServer>> TcpStoreServer::Start(std::string nonce) {
  std::unique_ptr<TcpStoreServer> s(new TcpStoreServer());
  s->nonce_ = std::move(nonce);
  s->listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (s->listen_fd_ < 0) return absl::InternalError(absl::StrCat("rendezvous store: socket: ", strerror(errno)));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (::bind(s->listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::listen(s->listen_fd_, 128) != 0 ||
      ::getsockname(s->listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    return absl::UnavailableError(absl::StrCat("rendezvous store: cannot listen: ", strerror(errno)));
  }
  s->port_ = ntohs(addr.sin_port);
  if (::pipe2(s->wake_, O_CLOEXEC | O_NONBLOCK) != 0) {
    return absl::InternalError(absl::StrCat("rendezvous store: pipe: ", strerror(errno)));
  }
  s->thread_ = std::thread([p = s.get()] { p->Serve(); });
  return s;
}

TcpStoreServer::~TcpStoreServer() {
  if (thread_.joinable()) {
    const char c = 0;
    (void)!::write(wake_[1], &c, 1);
    thread_.join();
  }
  for (int fd : {listen_fd_, wake_[0], wake_[1]}) {
    if (fd >= 0) ::close(fd);
  }
}

void TcpStoreServer::Serve() {
  struct Conn {
    int fd;
    std::string in;
    bool hello = false;
    absl::Time since;
  };
  std::vector<Conn> conns;
  std::map<std::string, std::string> kv;
  size_t stored = 0;
  for (;;) {
    std::vector<pollfd> fds{{wake_[0], POLLIN, 0}, {listen_fd_, POLLIN, 0}};
    for (const Conn& c : conns) fds.push_back({c.fd, POLLIN, 0});
    if (::poll(fds.data(), fds.size(), 500) < 0 && errno != EINTR) break;
    if (fds[0].revents != 0) break;
    const absl::Time now = absl::Now();
    std::vector<bool> drop(conns.size(), false);
    for (size_t i = 0; i < conns.size(); ++i) {
      Conn& c = conns[i];
      if (!c.hello && now - c.since > kHelloTimeout) drop[i] = true;
      if (fds[i + 2].revents == 0 || drop[i]) continue;
      char buf[65536];
      const ssize_t got = ::recv(c.fd, buf, sizeof(buf), MSG_DONTWAIT);
      if (got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR)) {
        drop[i] = true;
        continue;
      }
      if (got > 0) c.in.append(buf, static_cast<size_t>(got));
      // Whole frames only; a frame over the limits ends the connection.
      while (!drop[i] && c.in.size() >= 5) {
        const uint32_t klen = GetU32(c.in.data() + 1);
        if (klen > kMaxKey) { drop[i] = true; break; }
        if (c.in.size() < 9 + klen) break;
        const uint32_t vlen = GetU32(c.in.data() + 5 + klen);
        if (vlen > kMaxValue) { drop[i] = true; break; }
        if (c.in.size() < 9 + klen + vlen) break;
        const char op = c.in[0];
        std::string key = c.in.substr(5, klen);
        std::string value = c.in.substr(9 + klen, vlen);
        c.in.erase(0, 9 + klen + vlen);
        std::string reply;
        if (!c.hello) {
          if (op != 'H' || !ConstantTimeEqual(key, nonce_)) { drop[i] = true; break; }
          c.hello = true;
          reply.push_back(1);
          PutU32(&reply, 0);
        } else if (op == 'S' || op == 'A') {
          auto it = kv.find(key);
          const bool set = op == 'S' || it == kv.end();
          if (set) {
            const size_t old = it == kv.end() ? 0 : it->first.size() + it->second.size();
            if (stored - old + key.size() + value.size() > kMaxStoredBytes) { drop[i] = true; break; }
            stored = stored - old + key.size() + value.size();
            kv[key] = value;
          }
          reply.push_back(set ? 1 : 0);
          PutU32(&reply, 0);
        } else if (op == 'G') {
          auto it = kv.find(key);
          reply.push_back(it == kv.end() ? 0 : 1);
          PutU32(&reply, it == kv.end() ? 0 : static_cast<uint32_t>(it->second.size()));
          if (it != kv.end()) reply += it->second;
        } else {
          drop[i] = true;
          break;
        }
        if (!WriteAll(c.fd, reply.data(), reply.size(), absl::Now() + absl::Seconds(5))) drop[i] = true;
      }
      if (c.in.size() > 2 * kMaxValue + 2 * kMaxKey) drop[i] = true;
    }
    std::vector<Conn> kept;
    for (size_t i = 0; i < conns.size(); ++i) {
      if (drop[i]) {
        ::close(conns[i].fd);
      } else {
        kept.push_back(std::move(conns[i]));
      }
    }
    conns = std::move(kept);
    if (fds[1].revents != 0) {
      const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (fd >= 0) {
        if (conns.size() >= kMaxConnections) {
          ::close(fd);
        } else {
          conns.push_back({fd, {}, false, now});
        }
      }
    }
  }
  for (const Conn& c : conns) ::close(c.fd);
}

TcpStoreClient::TcpStoreClient(const std::string& host, int port, const std::string& nonce, absl::Time deadline)
    : deadline_(deadline) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const std::string service = std::to_string(port);
  // The store may not be reachable yet (a pod's name not yet in DNS): retry until the deadline.
  std::string last_error = "no attempt";
  while (fd_ < 0 && absl::Now() < deadline_) {
    const int rc = ::getaddrinfo(host.c_str(), service.c_str(), &hints, &res);
    if (rc != 0) {
      last_error = absl::StrCat("cannot resolve ", host, ": ", gai_strerror(rc));
    } else {
      for (addrinfo* a = res; a != nullptr && fd_ < 0; a = a->ai_next) {
        const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) continue;
        if (::connect(fd, a->ai_addr, a->ai_addrlen) == 0) {
          fd_ = fd;
        } else {
          last_error = absl::StrCat("cannot connect to ", host, ":", port, ": ", strerror(errno));
          ::close(fd);
        }
      }
      ::freeaddrinfo(res);
      res = nullptr;
    }
    if (fd_ < 0) ::usleep(50 * 1000);
  }
  if (fd_ < 0) throw gloo::IoException(absl::StrCat("rendezvous store of rank 0: ", last_error));
  const int one = 1;
  ::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  bool found = false;
  Call('H', nonce, {}, &found);
}

TcpStoreClient::~TcpStoreClient() {
  if (fd_ >= 0) ::close(fd_);
}

std::vector<char> TcpStoreClient::Call(char op, const std::string& key, const std::vector<char>& data, bool* found) {
  std::string frame(1, op);
  PutU32(&frame, static_cast<uint32_t>(key.size()));
  frame += key;
  PutU32(&frame, static_cast<uint32_t>(data.size()));
  frame.append(data.data(), data.size());
  char head[5];
  if (!WriteAll(fd_, frame.data(), frame.size(), deadline_) || !ReadAll(fd_, head, 5, deadline_)) {
    throw gloo::IoException("rendezvous store of rank 0: connection lost or timed out (wrong collective id, or "
                            "rank 0's daemon gone)");
  }
  const uint32_t n = GetU32(head + 1);
  if (n > kMaxValue) throw gloo::IoException("rendezvous store of rank 0: oversized reply");
  std::vector<char> value(n);
  if (n > 0 && !ReadAll(fd_, value.data(), n, deadline_)) {
    throw gloo::IoException("rendezvous store of rank 0: connection lost or timed out");
  }
  *found = head[0] == 1;
  return value;
}

void TcpStoreClient::set(const std::string& key, const std::vector<char>& data) {
  bool found = false;
  Call('S', key, data, &found);
}

bool TcpStoreClient::add_if_absent(const std::string& key, const std::vector<char>& data) {
  bool set = false;
  Call('A', key, data, &set);
  return set;
}

std::vector<char> TcpStoreClient::get(const std::string& key) {
  for (;;) {
    bool found = false;
    std::vector<char> v = Call('G', key, {}, &found);
    if (found) return v;
    if (absl::Now() >= deadline_) {
      throw gloo::IoException(absl::StrCat("rendezvous: timed out waiting for the other members (key ", key, ")"));
    }
    ::usleep(10 * 1000);
  }
}

void TcpStoreClient::wait(const std::vector<std::string>& keys) {
  for (const std::string& k : keys) get(k);
}

void TcpStoreClient::wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& /*timeout*/) {
  // The deadline given at construction bounds every wait: it is the JoinGroup's timeout_ms.
  wait(keys);
}

absl::StatusOr<StoreAddress> ParseStoreId(const std::string& id, absl::string_view magic,
                                          absl::string_view library) {
  const std::vector<std::string> parts = absl::StrSplit(id, ' ');
  StoreAddress p;
  if (parts.size() != 4 || parts[0] != magic || parts[1].empty() || parts[1].size() > 253 ||
      !absl::SimpleAtoi(parts[2], &p.port) || p.port <= 0 || p.port > 65535 || parts[3].size() != 37) {
    return absl::InvalidArgumentError(absl::StrCat(
        "collective_id ", Echo(id), " is not a ", library, " collective id (expected the bytes GetCollectiveId "
        "returned on rank 0's daemon: \"", magic, " HOST PORT NONCE\")"));
  }
  p.host = parts[1];
  p.nonce = parts[3];
  return p;
}

PendingStores::PendingStores(std::string magic, std::string advertise_host, int64_t max_pending)
    : magic_(std::move(magic)), advertise_host_(std::move(advertise_host)), max_pending_(max_pending) {
  if (advertise_host_.empty()) {
    char name[256] = {0};
    if (::gethostname(name, sizeof(name) - 1) == 0) advertise_host_ = name;
    if (advertise_host_.empty()) advertise_host_ = "localhost";
  }
}

absl::StatusOr<std::string> PendingStores::NewId(absl::Duration ttl) {
  Sweep();
  ASSIGN_OR_RETURN(std::string nonce, NewResourceId(magic_.substr(7, 4) + "-"));  // "gloo-", "nccl-"
  {
    absl::MutexLock l(&mu_);
    if (static_cast<int64_t>(pending_.size()) >= max_pending_) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "this daemon already hosts ", pending_.size(), " collective ids whose groups have not connected (at most ",
          max_pending_, "); join with them or wait for them to expire"));
    }
  }
  ASSIGN_OR_RETURN(std::unique_ptr<TcpStoreServer> server, TcpStoreServer::Start(nonce));
  const std::string id = absl::StrCat(magic_, " ", advertise_host_, " ", server->port(), " ", nonce);
  absl::MutexLock l(&mu_);
  pending_[nonce] = Pending{std::move(server), absl::Now() + ttl};
  return id;
}

void PendingStores::Connected(const std::string& nonce) {
  std::unique_ptr<TcpStoreServer> done;  // stops (joining its thread) outside the lock
  absl::MutexLock l(&mu_);
  auto it = pending_.find(nonce);
  if (it == pending_.end()) return;
  done = std::move(it->second.server);
  pending_.erase(it);
}

void PendingStores::Sweep() {
  std::vector<std::unique_ptr<TcpStoreServer>> expired;
  {
    absl::MutexLock l(&mu_);
    const absl::Time now = absl::Now();
    for (auto it = pending_.begin(); it != pending_.end();) {
      if (it->second.expires <= now) {
        expired.push_back(std::move(it->second.server));
        it = pending_.erase(it);
      } else {
        ++it;
      }
    }
  }
  // The servers stop (joining their threads) here, outside the lock.
}

absl::Status ClaimRankAndAgree(TcpStoreClient& store, int rank, int world_size, const std::string& terms) {
  if (!store.add_if_absent(absl::StrCat("blockd/rank/", rank), std::vector<char>(terms.begin(), terms.end()))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rank ", rank, " of this collective id has already joined: each member joins once with its own rank, "
        "and a new group needs a new id from GetCollectiveId"));
  }
  std::string verdict = "ok";
  if (rank != 0) {
    const std::vector<char> theirs = store.get("blockd/rank/0");
    const std::string rank0(theirs.begin(), theirs.end());
    if (rank0 != terms) {
      verdict = absl::StrCat("rank ", rank, " joined with ", terms, "; rank 0 with ", rank0);
    }
  }
  store.set(absl::StrCat("blockd/verdict/", rank), std::vector<char>(verdict.begin(), verdict.end()));
  if (verdict != "ok") return absl::FailedPreconditionError(absl::StrCat("the members disagree: ", verdict));
  for (int r = 0; r < world_size; ++r) {
    const std::vector<char> v = store.get(absl::StrCat("blockd/verdict/", r));
    if (std::string(v.begin(), v.end()) != "ok") {
      return absl::FailedPreconditionError(
          absl::StrCat("the members disagree: ", std::string(v.begin(), v.end())));
    }
  }
  return absl::OkStatus();
}

}  // namespace blockd
