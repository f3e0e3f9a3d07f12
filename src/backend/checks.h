// Argument checks shared by the backends (src/backend/cpu/cpu_backend.cpp,
// src/backend/cuda/cuda_backend.cpp, src/backend/cuda/gemm.cpp), so both refuse the same calls with
// the same messages. Every check throws tsp::Error (TSP_CHECK) naming the operation, the operand and
// what was wrong; the per-operation checks return the sizes the kernels need.
//
// The per-operation checks cover the shapes and dtypes the Backend interface names
// (include/tsp/backend/backend.h) and that hold on every device. What only one backend needs stays
// there: the device check's caller, CUDA grid limits, the CPU's own dtype conversions.
#pragma once

#include <cstdint>
#include <initializer_list>

#include "tsp/core/device.h"
#include "tsp/core/tensor.h"

namespace tsp::checks {

// ---- Operand checks ------------------------------------------------------------------------------

// Every non-empty view lives on `device`, the backend's own ("add: a tensor [8] f32 on cpu was
// given to the cuda:0 backend").
void check_device(std::initializer_list<const TensorView*> views, Device device, const char* op);
void check_dtype(const TensorView& t, DType want, const char* op, const char* what);
// t is F32 or BF16.
void check_float(const TensorView& t, const char* op, const char* what);
void check_numel(const TensorView& t, int64_t want, const char* op, const char* what);
// Rows of a [rows, cols] view given its element count (views carry shapes; kernels want N, h).
int64_t rows_of(const TensorView& t, int64_t cols, const char* op, const char* what);
// The last dimension (1 for a scalar).
int64_t last_dim(const TensorView& t);
// Online-softmax statistics: N fp32 values each.
void check_stats(std::initializer_list<const TensorView*> views, int64_t N, const char* op);

// ---- Per-operation checks ------------------------------------------------------------------------

// copy_2d: rows of cols elements, row r at src[r·src_stride] and dst[r·dst_stride], inside both
// views, of one dtype. Returns whether there is anything to copy.
bool check_copy_2d(const TensorView& src, int64_t src_stride, const TensorView& dst,
                   int64_t dst_stride, int64_t rows, int64_t cols);

// x [N, in] · w [out, in]ᵀ -> y [N, out]
struct LinearDims {
  int64_t N, in, out;
};
// x, w, y: F32 or BF16.
LinearDims check_linear_forward(const TensorView& x, const TensorView& w, const TensorView& y);
// dy [N, out], x [N, in], w [out, in]: F32 or BF16; dx [N, in], dw [out, in]: F32 when given.
LinearDims check_linear_backward(const TensorView& dy, const TensorView& x, const TensorView& w,
                                 const TensorView& dx, const TensorView& dw);

// N rows of h.
struct RowsDims {
  int64_t N, h;
};
// rmsnorm_forward / rmsnorm_apply (op): x [N, h], w [h], y [N, h] F32 or BF16; rstd [N] F32;
// eps >= 0 (pass 0 for rmsnorm_apply).
RowsDims check_rmsnorm(const TensorView& x, const TensorView& w, const TensorView& y,
                       const TensorView& rstd, float eps, const char* op);
// dy [N, h] F32, x [N, h] and w [h] F32 or BF16, rstd [N] F32; dx [N, h] and dw [h] F32 when
// given.
RowsDims check_rmsnorm_backward(const TensorView& dy, const TensorView& x, const TensorView& w,
                                const TensorView& rstd, const TensorView& dx, const TensorView& dw);

// rope_forward / rope_backward (op): x [N, heads, d] F32 or BF16, positions [N] I64.
void check_rope(const TensorView& x, const TensorView& pos, const char* op);

// g, u [.., F] F32 and a of as many elements, F32 or BF16.
void check_swiglu_forward(const TensorView& g, const TensorView& u, const TensorView& a);
// Every operand F32, as many elements as g.
void check_swiglu_backward(const TensorView& da, const TensorView& g, const TensorView& u,
                           const TensorView& dg, const TensorView& du);

// ids [N] I32, table [V_shard, h], out [N, h], v0 >= 0. The dtypes of table and out are the
// backend's to check.
RowsDims check_embedding_forward(const TensorView& ids, const TensorView& table,
                                 const TensorView& out, int64_t v0);
// ids [N] I32, dout [N, h] F32, dtable [V_shard, h] F32, v0 >= 0.
RowsDims check_embedding_backward(const TensorView& ids, const TensorView& dout,
                                  const TensorView& dtable, int64_t v0);

// N rows of V logits.
struct LogitsDims {
  int64_t N, V;
};
// logits [N, V] F32 (V > 0 unless N = 0), labels [N] I32, loss F64, dlogits [N, V] F32 when given.
LogitsDims check_cross_entropy(const TensorView& logits, const TensorView& labels,
                               const TensorView& dlogits, const TensorView& loss);
// logits [N, V] F32, labels [N] I32, the statistics [N] F32.
LogitsDims check_online_softmax_update(const TensorView& logits, const TensorView& labels,
                                       const TensorView& row_max, const TensorView& row_sum,
                                       const TensorView& target);
// Four statistics of N F32 values; returns N.
int64_t check_online_softmax_merge(const TensorView& max_a, const TensorView& sum_a,
                                   const TensorView& max_b, const TensorView& sum_b);
// logits and dlogits [N, V] F32, labels [N] I32, the statistics [N] F32.
LogitsDims check_online_softmax_backward(const TensorView& logits, const TensorView& labels,
                                         const TensorView& row_max, const TensorView& row_sum,
                                         const TensorView& dlogits);
// The statistics [N] F32, labels [N] I32, loss F64; returns N.
int64_t check_online_softmax_loss(const TensorView& row_max, const TensorView& row_sum,
                                  const TensorView& target, const TensorView& labels,
                                  const TensorView& loss);

// Weights, gradients and moments: F32, as many elements each.
void check_adamw(const TensorView& w, const TensorView& g, const TensorView& m,
                 const TensorView& v);

}  // namespace tsp::checks
