// How the cuDNN path (attention_cudnn.cpp) serves an attention call whose positions are several
// contiguous runs, as cuDNN calls of one causal band each. Plain C++ outside nvcc, checked on the
// CPU against brute force (tests/backend/attention_cudnn_pieces_test.cpp).
//
// The sequence-parallel layouts give the attention kernels positions in runs, not one range: a
// rank's queries are its two zigzag chunks, its keys the chunks of every rank in rank order (K/V
// all-gathered), or one rank's two chunks (a K/V round). cuDNN takes one band per call, j − i <=
// right_bound over row i of the queries and column j of the keys (attention_cudnn_rules.h). So:
//
//   1. The key runs are put in position order (the keys' sorted array: run r holds positions
//      [s_r, s_r + len_r) at sorted indices [base_r, base_r + len_r)). When that order is not the
//      memory order, K and V are gathered into it (and their gradients scattered back) by runs.
//   2. A query at position p sees the sorted keys j < vis(p), the number of keys at positions <= p:
//        p in run r:              vis(p) = base_r + (p − s_r) + 1   (one more key per position),
//        p in a gap or past all:  vis(p) = the keys of the runs before p   (constant),
//        p before every key:      vis(p) = 0 (no key: the call is not covered; cuDNN's output for
//                                 an empty row is not ours, o = 0 and lse = −inf).
//   3. Each query run is cut where p crosses a key run's edge. A piece inside key run r, positions
//      [pa, pb), is rows i = 0.. of a band: j < vis(pa + i) = base_r + (pa − s_r) + i + 1, i.e.
//      j − i <= right_bound = base_r + pa − s_r against nk = vis(pb − 1) keys; a piece in a gap (or
//      past the keys) sees its nk = vis(pa) keys, all of them (no mask).
//
// Pieces cover disjoint query rows, so each writes its own rows of o and lse (no merge, no extra
// rounding); in the backward each adds its dQ rows and its keys' dK, dV (bf16, as a single call
// does) into ours. A query run inside one key run is one piece: the zigzag chunks against the
// whole gathered sequence are 2 calls, each with a band.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "backend/cuda/attention_cudnn_rules.h"

