// Causal attention at explicit positions: the fast (blocked AVX-512) path and the scalar reference
// against a naive double-precision oracle that builds the full score matrix (fine at these sizes),
// plus finite differences, the exact merge and decode against a cache; packed documents (the
// q_doc_pos bound) in every path, and the skipping of key tiles no query can see.
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

std::vector<int64_t> iota_pos(int64_t n, int64_t start) {
  std::vector<int64_t> p(n);
  std::iota(p.begin(), p.end(), start);
  return p;
}
// Zigzag: S tokens in 2D chunks, rank r holds chunks r and 2D-1-r.
std::vector<int64_t> zigzag_local(int64_t S, int64_t D, int64_t r) {
  const int64_t c = S / (2 * D);
  std::vector<int64_t> p = iota_pos(c, r * c), hi = iota_pos(c, (2 * D - 1 - r) * c);
  p.insert(p.end(), hi.begin(), hi.end());
  return p;
}
// Positions in their documents of tokens at positions `pos`, for documents starting at `starts`
// (increasing, starts[0] = 0): x - (the last start <= x).
std::vector<int64_t> doc_positions(const std::vector<int64_t>& pos,
                                   const std::vector<int64_t>& starts) {
  std::vector<int64_t> out;
  for (int64_t x : pos) out.push_back(x - *(std::upper_bound(starts.begin(), starts.end(), x) - 1));
  return out;
}
// Keys after an all-gather over the ranks: rank order, so positions are NOT sorted.
std::vector<int64_t> zigzag_gathered(int64_t S, int64_t D) {
  std::vector<int64_t> p;
  for (int64_t r = 0; r < D; ++r) {
    std::vector<int64_t> l = zigzag_local(S, D, r);
    p.insert(p.end(), l.begin(), l.end());
  }
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

std::vector<float> uniform(int64_t n, std::mt19937& rng, float lo = -1.f, float hi = 1.f) {
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> x(n);
  for (float& e : x) e = u(rng);
  return x;
}

struct Data {
  std::vector<float> q, k, v, dout;  // q, dout [n_q, H, d]; k, v [n_k, Hkv, d]
  Data(const Case& c, uint32_t seed) {
    std::mt19937 rng(seed);
    q = uniform(c.n_q() * c.H * c.d, rng);
    k = uniform(c.n_k() * c.Hkv * c.d, rng);
    v = uniform(c.n_k() * c.Hkv * c.d, rng);
    dout = uniform(c.n_q() * c.H * c.d, rng);
  }
};

// Forward outputs and the fp32 buffers the kernels write.
struct Out {
  std::vector<float> o, lse;
  explicit Out(const Case& c) : o(c.n_q() * c.H * c.d, 7.f), lse(c.n_q() * c.H, 7.f) {}
};

AttentionParams params(const Case& c, const Data& x, Out& out) {
  AttentionParams p;
  p.n_q = c.n_q(), p.n_k = c.n_k(), p.n_heads = c.H, p.n_kv_heads = c.Hkv, p.head_dim = c.d;
  p.scale = c.scale;
  p.q = x.q.data(), p.k = x.k.data(), p.v = x.v.data();
  p.q_pos = c.q_pos.data(), p.k_pos = c.k_pos.data();
  p.q_doc_pos = c.q_doc_pos.empty() ? nullptr : c.q_doc_pos.data();
  p.o = out.o.data(), p.lse = out.lse.data();
  return p;
}

// The oracle: full score matrix per head in double, softmax per row, then the textbook backward
// dP = dO·Vᵀ, dS = P∘(dP - rowsum(dO∘O)), dQ = scale·dS·K, dK = scale·dSᵀ·Q, dV = Pᵀ·dO.
struct Naive {
  std::vector<double> o, lse, dq, dk, dv;
};
Naive naive(const Case& c, const Data& x) {
  const int64_t nq = c.n_q(), nk = c.n_k(), d = c.d, g = c.H / c.Hkv;
  Naive r;
  r.o.assign(nq * c.H * d, 0), r.lse.assign(nq * c.H, -kInf);
  r.dq.assign(nq * c.H * d, 0), r.dk.assign(nk * c.Hkv * d, 0), r.dv.assign(nk * c.Hkv * d, 0);
  auto Q = [&](int64_t i, int64_t h, int64_t e) { return double(x.q[(i * c.H + h) * d + e]); };
  auto dO = [&](int64_t i, int64_t h, int64_t e) { return double(x.dout[(i * c.H + h) * d + e]); };
  auto K = [&](int64_t j, int64_t h, int64_t e) {
    return double(x.k[(j * c.Hkv + h / g) * d + e]);
  };
  auto V = [&](int64_t j, int64_t h, int64_t e) {
    return double(x.v[(j * c.Hkv + h / g) * d + e]);
  };
  std::vector<double> P(nq * nk), dS(nq * nk);
  for (int64_t h = 0; h < c.H; ++h) {
    for (int64_t i = 0; i < nq; ++i) {
      double m = -kInf;
      for (int64_t j = 0; j < nk; ++j) {
        double s = -kInf;
        if (c.visible(i, j)) {
          s = 0;
          for (int64_t e = 0; e < d; ++e) s += Q(i, h, e) * K(j, h, e);
          s *= c.scale;
        }
        P[i * nk + j] = s;
        m = std::max(m, s);
      }
      if (m == -kInf) {  // sees no key: P row 0, o = 0, lse = -inf
        for (int64_t j = 0; j < nk; ++j) P[i * nk + j] = 0;
        continue;
      }
      double l = 0;
      for (int64_t j = 0; j < nk; ++j) l += std::exp(P[i * nk + j] - m);
      r.lse[i * c.H + h] = m + std::log(l);
      for (int64_t j = 0; j < nk; ++j) P[i * nk + j] = std::exp(P[i * nk + j] - r.lse[i * c.H + h]);
      for (int64_t e = 0; e < d; ++e) {
        double o = 0;
        for (int64_t j = 0; j < nk; ++j) o += P[i * nk + j] * V(j, h, e);
        r.o[(i * c.H + h) * d + e] = o;
      }
    }
    for (int64_t i = 0; i < nq; ++i) {
      double D = 0;
      for (int64_t e = 0; e < d; ++e) D += dO(i, h, e) * r.o[(i * c.H + h) * d + e];
      for (int64_t j = 0; j < nk; ++j) {
        double dP = 0;
        for (int64_t e = 0; e < d; ++e) dP += dO(i, h, e) * V(j, h, e);
        dS[i * nk + j] = P[i * nk + j] * (dP - D);
      }
    }
    for (int64_t i = 0; i < nq; ++i)
      for (int64_t j = 0; j < nk; ++j)
        for (int64_t e = 0; e < d; ++e) {
          r.dq[(i * c.H + h) * d + e] += c.scale * dS[i * nk + j] * K(j, h, e);
          r.dk[(j * c.Hkv + h / g) * d + e] += c.scale * dS[i * nk + j] * Q(i, h, e);
          r.dv[(j * c.Hkv + h / g) * d + e] += P[i * nk + j] * dO(i, h, e);
        }
  }
  return r;
}

// max |got - want| over elements; infinities must match exactly.
double max_abs_err(const std::vector<float>& got, const std::vector<double>& want) {
  EXPECT_EQ(got.size(), want.size());
  double e = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isinf(want[i]) || std::isinf(got[i])) {
      EXPECT_EQ(double(got[i]), want[i]) << "at " << i;
      continue;
    }
    e = std::max(e, std::abs(got[i] - want[i]));
  }
  return e;
}
double max_abs(const std::vector<double>& x) {
  double m = 0;
  for (double e : x) m = std::max(m, std::abs(e));
  return m;
}

