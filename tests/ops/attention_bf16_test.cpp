// Causal attention with bf16 q, k, v, o (fp32 lse, dout and gradients): the bf16 reference path,
// the widened path and the native AVX512_BF16 path against a double-precision oracle on the same
// (bf16-valued) inputs, with the error bounds of src/ops/cpu/attention_bf16.cpp checked element
// by element; GQA, arbitrary positions, queries that see no key, n_k = 0, odd key counts, the
// bf16 merge, threads and bad input; packed documents (the q_doc_pos bound) in every path and the
// skipping of key tiles no query can see.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "ops/cpu/attention_internal.h"
#include "tsp/core/error.h"
#include "tsp/ops/attention.h"
#include "tsp/ops/gemm.h"

namespace tsp {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kU = 0x1p-8;  // unit roundoff of bf16
// The fp32 parts of every path (fp32 scores, the exp2 polynomial, fp32 sums): the tolerances of
// the fp32 attention test (tests/ops/attention_test.cpp), where they are derived: 1e-5 absolute
// for o and lse, 2e-5 of the largest entry for gradients.
constexpr double kTol32 = 1e-5;
constexpr double kTolGradRel32 = 2e-5;
// Second-order terms of the bf16 bounds (products of two u-sized errors, u² = 2^-16 relative).
constexpr double kSecondOrder = 1.02;

std::vector<int64_t> iota_pos(int64_t n, int64_t start) {
  std::vector<int64_t> p(n);
  std::iota(p.begin(), p.end(), start);
  return p;
}

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

// Positions in their documents of tokens at `pos`, documents starting at `starts` (increasing,
// starts[0] = 0).
std::vector<int64_t> doc_positions(const std::vector<int64_t>& pos,
                                   const std::vector<int64_t>& starts) {
  std::vector<int64_t> out;
  for (int64_t x : pos) out.push_back(x - *(std::upper_bound(starts.begin(), starts.end(), x) - 1));
  return out;
}

std::vector<Case> cases() {
  std::mt19937 rng(7);
  std::vector<Case> cs;
  // 50 queries and keys: partial tiles and vectors; an even key count.
  cs.push_back({"mha_d32_self", 2, 2, 32, 0.25f, iota_pos(50, 0), iota_pos(50, 0)});
  // GQA 4, n_q != n_k, an ODD key count (the last key pair is half padding).
  cs.push_back({"gqa4_d128_suffix_oddkeys", 8, 2, 128, 0.09f, iota_pos(37, 113), iota_pos(151, 0)});
  // Several tiles both ways.
  cs.push_back({"gqa2_d64_multitile", 4, 2, 64, 0.125f, iota_pos(130, 70), iota_pos(200, 0)});
  {  // Unsorted random positions with repeats, a large scale (peaky softmax), query 5 sees no key.
    Case c{"gqa2_d64_random", 2, 1, 64, 0.9f, {}, {}};
    std::uniform_int_distribution<int64_t> pos(0, 99);
    for (int i = 0; i < 70; ++i) c.q_pos.push_back(pos(rng));
    c.q_pos[5] = -3;
    c.k_pos = iota_pos(91, 5);
    std::shuffle(c.k_pos.begin(), c.k_pos.end(), rng);
    cs.push_back(c);
  }
  // head_dim % 32 != 0: the widened path (d = 16: the fp32 fast path; d = 8: the reference).
  cs.push_back({"gqa2_d16_widened", 4, 2, 16, 0.3f, iota_pos(40, 10), iota_pos(50, 0)});
  cs.push_back({"gqa2_d8_widened", 4, 2, 8, 0.35f, iota_pos(20, 10), iota_pos(30, 0)});
  // Packed documents over 200 tokens (native path: d = 64), some spanning tiles, some of one
  // token, so tiles below the document starts are skipped; and the widened path with documents.
  {
    Case c{"gqa2_d64_documents", 4, 2, 64, 0.125f, iota_pos(200, 0), iota_pos(200, 0)};
    c.q_doc_pos = doc_positions(c.q_pos, {0, 1, 2, 90, 91, 150, 151, 152, 199});
    cs.push_back(c);
  }
  {
    Case c{"gqa2_d16_documents_widened", 4, 2, 16, 0.3f, iota_pos(50, 0), iota_pos(50, 0)};
    c.q_doc_pos = doc_positions(c.q_pos, {0, 7, 8, 30});
    cs.push_back(c);
  }
  return cs;
}

std::vector<bf16> uniform_bf16(int64_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<bf16> x(n);
  for (bf16& e : x) e = bf16(u(rng));
  return x;
}

struct Data {
  std::vector<bf16> q, k, v;  // q [n_q, H, d]; k, v [n_k, Hkv, d]
  std::vector<float> dout;    // [n_q, H, d]
  Data(const Case& c, uint32_t seed) {
    std::mt19937 rng(seed);
    q = uniform_bf16(c.n_q() * c.H * c.d, rng);
    k = uniform_bf16(c.n_k() * c.Hkv * c.d, rng);
    v = uniform_bf16(c.n_k() * c.Hkv * c.d, rng);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    dout.resize(q.size());
    for (float& e : dout) e = u(rng);
  }
};

struct Out {
  std::vector<bf16> o;
  std::vector<float> lse;
  explicit Out(const Case& c) : o(c.n_q() * c.H * c.d, bf16(7.f)), lse(c.n_q() * c.H, 7.f) {}
};

AttentionBf16Params params(const Case& c, const Data& x, Out& out) {
  AttentionBf16Params p;
  p.n_q = c.n_q(), p.n_k = c.n_k(), p.n_heads = c.H, p.n_kv_heads = c.Hkv, p.head_dim = c.d;
  p.scale = c.scale;
  p.q = x.q.data(), p.k = x.k.data(), p.v = x.v.data();
  p.q_pos = c.q_pos.data(), p.k_pos = c.k_pos.data();
  p.q_doc_pos = c.q_doc_pos.empty() ? nullptr : c.q_doc_pos.data();
  p.o = out.o.data(), p.lse = out.lse.data();
  return p;
}

// The oracle in double on the widened inputs, with the magnitudes the bounds need.
//   Forward:  o, lse, and A_ic = Σ_j p_ij |v_jc|.
//   Backward (from a GIVEN o, the one the kernels receive): dq, dk, dv and the bounds
//     EdS_ij = p_ij·u·Σ_c |dO_ic||v_jc| + u·|dS_ij|,
//     bdv_jc = (2u + u²)·Σ_i p_ij |dO_ic|, bdq_ic = scale·Σ_j EdS_ij |k_jc|,
//     bdk_jc = scale·Σ_i EdS_ij |q_ic|.
struct Oracle {
  std::vector<double> o, lse, A, dq, dk, dv, bdq, bdk, bdv;
};
Oracle oracle(const Case& c, const Data& x, const std::vector<bf16>& o_given) {
  const int64_t nq = c.n_q(), nk = c.n_k(), d = c.d, g = c.H / c.Hkv;
  Oracle r;
  r.o.assign(nq * c.H * d, 0), r.lse.assign(nq * c.H, -kInf), r.A.assign(nq * c.H * d, 0);
  r.dq.assign(nq * c.H * d, 0), r.bdq.assign(nq * c.H * d, 0);
  r.dk.assign(nk * c.Hkv * d, 0), r.dv.assign(nk * c.Hkv * d, 0);
  r.bdk.assign(nk * c.Hkv * d, 0), r.bdv.assign(nk * c.Hkv * d, 0);
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
      // Backward from the given o.
      double D = 0;
      for (int64_t e = 0; e < d; ++e) D += dO(i, h, e) * double(o_given[qi + e]);
      for (int64_t j = 0; j < nk; ++j) {
        if (P[j] == 0) continue;
        double dP = 0, dP_abs = 0;
        for (int64_t e = 0; e < d; ++e) {
          dP += dO(i, h, e) * V(j, h, e);
          dP_abs += std::abs(dO(i, h, e) * V(j, h, e));
        }
        const double dS = P[j] * (dP - D);
        const double EdS = P[j] * kU * dP_abs + kU * std::abs(dS);
        for (int64_t e = 0; e < d; ++e) {
          r.dq[qi + e] += c.scale * dS * K(j, h, e);
          r.bdq[qi + e] += c.scale * EdS * std::abs(K(j, h, e));
          r.dk[kv(j, h, e)] += c.scale * dS * Q(i, h, e);
          r.bdk[kv(j, h, e)] += c.scale * EdS * std::abs(Q(i, h, e));
          r.dv[kv(j, h, e)] += P[j] * dO(i, h, e);
          r.bdv[kv(j, h, e)] += (2 * kU + kU * kU) * P[j] * std::abs(dO(i, h, e));
        }
      }
    }
  return r;
}

