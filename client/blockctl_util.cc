#include "client/blockctl_util.h"

#include <netdb.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "engine/safetensors.h"
#include "nlohmann/json.hpp"

namespace blockd {
namespace {

v1::DType WireDType(DType t) {
  switch (t) {
    case DType::kFloat32: return v1::DTYPE_FLOAT32;
    case DType::kBFloat16: return v1::DTYPE_BFLOAT16;
    case DType::kFloat16: return v1::DTYPE_FLOAT16;
  }
  return v1::DTYPE_UNSPECIFIED;
}

absl::StatusOr<DType> FileDType(v1::DType t) {
  switch (t) {
    case v1::DTYPE_FLOAT32: return DType::kFloat32;
    case v1::DTYPE_BFLOAT16: return DType::kBFloat16;
    case v1::DTYPE_FLOAT16: return DType::kFloat16;
    default: return absl::InvalidArgumentError(absl::StrCat("cannot write ", wire::DTypeName(t), " to safetensors"));
  }
}

TensorBytes FromEntry(const SafetensorsFile& f, const SafetensorsEntry& e, std::string name) {
  const absl::string_view bytes = f.data(e);
  return TensorBytes{std::move(name), WireDType(e.dtype), e.shape, std::string(bytes.data(), bytes.size())};
}

}  // namespace

ProgressBar::ProgressBar(std::string label)
    : label_(std::move(label)), enabled_(isatty(STDERR_FILENO) == 1), start_(absl::Now()), last_(absl::InfinitePast()) {}

ProgressBar::~ProgressBar() { Done(); }

void ProgressBar::Update(int64_t done, int64_t total) {
  done_ = done;
  total_ = total;
  if (!enabled_) return;
  const absl::Time now = absl::Now();
  if (now - last_ < absl::Milliseconds(100) && !(total > 0 && done >= total)) return;
  last_ = now;
  Draw(done, total);
}

void ProgressBar::Draw(int64_t done, int64_t total) {
  const double seconds = std::max(1e-6, absl::ToDoubleSeconds(absl::Now() - start_));
  const std::string rate = absl::StrCat(HumanBytesString(static_cast<int64_t>(static_cast<double>(done) / seconds)), "/s");
  std::string line;
  if (total > 0) {
    constexpr int kWidth = 30;
    const double frac = std::min(1.0, static_cast<double>(done) / static_cast<double>(total));
    const int filled = static_cast<int>(frac * kWidth);
    line = absl::StrFormat("\r%s [%s%s] %3d%%  %s / %s  %s", label_, std::string(filled, '#'),
                           std::string(kWidth - filled, '.'), static_cast<int>(frac * 100), HumanBytesString(done),
                           HumanBytesString(total), rate);
  } else {
    line = absl::StrFormat("\r%s  %s  %s", label_, HumanBytesString(done), rate);
  }
  std::fprintf(stderr, "%s\x1b[K", line.c_str());
  std::fflush(stderr);
  drawn_ = true;
}

void ProgressBar::Done() {
  if (!enabled_ || !drawn_) return;
  Draw(done_, total_);
  std::fprintf(stderr, "\n");
  drawn_ = false;
}

ValueSummary Summarize(const std::vector<float>& values) {
  ValueSummary s;
  s.count = static_cast<int64_t>(values.size());
  double sum = 0, sum_sq = 0;
  int64_t finite = 0;
  s.min = INFINITY;
  s.max = -INFINITY;
  for (float v : values) {
    if (!std::isfinite(v)) {
      ++s.non_finite;
      continue;
    }
    ++finite;
    sum += v;
    s.min = std::min<double>(s.min, v);
    s.max = std::max<double>(s.max, v);
  }
  if (finite == 0) {
    s.min = s.max = NAN;
    s.mean = s.std = NAN;
    return s;
  }
  s.mean = sum / static_cast<double>(finite);
  for (float v : values) {
    if (std::isfinite(v)) sum_sq += (v - s.mean) * (v - s.mean);
  }
  s.std = std::sqrt(sum_sq / static_cast<double>(finite));
  return s;
}

std::string SummaryString(const ValueSummary& s) {
  std::string out = absl::StrFormat("mean=%.6g std=%.6g min=%.6g max=%.6g", s.mean, s.std, s.min, s.max);
  if (s.non_finite > 0) absl::StrAppend(&out, " non-finite=", s.non_finite);
  return out;
}

std::string HumanBytesString(int64_t bytes) {
  const double b = static_cast<double>(bytes);
  if (bytes < 1024) return absl::StrCat(bytes, " B");
  if (bytes < (int64_t{1} << 20)) return absl::StrFormat("%.1f KiB", b / 1024);
  if (bytes < (int64_t{1} << 30)) return absl::StrFormat("%.2f MiB", b / (1 << 20));
  return absl::StrFormat("%.2f GiB", b / (1 << 30));
}

absl::StatusOr<std::vector<TensorBytes>> ReadCheckpointTensors(const std::string& path, const std::string& prefix) {
  std::vector<std::string> files;
  if (absl::EndsWith(path, ".json")) {
    // A sharded checkpoint: read the shards that hold the wanted tensors, each once, in order.
    std::ifstream in(path);
    if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
    nlohmann::json index;
    try {
      in >> index;
    } catch (const std::exception& e) {
      return absl::InvalidArgumentError(absl::StrCat(path, " is not JSON: ", e.what()));
    }
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(path, " has no \"weight_map\" object (a safetensors index json)"));
    }
    const std::filesystem::path dir = std::filesystem::path(path).parent_path();
    std::set<std::string> seen;
    for (const auto& [name, file] : index["weight_map"].items()) {
      if (!file.is_string()) return absl::InvalidArgumentError(absl::StrCat(path, ": weight_map[", name, "] is not a string"));
      if (!prefix.empty() && !absl::StartsWith(name, prefix)) continue;
      const std::string shard = (dir / file.get<std::string>()).string();
      if (seen.insert(shard).second) files.push_back(shard);
    }
    if (files.empty()) return absl::NotFoundError(absl::StrCat(path, " names no tensor ", prefix, "*"));
  } else {
    files.push_back(path);
  }
  std::vector<TensorBytes> out;
  for (const std::string& file : files) {
    auto f = SafetensorsFile::Open(file);
    if (!f.ok()) return f.status();
    for (const SafetensorsEntry& e : f->tensors()) {
      if (!absl::StartsWith(e.name, prefix)) continue;
      out.push_back(FromEntry(*f, e, e.name.substr(prefix.size())));
    }
  }
  if (out.empty()) {
    return absl::NotFoundError(prefix.empty() ? absl::StrCat(path, " holds no tensors")
                                              : absl::StrCat(path, " holds no tensor named ", prefix, "*"));
  }
  return out;
}