std::vector<Case> cases() {
  std::mt19937 rng(7);
  std::vector<Case> cs;
  // n = 50: partial query and key tiles, partial 16-lane vectors.
  cs.push_back({"mha_d16_self", 2, 2, 16, 0.25f, iota_pos(50, 0), iota_pos(50, 0)});
  // Rank 1 of a D=4 zigzag over S=128 against the gathered (unsorted) keys.
  cs.push_back(
      {"gqa2_d64_zigzag", 4, 2, 64, 0.125f, zigzag_local(128, 4, 1), zigzag_gathered(128, 4)});
  // n_q != n_k: the last 37 tokens against a 150-long prefix, g = 4.
  cs.push_back({"gqa4_d128_suffix", 8, 2, 128, 0.2f, iota_pos(37, 113), iota_pos(150, 0)});
  // Several tiles in both directions (130 queries, 200 keys).
  cs.push_back({"mha_d32_multitile", 2, 2, 32, 0.18f, iota_pos(130, 70), iota_pos(200, 0)});
  {  // Unsorted random positions with repeats, a large scale (peaky softmax), and query 5 placed
     // before every key so it sees none.
    Case c{"gqa2_d64_random", 2, 1, 64, 1.3f, {}, {}};
    std::uniform_int_distribution<int64_t> pos(0, 99);
    for (int i = 0; i < 70; ++i) c.q_pos.push_back(pos(rng));
    c.q_pos[5] = -3;
    c.k_pos = iota_pos(90, 5);
    std::shuffle(c.k_pos.begin(), c.k_pos.end(), rng);
    cs.push_back(c);
  }
  // head_dim not a multiple of 16: served by the reference path.
  cs.push_back({"gqa2_d8_reference", 4, 2, 8, 0.35f, iota_pos(20, 10), iota_pos(30, 0)});
  // Packed documents. Self-attention over 200 tokens in documents of 1 to 90 tokens (some span
  // several tiles, some are a single token), so tiles are skipped below the document starts.
  {
    Case c{"mha_d32_documents", 2, 2, 32, 0.3f, iota_pos(200, 0), iota_pos(200, 0)};
    std::vector<int64_t> starts = {0, 1, 2, 90, 91, 150, 151, 152, 199};
    c.q_doc_pos = doc_positions(c.q_pos, starts);
    cs.push_back(c);
  }
  {  // Rank 1 of a D=4 zigzag over S=512 (its chunks [64, 128) and [384, 448)) against the
     // gathered keys: documents cross chunks and ranks, the second chunk's first document began
     // in another rank's chunk.
    Case c{"gqa2_d64_zigzag_documents", 4, 2, 64, 0.125f, zigzag_local(512, 4, 1),
           zigzag_gathered(512, 4)};
    c.q_doc_pos = doc_positions(c.q_pos, {0, 70, 100, 300, 400, 401, 447});
    cs.push_back(c);
  }
  {  // The reference path (d = 8) with documents, and a query whose document is one token.
    Case c{"gqa2_d8_documents", 4, 2, 8, 0.35f, iota_pos(30, 0), iota_pos(30, 0)};
    c.q_doc_pos = doc_positions(c.q_pos, {0, 5, 6, 17});
    cs.push_back(c);
  }
  return cs;
}

