// Internal to the paged attention kernels (.cu files only): the tensor-core kernel that
// launch_paged_attention (paged_attention.cuh) runs for bf16 K/V at head_dim 64 and 128.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/paged_attention.cuh"

namespace blockd::kernels {

// The tensor-core kernel's tile of positions; its splits cover whole tiles.
constexpr int kPagedMmaTile = 64;

inline bool PagedMmaSupported(int head_dim, int64_t kv_dim) {
  return (head_dim == 64 || head_dim == 128) && kv_dim % 8 == 0;
}

// Thread blocks of the tensor-core kernel resident per SM at this head_dim (shared memory bound).
int PagedMmaBlocksPerSm(int head_dim);

// Thread blocks of the tensor-core kernel per query row tile: batch * kv_heads * these.
__host__ __device__ inline int64_t PagedMmaQueryTiles(int64_t n, int group) { return (n * group + 15) / 16; }

// As launch_paged_attention, with the split length (a multiple of kPagedMmaTile) and the splits
// used already chosen; with used > 1 it writes part_o/part_lse for the combine pass instead of o.
cudaError_t launch_paged_attention_mma(const PagedKv<__nv_bfloat16>& kv, const __nv_bfloat16* q, int64_t q_stride,
                                       __nv_bfloat16* o, int64_t o_stride, int64_t batch, int64_t n, int heads,
                                       int kv_heads, int head_dim, int64_t split_len, int used, float* part_o,
                                       float* part_lse, cudaStream_t stream);

}  // namespace blockd::kernels
