// The oracle: an independent, plain double-precision Llama forward + backward written with naive
// loops, one sequence at a time, sharing no code with the library's kernels or block maths (only
// the parameter names and the seeded initialisation, to get the same weights). Checked itself by
// central finite differences (tests/model/block_test.cpp).
//
// Model: embedding -> L x [x += o_proj(attn(rope(q), rope(k), v)) of rmsnorm(x);
//                          x += down(silu(gate(n)) * up(n)), n = rmsnorm(x)]
//        -> rmsnorm -> LM head (the embedding when tied) -> mean cross-entropy over B·S tokens.
#pragma once

#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "tsp/model/config.h"
#include "tsp/model/params.h"

namespace tsp::test {

using RefTensors = std::map<std::string, std::vector<double>>;  // by Hugging Face name

// The weights init_param generates for `seed`, widened to double.
inline RefTensors reference_weights(const LlamaConfig& c, uint64_t seed) {
  RefTensors w;
  for (const ParamSpec& s : llama_param_specs(c)) {
    Tensor t = Tensor::f32(s.shape, MemCategory::Workspace);
    init_param(s, seed, t);
    w[s.name].assign(t.f32(), t.f32() + t.numel());
  }
  return w;
}

struct RefResult {
  double loss = 0;   // mean over B·S tokens
  RefTensors grads;  // d loss / d parameter, same names and sizes as the weights
};

class ReferenceModel {
 public:
  ReferenceModel(const LlamaConfig& c, const RefTensors& w) : c_(c), w_(w) {
    for (const ParamSpec& s : llama_param_specs(c))
      name_[{static_cast<int>(s.kind), s.layer}] = s.name;
  }

  // tokens [B, S+1]: inputs are the first S of a row, labels the last S.
  RefResult run(const std::vector<int32_t>& tokens, int64_t B, int64_t S, bool backward) const {
    RefResult res;
    if (backward)
      for (auto& [name, v] : w_) res.grads[name].assign(v.size(), 0.0);
    const double scale = 1.0 / static_cast<double>(B * S);
    for (int64_t b = 0; b < B; ++b) {
      std::vector<int32_t> ids(tokens.begin() + b * (S + 1), tokens.begin() + b * (S + 1) + S);
      std::vector<int32_t> labels(tokens.begin() + b * (S + 1) + 1,
                                  tokens.begin() + (b + 1) * (S + 1));
      res.loss += sequence(ids, labels, scale, backward ? &res.grads : nullptr) * scale;
    }
    return res;
  }

 private:
  using Vec = std::vector<double>;
  struct LayerActs {
    Vec x, r1, xn, q, k, v, p, o, x2, r2, xn2, g, u, a;
  };

  const Vec& W(ParamKind k, int layer = -1) const {
    return w_.at(name_.at({static_cast<int>(k), layer}));
  }
  Vec& G(RefTensors& g, ParamKind k, int layer = -1) const {
    return g.at(name_.at({static_cast<int>(k), layer}));
  }
  const Vec& head() const {
    return c_.tie_word_embeddings ? W(ParamKind::Embedding) : W(ParamKind::LmHead);
  }