// Tolerances. Inputs are U(-1, 1), so |o| <= 1 and |s| <= scale·d. fp32 scores carry a relative
// error ~d·2^-24 (a few 1e-6 absolute at these |s|), the exp2 polynomial 2e-7 relative, and each
// output sums <= 200 rounded fp32 terms: all well under 1e-5 absolute for o and lse. Observed
// errors are ~1e-6; a real bug (wrong mask, lost rescale, wrong head) gives errors ~1e-1.
constexpr double kTolO = 1e-5;
constexpr double kTolLse = 1e-5;
// Gradients are fp32 sums over up to n_q·g (or n_k) products of those quantities; relative to
// their largest entry they are observed at <= 5e-6; 2e-5 keeps a margin and still catches any
// wrong term (a lost scale, mask or head is off by ~1e-1 relative).
constexpr double kTolGradRel = 2e-5;

using ForwardFn = void (*)(const AttentionParams&);
using BackwardFn = void (*)(const AttentionBackwardParams&);

void check_forward(const Case& c, ForwardFn fn, const char* which) {
  SCOPED_TRACE(c.name + std::string(" / ") + which);
  const Data x(c, 1);
  Out out(c);
  fn(params(c, x, out));
  const Naive ref = naive(c, x);
  EXPECT_LE(max_abs_err(out.o, ref.o), kTolO);
  double lse_err = 0;
  for (size_t i = 0; i < out.lse.size(); ++i) {
    if (std::isinf(ref.lse[i])) {
      EXPECT_EQ(double(out.lse[i]), ref.lse[i]);
      for (int64_t e = 0; e < c.d; ++e) EXPECT_EQ(out.o[i * c.d + e], 0.f);  // o = 0 exactly
    } else {
      lse_err = std::max(lse_err,
                         std::abs(out.lse[i] - ref.lse[i]) / std::max(1.0, std::abs(ref.lse[i])));
    }
  }
  EXPECT_LE(lse_err, kTolLse);
}