double max_abs(const std::vector<double>& x) {
  double m = 0;
  for (double e : x) m = std::max(m, std::abs(e));
  return m;
}

// Every element within bound[i] + slack of the oracle; returns the worst err / (bound + slack),
// so a failure message (and SCOPED_TRACE) says how close it came.
template <class T>
double expect_within(const std::vector<T>& got, const std::vector<double>& want,
                     const std::vector<double>& bound, double slack, const char* what) {
  EXPECT_EQ(got.size(), want.size()) << what;
  double worst = 0;
  for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
    const double err = std::abs(double(got[i]) - want[i]), tol = bound[i] + slack;
    worst = std::max(worst, err / tol);
    if (err > tol) {
      ADD_FAILURE() << what << " at " << i << ": got " << double(got[i]) << ", want " << want[i]
                    << ", error " << err << " > bound " << tol;
      break;
    }
  }
  return worst;
}

using ForwardFn = void (*)(const AttentionBf16Params&);
using BackwardFn = void (*)(const AttentionBf16BackwardParams&);

// Forward: o within (bf16 terms of the path) + 1e-5; lse within 1e-5 (fp32 statistics);
// a query without keys has lse = -inf and o = +0 exactly.
// `p_rounded`: the path rounds P to bf16 for P·V (native), adding u·A_ic.
void check_forward(const Case& c, ForwardFn fn, bool p_rounded, const char* which) {
  SCOPED_TRACE(c.name + " / " + which);
  const Data x(c, 1);
  Out out(c);
  fn(params(c, x, out));
  const Oracle ref = oracle(c, x, out.o);
  std::vector<double> bound(ref.o.size());
  for (size_t i = 0; i < bound.size(); ++i)
    bound[i] = kSecondOrder * kU * (std::abs(ref.o[i]) + (p_rounded ? ref.A[i] : 0.0));
  expect_within(out.o, ref.o, bound, kTol32, "o");
  for (size_t r = 0; r < out.lse.size(); ++r) {
    if (std::isinf(ref.lse[r])) {
      EXPECT_EQ(double(out.lse[r]), ref.lse[r]) << "lse " << r;
      for (int64_t e = 0; e < c.d; ++e) EXPECT_EQ(out.o[r * c.d + e].bits, 0) << "o of row " << r;
    } else {
      EXPECT_NEAR(out.lse[r], ref.lse[r], kTol32 * std::max(1.0, std::abs(ref.lse[r])))
          << "lse " << r;
    }
  }
}

