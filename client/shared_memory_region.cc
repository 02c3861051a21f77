#include "client/shared_memory_region.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "base/parallel_copy.h"
#include "base/status_macros.h"

namespace blockd {

std::string RandomHex() {
  unsigned char b[16];
  size_t got = 0;
  while (got < sizeof(b)) {
    const ssize_t n = getrandom(b + got, sizeof(b) - got, 0);
    if (n > 0) got += static_cast<size_t>(n);
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : b) {
    out += kHex[c >> 4];
    out += kHex[c & 15];
  }
  return out;
}

absl::StatusOr<bool> SharedMemoryAllowed(Client* client) {
  auto info = client->GetServerInfo();
  if (!info.ok()) return info.status();
  return info->shared_memory().allowed();
}

absl::StatusOr<std::unique_ptr<SharedMemoryRegion>> SharedMemoryRegion::Create(Client* client, int64_t byte_size,
                                                                                std::string name) {
  if (byte_size <= 0) return absl::InvalidArgumentError(absl::StrCat("byte_size = ", byte_size, ", expected > 0"));
  std::unique_ptr<SharedMemoryRegion> r(new SharedMemoryRegion());
  r->client_ = client;
  r->key_ = absl::StrCat("/blockd-", RandomHex());
  r->name_ = name.empty() ? absl::StrCat("region-", RandomHex().substr(0, 16)) : std::move(name);
  r->size_ = byte_size;
  const int fd = shm_open(r->key_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return absl::InternalError(absl::StrCat("shm_open(", r->key_, "): ", std::strerror(errno)));
  absl::Status s;
  if (ftruncate(fd, byte_size) != 0) {
    s = absl::ResourceExhaustedError(absl::StrCat("ftruncate(", r->key_, ", ", byte_size, "): ", std::strerror(errno)));
  } else {
    void* p = mmap(nullptr, static_cast<size_t>(byte_size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      s = absl::ResourceExhaustedError(absl::StrCat("mmap(", r->key_, "): ", std::strerror(errno)));
    } else {
      r->data_ = static_cast<char*>(p);
    }
  }
  close(fd);
  if (s.ok()) {
    v1::RegisterSharedMemoryRequest req;
    req.set_name(r->name_);
    req.set_key(r->key_);
    req.set_byte_size(byte_size);
    auto reg = client->RegisterSharedMemory(req);
    if (reg.ok()) {
      r->registered_ = true;
    } else {
      s = reg.status();
    }
  }
  // Registered or not, the name goes now: the daemon holds the object open, and nothing is left
  // in /dev/shm should this process die.
  shm_unlink(r->key_.c_str());
  if (!s.ok()) return s;
  return r;
}

SharedMemoryRegion::~SharedMemoryRegion() {
  if (registered_) client_->UnregisterSharedMemory(name_).IgnoreError();
  if (data_ != nullptr) munmap(data_, static_cast<size_t>(size_));
}

v1::SharedMemoryRef RegionRef(const std::string& name, int64_t offset, int64_t byte_size) {
  v1::SharedMemoryRef ref;
  ref.set_region(name);
  ref.set_offset(offset);
  ref.set_byte_size(byte_size);
  return ref;
}

absl::Status CheckFits(const std::string& name, int64_t size, int64_t offset, int64_t bytes) {
  if (offset < 0 || bytes < 0 || offset > size || bytes > size - offset) {
    return absl::InvalidArgumentError(absl::StrCat(bytes, " bytes at offset ", offset, " do not fit region ", name,
                                                   " of ", size, " bytes"));
  }
  return absl::OkStatus();
}

absl::Status CheckReplySlice(const std::string& name, int64_t size, const v1::SharedMemoryRef& ref) {
  if (ref.region() != name || ref.offset() < 0 || ref.byte_size() < 0 || ref.offset() > size ||
      ref.byte_size() > size - ref.offset()) {
    return absl::DataLossError(absl::StrCat("the reply names region ", ref.region(), " [", ref.offset(), ", +",
                                            ref.byte_size(), "), not a slice of region ", name, " of ", size,
                                            " bytes"));
  }
  return absl::OkStatus();
}

v1::Tensor SliceTensor(v1::DType dtype, const std::vector<int64_t>& shape, v1::SharedMemoryRef ref) {
  v1::Tensor t;
  t.set_dtype(dtype);
  for (int64_t d : shape) t.add_shape(d);
  *t.mutable_shared_memory() = std::move(ref);
  return t;
}

v1::SharedMemoryRef SharedMemoryRegion::Ref(int64_t offset, int64_t byte_size) const {
  return RegionRef(name_, offset, byte_size);
}

absl::StatusOr<v1::Tensor> SharedMemoryRegion::Put(int64_t offset, v1::DType dtype, const std::vector<int64_t>& shape,
                                                   absl::string_view bytes) {
  const int64_t n = static_cast<int64_t>(bytes.size());
  RETURN_IF_ERROR(CheckFits(name_, size_, offset, n));
  ParallelCopy(data_ + offset, bytes.data(), bytes.size());
  return SliceTensor(dtype, shape, Ref(offset, n));
}

absl::StatusOr<std::string> SharedMemoryRegion::Get(const v1::Tensor& t) const {
  if (!t.has_shared_memory()) return t.data();
  const v1::SharedMemoryRef& ref = t.shared_memory();
  RETURN_IF_ERROR(CheckReplySlice(name_, size_, ref));
  return std::string(data_ + ref.offset(), static_cast<size_t>(ref.byte_size()));
}

}  // namespace blockd
