// Shared-memory regions of same-host clients: the registry behind RegisterSharedMemory,
// UnregisterSharedMemory, ListSharedMemory and the tensors that name a region slice instead of
// carrying bytes (ARCHITECTURE.md, "Shared-memory tensors").
//
// A region is a window [offset, offset + byte_size) of a POSIX shared-memory object the client
// created (shm_open name "/blockd..."), or of a same-GPU client's device memory opened from its
// CUDA IPC handle (RegisterCudaIpc; the engine's PeerMemory, read and written device to device by
// the backend, never by the registry). It belongs to the identity that registered it (as
// activation handles and sessions do, engine/owned.h): for anyone else it does not exist.
//
// On a CUDA daemon a POSIX region is also mapped and pinned for DMA at Register (Open says so): the
// engine's copies then go between the client's pages and the device with no host copy at all. Only
// the DMA engine touches that mapping, never the daemon's CPU, and the pinned pages stay until the
// region goes, so a shrunk object cannot fault the daemon there either.
//
// Why pread/pwrite and not mmap: a client can ftruncate its object after registering, and a
// daemon that touches a mapped page past the new end gets SIGBUS, which would kill every other
// client's blocks. Where a region is not pinned, the registry keeps the object's fd open and
// copies with pread(2)/pwrite(2), which the kernel bounds by the object's current size: a shrunk
// object reads short (refused with FAILED_PRECONDITION, naming the sizes) and can never fault the
// daemon.
//
//   SharedMemoryRegistry shm({.max_regions_per_client = 16, ...});
//   RETURN_IF_ERROR(shm.Register(caller, "acts", "/blockd-1f2e...", 1 << 20, 0).status());
//   ASSIGN_OR_RETURN(SharedMemoryTarget t, shm.Open(caller, {"acts", 0, 4096}, "input"));  // t.dma: by DMA
//   std::string bytes;
//   RETURN_IF_ERROR(shm.Read(caller, {"acts", 0, 4096}, "input", &bytes));
//   RETURN_IF_ERROR(shm.Write(caller, {"acts", 4096, 4096}, "output", bytes));
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "engine/backend.h"

namespace blockd {

struct SharedMemoryOptions {
  bool allowed = false;  // --allow_shared_memory
  int64_t max_regions_per_client = 16;
  int64_t max_bytes_per_client = int64_t{16} << 30;
  absl::Duration ttl = absl::Minutes(10);  // unused this long: unregistered by Expire
  int64_t max_tensor_bytes = int64_t{256} << 20;  // one tensor's slice (--max_message_bytes)
};

// A slice of a region, relative to the region.
struct SharedMemorySlice {
  std::string region;
  int64_t offset = 0;
  int64_t byte_size = 0;
};

struct SharedMemoryRegionInfo {
  std::string name, key;
  int64_t byte_size = 0, offset = 0;
  absl::Duration idle, expires_in;
  bool cuda_ipc = false;
  int device = 0;  // CUDA IPC only
};

// Opens a client's CUDA IPC memory on a device (the backend's OpenPeerMemory).
using PeerMemoryOpener = std::function<absl::StatusOr<std::unique_ptr<PeerMemory>>(
    int device, absl::string_view mem_handle, absl::string_view event_handle)>;

// Pins a POSIX region's mapping for DMA (the backend's PinHostMemory); refused on the CPU.
using HostMemoryPinner = std::function<absl::StatusOr<std::unique_ptr<PeerMemory>>(void* ptr, size_t bytes)>;

// The bytes of a cudaIpcMemHandle_t and a cudaIpcEventHandle_t (CUDA_IPC_HANDLE_SIZE), checked
// here so a malformed handle gets the same answer from a CPU daemon and a CUDA one.
inline constexpr size_t kCudaIpcHandleBytes = 64;

// How a slice's bytes move (SharedMemoryRegistry::Open). `dma`: CUDA IPC memory, or a POSIX
// region's mapping pinned for DMA (PeerMemory::kHost, which only DMA touches: a client that
// truncates its object cannot fault the daemon through it), with the slice at `dma_offset`; null
// for a POSIX region that was not pinned, whose bytes Read and Write (and ReadAt, WriteAt) copy.
// Holding `dma` keeps the memory open past an Unregister until the call is done.
struct SharedMemoryTarget {
  std::shared_ptr<PeerMemory> dma;
  int64_t dma_offset = 0;
  bool cuda_ipc = false;
};

class SharedMemoryRegistry {
 public:
  // Without `open_peer` (or with a CPU backend's, which refuses) CUDA IPC regions are refused.
  // With `pin` (a CUDA backend's), a POSIX region is also mapped and pinned at Register, so that
  // the engine moves its tensors by DMA (Open); where pinning is refused, Read and Write copy.
  explicit SharedMemoryRegistry(SharedMemoryOptions options, PeerMemoryOpener open_peer = nullptr,
                                HostMemoryPinner pin = nullptr);
  ~SharedMemoryRegistry();  // closes every region's object
  SharedMemoryRegistry(const SharedMemoryRegistry&) = delete;
  SharedMemoryRegistry& operator=(const SharedMemoryRegistry&) = delete;