void check_backward(const Case& c, ForwardFn fwd, BackwardFn bwd, const char* which) {
  SCOPED_TRACE(c.name + std::string(" / ") + which);
  const Data x(c, 2);
  Out out(c);
  AttentionBackwardParams p;
  static_cast<AttentionParams&>(p) = params(c, x, out);
  fwd(p);
  std::vector<float> dq(x.q.size(), 0.f), dk(x.k.size(), 0.f), dv(x.v.size(), 0.f);
  p.dout = x.dout.data(), p.dq = dq.data(), p.dk = dk.data(), p.dv = dv.data();
  bwd(p);
  const Naive ref = naive(c, x);
  EXPECT_LE(max_abs_err(dq, ref.dq), kTolGradRel * max_abs(ref.dq)) << "dq";
  EXPECT_LE(max_abs_err(dk, ref.dk), kTolGradRel * max_abs(ref.dk)) << "dk";
  EXPECT_LE(max_abs_err(dv, ref.dv), kTolGradRel * max_abs(ref.dv)) << "dv";
  // Gradients ACCUMULATE: a second call on the same buffers adds the same amount again. (Offsets
  // of the gradients' own size keep the test's rounding at the level of the check above.)
  bwd(p);
  auto twice = [](std::vector<double> g) {
    for (double& e : g) e *= 2;
    return g;
  };
  EXPECT_LE(max_abs_err(dq, twice(ref.dq)), 2 * kTolGradRel * max_abs(ref.dq)) << "dq += ";
  EXPECT_LE(max_abs_err(dk, twice(ref.dk)), 2 * kTolGradRel * max_abs(ref.dk)) << "dk += ";
  EXPECT_LE(max_abs_err(dv, twice(ref.dv)), 2 * kTolGradRel * max_abs(ref.dv)) << "dv += ";
}

TEST(Attention, Exp2PolynomialAccuracy) {
  std::vector<float> x;
  for (float t = -126.f; t <= 20.f; t += 0.0137f) x.push_back(t);
  x.push_back(0.f), x.push_back(-0.5f), x.push_back(0.5f);
  std::vector<float> y(x.size());
  attn::exp2_fast(x.data(), y.data(), static_cast<int64_t>(x.size()));
  double worst = 0;
  for (size_t i = 0; i < x.size(); ++i)
    worst = std::max(worst, std::abs(y[i] / std::exp2(double(x[i])) - 1.0));
  // The documented bound of the polynomial (Cephes expf: ~1.2e-7) plus fp32 rounding of the result.
  EXPECT_LE(worst, 2e-7);
  const float below[4] = {-126.5f, -200.f, -std::numeric_limits<float>::infinity(), -1e30f};
  float out[4];
  attn::exp2_fast(below, out, 4);
  for (float o : out) EXPECT_EQ(o, 0.f);  // exactly 0, never a denormal or NaN
}

TEST(Attention, ForwardMatchesNaiveDouble) {
  for (const Case& c : cases()) {
    check_forward(c, attention_forward, "public");
    check_forward(c, attn::forward_reference, "reference");
    if (attn::fast_path_available(c.d)) check_forward(c, attn::forward_fast, "fast");
  }
}

TEST(Attention, BackwardMatchesNaiveDoubleAndAccumulates) {
  for (const Case& c : cases()) {
    check_backward(c, attention_forward, attention_backward, "public");
    check_backward(c, attn::forward_reference, attn::backward_reference, "reference");
    if (attn::fast_path_available(c.d))
      check_backward(c, attn::forward_fast, attn::backward_fast, "fast");
  }
}

