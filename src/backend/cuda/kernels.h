// Element-wise and row-wise kernels of the CUDA backend (kernels.cu), as raw-pointer launchers
// queued on a stream. The backend class (cuda_backend.cpp) checks devices, shapes and dtypes and
// calls these; each launcher returns the launch status (cudaGetLastError) because .cu files
// cannot build tsp::Error messages (fmt's consteval format strings do not compile under nvcc), so
// the caller wraps every call in TSP_CUDA_CHECK.
//
// The maths is the CPU kernels' (src/ops/cpu/kernels.cpp, kernels_internal.h), expression by
// expression: inputs are widened to fp32, every accumulation is fp32 (sum_squares and the losses:
// double), and a BF16 output is rounded once, to nearest even, with the host's bit arithmetic
// (include/tsp/core/bf16.h). Results differ from the CPU's only by the order of reductions and by
// the last bits of expf/sinf/cosf. Reductions into F64/I64 outputs are deterministic (per-row or
// per-block partials summed in a fixed order by one block), except where a comment says otherwise.
//
// A "Float" operand is F32 or BF16: its dtype is passed as `bf16` flags (false: float*).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace tsp::cuda::kernels {

// ---- memory ---------------------------------------------------------------------------------
// p[i] = value (rounded once to bf16 when bf16), n elements.
cudaError_t fill(void* p, bool bf16, int64_t n, float value, cudaStream_t s);
// dst[i] = src[i] with a cast: F32 -> BF16 (round to nearest even, NaN kept quiet) or BF16 -> F32.
cudaError_t cast(const void* src, bool src_bf16, void* dst, bool dst_bf16, int64_t n,
                 cudaStream_t s);
// src [A, B, inner_bytes] -> dst [B, A, inner_bytes] (any dtype: bytes).
cudaError_t swap_leading_dims(const void* src, void* dst, int64_t A, int64_t B, int64_t inner_bytes,
                              cudaStream_t s);

// ---- element-wise and reductions --------------------------------------------------------------
// y += x in fp32 (x widened; a bf16 y rounded once).
cudaError_t add(void* y, bool y_bf16, const void* x, bool x_bf16, int64_t n, cudaStream_t s);
// y *= factor in fp32.
cudaError_t scale(void* y, bool y_bf16, float factor, int64_t n, cudaStream_t s);
// out[0] += Σ double(x)², partials per block in `partials` (at least sum_squares_partials(n)
// doubles of device memory), summed in a fixed order.
int64_t sum_squares_partials(int64_t n);
cudaError_t sum_squares(const float* x, int64_t n, double* partials, double* out, cudaStream_t s);
// out[0] += the number of NaN / ±Inf (and, with also_negative, of values below zero, -0 aside).
cudaError_t count_non_finite(const void* x, bool bf16, int64_t n, bool also_negative, int64_t* out,
                             cudaStream_t s);

// ---- RMSNorm (x, w, y each F32 or BF16) ----------------------------------------------------------
// y = x · r · w, rstd[n] = r = 1/sqrt(mean(x²) + eps); x [N, h], w [h].
cudaError_t rmsnorm_forward(const void* x, bool x_bf16, const void* w, bool w_bf16, void* y,
                            bool y_bf16, float* rstd, int64_t N, int64_t h, float eps,
                            cudaStream_t s);
// y = x · rstd · w from the saved rstd.
cudaError_t rmsnorm_apply(const void* x, bool x_bf16, const void* w, bool w_bf16, const float* rstd,
                          void* y, bool y_bf16, int64_t N, int64_t h, cudaStream_t s);
// dx (=) = r w dy - (r³/h) x Σ dy w x, dw (+=) Σ_n dy x r. dy, dx, dw F32; either output null.
cudaError_t rmsnorm_backward(const float* dy, const void* x, bool x_bf16, const void* w,
                             bool w_bf16, const float* rstd, float* dx, float* dw, int64_t N,
                             int64_t h, cudaStream_t s);

// ---- RoPE (HF rotate_half), in place: x [N, heads, d] at positions pos [N] ----------------------
// The inverse frequencies come from the host (the CPU kernel's own cpu::rope_inv_freq), passed by
// value: the fp32 angle pos·inv_freq is then bitwise the CPU's, which matters at large positions
// (one ulp of inv_freq moves the angle at position 1e5 by ~0.008 rad). sign +1 rotates by +angle
// (forward), -1 by -angle (backward).
constexpr int kRopeMaxHalf = 256;  // head dim up to 512
struct RopeFreqs {
  float inv[kRopeMaxHalf];
};
cudaError_t rope(void* x, bool bf16, const int64_t* pos, int64_t N, int64_t heads, int64_t d,
                 const RopeFreqs& freqs, float sign, cudaStream_t s);

// ---- SwiGLU -------------------------------------------------------------------------------------
cudaError_t swiglu_forward(const float* g, const float* u, void* a, bool a_bf16, int64_t n,
                           cudaStream_t s);
cudaError_t swiglu_backward(const float* da, const float* g, const float* u, float* dg, float* du,
                            int64_t n, cudaStream_t s);

// ---- Embedding over ids [v0, v0 + V_shard) -------------------------------------------------------
cudaError_t embedding_forward(const int32_t* ids, const void* table, bool table_bf16, void* out,
                              bool out_bf16, int64_t N, int64_t h, int64_t v0, int64_t V_shard,
                              cudaStream_t s);
// dtable (+=) with fp32 atomics: NOT deterministic in the order repeated ids are summed.
cudaError_t embedding_backward(const int32_t* ids, const float* dout, float* dtable, int64_t N,
                               int64_t h, int64_t v0, int64_t V_shard, cudaStream_t s);

// ---- Cross-entropy and the online softmax ------------------------------------------------------
// A label outside [0, V) that is not ignore_index gives a NaN loss and NaN gradients for its row
// (the host check of the CPU kernel would need a synchronisation here; the engine checks tokens on
// the host before they are uploaded). row_loss: N doubles of device scratch.
cudaError_t cross_entropy(const float* logits, const int32_t* labels, float* dlogits,
                          double* row_loss, int64_t N, int64_t V, float grad_scale,
                          int32_t ignore_index, double* loss, cudaStream_t s);
cudaError_t online_softmax_update(const float* logits, const int32_t* labels, float* row_max,
                                  float* row_sum, float* target, int64_t N, int64_t V_shard,
                                  int64_t v0, cudaStream_t s);
cudaError_t online_softmax_merge(float* max_a, float* sum_a, const float* max_b, const float* sum_b,
                                 int64_t N, cudaStream_t s);
cudaError_t online_softmax_backward(const float* logits, const int32_t* labels,
                                    const float* row_max, const float* row_sum, float* dlogits,
                                    int64_t N, int64_t V_shard, int64_t v0, float grad_scale,
                                    int32_t ignore_index, cudaStream_t s);
// loss[0] += Σ over counted rows of max + log(sum) - target (in double). row_loss: N doubles.
cudaError_t online_softmax_loss(const float* row_max, const float* row_sum, const float* target,
                                const int32_t* labels, double* row_loss, int64_t N,
                                int32_t ignore_index, double* loss, cudaStream_t s);

// ---- AdamW ---------------------------------------------------------------------------------------
struct AdamWConstants {
  float grad_scale, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, inv_sqrt_bias2, eps,
      decay;
};
cudaError_t adamw(float* w, const float* g, float* m, float* v, int64_t n, const AdamWConstants& c,
                  cudaStream_t s);

}  // namespace tsp::cuda::kernels
