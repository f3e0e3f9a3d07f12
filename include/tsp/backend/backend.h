// The backend: every operation the engine performs on tensor memory, behind one interface, so the
// layouts, the block maths, the optimizer and inference run unchanged on any device. The CPU
// backend (src/backend/cpu/) is oneDNN GEMMs plus our AVX-512 kernels; a CUDA backend (cuBLASLt
// and CUDA kernels) implements the same interface. docs/design.md, "Engine", explains the seam.
//
// Rules every implementation follows and every caller may rely on:
//   * All tensor arguments of one call live on the backend's device (checked). Shapes are given by
//     the views; the comments name them. Integer ids and positions are device tensors too (I32
//     ids/labels, I64 positions), uploaded once per step.
//   * "(=)" overwrites, "(+=)" accumulates into the output (the caller zeroes it first where
//     needed: memory is never zero on allocation). An empty view skips an optional output.
//   * Precision (docs/design.md, "Mixed precision"): activations and weights may be F32 or BF16;
//     statistics (RMSNorm rstd, softmax max/sum, LSE) and gradients are F32; every accumulation
//     happens in fp32. When the inputs of a GEMM differ in dtype, the backend rounds the F32 ones
//     to BF16 (in its own workspace) and runs a bf16 GEMM with fp32 accumulation. An output may be
//     F32 or BF16; a BF16 output is rounded once, after accumulating in fp32.
//   * Operations are ORDERED on the device's compute queue and may run asynchronously. The only
//     way a value comes back to the host is download() (and the host_* helpers built on it): it is
//     where a GPU backend synchronises, so callers collect what they need (a loss, a norm) in a
//     device scalar and read it once.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tsp/core/device.h"
#include "tsp/core/tensor.h"

namespace tsp {

// Step constants of one AdamW update (see train/optimizer.h for the maths). Computed in double on
// the host and rounded once to f32, so every rank and every backend applies the same numbers.
struct AdamWStep {
  float grad_scale = 1;  // g = grad · grad_scale
  float beta1 = 0.9f, one_minus_beta1 = 0.1f;
  float beta2 = 0.95f, one_minus_beta2 = 0.05f;
  float step_size = 0;       // lr / (1 - β1^t)
  float inv_sqrt_bias2 = 1;  // 1 / sqrt(1 - β2^t)
  float eps = 1e-8f;
  float decay = 1;  // 1 - lr · weight_decay (1 for parameters without decay)
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;  // "cpu (oneDNN 2.7, AVX-512 BF16)"
  // Whether bf16 arithmetic is native here (the default compute dtype follows it).
  virtual bool native_bf16() const = 0;

  // ---- Memory ---------------------------------------------------------------------------------
  virtual void zero(TensorView t) = 0;
  virtual void fill(TensorView t, float value) = 0;  // F32 or BF16
  // Same number of elements; same dtype or an F32 <-> BF16 cast (rounded to nearest even).
  virtual void copy(TensorView src, TensorView dst) = 0;
  // rows × cols elements: dst[r·dst_stride + c] = src[r·src_stride + c] (strides in elements, from
  // the views' starts; dtypes equal). Packing, zigzag chunks and column pieces are all this.
  virtual void copy_2d(TensorView src, int64_t src_stride, TensorView dst, int64_t dst_stride,
                       int64_t rows, int64_t cols) = 0;
  // src [A, B, C] -> dst [B, A, C] (the views' shapes say A, B, C; dtypes equal).
  virtual void swap_leading_dims(TensorView src, TensorView dst) = 0;
  // Host <-> device. download() waits for every operation queued before it: the sync point.
  virtual void upload(const void* host, TensorView dst) = 0;
  virtual void download(TensorView src, void* host) = 0;
  // Wait until every queued operation has finished (timing, before host code reads memory).
  virtual void synchronize() = 0;

  // ---- Element-wise and reductions ------------------------------------------------------------
  virtual void add(TensorView y, TensorView x) = 0;    // y += x (x F32 or BF16, cast first)
  virtual void scale(TensorView y, float factor) = 0;  // y *= factor
  // out F64 [1] (+=) Σ x² (x F32), accumulated in double.
  virtual void sum_squares(TensorView x, TensorView out) = 0;
  // out I64 [1] (+=) the number of NaN and ±Inf elements of x (F32 or BF16), and with
  // also_negative of elements below zero too (-0 excepted): a second moment is never negative.
  virtual void count_non_finite(TensorView x, TensorView out, bool also_negative = false) = 0;

