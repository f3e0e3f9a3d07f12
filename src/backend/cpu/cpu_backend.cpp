// The CPU backend: oneDNN GEMMs (fp32, and bf16 inputs with fp32 accumulation) and our AVX-512
// kernels (src/ops/cpu/), behind the Backend interface. Every entry checks that its views are host
// memory and have the shapes and dtypes the interface names, then calls the raw-pointer kernel.
//
// Mixed precision: the usual dtype combinations of the engine (bf16 weights and activations, fp32
// gradients and statistics) call the native bf16 kernels, whose arithmetic is fp32 and whose bf16
// outputs are rounded once. Any other combination is served by converting operands in a transient
// workspace: F32 inputs of a GEMM that meets bf16 are rounded to bf16 (a GEMM runs in the lower
// precision of its inputs), other bf16 operands are widened to fp32 and a bf16 output is rounded
// once at the end.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>

#include "backend/checks.h"
#include "tsp/backend/backend.h"
#include "tsp/core/error.h"
#include "tsp/ops/attention.h"
#include "tsp/ops/gemm.h"
#include "tsp/ops/ops.h"

namespace tsp {
namespace {

constexpr MemCategory kWork = MemCategory::Workspace;

using namespace checks;

void check_host(std::initializer_list<const TensorView*> views, const char* op) {
  check_device(views, Device::cpu(), op);
}
bool all_bf16(std::initializer_list<const TensorView*> views) {
  for (const TensorView* v : views)
    if (v->dtype() != DType::BF16) return false;
  return true;
}

// An fp32 view of t: t itself when it is f32, else a widened copy held by `hold`.
TensorView as_f32(TensorView t, Tensor& hold) {
  if (t.empty() || t.dtype() == DType::F32) return t;
  hold = Tensor(t.shape(), DType::F32, kWork);
  copy(t, hold.view());
  return hold.view();
}
// A bf16 view of t: t itself when it is bf16, else a rounded copy held by `hold`.
TensorView as_bf16(TensorView t, Tensor& hold) {
  if (t.empty() || t.dtype() == DType::BF16) return t;
  hold = Tensor(t.shape(), DType::BF16, kWork);
  copy(t, hold.view());
  return hold.view();
}
// An fp32 output: out itself when f32, else an fp32 workspace (holding out's values when the
// operation accumulates); finish() rounds it back into out.
struct F32Out {
  TensorView out, f32;
  Tensor hold;
  F32Out(TensorView o, bool load) : out(o) {
    if (o.empty() || o.dtype() == DType::F32) {
      f32 = o;
      return;
    }
    hold = Tensor(o.shape(), DType::F32, kWork);
    if (load) copy(o, hold.view());
    f32 = hold.view();
  }
  void finish() {
    if (!hold.empty()) copy(hold.view(), out);
  }
};

class CpuBackend final : public Backend {
 public:
  Device device() const override { return Device::cpu(); }
  std::string name() const override {
#if defined(__AVX512BF16__)
    return "cpu (oneDNN GEMMs, AVX-512 BF16 kernels)";
#elif defined(__AVX512F__)
    return "cpu (oneDNN GEMMs, AVX-512 kernels)";
#else
    return "cpu (oneDNN GEMMs, portable kernels)";
#endif
  }
  bool native_bf16() const override {
#if defined(__AVX512BF16__)
    return true;
#else
    return false;
#endif
  }

  // ---- memory -------------------------------------------------------------------------------
  void zero(TensorView t) override {
    check_host({&t}, "zero");
    if (t.nbytes()) std::memset(t.data(), 0, t.nbytes());
  }
  void fill(TensorView t, float value) override {
    check_host({&t}, "fill");
    if (t.dtype() == DType::F32) {
      std::fill(t.f32(), t.f32() + t.numel(), value);
    } else {
      check_dtype(t, DType::BF16, "fill", "the tensor");
      std::fill(t.data_as<bf16>(), t.data_as<bf16>() + t.numel(), bf16(value));
    }
  }
  void copy(TensorView src, TensorView dst) override {
    check_host({&src, &dst}, "copy");
    tsp::copy(src, dst);
  }
  void copy_2d(TensorView src, int64_t src_stride, TensorView dst, int64_t dst_stride, int64_t rows,
               int64_t cols) override {
    check_host({&src, &dst}, "copy_2d");
    if (!check_copy_2d(src, src_stride, dst, dst_stride, rows, cols)) return;
    const size_t es = dtype_size(src.dtype());
    const auto* s = static_cast<const char*>(src.data());
    auto* d = static_cast<char*>(dst.data());
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(d + r * dst_stride * es, s + r * src_stride * es, cols * es);
  }
  void swap_leading_dims(TensorView src, TensorView dst) override {
    check_host({&src, &dst}, "swap_leading_dims");
    tsp::swap_leading_dims(src, dst);
  }
  void upload(const void* host, TensorView dst) override {
    check_host({&dst}, "upload");
    if (dst.nbytes()) std::memcpy(dst.data(), host, dst.nbytes());
  }
  void download(TensorView src, void* host) override {
    check_host({&src}, "download");
    if (src.nbytes()) std::memcpy(host, src.data(), src.nbytes());
  }
  void synchronize() override {}  // every CPU operation has finished when its call returns

