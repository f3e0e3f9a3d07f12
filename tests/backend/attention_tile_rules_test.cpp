// The tile-level decisions of the flash attention kernels (src/backend/cuda/attention_tile_rules.h:
// row sentinels, tile bounds, tile_needed, tile_full), checked on the CPU against brute force over
// every pair of rows, for both versions' ways of combining them and their tile sizes; and v2's walk
// over its tile bitmasks (next_set, mask_bit) against the set tiles. The header is
// plain C++ here (no CUDA): this test runs in every build, the sanitizer build included.
//
// What must hold, per (query tile, key tile), over the real rows i (< nq) and j (< nk) of the two
// tiles, with visible(i, j) = s_i <= k_pos[j] <= q_pos[i] (s_i = q_pos[i] - q_doc_pos[i]; without
// documents no lower bound):
//   1. some visible pair  =>  needed. A skipped tile loses its visible pairs: a wrong result.
//   2. without documents: needed  =>  some visible pair (the rule is exact, as its comments say;
//      with documents it is conservative by design, a needless tile only costs time: only 1 holds).
//   3. full  =>  no padding row in either tile and every pair visible. Full drops the element-wise
//      mask: a hidden pair or a padding row (zero K row: score 0, weight e^-m) would enter the
//      softmax, a wrong result.
//   4. no padding and every pair visible  =>  full (the rules' documented exactness; a miss only
//      costs the element-wise mask).
// How each kernel combines the header's functions (mirrored by decide() below):
//   v1 forward   query tile bounds (min / max over query_row, doc_start_row of its rows); per key
//                row key_row, tile_needed / tile_full with k_min = k_max = that key, ORed / ANDed
//                over the key tile's rows by __syncthreads_or / _and (padding keys included);
//   v1 backward  key tile bounds over key_row; per query row, tile_needed / tile_full with q_max =
//                q_min = its position, s_min = s_max = its start, ORed / ANDed over the query
//                tile's rows (padding queries included);
//   v2           tile bounds from tile_rows (one lane's rows, then the warp's min / max), the
//                predicates on the two tiles' bounds; full only where needed (build_masks).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "backend/cuda/attention_tile_rules.h"

