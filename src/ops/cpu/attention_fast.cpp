// Blocked causal attention on AVX-512 (flash-attention 2 schedule, fp32).
//
// Layout trick: inside a tile the QUERIES lie across the vector lanes. A tile holds
//   Qᵀ  [d][bq]   the query tile, transposed once per query tile and pre-multiplied by
//                 scale·log2(e) so that scores come out in base-2 units (exp2 is cheaper than exp);
//   Sᵀ  [bk][bq]  scores of bk keys (rows) against bq queries (lanes).
// Then every softmax statistic of a query (running max, running sum, lse, D) is one lane, and the
// row reductions of softmax become element-wise max/add down the rows of Sᵀ: no horizontal sums.
// All six tile products are one register-blocked micro-kernel "broadcast a scalar of A, FMA with
// vectors of B" whose A may be read transposed through strides, so K, V, dO, Q and the gradients
// are used in place ([n, heads, d] rows) and only Qᵀ (and dOᵀ in backward) are packed.
//
// Memory: per thread one tile of each buffer (see the scratch layouts); never n_q × n_k.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
// GCC 12's AVX-512 intrinsics initialise their "undefined" operand with itself (__m512 __Y = __Y),
// which -Wmaybe-uninitialized reports at every inlined call (GCC bug 105593); it is harmless.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include "ops/cpu/attention_avx512.h"
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include "ops/cpu/attention_internal.h"
#include "tsp/core/tensor.h"
#include "tsp/ops/gemm.h"

namespace tsp::attn {

#if defined(__AVX512F__)

namespace {

using namespace avx512;  // NOLINT: the shared tile helpers

constexpr int kMr = 6;  // micro-kernel rows: 6 × 4 accumulators + 4 B vectors + 1 broadcast
constexpr int kNr = 4;  // micro-kernel columns, in vectors of 16

// C[R][16·NC] (+)= Σ_k A(r, k) · B[k][16·NC],  A(r, k) = A[r·a_rs + k·a_ks], B rows ldb apart.
// The accumulators stay in registers for the whole reduction.
template <int R, int NC>
void micro_kernel(int64_t K, const float* A, int64_t a_rs, int64_t a_ks, const float* B,
                  int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  __m512 acc[R][NC];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c)
      acc[r][c] = accumulate ? _mm512_loadu_ps(C + r * ldc + 16 * c) : _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[NC];
    for (int c = 0; c < NC; ++c) b[c] = _mm512_loadu_ps(B + k * ldb + 16 * c);
    const float* a = A + k * a_ks;
    for (int r = 0; r < R; ++r) {
      const __m512 ar = _mm512_set1_ps(a[r * a_rs]);
      for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_fmadd_ps(ar, b[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(C + r * ldc + 16 * c, acc[r][c]);
}

using MicroKernel = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*,
                             int64_t, bool);

template <int R>
constexpr std::array<MicroKernel, kNr> kernel_row() {
  return {micro_kernel<R, 1>, micro_kernel<R, 2>, micro_kernel<R, 3>, micro_kernel<R, 4>};
}
const std::array<std::array<MicroKernel, kNr>, kMr> kKernels = {kernel_row<1>(), kernel_row<2>(),
                                                                kernel_row<3>(), kernel_row<4>(),
                                                                kernel_row<5>(), kernel_row<6>()};

// C[M, N] (+)= A[M, K] · B[K, N] for one tile; A(m, k) = A[m·a_rs + k·a_ks] (so a transposed A
// is just swapped strides), B row-major with row stride ldb, C row stride ldc. N % 16 == 0.
void tile_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_rs, int64_t a_ks,
               const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += 16 * kNr) {
    const int nc = static_cast<int>(std::min<int64_t>(kNr, (N - n0) / 16));
    for (int64_t m0 = 0; m0 < M; m0 += kMr) {
      const int mr = static_cast<int>(std::min<int64_t>(kMr, M - m0));
      kKernels[mr - 1][nc - 1](K, A + m0 * a_rs, a_rs, a_ks, B + n0, ldb, C + m0 * ldc + n0, ldc,
                               accumulate);
    }
  }
}

// Xᵀ [d][bq] = mult · X[nq rows, x_stride apart][d], zero in the pad lanes nq..bq.
void pack_transposed(const float* x, int64_t x_stride, int64_t nq, int64_t bq, int64_t d,
                     float mult, float* xt) {
  for (int64_t c = 0; c < d; ++c) std::fill(xt + c * bq + nq, xt + (c + 1) * bq, 0.f);
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t c = 0; c < d; ++c) xt[c * bq + i] = mult * x[i * x_stride + c];
}

