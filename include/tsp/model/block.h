// The block maths of the Llama decoder, written once and composed by every layout.
//
// Each piece is a forward/backward pair on n tokens this rank holds (at explicit global
// positions), parameterised by a HEAD GROUP (hq query heads, hkv kv heads with their contiguous
// weight shards) and an FFN SLICE (f rows of gate/up, the matching f columns of down). A layout
// only decides which group / slice / tokens to feed and where communication goes in between; the
// arithmetic is here, so layouts differ only where the algorithm differs, and at D=1 every layout
// runs exactly the single layout's operations.
//
// Conventions: tensor views on the backend's device, row-major, weights [out, in] as in Hugging
// Face; shapes in the comments; "(+=)" means accumulated into (the caller zeroes first), "(=)"
// overwritten. Every operation goes through the Backend; nothing here touches tensor memory or
// communicates. Transient buffers are Tensors in MemCategory::Workspace.
//
// Precision: weights, the residual stream, normed inputs and the saved q, k, v, o are in the
// compute dtype (F32 or BF16); rstd, lse, every gradient and every accumulation are F32
// (docs/design.md, "Mixed precision").
//
// What a layer saves for backward (the same policy for every layout; docs/layouts.md):
//   x [n, h] block input, rstd1 [n], q [n, hq, d] and k, v [n, hkv, d] after RoPE (local tokens),
//   o [n, hq·d] attention output, lse [n, hq], x2 [n, h] the residual after attention, rstd2 [n].
//   Under --recompute selective (the default) the normed inputs are recomputed from (x, rstd) and
//   the MLP's gate/up/act are recomputed from the normed input; under --recompute none they are
//   kept too (LayerSaved::allocate_kept, MlpSaved).
#pragma once

#include <cstdint>
#include <functional>

#include "tsp/backend/backend.h"
#include "tsp/core/tensor.h"
#include "tsp/model/config.h"