namespace tsp::cuda::attn::flash {
namespace {

struct Case {
  std::string name;
  std::vector<int64_t> q_pos, k_pos;
  std::vector<int64_t> q_doc_pos;  // empty: no documents
  bool docs() const { return !q_doc_pos.empty(); }
};

// The semantics (attention.h), written from the definition, not from the header.
bool visible(const Case& c, size_t i, size_t j) {
  const int64_t q = c.q_pos[i], k = c.k_pos[j];
  return k <= q && (!c.docs() || q - c.q_doc_pos[i] <= k);
}

enum class Kernel { kV1Forward, kV1Backward, kV2 };
struct Tiling {
  const char* name;
  Kernel kernel;
  int br, bc;  // rows of a query tile, of a key tile
};
// The kernels' tiles (attention_flash.cu: kFwdBR, kFwdBC, bwd_br<D>, kBwdBC; attention_flash_v2.cu:
// kFwdBR, kFwdBC, bwd_br, kBwdBC), and small ones, which put many more tile pairs, and padding,
// into the same cases (the rules depend on no tile size).
// clang-format off
constexpr Tiling kTilings[] = {
    {"v1 forward 128x64",        Kernel::kV1Forward,  128, 64},
    {"v1 backward d=64 64x64",   Kernel::kV1Backward, 64,  64},
    {"v1 backward d=128 32x64",  Kernel::kV1Backward, 32,  64},
    {"v2 forward 128x64",        Kernel::kV2,         128, 64},
    {"v2 backward 32x128",       Kernel::kV2,         32,  128},
    {"v1 forward 5x3",           Kernel::kV1Forward,  5,   3},
    {"v1 backward 3x5",          Kernel::kV1Backward, 3,   5},
    {"v2 7x5",                   Kernel::kV2,         7,   5},
};
// clang-format on

struct Decision {
  bool need, full;
};

// Per-tile bounds as v2's launcher computes them (tile_bounds_kernel: lane l takes rows l, l + 32,
// ..., then the warp's min / max), with the padded copy, which must equal the rows' values.
struct Bounds {
  std::vector<TileBounds> tiles;
  std::vector<int64_t> padded;
};
Bounds v2_bounds(Rows kind, const std::vector<int64_t>& pos, const std::vector<int64_t>* doc_pos,
                 int tile) {
  const int64_t n = static_cast<int64_t>(pos.size());
  const int n_tiles = static_cast<int>((n + tile - 1) / tile);
  Bounds b;
  b.padded.assign(static_cast<size_t>(n_tiles) * tile, 0);
  for (int t = 0; t < n_tiles; ++t) {
    TileBounds w{INT64_MAX, INT64_MIN};
    for (int lane = 0; lane < 32; ++lane) {
      const TileBounds l = tile_rows(kind, pos.data(), doc_pos ? doc_pos->data() : nullptr, n, tile,
                                     t, lane, 32, b.padded.data());
      w.lo = std::min(w.lo, l.lo);
      w.hi = std::max(w.hi, l.hi);
    }
    b.tiles.push_back(w);
  }
  return b;
}

// The decisions of every tile pair of one case under one tiling: [qt][kt].
template <bool DOCS>
std::vector<std::vector<Decision>> decide(const Case& c, const Tiling& tl) {
  const int64_t nq = static_cast<int64_t>(c.q_pos.size()),
                nk = static_cast<int64_t>(c.k_pos.size());
  const int n_qt = static_cast<int>((nq + tl.br - 1) / tl.br);
  const int n_kt = static_cast<int>((nk + tl.bc - 1) / tl.bc);
  std::vector<std::vector<Decision>> d(n_qt, std::vector<Decision>(n_kt));
  if (tl.kernel == Kernel::kV2) {
    const Bounds q = v2_bounds(Rows::kQueries, c.q_pos, nullptr, tl.br);
    const Bounds k = v2_bounds(Rows::kKeys, c.k_pos, nullptr, tl.bc);
    Bounds s;  // document starts (DOCS only)
    if (DOCS) s = v2_bounds(Rows::kDocStarts, c.q_pos, &c.q_doc_pos, tl.br);
    // The padded copies travel with the tiles and feed the element-wise mask: real rows as they
    // are, the rest sentinels.
    for (int64_t i = 0; i < static_cast<int64_t>(q.padded.size()); ++i) {
      EXPECT_EQ(q.padded[i], i < nq ? c.q_pos[i] : kNoQuery) << c.name << " query row " << i;
      if (DOCS) {
        EXPECT_EQ(s.padded[i], i < nq ? c.q_pos[i] - c.q_doc_pos[i] : kNoKey)
            << c.name << " start row " << i;
      }
    }
    for (int64_t j = 0; j < static_cast<int64_t>(k.padded.size()); ++j)
      EXPECT_EQ(k.padded[j], j < nk ? c.k_pos[j] : kNoKey) << c.name << " key row " << j;
    for (int qt = 0; qt < n_qt; ++qt) {
      for (int kt = 0; kt < n_kt; ++kt) {
        const TileBounds qb = q.tiles[qt], kb = k.tiles[kt];
        const TileBounds sb = DOCS ? s.tiles[qt] : TileBounds{0, 0};
        const bool need = tile_needed<DOCS>(qb.hi, sb.lo, kb.lo, kb.hi);
        d[qt][kt] = {need, need && tile_full<DOCS>(qb.lo, sb.hi, kb.lo, kb.hi)};
      }
    }
    return d;
  }
  const int64_t* doc = DOCS ? c.q_doc_pos.data() : nullptr;
  for (int qt = 0; qt < n_qt; ++qt) {
    const int64_t q0 = int64_t{qt} * tl.br;
    const int nq_tile = static_cast<int>(std::min<int64_t>(tl.br, nq - q0));
    for (int kt = 0; kt < n_kt; ++kt) {
      const int64_t k0 = int64_t{kt} * tl.bc;
      const int nk_tile = static_cast<int>(std::min<int64_t>(tl.bc, nk - k0));
      bool any = false, all = true;
      if (tl.kernel == Kernel::kV1Forward) {
        // Query tile bounds (the block's warp reductions), then each key row.
        int64_t q_max = INT64_MIN, q_min = INT64_MAX, ds_min = 0, ds_max = 0;
        if (DOCS) ds_min = INT64_MAX, ds_max = INT64_MIN;
        for (int r = 0; r < tl.br; ++r) {
          const int64_t qp = query_row(c.q_pos.data() + q0, r, r < nq_tile);
          q_max = std::max(q_max, qp), q_min = std::min(q_min, qp);
          if (DOCS) {
            const int64_t ds = doc_start_row(qp, doc + q0, r, r < nq_tile);
            ds_min = std::min(ds_min, ds), ds_max = std::max(ds_max, ds);
          }
        }
        for (int r = 0; r < tl.bc; ++r) {
          const int64_t kp = key_row(c.k_pos.data(), k0 + r, k0 + r < nk);
          any = any || tile_needed<DOCS>(q_max, ds_min, kp, kp);
          all = all && tile_full<DOCS>(q_min, ds_max, kp, kp);
        }
      } else {
        // Key tile bounds, then each query row.
        int64_t k_min = INT64_MAX, k_max = INT64_MIN;
        for (int r = 0; r < tl.bc; ++r) {
          const int64_t kp = key_row(c.k_pos.data() + k0, r, r < nk_tile);
          k_min = std::min(k_min, kp), k_max = std::max(k_max, kp);
        }
        for (int r = 0; r < tl.br; ++r) {
          const int64_t qp = query_row(c.q_pos.data() + q0, r, r < nq_tile);
          const int64_t ds = DOCS ? doc_start_row(qp, doc + q0, r, r < nq_tile) : kNoKey;
          any = any || tile_needed<DOCS>(qp, ds, k_min, k_max);
          all = all && tile_full<DOCS>(qp, ds, k_min, k_max);
        }
      }
      d[qt][kt] = {any, any && all};  // full is read only for a tile the block takes
    }
  }
  return d;
}

// How often each outcome came up, per tiling: the generator must reach every branch.
struct Counts {
  int64_t pairs = 0, skipped = 0, partial = 0, full = 0, needless = 0, padded_all_visible = 0;
};

// Checks properties 1-4 (top of the file) for every tile pair of one case under one tiling.
void check_case(const Case& c, const Tiling& tl, Counts& n) {
  const auto d = c.docs() ? decide<true>(c, tl) : decide<false>(c, tl);
  const size_t nq = c.q_pos.size(), nk = c.k_pos.size();
  for (size_t qt = 0; qt < d.size(); ++qt) {
    for (size_t kt = 0; kt < d[qt].size(); ++kt) {
      const size_t i0 = qt * tl.br, i1 = std::min(nq, i0 + tl.br);
      const size_t j0 = kt * tl.bc, j1 = std::min(nk, j0 + tl.bc);
      const bool padded =
          i1 - i0 < static_cast<size_t>(tl.br) || j1 - j0 < static_cast<size_t>(tl.bc);
      bool any = false, all = true;
      for (size_t i = i0; i < i1; ++i) {
        for (size_t j = j0; j < j1; ++j) {
          const bool v = visible(c, i, j);
          any = any || v;
          all = all && v;
        }
      }
      const Decision x = d[qt][kt];
      const std::string where = c.name + ", " + tl.name + ", query tile " + std::to_string(qt) +
                                ", key tile " + std::to_string(kt);
      // 1 (a wrong result otherwise)
      if (any) {
        EXPECT_TRUE(x.need) << where << ": a tile with a visible pair is skipped";
      }
      // 2 (exact without documents)
      if (!c.docs() && !any) {
        EXPECT_FALSE(x.need) << where << ": needless tile without documents";
      }
      // 3 (a wrong result otherwise)
      if (x.full) {
        EXPECT_FALSE(padded) << where << ": full with padding rows (they would enter unmasked)";
        EXPECT_TRUE(all) << where << ": full with a hidden pair (it would enter unmasked)";
      }
      // 4 (exactness of full)
      if (!padded && all) {
        EXPECT_TRUE(x.full) << where << ": every pair visible, yet masked";
      }
      ++n.pairs;
      n.skipped += !x.need;
      n.full += x.full;
      n.partial += x.need && !x.full;
      n.needless += x.need && !any;
      n.padded_all_visible += padded && all;
    }
  }
}

// ---- cases ------------------------------------------------------------------------------------

using Rng = std::mt19937_64;
int64_t uniform(Rng& rng, int64_t lo, int64_t hi) {  // [lo, hi]
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}

// tsp's zigzag (docs/layouts.md): S cut into 2D chunks, rank p holds chunks p and 2D-1-p.
std::vector<int64_t> zigzag_positions(int64_t S, int D, int p) {
  const int64_t c = S / (2 * D);
  std::vector<int64_t> v;
  for (int64_t x = 0; x < c; ++x) v.push_back(p * c + x);
  for (int64_t x = 0; x < c; ++x) v.push_back((2 * D - 1 - p) * c + x);
  return v;
}

// Documents on the position axis: cut points at random; a query's document starts at the last cut
// at or below its position (the first document at `lo`, the lowest position).
std::vector<int64_t> packed_doc_pos(Rng& rng, const std::vector<int64_t>& q_pos, int64_t lo,
                                    int64_t span) {
  std::vector<int64_t> cuts{lo};
  // One document in a third of the rows (so that whole tile pairs can be fully visible).
  const int n_cuts = uniform(rng, 0, 2) == 0 ? 0 : static_cast<int>(uniform(rng, 1, 12));
  for (int x = 0; x < n_cuts; ++x) cuts.push_back(lo + uniform(rng, 0, span));
  std::sort(cuts.begin(), cuts.end());
  std::vector<int64_t> d;
  for (const int64_t p : q_pos)
    d.push_back(p - *(std::upper_bound(cuts.begin(), cuts.end(), p) - 1));
  return d;
}

// Arbitrary document starts: each query's start anywhere in [lo, q_pos] (and often the query
// itself, which then sees only keys at its own position).
std::vector<int64_t> random_doc_pos(Rng& rng, const std::vector<int64_t>& q_pos, int64_t lo) {
  std::vector<int64_t> d;
  for (const int64_t p : q_pos) d.push_back(uniform(rng, 0, 3) == 0 ? 0 : uniform(rng, 0, p - lo));
  return d;
}

// One random case: positions of one of several families, at an offset near 0 or near 2^40, with or
// without documents. n is rarely a multiple of a tile, so padding rows are common.
Case random_case(Rng& rng, int id) {
  Case c;
  const int64_t base = uniform(rng, 0, 1) ? 0 : (int64_t{1} << 40) + uniform(rng, 0, 1000);
  const int family = static_cast<int>(uniform(rng, 0, 5));
  int64_t span = 0;  // positions lie in [base, base + span]
  auto n = [&] {
    return uniform(rng, 0, 5) == 0 ? 128 * uniform(rng, 1, 2) : uniform(rng, 1, 260);
  };
  switch (family) {
    case 0: {  // self-attention, sorted and contiguous (one rank's whole row)
      const int64_t m = n();
      for (int64_t x = 0; x < m; ++x) c.q_pos.push_back(base + x);
      c.k_pos = c.q_pos;
      span = m;
      c.name = "sorted";
      break;
    }
    case 1: {  // zigzag queries of rank p against the gathered keys of all ranks (tsp, sp)
      const int D = static_cast<int>(uniform(rng, 1, 4)),
                p = static_cast<int>(uniform(rng, 0, D - 1));
      const int64_t S = 2 * D * uniform(rng, 1, 40);
      for (const int64_t x : zigzag_positions(S, D, p)) c.q_pos.push_back(base + x);
      for (int r = 0; r < D; ++r)
        for (const int64_t x : zigzag_positions(S, D, r)) c.k_pos.push_back(base + x);
      span = S;
      c.name = "zigzag gathered";
      break;
    }
    case 2: {  // zigzag queries of rank p against one K/V round of rank r (past, future or both)
      const int D = static_cast<int>(uniform(rng, 1, 4));
      const int p = static_cast<int>(uniform(rng, 0, D - 1)),
                r = static_cast<int>(uniform(rng, 0, D - 1));
      const int64_t S = 2 * D * uniform(rng, 1, 60);
      for (const int64_t x : zigzag_positions(S, D, p)) c.q_pos.push_back(base + x);
      for (const int64_t x : zigzag_positions(S, D, r)) c.k_pos.push_back(base + x);
      span = S;
      c.name = "zigzag round";
      break;
    }
    case 3: {  // shuffled permutations (nothing sorted)
      const int64_t m = n(), mk = uniform(rng, 0, 1) ? m : n();
      for (int64_t x = 0; x < m; ++x) c.q_pos.push_back(base + x);
      for (int64_t x = 0; x < mk; ++x) c.k_pos.push_back(base + x);
      std::shuffle(c.q_pos.begin(), c.q_pos.end(), rng);
      std::shuffle(c.k_pos.begin(), c.k_pos.end(), rng);
      span = std::max(m, mk);
      c.name = "shuffled";
      break;
    }
    case 4: {  // random positions with duplicates, in a narrow or a wide range
      span = uniform(rng, 0, 1) ? 40 : 100000;
      const int64_t m = n(), mk = n();
      for (int64_t x = 0; x < m; ++x) c.q_pos.push_back(base + uniform(rng, 0, span));
      for (int64_t x = 0; x < mk; ++x) c.k_pos.push_back(base + uniform(rng, 0, span));
      c.name = "random";
      break;
    }
    default: {  // sorted runs with a gap: keys from before, inside and after the queries' range
      const int64_t m = n(), mk = n(), shift = uniform(rng, -300, 300);
      for (int64_t x = 0; x < m; ++x) c.q_pos.push_back(base + 300 + x);
      for (int64_t x = 0; x < mk; ++x) c.k_pos.push_back(base + 300 + shift + x);
      if (uniform(rng, 0, 1)) std::reverse(c.k_pos.begin(), c.k_pos.end());
      span = 900;
      c.name = "shifted";
      break;
    }
  }
  const int docs = static_cast<int>(uniform(rng, 0, 2));  // none, packed, arbitrary starts
  if (docs == 1) c.q_doc_pos = packed_doc_pos(rng, c.q_pos, base, span);
  if (docs == 2) c.q_doc_pos = random_doc_pos(rng, c.q_pos, base);
  c.name += std::string(docs == 0   ? ""
                        : docs == 1 ? " packed documents"
                                    : " random starts") +
            " (case " + std::to_string(id) + ", nq " + std::to_string(c.q_pos.size()) + ", nk " +
            std::to_string(c.k_pos.size()) + ")";
  return c;
}

// ---- tests ------------------------------------------------------------------------------------

TEST(AttentionTileRules, RowsPastTheEndAreSentinelsAndAreNotRead) {
  // One element each: a read at index 5 would be out of bounds (ASan in the sanitizer build).
  const std::vector<int64_t> pos{7}, doc{3};
  EXPECT_EQ(query_row(pos.data(), 0, true), 7);
  EXPECT_EQ(key_row(pos.data(), 0, true), 7);
  EXPECT_EQ(doc_start_row(7, doc.data(), 0, true), 4);
  EXPECT_EQ(query_row(pos.data(), 5, false), kNoQuery);
  EXPECT_EQ(key_row(pos.data(), 5, false), kNoKey);
  EXPECT_EQ(doc_start_row(kNoQuery, doc.data(), 5, false), kNoKey);
  // A padded query sees no key and a padded key is seen by no query, whatever the real positions
  // (strictly between the sentinels): as tiles of one row, never needed, never full.
  for (const int64_t p :
       {INT64_MIN + 1, int64_t{-1}, int64_t{0}, int64_t{1} << 40, INT64_MAX - 1}) {
    EXPECT_FALSE(tile_needed<false>(kNoQuery, 0, p, p)) << p;
    EXPECT_FALSE(tile_needed<true>(kNoQuery, kNoKey, p, p)) << p;
    EXPECT_FALSE(tile_needed<false>(p, 0, kNoKey, kNoKey)) << p;
    EXPECT_FALSE(tile_needed<true>(p, p, kNoKey, kNoKey)) << p;
    EXPECT_FALSE(tile_full<false>(kNoQuery, 0, p, p)) << p;
    EXPECT_FALSE(tile_full<true>(kNoQuery, kNoKey, p, p)) << p;
    EXPECT_FALSE(tile_full<true>(p, kNoKey, p, p)) << p;  // a padded start alone
    EXPECT_FALSE(tile_full<false>(p, 0, p, kNoKey)) << p;
  }
}

TEST(AttentionTileRules, TileBoundsSkipSentinels) {
  // Five rows (positions 5, 6, 7, 2^40, 3) in tiles with padding: each bound is the real rows'
  // but for the side the sentinel sits on (queries: min, keys and starts: max), and the padded
  // copy holds the sentinels.
  const int64_t big = int64_t{1} << 40;
  const std::vector<int64_t> pos{5, 6, 7, big, 3}, doc{0, 0, 0, 10, 3};
  std::vector<int64_t> padded(9, -1);
  // Queries, tiles of 4: tile 1 = row 4 and three padding rows.
  const TileBounds q = tile_rows(Rows::kQueries, pos.data(), nullptr, 5, 4, 1, 0, 1, padded.data());
  EXPECT_EQ(q.lo, kNoQuery);  // padded: never full
  EXPECT_EQ(q.hi, 3);
  EXPECT_EQ(padded, (std::vector<int64_t>{-1, -1, -1, -1, 3, kNoQuery, kNoQuery, kNoQuery, -1}));
  // Keys, tiles of 3: tile 1 = rows 3, 4 and one padding row.
  const TileBounds k = tile_rows(Rows::kKeys, pos.data(), nullptr, 5, 3, 1, 0, 1, padded.data());
  EXPECT_EQ(k.lo, 3);
  EXPECT_EQ(k.hi, kNoKey);  // padded: never full
  EXPECT_EQ(padded[5], kNoKey);
  // Document starts, tiles of 4: tile 0 all real, tile 1 = row 4 (start 3 - 3 = 0) and padding.
  const TileBounds s0 =
      tile_rows(Rows::kDocStarts, pos.data(), doc.data(), 5, 4, 0, 0, 1, padded.data());
  EXPECT_EQ(s0.lo, 5);
  EXPECT_EQ(s0.hi, big - 10);
  const TileBounds s1 =
      tile_rows(Rows::kDocStarts, pos.data(), doc.data(), 5, 4, 1, 0, 1, padded.data());
  EXPECT_EQ(s1.lo, 0);
  EXPECT_EQ(s1.hi, kNoKey);  // padded: never full
  EXPECT_EQ(padded, (std::vector<int64_t>{5, 6, 7, big - 10, 0, kNoKey, kNoKey, kNoKey, -1}));
  // A lane's share (r0, stride) covers rows r0, r0 + stride, ... only: rows 1 and 3.
  const TileBounds lane = tile_rows(Rows::kKeys, pos.data(), nullptr, 5, 5, 0, 1, 2, padded.data());
  EXPECT_EQ(lane.lo, 6);
  EXPECT_EQ(lane.hi, big);
}

TEST(AttentionTileRules, DocumentBoundIsConservative) {
  // Two queries in different documents: (position 10, start 10), (100, 100); a key at 50 lies
  // between both starts and both positions but in neither document. The tile ranges meet, so the
  // tile is taken (a needless tile: the element-wise mask hides the key), never skipped wrongly.
  const int64_t q_max = 100, s_min = 10, k = 50;
  EXPECT_TRUE(tile_needed<true>(q_max, s_min, k, k));
  // A key before every start of the tile is skipped, as one after every query.
  EXPECT_FALSE(tile_needed<true>(q_max, s_min, 9, 9));
  EXPECT_FALSE(tile_needed<true>(q_max, s_min, 101, 101));
  EXPECT_TRUE(tile_needed<true>(q_max, s_min, 10, 10));    // at the earliest start: visible
  EXPECT_TRUE(tile_needed<true>(q_max, s_min, 100, 100));  // at the latest query: visible
}

// Positions at the int64 extremes the rules can meet (strictly between the sentinels): the rules
// only compare, so nothing overflows; brute force over every tile pair.
TEST(AttentionTileRules, ExtremePositions) {
  Rng rng(7);
  Counts unused[std::size(kTilings)];
  for (int rep = 0; rep < 40; ++rep) {
    Case c;
    const bool low = rep % 2 == 0;
    const int64_t lo = low ? INT64_MIN + 1 : INT64_MAX - 600;
    const int64_t nq = uniform(rng, 1, 200), nk = uniform(rng, 1, 200);
    for (int64_t x = 0; x < nq; ++x) c.q_pos.push_back(lo + uniform(rng, 0, 599));
    for (int64_t x = 0; x < nk; ++x) c.k_pos.push_back(lo + uniform(rng, 0, 599));
    if (rep % 4 >= 2) c.q_doc_pos = random_doc_pos(rng, c.q_pos, lo);
    c.name = std::string(low ? "near INT64_MIN" : "near INT64_MAX") +
             (c.docs() ? " documents" : "") + " (rep " + std::to_string(rep) + ")";
    for (size_t t = 0; t < std::size(kTilings); ++t) check_case(c, kTilings[t], unused[t]);
  }
}

TEST(AttentionTileRules, MatchBruteForceOnRandomCases) {
  Rng rng(20240611);
  Counts counts[std::size(kTilings)], doc_counts[std::size(kTilings)];
  for (int id = 0; id < 500; ++id) {
    const Case c = random_case(rng, id);
    for (size_t t = 0; t < std::size(kTilings); ++t)
      check_case(c, kTilings[t], c.docs() ? doc_counts[t] : counts[t]);
    if (HasFailure()) break;  // the first failing case says enough
  }
  // The cases reach every outcome under every tiling (else a property above held vacuously):
  // skipped, partial and full tiles, padded tiles whose real pairs are all visible (which must not
  // be full), and, with documents only, needless tiles (the conservative document bound).
  for (size_t t = 0; t < std::size(kTilings); ++t) {
    for (const Counts* n : {&counts[t], &doc_counts[t]}) {
      const std::string what =
          std::string(kTilings[t].name) + (n == &counts[t] ? "" : ", documents");
      EXPECT_GT(n->skipped, 0) << what;
      EXPECT_GT(n->partial, 0) << what;
      EXPECT_GT(n->full, 0) << what;
      EXPECT_GT(n->padded_all_visible, 0) << what;
    }
    EXPECT_EQ(counts[t].needless, 0) << kTilings[t].name;
    EXPECT_GT(doc_counts[t].needless, 0) << kTilings[t].name << ", documents";
  }
}

// v2's tile bitmasks (mask_bit, next_set): a block walks its needed tiles with next_set from tile
// 0 on, so the walk must visit exactly the set tiles, in order, for every tile count up to the
// limit of kMaskWords·32, across word edges; words past the last one (ceil(n_tiles / 32)) must
// not be read (there the test puts all-ones words, as a block's stale shared memory could hold).
TEST(AttentionTileRules, V2MaskWalkVisitsExactlyTheSetTiles) {
  Rng rng(7);
  const int limit = kMaskWords * 32;
  for (int n : {1, 5, 31, 32, 33, 63, 64, 65, 100, 1000, limit - 33, limit - 1, limit}) {
    // Patterns: none, every tile, only the first, only the last, one in 2, one in 97 (runs of
    // empty words), random density 1/8.
    for (int pattern = 0; pattern < 7; ++pattern) {
      std::vector<bool> set(n);
      for (int t = 0; t < n; ++t) {
        set[t] = pattern == 1 || (pattern == 2 && t == 0) || (pattern == 3 && t == n - 1) ||
                 (pattern == 4 && t % 2 == 1) || (pattern == 5 && t % 97 == 96) ||
                 (pattern == 6 && rng() % 8 == 0);
      }
      const int n_words = (n + 31) / 32;
      std::vector<uint32_t> mask(kMaskWords + 2, 0xffffffffu);  // past n_words: never read
      for (int w = 0; w < n_words; ++w) mask[w] = 0;
      for (int t = 0; t < n; ++t)
        if (set[t]) mask[t / 32] |= 1u << (t % 32);
      const std::string what =
          "n_tiles=" + std::to_string(n) + " pattern " + std::to_string(pattern);
      // next_set from every start (past the end too) against the first set tile at or after it.
      std::vector<int> first(n + 1, n);
      for (int t = n - 1; t >= 0; --t) first[t] = set[t] ? t : first[t + 1];
      for (int j = 0; j < n + 40; ++j) {
        ASSERT_EQ(next_set(mask.data(), j, n), j < n ? first[j] : n) << what << " from " << j;
        if (j < n) {
          ASSERT_EQ(mask_bit(mask.data(), j), set[j]) << what << " bit " << j;
        }
      }
      // The kernels' walk: next_set(0), then next_set(j + 1) until n_tiles.
      std::vector<int> walked, want;
      for (int j = next_set(mask.data(), 0, n); j < n; j = next_set(mask.data(), j + 1, n))
        walked.push_back(j);
      for (int t = 0; t < n; ++t)
        if (set[t]) want.push_back(t);
      ASSERT_EQ(walked, want) << what;
    }
  }
}

}  // namespace
}  // namespace tsp::cuda::attn::flash