// Backward from the reference forward's o: gradients within (bf16 terms of the path) + the fp32
// path's 2e-5 of the largest entry; they accumulate (a second call adds the same again).
void check_backward(const Case& c, BackwardFn bwd, bool bf16_products, const char* which) {
  SCOPED_TRACE(c.name + " / " + which);
  const Data x(c, 2);
  Out out(c);
  AttentionBf16BackwardParams p;
  static_cast<AttentionBf16Params&>(p) = params(c, x, out);
  attn::forward_reference_bf16(p);
  std::vector<float> dq(x.q.size(), 0.f), dk(x.k.size(), 0.f), dv(x.v.size(), 0.f);
  p.dout = x.dout.data(), p.dq = dq.data(), p.dk = dk.data(), p.dv = dv.data();
  bwd(p);
  const Oracle ref = oracle(c, x, out.o);
  const double f = bf16_products ? kSecondOrder : 0.0;
  auto scaled = [f](std::vector<double> b, double k = 1) {
    for (double& e : b) e *= f * k;
    return b;
  };
  expect_within(dq, ref.dq, scaled(ref.bdq), kTolGradRel32 * max_abs(ref.dq), "dq");
  expect_within(dk, ref.dk, scaled(ref.bdk), kTolGradRel32 * max_abs(ref.dk), "dk");
  expect_within(dv, ref.dv, scaled(ref.bdv), kTolGradRel32 * max_abs(ref.dv), "dv");
  bwd(p);
  auto twice = [](std::vector<double> g) {
    for (double& e : g) e *= 2;
    return g;
  };
  expect_within(dq, twice(ref.dq), scaled(ref.bdq, 2), 2 * kTolGradRel32 * max_abs(ref.dq), "dq+=");
  expect_within(dk, twice(ref.dk), scaled(ref.bdk, 2), 2 * kTolGradRel32 * max_abs(ref.dk), "dk+=");
  expect_within(dv, twice(ref.dv), scaled(ref.bdv, 2), 2 * kTolGradRel32 * max_abs(ref.dv), "dv+=");
}