TEST(Attention, FastPathMatchesReferencePath) {
  // The two implementations on the same fp32 inputs agree far below the tolerance against double.
  for (const Case& c : cases()) {
    if (!attn::fast_path_available(c.d)) continue;
    SCOPED_TRACE(c.name);
    const Data x(c, 4);
    Out fast(c), ref(c);
    attn::forward_fast(params(c, x, fast));
    attn::forward_reference(params(c, x, ref));
    for (size_t i = 0; i < fast.o.size(); ++i) ASSERT_NEAR(fast.o[i], ref.o[i], kTolO) << i;
    for (size_t i = 0; i < fast.lse.size(); ++i) {
      if (std::isinf(ref.lse[i]))
        ASSERT_EQ(fast.lse[i], ref.lse[i]);
      else
        ASSERT_NEAR(fast.lse[i], ref.lse[i], kTolLse * std::max(1.f, std::abs(ref.lse[i])));
    }
  }
}

TEST(Attention, ThreadedFastPathIsBitIdenticalToOneThread) {
  // Threads split (head, query tile) items in forward and kv heads in backward; each item runs
  // the same code in the same order, so results are bit-identical whatever the thread count.
  const int saved = compute_threads();
  for (const Case& c : cases()) {
    if (!attn::fast_path_available(c.d)) continue;
    SCOPED_TRACE(c.name);
    const Data x(c, 15);
    auto run = [&](int threads) {
      set_compute_threads(threads);
      Out out(c);
      AttentionBackwardParams p;
      static_cast<AttentionParams&>(p) = params(c, x, out);
      attention_forward(p);
      std::vector<float> dq(x.q.size(), 0.f), dk(x.k.size(), 0.f), dv(x.v.size(), 0.f);
      p.dout = x.dout.data(), p.dq = dq.data(), p.dk = dk.data(), p.dv = dv.data();
      attention_backward(p);
      return std::vector<std::vector<float>>{out.o, out.lse, dq, dk, dv};
    };
    const auto one = run(1), two = run(2);
    for (size_t t = 0; t < one.size(); ++t)
      EXPECT_EQ(0, std::memcmp(one[t].data(), two[t].data(), one[t].size() * sizeof(float))) << t;
  }
  set_compute_threads(saved);
}

TEST(Attention, QueryThatSeesNoKeyHasZeroOutputAndNoGradient) {
  Case c{"blind", 2, 1, 16, 0.25f, {-1, 3, 10}, iota_pos(8, 2)};  // query 0 precedes every key
  const Data x(c, 5);
  Out out(c);
  AttentionBackwardParams p;
  static_cast<AttentionParams&>(p) = params(c, x, out);
  attention_forward(p);
  for (int64_t h = 0; h < c.H; ++h) {
    EXPECT_EQ(out.lse[h], -std::numeric_limits<float>::infinity());
    for (int64_t e = 0; e < c.d; ++e) EXPECT_EQ(out.o[h * c.d + e], 0.f);
  }
  std::vector<float> dq(x.q.size(), 0.f), dk(x.k.size(), 0.f), dv(x.v.size(), 0.f);
  p.dout = x.dout.data(), p.dq = dq.data(), p.dk = dk.data(), p.dv = dv.data();
  attention_backward(p);
  for (int64_t e = 0; e < c.H * c.d; ++e) EXPECT_EQ(dq[e], 0.f);  // row of query 0
  // No keys at all: lse = -inf and o = 0 everywhere, backward adds nothing.
  Case none{"no_keys", 2, 2, 16, 0.25f, {0, 1}, {}};
  const Data y(none, 6);
  Out o2(none);
  attention_forward(params(none, y, o2));
  for (float l : o2.lse) EXPECT_EQ(l, -std::numeric_limits<float>::infinity());
  for (float v : o2.o) EXPECT_EQ(v, 0.f);
}

// Forward and backward on the public path: o, lse, dq, dk, dv.
std::vector<std::vector<float>> run_both(const Case& c, const Data& x) {
  Out out(c);
  AttentionBackwardParams p;
  static_cast<AttentionParams&>(p) = params(c, x, out);
  attention_forward(p);
  std::vector<float> dq(x.q.size(), 0.f), dk(x.k.size(), 0.f), dv(x.v.size(), 0.f);
  p.dout = x.dout.data(), p.dq = dq.data(), p.dk = dk.data(), p.dv = dv.data();
  attention_backward(p);
  return {out.o, out.lse, dq, dk, dv};
}

