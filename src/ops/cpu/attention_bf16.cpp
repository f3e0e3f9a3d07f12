// Causal attention with bf16 q, k, v, o (tsp/ops/attention.h, "bf16"): public entry points, the
// reference and widened paths, the native AVX512_BF16 path, and the bf16 merge.
//
// Native path: the fp32 path's flash-attention 2 schedule (attention_fast.cpp: queries across the
// vector lanes, Sᵀ [keys][queries] tiles, every softmax statistic one lane, fp32), with every
// product on vdpbf16ps: 16 fp32 lanes, each += a[2i]·b[2i] + a[2i+1]·b[2i+1] over bf16 pairs. So
// both operands are laid out as PAIRS ALONG THE REDUCTION: A is broadcast one 32-bit pair at a
// time, B holds 16 pairs per vector. Pairs along the head dimension are just the rows of q, k, v
// (adjacent elements); pairs along keys or queries interleave two rows (packed once per call for
// K and V, once per query tile for Q and dO).
//
// Error of the native path relative to exact attention on the same bf16 inputs (u = 2^-8, the
// unit roundoff of bf16; the fp32 terms are those of the fp32 path, ~1e-6 here):
//   - Scores: products of bf16 values are exact in fp32 and summed in fp32, as in the fp32 path.
//     (vdpbf16ps treats bf16 denormal inputs, |x| < 2^-126, as 0: an absolute error < 2^-126·|y|.)
//     So lse, the running max and the running sum are fp32-accurate: no bf16 error at all.
//   - Forward: P·V takes P̃ = P(1 + δ), |δ| <= u, while the normaliser l = Σ P stays fp32. Then
//     |Δo_ic| <= u · Σ_j p_ij |v_jc|  (p = P / l, the softmax), <= u · max_j |v_jc|,
//     plus the final rounding of o: u·|o_ic|.
//   - Backward: dO, P and dS·scale are rounded to bf16 for the products (D_i = dO_i·o_i is fp32).
//       dP̃_ij = dP_ij + ε, |ε| <= u·Σ_c |dO_ic||v_jc|                (dÕ in V·dÕᵀ)
//       |ΔdS_ij| <= p_ij·u·Σ_c |dO_ic||v_jc| + u·|dS_ij|            (then dS rounded)
//       |ΔdV_jc| <= (2u + u²) · Σ_i p_ij |dO_ic|                     (P̃ and dÕ)
//       |ΔdQ_ic| <= scale · Σ_j |ΔdS_ij| |k_jc|,   |ΔdK_jc| <= scale · Σ_i |ΔdS_ij| |q_ic|
//     (tests/ops/attention_bf16_test.cpp checks exactly these bounds, element by element).
// Rounding P to bf16 for P·V is what flash-attention does on GPUs; the statistics stay exact and
// every product runs at vdpbf16ps's rate, twice the fp32 FMA's in multiply-adds per instruction.
// Measured (bench_attention --dtype both, 1 thread, AMD EPYC Zen 4, S = 2048, 8 query heads,
// d = 64 and 128, MHA and GQA 4): 1.7-2.0x the fp32 path's GFLOP/s, forward and backward.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define TSP_ATTN_BF16_NATIVE 1
// GCC bug 105593 (see attention_fast.cpp): spurious -Wmaybe-uninitialized in AVX-512 intrinsics.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include "ops/cpu/attention_avx512.h"
#endif

#include "ops/cpu/attention_internal.h"
#include "tsp/core/error.h"
#include "tsp/core/tensor.h"
#include "tsp/ops/attention.h"
#include "tsp/ops/gemm.h"