TEST(AttentionBf16, ThisMachineRunsTheNativePath) {
  // Not a failure elsewhere: a CPU without AVX512_BF16 serves bf16 through the widened path
  // (tested below); the native path's tests then check that path instead.
  if (!__builtin_cpu_supports("avx512bf16")) GTEST_SKIP() << "CPU without AVX512_BF16";
#if defined(__AVX512BF16__)
  EXPECT_TRUE(attn::bf16_fast_path_available(64));
  EXPECT_FALSE(attn::bf16_fast_path_available(48));
#endif
}

TEST(AttentionBf16, ForwardMatchesDoubleWithinDerivedBounds) {
  for (const Case& c : cases()) {
    check_forward(c, attn::forward_reference_bf16, false, "reference");
    check_forward(c, attn::forward_widened_bf16, false, "widened");
    check_forward(c, attention_forward, true, "public");
    if (attn::bf16_fast_path_available(c.d))
      check_forward(c, attn::forward_fast_bf16, true, "native");
  }
}

TEST(AttentionBf16, BackwardMatchesDoubleWithinDerivedBoundsAndAccumulates) {
  for (const Case& c : cases()) {
    check_backward(c, attn::backward_reference_bf16, false, "reference");
    check_backward(c, attn::backward_widened_bf16, false, "widened");
    check_backward(c, attention_backward, true, "public");
    if (attn::bf16_fast_path_available(c.d))
      check_backward(c, attn::backward_fast_bf16, true, "native");
  }
}

TEST(AttentionBf16, NativePathAgreesWithTheReferencePath) {
  // Both against each other directly: their distance is at most the sum of their bounds.
  for (const Case& c : cases()) {
    if (!attn::bf16_fast_path_available(c.d)) continue;
    SCOPED_TRACE(c.name);
    const Data x(c, 3);
    Out fast(c), ref(c);
    attn::forward_fast_bf16(params(c, x, fast));
    attn::forward_reference_bf16(params(c, x, ref));
    const Oracle o = oracle(c, x, ref.o);
    std::vector<double> want(ref.o.begin(), ref.o.end()), bound(want.size());
    for (size_t i = 0; i < bound.size(); ++i)
      bound[i] = kSecondOrder * kU * (2 * std::abs(o.o[i]) + o.A[i]);
    expect_within(fast.o, want, bound, 2 * kTol32, "o fast vs reference");
    for (size_t r = 0; r < ref.lse.size(); ++r)
      if (std::isinf(ref.lse[r]))
        EXPECT_EQ(fast.lse[r], ref.lse[r]);
      else
        EXPECT_NEAR(fast.lse[r], ref.lse[r], 2 * kTol32 * std::max(1.f, std::abs(ref.lse[r])));
  }
}

TEST(AttentionBf16, ThreadedNativePathIsBitIdenticalToOneThread) {
  const Case c = cases()[2];
  if (!attn::bf16_fast_path_available(c.d)) GTEST_SKIP() << "no native bf16 path here";
  const Data x(c, 4);
  auto run = [&](int threads, Out& out, std::vector<float>& dq, std::vector<float>& dk) {
    const int before = compute_threads();
    set_compute_threads(threads);
    AttentionBf16BackwardParams p;
    static_cast<AttentionBf16Params&>(p) = params(c, x, out);
    attention_forward(p);
    std::vector<float> dv(x.v.size(), 0.f);
    dq.assign(x.q.size(), 0.f), dk.assign(x.k.size(), 0.f);
    p.dout = x.dout.data(), p.dq = dq.data(), p.dk = dk.data(), p.dv = dv.data();
    attention_backward(p);
    set_compute_threads(before);
  };
  Out o1(c), o2(c);
  std::vector<float> dq1, dk1, dq2, dk2;
  run(1, o1, dq1, dk1);
  run(2, o2, dq2, dk2);
  for (size_t i = 0; i < o1.o.size(); ++i) ASSERT_EQ(o1.o[i].bits, o2.o[i].bits) << i;
  EXPECT_EQ(o1.lse, o2.lse);
  EXPECT_EQ(dq1, dq2);
  EXPECT_EQ(dk1, dk2);
}