  // ---- Linear layers, y = x·Wᵀ with W [out, in] as in Hugging Face ---------------------------
  // x [N, in], w [out, in] -> y [N, out] (= or += per accumulate).
  virtual void linear_forward(TensorView x, TensorView w, TensorView y, bool accumulate) = 0;
  // dy [N, out] -> dx [N, in] (+=), dw [out, in] (+=, F32). Either output may be empty.
  virtual void linear_backward(TensorView dy, TensorView x, TensorView w, TensorView dx,
                               TensorView dw) = 0;

  // ---- RMSNorm: y = x / sqrt(mean(x²) + eps) · w ---------------------------------------------
  // x [N, h], w [h] -> y [N, h] (=), rstd F32 [N] (=, saved for backward).
  virtual void rmsnorm_forward(TensorView x, TensorView w, TensorView y, TensorView rstd,
                               float eps) = 0;
  // Recompute a normed input from the saved rstd: y [N, h] (=) = x · rstd · w.
  virtual void rmsnorm_apply(TensorView x, TensorView w, TensorView rstd, TensorView y) = 0;
  // dy F32 [N, h] -> dx F32 [N, h] (=), dw F32 [h] (+=).
  virtual void rmsnorm_backward(TensorView dy, TensorView x, TensorView w, TensorView rstd,
                                TensorView dx, TensorView dw) = 0;

  // ---- RoPE (Hugging Face rotate_half convention), in place -----------------------------------
  // x [N, heads, d] at positions pos I64 [N]; backward rotates a gradient by the opposite angle.
  virtual void rope_forward(TensorView x, TensorView pos, float theta) = 0;
  virtual void rope_backward(TensorView dx, TensorView pos, float theta) = 0;

  // ---- SwiGLU: a = silu(g) ⊙ u -----------------------------------------------------------------
  // g, u F32 [N, F] -> a [N, F] (=).
  virtual void swiglu_forward(TensorView g, TensorView u, TensorView a) = 0;
  // da [N, F] -> dg, du F32 [N, F] (=). dg may alias da.
  virtual void swiglu_backward(TensorView da, TensorView g, TensorView u, TensorView dg,
                               TensorView du) = 0;

  // ---- Embedding over a vocabulary range [v0, v0 + rows of table) -----------------------------
  // ids I32 [N], table [V_shard, h] -> out [N, h]: rows whose id is in range (=), others untouched.
  virtual void embedding_forward(TensorView ids, TensorView table, TensorView out, int64_t v0) = 0;
  // dout F32 [N, h] -> dtable F32 [V_shard, h] (+=) for ids in range.
  virtual void embedding_backward(TensorView ids, TensorView dout, TensorView dtable,
                                  int64_t v0) = 0;

  // ---- Cross-entropy --------------------------------------------------------------------------
  // Whole vocabulary: logits F32 [N, V], labels I32 [N] (ignore_index skipped). loss F64 [1] (+=)
  // the SUM of the counted tokens' losses; dlogits F32 [N, V] (=, may alias logits; empty: loss
  // only) = grad_scale · (softmax - onehot), 0 on ignored rows.
  virtual void cross_entropy(TensorView logits, TensorView labels, TensorView dlogits,
                             float grad_scale, TensorView loss, int32_t ignore_index) = 0;
  // Online (vocabulary-sharded) statistics: fold a shard of logits F32 [N, V_shard] covering ids
  // [v0, v0 + V_shard) into row_max, row_sum, target F32 [N] (initialise max = -inf, sum = 0).
  virtual void online_softmax_update(TensorView logits, TensorView labels, TensorView row_max,
                                     TensorView row_sum, TensorView target, int64_t v0) = 0;
  // (max_a, sum_a) ⊕= (max_b, sum_b): statistics of disjoint vocabulary sets.
  virtual void online_softmax_merge(TensorView max_a, TensorView sum_a, TensorView max_b,
                                    TensorView sum_b) = 0;
  // dlogits F32 [N, V_shard] (=) = grad_scale · (softmax - onehot) from the final statistics.
  virtual void online_softmax_backward(TensorView logits, TensorView labels, TensorView row_max,
                                       TensorView row_sum, TensorView dlogits, int64_t v0,
                                       float grad_scale, int32_t ignore_index) = 0;
  // loss F64 [1] (+=) Σ over counted rows of max + log(sum) - target: the loss from the final
  // statistics (the one place ignore_index is applied to it).
  virtual void online_softmax_loss(TensorView row_max, TensorView row_sum, TensorView target,
                                   TensorView labels, TensorView loss, int32_t ignore_index) = 0;

