// Attention of an inference step over a paged KV cache, and the kernel that writes the step's
// new K/V into their pages. Pages hold K [kPagedTokens, kv_dim] then V [kPagedTokens, kv_dim] of
// type T; page p lives at chunks[p / chunk_pages] + (p % chunk_pages) * page_elems (a store grows
// by whole chunks). Row r's page table is table[r * table_width ...], start[r] its cached length.
// Rows of several stores (sessions of several families batched into one launch) set row_chunk
// and row_chunk_pages: row r's page p lives at chunks[row_chunk[r] + p / row_chunk_pages[r]] + ...,
// `chunks` then holding every store's chunk pointers one store after another.
//
// The attention: query i of row r (position start[r] + i) attends to positions 0..start[r]+i of
// its row, reading K/V through the page table. One thread block per (kv head, query tile, row,
// split of the positions): the query heads that share a kv head (GQA) read each K/V tile once,
// tiles streaming through a cp.async ring in shared memory; long contexts are split over the
// sequence, each split writing an fp32 partial output and its log-sum-exp, and a combine pass
// merges them. Softmax scale 1/sqrt(head_dim). bf16 at head_dim 64 and 128 runs on tensor cores
// (paged_attention_mma.cu: fp32 accumulation, the probabilities rounded to bf16 for P V as in
// FlashAttention); everything else on CUDA cores in fp32, a warp per query.
//
//   PagedKv<bf16> kv{chunks, chunk_pages, table, table_width, start};
//   launch_paged_kv_write(kv, k, kv_dim, v, v_stride, batch, n, kv_dim, stream);
//   int splits = paged_attention_splits<bf16>(batch, n, heads, kv_heads, dh, max_len, sm_count);
//   launch_paged_attention(kv, q, q_stride, o, o_stride, batch, n, heads, kv_heads, dh, max_len,
//                          splits, workspace, stream);  // paged_attention_workspace_floats(...) floats
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace blockd::kernels {

constexpr int kPagedTokens = 16;

template <class T>
struct PagedKv {
  T* const* chunks = nullptr;  // device array of chunk base pointers
  int64_t chunk_pages = 0;
  const int32_t* table = nullptr;  // device [batch, table_width]
  int64_t table_width = 0;
  const int32_t* start = nullptr;  // device [batch]
  int64_t kv_dim = 0;
  const int32_t* row_chunk = nullptr;        // device [batch], or null: one store for every row
  const int32_t* row_chunk_pages = nullptr;  // device [batch]
};

// k [batch * n, k_stride], v [batch * n, v_stride]: token i of row r goes to position start[r] + i.
template <class T>
cudaError_t launch_paged_kv_write(const PagedKv<T>& kv, const T* k, int64_t k_stride, const T* v, int64_t v_stride,
                                  int64_t batch, int64_t n, cudaStream_t stream);

// Splits of the positions that keep the GPU busy (for the kernel that T and head_dim select); 1
// for short contexts.
template <class T>
int paged_attention_splits(int64_t batch, int64_t n, int heads, int kv_heads, int head_dim, int64_t max_len,
                           int sm_count);
int64_t paged_attention_workspace_floats(int64_t batch, int64_t n, int heads, int head_dim, int splits);

// q [batch * n, q_stride] (after QK-norm and RoPE), o [batch * n, o_stride]; max_len >= start[r] + n
// for every row. head_dim even and <= 256.
template <class T>
cudaError_t launch_paged_attention(const PagedKv<T>& kv, const T* q, int64_t q_stride, T* o, int64_t o_stride,
                                   int64_t batch, int64_t n, int heads, int kv_heads, int head_dim, int64_t max_len,
                                   int splits, float* workspace, cudaStream_t stream);

}  // namespace blockd::kernels