namespace tsp {
namespace attn {
namespace {

constexpr float kNegInfF = -std::numeric_limits<float>::infinity();

// fp32 copy of n bf16 values (empty tensor, null pointer, for n = 0).
Tensor widened(const bf16* x, int64_t n) {
  if (n == 0) return Tensor();
  Tensor t = Tensor::f32({n}, MemCategory::Workspace);
  convert_bf16_to_f32(x, t.f32(), n);
  return t;
}
float* ptr(const Tensor& t) {
  return t.empty() ? nullptr : t.f32();
}

// The fp32 view of a bf16 call: widened q, k, v (and o for backward), an fp32 o buffer.
struct Widened {
  Tensor q, k, v, o;
  AttentionBackwardParams p;
  Widened(const AttentionBf16Params& b, bool o_is_input) {
    const int64_t q_elems = b.n_q * b.n_heads * b.head_dim;
    const int64_t kv_elems = b.n_k * b.n_kv_heads * b.head_dim;
    q = widened(b.q, q_elems), k = widened(b.k, kv_elems), v = widened(b.v, kv_elems);
    if (o_is_input) {
      o = widened(b.o, q_elems);
    } else if (q_elems > 0) {
      o = Tensor::f32({q_elems}, MemCategory::Workspace);
    }
    p.n_q = b.n_q, p.n_k = b.n_k, p.n_heads = b.n_heads, p.n_kv_heads = b.n_kv_heads;
    p.head_dim = b.head_dim, p.scale = b.scale;
    p.q = ptr(q), p.k = ptr(k), p.v = ptr(v), p.q_pos = b.q_pos, p.k_pos = b.k_pos;
    p.q_doc_pos = b.q_doc_pos;
    p.o = ptr(o), p.lse = b.lse;
  }
  Widened(const AttentionBf16BackwardParams& b)
      : Widened(static_cast<const AttentionBf16Params&>(b), true) {
    p.dout = b.dout, p.dq = b.dq, p.dk = b.dk, p.dv = b.dv;
  }
  void round_o_into(bf16* out) const {
    if (p.n_q > 0) convert_f32_to_bf16(p.o, out, p.n_q * p.n_heads * p.head_dim);
  }
};

}  // namespace

void forward_reference_bf16(const AttentionBf16Params& b) {
  Widened w(b, false);
  forward_reference(w.p);
  w.round_o_into(b.o);
}

void backward_reference_bf16(const AttentionBf16BackwardParams& b) {
  Widened w(b);
  backward_reference(w.p);
}

void forward_widened_bf16(const AttentionBf16Params& b) {
  Widened w(b, false);
  if (fast_path_available(b.head_dim))
    forward_fast(w.p);
  else
    forward_reference(w.p);
  w.round_o_into(b.o);
}

void backward_widened_bf16(const AttentionBf16BackwardParams& b) {
  Widened w(b);
  if (fast_path_available(b.head_dim))
    backward_fast(w.p);
  else
    backward_reference(w.p);
}

#if defined(TSP_ATTN_BF16_NATIVE)

namespace {

using namespace avx512;  // NOLINT: the shared tile helpers

constexpr int kMr = 6;  // micro-kernel rows: 6 × 4 accumulators + 4 B vectors + 1 broadcast
constexpr int kNr = 4;  // micro-kernel columns, in vectors of 16 fp32 lanes (16 bf16 pairs)

// ---- The product ------------------------------------------------------------------------------

// A bf16 pair (2 adjacent elements) broadcast to the 16 lanes.
inline __m512bh broadcast_pair(const bf16* p) {
  uint32_t w;
  std::memcpy(&w, p, sizeof w);
  return (__m512bh)_mm512_set1_epi32(static_cast<int>(w));
}

// C[R][16·NC] (+)= Σ_k A(r, k) · B[k][16·NC] over K2 pairs k. A(r, k) is the bf16 pair at
// A + r·a_rs + k·a_ks (elements); B's row k holds 16·NC pairs (lane-major: pair of lane c at
// B + k·ldb + 2c). fp32 accumulators in registers for the whole reduction.
template <int R, int NC>
void micro_kernel(int64_t K2, const bf16* A, int64_t a_rs, int64_t a_ks, const bf16* B, int64_t ldb,
                  float* C, int64_t ldc, bool accumulate) {
  __m512 acc[R][NC];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c)
      acc[r][c] = accumulate ? _mm512_loadu_ps(C + r * ldc + 16 * c) : _mm512_setzero_ps();
  for (int64_t k = 0; k < K2; ++k) {
    __m512bh b[NC];
    for (int c = 0; c < NC; ++c) b[c] = (__m512bh)_mm512_loadu_si512(B + k * ldb + 32 * c);
    const bf16* a = A + k * a_ks;
    for (int r = 0; r < R; ++r) {
      const __m512bh ar = broadcast_pair(a + r * a_rs);
      for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], ar, b[c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(C + r * ldc + 16 * c, acc[r][c]);
}

using MicroKernel = void (*)(int64_t, const bf16*, int64_t, int64_t, const bf16*, int64_t, float*,
                             int64_t, bool);
template <int R>
constexpr std::array<MicroKernel, kNr> kernel_row() {
  return {micro_kernel<R, 1>, micro_kernel<R, 2>, micro_kernel<R, 3>, micro_kernel<R, 4>};
}
const std::array<std::array<MicroKernel, kNr>, kMr> kKernels = {kernel_row<1>(), kernel_row<2>(),
                                                                kernel_row<3>(), kernel_row<4>(),
                                                                kernel_row<5>(), kernel_row<6>()};

// C[M, N] (+)= A[M, 2·K2] · B[2·K2, N] for one tile, in the pair layouts of micro_kernel.
// N % 16 == 0; C row stride ldc.
void tile_gemm(int64_t M, int64_t N, int64_t K2, const bf16* A, int64_t a_rs, int64_t a_ks,
               const bf16* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += 16 * kNr) {
    const int nc = static_cast<int>(std::min<int64_t>(kNr, (N - n0) / 16));
    for (int64_t m0 = 0; m0 < M; m0 += kMr) {
      const int mr = static_cast<int>(std::min<int64_t>(kMr, M - m0));
      kKernels[mr - 1][nc - 1](K2, A + m0 * a_rs, a_rs, a_ks, B + 2 * n0, ldb, C + m0 * ldc + n0,
                               ldc, accumulate);
    }
  }
}

// ---- Packing ----------------------------------------------------------------------------------

inline uint16_t bits_of(bf16 x) {
  return x.bits;
}
inline uint16_t bits_of(float x) {
  return bf16::from_float(x);  // dO: rounded to nearest even, as convert_f32_to_bf16
}

// Pairs along the columns, transposed: out[c2][i] = (x[i][2c2], x[i][2c2+1]) for rows i < n,
// zero pairs for i in [n, lanes). x rows x_stride apart, d columns. out [d/2][lanes] pairs.
template <class T>
void pack_cols_transposed(const T* x, int64_t x_stride, int64_t n, int64_t lanes, int64_t d,
                          bf16* out) {
  uint16_t* o = reinterpret_cast<uint16_t*>(out);
  for (int64_t c2 = 0; c2 < d / 2; ++c2) {
    uint16_t* row = o + 2 * c2 * lanes;
    for (int64_t i = 0; i < n; ++i) {
      row[2 * i] = bits_of(x[i * x_stride + 2 * c2]);
      row[2 * i + 1] = bits_of(x[i * x_stride + 2 * c2 + 1]);
    }
    std::fill(row + 2 * n, row + 2 * lanes, uint16_t{0});
  }
}

// Pairs along the rows: out[r2][c] = (x[2r2][c], x[2r2+1][c]) for r2 < rows2, a missing row
// (index >= n) read as 0. out [rows2][d] pairs.
template <class T>
void pack_rows(const T* x, int64_t x_stride, int64_t n, int64_t rows2, int64_t d, bf16* out) {
  uint16_t* o = reinterpret_cast<uint16_t*>(out);
  for (int64_t r2 = 0; r2 < rows2; ++r2) {
    uint16_t* row = o + 2 * r2 * d;
    const int64_t r0 = 2 * r2, r1 = 2 * r2 + 1;
    for (int64_t c = 0; c < d; ++c) {
      row[2 * c] = r0 < n ? bits_of(x[r0 * x_stride + c]) : uint16_t{0};
      row[2 * c + 1] = r1 < n ? bits_of(x[r1 * x_stride + c]) : uint16_t{0};
    }
  }
}

// 16 pairs (even[i], odd[i]) of two fp32 vectors rounded to bf16 (vcvtne2ps2bf16: nearest even;
// it flushes fp32 denormals to 0, an absolute error < 2^-126).
inline __m512i round_interleave(__m512 even, __m512 odd) {
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                       23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(odd, even));
}

// 16 fp32 lanes rounded to bf16 and stored (32 bytes).
inline void store_rounded(bf16* dst, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(x));
}

// K and V of every kv head as pairs along keys: [n_kv_heads][ceil(n_k/2)][d] pairs, a pad key
// (n_k odd) zero. Key tiles start at even keys (kBk is even), so tile kt's pairs start at kt·kBk/2.
Tensor pack_keys(const bf16* x, int64_t n_k, int64_t n_kv_heads, int64_t d) {
  const int64_t n2 = (n_k + 1) / 2;
  Tensor t({std::max<int64_t>(1, n_kv_heads * n2 * 2 * d)}, DType::BF16, MemCategory::Workspace);
  bf16* out = t.data_as<bf16>();
  const int threads = static_cast<int>(std::min<int64_t>(compute_threads(), n_kv_heads));
#pragma omp parallel for num_threads(threads) if (threads > 1)
  for (int64_t hk = 0; hk < n_kv_heads; ++hk)
    pack_rows(x + hk * d, n_kv_heads * d, n_k, n2, d, out + hk * n2 * 2 * d);
  return t;
}

// Sᵀ [nk][bq] ← mult·Sᵀ, and -inf where query i cannot see key j (hidden_lanes: after it, or
// before its document's start). Scaling here (not in the packed Q, which would round q·scale to
// bf16 again) keeps the scores fp32-exact.
void scale_and_mask(float* st, int64_t nk, int64_t bq, float mult, const int64_t* k_pos,
                    const int64_t* q_lanes, const int64_t* ds_lanes) {
  const __m512 c = _mm512_set1_ps(mult), neg_inf = _mm512_set1_ps(kNegInf);
  for (int64_t j = 0; j < nk; ++j) {
    const __m512i kp = _mm512_set1_epi64(k_pos[j]);
    for (int64_t v = 0; v < bq; v += 16) {
      float* s = st + j * bq + v;
      _mm512_storeu_ps(s, _mm512_mask_mov_ps(_mm512_mul_ps(_mm512_loadu_ps(s), c),
                                             hidden_lanes(kp, q_lanes, ds_lanes, v), neg_inf));
    }
  }
}

// ---- Forward ------------------------------------------------------------------------------------

struct ForwardScratch {
  bf16* qp;      // [d/2][kBq] pairs     Q, pairs along d
  float* st;     // [kBk][kBq]           scores (base-2 units)
  bf16* pp;      // [kBk/2][kBq] pairs   P, pairs along keys
  float* acc;    // [kBq][d]             unnormalised output
  float* m;      // [kBq]                running max (base 2); -inf until a key is seen
  float* l;      // [kBq]                running Σ 2^{s - m} (fp32 P, before rounding)
  float* alpha;  // [kBq]               rescale factor of this key tile
  float* orow;   // [d]                  one output row before rounding
  static int64_t floats(int64_t d) {
    return d * kBq / 2 + kBk * kBq + kBk * kBq / 2 + kBq * d + 3 * kBq + d;
  }
  ForwardScratch(float* s, int64_t d) {
    qp = reinterpret_cast<bf16*>(s), s += d * kBq / 2;
    st = s, s += kBk * kBq;
    pp = reinterpret_cast<bf16*>(s), s += kBk * kBq / 2;
    acc = s, s += kBq * d;
    m = s, s += kBq;
    l = s, s += kBq;
    alpha = s, s += kBq;
    orow = s;
  }
};

void forward_query_tile(const AttentionBf16Params& p, const Geometry& G,
                        const std::vector<PosRange>& key_ranges, const bf16* v_pairs, int64_t h,
                        int64_t i0, int64_t nq, float* scratch) {
  const int64_t d = G.d, bq = (nq + 15) / 16 * 16;
  const ForwardScratch S(scratch, d);
  alignas(64) int64_t q_lanes[kBq];
  alignas(64) int64_t ds_lanes[kBq];  // document starts (with documents only)

  pack_cols_transposed(p.q + i0 * G.q_stride + h * d, G.q_stride, nq, bq, d, S.qp);
  const PosRange qr = load_query_positions(p.q_pos + i0, nq, bq, q_lanes);
  const bool docs = p.q_doc_pos != nullptr;
  const PosRange ds =
      docs ? load_query_doc_starts(p.q_pos + i0, p.q_doc_pos + i0, nq, bq, ds_lanes) : PosRange{};
  std::fill(S.m, S.m + bq, kNegInf);
  std::fill(S.l, S.l + bq, 0.f);
  std::fill(S.acc, S.acc + nq * d, 0.f);

  const int64_t hk = h / G.group, kv_off = hk * d;
  const int64_t n2 = (p.n_k + 1) / 2;
  const float mult = p.scale * kLog2e;
  for (int64_t kt = 0; kt < static_cast<int64_t>(key_ranges.size()); ++kt) {
    // Skip a tile no query sees: every key after every query, or before every document start.
    const TileMask tm = classify_tile(key_ranges[kt], qr, docs ? &ds : nullptr);
    if (tm.skip) continue;
    const int64_t j0 = kt * kBk, nk = std::min(kBk, p.n_k - j0), nk2 = (nk + 1) / 2;

    // Sᵀ [nk][bq] = K [nk, d] · Qᵀ [d, bq]: A = K rows (pairs along d), B = Q pairs along d.
    tile_gemm(nk, bq, d / 2, p.k + j0 * G.kv_stride + kv_off, G.kv_stride, 2, S.qp, 2 * bq, S.st,
              bq, false);
    // Scores in base-2 units are cs·Sᵀ: a tile under the mask is scaled and masked in place (then
    // cs = 1); any other tile is scaled on the fly (max of c·s, exponent c·s - m by one FMA).
    const bool masked = tm.masked;
    if (masked)
      scale_and_mask(S.st, nk, bq, mult, p.k_pos + j0, q_lanes, docs ? ds_lanes : nullptr);
    const __m512 cs = _mm512_set1_ps(masked ? 1.f : mult);

    // Online softmax, 16 queries at a time; P is written as bf16 pairs along keys.
    for (int64_t vq = 0; vq < bq; vq += 16) {
      const __m512 m_old = _mm512_loadu_ps(S.m + vq);
      __m512 m_new = m_old;
      for (int64_t j = 0; j < nk; ++j)
        m_new = _mm512_max_ps(m_new, _mm512_mul_ps(cs, _mm512_loadu_ps(S.st + j * bq + vq)));
      // A query that has still seen no key keeps m = -inf; subtracting 0 instead makes its
      // probabilities 2^-inf = 0 rather than NaN.
      const __m512 m_use =
          _mm512_mask_mov_ps(m_new, _mm512_cmp_ps_mask(m_new, _mm512_set1_ps(kNegInf), _CMP_EQ_OQ),
                             _mm512_setzero_ps());
      const __m512 a = exp2_ps(_mm512_sub_ps(m_old, m_use));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j2 = 0; j2 < nk2; ++j2) {
        const __m512 pe =
            exp2_ps(_mm512_fmsub_ps(cs, _mm512_loadu_ps(S.st + 2 * j2 * bq + vq), m_use));
        const __m512 po = 2 * j2 + 1 < nk
                              ? exp2_ps(_mm512_fmsub_ps(
                                    cs, _mm512_loadu_ps(S.st + (2 * j2 + 1) * bq + vq), m_use))
                              : _mm512_setzero_ps();
        sum = _mm512_add_ps(sum, _mm512_add_ps(pe, po));
        _mm512_storeu_si512(S.pp + 2 * (j2 * bq + vq), round_interleave(pe, po));
      }
      _mm512_storeu_ps(S.l + vq, _mm512_fmadd_ps(a, _mm512_loadu_ps(S.l + vq), sum));
      _mm512_storeu_ps(S.alpha + vq, a);
      _mm512_storeu_ps(S.m + vq, m_new);
    }
    // acc [nq][d] = alpha · acc + P [nq, nk] · V [nk, d]: A = P pairs along keys (query i at
    // pp + 2i), B = V pairs along keys.
    for (int64_t i = 0; i < nq; ++i) {
      const __m512 a = _mm512_set1_ps(S.alpha[i]);
      for (int64_t c = 0; c < d; c += 16)
        _mm512_storeu_ps(S.acc + i * d + c, _mm512_mul_ps(a, _mm512_loadu_ps(S.acc + i * d + c)));
    }
    tile_gemm(nq, d, nk2, S.pp, 2, 2 * bq, v_pairs + (hk * n2 + kt * kBk / 2) * 2 * d, 2 * d, S.acc,
              d, true);
  }