  // ---- element-wise and reductions -----------------------------------------------------------
  void add(TensorView y, TensorView x) override {
    check_host({&y, &x}, "add");
    check_numel(x, y.numel(), "add", "x");
    Tensor hx;
    TensorView xf = as_f32(x, hx);
    F32Out out(y, /*load=*/true);
    add_inplace(out.f32.f32(), xf.f32(), y.numel());
    out.finish();
  }
  void scale(TensorView y, float factor) override {
    check_host({&y}, "scale");
    F32Out out(y, true);
    scale_inplace(out.f32.f32(), factor, y.numel());
    out.finish();
  }
  void sum_squares(TensorView x, TensorView out) override {
    check_host({&x, &out}, "sum_squares");
    check_dtype(x, DType::F32, "sum_squares", "x");
    check_dtype(out, DType::F64, "sum_squares", "out");
    const float* g = x.f32();
    double acc = 0;
    for (int64_t j = 0; j < x.numel(); ++j) acc += static_cast<double>(g[j]) * g[j];
    out.data_as<double>()[0] += acc;
  }
  void count_non_finite(TensorView x, TensorView out, bool also_negative) override {
    check_host({&x, &out}, "count_non_finite");
    check_dtype(out, DType::I64, "count_non_finite", "out");
    // Integer arithmetic on the bits (exponent all ones: Inf or NaN; sign bit set and not -0:
    // negative) vectorises, unlike std::isfinite; this runs over every weight after every step.
    int64_t bad = 0;
    if (x.dtype() == DType::F32) {
      const auto* p = static_cast<const uint32_t*>(x.data());
      for (int64_t i = 0; i < x.numel(); ++i) {
        const uint32_t u = p[i];
        bad += ((u & 0x7f800000u) == 0x7f800000u) || (also_negative && u > 0x80000000u);
      }
    } else {
      check_dtype(x, DType::BF16, "count_non_finite", "x");
      const auto* p = static_cast<const uint16_t*>(x.data());
      for (int64_t i = 0; i < x.numel(); ++i) {
        const uint16_t u = p[i];
        bad += ((u & 0x7f80u) == 0x7f80u) || (also_negative && u > 0x8000u);
      }
    }
    out.data_as<int64_t>()[0] += bad;
  }

  // ---- linear -------------------------------------------------------------------------------
  void linear_forward(TensorView x, TensorView w, TensorView y, bool accumulate) override {
    const char* op = "linear_forward";
    check_host({&x, &w, &y}, op);
    const auto [N, in, out] = check_linear_forward(x, w, y);
    if (x.dtype() == DType::F32 && w.dtype() == DType::F32 && y.dtype() == DType::F32) {
      tsp::linear_forward(x.f32(), w.f32(), y.f32(), N, in, out, accumulate);
      return;
    }
    Tensor hx, hw;
    const TensorView xb = as_bf16(x, hx), wb = as_bf16(w, hw);
    if (y.dtype() == DType::BF16)
      tsp::linear_forward(xb.data_as<bf16>(), wb.data_as<bf16>(), y.data_as<bf16>(), N, in, out,
                          accumulate);
    else
      tsp::linear_forward(xb.data_as<bf16>(), wb.data_as<bf16>(), y.f32(), N, in, out, accumulate);
  }
  void linear_backward(TensorView dy, TensorView x, TensorView w, TensorView dx,
                       TensorView dw) override {
    const char* op = "linear_backward";
    check_host({&dy, &x, &w, &dx, &dw}, op);
    const auto [N, in, out] = check_linear_backward(dy, x, w, dx, dw);
    if (dy.dtype() == DType::F32 && x.dtype() == DType::F32 && w.dtype() == DType::F32) {
      tsp::linear_backward(dy.f32(), x.f32(), w.f32(), dx.empty() ? nullptr : dx.f32(),
                           dw.empty() ? nullptr : dw.f32(), N, in, out);
      return;
    }
    // The GEMMs run in bf16 (fp32 accumulation into the fp32 gradients): dy, usually an fp32
    // gradient, is rounded to bf16 first, as mixed precision does on every device.
    Tensor hdy, hx, hw;
    const TensorView dyb = as_bf16(dy, hdy);
    const TensorView xb = dw.empty() ? x : as_bf16(x, hx);
    const TensorView wb = dx.empty() ? w : as_bf16(w, hw);
    tsp::linear_backward(dyb.data_as<bf16>(), dw.empty() ? nullptr : xb.data_as<bf16>(),
                         dx.empty() ? nullptr : wb.data_as<bf16>(), dx.empty() ? nullptr : dx.f32(),
                         dw.empty() ? nullptr : dw.f32(), N, in, out);
  }

