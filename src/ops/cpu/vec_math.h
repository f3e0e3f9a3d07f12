// Branch-free scalar math written so that GCC auto-vectorises loops calling it (-O3
// -march=native gives 16-lane AVX-512 code). Internal to the CPU kernels.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

namespace tsp::cpu {

// exp(x) in fp32, a few ulp over the whole range incl. denormal results (tested against double).
// glibc's expf is a scalar call (no libmvec without -ffast-math), and exp dominates softmax,
// cross-entropy and SiLU: this runs ~10x faster vectorised. Cephes' expf scheme:
// exp(x) = 2^n · exp(r), n = round(x / ln2), r = x - n·ln2 in [-ln2/2, ln2/2] (ln2 split in a
// high part exact in fp32 and a low correction), exp(r) by a degree-6 polynomial.
inline float exp_fast(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;     // 8 significant bits: n·kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;  // ln2 - kLn2Hi
  constexpr float kRound = 12582912.f;       // 1.5·2^23: adding it rounds to an integer
  // Clamp (NaN to 0) so that n = round(x/ln2) stays in [-150, 128] and the float -> int
  // conversion is defined; 2^n is applied as 2^n1 · 2^n2 with both halves normal floats, so
  // results that are denormal or that overflow to inf round correctly. The ends are patched below.
  const float xc = x != x ? 0.f : (x < -104.f ? -104.f : (x > 89.f ? 89.f : x));
  const float n = (xc * kLog2e + kRound) - kRound;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * r * r + r + 1.f;
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t n1 = ni >> 1, n2 = ni - n1;
  const int32_t bits1 = (n1 + 127) << 23, bits2 = (n2 + 127) << 23;
  float s1, s2;
  std::memcpy(&s1, &bits1, sizeof s1);
  std::memcpy(&s2, &bits2, sizeof s2);
  float y = er * s1 * s2;
  // exp(-104) < half the smallest denormal: the true result rounds to 0. Past 89 it is inf.
  y = x < -104.f ? 0.f : y;
  y = x > 89.f ? std::numeric_limits<float>::infinity() : y;
  y = x != x ? x : y;  // NaN in, NaN out
  return y;
}

// 1 / (1 + exp(-x)), correct limits 0 and 1 for large |x|.
inline float sigmoid_fast(float x) {
  return 1.f / (1.f + exp_fast(-x));
}

}  // namespace tsp::cpu