  for (int64_t i = 0; i < nq; ++i) {
    bf16* o = p.o + (i0 + i) * G.q_stride + h * d;
    float* lse = p.lse + (i0 + i) * G.n_heads + h;
    if (S.l[i] > 0.f) {
      const float inv = 1.f / S.l[i];
      for (int64_t c = 0; c < d; ++c) S.orow[c] = S.acc[i * d + c] * inv;
      convert_f32_to_bf16(S.orow, o, d);
      *lse = (S.m[i] + std::log2(S.l[i])) * kLn2;  // ln Σ e^s = ln(2^m · l)
    } else {                                       // no visible key
      std::fill(o, o + d, bf16());
      *lse = kNegInf;
    }
  }
}

// ---- Backward -----------------------------------------------------------------------------------

struct BackwardScratch {
  bf16* qp;     // [d/2][kBq] pairs    Q, pairs along d            (B of Sᵀ = K·Qᵀ)
  bf16* dop;    // [d/2][kBq] pairs    dO, pairs along d           (B of dPᵀ = V·dOᵀ)
  bf16* qi;     // [kBq/2][d] pairs    Q, pairs along queries      (B of dK += dSᵀ·Q)
  bf16* doi;    // [kBq/2][d] pairs    dO, pairs along queries     (B of dV += Pᵀ·dO)
  float* st;    // [kBk][kBq]          scores -> P (fp32)
  float* dpt;   // [kBk][kBq]          dPᵀ
  bf16* pq;     // [kBk][kBq]          P as bf16, pairs along queries      (A of dV)
  bf16* dsq;    // [kBk][kBq]          dS·scale as bf16, pairs along queries (A of dK)
  bf16* dsk;    // [kBk/2][kBq] pairs  dS·scale, pairs along keys          (A of dQ)
  float* lse2;  // [kBq] lse in base 2; +inf for queries without keys and pads
  float* Dv;    // [kBq] D_i = dout_i · o_i (fp32)
  static int64_t floats(int64_t d) {
    return 2 * d * kBq + 2 * kBk * kBq + 3 * kBk * kBq / 2 + 2 * kBq;
  }
  BackwardScratch(float* s, int64_t d) {
    qp = reinterpret_cast<bf16*>(s), s += d * kBq / 2;
    dop = reinterpret_cast<bf16*>(s), s += d * kBq / 2;
    qi = reinterpret_cast<bf16*>(s), s += d * kBq / 2;
    doi = reinterpret_cast<bf16*>(s), s += d * kBq / 2;
    st = s, s += kBk * kBq;
    dpt = s, s += kBk * kBq;
    pq = reinterpret_cast<bf16*>(s), s += kBk * kBq / 2;
    dsq = reinterpret_cast<bf16*>(s), s += kBk * kBq / 2;
    dsk = reinterpret_cast<bf16*>(s), s += kBk * kBq / 2;
    lse2 = s, s += kBq;
    Dv = s;
  }
};

