// A CUDA block's KV pages for one session family (engine/backend.h KvPageStore): device memory in
// the block's compute dtype (bf16 K/V for BF16 blocks, fp32 otherwise), grown by whole chunks (one
// per session of the family) that never move, and a device array of the chunks' addresses that
// the kernels index (kernels/paged_attention.cuh: page p at chunks[p / chunk_pages]).
//
//   CudaKvPageStore store(dev, kv_dim, /*element_bytes=*/2);
//   RETURN_IF_ERROR(store.Grow(pages));            // every Grow of a family adds the same count
//   kernels::PagedKv<bf16> kv{store.chunks<bf16>(), store.chunk_pages(), ...};
#pragma once

#include <cstdint>
#include <vector>

#include "engine/backend.h"
#include "engine/cuda/device.h"

namespace blockd::cuda {

class CudaKvPageStore : public KvPageStore {
 public:
  CudaKvPageStore(DeviceContext* dev, int64_t kv_dim, int64_t element_bytes)
      : dev_(dev), page_bytes_(2 * kKvPageTokens * kv_dim * element_bytes) {}
  int64_t page_bytes() const override { return page_bytes_; }
  int64_t pages() const override { return chunk_pages_ * static_cast<int64_t>(chunks_.size()); }
  absl::Status Grow(int64_t pages) override;
  absl::Status CopyPage(int32_t from, int32_t to) override;

  int64_t chunk_pages() const { return chunk_pages_; }
  template <class T>
  T* const* chunks() const {
    return chunk_table_.as<T* const>();
  }
  // The chunks' device addresses on the host: a batched step of several stores uploads them all.
  const std::vector<void*>& chunk_ptrs() const { return chunk_ptrs_; }

 private:
  char* Page(int32_t id) const;

  DeviceContext* dev_;
  int64_t page_bytes_;
  int64_t chunk_pages_ = 0;
  std::vector<DeviceBuffer> chunks_;
  std::vector<void*> chunk_ptrs_;  // the host copy of chunk_table_
  DeviceBuffer chunk_table_;
};

}  // namespace blockd::cuda
