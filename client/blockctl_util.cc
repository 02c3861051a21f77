#include "client/blockctl_util.h"

#include <netdb.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
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
#include "base/safetensors.h"
#include "proto/config_convert.h"
#include "nlohmann/json.hpp"

namespace blockd {
namespace {

TensorBytes FromEntry(const SafetensorsFile& f, const SafetensorsEntry& e, std::string name) {
  const absl::string_view bytes = f.data(e);
  return TensorBytes{std::move(name), ToProto(e.dtype), e.shape, std::string(bytes.data(), bytes.size())};
}

}  // namespace

ProgressBar::ProgressBar(std::string label, std::optional<bool> enabled)
    : label_(std::move(label)),
      enabled_(enabled.value_or(isatty(STDERR_FILENO) == 1)),
      start_(absl::Now()),
      last_(absl::InfinitePast()) {}

void ProgressBar::SetSuffix(std::string suffix) { suffix_ = std::move(suffix); }

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
  if (!suffix_.empty()) absl::StrAppend(&line, "  ", suffix_);
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

absl::StatusOr<SafetensorsCheckpoint> SafetensorsCheckpoint::Open(const std::string& path) {
  namespace fs = std::filesystem;
  SafetensorsCheckpoint c;
  c.path_ = path;
  std::error_code ec;
  std::string index;
  if (fs::is_directory(path, ec)) {
    c.dir_ = path;
    const fs::path index_path = fs::path(path) / "model.safetensors.index.json";
    if (fs::is_regular_file(index_path, ec)) {
      index = index_path.string();
    } else {
      // No index: every *.safetensors here, in name order; a tensor may live in one of them only.
      std::vector<std::string> shards;
      for (fs::directory_iterator it(path, ec), end; !ec && it != end; it.increment(ec)) {
        std::error_code type_ec;  // a dangling link is skipped, not an error
        if (it->path().extension() == ".safetensors" && it->is_regular_file(type_ec)) {
          shards.push_back(it->path().filename().string());
        }
      }
      if (ec) return absl::NotFoundError(absl::StrCat("cannot list ", path, ": ", ec.message()));
      if (shards.empty()) return absl::NotFoundError(absl::StrCat(path, ": no *.safetensors files"));
      std::sort(shards.begin(), shards.end());
      for (const std::string& shard : shards) {
        auto f = SafetensorsFile::Open((fs::path(path) / shard).string());
        if (!f.ok()) return f.status();
        for (const SafetensorsEntry& e : f->tensors()) {
          if (auto [it, fresh] = c.where_.emplace(e.name, shard); !fresh) {
            return absl::InvalidArgumentError(
                absl::StrCat(path, ": tensor ", e.name, " is in both ", it->second, " and ", shard));
          }
          c.names_.push_back(e.name);
        }
        c.files_.emplace(shard, *std::move(f));
      }
      return c;
    }
  } else if (absl::EndsWith(path, ".json")) {
    index = path;
    c.dir_ = fs::path(path).parent_path().string();
  } else {
    auto f = SafetensorsFile::Open(path);
    if (!f.ok()) return f.status();
    for (const SafetensorsEntry& e : f->tensors()) {
      c.where_.emplace(e.name, path);
      c.names_.push_back(e.name);
    }
    c.files_.emplace(path, *std::move(f));
    return c;
  }

  // A sharded checkpoint's index: {"metadata": {...}, "weight_map": {tensor: shard file}}.
  std::ifstream in(index);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", index));
  nlohmann::ordered_json j;
  try {
    in >> j;
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(index, " is not JSON: ", e.what()));
  }
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object() || j["weight_map"].empty()) {
    return absl::InvalidArgumentError(absl::StrCat(index, " has no \"weight_map\" object (a safetensors index json)"));
  }
  std::set<std::string> checked;
  for (const auto& [name, file] : j["weight_map"].items()) {
    if (!file.is_string()) return absl::InvalidArgumentError(absl::StrCat(index, ": weight_map[", name, "] is not a string"));
    const std::string shard = file.get<std::string>();
    if (checked.insert(shard).second) {
      // Shards lie beside the index: a plain file name, never a path elsewhere.
      if (shard.empty() || shard == "." || shard == ".." || shard.find_first_of("/\\") != std::string::npos) {
        return absl::InvalidArgumentError(
            absl::StrCat(index, ": tensor ", name, " is in \"", shard, "\", which is not a file name beside the index"));
      }
      if (!fs::is_regular_file(fs::path(c.dir_) / shard, ec)) {
        return absl::NotFoundError(absl::StrCat(index, ": tensor ", name, " is in \"", shard, "\", which is not a file here"));
      }
    }
    c.where_.emplace(name, shard);
    c.names_.push_back(name);
  }
  return c;
}

absl::StatusOr<const SafetensorsEntry*> SafetensorsCheckpoint::Find(const std::string& name,
                                                                    const SafetensorsFile** file) {
  const auto where = where_.find(name);
  if (where == where_.end()) return absl::NotFoundError(absl::StrCat(path_, ": no tensor ", name));
  auto f = files_.find(where->second);
  if (f == files_.end()) {
    auto opened = SafetensorsFile::Open((std::filesystem::path(dir_) / where->second).string());
    if (!opened.ok()) return opened.status();
    f = files_.emplace(where->second, *std::move(opened)).first;
  }
  const SafetensorsEntry* e = f->second.Find(name);
  if (e == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": the index puts ", name, " in ", where->second, ", which lacks it"));
  }
  *file = &f->second;
  return e;
}

absl::StatusOr<TensorBytes> SafetensorsCheckpoint::Describe(const std::string& name) {
  const SafetensorsFile* f = nullptr;
  auto e = Find(name, &f);
  if (!e.ok()) return e.status();
  return TensorBytes{name, ToProto((*e)->dtype), (*e)->shape, ""};
}

absl::StatusOr<TensorBytes> SafetensorsCheckpoint::Read(const std::string& name, std::string as) {
  const SafetensorsFile* f = nullptr;
  auto e = Find(name, &f);
  if (!e.ok()) return e.status();
  return FromEntry(*f, **e, std::move(as));
}

absl::StatusOr<std::vector<TensorBytes>> SafetensorsCheckpoint::ReadPrefix(const std::string& prefix) {
  std::vector<TensorBytes> out;
  for (const std::string& name : names_) {
    if (!absl::StartsWith(name, prefix)) continue;
    auto t = Read(name, name.substr(prefix.size()));
    if (!t.ok()) return t.status();
    out.push_back(*std::move(t));
  }
  if (out.empty()) {
    return absl::NotFoundError(prefix.empty() ? absl::StrCat(path_, " holds no tensors")
                                              : absl::StrCat(path_, " holds no tensor named ", prefix, "*"));
  }
  return out;
}

absl::StatusOr<std::vector<TensorBytes>> ReadCheckpointTensors(const std::string& path, const std::string& prefix) {
  auto ckpt = SafetensorsCheckpoint::Open(path);
  if (!ckpt.ok()) return ckpt.status();
  return ckpt->ReadPrefix(prefix);
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
    auto dtype = FromProto(t.dtype, absl::StrCat("tensor ", t.name, " dtype"));
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
