// The tile-level masking rules of the flash attention kernels (v1: attention_flash.cu, v2:
// attention_flash_v2.cu) and v2's walk over its tile bitmasks (next_set, at the end), as host /
// device functions so that the CPU can check them
// (tests/backend/attention_tile_rules_test.cpp compares them with brute force over every pair of
// rows; no GPU needed). Plain C++ outside nvcc: no CUDA header, no device code.
//
// Query i sees key j iff s_i <= k_pos[j] <= q_pos[i], where s_i = q_pos[i] - q_doc_pos[i] is the
// start of query i's document (without documents: no lower bound). A pair (query tile, key tile)
// is decided from bounds of the two tiles:
//   needed  some key may be visible to some query. Must hold whenever a pair is visible: skipping
//           a tile with a visible pair loses that pair (a wrong result); a needless tile only
//           costs time (it is then masked element-wise). Exact without documents.
//   full    every query sees every key: the kernel drops the element-wise mask. Must hold only
//           when every pair of the two tiles is a real, visible one: rows past the end (padding)
//           would enter the softmax unmasked (a wrong result).
// Rows past the end carry sentinels: queries kNoQuery (below every key: they see nothing, and no
// max takes them), keys kNoKey (above every query: seen by nothing, and no min takes them),
// document starts kNoKey (no min takes them). A padded tile's min (queries) or max (keys, document
// starts) is then the sentinel, which makes `full` false. Real positions and document starts must
// lie strictly between the sentinels (INT64_MIN < p < INT64_MAX).
#pragma once

#include <cstdint>

#include "backend/cuda/host_device.h"

namespace tsp::cuda::attn::flash {

constexpr int64_t kNoQuery = INT64_MIN;  // position of a query row past the end: sees nothing
constexpr int64_t kNoKey = INT64_MAX;    // position of a key row past the end: seen by nothing

// ---- rows -------------------------------------------------------------------------------------

// Query row i (real: i < nq), key row i (real: i < nk), and the document start of a query row
// whose position is q_pos (real: i < nq; q_pos is then q_pos[i]). Past the end: the sentinels;
// the arrays are not read there.
TSP_HD inline int64_t query_row(const int64_t* q_pos, int64_t i, bool real) {
  return real ? q_pos[i] : kNoQuery;
}
TSP_HD inline int64_t key_row(const int64_t* k_pos, int64_t i, bool real) {
  return real ? k_pos[i] : kNoKey;
}
TSP_HD inline int64_t doc_start_row(int64_t q_pos, const int64_t* q_doc_pos, int64_t i, bool real) {
  return real ? q_pos - q_doc_pos[i] : kNoKey;
}

// ---- tile bounds ------------------------------------------------------------------------------

struct TileBounds {
  int64_t lo, hi;  // min, max over the rows (an empty set: lo = INT64_MAX, hi = INT64_MIN)
};

// What a padded array holds: query positions, key positions or document starts (q_pos - q_doc_pos).
enum class Rows { kQueries, kKeys, kDocStarts };

// Rows r0, r0 + stride, ... < tile of tile t (rows t·tile + r of an array of n rows: pos, or with
// Rows::kDocStarts pos - doc_pos), rows past n as their sentinel: each row's value goes to
// padded[t·tile + r], and their min / max is returned. v2's tile_bounds_kernel: one lane's share
// (r0 = lane, stride 32; the warp then reduces); stride 1: the whole tile.
TSP_HD inline TileBounds tile_rows(Rows kind, const int64_t* pos, const int64_t* doc_pos, int64_t n,
                                   int tile, int t, int r0, int stride, int64_t* padded) {
  TileBounds b{INT64_MAX, INT64_MIN};
  for (int r = r0; r < tile; r += stride) {
    const int64_t i = int64_t{t} * tile + r;
    const bool real = i < n;
    const int64_t p = kind == Rows::kQueries ? query_row(pos, i, real)
                      : kind == Rows::kKeys  ? key_row(pos, i, real)
                                             : doc_start_row(real ? pos[i] : 0, doc_pos, i, real);
    padded[i] = p;
    b.lo = b.lo < p ? b.lo : p;
    b.hi = b.hi > p ? b.hi : p;
  }
  return b;
}

// ---- decisions --------------------------------------------------------------------------------

// A query tile with positions <= q_max and document starts >= s_min against a key tile with
// positions in [k_min, k_max]: needed unless no pair can be visible. A visible pair (i, j) has
// s_min <= s_i <= k_pos[j] <= q_pos[i] <= q_max and k_min <= k_pos[j] <= k_max, so the ranges
// [k_min, k_max] and [s_min, q_max] meet. Without documents (DOCS false, s_min unused) the test
// k_min <= q_max is exact (the query at q_max sees the key at k_min); with documents it is
// conservative (the ranges may meet with no key in any one query's [s_i, q_pos[i]]).
// v2: the tiles' bounds. v1 forward: one key at a time (k_min = k_max = its position), the block
// ORs over the key tile's rows; v1 backward: one query at a time (q_max = its position, s_min its
// document start), ORed over the query tile's rows.
template <bool DOCS>
TSP_HD inline bool tile_needed(int64_t q_max, int64_t s_min, int64_t k_min, int64_t k_max) {
  return k_min <= q_max && (!DOCS || k_max >= s_min);
}

// Full: every query (positions >= q_min, document starts <= s_max) sees every key of [k_min,
// k_max]: k_max <= q_min <= q_pos[i] and k_min >= s_max >= s_i. Exact when no row is padding;
// padding (q_min = kNoQuery, k_max = kNoKey, s_max = kNoKey) makes it false. v1: ANDed over the
// rows like tile_needed's OR.
template <bool DOCS>
TSP_HD inline bool tile_full(int64_t q_min, int64_t s_max, int64_t k_min, int64_t k_max) {
  return k_max <= q_min && (!DOCS || k_min >= s_max);
}

// ---- v2's tile bitmasks ------------------------------------------------------------------------

// v2's blocks keep one bit per tile (needed, full) in shared memory: bit t % 32 of word t / 32,
// set by one ballot per 32 tiles (build_masks, attention_flash_v2.cu), bits past the last tile
// clear. 256 words: 8192 tiles (flash_v2_supported refuses more; attention.cpp then takes v1).
constexpr int kMaskWords = 256;

// Whether tile j's bit is set.
TSP_HD inline bool mask_bit(const uint32_t* mask, int j) {
  return (mask[j >> 5] >> (j & 31)) & 1u;
}

// The first tile >= j whose bit is set in mask[0, ceil(n_tiles / 32)), or n_tiles if none (also
// for j >= n_tiles); bits past n_tiles must be clear. The kernels walk their needed tiles with it.
TSP_HD inline int next_set(const uint32_t* mask, int j, int n_tiles) {
  const int n_words = (n_tiles + 31) / 32;
  int w = j >> 5;
  if (w >= n_words) return n_tiles;
  uint32_t bits = mask[w] & (0xffffffffu << (j & 31));
  while (bits == 0) {
    if (++w >= n_words) return n_tiles;
    bits = mask[w];
  }
#ifdef __CUDA_ARCH__
  return w * 32 + __ffs(static_cast<int>(bits)) - 1;
#else
  return w * 32 + __builtin_ctz(bits);
#endif
}

}  // namespace tsp::cuda::attn::flash
