#include "tsp/model/block.h"

#include <algorithm>
#include <cmath>

#include "tsp/ops/attention.h"
#include "tsp/ops/ops.h"

namespace tsp::block {

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

// ---- attention --------------------------------------------------------------------------------

void qkv_forward(const AttnDims& a, const AttnWeights& w, const float* xn, const int64_t* pos,
                 int64_t n, float* q, float* k, float* v) {
  linear_forward(xn, w.wq, q, n, a.h, a.q_width());
  linear_forward(xn, w.wk, k, n, a.h, a.kv_width());
  linear_forward(xn, w.wv, v, n, a.h, a.kv_width());
  rope_forward(q, pos, n, a.hq, a.d, a.theta);
  rope_forward(k, pos, n, a.hkv, a.d, a.theta);
}

void qkv_backward(const AttnDims& a, const AttnWeights& w, const AttnGrads& g, const float* xn,
                  const int64_t* pos, int64_t n, float* dq, float* dk, const float* dv,
                  float* dxn) {
  // RoPE is a rotation: its backward rotates the gradient back, in place.
  rope_backward(dq, pos, n, a.hq, a.d, a.theta);
  rope_backward(dk, pos, n, a.hkv, a.d, a.theta);
  linear_backward(dq, xn, w.wq, dxn, g.dwq, n, a.h, a.q_width());
  linear_backward(dk, xn, w.wk, dxn, g.dwk, n, a.h, a.kv_width());
  linear_backward(dv, xn, w.wv, dxn, g.dwv, n, a.h, a.kv_width());
}

namespace {
AttentionParams attention_params(const AttnDims& a, int64_t nq, int64_t nk, const float* q,
                                 const float* k, const float* v, const int64_t* q_pos,
                                 const int64_t* k_pos) {
  AttentionParams p;
  p.n_q = nq;
  p.n_k = nk;
  p.n_heads = a.hq;
  p.n_kv_heads = a.hkv;
  p.head_dim = a.d;
  p.scale = 1.0f / std::sqrt(static_cast<float>(a.d));
  p.q = q;
  p.k = k;
  p.v = v;
  p.q_pos = q_pos;
  p.k_pos = k_pos;
  return p;
}
}  // namespace

void attention_forward(const AttnDims& a, int64_t B, int64_t nq, int64_t nk, const float* q,
                       const float* k, const float* v, const int64_t* q_pos, const int64_t* k_pos,
                       float* o, float* lse) {
  const int64_t qs = nq * a.q_width(), ks = nk * a.kv_width();
  for (int64_t b = 0; b < B; ++b) {
    AttentionParams p =
        attention_params(a, nq, nk, q + b * qs, k + b * ks, v + b * ks, q_pos, k_pos);
    p.o = o + b * qs;
    p.lse = lse + b * nq * a.hq;
    tsp::attention_forward(p);
  }
}

void attention_backward(const AttnDims& a, int64_t B, int64_t nq, int64_t nk, const float* q,
                        const float* k, const float* v, const int64_t* q_pos, const int64_t* k_pos,
                        const float* o, const float* lse, const float* dout, float* dq, float* dk,
                        float* dv) {
  const int64_t qs = nq * a.q_width(), ks = nk * a.kv_width();
  for (int64_t b = 0; b < B; ++b) {
    AttentionBackwardParams p;
    static_cast<AttentionParams&>(p) =
        attention_params(a, nq, nk, q + b * qs, k + b * ks, v + b * ks, q_pos, k_pos);
    p.o = const_cast<float*>(o + b * qs);  // an input here (AttentionParams names it as output)
    p.lse = const_cast<float*>(lse + b * nq * a.hq);
    p.dout = dout + b * qs;
    p.dq = dq + b * qs;
    p.dk = dk + b * ks;
    p.dv = dv + b * ks;
    tsp::attention_backward(p);
  }
}

void out_proj_forward(const AttnDims& a, const float* wo, const float* o, int64_t n, float* y) {
  linear_forward(o, wo, y, n, a.q_width(), a.h, /*accumulate=*/true);
}

void out_proj_backward(const AttnDims& a, const float* wo, const float* o, const float* dy,
                       int64_t n, float* dout, float* dwo) {
  std::fill(dout, dout + n * a.q_width(), 0.f);
  linear_backward(dy, o, wo, dout, dwo, n, a.q_width(), a.h);
}

// ---- MLP ----------------------------------------------------------------------------------------

void mlp_forward(const MlpWeights& w, int64_t h, const float* xn, int64_t n, float* y) {
  const int64_t rows = std::min(n, kTokenChunk), f = w.f;
  Tensor g = Tensor::f32({rows, f}, MemCategory::Workspace);
  Tensor u = Tensor::f32({rows, f}, MemCategory::Workspace);
  Tensor act = Tensor::f32({rows, f}, MemCategory::Workspace);
  for (int64_t t0 = 0; t0 < n; t0 += kTokenChunk) {
    const int64_t m = std::min(kTokenChunk, n - t0);
    linear_forward(xn + t0 * h, w.wg, g.f32(), m, h, f);
    linear_forward(xn + t0 * h, w.wu, u.f32(), m, h, f);
    swiglu_forward(g.f32(), u.f32(), act.f32(), m, f);
    linear_forward(act.f32(), w.wd, y + t0 * h, m, f, h, /*accumulate=*/true);
  }
}

void mlp_backward(const MlpWeights& w, const MlpGrads& gr, int64_t h, const float* xn,
                  const float* dy, int64_t n, float* dxn) {
  const int64_t rows = std::min(n, kTokenChunk), f = w.f;
  Tensor g = Tensor::f32({rows, f}, MemCategory::Workspace);
  Tensor u = Tensor::f32({rows, f}, MemCategory::Workspace);
  Tensor act = Tensor::f32({rows, f}, MemCategory::Workspace);  // a, then dg
  Tensor da = Tensor::f32({rows, f}, MemCategory::Workspace);
  Tensor du = Tensor::f32({rows, f}, MemCategory::Workspace);
  for (int64_t t0 = 0; t0 < n; t0 += kTokenChunk) {
    const int64_t m = std::min(kTokenChunk, n - t0);
    const float* x = xn + t0 * h;
    // Recompute the gate/up activations (policy: not saved, see block.h).
    linear_forward(x, w.wg, g.f32(), m, h, f);
    linear_forward(x, w.wu, u.f32(), m, h, f);
    swiglu_forward(g.f32(), u.f32(), act.f32(), m, f);
    // down: y = a·wdᵀ  ->  da = dy·wd, dwd += dyᵀ·a
    std::fill(da.f32(), da.f32() + m * f, 0.f);
    linear_backward(dy + t0 * h, act.f32(), w.wd, da.f32(), gr.dwd, m, f, h);
    swiglu_backward(da.f32(), g.f32(), u.f32(), act.f32(), du.f32(), m, f);
    linear_backward(act.f32(), x, w.wg, dxn + t0 * h, gr.dwg, m, h, f);
    linear_backward(du.f32(), x, w.wu, dxn + t0 * h, gr.dwu, m, h, f);
  }
}

// ---- norms --------------------------------------------------------------------------------------

void rmsnorm_apply(const float* x, const float* w, const float* rstd, float* y, int64_t n,
                   int64_t h) {
  for (int64_t i = 0; i < n; ++i) {
    const float r = rstd[i];
    for (int64_t j = 0; j < h; ++j) y[i * h + j] = x[i * h + j] * r * w[j];
  }
}

void rmsnorm_backward_add(const float* dy, const float* x, const float* w, const float* rstd,
                          float* dx, float* dw, int64_t n, int64_t h) {
  Tensor t = Tensor::f32({n, h}, MemCategory::Workspace);
  rmsnorm_backward(dy, x, w, rstd, t.f32(), dw, n, h);
  add_inplace(dx, t.f32(), n * h);
}

// ---- loss head ----------------------------------------------------------------------------------

double lm_head_loss(const float* xn, const float* w, const int32_t* labels, int64_t n, int64_t h,
                    int64_t V, float grad_scale, float* dxn, float* dw) {
  const int64_t rows = std::min(n, kTokenChunk);
  Tensor logits = Tensor::f32({rows, V}, MemCategory::Workspace);
  double loss = 0;
  for (int64_t t0 = 0; t0 < n; t0 += kTokenChunk) {
    const int64_t m = std::min(kTokenChunk, n - t0);
    linear_forward(xn + t0 * h, w, logits.f32(), m, h, V);
    // dlogits overwrite the logits in place (allowed by the kernel).
    loss +=
        cross_entropy_forward_backward(logits.f32(), labels + t0, logits.f32(), m, V, grad_scale);
    if (dxn) {
      std::fill(dxn + t0 * h, dxn + (t0 + m) * h, 0.f);
      linear_backward(logits.f32(), xn + t0 * h, w, dxn + t0 * h, dw, m, h, V);
    }
  }
  return loss;
}

// ---- saved activations ------------------------------------------------------------------------

void LayerSaved::allocate(int64_t n, int64_t h, int64_t hq, int64_t hkv, int64_t d) {
  const auto A = MemCategory::Activations;
  x = Tensor::f32({n, h}, A);
  rstd1 = Tensor::f32({n}, A);
  q = Tensor::f32({n, hq, d}, A);
  k = Tensor::f32({n, hkv, d}, A);
  v = Tensor::f32({n, hkv, d}, A);
  o = Tensor::f32({n, hq, d}, A);
  lse = Tensor::f32({n, hq}, A);
  x2 = Tensor::f32({n, h}, A);
  rstd2 = Tensor::f32({n}, A);
}

int64_t LayerSaved::bytes() const {
  int64_t b = 0;
  for (const Tensor* t : {&x, &rstd1, &q, &k, &v, &o, &lse, &x2, &rstd2}) b += t->nbytes();
  return b;
}

}  // namespace tsp::block