// ---- Forward ------------------------------------------------------------------------------------
// Per-thread scratch, in floats.
int64_t forward_scratch_floats(int64_t d) {
  return d * kBq + kBk * kBq + kBq * d + 3 * kBq;
}

// One (head h, query tile [i0, i0 + nq)): o and lse of those queries over all keys.
void forward_query_tile(const AttentionParams& p, const Geometry& G,
                        const std::vector<PosRange>& key_ranges, int64_t h, int64_t i0, int64_t nq,
                        float* scratch) {
  const int64_t d = G.d, bq = (nq + 15) / 16 * 16;
  float* qt = scratch;          // [d][bq]   Qᵀ · scale·log2e
  float* st = qt + d * kBq;     // [kBk][bq] scores, then probabilities (base-2 units)
  float* acc = st + kBk * kBq;  // [nq][d]   unnormalised output
  float* m = acc + kBq * d;     // [bq]      running max (base 2); -inf until a key is seen
  float* l = m + kBq;           // [bq]      running Σ 2^{s - m}
  float* alpha = l + kBq;       // [bq]      rescale factor of this key tile
  alignas(64) int64_t q_lanes[kBq];
  alignas(64) int64_t ds_lanes[kBq];  // document starts (with documents only)

  const float* q = p.q + i0 * G.q_stride + h * d;
  pack_transposed(q, G.q_stride, nq, bq, d, p.scale * kLog2e, qt);
  const PosRange qr = load_query_positions(p.q_pos + i0, nq, bq, q_lanes);
  const bool docs = p.q_doc_pos != nullptr;
  const PosRange ds =
      docs ? load_query_doc_starts(p.q_pos + i0, p.q_doc_pos + i0, nq, bq, ds_lanes) : PosRange{};
  std::fill(m, m + bq, kNegInf);
  std::fill(l, l + bq, 0.f);
  std::fill(acc, acc + nq * d, 0.f);

  const int64_t kv_off = (h / G.group) * d;
  for (int64_t kt = 0; kt < static_cast<int64_t>(key_ranges.size()); ++kt) {
    // Skip a tile no query sees: every key after every query, or before every document start.
    const TileMask tm = classify_tile(key_ranges[kt], qr, docs ? &ds : nullptr);
    if (tm.skip) continue;
    const int64_t j0 = kt * kBk, nk = std::min(kBk, p.n_k - j0);
    const float* k = p.k + j0 * G.kv_stride + kv_off;
    const float* v = p.v + j0 * G.kv_stride + kv_off;

    // Sᵀ [nk][bq] = K [nk, d] · Qᵀ [d, bq]
    tile_gemm(nk, bq, d, k, G.kv_stride, 1, qt, bq, st, bq, false);
    if (tm.masked) apply_causal_mask(st, nk, bq, p.k_pos + j0, q_lanes, docs ? ds_lanes : nullptr);

    // Online softmax, 16 queries at a time: new max, rescale factor, probabilities, sums.
    for (int64_t vq = 0; vq < bq; vq += 16) {
      const __m512 m_old = _mm512_loadu_ps(m + vq);
      __m512 m_new = m_old;
      for (int64_t j = 0; j < nk; ++j)
        m_new = _mm512_max_ps(m_new, _mm512_loadu_ps(st + j * bq + vq));
      // A query that has still seen no key keeps m = -inf; subtracting 0 instead makes its
      // probabilities 2^-inf = 0 rather than NaN.
      const __m512 m_use =
          _mm512_mask_mov_ps(m_new, _mm512_cmp_ps_mask(m_new, _mm512_set1_ps(kNegInf), _CMP_EQ_OQ),
                             _mm512_setzero_ps());
      const __m512 a = exp2_ps(_mm512_sub_ps(m_old, m_use));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < nk; ++j) {
        float* s = st + j * bq + vq;
        const __m512 pj = exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(s), m_use));
        _mm512_storeu_ps(s, pj);
        sum = _mm512_add_ps(sum, pj);
      }
      _mm512_storeu_ps(l + vq, _mm512_fmadd_ps(a, _mm512_loadu_ps(l + vq), sum));
      _mm512_storeu_ps(alpha + vq, a);
      _mm512_storeu_ps(m + vq, m_new);
    }
    // acc [nq][d] = alpha · acc + Pᵀᵀ [nq, nk] · V [nk, d]
    for (int64_t i = 0; i < nq; ++i) {
      const __m512 a = _mm512_set1_ps(alpha[i]);
      for (int64_t c = 0; c < d; c += 16)
        _mm512_storeu_ps(acc + i * d + c, _mm512_mul_ps(a, _mm512_loadu_ps(acc + i * d + c)));
    }
    tile_gemm(nq, d, nk, st, 1, bq, v, G.kv_stride, acc, d, true);
  }

  for (int64_t i = 0; i < nq; ++i) {
    float* o = p.o + (i0 + i) * G.q_stride + h * d;
    float* lse = p.lse + (i0 + i) * G.n_heads + h;
    if (l[i] > 0.f) {
      const float inv = 1.f / l[i];
      for (int64_t c = 0; c < d; ++c) o[c] = acc[i * d + c] * inv;
      *lse = (m[i] + std::log2(l[i])) * kLn2;  // ln Σ e^s = ln(2^m · l)
    } else {                                   // no visible key
      std::fill(o, o + d, 0.f);
      *lse = kNegInf;
    }
  }
}

