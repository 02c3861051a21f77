#include "base/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <set>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "nlohmann/json.hpp"

namespace blockd {
namespace {

constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // as the reference implementation

absl::Status Bad(absl::string_view what) { return absl::InvalidArgumentError(absl::StrCat("safetensors: ", what)); }

absl::StatusOr<DType> ParseDType(const std::string& s, absl::string_view name) {
  if (s == "F32") return DType::kFloat32;
  if (s == "BF16") return DType::kBFloat16;
  if (s == "F16") return DType::kFloat16;
  return Bad(absl::StrCat("tensor \"", name, "\" has dtype ", s, "; blockd reads F32, BF16 and F16"));
}

struct Mapping {
  void* addr = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (addr != nullptr && addr != MAP_FAILED) munmap(addr, size);
  }
};

}  // namespace

absl::string_view SafetensorsDTypeName(DType t) {
  switch (t) {
    case DType::kFloat32: return "F32";
    case DType::kBFloat16: return "BF16";
    case DType::kFloat16: return "F16";
  }
  return "?";
}

const SafetensorsEntry* SafetensorsFile::Find(absl::string_view name) const {
  for (const SafetensorsEntry& e : tensors_) {
    if (e.name == name) return &e;
  }
  return nullptr;
}

absl::StatusOr<SafetensorsFile> SafetensorsFile::Parse(std::string bytes) {
  auto owner = std::make_shared<const std::string>(std::move(bytes));
  absl::string_view view(*owner);
  return FromView(owner, view);
}

absl::StatusOr<SafetensorsFile> SafetensorsFile::Open(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    close(fd);
    return absl::InternalError(absl::StrCat("cannot stat ", path, ": ", std::strerror(errno)));
  }
  auto mapping = std::make_shared<Mapping>();
  mapping->size = static_cast<size_t>(st.st_size);
  if (mapping->size > 0) mapping->addr = mmap(nullptr, mapping->size, PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (mapping->addr == MAP_FAILED) return absl::InternalError(absl::StrCat("cannot map ", path));
  absl::string_view view(static_cast<const char*>(mapping->addr), mapping->size);
  auto f = FromView(mapping, view);
  if (!f.ok()) return absl::Status(f.status().code(), absl::StrCat(path, ": ", f.status().message()));
  return f;
}

