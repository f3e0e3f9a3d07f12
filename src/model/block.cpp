#include "tsp/model/block.h"

#include <algorithm>
#include <cmath>

namespace tsp::block {

namespace {
constexpr MemCategory kWork = MemCategory::Workspace;
}  // namespace

AttnDims attn_dims(const LlamaConfig& c, int64_t hq, int64_t hkv) {
  TSP_CHECK(hq > 0 && hkv > 0 && hq % hkv == 0,
            "a head group needs whole GQA groups: hq={} query heads, hkv={} kv heads", hq, hkv);
  AttnDims a;
  a.h = c.hidden_size;
  a.hq = hq;
  a.hkv = hkv;
  a.d = c.head_dim();
  a.theta = static_cast<float>(c.rope_theta);
  return a;
}

float AttnDims::scale() const {
  return 1.0f / std::sqrt(static_cast<float>(d));
}

// ---- attention -------------------------------------------------------------------------------

void qkv_forward(Backend& be, const AttnDims& a, const AttnWeights& w, TensorView xn,
                 TensorView pos, TensorView q, TensorView k, TensorView v) {
  be.linear_forward(xn, w.wq, q, /*accumulate=*/false);
  be.linear_forward(xn, w.wk, k, false);
  be.linear_forward(xn, w.wv, v, false);
  be.rope_forward(q, pos, a.theta);
  be.rope_forward(k, pos, a.theta);
}

void qkv_backward(Backend& be, const AttnDims& a, const AttnWeights& w, const AttnGrads& g,
                  TensorView xn, TensorView pos, TensorView dq, TensorView dk, TensorView dv,
                  TensorView dxn) {
  // RoPE is a rotation: its backward rotates the gradient back, in place.
  be.rope_backward(dq, pos, a.theta);
  be.rope_backward(dk, pos, a.theta);
  be.linear_backward(dq, xn, w.wq, dxn, g.dwq);
  be.linear_backward(dk, xn, w.wk, dxn, g.dwk);
  be.linear_backward(dv, xn, w.wv, dxn, g.dwv);
}

namespace {
// Row b of a [B·n, heads, d] view, and of a [B·n, heads] LSE view.
TensorView row(TensorView t, int64_t b, int64_t B) {
  const int64_t rows = t.dim(0) / B;
  return t.slice(b * rows, (b + 1) * rows);
}
// B rows of queries and keys, each row at the same positions; document positions (if any) for
// every query of every row.
void check_rows(const char* op, int64_t B, TensorView q, TensorView k, TensorView q_pos,
                TensorView k_pos, TensorView q_doc_pos) {
  TSP_CHECK(B >= 1 && q.dim(0) == B * q_pos.numel() && k.dim(0) == B * k_pos.numel(),
            "{}: {} rows of q {} at {} positions, k {} at {} positions", op, B,
            shape_str(q.shape()), q_pos.numel(), shape_str(k.shape()), k_pos.numel());
  TSP_CHECK(q_doc_pos.empty() || q_doc_pos.numel() == q.dim(0),
            "{}: q {} needs one document position per query, got {}", op, shape_str(q.shape()),
            q_doc_pos.numel());
}
// Row b of the document positions [B·nq], or the empty view (no documents).
TensorView doc_row(TensorView q_doc_pos, int64_t b, int64_t B) {
  return q_doc_pos.empty() ? TensorView() : row(q_doc_pos, b, B);
}
}  // namespace

void attention_forward(Backend& be, const AttnDims& a, int64_t B, TensorView q, TensorView k,
                       TensorView v, TensorView q_pos, TensorView k_pos, TensorView o,
                       TensorView lse, TensorView q_doc_pos) {
  check_rows("attention_forward", B, q, k, q_pos, k_pos, q_doc_pos);
  for (int64_t b = 0; b < B; ++b)
    be.attention_forward(row(q, b, B), row(k, b, B), row(v, b, B), q_pos, k_pos,
                         doc_row(q_doc_pos, b, B), row(o, b, B), row(lse, b, B), a.scale());
}

void attention_backward(Backend& be, const AttnDims& a, int64_t B, TensorView q, TensorView k,
                        TensorView v, TensorView q_pos, TensorView k_pos, TensorView o,
                        TensorView lse, TensorView dout, TensorView dq, TensorView dk,
                        TensorView dv, TensorView q_doc_pos) {
  check_rows("attention_backward", B, q, k, q_pos, k_pos, q_doc_pos);
  for (int64_t b = 0; b < B; ++b)
    be.attention_backward(row(q, b, B), row(k, b, B), row(v, b, B), q_pos, k_pos,
                          doc_row(q_doc_pos, b, B), row(o, b, B), row(lse, b, B), row(dout, b, B),
                          row(dq, b, B), row(dk, b, B), row(dv, b, B), a.scale());
}

void out_proj_forward(Backend& be, TensorView wo, TensorView o, TensorView y) {
  be.linear_forward(o, wo, y, /*accumulate=*/true);
}

void out_proj_backward(Backend& be, TensorView wo, TensorView o, TensorView dy, TensorView dout,
                       TensorView dwo) {
  be.zero(dout);
  be.linear_backward(dy, o, wo, dout, dwo);
}

// ---- MLP ---------------------------------------------------------------------------------------

namespace {
// The [m, cols] rows [t0, t0 + m) of a [n, cols] view.
TensorView rows(TensorView t, int64_t t0, int64_t m, int64_t cols) {
  return t.window(t0 * cols, {m, cols});
}
}  // namespace

void mlp_forward(Backend& be, const MlpWeights& w, TensorView xn, TensorView y,
                 const MlpSaved& keep, const std::function<void()>& after_chunk) {
  const int64_t f = w.wg.dim(0), h = w.wg.dim(1), n = xn.numel() / h;
  const int64_t rows_at_once = token_chunk(be.device().kind), chunk = std::min(n, rows_at_once);
  TSP_CHECK(keep.empty() || (keep.gate.numel() == n * f && keep.up.numel() == n * f &&
                             keep.act.numel() == n * f && keep.act.dtype() == w.wd.dtype()),
            "mlp_forward: kept activations of {} / {} / {} elements for [{}, {}]",
            keep.gate.numel(), keep.up.numel(), keep.act.numel(), n, f);
  // Without `keep`: one chunk's gate and up (fp32) and activation, which feeds the down
  // projection in the compute dtype of the weights.
  Tensor g, u, act;
  if (keep.empty()) {
    g = Tensor::f32({chunk, f}, kWork, be.device());
    u = Tensor::f32({chunk, f}, kWork, be.device());
    act = Tensor({chunk, f}, w.wd.dtype(), kWork, be.device());
  }
  for (int64_t t0 = 0; t0 < n; t0 += rows_at_once) {
    const int64_t m = std::min(rows_at_once, n - t0);
    const TensorView x = rows(xn, t0, m, h);
    const TensorView gv = keep.empty() ? g.window(0, {m, f}) : rows(keep.gate, t0, m, f);
    const TensorView uv = keep.empty() ? u.window(0, {m, f}) : rows(keep.up, t0, m, f);
    const TensorView av = keep.empty() ? act.window(0, {m, f}) : rows(keep.act, t0, m, f);
    be.linear_forward(x, w.wg, gv, false);
    be.linear_forward(x, w.wu, uv, false);
    be.swiglu_forward(gv, uv, av);
    be.linear_forward(av, w.wd, rows(y, t0, m, h), /*accumulate=*/true);
    if (after_chunk) after_chunk();
  }
}

void mlp_backward(Backend& be, const MlpWeights& w, const MlpGrads& gr, TensorView xn,
                  TensorView dy, TensorView dxn, const MlpSaved& keep,
                  const std::function<void()>& after_chunk) {
  const int64_t f = w.wg.dim(0), h = w.wg.dim(1), n = xn.numel() / h;
  const Device dev = be.device();
  const int64_t rows_at_once = token_chunk(dev.kind), chunk = std::min(n, rows_at_once);
  TSP_CHECK(keep.empty() || (keep.gate.numel() == n * f && keep.up.numel() == n * f &&
                             keep.act.numel() == n * f),
            "mlp_backward: kept activations of {} / {} / {} elements for [{}, {}]",
            keep.gate.numel(), keep.up.numel(), keep.act.numel(), n, f);
  Tensor g, u, act;  // the recomputed chunk (selective), as mlp_forward computed it
  if (keep.empty()) {
    g = Tensor::f32({chunk, f}, kWork, dev);
    u = Tensor::f32({chunk, f}, kWork, dev);
    act = Tensor({chunk, f}, w.wd.dtype(), kWork, dev);
  }
  Tensor da = Tensor::f32({chunk, f}, kWork, dev);  // da, then dg (swiglu_backward allows it)
  Tensor du = Tensor::f32({chunk, f}, kWork, dev);
  for (int64_t t0 = 0; t0 < n; t0 += rows_at_once) {
    const int64_t m = std::min(rows_at_once, n - t0);
    const TensorView x = rows(xn, t0, m, h), dav = da.window(0, {m, f}), duv = du.window(0, {m, f});
    TensorView gv, uv, av;
    if (keep.empty()) {  // recompute the gate/up activations (selective)
      gv = g.window(0, {m, f});
      uv = u.window(0, {m, f});
      av = act.window(0, {m, f});
      be.linear_forward(x, w.wg, gv, false);
      be.linear_forward(x, w.wu, uv, false);
      be.swiglu_forward(gv, uv, av);
    } else {  // kept by mlp_forward (none)
      gv = rows(keep.gate, t0, m, f);
      uv = rows(keep.up, t0, m, f);
      av = rows(keep.act, t0, m, f);
    }
    // down: y = a·wdᵀ  ->  da = dy·wd, dwd += dyᵀ·a
    be.zero(dav);
    be.linear_backward(rows(dy, t0, m, h), av, w.wd, dav, gr.dwd);
    be.swiglu_backward(dav, gv, uv, dav, duv);
    be.linear_backward(dav, x, w.wg, rows(dxn, t0, m, h), gr.dwg);
    be.linear_backward(duv, x, w.wu, rows(dxn, t0, m, h), gr.dwu);
    if (after_chunk) after_chunk();
  }
}

// ---- norms -------------------------------------------------------------------------------------

void rmsnorm_backward_add(Backend& be, TensorView dy, TensorView x, TensorView w, TensorView rstd,
                          TensorView dx, TensorView dw) {
  Tensor t = Tensor::f32(dx.shape(), kWork, be.device());
  be.rmsnorm_backward(dy, x, w, rstd, t.view(), dw);
  be.add(dx, t.view());
}

// ---- loss head ---------------------------------------------------------------------------------

void lm_head_loss(Backend& be, TensorView xn, TensorView w, TensorView labels, float grad_scale,
                  TensorView loss, TensorView dxn, TensorView dw) {
  const int64_t V = w.dim(0), h = w.dim(1), n = labels.numel();
  const int64_t rows_at_once = token_chunk(be.device().kind), chunk = std::min(n, rows_at_once);
  Tensor logits = Tensor::f32({chunk, V}, kWork, be.device());
  for (int64_t t0 = 0; t0 < n; t0 += rows_at_once) {
    const int64_t m = std::min(rows_at_once, n - t0);
    const TensorView x = rows(xn, t0, m, h), lv = logits.window(0, {m, V});
    be.linear_forward(x, w, lv, false);
    // dlogits overwrite the logits in place (allowed by the kernel), also when only the loss is
    // wanted: the logits are not read again, and no second [chunk, V] buffer is needed.
    be.cross_entropy(lv, labels.window(t0, {m}), lv, grad_scale, loss, kIgnoreIndex);
    if (!dxn.empty()) {
      const TensorView dx = rows(dxn, t0, m, h);
      be.zero(dx);
      be.linear_backward(lv, x, w, dx, dw);
    }
  }
}

// ---- saved activations -----------------------------------------------------------------------

void LayerSaved::allocate(int64_t n, int64_t h, int64_t hq, int64_t hkv, int64_t d, DType act,
                          Device device) {
  const auto A = MemCategory::Activations;
  x = Tensor({n, h}, act, A, device);
  rstd1 = Tensor::f32({n}, A, device);
  q = Tensor({n, hq, d}, act, A, device);
  k = Tensor({n, hkv, d}, act, A, device);
  v = Tensor({n, hkv, d}, act, A, device);
  o = Tensor({n, hq, d}, act, A, device);
  lse = Tensor::f32({n, hq}, A, device);
  x2 = Tensor({n, h}, act, A, device);
  rstd2 = Tensor::f32({n}, A, device);
}

void LayerSaved::allocate_kept(int64_t n, int64_t h, int64_t slices, int64_t f, DType act_dtype,
                               Device device) {
  const auto A = MemCategory::Activations;
  xn1 = Tensor({n, h}, act_dtype, A, device);
  xn2 = Tensor({n, h}, act_dtype, A, device);
  gate = Tensor::f32({slices * n, f}, A, device);
  up = Tensor::f32({slices * n, f}, A, device);
  act = Tensor({slices * n, f}, act_dtype, A, device);
}

MlpSaved LayerSaved::mlp(int64_t i, int64_t slices) const {
  if (gate.empty()) return {};
  const int64_t rows = gate.dim(0) / slices, f = gate.dim(1);
  TSP_CHECK(slices >= 1 && i >= 0 && i < slices && rows * slices == gate.dim(0),
            "LayerSaved::mlp: slice {} of {} of kept activations [{}, {}]", i, slices, gate.dim(0),
            f);
  return {gate.window(i * rows * f, {rows, f}), up.window(i * rows * f, {rows, f}),
          act.window(i * rows * f, {rows, f})};
}

int64_t LayerSaved::bytes() const {
  int64_t b = 0;
  for (const Tensor* t :
       {&x, &rstd1, &q, &k, &v, &o, &lse, &x2, &rstd2, &xn1, &xn2, &gate, &up, &act})
    b += t->nbytes();
  return b;
}

}  // namespace tsp::block