  // ---- Causal GQA attention at explicit positions (flash-style, O(n) memory) -----------------
  // q [nq, hq, d] at q_pos I64 [nq]; k, v [nk, hkv, d] at k_pos I64 [nk]; query i sees key j iff
  // k_pos[j] <= q_pos[i]. o [nq, hq, d] (=), lse F32 [nq, hq] (=; -inf and o = 0 for a query that
  // sees no key). q, k, v, o share one dtype (F32 or BF16); accumulation and statistics are fp32.
  // Packed documents: q_doc_pos I64 [nq] (empty: no documents) is each query's position in its
  // document (its RoPE position), so its document starts at q_pos[i] - q_doc_pos[i] and it sees
  // key j iff q_pos[i] - q_doc_pos[i] <= k_pos[j] <= q_pos[i]; key blocks no query of a block can
  // see (above the causal limit or below every document start) are skipped.
  virtual void attention_forward(TensorView q, TensorView k, TensorView v, TensorView q_pos,
                                 TensorView k_pos, TensorView q_doc_pos, TensorView o,
                                 TensorView lse, float scale) = 0;
  // dout F32 [nq, hq, d] -> dq F32 [nq, hq, d] (+=), dk, dv F32 [nk, hkv, d] (+=).
  virtual void attention_backward(TensorView q, TensorView k, TensorView v, TensorView q_pos,
                                  TensorView k_pos, TensorView q_doc_pos, TensorView o,
                                  TensorView lse, TensorView dout, TensorView dq, TensorView dk,
                                  TensorView dv, float scale) = 0;
  // Exact merge of two partial attentions of the same queries over disjoint key sets:
  // (o_a, lse_a) <- ((o_a·e^lse_a + o_b·e^lse_b) / (e^lse_a + e^lse_b), log of the sum).
  virtual void attention_merge(TensorView o_a, TensorView lse_a, TensorView o_b,
                               TensorView lse_b) = 0;

  // ---- Optimizer ------------------------------------------------------------------------------
  // One AdamW update of w, m, v F32 (same shape) from grad F32 (see AdamWStep).
  virtual void adamw(TensorView w, TensorView grad, TensorView m, TensorView v,
                     const AdamWStep& step) = 0;

  // ---- Host values, through download() (the explicit synchronisation point) -----------------
  double host_f64(TensorView scalar);   // F64 [1]
  int64_t host_i64(TensorView scalar);  // I64 [1]
  template <typename T>
  std::vector<T> host_vector(TensorView t) {
    std::vector<T> out(t.numel());
    TSP_CHECK(t.dtype() == dtype_of<T>(), "host_vector: tensor holds {}", dtype_name(t.dtype()));
    download(t, out.data());
    return out;
  }
  // A device tensor holding a copy of host values (ids, positions), in `category`.
  template <typename T>
  Tensor device_copy(const std::vector<T>& host, MemCategory category) {
    Tensor t({static_cast<int64_t>(host.size())}, dtype_of<T>(), category, device());
    if (!host.empty()) upload(host.data(), t.view());
    return t;
  }
};

// The backend of a device: the CPU's always exists; a CUDA device's once the CUDA backend is built
// and a device is present (else tsp::Error says so and suggests --device cpu).
Backend& backend_for(Device device);
void register_backend(Device device, std::unique_ptr<Backend> backend);

// The compute dtype used when the user does not choose one: bf16 where the backend has native
// bf16 arithmetic (AVX512-BF16 CPUs, GPUs with bf16 tensor cores), fp32 elsewhere. docs/design.md.
DType default_compute_dtype(const Backend& backend);

}  // namespace tsp
