#include "server/shared_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "base/echo.h"
#include "base/status_macros.h"

namespace blockd {
namespace {

constexpr char kKeyPrefix[] = "/blockd";

bool AllOf(absl::string_view s, absl::string_view extra) {
  for (char c : s) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    extra.find(c) != absl::string_view::npos;
    if (!ok) return false;
  }
  return true;
}

absl::Status CheckName(absl::string_view name) {
  if (name.empty() || name.size() > 128 || !AllOf(name, "._:-")) {
    return absl::InvalidArgumentError(absl::StrCat("shared-memory region name \"", Echo(name),
                                                   "\" is not valid: expected 1-128 characters of [A-Za-z0-9._:-]"));
  }
  return absl::OkStatus();
}

// Only objects named for blockd: a client must not make the daemon open some other program's
// shared memory (a database's, another daemon's) by naming it. No '/' after the first, so a key
// never leaves /dev/shm.
absl::Status CheckKey(absl::string_view key) {
  const absl::string_view rest = absl::StartsWith(key, kKeyPrefix) ? key.substr(sizeof(kKeyPrefix) - 1) : "";
  if (rest.empty() || rest.size() > 200 || !AllOf(rest, "._-")) {
    return absl::InvalidArgumentError(absl::StrCat(
        "shared-memory key \"", Echo(key),
        "\" is not valid: expected a POSIX shared-memory name \"/blockd\" followed by 1-200 characters of "
        "[A-Za-z0-9._-] (e.g. /blockd-3f9c...)"));
  }
  return absl::OkStatus();
}

std::string NotFound(absl::string_view what, absl::string_view region) {
  return absl::StrCat(what, ": shared-memory region \"", Echo(region),
                      "\" not found (never registered, unregistered, or unused past its TTL)");
}

}  // namespace

struct SharedMemoryRegistry::Region {
  std::string name, key;
  int64_t byte_size = 0, offset = 0;
  int fd = -1;                       // POSIX
  std::shared_ptr<PeerMemory> peer;  // CUDA IPC: closed when the last call using it lets go
  int device = 0;
  // POSIX on a CUDA daemon: the object's pages [map_from, offset + byte_size), mapped and pinned
  // for DMA; the region's byte 0 is at `pinned_at` of `pinned`.
  void* map = nullptr;
  size_t map_bytes = 0;
  int64_t pinned_at = 0;
  std::shared_ptr<PeerMemory> pinned;
  absl::Mutex mu;
  absl::Time last_used ABSL_GUARDED_BY(mu);
  ~Region() {
    pinned.reset();  // unpinned before it is unmapped
    if (map != nullptr) munmap(map, map_bytes);
    if (fd >= 0) close(fd);
  }
  SharedMemoryRegionInfo Info(absl::Duration idle, absl::Duration expires_in) const {
    return {name, key, byte_size, offset, idle, expires_in, peer != nullptr, device};
  }
};

SharedMemoryRegistry::SharedMemoryRegistry(SharedMemoryOptions options, PeerMemoryOpener open_peer,
                                           HostMemoryPinner pin)
    : options_(std::move(options)), open_peer_(std::move(open_peer)), pin_(std::move(pin)) {}

SharedMemoryRegistry::~SharedMemoryRegistry() {
  absl::MutexLock lock(&mu_);
  regions_.clear();
}

