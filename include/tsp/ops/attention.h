// Causal attention with GQA at explicit global positions, flash-style (blocked, online softmax,
// O(N) memory: never an n_q × n_k matrix). Query i sees key j iff k_pos[j] <= q_pos[i], so
// zigzag chunks, partial key sets and decode against a cache all use the same kernel.
// Packed documents (docs/layouts.md, "Documents"): with q_doc_pos set, query i is token
// q_doc_pos[i] of its document (its RoPE position), so its document starts at global position
// q_pos[i] - q_doc_pos[i], and it sees key j iff q_pos[i] - q_doc_pos[i] <= k_pos[j] <= q_pos[i].
// Key tiles below every query's document start are skipped like those above the causal limit.
// Layouts: q, o, dq, do [n_q, n_heads, d]; k, v, dk, dv [n_k, n_kv_heads, d]; lse [n_q, n_heads].
// Query head hq reads kv head hq / (n_heads / n_kv_heads).
#pragma once

#include <cstdint>

#include "tsp/core/bf16.h"

namespace tsp {

struct AttentionParams {
  int64_t n_q = 0, n_k = 0;
  int64_t n_heads = 0, n_kv_heads = 0, head_dim = 0;
  float scale = 0.f;  // usually 1/sqrt(head_dim)
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  const int64_t* q_pos = nullptr;  // [n_q]
  const int64_t* k_pos = nullptr;  // [n_k]
  // [n_q] position of each query in its document (>= 0, <= q_pos); null: no documents.
  const int64_t* q_doc_pos = nullptr;
  float* o = nullptr;  // [n_q, n_heads, d] (=)
  // [n_q, n_heads] natural-log log-sum-exp of the scaled scores; -inf (and o = 0) for a query
  // that sees no key, so merging with another key set stays exact.
  float* lse = nullptr;
};

void attention_forward(const AttentionParams& p);

struct AttentionBackwardParams : AttentionParams {
  const float* dout = nullptr;  // [n_q, n_heads, d]
  // o and lse are the forward outputs (inputs here). dq, dk, dv are ACCUMULATED (+=), so a
  // layout can sum contributions of several query/key blocks.
  float* dq = nullptr;
  float* dk = nullptr;
  float* dv = nullptr;
};

void attention_backward(const AttentionBackwardParams& p);

// Exact merge of two partial attentions of the same queries over disjoint key sets:
// (o_a, lse_a) ← (o_a·e^{lse_a} + o_b·e^{lse_b}) / (e^{lse_a} + e^{lse_b}), lse_a ← log(sum).
// o [n_q, n_heads, d], lse [n_q, n_heads]. Handles -inf on either side.
void attention_merge(float* o_a, float* lse_a, const float* o_b, const float* lse_b, int64_t n_q,
                     int64_t n_heads, int64_t head_dim);

// ---- bf16 (mixed precision) ---------------------------------------------------------------------
// Same semantics and layouts as above with q, k, v and o in bf16; lse, the softmax statistics,
// dout and the gradients stay fp32. Scores are accumulated in fp32 from the exact bf16 products.
// Where the CPU has AVX512_BF16 the products P·V (forward) and the four backward products run on
// bf16 operands with fp32 accumulation: the probabilities P, the scaled dS and dout are rounded to
// bf16 on the way in (as flash-attention does on GPUs), each adding a relative error <= 2^-8 to
// its term (bounds derived in src/ops/cpu/attention_bf16.cpp); o is rounded to bf16 once.

struct AttentionBf16Params {
  int64_t n_q = 0, n_k = 0;
  int64_t n_heads = 0, n_kv_heads = 0, head_dim = 0;
  float scale = 0.f;                   // usually 1/sqrt(head_dim)
  const bf16* q = nullptr;             // [n_q, n_heads, d]
  const bf16* k = nullptr;             // [n_k, n_kv_heads, d]
  const bf16* v = nullptr;             // [n_k, n_kv_heads, d]
  const int64_t* q_pos = nullptr;      // [n_q]
  const int64_t* k_pos = nullptr;      // [n_k]
  const int64_t* q_doc_pos = nullptr;  // [n_q] position in its document; null: no documents
  bf16* o = nullptr;                   // [n_q, n_heads, d] (=); 0 for a query that sees no key
  float* lse = nullptr;                // [n_q, n_heads] fp32; -inf for a query that sees no key
};

void attention_forward(const AttentionBf16Params& p);

struct AttentionBf16BackwardParams : AttentionBf16Params {
  const float* dout = nullptr;  // [n_q, n_heads, d] fp32
  // o (bf16) and lse are the forward outputs (inputs here). dq, dk, dv are fp32, ACCUMULATED (+=).
  float* dq = nullptr;
  float* dk = nullptr;
  float* dv = nullptr;
};

void attention_backward(const AttentionBf16BackwardParams& p);

// attention_merge for bf16 outputs: the merge is computed in fp32 from the widened o_a, o_b and
// rounded once into o_a; lse fp32. An empty side (lse = -inf) leaves the other side's o bit for bit.
void attention_merge(bf16* o_a, float* lse_a, const bf16* o_b, const float* lse_b, int64_t n_q,
                     int64_t n_heads, int64_t head_dim);

}  // namespace tsp
