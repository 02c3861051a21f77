// Warp-level tensor-core building blocks (sm_80+): mma.sync m16n8k16 with bf16 inputs and fp32
// accumulators, and ldmatrix loads of its operands from shared-memory tiles whose rows are padded
// by 16 bytes (row stride ld = cols + 8 elements), which makes every ldmatrix conflict-free.
//
//   uint32_t a[4], b[4];
//   load_a(a, qs, ld, 0, k0);            // A rows 0..15, cols k0..k0+15
//   load_b_nk(b, ks, ld, n0, k0);        // B of n-tiles n0 and n0 + 8 from a [n][k] tile
//   mma_bf16(c0, a, b[0], b[1]);         // c0 += A B(n0)
//   mma_bf16(c1, a, b[2], b[3]);         // c1 += A B(n0 + 8)
//
// An accumulator c[4] of a 16x8 tile holds rows lane/4 (c[0], c[1]) and lane/4 + 8 (c[2], c[3]),
// columns 2 (lane % 4) and + 1: the layout of an A operand's half, so two n-tiles of scores pack
// into one A operand of the next product (pack_bf16).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/cp_async.cuh"

namespace blockd::kernels {

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c += a b for a 16x16 (row) by 16x8 (col) bf16 tile pair, fp32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// A operand (16 x 16, row-major in smem) at (row0, col0): a0..a3 as mma expects.
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const __nv_bfloat16* s, int ld, int row0, int col0) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4(a, smem_u32(s + (row0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + col0 + (lane >> 4) * 8));
}
// B operands for two adjacent n-tiles from a matrix stored [n][k] (rows = n): {b0, b1} of n-tile
// n0 and of n0 + 8, for k in [k0, k0 + 16).
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const __nv_bfloat16* s, int ld, int n0, int k0) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4(b, smem_u32(s + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8));
}
// The same from a matrix stored [k][n] (rows = k), through ldmatrix.trans.
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const __nv_bfloat16* s, int ld, int k0, int n0) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4_trans(b, smem_u32(s + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + (lane >> 4) * 8));
}
// A operand (16 x 16) of the transpose of a matrix stored [k][m] (rows = k): A[m][k] at (m0, k0).
__device__ __forceinline__ void load_a_t(uint32_t (&a)[4], const __nv_bfloat16* s, int ld, int m0, int k0) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4_trans(a, smem_u32(s + (k0 + (lane & 7) + (lane >> 4) * 8) * ld + m0 + ((lane >> 3) & 1) * 8));
}

}  // namespace blockd::kernels