  // ---- RMSNorm ------------------------------------------------------------------------------
  void rmsnorm_forward(TensorView x, TensorView w, TensorView y, TensorView rstd,
                       float eps) override {
    const char* op = "rmsnorm_forward";
    check_host({&x, &w, &y, &rstd}, op);
    const auto [N, h] = check_rmsnorm(x, w, y, rstd, eps, op);
    if (all_bf16({&x, &w, &y})) {
      tsp::rmsnorm_forward(x.data_as<bf16>(), w.data_as<bf16>(), y.data_as<bf16>(), rstd.f32(), N,
                           h, eps);
      return;
    }
    Tensor hx, hw;
    const TensorView xf = as_f32(x, hx), wf = as_f32(w, hw);
    F32Out yo(y, false);
    tsp::rmsnorm_forward(xf.f32(), wf.f32(), yo.f32.f32(), rstd.f32(), N, h, eps);
    yo.finish();
  }
  void rmsnorm_apply(TensorView x, TensorView w, TensorView rstd, TensorView y) override {
    const char* op = "rmsnorm_apply";
    check_host({&x, &w, &y, &rstd}, op);
    const auto [N, h] = check_rmsnorm(x, w, y, rstd, /*eps=*/0.f, op);
    if (all_bf16({&x, &w, &y})) {
      tsp::rmsnorm_apply(x.data_as<bf16>(), w.data_as<bf16>(), rstd.f32(), y.data_as<bf16>(), N, h);
      return;
    }
    Tensor hx, hw;
    const TensorView xf = as_f32(x, hx), wf = as_f32(w, hw);
    F32Out yo(y, false);
    tsp::rmsnorm_apply(xf.f32(), wf.f32(), rstd.f32(), yo.f32.f32(), N, h);
    yo.finish();
  }
  void rmsnorm_backward(TensorView dy, TensorView x, TensorView w, TensorView rstd, TensorView dx,
                        TensorView dw) override {
    const char* op = "rmsnorm_backward";
    check_host({&dy, &x, &w, &rstd, &dx, &dw}, op);
    const auto [N, h] = check_rmsnorm_backward(dy, x, w, rstd, dx, dw);
    // The CPU kernel writes both gradients: dx and dw are required here.
    check_numel(dx, N * h, op, "dx");
    check_numel(dw, h, op, "dw");
    if (all_bf16({&x, &w})) {
      tsp::rmsnorm_backward(dy.f32(), x.data_as<bf16>(), w.data_as<bf16>(), rstd.f32(), dx.f32(),
                            dw.f32(), N, h);
      return;
    }
    Tensor hx, hw;
    const TensorView xf = as_f32(x, hx), wf = as_f32(w, hw);
    tsp::rmsnorm_backward(dy.f32(), xf.f32(), wf.f32(), rstd.f32(), dx.f32(), dw.f32(), N, h);
  }

