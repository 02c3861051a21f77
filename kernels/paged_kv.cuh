// Device-only (.cu files): where a row's K/V page lives (the layout paged_attention.cuh gives),
// for the kernels that read and write pages.
#pragma once

#include <cstdint>

#include "kernels/paged_attention.cuh"

namespace blockd::kernels {

// Row r's page `page`: in the one store's chunks, or (rows of several stores) in row r's.
template <class T>
__device__ __forceinline__ T* PagePtr(const PagedKv<T>& kv, int64_t r, int32_t page) {
  const int64_t page_elems = 2 * kPagedTokens * kv.kv_dim;
  if (kv.row_chunk == nullptr) return kv.chunks[page / kv.chunk_pages] + (page % kv.chunk_pages) * page_elems;
  const int32_t chunk_pages = kv.row_chunk_pages[r];
  return kv.chunks[kv.row_chunk[r] + page / chunk_pages] + (page % chunk_pages) * page_elems;
}

// Where position pos of row r keeps its K row (its V row is kPagedTokens * kv_dim further).
template <class T>
__device__ __forceinline__ T* PagedKRow(const PagedKv<T>& kv, int64_t r, int64_t pos) {
  T* page = PagePtr(kv, r, kv.table[r * kv.table_width + pos / kPagedTokens]);
  return page + (pos % kPagedTokens) * kv.kv_dim;
}

}  // namespace blockd::kernels
