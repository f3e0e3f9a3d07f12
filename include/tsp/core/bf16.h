// bfloat16 storage type. g++ 12 has no __bf16 arithmetic, so values are stored as the upper 16
// bits of an IEEE float and converted with round-to-nearest-even; arithmetic happens in fp32.
#pragma once

#include <cstdint>
#include <cstring>

namespace tsp {

struct bf16 {
  uint16_t bits = 0;

  bf16() = default;
  explicit bf16(float f) : bits(from_float(f)) {}
  operator float() const { return to_float(bits); }

  static uint16_t from_float(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN
    // Round to nearest, ties to even: add 0x7fff plus the lowest kept bit.
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
  }
  static float to_float(uint16_t b) {
    uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
};
static_assert(sizeof(bf16) == 2);

// Bulk conversions (vectorised where the CPU allows).
void convert_f32_to_bf16(const float* src, bf16* dst, int64_t n);
void convert_bf16_to_f32(const bf16* src, float* dst, int64_t n);

}  // namespace tsp