TEST(AttentionBf16, NoKeysGivesZeroOutputMinusInfLseAndNoGradient) {
  Case c{"no_keys", 4, 2, 64, 0.125f, iota_pos(20, 0), {}};
  const Data x(c, 5);
  Out out(c);
  AttentionBf16BackwardParams p;
  static_cast<AttentionBf16Params&>(p) = params(c, x, out);
  p.k = p.v = nullptr, p.k_pos = nullptr;
  attention_forward(p);
  for (float l : out.lse) EXPECT_EQ(l, -std::numeric_limits<float>::infinity());
  for (bf16 o : out.o) EXPECT_EQ(o.bits, 0);
  std::vector<float> dq(x.q.size(), 0.5f);
  p.dout = x.dout.data(), p.dq = dq.data();
  attention_backward(p);
  for (float g : dq) EXPECT_EQ(g, 0.5f);  // += nothing
}

TEST(AttentionBf16, DocumentsSkipKeyTilesNoQueryCanSee) {
  // As in the fp32 test (tests/ops/attention_test.cpp): queries at [128, 256) in the document
  // starting at 128, NaN keys and values at [0, 128). Skipped tiles leave every result finite and
  // equal, bit for bit, to attention over the keys [128, 256) alone. d = 64 (the native path where
  // the CPU has AVX512_BF16, else the widened one).
  Case docs{"skip", 4, 2, 64, 0.125f, iota_pos(128, 128), iota_pos(256, 0)};
  docs.q_doc_pos = doc_positions(docs.q_pos, {0, 128});
  Data x(docs, 31);
  const int64_t row = docs.Hkv * docs.d;
  for (int64_t e = 0; e < 128 * row; ++e)
    x.k[e] = x.v[e] = bf16(std::numeric_limits<float>::quiet_NaN());
  Case alone{"alone", 4, 2, 64, 0.125f, iota_pos(128, 128), iota_pos(128, 128)};
  Data y = x;
  y.k.erase(y.k.begin(), y.k.begin() + 128 * row);
  y.v.erase(y.v.begin(), y.v.begin() + 128 * row);
  auto run = [](const Case& c, const Data& d) {
    Out out(c);
    AttentionBf16BackwardParams p;
    static_cast<AttentionBf16Params&>(p) = params(c, d, out);
    attention_forward(p);
    std::vector<float> dq(d.q.size(), 0.f), dk(d.k.size(), 0.f), dv(d.v.size(), 0.f);
    p.dout = d.dout.data(), p.dq = dq.data(), p.dk = dk.data(), p.dv = dv.data();
    attention_backward(p);
    std::vector<float> o(out.o.size());
    for (size_t i = 0; i < o.size(); ++i) o[i] = float(out.o[i]);
    return std::vector<std::vector<float>>{o, out.lse, dq, dk, dv};
  };
  const auto got = run(docs, x), want = run(alone, y);
  for (int t = 0; t < 3; ++t)  // o, lse, dq
    EXPECT_EQ(0, std::memcmp(got[t].data(), want[t].data(), got[t].size() * sizeof(float))) << t;
  for (int t = 3; t < 5; ++t) {  // dk, dv: zero for the skipped keys, equal for the others
    for (int64_t e = 0; e < 128 * row; ++e) ASSERT_EQ(got[t][e], 0.f) << t << " at " << e;
    EXPECT_EQ(
        0, std::memcmp(got[t].data() + 128 * row, want[t].data(), want[t].size() * sizeof(float)))
        << t;
  }
}

