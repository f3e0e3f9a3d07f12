// Internals shared by the fp32 kernels (kernels.cpp) and their bf16 variants (kernels_bf16.cpp):
// the row partition over threads, size checks, and the per-row arithmetic of RMSNorm and RoPE.
// The bf16 kernels widen a row to fp32 scratch and run the SAME inline row function as the fp32
// kernel, so their fp32 results (rstd, and the outputs before their one rounding) are bitwise those
// of the fp32 kernel on the widened inputs.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "tsp/core/error.h"
#include "tsp/ops/gemm.h"

namespace tsp::cpu {

// Below this many elements of work a parallel region costs more (a few us) than it saves.
constexpr int64_t kMinParallelWork = 1 << 15;

// Calls body(begin, end, chunk) over a contiguous partition of [0, n) into at most
// compute_threads() chunks; chunk < kMaxChunks indexes per-chunk partial results.
constexpr int kMaxChunks = 256;
template <class Body>
void for_row_chunks(int64_t n, int64_t work_per_row, Body&& body) {
  const int threads = std::min(compute_threads(), kMaxChunks);
  if (threads <= 1 || n < 2 || n * work_per_row < kMinParallelWork) {
    body(int64_t{0}, n, 0);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    body(n * t / nt, n * (t + 1) / nt, static_cast<int>(t));
  }
#else
  body(int64_t{0}, n, 0);
#endif
}

inline int chunk_count(int64_t n, int64_t work_per_row) {
  const int threads = std::min(compute_threads(), kMaxChunks);
  return (threads <= 1 || n < 2 || n * work_per_row < kMinParallelWork) ? 1 : threads;
}

inline void check_sizes(const char* name, std::initializer_list<int64_t> sizes) {
  for (int64_t s : sizes) TSP_CHECK(s >= 0, "{}: negative size {}", name, s);
}

// ---- RMSNorm rows -------------------------------------------------------------------------------

// One row of rmsnorm_forward: y = x · r · w, returns r = 1/sqrt(mean(x²) + eps).
inline float rmsnorm_row_forward(const float* xr, const float* w, float* yr, int64_t h, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < h; ++i) ss += xr[i] * xr[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(h) + eps);
#pragma omp simd
  for (int64_t i = 0; i < h; ++i) yr[i] = xr[i] * r * w[i];
  return r;
}

// One row of rmsnorm_apply (forward from a saved r): y = x · r · w, in this order.
inline void rmsnorm_row_apply(const float* xr, const float* w, float r, float* yr, int64_t h) {
  for (int64_t j = 0; j < h; ++j) yr[j] = xr[j] * r * w[j];
}

// One row of rmsnorm_backward's dx: dx = r w dy - (r³ / h) x Σ_i dy_i w_i x_i   (=)
inline void rmsnorm_row_dx(const float* dyr, const float* xr, const float* w, float r, float* dxr,
                           int64_t h) {
  float dot = 0.f;
#pragma omp simd reduction(+ : dot)
  for (int64_t i = 0; i < h; ++i) dot += dyr[i] * w[i] * xr[i];
  const float c = dot * r * r * r / static_cast<float>(h);
#pragma omp simd
  for (int64_t i = 0; i < h; ++i) dxr[i] = r * w[i] * dyr[i] - c * xr[i];
}

// One row's contribution to dw over columns [0, n) of the pointers given: dw += dy · x · r
inline void rmsnorm_row_dw(const float* dyr, const float* xr, float r, float* dw, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dw[i] += dyr[i] * xr[i] * r;
}

// ---- RoPE rows ----------------------------------------------------------------------------------

// HF Llama: inv_freq = 1 / base^(arange(0, d, 2).float() / d), every step in fp32.
inline std::vector<float> rope_inv_freq(int64_t d, float theta) {
  std::vector<float> inv(d / 2);
  for (int64_t i = 0; i < d / 2; ++i) {
    const float e = static_cast<float>(2 * i) / static_cast<float>(d);
    inv[i] = 1.f / std::pow(theta, e);
  }
  return inv;
}

// cos and sign·sin of the angles of one position. HF: freqs = inv_freq · position_ids.float()
// (one fp32 product), then fp32 cos/sin of that angle. glibc's cosf/sinf are correctly rounded in
// practice, which is what torch's fp32 cos/sin approximate to within an ulp; the angle's fp32
// rounding (up to ~0.004 rad at position 1e5) is HF's too, and the model was trained with it.
inline void rope_angles(int64_t pos, const float* inv_freq, int64_t half, float sign, float* cos_t,
                        float* sin_t) {
  const float p = static_cast<float>(pos);
  for (int64_t i = 0; i < half; ++i) {
    const float angle = p * inv_freq[i];
    cos_t[i] = std::cos(angle);
    sin_t[i] = sign * std::sin(angle);
  }
}

// Rotates one head in place: lo = x[0, d/2), hi = x[d/2, d).
inline void rope_rotate(float* lo, float* hi, const float* cos_t, const float* sin_t,
                        int64_t half) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float a = lo[i], b = hi[i];
    lo[i] = a * cos_t[i] - b * sin_t[i];
    hi[i] = b * cos_t[i] + a * sin_t[i];
  }
}

inline void check_rope(const char* name, int64_t N, int64_t n_heads, int64_t d, float theta) {
  check_sizes(name, {N, n_heads, d});
  TSP_CHECK(d % 2 == 0, "{}: head dim {} must be even (RoPE rotates pairs (i, i + d/2))", name, d);
  TSP_CHECK(theta > 0.f, "{}: rope theta must be positive, got {}", name, theta);
}

}  // namespace tsp::cpu
