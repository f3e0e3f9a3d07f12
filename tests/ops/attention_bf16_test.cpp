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

constexpr double kU = 0x1p-8;  // unit roundoff of bf16
// The fp32 parts of every path (fp32 scores, the exp2 polynomial, fp32 sums): the tolerances of
// the fp32 attention test (tests/ops/attention_test.cpp), where they are derived: 1e-5 absolute
// for o and lse, 2e-5 of the largest entry for gradients.
constexpr double kTol32 = 1e-5;
constexpr double kTolGradRel32 = 2e-5;
// Second-order terms of the bf16 bounds (products of two u-sized errors, u² = 2^-16 relative).
constexpr double kSecondOrder = 1.02;

std::vector<Case> cases() {
  std::mt19937 rng(7);
  std::vector<Case> cs;
  // 50 queries and keys: partial tiles and vectors; an even key count.
  cs.push_back({"mha_d32_self", 2, 2, 32, 0.25f, iota_pos(50, 0), iota_pos(50, 0)});
  // GQA 4, n_q != n_k, an ODD key count (the last key pair is half padding).
  cs.push_back({"gqa4_d128_suffix_oddkeys", 8, 2, 128, 0.09f, iota_pos(37, 113), iota_pos(151, 0)});
  // Several tiles both ways.
  cs.push_back({"gqa2_d64_multitile", 4, 2, 64, 0.125f, iota_pos(130, 70), iota_pos(200, 0)});
  // Unsorted random positions with repeats, a large scale (peaky softmax), query 5 sees no key.
  cs.push_back(random_positions_case("gqa2_d64_random", 2, 1, 64, 0.9f, 91, rng));
  // head_dim % 32 != 0: the widened path (d = 16: the fp32 fast path; d = 8: the reference).
  cs.push_back({"gqa2_d16_widened", 4, 2, 16, 0.3f, iota_pos(40, 10), iota_pos(50, 0)});
  cs.push_back({"gqa2_d8_widened", 4, 2, 8, 0.35f, iota_pos(20, 10), iota_pos(30, 0)});
  // Packed documents over 200 tokens (native path: d = 64), some spanning tiles, some of one
  // token, so tiles below the document starts are skipped; and the widened path with documents.
  cs.push_back(
      with_documents({"gqa2_d64_documents", 4, 2, 64, 0.125f, iota_pos(200, 0), iota_pos(200, 0)},
                     {0, 1, 2, 90, 91, 150, 151, 152, 199}));
  cs.push_back(with_documents(
      {"gqa2_d16_documents_widened", 4, 2, 16, 0.3f, iota_pos(50, 0), iota_pos(50, 0)},
      {0, 7, 8, 30}));
  return cs;
}

// The bounds of the bf16 roundings, from the oracle's magnitudes (attention_test_util.h), for
// the backward from a given o:
//   EdS_ij = p_ij·u·Σ_c |dO_ic||v_jc| + u·|dS_ij| = u·M_ij,
//   bdv_jc = (2u + u²)·Σ_i p_ij |dO_ic|, bdq_ic = scale·Σ_j EdS_ij |k_jc| = u·Mdq_ic,
//   bdk_jc = scale·Σ_i EdS_ij |q_ic| = u·Mdk_jc.
// (u = 2^-8 scales exactly: u·Mdq and u·Mdk are bit for bit the sums of the u-scaled terms.)
struct Bounds {
  std::vector<double> dq, dk, dv;
  explicit Bounds(const Oracle& r)
      : dq(times(r.Mdq, kU)), dk(times(r.Mdk, kU)), dv(times(r.Mdv, 2 * kU + kU * kU)) {}
};

using ForwardFn = void (*)(const AttentionBf16Params&);
using BackwardFn = void (*)(const AttentionBf16BackwardParams&);

// Forward: o within (bf16 terms of the path) + 1e-5; lse within 1e-5 (fp32 statistics);
// a query without keys has lse = -inf and o = +0 exactly.
// `p_rounded`: the path rounds P to bf16 for P·V (native), adding u·A_ic.
void check_forward(const Case& c, ForwardFn fn, bool p_rounded, const char* which) {
  SCOPED_TRACE(c.name + " / " + which);
  const Data<bf16> x(c, 1);
  Out<bf16> out(c);
  fn(params(c, x, out));
  const Oracle ref = oracle(c, x, &out.o);
  std::vector<double> bound(ref.o.size());
  for (size_t i = 0; i < bound.size(); ++i)
    bound[i] = kSecondOrder * kU * (std::abs(ref.o[i]) + (p_rounded ? ref.A[i] : 0.0));
  expect_within(out.o, ref.o, bound, kTol32, "o");
  expect_lse_near(out.lse, ref.lse, kTol32, "lse");
  for (size_t r = 0; r < out.lse.size(); ++r) {
    if (!std::isinf(ref.lse[r])) continue;
    for (int64_t e = 0; e < c.d; ++e) EXPECT_EQ(out.o[r * c.d + e].bits, 0) << "o of row " << r;
  }
}

