// Rounding F32 GEMM inputs (and an accumulated F32 copy of y) to BF16, and widening a BF16 y to
// F32 (exact), see gemm.h. The rounding is the same bit arithmetic as the host's
// tsp::bf16::from_float (include/tsp/core/bf16.h), so a rounded operand is bitwise what the CPU
// backend would feed its bf16 GEMM, NaN payloads included (cvt.rn.bf16.f32 would canonicalise NaN).
// No tsp::Error here: fmt's consteval format strings do not compile under nvcc (fmt 9), so this
// file returns the launch status and gemm.cpp (host compiler) turns it into an error.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "backend/cuda/gemm_cast.h"
#include "backend/cuda/launch.cuh"

namespace tsp::cuda {
namespace {

__device__ __forceinline__ uint16_t bf16_bits(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return static_cast<uint16_t>(u >> 16);
}

// Four elements per thread when src is 16-byte and dst 8-byte aligned (the usual case: tensors
// are 64-byte aligned), else one; grid-stride so any n fits a bounded grid.
__global__ void round_f32_to_bf16_x4(const float4* __restrict__ src, uint2* __restrict__ dst,
                                     int64_t n4) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n4;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float4 v = src[i];
    uint2 out;
    out.x = bf16_bits(v.x) | (uint32_t{bf16_bits(v.y)} << 16);
    out.y = bf16_bits(v.z) | (uint32_t{bf16_bits(v.w)} << 16);
    dst[i] = out;
  }
}

__global__ void round_f32_to_bf16_x1(const float* __restrict__ src, uint16_t* __restrict__ dst,
                                     int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    dst[i] = bf16_bits(src[i]);
}

// Widening is exact: a bf16 is the high half of the f32 with the same value.
__global__ void widen_bf16_to_f32_x4(const uint2* __restrict__ src, uint4* __restrict__ dst,
                                     int64_t n4) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n4;
       i += int64_t{gridDim.x} * blockDim.x) {
    const uint2 v = src[i];
    dst[i] = make_uint4(v.x << 16, v.x & 0xffff0000u, v.y << 16, v.y & 0xffff0000u);
  }
}

__global__ void widen_bf16_to_f32_x1(const uint16_t* __restrict__ src, uint32_t* __restrict__ dst,
                                     int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    dst[i] = uint32_t{src[i]} << 16;
}

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 4096;  // enough to fill any current GPU; the loop covers the rest

int grid_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
}

}  // namespace

cudaError_t launch_round_f32_to_bf16(const float* src, __nv_bfloat16* dst, int64_t n,
                                     cudaStream_t s) {
  if (n <= 0) return cudaSuccess;
  auto* out = reinterpret_cast<uint16_t*>(dst);
  const bool vec =
      reinterpret_cast<uintptr_t>(src) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 8 == 0;
  int64_t done = 0;
  if (vec && n >= 4) {
    const int64_t n4 = n / 4;
    TSP_LAUNCH(grid_for(n4), kThreads, 0, s, round_f32_to_bf16_x4)
    (reinterpret_cast<const float4*>(src), reinterpret_cast<uint2*>(out), n4);
    if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    done = n4 * 4;
  }
  if (done < n) {
    TSP_LAUNCH(grid_for(n - done), kThreads, 0, s, round_f32_to_bf16_x1)
    (src + done, out + done, n - done);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

cudaError_t launch_widen_bf16_to_f32(const __nv_bfloat16* src, float* dst, int64_t n,
                                     cudaStream_t s) {
  if (n <= 0) return cudaSuccess;
  const auto* in = reinterpret_cast<const uint16_t*>(src);
  auto* out = reinterpret_cast<uint32_t*>(dst);
  const bool vec =
      reinterpret_cast<uintptr_t>(in) % 8 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  int64_t done = 0;
  if (vec && n >= 4) {
    const int64_t n4 = n / 4;
    TSP_LAUNCH(grid_for(n4), kThreads, 0, s, widen_bf16_to_f32_x4)
    (reinterpret_cast<const uint2*>(in), reinterpret_cast<uint4*>(out), n4);
    if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    done = n4 * 4;
  }
  if (done < n) {
    TSP_LAUNCH(grid_for(n - done), kThreads, 0, s, widen_bf16_to_f32_x1)
    (in + done, out + done, n - done);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

}  // namespace tsp::cuda
