// CPU kernels of tsp/ops/ops.h: forward/backward pairs over raw fp32 row-major arrays.
//
// Loops are plain and written to auto-vectorise under -O3 -march=native: row reductions use
// `omp simd reduction` (16 partial sums, which is also more accurate than one running sum), and
// exp goes through cpu::exp_fast (vectorisable, about 1 ulp). Rows are split over
// compute_threads() OpenMP threads only when there is enough work; the split is a fixed,
// contiguous partition, so results (including the returned loss) depend on the thread count but
// are reproducible for a given count. Arguments are validated before any parallel region:
// an exception must not escape an OpenMP region.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "ops/cpu/kernels_internal.h"
#include "ops/cpu/vec_math.h"
#include "tsp/core/error.h"
#include "tsp/ops/ops.h"

namespace tsp {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

using cpu::check_sizes;
using cpu::chunk_count;
using cpu::for_row_chunks;

float row_max(const float* row, int64_t n) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = std::max(m, row[j]);
  return m;
}

// Σ_j exp(row[j] - m)
float row_sum_exp(const float* row, int64_t n, float m) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += cpu::exp_fast(row[j] - m);
  return s;
}

// Labels must be a vocabulary id or the ignore index; checked up front (not inside a parallel
// region) so that a bad data file fails with the offending row.
void check_labels(const char* name, const int32_t* labels, int64_t N, int64_t V,
                  int32_t ignore_index) {
  for (int64_t n = 0; n < N; ++n) {
    const int32_t l = labels[n];
    TSP_CHECK(l == ignore_index || (l >= 0 && l < V),
              "{}: label {} of row {} is outside the vocabulary [0, {}) and is not the ignore "
              "index {}",
              name, l, n, V, ignore_index);
  }
}

// sign = +1 rotates by +angle (forward), -1 by -angle (backward: the transpose).
void rope_apply(float* x, const int64_t* pos, int64_t N, int64_t n_heads, int64_t d, float theta,
                float sign, const char* name) {
  cpu::check_rope(name, N, n_heads, d, theta);
  if (N == 0 || n_heads == 0 || d == 0) return;
  TSP_CHECK(x && pos, "{}: null x or position ids", name);
  const int64_t half = d / 2;
  const std::vector<float> inv_freq = cpu::rope_inv_freq(d, theta);
  for_row_chunks(N, n_heads * d, [&](int64_t begin, int64_t end, int) {
    std::vector<float> cos_t(half), sin_t(half);
    for (int64_t n = begin; n < end; ++n) {
      cpu::rope_angles(pos[n], inv_freq.data(), half, sign, cos_t.data(), sin_t.data());
      for (int64_t hd = 0; hd < n_heads; ++hd) {
        float* lo = x + (n * n_heads + hd) * d;
        cpu::rope_rotate(lo, lo + half, cos_t.data(), sin_t.data(), half);
      }
    }
  });
}

}  // namespace

// ---- Linear --------------------------------------------------------------------------------

// y[N, out] (=/+=) x[N, in] · w[out, in]ᵀ
void linear_forward(const float* x, const float* w, float* y, int64_t N, int64_t in, int64_t out,
                    bool accumulate) {
  check_sizes("linear_forward", {N, in, out});
  gemm(Trans::N, Trans::T, N, out, in, 1.f, x, std::max<int64_t>(in, 1), w,
       std::max<int64_t>(in, 1), accumulate ? 1.f : 0.f, y, std::max<int64_t>(out, 1));
}

// dx[N, in] += dy[N, out] · w[out, in];  dw[out, in] += dy[N, out]ᵀ · x[N, in]
void linear_backward(const float* dy, const float* x, const float* w, float* dx, float* dw,
                     int64_t N, int64_t in, int64_t out) {
  check_sizes("linear_backward", {N, in, out});
  const int64_t ld_in = std::max<int64_t>(in, 1), ld_out = std::max<int64_t>(out, 1);
  if (dx) gemm(Trans::N, Trans::N, N, in, out, 1.f, dy, ld_out, w, ld_in, 1.f, dx, ld_in);
  if (dw) gemm(Trans::T, Trans::N, out, in, N, 1.f, dy, ld_out, x, ld_in, 1.f, dw, ld_in);
}

// ---- RMSNorm -------------------------------------------------------------------------------

// y = x · r · w with r = 1/sqrt(mean(x²) + eps), per row; r saved for backward.
void rmsnorm_forward(const float* x, const float* w, float* y, float* rstd, int64_t N, int64_t h,
                     float eps) {
  check_sizes("rmsnorm_forward", {N, h});
  TSP_CHECK(h > 0 || N == 0, "rmsnorm_forward: hidden size must be positive");
  TSP_CHECK(eps >= 0.f, "rmsnorm_forward: eps must be non-negative, got {}", eps);
  for_row_chunks(N, h, [&](int64_t begin, int64_t end, int) {
    for (int64_t n = begin; n < end; ++n)
      rstd[n] = cpu::rmsnorm_row_forward(x + n * h, w, y + n * h, h, eps);
  });
}

