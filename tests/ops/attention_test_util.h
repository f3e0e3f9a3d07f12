// What the CPU attention tests share (tests/ops/attention_test.cpp for fp32 q, k, v, o and
// tests/ops/attention_bf16_test.cpp for bf16 ones): the problems (positions, packed documents,
// random inputs of either dtype), the double-precision oracle, error measures, and the checks
// whose logic does not depend on the dtype (key tiles skipped below the document starts, splitting
// the keys for the merge). Each test file keeps its own cases, tolerances and their derivations.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "tsp/core/bf16.h"
#include "tsp/ops/attention.h"

namespace tsp::test {

constexpr double kInf = std::numeric_limits<double>::infinity();

// ---- positions ----------------------------------------------------------------------------------

inline std::vector<int64_t> iota_pos(int64_t n, int64_t start) {
  std::vector<int64_t> p(n);
  std::iota(p.begin(), p.end(), start);
  return p;
}
// Zigzag: S tokens in 2D chunks, rank r holds chunks r and 2D-1-r.
inline std::vector<int64_t> zigzag_local(int64_t S, int64_t D, int64_t r) {
  const int64_t c = S / (2 * D);
  std::vector<int64_t> p = iota_pos(c, r * c), hi = iota_pos(c, (2 * D - 1 - r) * c);
  p.insert(p.end(), hi.begin(), hi.end());
  return p;
}
// Keys after an all-gather over the ranks: rank order, so positions are NOT sorted.
inline std::vector<int64_t> zigzag_gathered(int64_t S, int64_t D) {
  std::vector<int64_t> p;
  for (int64_t r = 0; r < D; ++r) {
    std::vector<int64_t> l = zigzag_local(S, D, r);
    p.insert(p.end(), l.begin(), l.end());
  }
  return p;
}
// Positions in their documents of tokens at positions `pos`, for documents starting at `starts`
// (increasing, starts[0] = 0): x - (the last start <= x).
inline std::vector<int64_t> doc_positions(const std::vector<int64_t>& pos,
                                          const std::vector<int64_t>& starts) {
  std::vector<int64_t> out;
  for (int64_t x : pos) out.push_back(x - *(std::upper_bound(starts.begin(), starts.end(), x) - 1));
  return out;
}

// ---- problems -----------------------------------------------------------------------------------

struct Case {
  std::string name;
  int64_t H, Hkv, d;
  float scale;
  std::vector<int64_t> q_pos, k_pos;
  std::vector<int64_t> q_doc_pos = {};  // documents: position of each query in its document
  int64_t n_q() const { return static_cast<int64_t>(q_pos.size()); }
  // Whether query i sees key j (the rule of tsp/ops/attention.h, written out independently).
  bool visible(int64_t i, int64_t j) const {
    if (k_pos[j] > q_pos[i]) return false;
    return q_doc_pos.empty() || k_pos[j] >= q_pos[i] - q_doc_pos[i];
  }
  int64_t n_k() const { return static_cast<int64_t>(k_pos.size()); }
};

// `c` with its queries in packed documents starting at the global positions `starts` (as
// doc_positions).
inline Case with_documents(Case c, const std::vector<int64_t>& starts) {
  c.q_doc_pos = doc_positions(c.q_pos, starts);
  return c;
}

// 70 queries at unsorted random positions of [0, 99] with repeats, query 5 at -3 (before every
// key: it sees none), against n_k keys at [5, 5 + n_k) in random order.
inline Case random_positions_case(std::string name, int64_t H, int64_t Hkv, int64_t d, float scale,
                                  int64_t n_k, std::mt19937& rng) {
  Case c{std::move(name), H, Hkv, d, scale, {}, {}};
  std::uniform_int_distribution<int64_t> pos(0, 99);
  for (int i = 0; i < 70; ++i) c.q_pos.push_back(pos(rng));
  c.q_pos[5] = -3;
  c.k_pos = iota_pos(n_k, 5);
  std::shuffle(c.k_pos.begin(), c.k_pos.end(), rng);
  return c;
}

// The parameter structs of attention with q, k, v, o of type T (float or bf16).
template <class T>
struct AttentionTypes;
template <>
struct AttentionTypes<float> {
  using Params = AttentionParams;
  using BackwardParams = AttentionBackwardParams;
};
template <>
struct AttentionTypes<bf16> {
  using Params = AttentionBf16Params;
  using BackwardParams = AttentionBf16BackwardParams;
};
template <class T>
using ParamsOf = typename AttentionTypes<T>::Params;
template <class T>
using BackwardParamsOf = typename AttentionTypes<T>::BackwardParams;

// n values of U(-1, 1), as T (bf16: each rounded once, so the kernels and the oracle read the
// same values).
template <class T>
std::vector<T> uniform(int64_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<T> x(n);
  for (T& e : x) e = T(u(rng));
  return x;
}

template <class T>
struct Data {
  std::vector<T> q, k, v;   // q [n_q, H, d]; k, v [n_k, Hkv, d]
  std::vector<float> dout;  // [n_q, H, d]
  Data(const Case& c, uint32_t seed) {
    std::mt19937 rng(seed);
    q = uniform<T>(c.n_q() * c.H * c.d, rng);
    k = uniform<T>(c.n_k() * c.Hkv * c.d, rng);
    v = uniform<T>(c.n_k() * c.Hkv * c.d, rng);
    dout = uniform<float>(c.n_q() * c.H * c.d, rng);
  }
};

// Forward outputs, as the kernels write them (o in T, lse fp32); 7 until written.
template <class T>
struct Out {
  std::vector<T> o;
  std::vector<float> lse;
  explicit Out(const Case& c) : o(c.n_q() * c.H * c.d, T(7.f)), lse(c.n_q() * c.H, 7.f) {}
};

template <class T>
ParamsOf<T> params(const Case& c, const Data<T>& x, Out<T>& out) {
  ParamsOf<T> p;
  p.n_q = c.n_q(), p.n_k = c.n_k(), p.n_heads = c.H, p.n_kv_heads = c.Hkv, p.head_dim = c.d;
  p.scale = c.scale;
  p.q = x.q.data(), p.k = x.k.data(), p.v = x.v.data();
  p.q_pos = c.q_pos.data(), p.k_pos = c.k_pos.data();
  p.q_doc_pos = c.q_doc_pos.empty() ? nullptr : c.q_doc_pos.data();
  p.o = out.o.data(), p.lse = out.lse.data();
  return p;
}

// One forward and backward: the outputs, zeroed gradients, and backward parameters pointing at
// them and at `x` (which must outlive it). Run forward then backward on `p`.
template <class T>
struct Pass {
  Out<T> out;
  std::vector<float> dq, dk, dv;
  BackwardParamsOf<T> p;
  Pass(const Case& c, const Data<T>& x)
      : out(c), dq(x.q.size(), 0.f), dk(x.k.size(), 0.f), dv(x.v.size(), 0.f) {
    static_cast<ParamsOf<T>&>(p) = params(c, x, out);
    p.dout = x.dout.data(), p.dq = dq.data(), p.dk = dk.data(), p.dv = dv.data();
  }
  Pass(const Pass&) = delete;
  Pass& operator=(const Pass&) = delete;
};

// Forward and backward on the public path: {o (widened to fp32), lse, dq, dk, dv}.
template <class T>
std::vector<std::vector<float>> run_public(const Case& c, const Data<T>& x) {
  Pass<T> r(c, x);
  attention_forward(r.p);
  attention_backward(r.p);
  return {std::vector<float>(r.out.o.begin(), r.out.o.end()), r.out.lse, r.dq, r.dk, r.dv};
}

// ---- the oracle ---------------------------------------------------------------------------------

// Softmax attention in double on the inputs as the kernels read them (bf16 ones widened exactly),
// per head and query row, then the textbook backward
//   dP = dO·Vᵀ, dS = P∘(dP - rowsum(dO∘O)), dQ = scale·dS·K, dK = scale·dSᵀ·Q, dV = Pᵀ·dO,
// with O the given o (the one the kernels' backward receives) or, without one, the oracle's own.
// Besides the results, the magnitudes that rounding-error bounds scale (the bf16 test's bounds):
//   A_ic   = Σ_j p_ij |v_jc|,
//   M_ij   = p_ij·Σ_c |dO_ic||v_jc| + |dS_ij|,
//   Mdq_ic = scale·Σ_j M_ij |k_jc|,  Mdk_jc = scale·Σ_i M_ij |q_ic|,  Mdv_jc = Σ_i p_ij |dO_ic|.
// A query that sees no key has o = 0, lse = -inf and adds nothing to any gradient.
struct Oracle {
  std::vector<double> o, lse, dq, dk, dv;
  std::vector<double> A, Mdq, Mdk, Mdv;
};
template <class T>
Oracle oracle(const Case& c, const Data<T>& x, const std::vector<T>* o_given = nullptr) {
  const int64_t nq = c.n_q(), nk = c.n_k(), d = c.d, g = c.H / c.Hkv;
  Oracle r;
  r.o.assign(nq * c.H * d, 0), r.lse.assign(nq * c.H, -kInf), r.A.assign(nq * c.H * d, 0);
  r.dq.assign(nq * c.H * d, 0), r.Mdq.assign(nq * c.H * d, 0);
  r.dk.assign(nk * c.Hkv * d, 0), r.dv.assign(nk * c.Hkv * d, 0);
  r.Mdk.assign(nk * c.Hkv * d, 0), r.Mdv.assign(nk * c.Hkv * d, 0);
  auto Q = [&](int64_t i, int64_t h, int64_t e) { return double(x.q[(i * c.H + h) * d + e]); };
  auto dO = [&](int64_t i, int64_t h, int64_t e) { return double(x.dout[(i * c.H + h) * d + e]); };
  auto K = [&](int64_t j, int64_t h, int64_t e) {
    return double(x.k[(j * c.Hkv + h / g) * d + e]);
  };
  auto V = [&](int64_t j, int64_t h, int64_t e) {
    return double(x.v[(j * c.Hkv + h / g) * d + e]);
  };
  auto kv = [&](int64_t j, int64_t h, int64_t e) { return (j * c.Hkv + h / g) * d + e; };
  std::vector<double> P(nk);
  for (int64_t h = 0; h < c.H; ++h)
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t qi = (i * c.H + h) * d;
      double m = -kInf;
      for (int64_t j = 0; j < nk; ++j) {
        P[j] = -kInf;
        if (!c.visible(i, j)) continue;
        double s = 0;
        for (int64_t e = 0; e < d; ++e) s += Q(i, h, e) * K(j, h, e);
        P[j] = s * c.scale;
        m = std::max(m, P[j]);
      }
      if (m == -kInf) continue;  // sees no key: o = 0, lse = -inf, no gradient
      double l = 0;
      for (int64_t j = 0; j < nk; ++j) l += std::exp(P[j] - m);
      const double lse = m + std::log(l);
      r.lse[i * c.H + h] = lse;
      for (int64_t j = 0; j < nk; ++j) P[j] = std::exp(P[j] - lse);
      for (int64_t j = 0; j < nk; ++j)
        for (int64_t e = 0; e < d; ++e) {
          r.o[qi + e] += P[j] * V(j, h, e);
          r.A[qi + e] += P[j] * std::abs(V(j, h, e));
        }
      double D = 0;
      for (int64_t e = 0; e < d; ++e)
        D += dO(i, h, e) * (o_given ? double((*o_given)[qi + e]) : r.o[qi + e]);
      for (int64_t j = 0; j < nk; ++j) {
        if (P[j] == 0) continue;
        double dP = 0, dP_abs = 0;
        for (int64_t e = 0; e < d; ++e) {
          dP += dO(i, h, e) * V(j, h, e);
          dP_abs += std::abs(dO(i, h, e) * V(j, h, e));
        }
        const double dS = P[j] * (dP - D);
        const double M = P[j] * dP_abs + std::abs(dS);
        for (int64_t e = 0; e < d; ++e) {
          r.dq[qi + e] += c.scale * dS * K(j, h, e);
          r.Mdq[qi + e] += c.scale * M * std::abs(K(j, h, e));
          r.dk[kv(j, h, e)] += c.scale * dS * Q(i, h, e);
          r.Mdk[kv(j, h, e)] += c.scale * M * std::abs(Q(i, h, e));
          r.dv[kv(j, h, e)] += P[j] * dO(i, h, e);
          r.Mdv[kv(j, h, e)] += P[j] * std::abs(dO(i, h, e));
        }
      }
    }
  return r;
}

