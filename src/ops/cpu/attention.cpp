// Public entry points of causal attention (include/tsp/ops/attention.h): validation at the API
// boundary, the choice between the blocked AVX-512 path (attention_fast.cpp) and the scalar
// reference (attention_reference.cpp), and the exact log-sum-exp merge.
#include "tsp/ops/attention.h"

#include <cmath>
#include <limits>

#include "ops/cpu/attention_internal.h"
#include "tsp/core/error.h"

namespace tsp {
namespace attn {

namespace {

template <class Params>
void validate_shapes(const Params& p, const char* who) {
  TSP_CHECK(p.n_q >= 0 && p.n_k >= 0, "{}: n_q={} and n_k={} must be >= 0", who, p.n_q, p.n_k);
  TSP_CHECK(p.n_heads >= 1 && p.n_kv_heads >= 1 && p.head_dim >= 1,
            "{}: n_heads={}, n_kv_heads={}, head_dim={} must all be >= 1", who, p.n_heads,
            p.n_kv_heads, p.head_dim);
  TSP_CHECK(p.n_heads % p.n_kv_heads == 0,
            "{}: n_heads={} is not a multiple of n_kv_heads={} (GQA shares one kv head among "
            "n_heads/n_kv_heads query heads)",
            who, p.n_heads, p.n_kv_heads);
  TSP_CHECK(std::isfinite(p.scale), "{}: scale={} must be finite (usually 1/sqrt(head_dim))", who,
            p.scale);
  if (p.n_q > 0) {
    TSP_CHECK(p.q && p.q_pos && p.o && p.lse, "{}: q, q_pos, o and lse must be set when n_q={}",
              who, p.n_q);
    if (p.n_k > 0)
      TSP_CHECK(p.k && p.v && p.k_pos, "{}: k, v and k_pos must be set when n_k={}", who, p.n_k);
    // A query's document starts at or before it: q_doc_pos >= 0. (A negative value would
    // silently let the query see keys after it.)
    for (int64_t i = 0; p.q_doc_pos && i < p.n_q; ++i)
      TSP_CHECK(p.q_doc_pos[i] >= 0,
                "{}: query {} at position {} has document position {}; a query's position in its "
                "document is >= 0",
                who, i, p.q_pos[i], p.q_doc_pos[i]);
  }
}

template <class Params>
void validate_backward_buffers(const Params& p) {
  validate_shapes(p, "attention_backward");
  if (p.n_q > 0) {
    TSP_CHECK(p.dout && p.dq, "attention_backward: dout and dq must be set when n_q={}", p.n_q);
    if (p.n_k > 0)
      TSP_CHECK(p.dk && p.dv, "attention_backward: dk and dv must be set when n_k={}", p.n_k);
  }
}

}  // namespace

void validate(const AttentionParams& p, const char* who) {
  validate_shapes(p, who);
}
void validate_backward(const AttentionBackwardParams& p) {
  validate_backward_buffers(p);
}
void validate(const AttentionBf16Params& p, const char* who) {
  validate_shapes(p, who);
}
void validate_backward(const AttentionBf16BackwardParams& p) {
  validate_backward_buffers(p);
}

}  // namespace attn

void attention_forward(const AttentionParams& p) {
  attn::validate(p, "attention_forward");
  if (p.n_q == 0) return;
  if (attn::fast_path_available(p.head_dim))
    attn::forward_fast(p);
  else
    attn::forward_reference(p);
}

void attention_backward(const AttentionBackwardParams& p) {
  attn::validate_backward(p);
  if (p.n_q == 0 || p.n_k == 0) return;  // nothing is visible: every gradient is 0, += adds nothing
  if (attn::fast_path_available(p.head_dim))
    attn::backward_fast(p);
  else
    attn::backward_reference(p);
}

// (o_a, lse_a) ← (o_a·e^{lse_a} + o_b·e^{lse_b}) / (e^{lse_a} + e^{lse_b}), computed relative to
// the larger lse so nothing overflows; a side with lse = -inf has weight exactly 0.
void attention_merge(float* o_a, float* lse_a, const float* o_b, const float* lse_b, int64_t n_q,
                     int64_t n_heads, int64_t head_dim) {
  TSP_CHECK(n_q >= 0 && n_heads >= 1 && head_dim >= 1,
            "attention_merge: n_q={}, n_heads={}, head_dim={} must be >= 0, >= 1, >= 1", n_q,
            n_heads, head_dim);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < n_q * n_heads; ++r) {
    const float la = lse_a[r], lb = lse_b[r];
    float* oa = o_a + r * head_dim;
    const float* ob = o_b + r * head_dim;
    const float m = std::max(la, lb);
    if (m == neg_inf) {  // neither side saw a key
      for (int64_t c = 0; c < head_dim; ++c) oa[c] = 0.f;
      continue;
    }
    // One side empty: the other is the answer, bit for bit (and an empty side's o is never read,
    // so it cannot inject NaN through 0·o).
    if (lb == neg_inf) continue;
    if (la == neg_inf) {
      for (int64_t c = 0; c < head_dim; ++c) oa[c] = ob[c];
      lse_a[r] = lb;
      continue;
    }
    const float wa = std::exp(la - m), wb = std::exp(lb - m);  // one of them is 1
    const float inv = 1.f / (wa + wb);
    for (int64_t c = 0; c < head_dim; ++c) oa[c] = (wa * oa[c] + wb * ob[c]) * inv;
    lse_a[r] = m + std::log(wa + wb);
  }
}

}  // namespace tsp