// y = x · rstd · w per row from a saved rstd (recomputing the normed input in backward).
void rmsnorm_apply(const float* x, const float* w, const float* rstd, float* y, int64_t N,
                   int64_t h) {
  check_sizes("rmsnorm_apply", {N, h});
  for_row_chunks(N, h, [&](int64_t begin, int64_t end, int) {
    for (int64_t n = begin; n < end; ++n)
      cpu::rmsnorm_row_apply(x + n * h, w, rstd[n], y + n * h, h);
  });
}

// With y_i = w_i x_i r and dr/dx_j = -r³ x_j / h:
//   dx_j = r w_j dy_j - (r³ / h) x_j Σ_i dy_i w_i x_i          (=)
//   dw_i += Σ_n dy_{n,i} x_{n,i} r_n                             (+=)
void rmsnorm_backward(const float* dy, const float* x, const float* w, const float* rstd, float* dx,
                      float* dw, int64_t N, int64_t h) {
  check_sizes("rmsnorm_backward", {N, h});
  if (dx) {
    for_row_chunks(N, h, [&](int64_t begin, int64_t end, int) {
      for (int64_t n = begin; n < end; ++n)
        cpu::rmsnorm_row_dx(dy + n * h, x + n * h, w, rstd[n], dx + n * h, h);
    });
  }
  if (dw) {
    // Columns are independent: split them (not the rows) so no two threads add to one dw_i.
    for_row_chunks(h, N, [&](int64_t begin, int64_t end, int) {
      for (int64_t n = 0; n < N; ++n)
        cpu::rmsnorm_row_dw(dy + n * h + begin, x + n * h + begin, rstd[n], dw + begin,
                            end - begin);
    });
  }
}

// ---- RoPE ----------------------------------------------------------------------------------

void rope_forward(float* x, const int64_t* pos, int64_t N, int64_t n_heads, int64_t d,
                  float theta) {
  rope_apply(x, pos, N, n_heads, d, theta, 1.f, "rope_forward");
}

void rope_backward(float* dx, const int64_t* pos, int64_t N, int64_t n_heads, int64_t d,
                   float theta) {
  rope_apply(dx, pos, N, n_heads, d, theta, -1.f, "rope_backward");
}

// ---- SwiGLU --------------------------------------------------------------------------------

// a = g·σ(g)·u
void swiglu_forward(const float* g, const float* u, float* a, int64_t N, int64_t F) {
  check_sizes("swiglu_forward", {N, F});
  for_row_chunks(N, F, [&](int64_t begin, int64_t end, int) {
    const int64_t lo = begin * F, hi = end * F;
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) a[i] = g[i] * cpu::sigmoid_fast(g[i]) * u[i];
  });
}

// With s = σ(g): d silu/dg = s + g·s·(1 - s) = s·(1 + g·(1 - s)).
//   dg = da · u · s · (1 + g·(1 - s)),  du = da · g · s          (both =)
void swiglu_backward(const float* da, const float* g, const float* u, float* dg, float* du,
                     int64_t N, int64_t F) {
  check_sizes("swiglu_backward", {N, F});
  for_row_chunks(N, F, [&](int64_t begin, int64_t end, int) {
    const int64_t lo = begin * F, hi = end * F;
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) {
      const float s = cpu::sigmoid_fast(g[i]);
      const float gi = g[i], dai = da[i];
      dg[i] = dai * u[i] * s * (1.f + gi * (1.f - s));
      du[i] = dai * gi * s;
    }
  });
}

// ---- Embedding -----------------------------------------------------------------------------

void embedding_forward(const int32_t* ids, const float* table, float* out, int64_t N, int64_t h,
                       int64_t v0, int64_t V_shard) {
  check_sizes("embedding_forward", {N, h, v0, V_shard});
  for_row_chunks(N, h, [&](int64_t begin, int64_t end, int) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t row = static_cast<int64_t>(ids[n]) - v0;
      if (row < 0 || row >= V_shard) continue;
      std::memcpy(out + n * h, table + row * h, sizeof(float) * h);
    }
  });
}

void embedding_backward(const int32_t* ids, const float* dout, float* dtable, int64_t N, int64_t h,
                        int64_t v0, int64_t V_shard) {
  check_sizes("embedding_backward", {N, h, v0, V_shard});
  // Serial over tokens: repeated ids add into one row, and this is memory-bound anyway.
  for (int64_t n = 0; n < N; ++n) {
    const int64_t row = static_cast<int64_t>(ids[n]) - v0;
    if (row < 0 || row >= V_shard) continue;
    add_inplace(dtable + row * h, dout + n * h, h);
  }
}

// ---- Cross-entropy -------------------------------------------------------------------------