  // ---- RoPE ---------------------------------------------------------------------------------
  void rope(TensorView x, TensorView pos, float theta, bool forward) {
    const char* op = forward ? "rope_forward" : "rope_backward";
    check_host({&x, &pos}, op);
    check_rope(x, pos, op);
    if (forward && x.dtype() == DType::BF16) {
      tsp::rope_forward(x.data_as<bf16>(), pos.data_as<int64_t>(), x.dim(0), x.dim(1), x.dim(2),
                        theta);
      return;
    }
    F32Out xo(x, true);
    if (forward)
      tsp::rope_forward(xo.f32.f32(), pos.data_as<int64_t>(), x.dim(0), x.dim(1), x.dim(2), theta);
    else
      tsp::rope_backward(xo.f32.f32(), pos.data_as<int64_t>(), x.dim(0), x.dim(1), x.dim(2), theta);
    xo.finish();
  }
  void rope_forward(TensorView x, TensorView pos, float theta) override {
    rope(x, pos, theta, true);
  }
  void rope_backward(TensorView dx, TensorView pos, float theta) override {
    rope(dx, pos, theta, false);
  }

  // ---- SwiGLU -------------------------------------------------------------------------------
  void swiglu_forward(TensorView g, TensorView u, TensorView a) override {
    const char* op = "swiglu_forward";
    check_host({&g, &u, &a}, op);
    check_swiglu_forward(g, u, a);
    const int64_t F = last_dim(g);
    if (a.dtype() == DType::BF16) {
      tsp::swiglu_forward(g.f32(), u.f32(), a.data_as<bf16>(), rows_of(g, F, op, "g"), F);
      return;
    }
    F32Out ao(a, false);
    tsp::swiglu_forward(g.f32(), u.f32(), ao.f32.f32(), rows_of(g, F, op, "g"), F);
    ao.finish();
  }
  void swiglu_backward(TensorView da, TensorView g, TensorView u, TensorView dg,
                       TensorView du) override {
    const char* op = "swiglu_backward";
    check_host({&da, &g, &u, &dg, &du}, op);
    check_swiglu_backward(da, g, u, dg, du);
    const int64_t F = last_dim(g);
    tsp::swiglu_backward(da.f32(), g.f32(), u.f32(), dg.f32(), du.f32(), rows_of(g, F, op, "g"), F);
  }

  // ---- embedding ----------------------------------------------------------------------------
  void embedding_forward(TensorView ids, TensorView table, TensorView out, int64_t v0) override {
    const char* op = "embedding_forward";
    check_host({&ids, &table, &out}, op);
    const auto [N, h] = check_embedding_forward(ids, table, out, v0);
    if (table.dtype() == out.dtype() && table.dtype() == DType::F32) {
      tsp::embedding_forward(ids.data_as<int32_t>(), table.f32(), out.f32(), N, h, v0,
                             table.dim(0));
      return;
    }
    if (table.dtype() == DType::BF16 && out.dtype() == DType::BF16) {
      tsp::embedding_forward(ids.data_as<int32_t>(), table.data_as<bf16>(), out.data_as<bf16>(), N,
                             h, v0, table.dim(0));
      return;
    }
    // Row copies: the rows in range are copied (any dtype pair), the others left untouched.
    const int32_t* id = ids.data_as<int32_t>();
    for (int64_t i = 0; i < N; ++i) {
      const int64_t r = static_cast<int64_t>(id[i]) - v0;
      if (r >= 0 && r < table.dim(0)) tsp::copy(table.window(r * h, {h}), out.window(i * h, {h}));
    }
  }
  void embedding_backward(TensorView ids, TensorView dout, TensorView dtable, int64_t v0) override {
    const char* op = "embedding_backward";
    check_host({&ids, &dout, &dtable}, op);
    const auto [N, h] = check_embedding_backward(ids, dout, dtable, v0);
    tsp::embedding_backward(ids.data_as<int32_t>(), dout.f32(), dtable.f32(), N, h, v0,
                            dtable.dim(0));
  }

