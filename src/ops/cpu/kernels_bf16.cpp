// bf16 variants of the CPU kernels (the mixed-precision half of tsp/ops/ops.h).
//
// Every kernel widens its bf16 inputs to fp32 (exact), runs the fp32 kernel's own row arithmetic
// (the inline row functions of kernels_internal.h, or the same expression) on fp32 scratch, and
// rounds a bf16 output once with convert_f32_to_bf16 (round to nearest even). So:
//   - fp32 outputs (rstd, gradients) are bitwise those of the fp32 kernel on the widened inputs;
//   - bf16 outputs are bitwise bf16(fp32 kernel output on the widened inputs).
// Scratch is one row (or one block) per thread, in L1; the widening and rounding passes are
// vectorised and cheap next to the memory traffic they save.
#include <algorithm>
#include <cstring>
#include <vector>

#include "ops/cpu/kernels_internal.h"
#include "ops/cpu/vec_math.h"
#include "tsp/core/error.h"
#include "tsp/ops/ops.h"

namespace tsp {
namespace {

using cpu::check_sizes;
using cpu::for_row_chunks;

std::vector<float> widened(const bf16* x, int64_t n) {
  std::vector<float> out(n);
  convert_bf16_to_f32(x, out.data(), n);
  return out;
}

}  // namespace

// ---- Linear --------------------------------------------------------------------------------

void linear_forward(const bf16* x, const bf16* w, bf16* y, int64_t N, int64_t in, int64_t out,
                    bool accumulate) {
  check_sizes("linear_forward", {N, in, out});
  gemm_bf16(Trans::N, Trans::T, N, out, in, 1.f, x, std::max<int64_t>(in, 1), w,
            std::max<int64_t>(in, 1), accumulate ? 1.f : 0.f, y, std::max<int64_t>(out, 1));
}

void linear_forward(const bf16* x, const bf16* w, float* y, int64_t N, int64_t in, int64_t out,
                    bool accumulate) {
  check_sizes("linear_forward", {N, in, out});
  gemm_bf16(Trans::N, Trans::T, N, out, in, 1.f, x, std::max<int64_t>(in, 1), w,
            std::max<int64_t>(in, 1), accumulate ? 1.f : 0.f, y, std::max<int64_t>(out, 1));
}

// dx[N, in] += dy[N, out] · w[out, in];  dw[out, in] += dy[N, out]ᵀ · x[N, in]
void linear_backward(const bf16* dy, const bf16* x, const bf16* w, float* dx, float* dw, int64_t N,
                     int64_t in, int64_t out) {
  check_sizes("linear_backward", {N, in, out});
  const int64_t ld_in = std::max<int64_t>(in, 1), ld_out = std::max<int64_t>(out, 1);
  if (dx) gemm_bf16(Trans::N, Trans::N, N, in, out, 1.f, dy, ld_out, w, ld_in, 1.f, dx, ld_in);
  if (dw) gemm_bf16(Trans::T, Trans::N, out, in, N, 1.f, dy, ld_out, x, ld_in, 1.f, dw, ld_in);
}

// ---- RMSNorm -------------------------------------------------------------------------------

void rmsnorm_forward(const bf16* x, const bf16* w, bf16* y, float* rstd, int64_t N, int64_t h,
                     float eps) {
  check_sizes("rmsnorm_forward", {N, h});
  TSP_CHECK(h > 0 || N == 0, "rmsnorm_forward: hidden size must be positive");
  TSP_CHECK(eps >= 0.f, "rmsnorm_forward: eps must be non-negative, got {}", eps);
  if (N == 0) return;
  const std::vector<float> wf = widened(w, h);
  for_row_chunks(N, h, [&](int64_t begin, int64_t end, int) {
    std::vector<float> xr(h), yr(h);
    for (int64_t n = begin; n < end; ++n) {
      convert_bf16_to_f32(x + n * h, xr.data(), h);
      rstd[n] = cpu::rmsnorm_row_forward(xr.data(), wf.data(), yr.data(), h, eps);
      convert_f32_to_bf16(yr.data(), y + n * h, h);
    }
  });
}

void rmsnorm_apply(const bf16* x, const bf16* w, const float* rstd, bf16* y, int64_t N, int64_t h) {
  check_sizes("rmsnorm_apply", {N, h});
  if (N == 0 || h == 0) return;
  const std::vector<float> wf = widened(w, h);
  for_row_chunks(N, h, [&](int64_t begin, int64_t end, int) {
    std::vector<float> xr(h), yr(h);
    for (int64_t n = begin; n < end; ++n) {
      convert_bf16_to_f32(x + n * h, xr.data(), h);
      cpu::rmsnorm_row_apply(xr.data(), wf.data(), rstd[n], yr.data(), h);
      convert_f32_to_bf16(yr.data(), y + n * h, h);
    }
  });
}

void rmsnorm_backward(const float* dy, const bf16* x, const bf16* w, const float* rstd, float* dx,
                      float* dw, int64_t N, int64_t h) {
  check_sizes("rmsnorm_backward", {N, h});
  if (N == 0 || h == 0) return;
  if (dx) {
    const std::vector<float> wf = widened(w, h);
    for_row_chunks(N, h, [&](int64_t begin, int64_t end, int) {
      std::vector<float> xr(h);
      for (int64_t n = begin; n < end; ++n) {
        convert_bf16_to_f32(x + n * h, xr.data(), h);
        cpu::rmsnorm_row_dx(dy + n * h, xr.data(), wf.data(), rstd[n], dx + n * h, h);
      }
    });
  }
  if (dw) {
    // Columns are independent: split them (not the rows) so no two threads add to one dw_i.
    for_row_chunks(h, N, [&](int64_t begin, int64_t end, int) {
      std::vector<float> xr(end - begin);
      for (int64_t n = 0; n < N; ++n) {
        convert_bf16_to_f32(x + n * h + begin, xr.data(), end - begin);
        cpu::rmsnorm_row_dw(dy + n * h + begin, xr.data(), rstd[n], dw + begin, end - begin);
      }
    });
  }
}

// ---- RoPE ----------------------------------------------------------------------------------

void rope_forward(bf16* x, const int64_t* pos, int64_t N, int64_t n_heads, int64_t d, float theta) {
  cpu::check_rope("rope_forward", N, n_heads, d, theta);
  if (N == 0 || n_heads == 0 || d == 0) return;
  TSP_CHECK(x && pos, "rope_forward: null x or position ids");
  const int64_t half = d / 2;
  const std::vector<float> inv_freq = cpu::rope_inv_freq(d, theta);
  for_row_chunks(N, n_heads * d, [&](int64_t begin, int64_t end, int) {
    std::vector<float> cos_t(half), sin_t(half), head(d);
    for (int64_t n = begin; n < end; ++n) {
      cpu::rope_angles(pos[n], inv_freq.data(), half, 1.f, cos_t.data(), sin_t.data());
      for (int64_t hd = 0; hd < n_heads; ++hd) {
        bf16* xh = x + (n * n_heads + hd) * d;
        convert_bf16_to_f32(xh, head.data(), d);
        cpu::rope_rotate(head.data(), head.data() + half, cos_t.data(), sin_t.data(), half);
        convert_f32_to_bf16(head.data(), xh, d);
      }
    }
  });
}

// ---- SwiGLU --------------------------------------------------------------------------------

// a = bf16(g·σ(g)·u), the fp32 kernel's expression, in blocks of fp32 scratch.
void swiglu_forward(const float* g, const float* u, bf16* a, int64_t N, int64_t F) {
  check_sizes("swiglu_forward", {N, F});
  constexpr int64_t kBlock = 1024;
  for_row_chunks(N, F, [&](int64_t begin, int64_t end, int) {
    float buf[kBlock];
    for (int64_t lo = begin * F; lo < end * F; lo += kBlock) {
      const int64_t n = std::min(kBlock, end * F - lo);
      const float* gb = g + lo;
      const float* ub = u + lo;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) buf[i] = gb[i] * cpu::sigmoid_fast(gb[i]) * ub[i];
      convert_f32_to_bf16(buf, a + lo, n);
    }
  });
}

// ---- Embedding -----------------------------------------------------------------------------

void embedding_forward(const int32_t* ids, const bf16* table, bf16* out, int64_t N, int64_t h,
                       int64_t v0, int64_t V_shard) {
  check_sizes("embedding_forward", {N, h, v0, V_shard});
  for_row_chunks(N, h, [&](int64_t begin, int64_t end, int) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t row = static_cast<int64_t>(ids[n]) - v0;
      if (row < 0 || row >= V_shard) continue;
      std::memcpy(out + n * h, table + row * h, sizeof(bf16) * h);
    }
  });
}

}  // namespace tsp
