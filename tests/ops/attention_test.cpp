// Causal attention at explicit positions: the fast (blocked AVX-512) path and the scalar reference
// against a naive double-precision oracle (attention_test_util.h: every score of a row, fine at
// these sizes), plus finite differences, the exact merge and decode against a cache; packed
// documents (the q_doc_pos bound) in every path, and the skipping of key tiles no query can see.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "ops/attention_test_util.h"
#include "ops/cpu/attention_internal.h"
#include "tsp/core/error.h"
#include "tsp/ops/attention.h"
#include "tsp/ops/gemm.h"

namespace tsp {
namespace {

using namespace test;  // NOLINT: the shared problems, oracle and checks (attention_test_util.h)

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
  // Unsorted random positions with repeats, a large scale (peaky softmax), and query 5 placed
  // before every key so it sees none.
  cs.push_back(random_positions_case("gqa2_d64_random", 2, 1, 64, 1.3f, 90, rng));
  // head_dim not a multiple of 16: served by the reference path.
  cs.push_back({"gqa2_d8_reference", 4, 2, 8, 0.35f, iota_pos(20, 10), iota_pos(30, 0)});
  // Packed documents. Self-attention over 200 tokens in documents of 1 to 90 tokens (some span
  // several tiles, some are a single token), so tiles are skipped below the document starts.
  cs.push_back(
      with_documents({"mha_d32_documents", 2, 2, 32, 0.3f, iota_pos(200, 0), iota_pos(200, 0)},
                     {0, 1, 2, 90, 91, 150, 151, 152, 199}));
  // Rank 1 of a D=4 zigzag over S=512 (its chunks [64, 128) and [384, 448)) against the gathered
  // keys: documents cross chunks and ranks, the second chunk's first document began in another
  // rank's chunk.
  cs.push_back(with_documents({"gqa2_d64_zigzag_documents", 4, 2, 64, 0.125f,
                               zigzag_local(512, 4, 1), zigzag_gathered(512, 4)},
                              {0, 70, 100, 300, 400, 401, 447}));
  // The reference path (d = 8) with documents, and a query whose document is one token.
  cs.push_back(with_documents(
      {"gqa2_d8_documents", 4, 2, 8, 0.35f, iota_pos(30, 0), iota_pos(30, 0)}, {0, 5, 6, 17}));
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

// o within kTolO, lse within kTolLse relative (of max(1, |lse|)); a query that sees no key has
// lse = -inf and o = 0 exactly.
void check_forward(const Case& c, ForwardFn fn, const char* which) {
  SCOPED_TRACE(c.name + std::string(" / ") + which);
  const Data<float> x(c, 1);
  Out<float> out(c);
  fn(params(c, x, out));
  const Oracle ref = oracle(c, x);
  expect_within(out.o, ref.o, {}, kTolO, "o");
  expect_lse_near(out.lse, ref.lse, kTolLse, "lse");
  for (size_t i = 0; i < out.lse.size(); ++i) {
    if (!std::isinf(ref.lse[i])) continue;
    for (int64_t e = 0; e < c.d; ++e) EXPECT_EQ(out.o[i * c.d + e], 0.f);  // o = 0 exactly
  }
}

void check_backward(const Case& c, ForwardFn fwd, BackwardFn bwd, const char* which) {
  SCOPED_TRACE(c.name + std::string(" / ") + which);
  const Data<float> x(c, 2);
  Pass<float> r(c, x);
  fwd(r.p);
  bwd(r.p);
  const Oracle ref = oracle(c, x);
  expect_within(r.dq, ref.dq, {}, kTolGradRel * max_abs(ref.dq), "dq");
  expect_within(r.dk, ref.dk, {}, kTolGradRel * max_abs(ref.dk), "dk");
  expect_within(r.dv, ref.dv, {}, kTolGradRel * max_abs(ref.dv), "dv");
  // Gradients ACCUMULATE: a second call on the same buffers adds the same amount again. (Offsets
  // of the gradients' own size keep the test's rounding at the level of the check above.)
  bwd(r.p);
  expect_within(r.dq, times(ref.dq, 2), {}, 2 * kTolGradRel * max_abs(ref.dq), "dq += ");
  expect_within(r.dk, times(ref.dk, 2), {}, 2 * kTolGradRel * max_abs(ref.dk), "dk += ");
  expect_within(r.dv, times(ref.dv, 2), {}, 2 * kTolGradRel * max_abs(ref.dv), "dv += ");
}

// Two forward outputs of the same problem: o within kTolO of each other, lse within kTolLse
// relative (-inf exactly where `want` has it).
void expect_outputs_near(const Out<float>& got, const Out<float>& want) {
  for (size_t i = 0; i < want.o.size(); ++i) ASSERT_NEAR(got.o[i], want.o[i], kTolO) << i;
  expect_lse_near(got.lse, want.lse, kTolLse, "lse");
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
    const Data<float> x(c, 4);
    Out<float> fast(c), ref(c);
    attn::forward_fast(params(c, x, fast));
    attn::forward_reference(params(c, x, ref));
    expect_outputs_near(fast, ref);
  }
}

TEST(Attention, ThreadedFastPathIsBitIdenticalToOneThread) {
  // Threads split (head, query tile) items in forward and kv heads in backward; each item runs
  // the same code in the same order, so results are bit-identical whatever the thread count.
  const int saved = compute_threads();
  for (const Case& c : cases()) {
    if (!attn::fast_path_available(c.d)) continue;
    SCOPED_TRACE(c.name);
    const Data<float> x(c, 15);
    auto run = [&](int threads) {
      set_compute_threads(threads);
      return run_public(c, x);  // o, lse, dq, dk, dv
    };
    const auto one = run(1), two = run(2);
    for (size_t t = 0; t < one.size(); ++t)
      EXPECT_EQ(0, std::memcmp(one[t].data(), two[t].data(), one[t].size() * sizeof(float))) << t;
  }
  set_compute_threads(saved);
}

TEST(Attention, QueryThatSeesNoKeyHasZeroOutputAndNoGradient) {
  Case c{"blind", 2, 1, 16, 0.25f, {-1, 3, 10}, iota_pos(8, 2)};  // query 0 precedes every key
  const Data<float> x(c, 5);
  const auto r = run_public(c, x);  // o, lse, dq, dk, dv
  const std::vector<float>& o = r[0];
  const std::vector<float>& lse = r[1];
  const std::vector<float>& dq = r[2];
  for (int64_t h = 0; h < c.H; ++h) {
    EXPECT_EQ(lse[h], -std::numeric_limits<float>::infinity());
    for (int64_t e = 0; e < c.d; ++e) EXPECT_EQ(o[h * c.d + e], 0.f);
  }
  for (int64_t e = 0; e < c.H * c.d; ++e) EXPECT_EQ(dq[e], 0.f);  // row of query 0
  // No keys at all: lse = -inf and o = 0 everywhere, backward adds nothing.
  Case none{"no_keys", 2, 2, 16, 0.25f, {0, 1}, {}};
  const Data<float> y(none, 6);
  Out<float> o2(none);
  attention_forward(params(none, y, o2));
  for (float l : o2.lse) EXPECT_EQ(l, -std::numeric_limits<float>::infinity());
  for (float v : o2.o) EXPECT_EQ(v, 0.f);
}

TEST(Attention, DocumentsSkipKeyTilesNoQueryCanSee) {
  // Keys NaN below the queries' document start, results bit-identical to attention over the
  // visible keys alone (check_skipped_key_tiles says how). d = 32 (fast path where built) and
  // d = 8 (reference path).
  for (int64_t d : {int64_t{32}, int64_t{8}}) {
    SCOPED_TRACE("d=" + std::to_string(d));
    check_skipped_key_tiles<float>(d, 0.3f, 21);
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
    const Data<float> x(c, 22);
    const auto plain = run_public(c, x);
    c.q_doc_pos = c.q_pos;
    const auto one_doc = run_public(c, x);
    for (size_t t = 0; t < plain.size(); ++t)
      EXPECT_EQ(0, std::memcmp(plain[t].data(), one_doc[t].data(), plain[t].size() * sizeof(float)))
          << t;
  }
}

TEST(Attention, NegativeDocumentPositionIsRejected) {
  Case c{"bad_doc", 2, 2, 16, 0.25f, iota_pos(4, 0), iota_pos(4, 0)};
  c.q_doc_pos = {0, 1, -1, 0};
  const Data<float> x(c, 23);
  Out<float> out(c);
  EXPECT_THROW(attention_forward(params(c, x, out)), Error);
}

TEST(Attention, BackwardMatchesCentralFiniteDifferences) {
  // L = Σ dout∘o. Central differences with step 5e-3 on the fp32 forward: truncation
  // h²/6·|L'''| ~ 1e-5, rounding ~ (fp32 error of L ≈ 1e-6) / (2h) ≈ 1e-4. Tolerance 1e-3;
  // a missing scale or wrong sign is off by > 1e-1.
  Case c{"fd", 2, 1, 16, 0.5f, {2, 0, 4, 3, 6}, {0, 1, 2, 3, 4, 5, 6}};
  Data<float> x(c, 8);
  auto loss = [&]() {
    Out<float> out(c);
    attention_forward(params(c, x, out));
    double L = 0;
    for (size_t i = 0; i < out.o.size(); ++i) L += double(x.dout[i]) * out.o[i];
    return L;
  };
  const auto grads = run_public(c, x);  // o, lse, dq, dk, dv
  const std::vector<float>& dq = grads[2];
  const std::vector<float>& dk = grads[3];
  const std::vector<float>& dv = grads[4];
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
  const Data<float> x(c, 9);
  Out<float> full(c);
  attention_forward(params(c, x, full));
  const KeySplit<float> s = split_keys(c, x, in_a);
  Out<float> a(s.ca), b(s.cb);
  attention_forward(params(s.ca, s.xa, a));
  attention_forward(params(s.cb, s.xb, b));
  attention_merge(a.o.data(), a.lse.data(), b.o.data(), b.lse.data(), c.n_q(), c.H, c.d);
  // Both sides are within kTolO of exact; the merge is a convex combination (one more rounding).
  expect_outputs_near(a, full);
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
  // An empty side's o is never read: NaN there must not reach the result (0·NaN would).
  const float nan = std::numeric_limits<float>::quiet_NaN();
  float o_a[4] = {1, 2, nan, nan}, lse_a[2] = {0.5f, ninf};
  const float o_b[4] = {nan, nan, 5, 6}, lse_b[2] = {ninf, 1.5f};
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
  const Data<float> x(prefill, 12);
  Out<float> full(prefill);
  attention_forward(params(prefill, x, full));
  Case dec{"decode", 4, 1, 64, 0.125f, {n - 1}, iota_pos(n, 0)};
  Data<float> xd = x;
  xd.q.assign(x.q.end() - dec.H * dec.d, x.q.end());
  xd.dout.assign(x.dout.end() - dec.H * dec.d, x.dout.end());
  Out<float> step(dec);
  attention_forward(params(dec, xd, step));
  const Oracle ref = oracle(dec, xd);
  expect_within(step.o, ref.o, {}, kTolO, "o");
  for (int64_t i = 0; i < dec.H * dec.d; ++i)
    EXPECT_NEAR(step.o[i], full.o[(n - 1) * dec.H * dec.d + i], kTolO);
  for (int64_t h = 0; h < dec.H; ++h)
    EXPECT_NEAR(step.lse[h], ref.lse[h], kTolLse * std::abs(ref.lse[h]));
}

TEST(Attention, InvalidShapesRaiseActionableErrors) {
  Case c{"bad", 3, 2, 16, 0.25f, {0}, {0}};
  const Data<float> x(c, 13);
  Out<float> out(c);
  try {
    attention_forward(params(c, x, out));
    FAIL() << "n_heads=3, n_kv_heads=2 must be rejected";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("n_kv_heads=2"), std::string::npos) << e.message();
  }
  Case ok{"nan_scale", 2, 2, 16, std::nanf(""), {0}, {0}};
  const Data<float> y(ok, 14);
  Out<float> o2(ok);
  EXPECT_THROW(attention_forward(params(ok, y, o2)), Error);
  AttentionBackwardParams p;
  ok.scale = 0.25f;
  static_cast<AttentionParams&>(p) = params(ok, y, o2);
  EXPECT_THROW(attention_backward(p), Error);  // dout, dq, dk, dv missing
}

}  // namespace
}  // namespace tsp