  // ---- cross-entropy ------------------------------------------------------------------------
  void cross_entropy(TensorView logits, TensorView labels, TensorView dlogits, float grad_scale,
                     TensorView loss, int32_t ignore_index) override {
    const char* op = "cross_entropy";
    check_host({&logits, &labels, &dlogits, &loss}, op);
    const auto [N, V] = check_cross_entropy(logits, labels, dlogits, loss);
    Tensor scratch;
    float* dl = nullptr;
    if (dlogits.empty()) {
      scratch = Tensor::f32({N, V}, kWork);  // the kernel always writes gradients
      dl = scratch.f32();
    } else {
      dl = dlogits.f32();
    }
    loss.data_as<double>()[0] += tsp::cross_entropy_forward_backward(
        logits.f32(), labels.data_as<int32_t>(), dl, N, V, grad_scale, ignore_index);
  }
  void online_softmax_update(TensorView logits, TensorView labels, TensorView row_max,
                             TensorView row_sum, TensorView target, int64_t v0) override {
    const char* op = "online_softmax_update";
    check_host({&logits, &labels, &row_max, &row_sum, &target}, op);
    const auto [N, V] = check_online_softmax_update(logits, labels, row_max, row_sum, target);
    tsp::online_softmax_update(logits.f32(), labels.data_as<int32_t>(), row_max.f32(),
                               row_sum.f32(), target.f32(), N, V, v0);
  }
  void online_softmax_merge(TensorView max_a, TensorView sum_a, TensorView max_b,
                            TensorView sum_b) override {
    const char* op = "online_softmax_merge";
    check_host({&max_a, &sum_a, &max_b, &sum_b}, op);
    const int64_t N = check_online_softmax_merge(max_a, sum_a, max_b, sum_b);
    tsp::online_softmax_merge(max_a.f32(), sum_a.f32(), max_b.f32(), sum_b.f32(), N);
  }
  void online_softmax_backward(TensorView logits, TensorView labels, TensorView row_max,
                               TensorView row_sum, TensorView dlogits, int64_t v0, float grad_scale,
                               int32_t ignore_index) override {
    const char* op = "online_softmax_backward";
    check_host({&logits, &labels, &row_max, &row_sum, &dlogits}, op);
    const auto [N, V] = check_online_softmax_backward(logits, labels, row_max, row_sum, dlogits);
    tsp::online_softmax_backward(logits.f32(), labels.data_as<int32_t>(), row_max.f32(),
                                 row_sum.f32(), dlogits.f32(), N, V, v0, grad_scale, ignore_index);
  }
  void online_softmax_loss(TensorView row_max, TensorView row_sum, TensorView target,
                           TensorView labels, TensorView loss, int32_t ignore_index) override {
    const char* op = "online_softmax_loss";
    check_host({&row_max, &row_sum, &target, &labels, &loss}, op);
    const int64_t N = check_online_softmax_loss(row_max, row_sum, target, labels, loss);
    const float *m = row_max.f32(), *s = row_sum.f32(), *t = target.f32();
    const int32_t* l = labels.data_as<int32_t>();
    double acc = 0;
    for (int64_t i = 0; i < N; ++i) {
      if (l[i] == ignore_index) continue;
      acc += static_cast<double>(m[i]) + std::log(static_cast<double>(s[i])) -
             static_cast<double>(t[i]);
    }
    loss.data_as<double>()[0] += acc;
  }