absl::Status SharedMemoryRegistry::CheckRegistrable(const std::string& owner, const std::string& name,
                                                    int64_t byte_size, int64_t offset) {
  if (!options_.allowed) {
    return absl::FailedPreconditionError(
        "shared-memory tensors are off: start blockd with --allow_shared_memory (same-host clients only), or send "
        "tensors inline");
  }
  if (auto s = CheckName(name); !s.ok()) return s;
  if (byte_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("byte_size = ", byte_size, ", expected > 0"));
  }
  if (offset < 0) return absl::InvalidArgumentError(absl::StrCat("offset = ", offset, ", expected >= 0"));
  if (byte_size > options_.max_bytes_per_client) {
    return absl::ResourceExhaustedError(absl::StrCat("byte_size = ", byte_size, " is over the ",
                                                     options_.max_bytes_per_client,
                                                     " bytes one client may register (--max_shared_memory_bytes_per_client)"));
  }
  if (offset > INT64_MAX - byte_size) {
    return absl::InvalidArgumentError(absl::StrCat("offset ", offset, " + byte_size ", byte_size, " overflows"));
  }
  // Cheap refusals before touching the file system or the device.
  absl::MutexLock lock(&mu_);
  int64_t count = 0, bytes = 0;
  for (const auto& [k, r] : regions_) {
    if (k.first != owner) continue;
    if (k.second == name) {
      return absl::AlreadyExistsError(absl::StrCat("shared-memory region \"", Echo(name),
                                                   "\" is already registered (unregister it first)"));
    }
    ++count;
    bytes += r->byte_size;
  }
  if (count >= options_.max_regions_per_client) {
    return absl::ResourceExhaustedError(absl::StrCat("client ", Echo(owner), " already has ", count,
                                                     " shared-memory regions (--max_shared_memory_regions_per_client=",
                                                     options_.max_regions_per_client, ")"));
  }
  if (byte_size > options_.max_bytes_per_client - bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "client ", Echo(owner), " has ", bytes, " bytes of shared memory registered; ", byte_size,
        " more would pass --max_shared_memory_bytes_per_client=", options_.max_bytes_per_client));
  }
  return absl::OkStatus();
}

absl::StatusOr<SharedMemoryRegionInfo> SharedMemoryRegistry::Insert(const std::string& owner,
                                                                    std::shared_ptr<Region> region) {
  {
    absl::MutexLock r(&region->mu);
    region->last_used = absl::Now();
  }
  absl::MutexLock lock(&mu_);
  // Checked again: another Register of this caller may have run while the object was opened.
  int64_t count = 0, bytes = 0;
  for (const auto& [k, r] : regions_) {
    if (k.first != owner) continue;
    if (k.second == region->name) {
      return absl::AlreadyExistsError(absl::StrCat("shared-memory region \"", Echo(region->name),
                                                   "\" is already registered (unregister it first)"));
    }
    ++count;
    bytes += r->byte_size;
  }
  if (count >= options_.max_regions_per_client || region->byte_size > options_.max_bytes_per_client - bytes) {
    return absl::ResourceExhaustedError(absl::StrCat("client ", Echo(owner),
                                                     " reached its shared-memory caps while registering (",
                                                     count, " regions, ", bytes, " bytes)"));
  }
  regions_[{owner, region->name}] = region;
  return region->Info(absl::ZeroDuration(), options_.ttl);
}

absl::StatusOr<SharedMemoryRegionInfo> SharedMemoryRegistry::Register(const std::string& owner,
                                                                      const std::string& name, const std::string& key,
                                                                      int64_t byte_size, int64_t offset) {
  if (auto s = CheckRegistrable(owner, name, byte_size, offset); !s.ok()) return s;
  if (auto s = CheckKey(key); !s.ok()) return s;
  // O_NOFOLLOW: /dev/shm is world-writable, a symlink planted there must not lead elsewhere.
  const int fd = shm_open(key.c_str(), O_RDWR | O_NOFOLLOW | O_CLOEXEC, 0);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT) {
      return absl::NotFoundError(absl::StrCat("no shared-memory object \"", Echo(key),
                                              "\" on the daemon's host (is the client on another host?)"));
    }
    return absl::InvalidArgumentError(
        absl::StrCat("cannot open shared-memory object \"", Echo(key), "\": ", std::strerror(err)));
  }
  auto region = std::make_shared<Region>();
  region->fd = fd;  // closed by ~Region from here on
  struct stat st = {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    return absl::InvalidArgumentError(absl::StrCat("shared-memory object \"", Echo(key), "\" is not a regular object"));
  }
  if (st.st_size < offset + byte_size) {
    return absl::InvalidArgumentError(absl::StrCat("shared-memory object \"", Echo(key), "\" holds ", st.st_size,
                                                   " bytes, expected at least offset + byte_size = ", offset + byte_size));
  }
  region->name = name;
  region->key = key;
  region->byte_size = byte_size;
  region->offset = offset;
  if (pin_ != nullptr) Pin(*region);
  return Insert(owner, std::move(region));
}

