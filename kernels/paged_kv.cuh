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

// A paged attention thread block's share, from its grid position (kv_heads * query tiles, batch,
// splits): kv head kvh, row r, queries f0 .. f0 + nq - 1 of the tile (flattened (token, head of
// the group)), and positions [lo, hi): split `split`'s part of 0 .. start + the tile's last token.
struct PagedShare {
  int kvh, split, nq;
  int64_t r, start, f0, lo, hi;
};

__device__ __forceinline__ PagedShare PagedShareOf(const int32_t* start, int64_t n, int group, int queries,
                                                   int64_t split_len) {
  PagedShare s;
  const int tiles = static_cast<int>((n * group + queries - 1) / queries);
  s.kvh = blockIdx.x / tiles;
  s.f0 = int64_t(blockIdx.x % tiles) * queries;
  s.r = blockIdx.y;
  s.split = blockIdx.z;
  s.start = start[s.r];
  s.nq = static_cast<int>(min(int64_t(queries), n * group - s.f0));
  const int64_t len = s.start + (s.f0 + s.nq - 1) / group + 1;
  s.lo = int64_t(s.split) * split_len;
  s.hi = min(len, s.lo + split_len);
  return s;
}

}  // namespace blockd::kernels