void backward_query_tile(const AttentionBf16BackwardParams& p, const Geometry& G,
                         const std::vector<PosRange>& key_ranges, const bf16* k_pairs, int64_t h,
                         int64_t i0, int64_t nq, float* scratch) {
  const int64_t d = G.d, bq = (nq + 15) / 16 * 16;
  const BackwardScratch S(scratch, d);
  alignas(64) int64_t q_lanes[kBq];
  alignas(64) int64_t ds_lanes[kBq];  // document starts (with documents only)

  const bf16* q = p.q + i0 * G.q_stride + h * d;
  const float* dout = p.dout + i0 * G.q_stride + h * d;
  const bf16* o = p.o + i0 * G.q_stride + h * d;
  float* dq = p.dq + i0 * G.q_stride + h * d;
  pack_cols_transposed(q, G.q_stride, nq, bq, d, S.qp);
  pack_cols_transposed(dout, G.q_stride, nq, bq, d, S.dop);
  pack_rows(q, G.q_stride, nq, bq / 2, d, S.qi);
  pack_rows(dout, G.q_stride, nq, bq / 2, d, S.doi);
  const PosRange qr = load_query_positions(p.q_pos + i0, nq, bq, q_lanes);
  const bool docs = p.q_doc_pos != nullptr;
  const PosRange ds =
      docs ? load_query_doc_starts(p.q_pos + i0, p.q_doc_pos + i0, nq, bq, ds_lanes) : PosRange{};
  for (int64_t i = 0; i < bq; ++i) {
    // +inf makes P = 2^(s - inf) = 0 for pads and for a query that saw no key (lse = -inf).
    const float lse = i < nq ? p.lse[(i0 + i) * G.n_heads + h] : kNegInf;
    S.lse2[i] = lse == kNegInf ? kPosInf : lse * kLog2e;
    float D = 0.f;
    for (int64_t c = 0; i < nq && c < d; ++c)
      D += dout[i * G.q_stride + c] * float(o[i * G.q_stride + c]);
    S.Dv[i] = D;
  }

  const int64_t hk = h / G.group, kv_off = hk * d;
  const int64_t n2 = (p.n_k + 1) / 2;
  const float mult = p.scale * kLog2e;
  const __m512 scale = _mm512_set1_ps(p.scale);
  for (int64_t kt = 0; kt < static_cast<int64_t>(key_ranges.size()); ++kt) {
    const TileMask tm = classify_tile(key_ranges[kt], qr, docs ? &ds : nullptr);
    if (tm.skip) continue;
    const int64_t j0 = kt * kBk, nk = std::min(kBk, p.n_k - j0), nk2 = (nk + 1) / 2;
    const bf16* k = p.k + j0 * G.kv_stride + kv_off;
    const bf16* v = p.v + j0 * G.kv_stride + kv_off;
    float* dk = p.dk + j0 * G.kv_stride + kv_off;
    float* dv = p.dv + j0 * G.kv_stride + kv_off;

    // Pᵀ [nk][bq] = 2^(scale·log2e·K·Qᵀ - lse2), masked entries 0; also as bf16 rows.
    tile_gemm(nk, bq, d / 2, k, G.kv_stride, 2, S.qp, 2 * bq, S.st, bq, false);
    const bool masked = tm.masked;  // as in the forward: scaled in place or on the fly
    if (masked)
      scale_and_mask(S.st, nk, bq, mult, p.k_pos + j0, q_lanes, docs ? ds_lanes : nullptr);
    const __m512 cs = _mm512_set1_ps(masked ? 1.f : mult);
    for (int64_t j = 0; j < nk; ++j)
      for (int64_t vq = 0; vq < bq; vq += 16) {
        float* s = S.st + j * bq + vq;
        const __m512 P =
            exp2_ps(_mm512_fmsub_ps(cs, _mm512_loadu_ps(s), _mm512_loadu_ps(S.lse2 + vq)));
        _mm512_storeu_ps(s, P);
        store_rounded(S.pq + j * bq + vq, P);
      }
    // dV [nk, d] += Pᵀ [nk, nq] · dO [nq, d]   (reduction over query pairs)
    tile_gemm(nk, d, bq / 2, S.pq, bq, 2, S.doi, 2 * d, dv, G.kv_stride, true);
    // dPᵀ [nk][bq] = V [nk, d] · dOᵀ [d, bq]
    tile_gemm(nk, bq, d / 2, v, G.kv_stride, 2, S.dop, 2 * bq, S.dpt, bq, false);
    // dSᵀ · scale = Pᵀ ∘ (dPᵀ - D) · scale, as bf16 pairs along queries (dsq) and keys (dsk).
    for (int64_t j2 = 0; j2 < nk2; ++j2)
      for (int64_t vq = 0; vq < bq; vq += 16) {
        __m512 ds[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t e = 0; e < 2 && 2 * j2 + e < nk; ++e) {
          const int64_t j = 2 * j2 + e;
          const __m512 P = _mm512_loadu_ps(S.st + j * bq + vq);
          const __m512 diff =
              _mm512_sub_ps(_mm512_loadu_ps(S.dpt + j * bq + vq), _mm512_loadu_ps(S.Dv + vq));
          ds[e] = _mm512_mul_ps(_mm512_mul_ps(P, diff), scale);
          store_rounded(S.dsq + j * bq + vq, ds[e]);
        }
        _mm512_storeu_si512(S.dsk + 2 * (j2 * bq + vq), round_interleave(ds[0], ds[1]));
      }
    // dK [nk, d] += dSᵀ [nk, nq] · Q [nq, d]   (scale already in dS)
    tile_gemm(nk, d, bq / 2, S.dsq, bq, 2, S.qi, 2 * d, dk, G.kv_stride, true);
    // dQ [nq, d] += dS [nq, nk] · K [nk, d]
    tile_gemm(nq, d, nk2, S.dsk, 2, 2 * bq, k_pairs + (hk * n2 + kt * kBk / 2) * 2 * d, 2 * d, dq,
              G.q_stride, true);
  }
}

}  // namespace