void SharedMemoryRegistry::Pin(Region& region) {
  const int64_t page = sysconf(_SC_PAGESIZE);
  const int64_t from = region.offset / page * page;
  const size_t bytes = static_cast<size_t>(region.offset + region.byte_size - from);
  void* map = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, region.fd, static_cast<off_t>(from));
  if (map == MAP_FAILED) return;
  // The driver faults the pages in as it pins them (no CPU access here): an object shrunk since
  // the size check makes it fail, not fault.
  absl::StatusOr<std::unique_ptr<PeerMemory>> pinned = pin_(map, bytes);
  if (!pinned.ok()) {
    munmap(map, bytes);
    return;
  }
  region.map = map;
  region.map_bytes = bytes;
  region.pinned_at = region.offset - from;
  region.pinned = *std::move(pinned);
}

absl::StatusOr<SharedMemoryRegionInfo> SharedMemoryRegistry::RegisterCudaIpc(
    const std::string& owner, const std::string& name, int device, absl::string_view mem_handle,
    absl::string_view event_handle, int64_t byte_size, int64_t offset) {
  if (auto s = CheckRegistrable(owner, name, byte_size, offset); !s.ok()) return s;
  if (mem_handle.size() != kCudaIpcHandleBytes) {
    return absl::InvalidArgumentError(absl::StrCat("cuda_ipc_handle has ", mem_handle.size(), " bytes, expected ",
                                                   kCudaIpcHandleBytes, " (a cudaIpcMemHandle_t)"));
  }
  if (!event_handle.empty() && event_handle.size() != kCudaIpcHandleBytes) {
    return absl::InvalidArgumentError(absl::StrCat("cuda_ipc_event_handle has ", event_handle.size(),
                                                   " bytes, expected ", kCudaIpcHandleBytes,
                                                   " (a cudaIpcEventHandle_t) or none"));
  }
  if (device < 0) return absl::InvalidArgumentError(absl::StrCat("device = ", device, ", expected >= 0"));
  if (open_peer_ == nullptr) {
    return absl::FailedPreconditionError("CUDA IPC regions need the CUDA backend: register POSIX shared memory");
  }
  ASSIGN_OR_RETURN(std::unique_ptr<PeerMemory> peer, open_peer_(device, mem_handle, event_handle));
  if (offset > peer->bytes() || byte_size > peer->bytes() - offset) {
    return absl::InvalidArgumentError(absl::StrCat("the CUDA IPC allocation holds ", peer->bytes(),
                                                   " bytes from the handle, expected at least offset + byte_size = ",
                                                   offset + byte_size));
  }
  auto region = std::make_shared<Region>();
  region->name = name;
  region->byte_size = byte_size;
  region->offset = offset;
  region->device = device;
  region->peer = std::move(peer);
  return Insert(owner, std::move(region));
}

absl::Status SharedMemoryRegistry::Unregister(const std::string& owner, absl::string_view name) {
  absl::MutexLock lock(&mu_);
  auto it = regions_.find({owner, std::string(name)});
  if (it == regions_.end()) return absl::NotFoundError(NotFound("UnregisterSharedMemory", name));
  regions_.erase(it);
  return absl::OkStatus();
}

std::vector<SharedMemoryRegionInfo> SharedMemoryRegistry::List(const std::string& owner) {
  std::vector<SharedMemoryRegionInfo> out;
  const absl::Time now = absl::Now();
  absl::MutexLock lock(&mu_);
  for (const auto& [k, r] : regions_) {
    if (k.first != owner) continue;
    absl::MutexLock rl(&r->mu);
    const absl::Duration idle = now - r->last_used;
    out.push_back(r->Info(idle, std::max(absl::ZeroDuration(), options_.ttl - idle)));
  }
  return out;
}

