// Shared device helpers of the flash attention kernels (attention_flash.cu: v1,
// attention_flash_v2.cu: v2): constants, PTX wrappers (cp.async, ldmatrix, mma.sync m16n8k16 bf16),
// fragment helpers and warp reductions (the tile-level masking rules and the sentinels are in
// attention_tile_rules.h). Included by .cu files only (device code).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/attention_tile_rules.h"

namespace tsp::cuda::attn::flash {

using bf16 = __nv_bfloat16;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- PTX wrappers ---------------------------------------------------------------------------
// Under TSP_CUDA_EMULATION (tests/cuda_emulation/: these kernels run on the CPU in CI) each one
// calls the emulation's model of the instruction instead.

#ifndef TSP_CUDA_EMULATION
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// 16 bytes global -> shared, asynchronously; zero-filled when !valid (src is then not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#ifdef TSP_CUDA_EMULATION
  tsp::emu::cp_async16(dst, src, valid);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef TSP_CUDA_EMULATION
  tsp::emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef TSP_CUDA_EMULATION
  tsp::emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Four 8×8 b16 matrices; lane l gives the address of row l%8 of matrix l/8.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const bf16* p) {
#ifdef TSP_CUDA_EMULATION
  tsp::emu::ldmatrix_x4(r, p, false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
#endif
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const bf16* p) {
#ifdef TSP_CUDA_EMULATION
  tsp::emu::ldmatrix_x4(r, p, true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
#endif
}

// c[16×8] += a[16×16] · b[16×8] (bf16 in, fp32 accumulate). Fragments (g = lane/4, t = lane%4):
// a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..); b0 (k 2t.., n g),
// b1 (k 2t+8.., n g); c0, c1 (g, 2t..2t+1), c2, c3 (g+8, 2t..2t+1).
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
#ifdef TSP_CUDA_EMULATION
  tsp::emu::mma_m16n8k16_bf16(c, a, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two floats as bf16x2 (round to nearest even), lo in the low half (the lower k index).
__device__ __forceinline__ uint32_t pack(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

__device__ __forceinline__ float ex2(float x) {  // 2^x, ~2 ulp; ex2(-inf) = 0
#ifdef TSP_CUDA_EMULATION
  return std::exp2(x);  // correctly rounded: within the 2 ulp of the instruction
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#endif
}

// The A fragment of a 16-wide k step from two C tiles (columns 0-7 and 8-15 of the step).
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&c0)[4],
                                       const float (&c1)[4]) {
  a[0] = pack(c0[0], c0[1]);
  a[1] = pack(c0[2], c0[3]);
  a[2] = pack(c1[0], c1[1]);
  a[3] = pack(c1[2], c1[3]);
}

// ldmatrix lane addresses (lane l) for a 16×16 operand at (row0, col0) of a row-major tile with
// leading dimension ld:
//   A from [m][k]                     : row l%16,             col (l/16)·8
//   B pair from [n][k] (two n8 tiles) : row l%8 + (l/16)·8,   col ((l/8)%2)·8
//   B pair from [k][n] (trans)        : row l%8 + ((l/8)%2)·8, col (l/16)·8
//   A from [k][m] (trans)             : row l%8 + (l/16)·8,   col ((l/8)%2)·8
// (the first and last coincide in form with the other two: A [m][k] ≡ rows l%16; A [k][m]
// trans ≡ the [n][k] pattern).
__device__ __forceinline__ const bf16* a_addr(const bf16* base, int ld, int row0, int col0,
                                              int lane) {
  return base + (row0 + lane % 16) * ld + col0 + (lane / 16) * 8;
}
__device__ __forceinline__ const bf16* bnk_addr(const bf16* base, int ld, int row0, int col0,
                                                int lane) {
  return base + (row0 + lane % 8 + (lane / 16) * 8) * ld + col0 + ((lane / 8) % 2) * 8;
}
__device__ __forceinline__ const bf16* bkn_addr(const bf16* base, int ld, int row0, int col0,
                                                int lane) {
  return base + (row0 + lane % 8 + ((lane / 8) % 2) * 8) * ld + col0 + (lane / 16) * 8;
}

// Rows [0, rows) of a tile of D bf16 columns from global (row stride `stride` elements) into
// shared memory (leading dimension D + 8), rows >= valid zero-filled; asynchronous.
template <int D, int kThreads>
__device__ __forceinline__ void load_tile(bf16* dst, const bf16* src, int64_t stride, int rows,
                                          int valid, int tid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int c = tid; c < rows * kChunks; c += kThreads) {
    const int r = c / kChunks, cc = (c % kChunks) * 8;
    const bool ok = r < valid;
    cp_async16(dst + r * (D + 8) + cc, ok ? src + r * stride + cc : src, ok);
  }
}

template <class T>
__device__ __forceinline__ T warp_max(T x) {
  for (int o = 16; o > 0; o >>= 1) x = max(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
template <class T>
__device__ __forceinline__ T warp_min(T x) {
  for (int o = 16; o > 0; o >>= 1) x = min(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

}  // namespace tsp::cuda::attn::flash
