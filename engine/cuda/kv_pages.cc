#include "engine/cuda/kv_pages.h"

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "engine/cuda/cuda_status.h"

namespace blockd::cuda {

absl::Status CudaKvPageStore::Grow(int64_t pages) {
  if (chunk_pages_ != 0 && pages != chunk_pages_) {
    return absl::InternalError(absl::StrCat("a KV page store grows by ", chunk_pages_, " pages, not ", pages));
  }
  DeviceGuard guard(dev_->index);
  ASSIGN_OR_RETURN(DeviceBuffer chunk, DeviceBuffer::Allocate(dev_, static_cast<size_t>(pages * page_bytes_)));
  // Zeroed so that no kernel ever reads uninitialised memory, even past a row's length.
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(chunk.get(), 0, static_cast<size_t>(pages * page_bytes_), dev_->stream));
  ASSIGN_OR_RETURN(DeviceBuffer table, DeviceBuffer::Allocate(dev_, (chunk_ptrs_.size() + 1) * sizeof(void*)));
  chunk_ptrs_.push_back(chunk.get());
  // Steps run on the same stream, so one issued before this sees the old table, which the pool
  // frees only after them (stream order). The pageable source is staged before this returns.
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(table.get(), chunk_ptrs_.data(), chunk_ptrs_.size() * sizeof(void*),
                                       cudaMemcpyHostToDevice, dev_->stream));
  chunks_.push_back(std::move(chunk));
  chunk_table_ = std::move(table);
  chunk_pages_ = pages;
  return absl::OkStatus();
}

char* CudaKvPageStore::Page(int32_t id) const {
  return chunks_[static_cast<size_t>(id / chunk_pages_)].as<char>() + (id % chunk_pages_) * page_bytes_;
}

absl::Status CudaKvPageStore::CopyPage(int32_t from, int32_t to) {
  DeviceGuard guard(dev_->index);
  CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(Page(to), Page(from), static_cast<size_t>(page_bytes_), cudaMemcpyDeviceToDevice, dev_->stream));
  return absl::OkStatus();
}

}  // namespace blockd::cuda