int64_t SharedMemoryRegistry::Expire() {
  const absl::Time now = absl::Now();
  int64_t n = 0;
  absl::MutexLock lock(&mu_);
  for (auto it = regions_.begin(); it != regions_.end();) {
    bool expired;
    {
      absl::MutexLock rl(&it->second->mu);
      expired = now - it->second->last_used >= options_.ttl;
    }
    if (expired) {
      it = regions_.erase(it);
      ++n;
    } else {
      ++it;
    }
  }
  return n;
}

int64_t SharedMemoryRegistry::regions() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(regions_.size());
}

int64_t SharedMemoryRegistry::registered_bytes() const {
  absl::MutexLock lock(&mu_);
  int64_t bytes = 0;
  for (const auto& [k, r] : regions_) bytes += r->byte_size;
  return bytes;
}

absl::StatusOr<std::shared_ptr<SharedMemoryRegistry::Region>> SharedMemoryRegistry::Resolve(
    const std::string& owner, const SharedMemorySlice& slice, absl::string_view what, int64_t* object_offset) {
  if (!options_.allowed) {
    return absl::FailedPreconditionError(absl::StrCat(
        what, " names a shared-memory region, but shared-memory tensors are off: start blockd with "
              "--allow_shared_memory, or send the tensor inline"));
  }
  std::shared_ptr<Region> region;
  {
    absl::MutexLock lock(&mu_);
    auto it = regions_.find({owner, slice.region});
    if (it == regions_.end()) return absl::NotFoundError(NotFound(what, slice.region));
    region = it->second;
  }
  // Overflow-safe: offset + byte_size is never computed before both are known to fit.
  if (slice.offset < 0 || slice.byte_size < 0 || slice.offset > region->byte_size ||
      slice.byte_size > region->byte_size - slice.offset) {
    return absl::InvalidArgumentError(absl::StrCat(what, " = [offset ", slice.offset, ", byte_size ", slice.byte_size,
                                                   "] is outside region \"", Echo(slice.region), "\" of ",
                                                   region->byte_size, " bytes"));
  }
  if (slice.byte_size > options_.max_tensor_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(what, ".byte_size = ", slice.byte_size, ", at most ",
                                                   options_.max_tensor_bytes,
                                                   " bytes per tensor (--max_message_bytes, as inline)"));
  }
  {
    absl::MutexLock rl(&region->mu);
    region->last_used = absl::Now();
  }
  *object_offset = region->offset + slice.offset;  // <= offset + byte_size, checked at Register
  return region;
}

absl::Status SharedMemoryRegistry::NotPosix(const Region& region, absl::string_view what) {
  if (region.peer == nullptr) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      what, ": region \"", Echo(region.name),
      "\" is CUDA IPC device memory, which only Forward and Backward tensors may name: use a POSIX region here"));
}

absl::StatusOr<SharedMemoryTarget> SharedMemoryRegistry::Open(const std::string& owner,
                                                              const SharedMemorySlice& slice, absl::string_view what) {
  int64_t at = 0;
  ASSIGN_OR_RETURN(std::shared_ptr<Region> region, Resolve(owner, slice, what, &at));
  SharedMemoryTarget target;
  if (region->peer != nullptr) {  // device memory cannot shrink under a mapping
    target.dma = region->peer;
    target.dma_offset = at;
    target.cuda_ipc = true;
    return target;
  }
  // The client may have shrunk its object since it registered: refuse now, before any change.
  struct stat st = {};
  if (fstat(region->fd, &st) != 0 || st.st_size < at + slice.byte_size) {
    return absl::FailedPreconditionError(absl::StrCat(
        what, ": shared-memory object \"", Echo(region->key), "\" now holds ", st.st_size,
        " bytes, fewer than the region registered (it was truncated): register it again"));
  }
  target.dma = region->pinned;
  target.dma_offset = region->pinned_at + slice.offset;
  return target;
}