  // ---- attention ----------------------------------------------------------------------------
  static AttentionParams params(const TensorView& q, const TensorView& k, const TensorView& q_pos,
                                const TensorView& k_pos, const TensorView& q_doc_pos, float scale,
                                const char* op) {
    TSP_CHECK(q.rank() == 3 && k.rank() == 3 && q.dim(2) == k.dim(2),
              "{}: q must be [nq, hq, d] and k, v [nk, hkv, d], got {} and {}", op,
              shape_str(q.shape()), shape_str(k.shape()));
    check_dtype(q_pos, DType::I64, op, "q_pos");
    check_dtype(k_pos, DType::I64, op, "k_pos");
    check_numel(q_pos, q.dim(0), op, "q_pos");
    check_numel(k_pos, k.dim(0), op, "k_pos");
    if (!q_doc_pos.empty()) {
      check_dtype(q_doc_pos, DType::I64, op, "q_doc_pos");
      check_numel(q_doc_pos, q.dim(0), op, "q_doc_pos");
    }
    AttentionParams p;
    p.n_q = q.dim(0);
    p.n_k = k.dim(0);
    p.n_heads = q.dim(1);
    p.n_kv_heads = k.dim(1);
    p.head_dim = q.dim(2);
    p.scale = scale;
    p.q_pos = q_pos.data_as<int64_t>();
    p.k_pos = k_pos.data_as<int64_t>();
    p.q_doc_pos = q_doc_pos.empty() ? nullptr : q_doc_pos.data_as<int64_t>();
    return p;
  }
  void attention_forward(TensorView q, TensorView k, TensorView v, TensorView q_pos,
                         TensorView k_pos, TensorView q_doc_pos, TensorView o, TensorView lse,
                         float scale) override {
    const char* op = "attention_forward";
    check_host({&q, &k, &v, &q_pos, &k_pos, &q_doc_pos, &o, &lse}, op);
    AttentionParams p = params(q, k, q_pos, k_pos, q_doc_pos, scale, op);
    check_numel(v, k.numel(), op, "v");
    check_numel(o, q.numel(), op, "o");
    check_numel(lse, p.n_q * p.n_heads, op, "lse");
    check_dtype(lse, DType::F32, op, "lse");
    if (all_bf16({&q, &k, &v, &o})) {
      AttentionBf16Params b;
      b.n_q = p.n_q, b.n_k = p.n_k, b.n_heads = p.n_heads, b.n_kv_heads = p.n_kv_heads;
      b.head_dim = p.head_dim, b.scale = p.scale, b.q_pos = p.q_pos, b.k_pos = p.k_pos;
      b.q_doc_pos = p.q_doc_pos;
      b.q = q.data_as<bf16>(), b.k = k.data_as<bf16>(), b.v = v.data_as<bf16>();
      b.o = o.data_as<bf16>(), b.lse = lse.f32();
      tsp::attention_forward(b);
      return;
    }
    Tensor hq, hk, hv;
    const TensorView qf = as_f32(q, hq), kf = as_f32(k, hk), vf = as_f32(v, hv);
    F32Out oo(o, false);
    p.q = qf.f32();
    p.k = kf.f32();
    p.v = vf.f32();
    p.o = oo.f32.f32();
    p.lse = lse.f32();
    tsp::attention_forward(p);
    oo.finish();
  }
  void attention_backward(TensorView q, TensorView k, TensorView v, TensorView q_pos,
                          TensorView k_pos, TensorView q_doc_pos, TensorView o, TensorView lse,
                          TensorView dout, TensorView dq, TensorView dk, TensorView dv,
                          float scale) override {
    const char* op = "attention_backward";
    check_host({&q, &k, &v, &q_pos, &k_pos, &q_doc_pos, &o, &lse, &dout, &dq, &dk, &dv}, op);
    AttentionBackwardParams p;
    static_cast<AttentionParams&>(p) = params(q, k, q_pos, k_pos, q_doc_pos, scale, op);
    check_numel(v, k.numel(), op, "v");
    check_numel(o, q.numel(), op, "o");
    check_numel(dout, q.numel(), op, "dout");
    check_numel(dq, q.numel(), op, "dq");
    check_numel(dk, k.numel(), op, "dk");
    check_numel(dv, k.numel(), op, "dv");
    for (const TensorView* t : {&lse, &dout, &dq, &dk, &dv})
      check_dtype(*t, DType::F32, op, "lse and gradients");
    if (all_bf16({&q, &k, &v, &o})) {
      AttentionBf16BackwardParams b;
      b.n_q = p.n_q, b.n_k = p.n_k, b.n_heads = p.n_heads, b.n_kv_heads = p.n_kv_heads;
      b.head_dim = p.head_dim, b.scale = p.scale, b.q_pos = p.q_pos, b.k_pos = p.k_pos;
      b.q_doc_pos = p.q_doc_pos;
      b.q = q.data_as<bf16>(), b.k = k.data_as<bf16>(), b.v = v.data_as<bf16>();
      b.o = o.data_as<bf16>(), b.lse = lse.f32();
      b.dout = dout.f32(), b.dq = dq.f32(), b.dk = dk.f32(), b.dv = dv.f32();
      tsp::attention_backward(b);
      return;
    }
    Tensor hq, hk, hv, ho;
    const TensorView qf = as_f32(q, hq), kf = as_f32(k, hk), vf = as_f32(v, hv), of = as_f32(o, ho);
    p.q = qf.f32();
    p.k = kf.f32();
    p.v = vf.f32();
    p.o = of.f32();
    p.lse = lse.f32();
    p.dout = dout.f32();
    p.dq = dq.f32();
    p.dk = dk.f32();
    p.dv = dv.f32();
    tsp::attention_backward(p);
  }
  void attention_merge(TensorView o_a, TensorView lse_a, TensorView o_b,
                       TensorView lse_b) override {
    const char* op = "attention_merge";
    check_host({&o_a, &lse_a, &o_b, &lse_b}, op);
    TSP_CHECK(o_a.rank() == 3, "{}: o must be [nq, hq, d], got {}", op, shape_str(o_a.shape()));
    check_numel(o_b, o_a.numel(), op, "o_b");
    check_numel(lse_a, o_a.dim(0) * o_a.dim(1), op, "lse_a");
    check_numel(lse_b, lse_a.numel(), op, "lse_b");
    if (all_bf16({&o_a, &o_b})) {
      tsp::attention_merge(o_a.data_as<bf16>(), lse_a.f32(), o_b.data_as<bf16>(), lse_b.f32(),
                           o_a.dim(0), o_a.dim(1), o_a.dim(2));
      return;
    }
    Tensor hb;
    const TensorView bf = as_f32(o_b, hb);
    F32Out ao(o_a, true);
    tsp::attention_merge(ao.f32.f32(), lse_a.f32(), bf.f32(), lse_b.f32(), o_a.dim(0), o_a.dim(1),
                         o_a.dim(2));
    ao.finish();
  }