bool bf16_fast_path_available(int64_t head_dim) {
  static const bool cpu_has_bf16 = __builtin_cpu_supports("avx512bf16");
  return cpu_has_bf16 && head_dim % 32 == 0;
}

void forward_fast_bf16(const AttentionBf16Params& p) {
  const Geometry G(p);
  const std::vector<PosRange> key_ranges = block_ranges(p.k_pos, p.n_k, kBk);
  const Tensor v_pairs = pack_keys(p.v, p.n_k, p.n_kv_heads, G.d);
  const int64_t n_qt = (p.n_q + kBq - 1) / kBq, items = G.n_heads * n_qt;
  const int threads = static_cast<int>(std::min<int64_t>(compute_threads(), items));
  const int64_t per_thread = ForwardScratch::floats(G.d);
  Tensor scratch = Tensor::f32({threads, per_thread}, MemCategory::Workspace);
  const bf16* vp = v_pairs.data_as<bf16>();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t item = 0; item < items; ++item) {
    // Last query tiles first: under a causal mask they see the most keys (balances threads).
    const int64_t h = item % G.n_heads, qt = n_qt - 1 - item / G.n_heads;
    const int64_t i0 = qt * kBq, nq = std::min(kBq, p.n_q - i0);
    forward_query_tile(p, G, key_ranges, vp, h, i0, nq,
                       scratch.f32() + thread_index() * per_thread);
  }
}

