// Pieces shared by the AVX-512 attention paths, fp32 (attention_fast.cpp) and bf16
// (attention_bf16.cpp): tile sizes, the exp2 polynomial, position ranges of tiles, the causal mask
// on a transposed score tile. Only included where __AVX512F__ is defined.
#pragma once

#if !defined(__AVX512F__)
#error "attention_avx512.h needs AVX-512F"
#endif

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace tsp::attn::avx512 {

inline constexpr int64_t kBq = 64;  // queries per tile (4 vectors of 16 lanes)
inline constexpr int64_t kBk = 64;  // keys per tile
inline constexpr float kLog2e = 1.44269504088896340736f;
inline constexpr float kLn2 = 0.69314718055994530942f;
inline constexpr float kNegInf = -std::numeric_limits<float>::infinity();
inline constexpr float kPosInf = std::numeric_limits<float>::infinity();

// 2^x. Range reduction x = n + f, n = round(x), |f| <= 1/2, then e^{r}, r = f·ln2 in
// [-ln2/2, ln2/2] by the Cephes expf minimax polynomial, and 2^n applied exactly by vscalefps.
// Relative error <= 2e-7 (measured in attention_test against std::exp2). Lanes with x < -126
// (including -inf) return exactly 0: the largest term of a softmax row is 2^0 = 1, so they weigh
// < 2^-126 of it, and no denormal is ever produced.
inline __m512 exp2_ps(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_mul_ps(_mm512_sub_ps(x, n), _mm512_set1_ps(kLn2));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  // e^r ≈ 1 + r + r²·p(r)
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.f), _CMP_GE_OQ);
  return _mm512_maskz_scalef_ps(keep, p, n);
}

struct PosRange {
  int64_t min = std::numeric_limits<int64_t>::max();
  int64_t max = std::numeric_limits<int64_t>::min();
};

// [ceil(n / block)] min and max position of each block: decides skip / no-mask / mask per tile.
inline std::vector<PosRange> block_ranges(const int64_t* pos, int64_t n, int64_t block) {
  std::vector<PosRange> out((n + block - 1) / block);
  for (int64_t i = 0; i < n; ++i) {
    PosRange& r = out[i / block];
    r.min = std::min(r.min, pos[i]);
    r.max = std::max(r.max, pos[i]);
  }
  return out;
}

// Shapes shared by every tile of one call.
struct Geometry {
  int64_t d, n_heads, group, q_stride, kv_stride;
  template <class Params>  // AttentionParams or AttentionBf16Params
  explicit Geometry(const Params& p)
      : d(p.head_dim),
        n_heads(p.n_heads),
        group(p.n_heads / p.n_kv_heads),
        q_stride(p.n_heads * p.head_dim),
        kv_stride(p.n_kv_heads * p.head_dim) {}
};

// The query tile's positions as lanes (pads: INT64_MIN sees no key), and its real min / max.
inline PosRange load_query_positions(const int64_t* q_pos, int64_t nq, int64_t bq, int64_t* lanes) {
  PosRange r;
  for (int64_t i = 0; i < bq; ++i) {
    lanes[i] = i < nq ? q_pos[i] : std::numeric_limits<int64_t>::min();
    if (i < nq) r.min = std::min(r.min, lanes[i]), r.max = std::max(r.max, lanes[i]);
  }
  return r;
}

// With documents (q_doc_pos non-null) each query also has a lower bound: the global position where
// its document starts, q_pos - q_doc_pos. Lanes of the tile's queries (pads: INT64_MAX, though the
// pads' q lane already hides every key) and the real lanes' min / max. Without documents nothing is
// loaded: the callers keep the causal-only path, bit for bit.
inline PosRange load_query_doc_starts(const int64_t* q_pos, const int64_t* q_doc_pos, int64_t nq,
                                      int64_t bq, int64_t* lanes) {
  PosRange r;
  for (int64_t i = 0; i < bq; ++i) {
    lanes[i] = i < nq ? q_pos[i] - q_doc_pos[i] : std::numeric_limits<int64_t>::max();
    if (i < nq) r.min = std::min(r.min, lanes[i]), r.max = std::max(r.max, lanes[i]);
  }
  return r;
}

// What a key tile is to a query tile: skipped (no query sees any key: every key is after every
// query, or before every query's document start), fully visible (no element-wise mask), or masked.
struct TileMask {
  bool skip = false, masked = false;
};
// kr: the key tile's positions; qr: the query tile's; ds: its document starts (nullptr: none).
inline TileMask classify_tile(const PosRange& kr, const PosRange& qr, const PosRange* ds) {
  TileMask t;
  t.skip = kr.min > qr.max || (ds && kr.max < ds->min);
  t.masked = kr.max > qr.min || (ds && kr.min < ds->max);
  return t;
}

// The 16 lanes [v, v + 16) of a key at kp that a query cannot see: after it (kp > q_pos), or
// before its document's start (kp < doc_start; only with documents, ds_lanes non-null).
inline __mmask16 hidden_lanes(__m512i kp, const int64_t* q_lanes, const int64_t* ds_lanes,
                              int64_t v) {
  __mmask8 lo = _mm512_cmpgt_epi64_mask(kp, _mm512_loadu_si512(q_lanes + v));
  __mmask8 hi = _mm512_cmpgt_epi64_mask(kp, _mm512_loadu_si512(q_lanes + v + 8));
  if (ds_lanes) {
    lo |= _mm512_cmplt_epi64_mask(kp, _mm512_loadu_si512(ds_lanes + v));
    hi |= _mm512_cmplt_epi64_mask(kp, _mm512_loadu_si512(ds_lanes + v + 8));
  }
  return static_cast<__mmask16>(lo | (hi << 8));
}

// Sᵀ[j][i] = -inf where query i cannot see key j (hidden_lanes). Sᵀ [nk][bq].
inline void apply_causal_mask(float* st, int64_t nk, int64_t bq, const int64_t* k_pos,
                              const int64_t* q_lanes, const int64_t* ds_lanes = nullptr) {
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  for (int64_t j = 0; j < nk; ++j) {
    const __m512i kp = _mm512_set1_epi64(k_pos[j]);
    for (int64_t v = 0; v < bq; v += 16) {
      const __mmask16 hidden = hidden_lanes(kp, q_lanes, ds_lanes, v);
      float* s = st + j * bq + v;
      _mm512_storeu_ps(s, _mm512_mask_mov_ps(_mm512_loadu_ps(s), hidden, neg_inf));
    }
  }
}

inline int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

}  // namespace tsp::attn::avx512