TEST(Attention, DocumentsSkipKeyTilesNoQueryCanSee) {
  // Queries at [128, 256), keys at [0, 256), documents starting at 0 and 128: no query sees a key
  // of [0, 128), i.e. the first two key tiles of 64. Those keys hold NaN: a tile that was
  // computed and masked would still multiply 0 · NaN into o and the gradients, so finite results
  // prove the tiles are skipped. And the results must equal, bit for bit, attention over the
  // keys [128, 256) alone (the same tiles in the same order), with dk, dv of the skipped keys
  // untouched. d = 32 (fast path where built) and d = 8 (reference path).
  for (int64_t d : {int64_t{32}, int64_t{8}}) {
    SCOPED_TRACE("d=" + std::to_string(d));
    Case docs{"skip", 4, 2, d, 0.3f, iota_pos(128, 128), iota_pos(256, 0)};
    docs.q_doc_pos = doc_positions(docs.q_pos, {0, 128});
    Data x(docs, 21);
    const int64_t row = docs.Hkv * d;
    for (int64_t e = 0; e < 128 * row; ++e)
      x.k[e] = x.v[e] = std::numeric_limits<float>::quiet_NaN();
    Case alone{"alone", 4, 2, d, 0.3f, iota_pos(128, 128), iota_pos(128, 128)};
    Data y = x;
    y.k.erase(y.k.begin(), y.k.begin() + 128 * row);
    y.v.erase(y.v.begin(), y.v.begin() + 128 * row);
    const auto got = run_both(docs, x), want = run_both(alone, y);
    for (int t = 0; t < 3; ++t)  // o, lse, dq
      EXPECT_EQ(0, std::memcmp(got[t].data(), want[t].data(), got[t].size() * sizeof(float))) << t;
    for (int t = 3; t < 5; ++t) {  // dk, dv: zero for the skipped keys, equal for the others
      for (int64_t e = 0; e < 128 * row; ++e) ASSERT_EQ(got[t][e], 0.f) << t << " at " << e;
      EXPECT_EQ(
          0, std::memcmp(got[t].data() + 128 * row, want[t].data(), want[t].size() * sizeof(float)))
          << t;
    }
  }
}

TEST(Attention, OneDocumentEqualsNoDocumentsBitwise) {
  // Every query in one document starting at position 0 (q_doc_pos = q_pos): the document bound
  // hides nothing, and every path must give today's causal results bit for bit.
  for (Case c : cases()) {
    if (!c.q_doc_pos.empty() || *std::min_element(c.q_pos.begin(), c.q_pos.end()) < 0 ||
        *std::min_element(c.k_pos.begin(), c.k_pos.end()) < 0)
      continue;
    SCOPED_TRACE(c.name);
    const Data x(c, 22);
    const auto plain = run_both(c, x);
    c.q_doc_pos = c.q_pos;
    const auto one_doc = run_both(c, x);
    for (size_t t = 0; t < plain.size(); ++t)
      EXPECT_EQ(0, std::memcmp(plain[t].data(), one_doc[t].data(), plain[t].size() * sizeof(float)))
          << t;
  }
}

TEST(Attention, NegativeDocumentPositionIsRejected) {
  Case c{"bad_doc", 2, 2, 16, 0.25f, iota_pos(4, 0), iota_pos(4, 0)};
  c.q_doc_pos = {0, 1, -1, 0};
  const Data x(c, 23);
  Out out(c);
  EXPECT_THROW(attention_forward(params(c, x, out)), Error);
}