// ---- error measures -----------------------------------------------------------------------------

inline double max_abs(const std::vector<double>& x) {
  double m = 0;
  for (double e : x) m = std::max(m, std::abs(e));
  return m;
}
// x·k elementwise.
inline std::vector<double> times(std::vector<double> x, double k) {
  for (double& e : x) e *= k;
  return x;
}

// Every element within bound[i] + slack of the oracle (no bound: slack alone); equal infinities
// pass, a NaN never does (`!(err <= tol)`: err > tol alone is false for NaN). Reports the first
// element out of bounds (and stops there); returns the worst err / (bound + slack), so a failure
// message (and SCOPED_TRACE) says how close it came.
template <class T>
double expect_within(const std::vector<T>& got, const std::vector<double>& want,
                     const std::vector<double>& bound, double slack, const char* what) {
  EXPECT_EQ(got.size(), want.size()) << what;
  double worst = 0;
  for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
    if (double(got[i]) == want[i]) continue;
    const double err = std::abs(double(got[i]) - want[i]);
    const double tol = (bound.empty() ? 0.0 : bound[i]) + slack;
    worst = std::max(worst, err / tol);
    if (!(err <= tol)) {
      ADD_FAILURE() << what << " at " << i << ": got " << double(got[i]) << ", want " << want[i]
                    << ", error " << err << " > bound " << tol;
      break;
    }
  }
  return worst;
}