namespace tsp::block {

// Token rows processed at once by the MLP and the loss head: bounds their [rows, f] and
// [rows, V] workspaces independently of the sequence length. Every layout uses the same value on a
// device, so at equal n the GEMM shapes (and results) are identical.
//
// Per backend, because of the weight gradients: each chunk's dw [f, h] += dyᵀ·x (k = rows) reads
// and writes the whole fp32 dw once, 8·f·h bytes, against 2·rows·f·h flops. At a GEMM rate R and a
// memory bandwidth B, that traffic costs 4·R / (rows·B) of the GEMM's own time.
// * CPU (oneDNN, ~0.4 TFLOP/s on 2 cores, ~20 GB/s): 4R/B ≈ 80 rows; 512 rows keep the traffic
//   under 20% of the GEMM time.
// * CUDA (cuBLASLt bf16, 776 TFLOP/s measured on an H200, 4.8 TB/s): 4R/B ≈ 650 rows, so 512-row
//   chunks would make the MLP's dw GEMMs memory-bound (traffic 1.26× the GEMM time). 2048 rows
//   bring it to 0.32×, mostly hidden behind other tiles' main loops. The chunk's buffers stay small
//   beside a GPU's memory: the MLP backward's 18·rows·f bytes (0.53 GB at f = 14336), the loss
//   head's fp32 logits 4·rows·V (1.05 GB at V = 128,256).
inline constexpr int64_t kTokenChunkCpu = 512;
inline constexpr int64_t kTokenChunkCuda = 2048;
constexpr int64_t token_chunk(DeviceKind device) {
  return device == DeviceKind::CUDA ? kTokenChunkCuda : kTokenChunkCpu;
}

// The label value the loss kernels skip (Backend::cross_entropy's ignore_index): neither counted in
// the loss nor given a gradient. Layouts put it where a label must not count (the label after a
// document separator: docs/layouts.md, "Documents").
inline constexpr int32_t kIgnoreIndex = -100;

// ---- Attention of one head group -------------------------------------------------------------

struct AttnDims {
  int64_t h = 0;    // hidden size (columns of wq/wk/wv, rows of wo)
  int64_t hq = 0;   // query heads of the group
  int64_t hkv = 0;  // kv heads of the group (hq / hkv = g)
  int64_t d = 0;    // head dim
  float theta = 10000.f;
  int64_t q_width() const { return hq * d; }
  int64_t kv_width() const { return hkv * d; }
  float scale() const;  // 1 / sqrt(d)
};
AttnDims attn_dims(const LlamaConfig& c, int64_t hq, int64_t hkv);
inline AttnDims attn_dims(const LlamaConfig& c) {
  return attn_dims(c, c.num_attention_heads, c.num_key_value_heads);
}

struct AttnWeights {  // compute dtype
  TensorView wq;      // [hq·d, h]
  TensorView wk;      // [hkv·d, h]
  TensorView wv;      // [hkv·d, h]
  TensorView wo;      // [h, hq·d] (the columns of the full wo that read the group's heads)
};
struct AttnGrads {  // F32, same shapes as AttnWeights; an empty view skips that gradient
  TensorView dwq, dwk, dwv, dwo;
};

// xn [n, h] normed input, pos I64 [n] -> q [n, hq, d], k [n, hkv, d], v [n, hkv, d] (=), with
// RoPE applied to q and k at the global positions.
void qkv_forward(Backend& be, const AttnDims& a, const AttnWeights& w, TensorView xn,
                 TensorView pos, TensorView q, TensorView k, TensorView v);
// dq [n, hq, d], dk [n, hkv, d] F32 (gradients w.r.t. the ROTATED q, k; un-rotated in place, so
// they are consumed), dv [n, hkv, d] F32 -> dxn F32 [n, h] (+=), dwq/dwk/dwv (+=).
void qkv_backward(Backend& be, const AttnDims& a, const AttnWeights& w, const AttnGrads& g,
                  TensorView xn, TensorView pos, TensorView dq, TensorView dk, TensorView dv,
                  TensorView dxn);

// Causal attention of B independent rows. q [B·nq, hq, d] at q_pos I64 [nq], k, v [B·nk, hkv, d]
// at k_pos I64 [nk] (the same positions in every row: the zigzag map cuts every row alike)
// -> o [B·nq, hq, d] (=), lse F32 [B·nq, hq] (=). Packed documents: q_doc_pos I64 [B·nq], each
// query's position in its document (its RoPE position; documents differ from row to row), limits
// every query to the keys of its own document (Backend::attention_forward); empty: no documents.
void attention_forward(Backend& be, const AttnDims& a, int64_t B, TensorView q, TensorView k,
                       TensorView v, TensorView q_pos, TensorView k_pos, TensorView o,
                       TensorView lse, TensorView q_doc_pos = {});
// dout F32 [B·nq, hq, d] -> dq F32 [B·nq, hq, d] (+=), dk, dv F32 [B·nk, hkv, d] (+=).
void attention_backward(Backend& be, const AttnDims& a, int64_t B, TensorView q, TensorView k,
                        TensorView v, TensorView q_pos, TensorView k_pos, TensorView o,
                        TensorView lse, TensorView dout, TensorView dq, TensorView dk,
                        TensorView dv, TensorView q_doc_pos = {});

// o [n, hq·d], wo [h, hq·d] -> y [n, h] (+=): a head group's share of the output projection.
void out_proj_forward(Backend& be, TensorView wo, TensorView o, TensorView y);
// dy F32 [n, h] -> dout F32 [n, hq·d] (=), dwo [h, hq·d] (+=, skipped when empty).
void out_proj_backward(Backend& be, TensorView wo, TensorView o, TensorView dy, TensorView dout,
                       TensorView dwo);

// ---- SwiGLU MLP slice ------------------------------------------------------------------------

struct MlpWeights {  // compute dtype
  TensorView wg;     // [f, h]
  TensorView wu;     // [f, h]
  TensorView wd;     // [h, f]
};
struct MlpGrads {  // F32, same shapes; an empty view skips that gradient
  TensorView dwg, dwu, dwd;
};
// The MLP activations of one FFN slice of f rows kept from forward to backward (--recompute none):
// gate = xn·wgᵀ and up = xn·wuᵀ F32 [n, f] (the precision swiglu_backward reads), act =
// silu(gate)·up [n, f] in the compute dtype (what the down projection and its weight gradient
// read). Empty views: nothing kept, the backward recomputes them (selective).
struct MlpSaved {
  TensorView gate, up, act;
  bool empty() const { return gate.empty(); }
};
// xn [n, h] -> y [n, h] (+=) silu(xn·wgᵀ) ⊙ (xn·wuᵀ) · wdᵀ, in chunks of token_chunk rows; with
// a non-empty `keep` the chunks' gate/up/act are written there (=) instead of a workspace.
// after_chunk (optional) runs after each chunk: a layout's communication progress point.
void mlp_forward(Backend& be, const MlpWeights& w, TensorView xn, TensorView y,
                 const MlpSaved& keep = {}, const std::function<void()>& after_chunk = {});
// dy F32 [n, h] -> dxn F32 [n, h] (+=), dwg, dwu, dwd (+=). Reads gate/up/act from `keep` as
// mlp_forward wrote them, or (empty) recomputes them from xn with the same operations, so the
// gradients are bitwise the same either way.
void mlp_backward(Backend& be, const MlpWeights& w, const MlpGrads& g, TensorView xn, TensorView dy,
                  TensorView dxn, const MlpSaved& keep = {},
                  const std::function<void()>& after_chunk = {});

// ---- RMSNorm helper --------------------------------------------------------------------------

// The norm's backward added to a residual gradient: dx F32 [n, h] (+=) ∂/∂x of dy·norm(x),
// dw F32 [h] (+=).
void rmsnorm_backward_add(Backend& be, TensorView dy, TensorView x, TensorView w, TensorView rstd,
                          TensorView dx, TensorView dw);

// ---- Loss head over the whole vocabulary -----------------------------------------------------

// xn [n, h] final-normed, w [V, h] (LM head, or the embedding when tied), labels I32 [n].
// loss F64 [1] (+=) the SUM of the token losses; when dxn is non-empty also dxn F32 [n, h] (=) and
// dw F32 [V, h] (+=, if non-empty) for the loss scaled by grad_scale (1 / tokens of the whole batch
// for a mean). Logits live only as a [token_chunk, V] workspace: forward and backward are fused.
void lm_head_loss(Backend& be, TensorView xn, TensorView w, TensorView labels, float grad_scale,
                  TensorView loss, TensorView dxn, TensorView dw);

// ---- Saved activations of one layer ----------------------------------------------------------

// n tokens held by this rank, hq / hkv heads whose q, k, v this rank keeps (all heads under
// sp/tsp/single, the group's heads under tp). All in MemCategory::Activations; x, q, k, v, o, x2
// in the compute dtype `act`, rstd and lse in F32. Under --recompute none also the normed inputs
// and the MLP activations (allocate_kept).
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
  // --recompute none only (empty otherwise):
  Tensor xn1;       // [n, h]  input_layernorm(x), compute dtype
  Tensor xn2;       // [n, h]  post_attention_layernorm(x2), compute dtype
  Tensor gate, up;  // F32 [slices][n, f] the MLP's gate and up projections
  Tensor act;       // [slices][n, f] silu(gate)·up, compute dtype
  void allocate(int64_t n, int64_t h, int64_t hq, int64_t hkv, int64_t d, DType act, Device device);
  // The tensors --recompute none keeps besides: the two normed inputs and the MLP activations of
  // `slices` FFN slices of f rows each for the n tokens (one slice: all of the rank's FFN rows;
  // tsp: the D slices its ring brings, each [n, f] contiguous).
  void allocate_kept(int64_t n, int64_t h, int64_t slices, int64_t f, DType act, Device device);
  bool kept() const { return !xn1.empty(); }
  // The MLP activations of slice i of `slices` (empty views when nothing is kept).
  MlpSaved mlp(int64_t i = 0, int64_t slices = 1) const;
  int64_t bytes() const;
};

}  // namespace tsp::block