TEST(Attention, BackwardMatchesCentralFiniteDifferences) {
  // L = Σ dout∘o. Central differences with step 5e-3 on the fp32 forward: truncation
  // h²/6·|L'''| ~ 1e-5, rounding ~ (fp32 error of L ≈ 1e-6) / (2h) ≈ 1e-4. Tolerance 1e-3;
  // a missing scale or wrong sign is off by > 1e-1.
  Case c{"fd", 2, 1, 16, 0.5f, {2, 0, 4, 3, 6}, {0, 1, 2, 3, 4, 5, 6}};
  Data x(c, 8);
  auto loss = [&]() {
    Out out(c);
    attention_forward(params(c, x, out));
    double L = 0;
    for (size_t i = 0; i < out.o.size(); ++i) L += double(x.dout[i]) * out.o[i];
    return L;
  };
  Out out(c);
  AttentionBackwardParams p;
  static_cast<AttentionParams&>(p) = params(c, x, out);
  attention_forward(p);
  std::vector<float> dq(x.q.size(), 0.f), dk(x.k.size(), 0.f), dv(x.v.size(), 0.f);
  p.dout = x.dout.data(), p.dq = dq.data(), p.dk = dk.data(), p.dv = dv.data();
  attention_backward(p);
  const float h = 5e-3f;
  auto check = [&](std::vector<float>& param, const std::vector<float>& grad, const char* name) {
    for (size_t i = 0; i < param.size(); ++i) {
      const float keep = param[i];
      param[i] = keep + h;
      const double lp = loss();
      param[i] = keep - h;
      const double lm = loss();
      param[i] = keep;
      ASSERT_NEAR(grad[i], (lp - lm) / (2.0 * h), 1e-3) << name << "[" << i << "]";
    }
  };
  check(x.q, dq, "dq");
  check(x.k, dk, "dk");
  check(x.v, dv, "dv");
}

// Attention over all keys equals the exact merge of attention over two disjoint key subsets.
void check_merge_split(const Case& c, const std::vector<bool>& in_a) {
  SCOPED_TRACE(c.name);
  const Data x(c, 9);
  Out full(c);
  attention_forward(params(c, x, full));
  Case ca = c, cb = c;
  ca.k_pos.clear(), cb.k_pos.clear();
  Data xa = x, xb = x;
  xa.k.clear(), xa.v.clear(), xb.k.clear(), xb.v.clear();
  const int64_t row = c.Hkv * c.d;
  for (int64_t j = 0; j < c.n_k(); ++j) {
    Case& cs = in_a[j] ? ca : cb;
    Data& xs = in_a[j] ? xa : xb;
    cs.k_pos.push_back(c.k_pos[j]);
    xs.k.insert(xs.k.end(), x.k.begin() + j * row, x.k.begin() + (j + 1) * row);
    xs.v.insert(xs.v.end(), x.v.begin() + j * row, x.v.begin() + (j + 1) * row);
  }
  Out a(ca), b(cb);
  attention_forward(params(ca, xa, a));
  attention_forward(params(cb, xb, b));
  attention_merge(a.o.data(), a.lse.data(), b.o.data(), b.lse.data(), c.n_q(), c.H, c.d);
  // Both sides are within kTolO of exact; the merge is a convex combination (one more rounding).
  for (size_t i = 0; i < full.o.size(); ++i) ASSERT_NEAR(a.o[i], full.o[i], kTolO) << i;
  for (size_t i = 0; i < full.lse.size(); ++i) {
    if (std::isinf(full.lse[i]))
      ASSERT_EQ(a.lse[i], full.lse[i]);
    else
      ASSERT_NEAR(a.lse[i], full.lse[i], kTolLse * std::max(1.f, std::abs(full.lse[i])));
  }
}

TEST(Attention, MergeOfDisjointKeySetsIsExact) {
  // Rank 0's zigzag queries (chunks 0 and 7) against keys split into ranks {0,1} and {2,3}:
  // chunk-0 queries see no key of the second set (lse = -inf on one side).
  Case z{"zigzag_split", 4, 2, 64, 0.125f, zigzag_local(128, 4, 0), zigzag_gathered(128, 4)};
  z.q_pos.push_back(-1);  // and one query that sees nothing on either side
  std::vector<bool> first_half(z.n_k());
  for (int64_t j = 0; j < z.n_k(); ++j) first_half[j] = j < z.n_k() / 2;
  check_merge_split(z, first_half);
  // A random split of a contiguous sequence.
  Case r{"random_split", 2, 2, 32, 0.3f, iota_pos(40, 60), iota_pos(100, 0)};
  std::mt19937 rng(11);
  std::vector<bool> coin(r.n_k());
  for (int64_t j = 0; j < r.n_k(); ++j) coin[j] = rng() & 1;
  check_merge_split(r, coin);
}

