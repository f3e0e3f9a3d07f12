// Stand-in for CUDA's <cuda_bf16.h> in the CUDA emulation (tests/cuda_emulation/README.md): the
// bf16 storage types and the conversions the kernels use, through tsp::bf16 (to nearest, ties to
// even; NaN stays NaN: the device intrinsics' rounding).
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda_runtime.h"

struct __nv_bfloat16 {
  uint16_t bits;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : bits(tsp::bf16::from_float(f)) {}  // NOLINT: implicit, as CUDA's
  operator float() const { return tsp::bf16::to_float(bits); }
};
static_assert(sizeof(__nv_bfloat16) == 2);

struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
static_assert(sizeof(__nv_bfloat162) == 4);

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  return __nv_bfloat16(f);
}
inline __nv_bfloat16 __float2bfloat16(float f) {
  return __nv_bfloat16(f);
}
inline float __bfloat162float(__nv_bfloat16 b) {
  return static_cast<float>(b);
}
// lo in .x (the low 16 bits), hi in .y, as the device's __floats2bfloat162_rn.
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__nv_bfloat16(lo), __nv_bfloat16(hi)};
}
inline float2 __bfloat1622float2(__nv_bfloat162 h) {
  return {static_cast<float>(h.x), static_cast<float>(h.y)};
}
