// The block maths of the Llama decoder, written once and composed by every layout.
//
// Each piece is a forward/backward pair on n tokens this rank holds (at explicit global
// positions), parameterised by a HEAD GROUP (hq query heads, hkv kv heads with their contiguous
// weight shards) and an FFN SLICE (f rows of gate/up, the matching f columns of down). A layout
// only decides which group / slice / tokens to feed and where communication goes in between; the
// arithmetic is here, so layouts differ only where the algorithm differs, and at D=1 every layout
// runs exactly the single layout's operations.
//
// Conventions: raw f32 pointers, row-major, weights [out, in] as in Hugging Face; shapes in the
// comments; "(+=)" means accumulated into (the caller zeroes first), "(=)" overwritten. Transient
// buffers are Tensors in MemCategory::Workspace allocated inside; nothing here communicates.
//
// What a layer saves for backward (the same policy for every layout; docs/layouts.md):
//   x [n, h] block input, rstd1 [n], q [n, hq, d] and k, v [n, hkv, d] after RoPE (local tokens),
//   o [n, hq·d] attention output, lse [n, hq], x2 [n, h] the residual after attention, rstd2 [n].
//   Normed inputs are recomputed from (x, rstd); the MLP's gate/up activations are recomputed.
#pragma once

#include <cstdint>

#include "tsp/core/tensor.h"
#include "tsp/model/config.h"

