// CPU kernels as forward/backward pairs. Raw fp32 pointers, row-major, shapes in comments.
// "+=" in a comment means the output is accumulated into (callers zero it first), which lets
// layouts sum contributions of several shards or several rounds without extra buffers.
#pragma once

#include <cstdint>

#include "tsp/ops/gemm.h"

namespace tsp {

// ---- Linear: y = x·Wᵀ, weights [out, in] -------------------------------------------------
// x [N, in], w [out, in] -> y [N, out]      (y = or += per accumulate)
void linear_forward(const float* x, const float* w, float* y, int64_t N, int64_t in, int64_t out,
                    bool accumulate = false);
// dy [N, out] -> dx [N, in] (+=), dw [out, in] (+=). Either output may be null to skip it.
void linear_backward(const float* dy, const float* x, const float* w, float* dx, float* dw,
                     int64_t N, int64_t in, int64_t out);

// ---- RMSNorm: y = x / sqrt(mean(x²) + eps) · w ---------------------------------------------
// x [N, h], w [h] -> y [N, h], rstd [N] (saved for backward)
void rmsnorm_forward(const float* x, const float* w, float* y, float* rstd, int64_t N, int64_t h,
                     float eps);
// dy [N, h] -> dx [N, h] (=), dw [h] (+=)
void rmsnorm_backward(const float* dy, const float* x, const float* w, const float* rstd, float* dx,
                      float* dw, int64_t N, int64_t h);
// Forward from a saved rstd (recomputes the normed input in backward): y = x · rstd · w, exactly
// the arithmetic of rmsnorm_forward's output. x [N, h], w [h], rstd [N] -> y [N, h]
void rmsnorm_apply(const float* x, const float* w, const float* rstd, float* y, int64_t N,
                   int64_t h);

// ---- RoPE, Hugging Face Llama convention (rotate_half), in place ----------------------------
// x [N, n_heads, d]; pos [N] global position ids; inv_freq[i] = theta^(-2i/d), i < d/2.
// out[.., i] = x[i]·cos - x[i+d/2]·sin, out[.., i+d/2] = x[i+d/2]·cos + x[i]·sin.
void rope_forward(float* x, const int64_t* pos, int64_t N, int64_t n_heads, int64_t d, float theta);
// The rotation is orthogonal, so backward rotates the gradient by the opposite angle.
void rope_backward(float* dx, const int64_t* pos, int64_t N, int64_t n_heads, int64_t d,
                   float theta);

// ---- SwiGLU: a = silu(g) ⊙ u ----------------------------------------------------------------
// g [N, F], u [N, F] -> a [N, F]   (leading dimensions: all arrays contiguous [N, F])
void swiglu_forward(const float* g, const float* u, float* a, int64_t N, int64_t F);
// da [N, F] -> dg [N, F] (=), du [N, F] (=)
void swiglu_backward(const float* da, const float* g, const float* u, float* dg, float* du,
                     int64_t N, int64_t F);

// ---- Embedding over a vocabulary range [v0, v0 + V_shard) ------------------------------------
// ids [N]; table [V_shard, h] holds rows v0..; out [N, h]: rows whose id is in range are
// written (=), others are left untouched. A full table is v0 = 0, V_shard = V.
void embedding_forward(const int32_t* ids, const float* table, float* out, int64_t N, int64_t h,
                       int64_t v0, int64_t V_shard);
// dout [N, h] -> dtable [V_shard, h] (+=) for ids in range.
void embedding_backward(const int32_t* ids, const float* dout, float* dtable, int64_t N, int64_t h,
                        int64_t v0, int64_t V_shard);

// ---- Cross-entropy from logits (full vocabulary) -----------------------------------------
// logits [N, V], labels [N] (label == ignore_index is skipped). Returns the SUM of the per-token
// losses over counted tokens; writes dlogits [N, V] = grad_scale · (softmax - onehot) for counted
// rows and 0 for ignored rows (dlogits may alias logits). For a mean loss pass
// grad_scale = 1 / (number of counted tokens in the whole batch, across all ranks).
double cross_entropy_forward_backward(const float* logits, const int32_t* labels, float* dlogits,
                                      int64_t N, int64_t V, float grad_scale,
                                      int32_t ignore_index = -100);

// Online (vocabulary-sharded) cross-entropy building blocks: for a shard of logits covering
// vocabulary ids [v0, v0 + V_shard), fold the shard into running per-row statistics.
// logits [N, V_shard]; running_max [N], running_sum [N] (sum of exp(logit - running_max)),
// target_logit [N] (set when the label falls in the shard). Initialise max = -inf, sum = 0.
void online_softmax_update(const float* logits, const int32_t* labels, float* running_max,
                           float* running_sum, float* target_logit, int64_t N, int64_t V_shard,
                           int64_t v0);
// Merge statistics of disjoint vocabulary sets (e.g. from another rank): (max_a,sum_a) ⊕
// (max_b,sum_b)
void online_softmax_merge(float* max_a, float* sum_a, const float* max_b, const float* sum_b,
                          int64_t N);
// Given final per-row max and sum, write dlogits [N, V_shard] = grad_scale·(softmax - onehot),
// zero for ignored rows.
void online_softmax_backward(const float* logits, const int32_t* labels, const float* row_max,
                             const float* row_sum, float* dlogits, int64_t N, int64_t V_shard,
                             int64_t v0, float grad_scale, int32_t ignore_index = -100);

// ---- bf16 variants for mixed precision --------------------------------------------------------
// Policy: weights' compute copies, the residual stream, normed inputs, q/k/v/o and K/V are bf16;
// every statistic (rstd, softmax max/sum, lse), every gradient and every accumulation is fp32.
// Each kernel computes in fp32 from the widened bf16 inputs with the arithmetic of its fp32
// version, and rounds a bf16 output once (round to nearest even), so a bf16 output is the fp32
// kernel's output on the same (bf16-valued) inputs, rounded: relative error <= 2^-8.

// Linear with bf16 operands and fp32 accumulation (gemm_bf16). x [N, in], w [out, in]:
// y [N, out] bf16 (accumulate: the old y is added in fp32 and the sum rounded once) ...
void linear_forward(const bf16* x, const bf16* w, bf16* y, int64_t N, int64_t in, int64_t out,
                    bool accumulate = false);
// ... or y [N, out] fp32 (e.g. gate/up projections feeding swiglu, logits).
void linear_forward(const bf16* x, const bf16* w, float* y, int64_t N, int64_t in, int64_t out,
                    bool accumulate = false);
// dy [N, out] (the fp32 gradient rounded to bf16 by the caller: a bf16 GEMM takes bf16 operands)
// -> dx [N, in] (+=), dw [out, in] (+=), both fp32. Either output may be null to skip it.
void linear_backward(const bf16* dy, const bf16* x, const bf16* w, float* dx, float* dw, int64_t N,
                     int64_t in, int64_t out);

// RMSNorm: x [N, h], w [h] bf16 -> y [N, h] bf16, rstd [N] fp32 (statistics from the bf16 values,
// bitwise rmsnorm_forward's rstd on the widened x).
void rmsnorm_forward(const bf16* x, const bf16* w, bf16* y, float* rstd, int64_t N, int64_t h,
                     float eps);
// dy [N, h] fp32 -> dx [N, h] fp32 (=), dw [h] fp32 (+=); x, w bf16, rstd from the forward.
// Either output may be null to skip it.
void rmsnorm_backward(const float* dy, const bf16* x, const bf16* w, const float* rstd, float* dx,
                      float* dw, int64_t N, int64_t h);
// y [N, h] bf16 = x · rstd · w from a saved rstd (bitwise rmsnorm_forward's bf16 y).
void rmsnorm_apply(const bf16* x, const bf16* w, const float* rstd, bf16* y, int64_t N, int64_t h);

// RoPE forward in place on bf16 x [N, n_heads, d]: rotated in fp32, rounded once. (Backward
// stays fp32: gradients are fp32.)
void rope_forward(bf16* x, const int64_t* pos, int64_t N, int64_t n_heads, int64_t d, float theta);

// SwiGLU: g, u [N, F] fp32 (out of the gate/up GEMMs) -> a [N, F] bf16 (feeds the bf16
// down-projection). Backward stays fp32.
void swiglu_forward(const float* g, const float* u, bf16* a, int64_t N, int64_t F);

// Embedding: table [V_shard, h] bf16 -> out [N, h] bf16 (rows of ids in range, others untouched).
// Backward stays fp32 (embedding_backward into an fp32 gradient).
void embedding_forward(const int32_t* ids, const bf16* table, bf16* out, int64_t N, int64_t h,
                       int64_t v0, int64_t V_shard);

// ---- Small vector helpers -------------------------------------------------------------------
void add_inplace(float* y, const float* x, int64_t n);  // y += x
void scale_inplace(float* y, float a, int64_t n);       // y *= a

}  // namespace tsp