TEST(AttentionBf16, MergeOfDisjointKeySetsMatchesTheFullSet) {
  // Keys split by parity of their index; each half through the reference path (o carries one
  // rounding: u·|o_part| + 1e-5), merged in fp32 and rounded once more (u·|o|). The merged o is a
  // convex combination of the parts, so |error| <= u·(|o_a| + |o_b|) + u·|o| + 2e-5 bounds it.
  const Case full{"merge", 4, 2, 32, 0.2f, iota_pos(40, 30), iota_pos(70, 0)};
  const Data x(full, 6);
  Case ca = full, cb = full;
  ca.k_pos.clear(), cb.k_pos.clear();
  Data xa = x, xb = x;
  xa.k.clear(), xa.v.clear(), xb.k.clear(), xb.v.clear();
  const int64_t row = full.Hkv * full.d;
  for (int64_t j = 0; j < full.n_k(); ++j) {
    Case& cs = j % 2 ? cb : ca;
    Data& xs = j % 2 ? xb : xa;
    cs.k_pos.push_back(full.k_pos[j]);
    xs.k.insert(xs.k.end(), x.k.begin() + j * row, x.k.begin() + (j + 1) * row);
    xs.v.insert(xs.v.end(), x.v.begin() + j * row, x.v.begin() + (j + 1) * row);
  }
  Out oa(ca), ob(cb);
  attn::forward_reference_bf16(params(ca, xa, oa));
  attn::forward_reference_bf16(params(cb, xb, ob));
  const std::vector<bf16> oa_parts = oa.o;
  attention_merge(oa.o.data(), oa.lse.data(), ob.o.data(), ob.lse.data(), full.n_q(), full.H,
                  full.d);
  const Oracle ref = oracle(full, x, oa.o);
  std::vector<double> bound(ref.o.size());
  for (size_t i = 0; i < bound.size(); ++i)
    bound[i] = kU * (std::abs(float(oa_parts[i])) + std::abs(float(ob.o[i])) + std::abs(ref.o[i]));
  expect_within(oa.o, ref.o, bound, 2 * kTol32, "merged o");
  for (size_t r = 0; r < ref.lse.size(); ++r)
    EXPECT_NEAR(oa.lse[r], ref.lse[r], 2 * kTol32 * std::max(1.0, std::abs(ref.lse[r])));
}

TEST(AttentionBf16, MergeHandlesEmptySidesBitExactly) {
  const float ninf = -std::numeric_limits<float>::infinity();
  std::vector<bf16> oa = {bf16(0.3f), bf16(-1.7f), bf16(9.f), bf16(9.f), bf16(2.f), bf16(2.f)};
  std::vector<bf16> ob = {
      bf16(5.f), bf16(5.f), bf16(0.25f), bf16(-3.f), bf16(std::numeric_limits<float>::quiet_NaN()),
      bf16(1.f)};
  std::vector<float> la = {0.5f, ninf, ninf}, lb = {ninf, 1.5f, ninf};
  const std::vector<bf16> oa0 = oa;
  attention_merge(oa.data(), la.data(), ob.data(), lb.data(), 3, 1, 2);
  EXPECT_EQ(oa[0].bits, oa0[0].bits);  // b empty: a unchanged
  EXPECT_EQ(oa[1].bits, oa0[1].bits);
  EXPECT_EQ(la[0], 0.5f);
  EXPECT_EQ(oa[2].bits, ob[2].bits);  // a empty: b copied
  EXPECT_EQ(oa[3].bits, ob[3].bits);
  EXPECT_EQ(la[1], 1.5f);
  EXPECT_EQ(oa[4].bits, 0);  // both empty: 0, never the NaN of an unread side
  EXPECT_EQ(oa[5].bits, 0);
  EXPECT_EQ(la[2], ninf);
}

TEST(AttentionBf16, InvalidShapesRaiseActionableErrors) {
  Case c{"bad", 4, 2, 32, 0.2f, iota_pos(4, 0), iota_pos(4, 0)};
  const Data x(c, 8);
  Out out(c);
  AttentionBf16Params p = params(c, x, out);
  p.n_kv_heads = 3;
  EXPECT_THROW(attention_forward(p), Error);
  p = params(c, x, out);
  p.o = nullptr;
  EXPECT_THROW(attention_forward(p), Error);
  AttentionBf16BackwardParams b;
  static_cast<AttentionBf16Params&>(b) = params(c, x, out);
  EXPECT_THROW(attention_backward(b), Error);  // no dout, dq
  EXPECT_THROW(
      attention_merge(out.o.data(), out.lse.data(), out.o.data(), out.lse.data(), 1, 0, 32), Error);
}

}  // namespace
}  // namespace tsp