namespace tsp::cuda::attn::cudnn {

// Most runs of positions (queries or keys) a call may have, and most pieces: past them, the flash
// kernels (the device's run finder has this many slots; many small cuDNN calls would not pay).
constexpr int kMaxRuns = 64;
constexpr int kMaxPieces = 64;

// Rows [row, row + len) hold the positions [pos, pos + len).
struct PosRun {
  int64_t row = 0, len = 0, pos = 0;
  bool operator==(const PosRun& o) const { return row == o.row && len == o.len && pos == o.pos; }
};

// The runs of n rows from the rows where a run starts (row 0 and each row i whose position is not
// pos[i − 1] + 1) and their positions, in any order (the device finds them with atomics): sorted
// by row, each to the next start. Empty when the starts are not a valid set (no row 0, a row
// outside [0, n), a row twice).
inline std::vector<PosRun> runs_from_starts(std::vector<PosRun> starts, int64_t n) {
  std::sort(starts.begin(), starts.end(),
            [](const PosRun& a, const PosRun& b) { return a.row < b.row; });
  if (starts.empty() || starts.front().row != 0) return {};
  for (size_t r = 0; r < starts.size(); ++r) {
    const int64_t next = r + 1 < starts.size() ? starts[r + 1].row : n;
    if (next <= starts[r].row || next > n) return {};
    starts[r].len = next - starts[r].row;
  }
  return starts;
}

// The runs of pos[n] (host reference of the device's run finder).
inline std::vector<PosRun> runs_of(const int64_t* pos, int64_t n) {
  std::vector<PosRun> runs;
  for (int64_t i = 0; i < n; ++i) {
    // Unsigned: pos[i − 1] + 1 must not overflow (INT64_MAX); runs_in_range rejects a wrap.
    if (i == 0 || static_cast<uint64_t>(pos[i]) != static_cast<uint64_t>(pos[i - 1]) + 1)
      runs.push_back({i, 1, pos[i]});
    else
      ++runs.back().len;
  }
  return runs;
}

// The planner's arithmetic on positions (run ends, differences) stays exact for positions in
// [−2^62, 2^62): the layouts' are in [0, S). A run outside it (near the int64 limits, or one that
// "continues" across INT64_MAX, which the run finder's unsigned +1 lets through) is not covered:
// the flash kernels take such calls.
constexpr int64_t kMaxAbsPosition = int64_t{1} << 62;
inline bool runs_in_range(const std::vector<PosRun>& runs) {
  for (const PosRun& r : runs)
    if (r.len < 1 || r.len > kMaxRows || r.pos < -kMaxAbsPosition ||
        r.pos > kMaxAbsPosition - r.len)
      return false;
  return true;
}

// One cuDNN call: query rows [q_row, q_row + nq) against the first nk keys in position order,
// with the band j − i <= right_bound (row i of the piece, sorted key j), or kNoMask.
struct Piece {
  int64_t q_row = 0, nq = 0, nk = 0, right_bound = kNoMask;
};

struct PiecePlan {
  bool covered = false;
  std::vector<PosRun> keys;   // the key runs in position order (row: where the run lies in memory)
  bool keys_in_order = true;  // position order is memory order: no gather / scatter of K, V
  std::vector<Piece> pieces;
};

// The pieces of a call with the query runs q and the key runs k (each as runs_of gives them), or
// not covered: more than kMaxRuns runs on either side or kMaxPieces pieces, positions outside
// runs_in_range, two keys at one position, or a query that sees no key.
inline PiecePlan plan_pieces(const std::vector<PosRun>& q, const std::vector<PosRun>& k) {
  PiecePlan plan;
  if (q.empty() || k.empty() || q.size() > kMaxRuns || k.size() > kMaxRuns) return plan;
  if (!runs_in_range(q) || !runs_in_range(k)) return plan;
  plan.keys = k;
  std::sort(plan.keys.begin(), plan.keys.end(),
            [](const PosRun& a, const PosRun& b) { return a.pos < b.pos; });
  // base[r]: the keys before sorted run r; runs must not share a position.
  std::vector<int64_t> base(plan.keys.size() + 1, 0);
  for (size_t r = 0; r < plan.keys.size(); ++r) {
    const PosRun& run = plan.keys[r];
    if (r > 0) {
      const PosRun& prev = plan.keys[r - 1];
      if (run.pos < prev.pos + prev.len) return plan;  // overlapping positions
      if (run.row != prev.row + prev.len) plan.keys_in_order = false;
    } else if (run.row != 0) {
      plan.keys_in_order = false;
    }
    base[r + 1] = base[r] + run.len;
  }
  const int64_t nk_all = base.back();
  if (nk_all > kMaxRows) return plan;

  for (const PosRun& qr : q) {
    int64_t p = qr.pos;
    const int64_t end = qr.pos + qr.len;
    size_t r = 0;  // the first sorted key run that ends after p
    while (p < end) {
      while (r < plan.keys.size() && plan.keys[r].pos + plan.keys[r].len <= p) ++r;
      Piece piece;
      piece.q_row = qr.row + (p - qr.pos);
      int64_t stop;
      if (r < plan.keys.size() && plan.keys[r].pos <= p) {  // inside key run r: a band
        const PosRun& kr = plan.keys[r];
        stop = std::min(end, kr.pos + kr.len);
        piece.right_bound = base[r] + (p - kr.pos);
        piece.nk = base[r] + (stop - 1 - kr.pos) + 1;
        if (piece.right_bound >= piece.nk - 1) piece.right_bound = kNoMask;
      } else {  // in a gap, or past every key: the keys before p, all visible
        stop = r < plan.keys.size() ? std::min(end, plan.keys[r].pos) : end;
        piece.nk = base[r];
        if (piece.nk == 0) return PiecePlan{};  // queries before every key
        piece.right_bound = kNoMask;
      }
      piece.nq = stop - p;
      if (piece.nq > kMaxRows || plan.pieces.size() == kMaxPieces) return PiecePlan{};
      plan.pieces.push_back(piece);
      p = stop;
    }
  }
  plan.covered = true;
  return plan;
}

}  // namespace tsp::cuda::attn::cudnn
