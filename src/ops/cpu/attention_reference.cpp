// Reference causal attention: one (query, head) at a time, double accumulators, no blocking.
// It is the readable statement of the maths and the oracle the fast path is tested against.
//
//   s_j  = scale · q_i·k_j            for the keys query i sees: k_pos[j] <= q_pos[i] and, with
//                                     documents, k_pos[j] >= q_pos[i] - q_doc_pos[i] (the others
//                                     are absent)
//   lse  = log Σ_j e^{s_j}             (-inf when no key is visible)
//   o_i  = Σ_j e^{s_j - lse} v_j       (0 when no key is visible)
//
// Backward (flash-attention 2 recomputation from the saved lse):
//   P_j = e^{s_j - lse}, D_i = dout_i·o_i, dP_j = dout_i·v_j, dS_j = P_j (dP_j - D_i)
//   dv_j += P_j dout_i,  dq_i += scale Σ_j dS_j k_j,  dk_j += scale dS_j q_i
#include <cmath>
#include <limits>
#include <vector>

#include "ops/cpu/attention_internal.h"

namespace tsp::attn {
namespace {

double dot(const float* a, const float* b, int64_t d) {
  double s = 0;
  for (int64_t c = 0; c < d; ++c) s += static_cast<double>(a[c]) * b[c];
  return s;
}

// Whether query i sees key j (the header's rule).
bool visible(const AttentionParams& p, int64_t i, int64_t j) {
  if (p.k_pos[j] > p.q_pos[i]) return false;
  return !p.q_doc_pos || p.k_pos[j] >= p.q_pos[i] - p.q_doc_pos[i];
}

}  // namespace

void forward_reference(const AttentionParams& p) {
  const int64_t d = p.head_dim, H = p.n_heads, g = p.n_heads / p.n_kv_heads;
  const int64_t q_stride = H * d, kv_stride = p.n_kv_heads * d;
  std::vector<double> acc(d);
  for (int64_t i = 0; i < p.n_q; ++i) {
    for (int64_t h = 0; h < H; ++h) {
      const float* qi = p.q + i * q_stride + h * d;
      const int64_t kv_off = (h / g) * d;
      float* oi = p.o + i * q_stride + h * d;
      // Pass 1: the largest visible score, so the exponentials below cannot overflow.
      double m = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < p.n_k; ++j) {
        if (!visible(p, i, j)) continue;
        m = std::max(m, p.scale * dot(qi, p.k + j * kv_stride + kv_off, d));
      }
      if (m == -std::numeric_limits<double>::infinity()) {  // no visible key
        for (int64_t c = 0; c < d; ++c) oi[c] = 0.f;
        p.lse[i * H + h] = -std::numeric_limits<float>::infinity();
        continue;
      }
      // Pass 2: softmax-weighted sum of the values.
      double l = 0;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t j = 0; j < p.n_k; ++j) {
        if (!visible(p, i, j)) continue;
        const double w = std::exp(p.scale * dot(qi, p.k + j * kv_stride + kv_off, d) - m);
        l += w;
        const float* vj = p.v + j * kv_stride + kv_off;
        for (int64_t c = 0; c < d; ++c) acc[c] += w * vj[c];
      }
      for (int64_t c = 0; c < d; ++c) oi[c] = static_cast<float>(acc[c] / l);
      p.lse[i * H + h] = static_cast<float>(m + std::log(l));
    }
  }
}

void backward_reference(const AttentionBackwardParams& p) {
  const int64_t d = p.head_dim, H = p.n_heads, g = p.n_heads / p.n_kv_heads;
  const int64_t q_stride = H * d, kv_stride = p.n_kv_heads * d;
  std::vector<double> dqi(d);
  for (int64_t i = 0; i < p.n_q; ++i) {
    for (int64_t h = 0; h < H; ++h) {
      const float lse = p.lse[i * H + h];
      if (lse == -std::numeric_limits<float>::infinity()) continue;  // saw no key: no gradient
      const float* qi = p.q + i * q_stride + h * d;
      const float* doi = p.dout + i * q_stride + h * d;
      const double Di = dot(doi, p.o + i * q_stride + h * d, d);
      const int64_t kv_off = (h / g) * d;
      std::fill(dqi.begin(), dqi.end(), 0.0);
      for (int64_t j = 0; j < p.n_k; ++j) {
        if (!visible(p, i, j)) continue;
        const float* kj = p.k + j * kv_stride + kv_off;
        const float* vj = p.v + j * kv_stride + kv_off;
        const double P = std::exp(p.scale * dot(qi, kj, d) - lse);
        const double dS = P * (dot(doi, vj, d) - Di);
        float* dkj = p.dk + j * kv_stride + kv_off;
        float* dvj = p.dv + j * kv_stride + kv_off;
        for (int64_t c = 0; c < d; ++c) {
          dvj[c] += static_cast<float>(P * doi[c]);
          dkj[c] += static_cast<float>(p.scale * dS * qi[c]);
          dqi[c] += p.scale * dS * kj[c];
        }
      }
      float* dq = p.dq + i * q_stride + h * d;
      for (int64_t c = 0; c < d; ++c) dq[c] += static_cast<float>(dqi[c]);
    }
  }
}

}  // namespace tsp::attn