namespace tsp::block {

// Token rows processed at once by the MLP and the loss head: bounds their [rows, f] and
// [rows, V] workspace independently of the sequence length. Every layout uses the same value, so
// at equal n the GEMM shapes (and results) are identical.
inline constexpr int64_t kTokenChunk = 512;

// ---- Attention of one head group ----------------------------------------------------------------
struct AttnDims {
  int64_t h = 0;    // hidden size (columns of wq/wk/wv, rows of wo)
  int64_t hq = 0;   // query heads of the group
  int64_t hkv = 0;  // kv heads of the group (hq / hkv = g)
  int64_t d = 0;    // head dim
  float theta = 10000.f;
  int64_t q_width() const { return hq * d; }
  int64_t kv_width() const { return hkv * d; }
};
AttnDims attn_dims(const LlamaConfig& c, int64_t hq, int64_t hkv);
inline AttnDims attn_dims(const LlamaConfig& c) {
  return attn_dims(c, c.num_attention_heads, c.num_key_value_heads);
}

struct AttnWeights {
  const float* wq = nullptr;  // [hq·d, h]
  const float* wk = nullptr;  // [hkv·d, h]
  const float* wv = nullptr;  // [hkv·d, h]
  const float* wo = nullptr;  // [h, hq·d] (the columns of the full wo that read the group's heads)
};
struct AttnGrads {  // same shapes as AttnWeights; null pointers skip that gradient
  float* dwq = nullptr;
  float* dwk = nullptr;
  float* dwv = nullptr;
  float* dwo = nullptr;
};

// xn [n, h] normed input, pos [n] -> q [n, hq, d], k [n, hkv, d], v [n, hkv, d] (=), with RoPE
// applied to q and k at the global positions.
void qkv_forward(const AttnDims& a, const AttnWeights& w, const float* xn, const int64_t* pos,
                 int64_t n, float* q, float* k, float* v);
// dq [n, hq, d], dk [n, hkv, d] (gradients w.r.t. the ROTATED q, k; un-rotated in place, so they
// are consumed), dv [n, hkv, d] -> dxn [n, h] (+=), dwq/dwk/dwv (+=).
void qkv_backward(const AttnDims& a, const AttnWeights& w, const AttnGrads& g, const float* xn,
                  const int64_t* pos, int64_t n, float* dq, float* dk, const float* dv, float* dxn);

// Causal attention of B independent rows. q [B, nq, hq, d] at q_pos [nq], k, v [B, nk, hkv, d]
// at k_pos [nk] (the same positions in every row: the zigzag map cuts every row alike)
// -> o [B, nq, hq, d] (=), lse [B, nq, hq] (=).
void attention_forward(const AttnDims& a, int64_t B, int64_t nq, int64_t nk, const float* q,
                       const float* k, const float* v, const int64_t* q_pos, const int64_t* k_pos,
                       float* o, float* lse);
// dout [B, nq, hq, d] -> dq [B, nq, hq, d] (+=), dk, dv [B, nk, hkv, d] (+=). o, lse from forward.
void attention_backward(const AttnDims& a, int64_t B, int64_t nq, int64_t nk, const float* q,
                        const float* k, const float* v, const int64_t* q_pos, const int64_t* k_pos,
                        const float* o, const float* lse, const float* dout, float* dq, float* dk,
                        float* dv);

// o [n, hq·d], wo [h, hq·d] -> y [n, h] (+=): a head group's share of the output projection.
void out_proj_forward(const AttnDims& a, const float* wo, const float* o, int64_t n, float* y);
// dy [n, h] -> dout [n, hq·d] (=), dwo [h, hq·d] (+=, skipped when null).
void out_proj_backward(const AttnDims& a, const float* wo, const float* o, const float* dy,
                       int64_t n, float* dout, float* dwo);

// ---- SwiGLU MLP slice --------------------------------------------------------------------------
struct MlpWeights {
  const float* wg = nullptr;  // [f, h]
  const float* wu = nullptr;  // [f, h]
  const float* wd = nullptr;  // [h, f]
  int64_t f = 0;              // rows of the slice (intermediate_size for the whole MLP)
};
struct MlpGrads {  // same shapes; null pointers skip that gradient
  float* dwg = nullptr;
  float* dwu = nullptr;
  float* dwd = nullptr;
};
// xn [n, h] -> y [n, h] (+=) silu(xn·wgᵀ) ⊙ (xn·wuᵀ) · wdᵀ, in chunks of kTokenChunk rows.
void mlp_forward(const MlpWeights& w, int64_t h, const float* xn, int64_t n, float* y);
// dy [n, h] -> dxn [n, h] (+=), dwg, dwu, dwd (+=). Recomputes gate/up from xn (not saved).
void mlp_backward(const MlpWeights& w, const MlpGrads& g, int64_t h, const float* xn,
                  const float* dy, int64_t n, float* dxn);

// ---- RMSNorm helpers ---------------------------------------------------------------------------
// Recompute a normed input from the saved rstd: y [n, h] (=) = x · rstd · w.
void rmsnorm_apply(const float* x, const float* w, const float* rstd, float* y, int64_t n,
                   int64_t h);
// The norm's backward added to a residual gradient: dx [n, h] (+=) ∂/∂x of dy·norm(x), dw (+=).
void rmsnorm_backward_add(const float* dy, const float* x, const float* w, const float* rstd,
                          float* dx, float* dw, int64_t n, int64_t h);

// ---- Loss head over the whole vocabulary -------------------------------------------------------
// xn [n, h] final-normed, w [V, h] (LM head, or the embedding when tied), labels [n]. Returns the
// SUM of the token losses; when dxn is non-null also writes dxn [n, h] (=) and dw [V, h] (+=, if
// non-null) for the loss scaled by grad_scale (1 / tokens of the whole batch for a mean). Logits
// live only as a [kTokenChunk, V] workspace: forward and backward of the head are fused.
double lm_head_loss(const float* xn, const float* w, const int32_t* labels, int64_t n, int64_t h,
                    int64_t V, float grad_scale, float* dxn, float* dw);

// ---- Saved activations of one layer ------------------------------------------------------------
// n tokens held by this rank, hq / hkv heads whose q, k, v this rank keeps (all heads under
// sp/tsp/single, the group's heads under tp). All in MemCategory::Activations.
struct LayerSaved {
  Tensor x;      // [n, h]     block input (residual stream)
  Tensor rstd1;  // [n]        input_layernorm's 1/rms
  Tensor q;      // [n, hq, d] after RoPE
  Tensor k;      // [n, hkv, d] after RoPE
  Tensor v;      // [n, hkv, d]
  Tensor o;      // [n, hq, d] attention output (before o_proj)
  Tensor lse;    // [n, hq]
  Tensor x2;     // [n, h]     residual after attention = MLP block input
  Tensor rstd2;  // [n]        post_attention_layernorm's 1/rms
  void allocate(int64_t n, int64_t h, int64_t hq, int64_t hkv, int64_t d);
  int64_t bytes() const;
};

}  // namespace tsp::block