// ---- Backward -----------------------------------------------------------------------------------
int64_t backward_scratch_floats(int64_t d) {
  return 2 * d * kBq + 2 * kBk * kBq + 2 * kBq;
}

// One (query head h, query tile [i0, i0 + nq)) against all keys: dq of those queries, and their
// contributions to dk, dv of kv head h / group (all +=).
void backward_query_tile(const AttentionBackwardParams& p, const Geometry& G,
                         const std::vector<PosRange>& key_ranges, int64_t h, int64_t i0, int64_t nq,
                         float* scratch) {
  const int64_t d = G.d, bq = (nq + 15) / 16 * 16;
  float* qt = scratch;            // [d][bq]   Qᵀ · scale·log2e
  float* dot = qt + d * kBq;      // [d][bq]   dOᵀ
  float* st = dot + d * kBq;      // [kBk][bq] scores -> P
  float* dpt = st + kBk * kBq;    // [kBk][bq] dPᵀ -> dSᵀ · scale
  float* lse2 = dpt + kBk * kBq;  // [bq] lse in base 2; +inf for queries without keys and pads
  float* Dv = lse2 + kBq;         // [bq] D_i = dout_i · o_i
  alignas(64) int64_t q_lanes[kBq];
  alignas(64) int64_t ds_lanes[kBq];  // document starts (with documents only)

  const float* q = p.q + i0 * G.q_stride + h * d;
  const float* dout = p.dout + i0 * G.q_stride + h * d;
  const float* o = p.o + i0 * G.q_stride + h * d;
  float* dq = p.dq + i0 * G.q_stride + h * d;
  pack_transposed(q, G.q_stride, nq, bq, d, p.scale * kLog2e, qt);
  pack_transposed(dout, G.q_stride, nq, bq, d, 1.f, dot);
  const PosRange qr = load_query_positions(p.q_pos + i0, nq, bq, q_lanes);
  const bool docs = p.q_doc_pos != nullptr;
  const PosRange ds =
      docs ? load_query_doc_starts(p.q_pos + i0, p.q_doc_pos + i0, nq, bq, ds_lanes) : PosRange{};
  for (int64_t i = 0; i < bq; ++i) {
    // +inf makes P = 2^(s - inf) = 0 for pads and for a query that saw no key (lse = -inf):
    // no gradient, without relying on -inf - (-inf) = NaN being flushed by exp2_ps.
    const float lse = i < nq ? p.lse[(i0 + i) * G.n_heads + h] : kNegInf;
    lse2[i] = lse == kNegInf ? kPosInf : lse * kLog2e;
    float D = 0.f;
    for (int64_t c = 0; i < nq && c < d; ++c) D += dout[i * G.q_stride + c] * o[i * G.q_stride + c];
    Dv[i] = D;
  }

  const int64_t kv_off = (h / G.group) * d;
  const __m512 scale = _mm512_set1_ps(p.scale);
  for (int64_t kt = 0; kt < static_cast<int64_t>(key_ranges.size()); ++kt) {
    const TileMask tm = classify_tile(key_ranges[kt], qr, docs ? &ds : nullptr);
    if (tm.skip) continue;
    const int64_t j0 = kt * kBk, nk = std::min(kBk, p.n_k - j0);
    const float* k = p.k + j0 * G.kv_stride + kv_off;
    const float* v = p.v + j0 * G.kv_stride + kv_off;
    float* dk = p.dk + j0 * G.kv_stride + kv_off;
    float* dv = p.dv + j0 * G.kv_stride + kv_off;

    // Pᵀ [nk][bq] = 2^(K·Qᵀ - lse2), masked entries 0
    tile_gemm(nk, bq, d, k, G.kv_stride, 1, qt, bq, st, bq, false);
    if (tm.masked) apply_causal_mask(st, nk, bq, p.k_pos + j0, q_lanes, docs ? ds_lanes : nullptr);
    for (int64_t j = 0; j < nk; ++j)
      for (int64_t vq = 0; vq < bq; vq += 16) {
        float* s = st + j * bq + vq;
        _mm512_storeu_ps(s, exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(s), _mm512_loadu_ps(lse2 + vq))));
      }
    // dV [nk, d] += Pᵀ [nk, nq] · dO [nq, d]
    tile_gemm(nk, d, nq, st, bq, 1, dout, G.q_stride, dv, G.kv_stride, true);
    // dPᵀ [nk][bq] = V [nk, d] · dOᵀ [d, bq]
    tile_gemm(nk, bq, d, v, G.kv_stride, 1, dot, bq, dpt, bq, false);
    // dSᵀ · scale = Pᵀ ∘ (dPᵀ - D) · scale
    for (int64_t j = 0; j < nk; ++j)
      for (int64_t vq = 0; vq < bq; vq += 16) {
        float* ds = dpt + j * bq + vq;
        const __m512 P = _mm512_loadu_ps(st + j * bq + vq);
        const __m512 diff = _mm512_sub_ps(_mm512_loadu_ps(ds), _mm512_loadu_ps(Dv + vq));
        _mm512_storeu_ps(ds, _mm512_mul_ps(_mm512_mul_ps(P, diff), scale));
      }
    // dK [nk, d] += dSᵀ [nk, nq] · Q [nq, d]   (scale already in dS)
    tile_gemm(nk, d, nq, dpt, bq, 1, q, G.q_stride, dk, G.kv_stride, true);
    // dQ [nq, d] += dSᵀᵀ [nq, nk] · K [nk, d]
    tile_gemm(nq, d, nk, dpt, 1, bq, k, G.kv_stride, dq, G.q_stride, true);
  }
}

}  // namespace

