// The cuDNN path's cut of an attention call into pieces of one causal band each
// (src/backend/cuda/attention_cudnn_pieces.h), on the CPU against brute force: plain C++, this
// test runs in every build.
//   1. runs_from_starts (the host side of the device's run finder) equals runs_of on any order of
//      the starts, and rejects sets that are not starts.
//   2. plan_pieces, for position patterns of the layouts (one range, zigzag chunks against the
//      gathered sequence or a K/V round, the chunks of every rank in rank order) and random ones
//      (shuffled runs, gaps, queries past or before the keys): every query row lies in exactly one
//      piece, and the keys a piece's band gives it (sorted keys j < nk with j − i <= right_bound,
//      mapped back to memory rows through the sorted runs) are exactly {j : k_pos[j] <= q_pos[i]}.
//      Covered exactly when every query sees a key, no two keys share a position and the runs and
//      pieces are within their limits (positions within ±2^62 included).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "backend/cuda/attention_cudnn_pieces.h"

namespace tsp::cuda::attn::cudnn {
namespace {

using Positions = std::vector<int64_t>;

TEST(CudnnAttentionPieces, RunsFromStartsInAnyOrder) {
  const Positions pos = {5, 6, 7, 0, 1, 9, 3, 4, 5};
  const std::vector<PosRun> runs = runs_of(pos.data(), static_cast<int64_t>(pos.size()));
  ASSERT_EQ(runs.size(), 4u);
  EXPECT_EQ(runs[0], (PosRun{0, 3, 5}));
  EXPECT_EQ(runs[1], (PosRun{3, 2, 0}));
  EXPECT_EQ(runs[2], (PosRun{5, 1, 9}));
  EXPECT_EQ(runs[3], (PosRun{6, 3, 3}));
  std::vector<PosRun> starts;
  for (const PosRun& r : runs) starts.push_back({r.row, 0, r.pos});
  std::mt19937 rng(1);
  for (int t = 0; t < 10; ++t) {
    std::shuffle(starts.begin(), starts.end(), rng);
    EXPECT_EQ(runs_from_starts(starts, static_cast<int64_t>(pos.size())), runs);
  }
  EXPECT_TRUE(runs_from_starts({{1, 0, 6}}, 9).empty()) << "no run at row 0";
  EXPECT_TRUE(runs_from_starts({{0, 0, 5}, {3, 0, 0}, {3, 0, 0}}, 9).empty()) << "a row twice";
  EXPECT_TRUE(runs_from_starts({{0, 0, 5}, {9, 0, 0}}, 9).empty()) << "a row past n";
  EXPECT_TRUE(runs_from_starts({}, 9).empty());
}

// Checks the plan of (q_pos, k_pos) against brute force; `expect_covered` as the case says.
void check(const Positions& q_pos, const Positions& k_pos, bool expect_covered,
           const std::string& what) {
  SCOPED_TRACE(what);
  const int64_t nq = static_cast<int64_t>(q_pos.size()), nk = static_cast<int64_t>(k_pos.size());
  const PiecePlan plan = plan_pieces(runs_of(q_pos.data(), nq), runs_of(k_pos.data(), nk));
  ASSERT_EQ(plan.covered, expect_covered);
  if (!plan.covered) return;

  // Sorted key index -> memory row, through the sorted runs; and whether that is the identity.
  std::vector<int64_t> row_of;
  for (const PosRun& r : plan.keys)
    for (int64_t j = 0; j < r.len; ++j) row_of.push_back(r.row + j);
  ASSERT_EQ(static_cast<int64_t>(row_of.size()), nk);
  bool identity = true;
  for (int64_t j = 0; j < nk; ++j) identity = identity && row_of[j] == j;
  EXPECT_EQ(plan.keys_in_order, identity);
  for (int64_t j = 1; j < nk; ++j)
    ASSERT_LT(k_pos[row_of[j - 1]], k_pos[row_of[j]]) << "sorted keys out of position order";

  std::vector<int> seen(nq, 0);
  for (const Piece& pc : plan.pieces) {
    ASSERT_GE(pc.nq, 1);
    ASSERT_GE(pc.nk, 1);
    ASSERT_LE(pc.nk, nk);
    ASSERT_TRUE(pc.right_bound == kNoMask || (pc.right_bound >= 0 && pc.right_bound < pc.nk - 1))
        << "a band that masks nothing must be kNoMask (one plan for every such call)";
    for (int64_t i = 0; i < pc.nq; ++i) {
      const int64_t qi = pc.q_row + i;
      ASSERT_LT(qi, nq);
      ++seen[qi];
      std::vector<int64_t> got, want;
      for (int64_t j = 0; j < pc.nk; ++j)
        if (pc.right_bound == kNoMask || j - i <= pc.right_bound) got.push_back(row_of[j]);
      for (int64_t j = 0; j < nk; ++j)
        if (k_pos[j] <= q_pos[qi]) want.push_back(j);
      std::sort(got.begin(), got.end());
      ASSERT_EQ(got, want) << "query row " << qi << " at position " << q_pos[qi];
    }
  }
  for (int64_t i = 0; i < nq; ++i) ASSERT_EQ(seen[i], 1) << "query row " << i;
}

// from, from + 1, ..., from + n − 1 (no std::iota: it computes one more, which overflows for a
// range ending at INT64_MAX).
Positions range(int64_t from, int64_t n) {
  Positions p(n);
  for (int64_t i = 0; i < n; ++i) p[i] = from + i;
  return p;
}
Positions concat(std::initializer_list<Positions> parts) {
  Positions out;
  for (const Positions& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}
// Zigzag: rank r of D holds chunks r and 2D − 1 − r of S / (2D) tokens.
Positions zigzag_local(int64_t S, int D, int r) {
  const int64_t c = S / (2 * D);
  return concat({range(r * c, c), range((2 * D - 1 - r) * c, c)});
}
Positions zigzag_gathered(int64_t S, int D) {
  Positions out;
  for (int r = 0; r < D; ++r) {
    const Positions p = zigzag_local(S, D, r);
    out.insert(out.end(), p.begin(), p.end());
  }
  return out;
}

TEST(CudnnAttentionPieces, OneRangeIsOnePiece) {
  check(range(0, 300), range(0, 300), true, "self-attention");
  check(range(100, 200), range(0, 300), true, "a chunk against the whole row");
  check(range(500, 64), range(0, 300), true, "queries past every key");
  const PiecePlan p = plan_pieces({{0, 300, 0}}, {{0, 300, 0}});
  ASSERT_EQ(p.pieces.size(), 1u);
  EXPECT_EQ(p.pieces[0].right_bound, 0);
  EXPECT_EQ(p.pieces[0].nk, 300);
  EXPECT_TRUE(p.keys_in_order);
}

TEST(CudnnAttentionPieces, ZigzagLayouts) {
  for (int D : {2, 4, 8}) {
    const int64_t S = 64 * 2 * D;
    for (int r = 0; r < D; ++r) {
      const std::string at = "D=" + std::to_string(D) + " rank " + std::to_string(r);
      // tsp / sp: the local chunks against the gathered sequence, one piece per chunk.
      check(zigzag_local(S, D, r), zigzag_gathered(S, D), true, at + " vs gathered");
      const PiecePlan p = plan_pieces(runs_of(zigzag_local(S, D, r).data(), S / D),
                                      runs_of(zigzag_gathered(S, D).data(), S));
      // (The last rank's chunks D − 1 and D are adjacent: one run, one piece.)
      EXPECT_EQ(p.pieces.size(), r == D - 1 ? 1u : 2u) << at;
      EXPECT_FALSE(p.keys_in_order) << at;
      // K/V rounds: the local chunks against each rank's chunks. The queries before every key
      // (rank r's first chunk against a later rank's) are not covered.
      for (int o = 0; o < D; ++o)
        check(zigzag_local(S, D, r), zigzag_local(S, D, o), o <= r,
              at + " vs rank " + std::to_string(o) + "'s chunks");
      // The keys gathered in natural order.
      check(zigzag_local(S, D, r), range(0, S), true, at + " vs natural order");
    }
  }
}

TEST(CudnnAttentionPieces, NotCovered) {
  check(range(0, 10), range(5, 10), false, "queries before every key");
  check(range(0, 10), concat({range(0, 5), range(3, 5)}), false, "two keys at one position");
  Positions many;  // kMaxRuns + 1 query runs
  for (int r = 0; r <= kMaxRuns; ++r) many.push_back(2 * r + 100);
  check(many, range(0, 10), false, "more query runs than the run finder holds");
  check(range(300, 10), many, false, "more key runs than the run finder holds");
  // kMaxPieces + 1 pieces: one query run across kMaxPieces / 2 + 1 key runs with gaps.
  Positions keys;
  for (int r = 0; r <= kMaxPieces / 2; ++r) keys.push_back(2 * r);
  check(range(0, 2 * (kMaxPieces / 2 + 1)), keys, false, "more pieces than allowed");
}

// Far from 0 the cut is the same (positions offset by 2^40: covered, brute force agrees); near
// the int64 limits it is refused, including a run that wraps from INT64_MAX to INT64_MIN.
TEST(CudnnAttentionPieces, PositionsNearTheInt64Limits) {
  const int64_t far = int64_t{1} << 40, max = std::numeric_limits<int64_t>::max();
  check(range(far + 100, 64), range(far, 300), true, "offset by 2^40");
  check(concat({range(far + 64, 64), range(far + 448, 64)}), range(far, 512), true,
        "zigzag chunks offset by 2^40");
  check(range(max - 63, 64), range(max - 299, 300), false, "ending at INT64_MAX");
  check(range(0, 64), concat({range(max - 1, 2), Positions{std::numeric_limits<int64_t>::min()}}),
        false, "keys wrapping from INT64_MAX to INT64_MIN");
  check(range(-(int64_t{1} << 62) - 10, 64), range(-(int64_t{1} << 62) - 20, 64), false,
        "below -2^62");
}

// Random patterns: runs of random lengths at random (disjoint) positions, shuffled in memory; the
// queries random runs over a similar span (some before every key: then not covered).
TEST(CudnnAttentionPieces, RandomRunsAgainstBruteForce) {
  std::mt19937 rng(7);
  int covered = 0;
  for (int t = 0; t < 400; ++t) {
    const int k_runs = 1 + static_cast<int>(rng() % 6), q_runs = 1 + static_cast<int>(rng() % 4);
    // Keys: disjoint runs along the positions, gaps of 0..3, then shuffled by run.
    std::vector<Positions> runs;
    int64_t p = static_cast<int64_t>(rng() % 4);
    for (int r = 0; r < k_runs; ++r) {
      const int64_t len = 1 + static_cast<int64_t>(rng() % 9);
      runs.push_back(range(p, len));
      p += len + static_cast<int64_t>(rng() % 4);
    }
    if (rng() % 2) std::shuffle(runs.begin(), runs.end(), rng);
    Positions k;
    for (const Positions& r : runs) k.insert(k.end(), r.begin(), r.end());
    Positions q;
    for (int r = 0; r < q_runs; ++r) {
      const Positions part =
          range(static_cast<int64_t>(rng() % (p + 4)), 1 + static_cast<int64_t>(rng() % 12));
      q.insert(q.end(), part.begin(), part.end());
    }
    const int64_t k_min = *std::min_element(k.begin(), k.end());
    const bool every_query_sees_a_key = *std::min_element(q.begin(), q.end()) >= k_min;
    check(q, k, every_query_sees_a_key, "case " + std::to_string(t));
    if (HasFailure()) return;
    covered += every_query_sees_a_key;
  }
  EXPECT_GT(covered, 100) << "too few covered cases to exercise the pieces";
}

}  // namespace
}  // namespace tsp::cuda::attn::cudnn
