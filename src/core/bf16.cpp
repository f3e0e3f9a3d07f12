#include "tsp/core/bf16.h"

namespace tsp {

void convert_f32_to_bf16(const float* src, bf16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i].bits = bf16::from_float(src[i]);
}

void convert_bf16_to_f32(const bf16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16::to_float(src[i].bits);
}

}  // namespace tsp