  const SharedMemoryOptions& options() const { return options_; }

  // Opens `key` and checks that the object is a regular file of at least offset + byte_size
  // bytes. FAILED_PRECONDITION when shared memory is off; INVALID_ARGUMENT for a bad name, key,
  // offset or size, or an object too small; NOT_FOUND when no object has that key (on this
  // host); ALREADY_EXISTS for a name the caller uses; RESOURCE_EXHAUSTED past the caller's caps.
  absl::StatusOr<SharedMemoryRegionInfo> Register(const std::string& owner, const std::string& name,
                                                  const std::string& key, int64_t byte_size, int64_t offset);
  // A CUDA IPC region: byte_size bytes from `offset` of the device memory `mem_handle` names on
  // `device`, with the client's IPC event (may be empty). The same name, size and cap checks as
  // Register; INVALID_ARGUMENT for a handle of the wrong size or one that does not open, or a
  // window past the allocation's end; FAILED_PRECONDITION without a CUDA backend or for memory
  // of another device.
  absl::StatusOr<SharedMemoryRegionInfo> RegisterCudaIpc(const std::string& owner, const std::string& name,
                                                         int device, absl::string_view mem_handle,
                                                         absl::string_view event_handle, int64_t byte_size,
                                                         int64_t offset);
  // NOT_FOUND for an unknown region or another identity's. Calls using it finish first (the object
  // is closed when the last of them lets go).
  absl::Status Unregister(const std::string& owner, absl::string_view name);
  std::vector<SharedMemoryRegionInfo> List(const std::string& owner);
  // Unregisters regions unused for the TTL; returns how many.
  int64_t Expire();
  int64_t regions() const;
  int64_t registered_bytes() const;

  // Checks a slice for a call (its region is the caller's, its bounds, --max tensor bytes, and a
  // POSIX object that still holds it: fstat) without copying, and says how its bytes move (Open's
  // result). `what` names the field in errors ("input.shared_memory"). Renews the region.
  absl::StatusOr<SharedMemoryTarget> Open(const std::string& owner, const SharedMemorySlice& slice,
                                          absl::string_view what);
  // Copies the slice's bytes into `out` (resized to byte_size). FAILED_PRECONDITION on a CUDA IPC
  // region (the engine reads those on the device), as Write.
  absl::Status Read(const std::string& owner, const SharedMemorySlice& slice, absl::string_view what,
                    std::string* out);
  // Writes `bytes` at the slice's start; the slice must hold them.
  absl::Status Write(const std::string& owner, const SharedMemorySlice& slice, absl::string_view what,
                     absl::string_view bytes);
  // Read and Write of `bytes` from `from` bytes into the slice, into `dst` or from `src` (a piece
  // of a tensor that the engine moves through its own staging, backend.h's HostRead). The piece
  // must lie in the slice (INVALID_ARGUMENT).
  absl::Status ReadAt(const std::string& owner, const SharedMemorySlice& slice, absl::string_view what, int64_t from,
                      void* dst, size_t bytes);
  absl::Status WriteAt(const std::string& owner, const SharedMemorySlice& slice, absl::string_view what, int64_t from,
                       const void* src, size_t bytes);

 private:
  struct Region;
  // The caller's region holding the slice, with the slice's offset in the object.
  absl::StatusOr<std::shared_ptr<Region>> Resolve(const std::string& owner, const SharedMemorySlice& slice,
                                                  absl::string_view what, int64_t* object_offset);
  // Register's checks before anything is opened, and its insertion (the caps checked again).
  absl::Status CheckRegistrable(const std::string& owner, const std::string& name, int64_t byte_size, int64_t offset);
  absl::StatusOr<SharedMemoryRegionInfo> Insert(const std::string& owner, std::shared_ptr<Region> region);
  static absl::Status NotPosix(const Region& region, absl::string_view what);
  // Maps and pins a POSIX region (best effort: on failure the region is read and written by copy).
  void Pin(Region& region);
  static absl::Status CheckWithin(const SharedMemorySlice& slice, absl::string_view what, int64_t from, size_t bytes);
  // The copies of Read/ReadAt and Write/WriteAt, at `at` of the region's object (the slice ends at
  // `slice_end`, for the message of an object truncated meanwhile).
  static absl::Status Pread(const Region& region, int64_t at, int64_t slice_end, absl::string_view what, void* dst,
                            size_t bytes);
  static absl::Status Pwrite(const Region& region, int64_t at, absl::string_view what, const void* src, size_t bytes);

  const SharedMemoryOptions options_;
  const PeerMemoryOpener open_peer_;
  const HostMemoryPinner pin_;
  mutable absl::Mutex mu_;
  // (owner, name) -> region.
  std::map<std::pair<std::string, std::string>, std::shared_ptr<Region>> regions_ ABSL_GUARDED_BY(mu_);
};

}  // namespace blockd