// lse rows: -inf exactly where `want` is -inf (a query that sees no key), elsewhere within
// tol·max(1, |want|). Reports the first row out of bounds (and stops there).
template <class W>
void expect_lse_near(const std::vector<float>& got, const std::vector<W>& want, double tol,
                     const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t r = 0; r < got.size(); ++r) {
    if (std::isinf(want[r]))
      ASSERT_EQ(double(got[r]), double(want[r])) << what << " row " << r;
    else
      ASSERT_NEAR(got[r], want[r], tol * std::max(1.0, std::abs(double(want[r]))))
          << what << " row " << r;
  }
}

// ---- checks of either dtype ---------------------------------------------------------------------

// Queries at [128, 256), keys at [0, 256), documents starting at 0 and 128: no query sees a key
// of [0, 128), i.e. the first two key tiles of 64. Those keys hold NaN: a tile that was computed
// and masked would still multiply 0 · NaN into o and the gradients, so finite results prove the
// tiles are skipped. And the results (public path) must equal, bit for bit, attention over the
// keys [128, 256) alone (the same tiles in the same order), with dk, dv of the skipped keys
// untouched. H = 4, Hkv = 2.
template <class T>
void check_skipped_key_tiles(int64_t d, float scale, uint32_t seed) {
  Case docs{"skip", 4, 2, d, scale, iota_pos(128, 128), iota_pos(256, 0)};
  docs.q_doc_pos = doc_positions(docs.q_pos, {0, 128});
  Data<T> x(docs, seed);
  const int64_t row = docs.Hkv * d;
  for (int64_t e = 0; e < 128 * row; ++e)
    x.k[e] = x.v[e] = T(std::numeric_limits<float>::quiet_NaN());
  Case alone{"alone", 4, 2, d, scale, iota_pos(128, 128), iota_pos(128, 128)};
  Data<T> y = x;
  y.k.erase(y.k.begin(), y.k.begin() + 128 * row);
  y.v.erase(y.v.begin(), y.v.begin() + 128 * row);
  const auto got = run_public(docs, x), want = run_public(alone, y);
  for (int t = 0; t < 3; ++t)  // o, lse, dq
    EXPECT_EQ(0, std::memcmp(got[t].data(), want[t].data(), got[t].size() * sizeof(float))) << t;
  for (int t = 3; t < 5; ++t) {  // dk, dv: zero for the skipped keys, equal for the others
    for (int64_t e = 0; e < 128 * row; ++e) ASSERT_EQ(got[t][e], 0.f) << t << " at " << e;
    EXPECT_EQ(
        0, std::memcmp(got[t].data() + 128 * row, want[t].data(), want[t].size() * sizeof(float)))
        << t;
  }
}

// The keys of `c` (and their k, v rows of `x`) in two disjoint sets, in their order: key j goes to
// `a` iff in_a[j]. The queries, q and dout are those of `c` and `x`.
template <class T>
struct KeySplit {
  Case ca, cb;
  Data<T> xa, xb;
};
template <class T>
KeySplit<T> split_keys(const Case& c, const Data<T>& x, const std::vector<bool>& in_a) {
  KeySplit<T> s{c, c, x, x};
  s.ca.k_pos.clear(), s.cb.k_pos.clear();
  s.xa.k.clear(), s.xa.v.clear(), s.xb.k.clear(), s.xb.v.clear();
  const int64_t row = c.Hkv * c.d;
  for (int64_t j = 0; j < c.n_k(); ++j) {
    Case& cs = in_a[j] ? s.ca : s.cb;
    Data<T>& xs = in_a[j] ? s.xa : s.xb;
    cs.k_pos.push_back(c.k_pos[j]);
    xs.k.insert(xs.k.end(), x.k.begin() + j * row, x.k.begin() + (j + 1) * row);
    xs.v.insert(xs.v.end(), x.v.begin() + j * row, x.v.begin() + (j + 1) * row);
  }
  return s;
}

}  // namespace tsp::test