  // ---- optimizer ----------------------------------------------------------------------------
  void adamw(TensorView w_, TensorView g_, TensorView m_, TensorView v_,
             const AdamWStep& st) override {
    const char* op = "adamw";
    check_host({&w_, &g_, &m_, &v_}, op);
    check_adamw(w_, g_, m_, v_);
    float* __restrict w = w_.f32();
    const float* __restrict g = g_.f32();
    float* __restrict m = m_.f32();
    float* __restrict v = v_.f32();
    const int64_t n = w_.numel();
    // Pure f32, the same expression order as torch.optim.AdamW's single-tensor path (see
    // train/optimizer.h); it vectorises and gives the same bits on every rank.
    for (int64_t j = 0; j < n; ++j) {
      const float gj = g[j] * st.grad_scale;
      m[j] = st.beta1 * m[j] + st.one_minus_beta1 * gj;
      v[j] = st.beta2 * v[j] + st.one_minus_beta2 * gj * gj;
      const float denom = std::sqrt(v[j]) * st.inv_sqrt_bias2 + st.eps;
      w[j] = w[j] * st.decay - st.step_size * (m[j] / denom);
    }
  }
};

}  // namespace

double Backend::host_f64(TensorView scalar) {
  TSP_CHECK(scalar.dtype() == DType::F64 && scalar.numel() == 1, "host_f64: {} {}",
            dtype_name(scalar.dtype()), shape_str(scalar.shape()));
  double v = 0;
  download(scalar, &v);
  return v;
}

int64_t Backend::host_i64(TensorView scalar) {
  TSP_CHECK(scalar.dtype() == DType::I64 && scalar.numel() == 1, "host_i64: {} {}",
            dtype_name(scalar.dtype()), shape_str(scalar.shape()));
  int64_t v = 0;
  download(scalar, &v);
  return v;
}

namespace {
struct BackendRegistry {
  std::mutex mutex;
  std::map<std::pair<int, int>, std::unique_ptr<Backend>> devices;
};
BackendRegistry& backends() {
  static BackendRegistry r;
  return r;
}
}  // namespace

static Backend* find_backend(Device device) {
  BackendRegistry& r = backends();
  std::lock_guard lock(r.mutex);
  auto it = r.devices.find({static_cast<int>(device.kind), device.index});
  return it == r.devices.end() ? nullptr : it->second.get();
}

Backend& backend_for(Device device) {
  static CpuBackend cpu;
  if (device.is_cpu()) return cpu;
  if (Backend* b = find_backend(device)) return *b;
  // First use of the device: its kind's initialiser (core/device.h) registers its allocator and
  // backend, or says why it cannot ("this build has no CUDA backend", "no CUDA device 1: found 1").
  try {
    initialize_device(device);
  } catch (const Error& e) {
    TSP_FAIL("no backend for device {}: {}", device.str(), e.message());
  }
  Backend* b = find_backend(device);
  TSP_CHECK(b, "no backend for device {}: its initialiser registered none", device.str());
  return *b;
}

void register_backend(Device device, std::unique_ptr<Backend> backend) {
  TSP_CHECK(!device.is_cpu(), "the CPU backend is built in");
  BackendRegistry& r = backends();
  std::lock_guard lock(r.mutex);
  r.devices[{static_cast<int>(device.kind), device.index}] = std::move(backend);
}

DType default_compute_dtype(const Backend& backend) {
  return backend.native_bf16() ? DType::BF16 : DType::F32;
}

}  // namespace tsp