// loss_n = log Σ_j exp(l_j) - l_label = m + log Σ_j exp(l_j - m) - l_label  (m = row max)
// dl_j = grad_scale · (exp(l_j - m) / Σ - [j == label])
double cross_entropy_forward_backward(const float* logits, const int32_t* labels, float* dlogits,
                                      int64_t N, int64_t V, float grad_scale,
                                      int32_t ignore_index) {
  check_sizes("cross_entropy_forward_backward", {N, V});
  TSP_CHECK(V > 0 || N == 0, "cross_entropy_forward_backward: empty vocabulary");
  check_labels("cross_entropy_forward_backward", labels, N, V, ignore_index);
  std::vector<double> partial(chunk_count(N, V), 0.0);
  for_row_chunks(N, V, [&](int64_t begin, int64_t end, int chunk) {
    double loss = 0.0;
    for (int64_t n = begin; n < end; ++n) {
      const float* l = logits + n * V;
      float* dl = dlogits + n * V;  // may be l itself: every element is read before written
      const int32_t label = labels[n];
      if (label == ignore_index) {
        std::fill(dl, dl + V, 0.f);
        continue;
      }
      const float target = l[label];  // read before dl (possibly aliasing l) is written
      const float m = row_max(l, V);
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < V; ++j) {
        const float e = cpu::exp_fast(l[j] - m);
        dl[j] = e;
        s += e;
      }
      loss +=
          static_cast<double>(m) + std::log(static_cast<double>(s)) - static_cast<double>(target);
      const float k = grad_scale / s;
#pragma omp simd
      for (int64_t j = 0; j < V; ++j) dl[j] *= k;
      dl[label] -= grad_scale;
    }
    partial[chunk] = loss;
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

void online_softmax_update(const float* logits, const int32_t* labels, float* running_max,
                           float* running_sum, float* target_logit, int64_t N, int64_t V_shard,
                           int64_t v0) {
  check_sizes("online_softmax_update", {N, V_shard, v0});
  for_row_chunks(N, V_shard, [&](int64_t begin, int64_t end, int) {
    for (int64_t n = begin; n < end; ++n) {
      const float* l = logits + n * V_shard;
      const int64_t local = static_cast<int64_t>(labels[n]) - v0;
      if (local >= 0 && local < V_shard) target_logit[n] = l[local];
      const float m_old = running_max[n];
      const float m_new = std::max(m_old, row_max(l, V_shard));
      if (m_new == kNegInf) continue;  // nothing finite seen yet: the sum stays 0
      // exp(-inf - m_new) = 0 covers the first shard (running_max = -inf).
      running_sum[n] = running_sum[n] * std::exp(m_old - m_new) + row_sum_exp(l, V_shard, m_new);
      running_max[n] = m_new;
    }
  });
}

void online_softmax_merge(float* max_a, float* sum_a, const float* max_b, const float* sum_b,
                          int64_t N) {
  check_sizes("online_softmax_merge", {N});
  for (int64_t n = 0; n < N; ++n) {
    const float m = std::max(max_a[n], max_b[n]);
    if (m == kNegInf) continue;  // both empty
    sum_a[n] = sum_a[n] * std::exp(max_a[n] - m) + sum_b[n] * std::exp(max_b[n] - m);
    max_a[n] = m;
  }
}

void online_softmax_backward(const float* logits, const int32_t* labels, const float* row_max,
                             const float* row_sum, float* dlogits, int64_t N, int64_t V_shard,
                             int64_t v0, float grad_scale, int32_t ignore_index) {
  check_sizes("online_softmax_backward", {N, V_shard, v0});
  for_row_chunks(N, V_shard, [&](int64_t begin, int64_t end, int) {
    for (int64_t n = begin; n < end; ++n) {
      const float* l = logits + n * V_shard;
      float* dl = dlogits + n * V_shard;
      if (labels[n] == ignore_index) {
        std::fill(dl, dl + V_shard, 0.f);
        continue;
      }
      const float m = row_max[n];
      const float k = grad_scale / row_sum[n];
#pragma omp simd
      for (int64_t j = 0; j < V_shard; ++j) dl[j] = cpu::exp_fast(l[j] - m) * k;
      const int64_t local = static_cast<int64_t>(labels[n]) - v0;
      if (local >= 0 && local < V_shard) dl[local] -= grad_scale;
    }
  });
}

// ---- Small vector helpers ------------------------------------------------------------------

void add_inplace(float* y, const float* x, int64_t n) {
  check_sizes("add_inplace", {n});
  for_row_chunks(n, 1, [&](int64_t begin, int64_t end, int) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) y[i] += x[i];
  });
}

void scale_inplace(float* y, float a, int64_t n) {
  check_sizes("scale_inplace", {n});
  for_row_chunks(n, 1, [&](int64_t begin, int64_t end, int) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) y[i] *= a;
  });
}

}  // namespace tsp
