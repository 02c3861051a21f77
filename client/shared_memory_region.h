// A POSIX shared-memory region registered with a blockd on this host, so Forward, Backward and
// InferStep tensors travel by reference instead of inside gRPC messages (ARCHITECTURE.md,
// "Shared-memory tensors"; the daemon needs --allow_shared_memory).
//
// Create() makes an object "/blockd-<32 random hex digits>", maps it here, registers it, and then
// unlinks its name at once: the daemon holds the object open from registration, so a client that
// dies leaves no name in /dev/shm, and the memory goes when the daemon unregisters the region
// (UnregisterSharedMemory, the destructor, or the region's TTL).
//
//   ASSIGN_OR_RETURN(auto region, SharedMemoryRegion::Create(client.get(), 64 << 20));
//   v1::ForwardRequest req;  ...
//   ASSIGN_OR_RETURN(*req.mutable_input(), region->Put(0, v1::DTYPE_FLOAT32, {2, 8, 64}, x_bytes));
//   *req.mutable_output_shared_memory() = region->Ref(x_bytes.size(), x_bytes.size());
//   ASSIGN_OR_RETURN(v1::ForwardResponse y, client->Forward(req));
//   ASSIGN_OR_RETURN(std::string y_bytes, region->Get(y.output()));
//
// A client on another host gets NOT_FOUND from Create (the daemon finds no such object) and a
// daemon without --allow_shared_memory FAILED_PRECONDITION: fall back to inline tensors
// (SharedMemoryAllowed says beforehand whether the daemon allows it at all).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "blockd/v1/block_service.pb.h"
#include "client/client.h"

namespace blockd {

// Whether the daemon allows shared-memory tensors (GetServerInfo.shared_memory.allowed).
absl::StatusOr<bool> SharedMemoryAllowed(Client* client);

// 32 random hex digits (getrandom): object keys and region names no other client guesses.
std::string RandomHex();
// A reference to [offset, offset + byte_size) of region `name` (of either kind).
v1::SharedMemoryRef RegionRef(const std::string& name, int64_t offset, int64_t byte_size);
// The bounds of a region of either kind (`name`, `size` bytes): INVALID_ARGUMENT when `bytes` at
// `offset` do not fit it (a Put); DATA_LOSS when a reply's `ref` is no slice of it (a Get).
absl::Status CheckFits(const std::string& name, int64_t size, int64_t offset, int64_t bytes);
absl::Status CheckReplySlice(const std::string& name, int64_t size, const v1::SharedMemoryRef& ref);
// A Tensor of `dtype` and `shape` whose bytes are the slice `ref` (what a Put returns).
v1::Tensor SliceTensor(v1::DType dtype, const std::vector<int64_t>& shape, v1::SharedMemoryRef ref);

class SharedMemoryRegion {
 public:
  // `name`: the region's name on the daemon ("" picks "region-<random>").
  static absl::StatusOr<std::unique_ptr<SharedMemoryRegion>> Create(Client* client, int64_t byte_size,
                                                                    std::string name = "");
  ~SharedMemoryRegion();  // unregisters (best effort) and unmaps
  SharedMemoryRegion(const SharedMemoryRegion&) = delete;
  SharedMemoryRegion& operator=(const SharedMemoryRegion&) = delete;

  const std::string& name() const { return name_; }
  const std::string& key() const { return key_; }
  int64_t size() const { return size_; }
  char* data() { return data_; }

  // A reference to [offset, offset + byte_size) of this region.
  v1::SharedMemoryRef Ref(int64_t offset, int64_t byte_size) const;
  // Copies `bytes` to `offset` and returns a Tensor naming them. INVALID_ARGUMENT when they do not fit.
  absl::StatusOr<v1::Tensor> Put(int64_t offset, v1::DType dtype, const std::vector<int64_t>& shape,
                                 absl::string_view bytes);
  // The bytes of a reply tensor: those it carries, or those of the slice of this region it names.
  absl::StatusOr<std::string> Get(const v1::Tensor& t) const;

 private:
  SharedMemoryRegion() = default;
  Client* client_ = nullptr;
  std::string name_, key_;
  int64_t size_ = 0;
  char* data_ = nullptr;
  bool registered_ = false;
};

}  // namespace blockd