absl::Status SharedMemoryRegistry::Read(const std::string& owner, const SharedMemorySlice& slice,
                                        absl::string_view what, std::string* out) {
  int64_t at = 0;
  ASSIGN_OR_RETURN(std::shared_ptr<Region> region, Resolve(owner, slice, what, &at));
  RETURN_IF_ERROR(NotPosix(*region, what));
  out->resize(static_cast<size_t>(slice.byte_size));  // bounded by Resolve
  return Pread(*region, at, at + slice.byte_size, what, out->data(), out->size());
}

absl::Status SharedMemoryRegistry::ReadAt(const std::string& owner, const SharedMemorySlice& slice,
                                          absl::string_view what, int64_t from, void* dst, size_t bytes) {
  int64_t at = 0;
  ASSIGN_OR_RETURN(std::shared_ptr<Region> region, Resolve(owner, slice, what, &at));
  RETURN_IF_ERROR(NotPosix(*region, what));
  RETURN_IF_ERROR(CheckWithin(slice, what, from, bytes));
  return Pread(*region, at + from, at + slice.byte_size, what, dst, bytes);
}

absl::Status SharedMemoryRegistry::Write(const std::string& owner, const SharedMemorySlice& slice,
                                         absl::string_view what, absl::string_view bytes) {
  int64_t at = 0;
  ASSIGN_OR_RETURN(std::shared_ptr<Region> region, Resolve(owner, slice, what, &at));
  RETURN_IF_ERROR(NotPosix(*region, what));
  if (static_cast<int64_t>(bytes.size()) > slice.byte_size) {
    return absl::InvalidArgumentError(absl::StrCat(what, ".byte_size = ", slice.byte_size, ", the output needs ",
                                                   bytes.size(), " bytes"));
  }
  return Pwrite(*region, at, what, bytes.data(), bytes.size());
}

absl::Status SharedMemoryRegistry::WriteAt(const std::string& owner, const SharedMemorySlice& slice,
                                           absl::string_view what, int64_t from, const void* src, size_t bytes) {
  int64_t at = 0;
  ASSIGN_OR_RETURN(std::shared_ptr<Region> region, Resolve(owner, slice, what, &at));
  RETURN_IF_ERROR(NotPosix(*region, what));
  RETURN_IF_ERROR(CheckWithin(slice, what, from, bytes));
  return Pwrite(*region, at + from, what, src, bytes);
}

absl::Status SharedMemoryRegistry::Pread(const Region& region, int64_t at, int64_t slice_end, absl::string_view what,
                                         void* dst, size_t bytes) {
  size_t done = 0;
  while (done < bytes) {
    const ssize_t n = pread(region.fd, static_cast<char*>(dst) + done, bytes - done, at + static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {  // past the object's end: it was truncated after registering
      return absl::FailedPreconditionError(absl::StrCat(
          what, ": shared-memory object \"", Echo(region.key), "\" ended after ", at + static_cast<int64_t>(done),
          " of the ", slice_end, " bytes the slice needs (it was truncated): register it again"));
    }
    done += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

absl::Status SharedMemoryRegistry::Pwrite(const Region& region, int64_t at, absl::string_view what, const void* src,
                                          size_t bytes) {
  size_t done = 0;
  while (done < bytes) {
    // pwrite never faults: on an object the client shrank meanwhile it writes (inside the
    // registered window only) and regrows it rather than touching an unmapped page.
    const ssize_t n = pwrite(region.fd, static_cast<const char*>(src) + done, bytes - done, at + static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      return absl::ResourceExhaustedError(absl::StrCat(what, ": writing shared-memory object \"", Echo(region.key),
                                                       "\" failed: ", std::strerror(errno)));
    }
    done += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

absl::Status SharedMemoryRegistry::CheckWithin(const SharedMemorySlice& slice, absl::string_view what, int64_t from,
                                               size_t bytes) {
  if (from < 0 || from > slice.byte_size || bytes > static_cast<uint64_t>(slice.byte_size - from)) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": bytes [", from, ", +", bytes,
                                                   ") are outside the slice's ", slice.byte_size));
  }
  return absl::OkStatus();
}

}  // namespace blockd