  // y[t, o] = sum_i x[t, i] · w[o, i]      x [T, in], w [out, in]
  static Vec matmul_t(const Vec& x, const Vec& w, int64_t T, int64_t in, int64_t out) {
    Vec y(T * out, 0.0);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t o = 0; o < out; ++o) {
        double s = 0;
        for (int64_t i = 0; i < in; ++i) s += x[t * in + i] * w[o * in + i];
        y[t * out + o] = s;
      }
    return y;
  }
  // Backward of y = x·wᵀ: dx [T, in] += dy·w, dw [out, in] += dyᵀ·x.
  static void matmul_t_backward(const Vec& dy, const Vec& x, const Vec& w, Vec& dx, Vec* dw,
                                int64_t T, int64_t in, int64_t out) {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t o = 0; o < out; ++o) {
        const double g = dy[t * out + o];
        for (int64_t i = 0; i < in; ++i) {
          dx[t * in + i] += g * w[o * in + i];
          if (dw) (*dw)[o * in + i] += g * x[t * in + i];
        }
      }
  }
  Vec rmsnorm(const Vec& x, const Vec& w, Vec& r, int64_t T) const {
    const int64_t h = c_.hidden_size;
    Vec y(T * h);
    r.assign(T, 0.0);
    for (int64_t t = 0; t < T; ++t) {
      double ss = 0;
      for (int64_t j = 0; j < h; ++j) ss += x[t * h + j] * x[t * h + j];
      r[t] = 1.0 / std::sqrt(ss / h + c_.rms_norm_eps);
      for (int64_t j = 0; j < h; ++j) y[t * h + j] = x[t * h + j] * r[t] * w[j];
    }
    return y;
  }
  // y_j = x_j·r·w_j with r = (mean x² + eps)^(-1/2):
  // dx_j += r·w_j·dy_j - x_j·r³/h · Σ_k dy_k·w_k·x_k,  dw_j += dy_j·x_j·r.
  void rmsnorm_backward(const Vec& dy, const Vec& x, const Vec& w, const Vec& r, Vec& dx, Vec* dw,
                        int64_t T) const {
    const int64_t h = c_.hidden_size;
    for (int64_t t = 0; t < T; ++t) {
      double dot = 0;
      for (int64_t k = 0; k < h; ++k) dot += dy[t * h + k] * w[k] * x[t * h + k];
      const double r3 = r[t] * r[t] * r[t];
      for (int64_t j = 0; j < h; ++j) {
        dx[t * h + j] += r[t] * w[j] * dy[t * h + j] - x[t * h + j] * r3 / h * dot;
        if (dw) (*dw)[j] += dy[t * h + j] * x[t * h + j] * r[t];
      }
    }
  }
  // HF rotate_half RoPE at position t; sign = -1 rotates back (the backward of a rotation).
  void rope(Vec& x, int64_t T, int64_t heads, double sign) const {
    const int64_t d = c_.head_dim(), half = d / 2;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t hh = 0; hh < heads; ++hh)
        for (int64_t i = 0; i < half; ++i) {
          const double inv = std::pow(c_.rope_theta, -2.0 * i / d);
          const double cs = std::cos(t * inv), sn = sign * std::sin(t * inv);
          double& a = x[(t * heads + hh) * d + i];
          double& b = x[(t * heads + hh) * d + i + half];
          const double a0 = a, b0 = b;
          a = a0 * cs - b0 * sn;
          b = b0 * cs + a0 * sn;
        }
  }

  // Loss sum of one sequence; grads (scaled by `scale`) accumulated when g != nullptr.
  double sequence(const std::vector<int32_t>& ids, const std::vector<int32_t>& labels, double scale,
                  RefTensors* g) const {
    const int64_t T = static_cast<int64_t>(ids.size()), h = c_.hidden_size, V = c_.vocab_size;
    const int64_t nh = c_.num_attention_heads, nkv = c_.num_key_value_heads, d = c_.head_dim();
    const int64_t grp = nh / nkv, F = c_.intermediate_size;
    const int L = static_cast<int>(c_.num_hidden_layers);
    const double inv_sqrt_d = 1.0 / std::sqrt(static_cast<double>(d));

    Vec x(T * h);
    const Vec& E = W(ParamKind::Embedding);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < h; ++j) x[t * h + j] = E[ids[t] * h + j];

    std::vector<LayerActs> acts(L);
    for (int l = 0; l < L; ++l) {
      LayerActs& A = acts[l];
      A.x = x;
      A.xn = rmsnorm(x, W(ParamKind::InputNorm, l), A.r1, T);
      A.q = matmul_t(A.xn, W(ParamKind::Wq, l), T, h, nh * d);
      A.k = matmul_t(A.xn, W(ParamKind::Wk, l), T, h, nkv * d);
      A.v = matmul_t(A.xn, W(ParamKind::Wv, l), T, h, nkv * d);
      rope(A.q, T, nh, 1.0);
      rope(A.k, T, nkv, 1.0);
      // Causal softmax attention, probabilities kept: p [nh, T, T] (zero above the diagonal).
      A.p.assign(nh * T * T, 0.0);
      A.o.assign(T * nh * d, 0.0);
      for (int64_t hq = 0; hq < nh; ++hq) {
        const int64_t hk = hq / grp;
        for (int64_t t = 0; t < T; ++t) {
          double mx = -INFINITY;
          std::vector<double> s(t + 1);
          for (int64_t u = 0; u <= t; ++u) {
            double dot = 0;
            for (int64_t i = 0; i < d; ++i)
              dot += A.q[(t * nh + hq) * d + i] * A.k[(u * nkv + hk) * d + i];
            s[u] = dot * inv_sqrt_d;
            mx = std::max(mx, s[u]);
          }
          double z = 0;
          for (int64_t u = 0; u <= t; ++u) z += std::exp(s[u] - mx);
          for (int64_t u = 0; u <= t; ++u) {
            const double p = std::exp(s[u] - mx) / z;
            A.p[(hq * T + t) * T + u] = p;
            for (int64_t i = 0; i < d; ++i)
              A.o[(t * nh + hq) * d + i] += p * A.v[(u * nkv + hk) * d + i];
          }
        }
      }
      Vec y = matmul_t(A.o, W(ParamKind::Wo, l), T, nh * d, h);
      A.x2 = x;
      for (int64_t i = 0; i < T * h; ++i) A.x2[i] += y[i];
      A.xn2 = rmsnorm(A.x2, W(ParamKind::PostNorm, l), A.r2, T);
      A.g = matmul_t(A.xn2, W(ParamKind::Wgate, l), T, h, F);
      A.u = matmul_t(A.xn2, W(ParamKind::Wup, l), T, h, F);
      A.a.resize(T * F);
      for (int64_t i = 0; i < T * F; ++i) A.a[i] = A.g[i] / (1.0 + std::exp(-A.g[i])) * A.u[i];
      Vec m = matmul_t(A.a, W(ParamKind::Wdown, l), T, F, h);
      x = A.x2;
      for (int64_t i = 0; i < T * h; ++i) x[i] += m[i];
    }
    Vec rf;
    Vec xf = rmsnorm(x, W(ParamKind::FinalNorm), rf, T);
    Vec logits = matmul_t(xf, head(), T, h, V);
    double loss = 0;
    Vec dlogits(T * V);
    for (int64_t t = 0; t < T; ++t) {
      double mx = -INFINITY;
      for (int64_t v = 0; v < V; ++v) mx = std::max(mx, logits[t * V + v]);
      double z = 0;
      for (int64_t v = 0; v < V; ++v) z += std::exp(logits[t * V + v] - mx);
      loss += std::log(z) + mx - logits[t * V + labels[t]];
      for (int64_t v = 0; v < V; ++v)
        dlogits[t * V + v] = scale * (std::exp(logits[t * V + v] - mx) / z - (v == labels[t]));
    }
    if (!g) return loss;

    // ---- backward ----
    Vec& dhead = c_.tie_word_embeddings ? G(*g, ParamKind::Embedding) : G(*g, ParamKind::LmHead);
    Vec dxf(T * h, 0.0);
    matmul_t_backward(dlogits, xf, head(), dxf, &dhead, T, h, V);
    Vec dx(T * h, 0.0);
    rmsnorm_backward(dxf, x, W(ParamKind::FinalNorm), rf, dx, &G(*g, ParamKind::FinalNorm), T);
    for (int l = L - 1; l >= 0; --l) {
      const LayerActs& A = acts[l];
      // MLP: x_out = x2 + a·Wdᵀ, a = silu(g)·u.
      Vec da(T * F, 0.0);
      matmul_t_backward(dx, A.a, W(ParamKind::Wdown, l), da, &G(*g, ParamKind::Wdown, l), T, F, h);
      Vec dg(T * F), du(T * F);
      for (int64_t i = 0; i < T * F; ++i) {
        const double sg = 1.0 / (1.0 + std::exp(-A.g[i]));
        du[i] = da[i] * A.g[i] * sg;
        dg[i] = da[i] * A.u[i] * sg * (1.0 + A.g[i] * (1.0 - sg));
      }
      Vec dxn2(T * h, 0.0);
      matmul_t_backward(dg, A.xn2, W(ParamKind::Wgate, l), dxn2, &G(*g, ParamKind::Wgate, l), T, h,
                        F);
      matmul_t_backward(du, A.xn2, W(ParamKind::Wup, l), dxn2, &G(*g, ParamKind::Wup, l), T, h, F);
      Vec dx2 = dx;  // residual
      rmsnorm_backward(dxn2, A.x2, W(ParamKind::PostNorm, l), A.r2, dx2,
                       &G(*g, ParamKind::PostNorm, l), T);
      // Attention: x2 = x + o·Woᵀ.
      Vec dO(T * nh * d, 0.0);
      matmul_t_backward(dx2, A.o, W(ParamKind::Wo, l), dO, &G(*g, ParamKind::Wo, l), T, nh * d, h);
      Vec dq(T * nh * d, 0.0), dk(T * nkv * d, 0.0), dv(T * nkv * d, 0.0);
      for (int64_t hq = 0; hq < nh; ++hq) {
        const int64_t hk = hq / grp;
        for (int64_t t = 0; t < T; ++t) {
          // dp_u = dO_t · v_u ; ds_u = p_u (dp_u - Σ p dp)
          std::vector<double> dp(t + 1);
          double sum = 0;
          for (int64_t u = 0; u <= t; ++u) {
            double s = 0;
            for (int64_t i = 0; i < d; ++i)
              s += dO[(t * nh + hq) * d + i] * A.v[(u * nkv + hk) * d + i];
            dp[u] = s;
            sum += A.p[(hq * T + t) * T + u] * s;
          }
          for (int64_t u = 0; u <= t; ++u) {
            const double p = A.p[(hq * T + t) * T + u];
            const double ds = p * (dp[u] - sum) * inv_sqrt_d;
            for (int64_t i = 0; i < d; ++i) {
              dv[(u * nkv + hk) * d + i] += p * dO[(t * nh + hq) * d + i];
              dq[(t * nh + hq) * d + i] += ds * A.k[(u * nkv + hk) * d + i];
              dk[(u * nkv + hk) * d + i] += ds * A.q[(t * nh + hq) * d + i];
            }
          }
        }
      }
      rope(dq, T, nh, -1.0);
      rope(dk, T, nkv, -1.0);
      Vec dxn(T * h, 0.0);
      matmul_t_backward(dq, A.xn, W(ParamKind::Wq, l), dxn, &G(*g, ParamKind::Wq, l), T, h, nh * d);
      matmul_t_backward(dk, A.xn, W(ParamKind::Wk, l), dxn, &G(*g, ParamKind::Wk, l), T, h,
                        nkv * d);
      matmul_t_backward(dv, A.xn, W(ParamKind::Wv, l), dxn, &G(*g, ParamKind::Wv, l), T, h,
                        nkv * d);
      dx = dx2;  // residual
      rmsnorm_backward(dxn, A.x, W(ParamKind::InputNorm, l), A.r1, dx,
                       &G(*g, ParamKind::InputNorm, l), T);
    }
    Vec& dE = G(*g, ParamKind::Embedding);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < h; ++j) dE[ids[t] * h + j] += dx[t * h + j];
    return loss;
  }

  LlamaConfig c_;
  const RefTensors& w_;
  std::map<std::pair<int, int>, std::string> name_;  // (kind, layer) -> name
};

}  // namespace tsp::test