bool fast_path_available(int64_t head_dim) {
  return head_dim % 16 == 0;
}

void forward_fast(const AttentionParams& p) {
  const Geometry G(p);
  const std::vector<PosRange> key_ranges = block_ranges(p.k_pos, p.n_k, kBk);
  const int64_t n_qt = (p.n_q + kBq - 1) / kBq, items = G.n_heads * n_qt;
  const int threads = static_cast<int>(std::min<int64_t>(compute_threads(), items));
  const int64_t per_thread = forward_scratch_floats(G.d);
  Tensor scratch = Tensor::f32({threads, per_thread}, MemCategory::Workspace);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t item = 0; item < items; ++item) {
    // Last query tiles first: under a causal mask they see the most keys (balances threads).
    const int64_t h = item % G.n_heads, qt = n_qt - 1 - item / G.n_heads;
    const int64_t i0 = qt * kBq, nq = std::min(kBq, p.n_q - i0);
    forward_query_tile(p, G, key_ranges, h, i0, nq, scratch.f32() + thread_index() * per_thread);
  }
}

void backward_fast(const AttentionBackwardParams& p) {
  const Geometry G(p);
  const std::vector<PosRange> key_ranges = block_ranges(p.k_pos, p.n_k, kBk);
  const int64_t n_qt = (p.n_q + kBq - 1) / kBq;
  // Threads split the kv heads: each owns dk, dv of its kv head and dq of its query heads, so
  // no two threads ever add into the same row.
  const int threads = static_cast<int>(std::min<int64_t>(compute_threads(), p.n_kv_heads));
  const int64_t per_thread = backward_scratch_floats(G.d);
  Tensor scratch = Tensor::f32({threads, per_thread}, MemCategory::Workspace);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t hk = 0; hk < p.n_kv_heads; ++hk) {
    float* s = scratch.f32() + thread_index() * per_thread;
    for (int64_t h = hk * G.group; h < (hk + 1) * G.group; ++h)
      for (int64_t qt = 0; qt < n_qt; ++qt) {
        const int64_t i0 = qt * kBq, nq = std::min(kBq, p.n_q - i0);
        backward_query_tile(p, G, key_ranges, h, i0, nq, s);
      }
  }
}

void exp2_fast(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, exp2_ps(_mm512_loadu_ps(x + i)));
  if (i < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(y + i, tail, exp2_ps(_mm512_maskz_loadu_ps(tail, x + i)));
  }
}

#else  // no AVX-512: the reference path serves every call

bool fast_path_available(int64_t) {
  return false;
}
void forward_fast(const AttentionParams& p) {
  forward_reference(p);
}
void backward_fast(const AttentionBackwardParams& p) {
  backward_reference(p);
}
void exp2_fast(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] < -126.f ? 0.f : std::exp2(x[i]);
}

#endif

}  // namespace tsp::attn
