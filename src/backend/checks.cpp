// Argument checks shared by the backends: see checks.h.
#include "backend/checks.h"

#include "tsp/core/error.h"

namespace tsp::checks {

// ---- Operand checks ------------------------------------------------------------------------------

void check_device(std::initializer_list<const TensorView*> views, Device device, const char* op) {
  // "the CPU backend" (any host view is fine), "the cuda:0 backend" (that device only).
  for (const TensorView* v : views)
    TSP_CHECK(v->empty() || (device.is_cpu() ? v->device().is_cpu() : v->device() == device),
              "{}: a tensor {} {} on {} was given to the {} backend", op, shape_str(v->shape()),
              dtype_name(v->dtype()), v->device().str(), device.is_cpu() ? "CPU" : device.str());
}
void check_dtype(const TensorView& t, DType want, const char* op, const char* what) {
  TSP_CHECK(t.dtype() == want, "{}: {} must be {}, got {} {}", op, what, dtype_name(want),
            dtype_name(t.dtype()), shape_str(t.shape()));
}
void check_float(const TensorView& t, const char* op, const char* what) {
  TSP_CHECK(t.dtype() == DType::F32 || t.dtype() == DType::BF16,
            "{}: {} must be f32 or bf16, got {}", op, what, dtype_name(t.dtype()));
}
void check_numel(const TensorView& t, int64_t want, const char* op, const char* what) {
  TSP_CHECK(t.numel() == want, "{}: {} has {} elements ({}), expected {}", op, what, t.numel(),
            shape_str(t.shape()), want);
}
int64_t rows_of(const TensorView& t, int64_t cols, const char* op, const char* what) {
  TSP_CHECK(cols > 0 && t.numel() % cols == 0, "{}: {} {} is not a multiple of {} columns", op,
            what, shape_str(t.shape()), cols);
  return t.numel() / cols;
}
int64_t last_dim(const TensorView& t) {
  return t.rank() == 0 ? 1 : t.dim(-1);
}
void check_stats(std::initializer_list<const TensorView*> views, int64_t N, const char* op) {
  for (const TensorView* t : views) {
    check_numel(*t, N, op, "a statistic");
    check_dtype(*t, DType::F32, op, "a statistic");
  }
}

// ---- Memory -------------------------------------------------------------------------------------

bool check_copy_2d(const TensorView& src, int64_t src_stride, const TensorView& dst,
                   int64_t dst_stride, int64_t rows, int64_t cols) {
  TSP_CHECK(src.dtype() == dst.dtype(), "copy_2d: {} into {}", dtype_name(src.dtype()),
            dtype_name(dst.dtype()));
  TSP_CHECK(rows >= 0 && cols >= 0 && cols <= src_stride && cols <= dst_stride,
            "copy_2d: {} rows of {} with strides {} and {}", rows, cols, src_stride, dst_stride);
  if (rows == 0 || cols == 0) return false;
  TSP_CHECK((rows - 1) * src_stride + cols <= src.numel() &&
                (rows - 1) * dst_stride + cols <= dst.numel(),
            "copy_2d: {} rows of {} (strides {}, {}) overrun {} or {}", rows, cols, src_stride,
            dst_stride, shape_str(src.shape()), shape_str(dst.shape()));
  return true;
}

// ---- Linear -------------------------------------------------------------------------------------

LinearDims check_linear_forward(const TensorView& x, const TensorView& w, const TensorView& y) {
  const char* op = "linear_forward";
  TSP_CHECK(w.rank() == 2, "{}: weight must be [out, in], got {}", op, shape_str(w.shape()));
  const int64_t out = w.dim(0), in = w.dim(1), N = rows_of(x, in, op, "x");
  check_numel(y, N * out, op, "y");
  check_float(x, op, "x");
  check_float(w, op, "w");
  check_float(y, op, "y");
  return {N, in, out};
}

LinearDims check_linear_backward(const TensorView& dy, const TensorView& x, const TensorView& w,
                                 const TensorView& dx, const TensorView& dw) {
  const char* op = "linear_backward";
  TSP_CHECK(w.rank() == 2, "{}: weight must be [out, in], got {}", op, shape_str(w.shape()));
  const int64_t out = w.dim(0), in = w.dim(1), N = rows_of(dy, out, op, "dy");
  check_numel(x, N * in, op, "x");
  check_float(dy, op, "dy");
  check_float(x, op, "x");
  check_float(w, op, "w");
  if (!dx.empty()) check_numel(dx, N * in, op, "dx"), check_dtype(dx, DType::F32, op, "dx");
  if (!dw.empty()) check_numel(dw, out * in, op, "dw"), check_dtype(dw, DType::F32, op, "dw");
  return {N, in, out};
}

// ---- RMSNorm ------------------------------------------------------------------------------------

RowsDims check_rmsnorm(const TensorView& x, const TensorView& w, const TensorView& y,
                       const TensorView& rstd, float eps, const char* op) {
  const int64_t h = w.numel(), N = rows_of(x, h, op, "x");
  check_numel(y, N * h, op, "y");
  check_numel(rstd, N, op, "rstd");
  check_dtype(rstd, DType::F32, op, "rstd");
  for (const TensorView* t : {&x, &w, &y}) check_float(*t, op, "x, w and y");
  TSP_CHECK(eps >= 0.f, "{}: eps must be non-negative, got {}", op, eps);
  return {N, h};
}

RowsDims check_rmsnorm_backward(const TensorView& dy, const TensorView& x, const TensorView& w,
                                const TensorView& rstd, const TensorView& dx,
                                const TensorView& dw) {
  const char* op = "rmsnorm_backward";
  const int64_t h = w.numel(), N = rows_of(x, h, op, "x");
  check_numel(dy, N * h, op, "dy");
  check_numel(rstd, N, op, "rstd");
  check_dtype(dy, DType::F32, op, "dy");
  check_dtype(rstd, DType::F32, op, "rstd");
  check_float(x, op, "x");
  check_float(w, op, "w");
  if (!dx.empty()) check_numel(dx, N * h, op, "dx"), check_dtype(dx, DType::F32, op, "dx");
  if (!dw.empty()) check_numel(dw, h, op, "dw"), check_dtype(dw, DType::F32, op, "dw");
  return {N, h};
}

// ---- RoPE, SwiGLU -------------------------------------------------------------------------------

void check_rope(const TensorView& x, const TensorView& pos, const char* op) {
  TSP_CHECK(x.rank() == 3, "{}: x must be [N, heads, d], got {}", op, shape_str(x.shape()));
  check_dtype(pos, DType::I64, op, "positions");
  check_numel(pos, x.dim(0), op, "positions");
  check_float(x, op, "x");
}

void check_swiglu_forward(const TensorView& g, const TensorView& u, const TensorView& a) {
  const char* op = "swiglu_forward";
  check_dtype(g, DType::F32, op, "g");
  check_dtype(u, DType::F32, op, "u");
  check_float(a, op, "a");
  check_numel(u, g.numel(), op, "u");
  check_numel(a, g.numel(), op, "a");
}

void check_swiglu_backward(const TensorView& da, const TensorView& g, const TensorView& u,
                           const TensorView& dg, const TensorView& du) {
  const char* op = "swiglu_backward";
  for (const TensorView* t : {&da, &g, &u, &dg, &du}) {
    check_dtype(*t, DType::F32, op, "every operand");
    check_numel(*t, g.numel(), op, "an operand");
  }
}

// ---- Embedding ----------------------------------------------------------------------------------

RowsDims check_embedding_forward(const TensorView& ids, const TensorView& table,
                                 const TensorView& out, int64_t v0) {
  const char* op = "embedding_forward";
  check_dtype(ids, DType::I32, op, "ids");
  TSP_CHECK(table.rank() == 2, "{}: table must be [V_shard, h], got {}", op,
            shape_str(table.shape()));
  TSP_CHECK(v0 >= 0, "{}: v0={} must be >= 0", op, v0);
  const int64_t N = ids.numel(), h = table.dim(1);
  check_numel(out, N * h, op, "out");
  return {N, h};
}

RowsDims check_embedding_backward(const TensorView& ids, const TensorView& dout,
                                  const TensorView& dtable, int64_t v0) {
  const char* op = "embedding_backward";
  check_dtype(ids, DType::I32, op, "ids");
  check_dtype(dout, DType::F32, op, "dout");
  check_dtype(dtable, DType::F32, op, "dtable");
  TSP_CHECK(dtable.rank() == 2, "{}: dtable must be [V_shard, h], got {}", op,
            shape_str(dtable.shape()));
  TSP_CHECK(v0 >= 0, "{}: v0={} must be >= 0", op, v0);
  const int64_t N = ids.numel(), h = dtable.dim(1);
  check_numel(dout, N * h, op, "dout");
  return {N, h};
}

// ---- Cross-entropy ------------------------------------------------------------------------------

namespace {
// N from the labels, V from the logits' element count.
LogitsDims logits_dims(const TensorView& logits, const TensorView& labels, const char* op) {
  check_dtype(logits, DType::F32, op, "logits");
  check_dtype(labels, DType::I32, op, "labels");
  const int64_t N = labels.numel(), V = N ? logits.numel() / N : 0;
  check_numel(logits, N * V, op, "logits");
  return {N, V};
}
}  // namespace

LogitsDims check_cross_entropy(const TensorView& logits, const TensorView& labels,
                               const TensorView& dlogits, const TensorView& loss) {
  const char* op = "cross_entropy";
  const LogitsDims d = logits_dims(logits, labels, op);
  check_dtype(loss, DType::F64, op, "loss");
  TSP_CHECK(d.V > 0 || d.N == 0, "{}: empty vocabulary", op);
  if (!dlogits.empty()) {
    check_dtype(dlogits, DType::F32, op, "dlogits");
    check_numel(dlogits, d.N * d.V, op, "dlogits");
  }
  return d;
}

LogitsDims check_online_softmax_update(const TensorView& logits, const TensorView& labels,
                                       const TensorView& row_max, const TensorView& row_sum,
                                       const TensorView& target) {
  const char* op = "online_softmax_update";
  const LogitsDims d = logits_dims(logits, labels, op);
  check_stats({&row_max, &row_sum, &target}, d.N, op);
  return d;
}

int64_t check_online_softmax_merge(const TensorView& max_a, const TensorView& sum_a,
                                   const TensorView& max_b, const TensorView& sum_b) {
  const int64_t N = max_a.numel();
  check_stats({&max_a, &sum_a, &max_b, &sum_b}, N, "online_softmax_merge");
  return N;
}

LogitsDims check_online_softmax_backward(const TensorView& logits, const TensorView& labels,
                                         const TensorView& row_max, const TensorView& row_sum,
                                         const TensorView& dlogits) {
  const char* op = "online_softmax_backward";
  const LogitsDims d = logits_dims(logits, labels, op);
  check_dtype(dlogits, DType::F32, op, "dlogits");
  check_numel(dlogits, d.N * d.V, op, "dlogits");
  check_stats({&row_max, &row_sum}, d.N, op);
  return d;
}

int64_t check_online_softmax_loss(const TensorView& row_max, const TensorView& row_sum,
                                  const TensorView& target, const TensorView& labels,
                                  const TensorView& loss) {
  const char* op = "online_softmax_loss";
  const int64_t N = labels.numel();
  check_dtype(labels, DType::I32, op, "labels");
  check_stats({&row_max, &row_sum, &target}, N, op);
  check_dtype(loss, DType::F64, op, "loss");
  return N;
}

// ---- Optimizer ----------------------------------------------------------------------------------

void check_adamw(const TensorView& w, const TensorView& g, const TensorView& m,
                 const TensorView& v) {
  const char* op = "adamw";
  for (const TensorView* t : {&w, &g, &m, &v}) {
    check_dtype(*t, DType::F32, op, "weights, gradients and moments");
    check_numel(*t, w.numel(), op, "an operand");
  }
}

}  // namespace tsp::checks