// Backward from the reference forward's o: gradients within (bf16 terms of the path) + the fp32
// path's 2e-5 of the largest entry; they accumulate (a second call adds the same again).
void check_backward(const Case& c, BackwardFn bwd, bool bf16_products, const char* which) {
  SCOPED_TRACE(c.name + " / " + which);
  const Data<bf16> x(c, 2);
  Pass<bf16> r(c, x);
  attn::forward_reference_bf16(r.p);
  bwd(r.p);
  const Oracle ref = oracle(c, x, &r.out.o);
  const Bounds b(ref);
  const double f = bf16_products ? kSecondOrder : 0.0;
  expect_within(r.dq, ref.dq, times(b.dq, f), kTolGradRel32 * max_abs(ref.dq), "dq");
  expect_within(r.dk, ref.dk, times(b.dk, f), kTolGradRel32 * max_abs(ref.dk), "dk");
  expect_within(r.dv, ref.dv, times(b.dv, f), kTolGradRel32 * max_abs(ref.dv), "dv");
  bwd(r.p);
  expect_within(r.dq, times(ref.dq, 2), times(b.dq, f * 2), 2 * kTolGradRel32 * max_abs(ref.dq),
                "dq+=");
  expect_within(r.dk, times(ref.dk, 2), times(b.dk, f * 2), 2 * kTolGradRel32 * max_abs(ref.dk),
                "dk+=");
  expect_within(r.dv, times(ref.dv, 2), times(b.dv, f * 2), 2 * kTolGradRel32 * max_abs(ref.dv),
                "dv+=");
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
    const Data<bf16> x(c, 3);
    Out<bf16> fast(c), ref(c);
    attn::forward_fast_bf16(params(c, x, fast));
    attn::forward_reference_bf16(params(c, x, ref));
    const Oracle o = oracle(c, x, &ref.o);
    std::vector<double> want(ref.o.begin(), ref.o.end()), bound(want.size());
    for (size_t i = 0; i < bound.size(); ++i)
      bound[i] = kSecondOrder * kU * (2 * std::abs(o.o[i]) + o.A[i]);
    expect_within(fast.o, want, bound, 2 * kTol32, "o fast vs reference");
    expect_lse_near(fast.lse, ref.lse, 2 * kTol32, "lse fast vs reference");
  }
}

TEST(AttentionBf16, ThreadedNativePathIsBitIdenticalToOneThread) {
  const Case c = cases()[2];
  if (!attn::bf16_fast_path_available(c.d)) GTEST_SKIP() << "no native bf16 path here";
  const Data<bf16> x(c, 4);
  auto run = [&](int threads) {
    const int before = compute_threads();
    set_compute_threads(threads);
    auto r = run_public(c, x);  // o (widened), lse, dq, dk, dv
    set_compute_threads(before);
    return r;
  };
  const auto one = run(1), two = run(2);
  // o: widening bf16 to fp32 keeps its bits, so the widened values agree bit for bit iff o does.
  ASSERT_EQ(0, std::memcmp(one[0].data(), two[0].data(), one[0].size() * sizeof(float))) << "o";
  EXPECT_EQ(one[1], two[1]);  // lse
  EXPECT_EQ(one[2], two[2]);  // dq
  EXPECT_EQ(one[3], two[3]);  // dk
}

TEST(AttentionBf16, NoKeysGivesZeroOutputMinusInfLseAndNoGradient) {
  Case c{"no_keys", 4, 2, 64, 0.125f, iota_pos(20, 0), {}};
  const Data<bf16> x(c, 5);
  Out<bf16> out(c);
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
  // As in the fp32 test (tests/ops/attention_test.cpp; check_skipped_key_tiles says how): keys NaN
  // below the queries' document start, results bit-identical to attention over the visible keys
  // alone. d = 64 (the native path where the CPU has AVX512_BF16, else the widened one).
  check_skipped_key_tiles<bf16>(64, 0.125f, 31);
}

TEST(AttentionBf16, MergeOfDisjointKeySetsMatchesTheFullSet) {
  // Keys split by parity of their index; each half through the reference path (o carries one
  // rounding: u·|o_part| + 1e-5), merged in fp32 and rounded once more (u·|o|). The merged o is a
  // convex combination of the parts, so |error| <= u·(|o_a| + |o_b|) + u·|o| + 2e-5 bounds it.
  const Case full{"merge", 4, 2, 32, 0.2f, iota_pos(40, 30), iota_pos(70, 0)};
  const Data<bf16> x(full, 6);
  std::vector<bool> even(full.n_k());
  for (int64_t j = 0; j < full.n_k(); ++j) even[j] = j % 2 == 0;
  const KeySplit<bf16> s = split_keys(full, x, even);
  Out<bf16> oa(s.ca), ob(s.cb);
  attn::forward_reference_bf16(params(s.ca, s.xa, oa));
  attn::forward_reference_bf16(params(s.cb, s.xb, ob));
  const std::vector<bf16> oa_parts = oa.o;
  attention_merge(oa.o.data(), oa.lse.data(), ob.o.data(), ob.lse.data(), full.n_q(), full.H,
                  full.d);
  const Oracle ref = oracle(full, x, &oa.o);
  std::vector<double> bound(ref.o.size());
  for (size_t i = 0; i < bound.size(); ++i)
    bound[i] = kU * (std::abs(float(oa_parts[i])) + std::abs(float(ob.o[i])) + std::abs(ref.o[i]));
  expect_within(oa.o, ref.o, bound, 2 * kTol32, "merged o");
  for (size_t r = 0; r < ref.lse.size(); ++r)
    EXPECT_NEAR(oa.lse[r], ref.lse[r], 2 * kTol32 * std::max(1.0, std::abs(ref.lse[r])));
}

TEST(AttentionBf16, MergeHandlesEmptySidesBitExactly) {
  const float ninf = -std::numeric_limits<float>::infinity();
  // An empty side's o is never read: NaN there must not reach the result (0·NaN would).
  const bf16 nan = bf16(std::numeric_limits<float>::quiet_NaN());
  std::vector<bf16> oa = {bf16(0.3f), bf16(-1.7f), nan, nan, bf16(2.f), bf16(2.f)};
  std::vector<bf16> ob = {nan, nan, bf16(0.25f), bf16(-3.f), nan, bf16(1.f)};
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
  const Data<bf16> x(c, 8);
  Out<bf16> out(c);
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