TEST(Attention, MergeHandlesEmptySidesBitExactly) {
  const float ninf = -std::numeric_limits<float>::infinity();
  float o_a[4] = {1, 2, 3, 4}, lse_a[2] = {0.5f, ninf};
  const float o_b[4] = {9, 9, 5, 6}, lse_b[2] = {ninf, 1.5f};
  attention_merge(o_a, lse_a, o_b, lse_b, 2, 1, 2);
  EXPECT_EQ(o_a[0], 1.f);  // b empty
  EXPECT_EQ(o_a[1], 2.f);
  EXPECT_EQ(lse_a[0], 0.5f);
  EXPECT_EQ(o_a[2], 5.f);  // a empty
  EXPECT_EQ(o_a[3], 6.f);
  EXPECT_EQ(lse_a[1], 1.5f);
  float o_c[2] = {0, 0}, lse_c[1] = {ninf};
  const float o_d[2] = {0, 0}, lse_d[1] = {ninf};
  attention_merge(o_c, lse_c, o_d, lse_d, 1, 1, 2);
  EXPECT_EQ(lse_c[0], ninf);
  EXPECT_EQ(o_c[0], 0.f);
  EXPECT_EQ(o_c[1], 0.f);
  // Equal weights: the mean, and lse + ln 2.
  float o_e[1] = {1}, lse_e[1] = {2};
  const float o_f[1] = {3}, lse_f[1] = {2};
  attention_merge(o_e, lse_e, o_f, lse_f, 1, 1, 1);
  EXPECT_FLOAT_EQ(o_e[0], 2.f);
  EXPECT_FLOAT_EQ(lse_e[0], 2.f + std::log(2.f));
}

TEST(Attention, DecodeQueryAgainstCacheMatchesPrefillRow) {
  // Prefill 77 tokens, then the last token as a decode query (n_q = 1, pos = max) against the
  // 77-entry cache: same result as the prefill's last row, and as the oracle. g = 4.
  const int64_t n = 77;
  Case prefill{"prefill", 4, 1, 64, 0.125f, iota_pos(n, 0), iota_pos(n, 0)};
  const Data x(prefill, 12);
  Out full(prefill);
  attention_forward(params(prefill, x, full));
  Case dec{"decode", 4, 1, 64, 0.125f, {n - 1}, iota_pos(n, 0)};
  Data xd = x;
  xd.q.assign(x.q.end() - dec.H * dec.d, x.q.end());
  xd.dout.assign(x.dout.end() - dec.H * dec.d, x.dout.end());
  Out step(dec);
  attention_forward(params(dec, xd, step));
  const Naive ref = naive(dec, xd);
  EXPECT_LE(max_abs_err(step.o, ref.o), kTolO);
  for (int64_t i = 0; i < dec.H * dec.d; ++i)
    EXPECT_NEAR(step.o[i], full.o[(n - 1) * dec.H * dec.d + i], kTolO);
  for (int64_t h = 0; h < dec.H; ++h)
    EXPECT_NEAR(step.lse[h], ref.lse[h], kTolLse * std::abs(ref.lse[h]));
}

TEST(Attention, InvalidShapesRaiseActionableErrors) {
  Case c{"bad", 3, 2, 16, 0.25f, {0}, {0}};
  const Data x(c, 13);
  Out out(c);
  try {
    attention_forward(params(c, x, out));
    FAIL() << "n_heads=3, n_kv_heads=2 must be rejected";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("n_kv_heads=2"), std::string::npos) << e.message();
  }
  Case ok{"nan_scale", 2, 2, 16, std::nanf(""), {0}, {0}};
  const Data y(ok, 14);
  Out o2(ok);
  EXPECT_THROW(attention_forward(params(ok, y, o2)), Error);
  AttentionBackwardParams p;
  ok.scale = 0.25f;
  static_cast<AttentionParams&>(p) = params(ok, y, o2);
  EXPECT_THROW(attention_backward(p), Error);  // dout, dq, dk, dv missing
}

}  // namespace
}  // namespace tsp