absl::StatusOr<SafetensorsFile> SafetensorsFile::FromView(std::shared_ptr<const void> owner, absl::string_view whole) {
  if (whole.size() < 8) return Bad(absl::StrCat("file is ", whole.size(), " bytes, shorter than the 8-byte header length"));
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(whole[i]);
  if (n > kMaxHeaderBytes) return Bad(absl::StrCat("header length ", n, " exceeds the 100 MiB limit"));
  if (n > whole.size() - 8) {
    return Bad(absl::StrCat("header length ", n, " exceeds the ", whole.size() - 8, " bytes after it"));
  }
  const absl::string_view header = whole.substr(8, n);
  if (header.empty() || header[0] != '{') return Bad("header does not start with '{'");

  // Reject duplicate top-level names, which a JSON object parser would silently merge.
  std::set<std::string> keys;
  bool duplicate = false;
  std::string duplicate_name;
  auto on_event = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    if (event == nlohmann::json::parse_event_t::key && depth == 1) {
      const std::string& k = parsed.get_ref<const std::string&>();
      if (!keys.insert(k).second && !duplicate) {
        duplicate = true;
        duplicate_name = k;
      }
    }
    return true;
  };
  nlohmann::json j = nlohmann::json::parse(header.begin(), header.end(), on_event, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return Bad("header is not a valid JSON object");
  if (duplicate) return Bad(absl::StrCat("header names \"", duplicate_name, "\" twice"));

  SafetensorsFile f;
  f.owner_ = std::move(owner);
  f.buffer_ = whole.substr(8 + n);
  for (auto& [name, v] : j.items()) {
    if (name == "__metadata__") {
      if (!v.is_object()) return Bad("__metadata__ is not an object");
      for (auto& [k, mv] : v.items()) {
        if (!mv.is_string()) return Bad(absl::StrCat("__metadata__ value of \"", k, "\" is not a string"));
        f.metadata_[k] = mv.get<std::string>();
      }
      continue;
    }
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") || !v.contains("data_offsets") ||
        !v["dtype"].is_string() || !v["shape"].is_array() || !v["data_offsets"].is_array() || v.size() != 3) {
      return Bad(absl::StrCat("tensor \"", name, "\" must have exactly dtype, shape and data_offsets"));
    }
    SafetensorsEntry e;
    e.name = name;
    ASSIGN_OR_RETURN(e.dtype, ParseDType(v["dtype"].get<std::string>(), name));
    uint64_t numel = 1;
    for (const auto& d : v["shape"]) {
      if (!d.is_number_unsigned()) return Bad(absl::StrCat("tensor \"", name, "\" has a shape entry that is not a non-negative integer"));
      const uint64_t dim = d.get<uint64_t>();
      if (dim > (1ull << 40) || (dim != 0 && numel > (1ull << 40) / dim)) {
        return Bad(absl::StrCat("tensor \"", name, "\" shape overflows"));
      }
      numel *= dim;
      e.shape.push_back(static_cast<int64_t>(dim));
    }
    const auto& off = v["data_offsets"];
    if (off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned()) {
      return Bad(absl::StrCat("tensor \"", name, "\" data_offsets must be two non-negative integers"));
    }
    const uint64_t begin = off[0].get<uint64_t>(), end = off[1].get<uint64_t>();
    if (end < begin || end > f.buffer_.size()) {
      return Bad(absl::StrCat("tensor \"", name, "\" data_offsets [", begin, ", ", end, "] fall outside the ",
                              f.buffer_.size(), "-byte data buffer"));
    }
    if (end - begin != numel * DTypeSize(e.dtype)) {
      return Bad(absl::StrCat("tensor \"", name, "\" has ", end - begin, " bytes, but its shape and dtype need ",
                              numel * DTypeSize(e.dtype)));
    }
    e.offset = begin;
    e.size = end - begin;
    f.tensors_.push_back(std::move(e));
  }
  // The buffer must be exactly covered: sorted by offset, each tensor starts where the last ended.
  std::vector<const SafetensorsEntry*> by_offset;
  for (const SafetensorsEntry& e : f.tensors_) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) {
    return a->offset != b->offset ? a->offset < b->offset : a->size < b->size;
  });
  uint64_t at = 0;
  for (const SafetensorsEntry* e : by_offset) {
    if (e->offset != at) {
      return Bad(absl::StrCat("tensor \"", e->name, "\" starts at byte ", e->offset, ", expected ", at,
                              e->offset < at ? " (it overlaps another tensor)" : " (a hole before it)"));
    }
    at = e->offset + e->size;
  }
  if (at != f.buffer_.size()) {
    return Bad(absl::StrCat("data buffer has ", f.buffer_.size() - at, " bytes after the last tensor"));
  }
  return f;
}

absl::StatusOr<std::string> SerializeSafetensors(const std::vector<SafetensorsTensorRef>& tensors,
                                                 const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  std::set<absl::string_view> names;
  for (const SafetensorsTensorRef& t : tensors) {
    if (!names.insert(t.name).second || t.name == "__metadata__") {
      return absl::InvalidArgumentError(absl::StrCat("safetensors: tensor name \"", t.name, "\" used twice or reserved"));
    }
    uint64_t numel = 1;
    for (int64_t d : t.shape) numel *= static_cast<uint64_t>(d);
    if (numel * DTypeSize(t.dtype) != t.bytes.size()) {
      return absl::InvalidArgumentError(absl::StrCat("safetensors: tensor \"", t.name, "\" has ", t.bytes.size(),
                                                     " bytes for ", numel, " elements"));
    }
    header[t.name] = {{"dtype", SafetensorsDTypeName(t.dtype)},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');
  std::string out;
  out.reserve(8 + h.size() + offset);
  uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  out += h;
  for (const SafetensorsTensorRef& t : tensors) out.append(t.bytes.data(), t.bytes.size());
  return out;
}

absl::Status WriteSafetensorsFile(const std::string& path, const std::vector<SafetensorsTensorRef>& tensors,
                                  const std::map<std::string, std::string>& metadata) {
  ASSIGN_OR_RETURN(std::string bytes, SerializeSafetensors(tensors, metadata));
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return absl::PermissionDeniedError(absl::StrCat("cannot create ", path, ": ", std::strerror(errno)));
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t w = write(fd, bytes.data() + done, bytes.size() - done);
    if (w < 0) {
      if (errno == EINTR) continue;
      const std::string err = std::strerror(errno);
      close(fd);
      return absl::InternalError(absl::StrCat("cannot write ", path, ": ", err));
    }
    done += static_cast<size_t>(w);
  }
  const bool synced = fsync(fd) == 0;
  const bool closed = close(fd) == 0;
  if (!synced || !closed) return absl::InternalError(absl::StrCat("cannot sync ", path, ": ", std::strerror(errno)));
  return absl::OkStatus();
}

}  // namespace blockd
