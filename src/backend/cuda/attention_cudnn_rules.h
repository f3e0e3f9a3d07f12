// Which attention calls the cuDNN path (attention_cudnn.cpp) serves, as host functions so that the
// CPU checks the decision (tests/backend/attention_cudnn_rules_test.cpp; no GPU needed), and the
// per-element contiguity test that the device's position check (attention_cudnn_kernels.cu)
// applies. Plain C++ outside nvcc: no CUDA header, no device code.
//
// cuDNN's fused attention takes a batch of sequences with one causal band per call; ours is any
// set of positions. A call maps onto cuDNN exactly when its positions are two contiguous ascending
// runs, q_pos = [q0, q0 + nq) and k_pos = [k0, k0 + nk), with q0 >= k0:
//   query i sees key j  iff  k0 + j <= q0 + i  iff  j - i <= q0 - k0,
// which is cuDNN's diagonal band with TOP_LEFT alignment and right bound q0 - k0 (its frontend
// keeps score (row i, column j) iff i + right_bound >= j: utils/attn_score_modifiers.h,
// sliding_window_mask, CMP_GE of row + shift against column). Keys past the last query (k0 + j >
// q0 + nq - 1) are seen by nobody: only the first nk' = min(nk, q0 + nq - k0) keys are passed,
// and their gradients (+= 0) are left alone. q0 >= k0 means every query sees key 0, so no row is
// empty (cuDNN's output for an empty row is not ours: o = 0, lse = -inf). A right bound of nk' - 1
// or more masks nothing (every i >= 0 sees every j <= nk' - 1): the graph then has no mask, which
// also lets one cached plan serve every such offset.
#pragma once

#include <cstdint>
#include <limits>

#include "backend/cuda/host_device.h"

namespace tsp::cuda::attn::cudnn {

// Fewer queries than this stay on the flash path: decode-like calls, where the per-call position
// check and stream sync (attention_cudnn.cpp) would cost more than cuDNN saves.
constexpr int64_t kMinQueries = 64;
// cuDNN's sequence lengths and the band bound are 32-bit.
constexpr int64_t kMaxRows = std::numeric_limits<int32_t>::max();

// What the host knows about a call before looking at the positions (they are on the device).
struct CallShape {
  bool bf16 = false;       // q, k, v, o are BF16
  int d = 0;               // head dim
  bool documents = false;  // q_doc_pos given
  bool aligned = false;    // q, k, v, o (and dout) 16-byte aligned, as the flash path needs
  int64_t nq = 0, nk = 0;
  int hq = 0, hkv = 0;
};

// Whether the call is worth the device's position check: BF16, d = 64 or 128, no documents,
// 16-byte aligned operands, nq >= kMinQueries, nk >= 1, GQA (hq a multiple of hkv), and sizes in
// cuDNN's 32-bit range.
inline bool shape_covered(const CallShape& c) {
  return c.bf16 && (c.d == 64 || c.d == 128) && !c.documents && c.aligned && c.nq >= kMinQueries &&
         c.nq <= kMaxRows && c.nk >= 1 && c.nk <= kMaxRows && c.hq >= 1 && c.hkv >= 1 &&
         c.hq % c.hkv == 0;
}

// Element i of a contiguous ascending run starting at pos[0]: pos[i] = pos[0] + i exactly. The
// difference is taken in unsigned arithmetic after pos[i] >= pos[0]: a signed pos[0] + i
// overflows near INT64_MAX (undefined; in practice it wraps, and a "run" wrapping from INT64_MAX
// to INT64_MIN would pass while its positions descend).
TSP_HD inline bool in_run(const int64_t* pos, int64_t i) {
  return pos[i] >= pos[0] &&
         static_cast<uint64_t>(pos[i]) - static_cast<uint64_t>(pos[0]) == static_cast<uint64_t>(i);
}

// The cuDNN call for positions that are (contiguous) runs from q0 and k0, or not covered.
struct Coverage {
  bool covered = false;
  int64_t nk = 0;           // keys passed to cuDNN: nk' = min(nk, q0 + nq - k0)
  int64_t right_bound = 0;  // the band's right bound q0 - k0; kNoMask: every pair is visible
};
constexpr int64_t kNoMask = -1;

inline Coverage positions_covered(int64_t nq, int64_t nk, bool contiguous, int64_t q0, int64_t k0) {
  Coverage c;
  if (!contiguous || nq < 1 || nk < 1 || q0 < k0) return c;
  c.covered = true;
  // shift = q0 - k0 in [0, 2^64): exact in unsigned arithmetic (the signed difference overflows
  // for runs far apart, and a compiler may then drop an overflow test as dead code).
  const uint64_t shift = static_cast<uint64_t>(q0) - static_cast<uint64_t>(k0);
  if (shift >= static_cast<uint64_t>(nk - 1)) {  // even query 0 sees key nk - 1: no mask
    c.nk = nk, c.right_bound = kNoMask;
    return c;
  }
  const int64_t s = static_cast<int64_t>(shift);  // < nk - 1: fits
  c.nk = nk - s < nq ? nk : s + nq;               // min(nk, s + nq), s + nq not overflowing
  c.right_bound = s >= c.nk - 1 ? kNoMask : s;
  return c;
}

}  // namespace tsp::cuda::attn::cudnn