absl::StatusOr<TensorBytes> ReadSafetensor(const std::string& path, const std::string& name) {
  auto f = SafetensorsFile::Open(path);
  if (!f.ok()) return f.status();
  if (name.empty()) {
    if (f->tensors().size() != 1) {
      return absl::InvalidArgumentError(absl::StrCat(path, " holds ", f->tensors().size(),
                                                     " tensors: name the one to use"));
    }
    return FromEntry(*f, f->tensors()[0], f->tensors()[0].name);
  }
  const SafetensorsEntry* e = f->Find(name);
  if (e == nullptr) return absl::NotFoundError(absl::StrCat(path, " has no tensor \"", name, "\""));
  return FromEntry(*f, *e, e->name);
}

absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorBytes>& tensors,
                              const std::string& prefix, const std::map<std::string, std::string>& metadata) {
  std::vector<SafetensorsTensorRef> refs;
  for (const TensorBytes& t : tensors) {
    auto dtype = FileDType(t.dtype);
    if (!dtype.ok()) return dtype.status();
    refs.push_back({prefix + t.name, *dtype, t.shape, absl::string_view(t.data)});
  }
  return WriteSafetensorsFile(path, refs, metadata);
}

absl::StatusOr<std::string> HttpGet(const std::string& url, absl::Duration timeout) {
  absl::string_view rest = url;
  if (absl::StartsWith(rest, "https://")) return absl::InvalidArgumentError("the metrics endpoint speaks plain HTTP");
  absl::ConsumePrefix(&rest, "http://");
  std::string path = "/metrics";
  const size_t slash = rest.find('/');
  if (slash != absl::string_view::npos) {
    path = std::string(rest.substr(slash));
    rest = rest.substr(0, slash);
  }
  std::string host(rest), port = "9464";
  if (!host.empty() && host[0] == '[') {  // [::1]:9464
    const size_t close = host.find(']');
    if (close == std::string::npos) return absl::InvalidArgumentError(absl::StrCat("bad address ", url));
    if (close + 1 < host.size() && host[close + 1] == ':') port = host.substr(close + 2);
    host = host.substr(1, close - 1);
  } else if (const size_t colon = host.rfind(':'); colon != std::string::npos) {
    port = host.substr(colon + 1);
    host = host.substr(0, colon);
  }
  if (host.empty()) host = "localhost";

  addrinfo hints = {};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* addrs = nullptr;
  if (int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &addrs); rc != 0) {
    return absl::UnavailableError(absl::StrCat("cannot resolve ", host, ":", port, ": ", gai_strerror(rc)));
  }
  timeval tv{};
  if (timeout != absl::InfiniteDuration()) tv = absl::ToTimeval(timeout);
  int fd = -1;
  std::string last_error = "no address";
  for (addrinfo* a = addrs; a != nullptr; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    // On Linux SO_SNDTIMEO also bounds connect().
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(fd, a->ai_addr, a->ai_addrlen) == 0) break;
    last_error = std::strerror(errno);
    close(fd);
    fd = -1;
  }
  freeaddrinfo(addrs);
  if (fd < 0) return absl::UnavailableError(absl::StrCat("cannot connect to ", host, ":", port, ": ", last_error));

  const std::string request = absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: ", host, ":", port,
                                           "\r\nAccept: text/plain\r\nConnection: close\r\n\r\n");
  for (size_t sent = 0; sent < request.size();) {
    const ssize_t n = send(fd, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) {
      const std::string err = std::strerror(errno);
      close(fd);
      return absl::UnavailableError(absl::StrCat("sending to ", host, ":", port, ": ", err));
    }
    sent += static_cast<size_t>(n);
  }
  std::string reply;
  char buf[16384];
  while (true) {
    const ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n == 0) break;
    if (n < 0) {
      if (errno == EINTR) continue;
      const std::string err = errno == EAGAIN || errno == EWOULDBLOCK ? "timed out" : std::strerror(errno);
      close(fd);
      return absl::DeadlineExceededError(absl::StrCat("reading from ", host, ":", port, ": ", err));
    }
    reply.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  const size_t header_end = reply.find("\r\n\r\n");
  if (header_end == std::string::npos) {
    return absl::UnavailableError(absl::StrCat(host, ":", port, " sent no HTTP reply"));
  }
  const std::string status_line = reply.substr(0, reply.find("\r\n"));
  std::vector<absl::string_view> parts = absl::StrSplit(status_line, absl::MaxSplits(' ', 2));
  int code = 0;
  if (parts.size() < 2 || !absl::StartsWith(parts[0], "HTTP/") || !absl::SimpleAtoi(parts[1], &code)) {
    return absl::UnavailableError(absl::StrCat(host, ":", port, " sent no HTTP reply"));
  }
  if (code != 200) {
    return absl::UnavailableError(absl::StrCat("GET http://", host, ":", port, path, ": ", status_line));
  }
  return reply.substr(header_end + 4);
}

}  // namespace blockd