void backward_fast_bf16(const AttentionBf16BackwardParams& p) {
  const Geometry G(p);
  const std::vector<PosRange> key_ranges = block_ranges(p.k_pos, p.n_k, kBk);
  const Tensor k_pairs = pack_keys(p.k, p.n_k, p.n_kv_heads, G.d);
  const int64_t n_qt = (p.n_q + kBq - 1) / kBq;
  // Threads split the kv heads: each owns dk, dv of its kv head and dq of its query heads.
  const int threads = static_cast<int>(std::min<int64_t>(compute_threads(), p.n_kv_heads));
  const int64_t per_thread = BackwardScratch::floats(G.d);
  Tensor scratch = Tensor::f32({threads, per_thread}, MemCategory::Workspace);
  const bf16* kp = k_pairs.data_as<bf16>();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t hk = 0; hk < p.n_kv_heads; ++hk) {
    float* s = scratch.f32() + thread_index() * per_thread;
    for (int64_t h = hk * G.group; h < (hk + 1) * G.group; ++h)
      for (int64_t qt = 0; qt < n_qt; ++qt) {
        const int64_t i0 = qt * kBq, nq = std::min(kBq, p.n_q - i0);
        backward_query_tile(p, G, key_ranges, kp, h, i0, nq, s);
      }
  }
}

