// Which attention calls the cuDNN path (attention_cudnn.cpp) serves, by their shape: plain C++
// outside nvcc, so that the CPU checks the decision (tests/backend/attention_cudnn_rules_test.cpp;
// no GPU needed). Their positions decide the rest (attention_cudnn_pieces.h).
//
// cuDNN's fused attention takes a batch of sequences with one causal band per call: with TOP_LEFT
// diagonal alignment and a right bound b, it keeps score (row i, column j) iff i + b >= j, i.e.
// j − i <= b (the frontend's utils/attn_score_modifiers.h, sliding_window_mask, CMP_GE of row +
// shift against column). For query positions [q0, q0 + nq) and key positions [k0, k0 + nk) with
// q0 >= k0, query i sees key j iff k0 + j <= q0 + i iff j − i <= q0 − k0: that band, against the
// first min(nk, q0 + nq − k0) keys (the later ones are seen by no query). A bound of nk − 1 or
// more masks nothing: such graphs have no mask (kNoMask).
#pragma once

#include <cstdint>
#include <limits>

namespace tsp::cuda::attn::cudnn {

// Fewer queries than this stay on the flash path: decode-like calls, where the per-call run
// finder and stream sync (attention_cudnn.cpp) would cost more than cuDNN saves.
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

// Whether the call is worth the device's run finder: BF16, d = 64 or 128, no documents,
// 16-byte aligned operands, nq >= kMinQueries, nk >= 1, GQA (hq a multiple of hkv), and sizes in
// cuDNN's 32-bit range.
inline bool shape_covered(const CallShape& c) {
  return c.bf16 && (c.d == 64 || c.d == 128) && !c.documents && c.aligned && c.nq >= kMinQueries &&
         c.nq <= kMaxRows && c.nk >= 1 && c.nk <= kMaxRows && c.hq >= 1 && c.hkv >= 1 &&
         c.hq % c.hkv == 0;
}

// The band's right bound that masks nothing: one cached plan serves every such call.
constexpr int64_t kNoMask = -1;

}  // namespace tsp::cuda::attn::cudnn