#else  // not built with AVX512_BF16: the widened path serves every call

bool bf16_fast_path_available(int64_t) {
  return false;
}
void forward_fast_bf16(const AttentionBf16Params& p) {
  forward_widened_bf16(p);
}
void backward_fast_bf16(const AttentionBf16BackwardParams& p) {
  backward_widened_bf16(p);
}

#endif

}  // namespace attn

void attention_forward(const AttentionBf16Params& p) {
  attn::validate(p, "attention_forward");
  if (p.n_q == 0) return;
  if (attn::bf16_fast_path_available(p.head_dim))
    attn::forward_fast_bf16(p);
  else
    attn::forward_widened_bf16(p);
}

void attention_backward(const AttentionBf16BackwardParams& p) {
  attn::validate_backward(p);
  if (p.n_q == 0 || p.n_k == 0) return;  // nothing is visible: every gradient is 0, += adds nothing
  if (attn::bf16_fast_path_available(p.head_dim))
    attn::backward_fast_bf16(p);
  else
    attn::backward_widened_bf16(p);
}

// attention_merge's arithmetic on the widened rows, o_a rounded once.
void attention_merge(bf16* o_a, float* lse_a, const bf16* o_b, const float* lse_b, int64_t n_q,
                     int64_t n_heads, int64_t head_dim) {
  TSP_CHECK(n_q >= 0 && n_heads >= 1 && head_dim >= 1,
            "attention_merge: n_q={}, n_heads={}, head_dim={} must be >= 0, >= 1, >= 1", n_q,
            n_heads, head_dim);
  std::vector<float> a(head_dim), b(head_dim);
  for (int64_t r = 0; r < n_q * n_heads; ++r) {
    const float la = lse_a[r], lb = lse_b[r];
    bf16* oa = o_a + r * head_dim;
    const bf16* ob = o_b + r * head_dim;
    const float m = std::max(la, lb);
    if (m == attn::kNegInfF) {  // neither side saw a key
      std::fill(oa, oa + head_dim, bf16());
      continue;
    }
    // One side empty: the other is the answer, bit for bit (an empty side's o is never read).
    if (lb == attn::kNegInfF) continue;
    if (la == attn::kNegInfF) {
      std::copy(ob, ob + head_dim, oa);
      lse_a[r] = lb;
      continue;
    }
    convert_bf16_to_f32(oa, a.data(), head_dim);
    convert_bf16_to_f32(ob, b.data(), head_dim);
    const float wa = std::exp(la - m), wb = std::exp(lb - m);  // one of them is 1
    const float inv = 1.f / (wa + wb);
    for (int64_t c = 0; c < head_dim; ++c) a[c] = (wa * a[c] + wb * b[c]) * inv;
    convert_f32_to_bf16(a.data(), oa, head_dim);
    lse_a[r] = m + std::log(wa + wb);
  }
}

}  // namespace tsp
