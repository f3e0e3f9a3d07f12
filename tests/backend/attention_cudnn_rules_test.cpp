// The dispatch decision of the CUDA backend's cuDNN attention path
// (src/backend/cuda/attention_cudnn_rules.h), on the CPU: plain C++ here, this test runs in every
// build (CPU-only and sanitizer builds included).
//   1. shape_covered: each condition alone turns the path off.
//   2. in_run: the position check's per-element test, exact near the int64 limits too.
//   3. positions_covered against brute force over every (query, key) pair: for contiguous runs
//      from q0 >= k0 the band cuDNN applies (keys j < nk', and j - i <= right_bound unless there
//      is no mask) is exactly our visibility k_pos[j] <= q_pos[i]; every query sees at least one
//      key; and the keys left out (j >= nk') are seen by no query. Not covered: non-contiguous
//      positions and q0 < k0 (a query would see no key). Runs too far apart for a signed
//      q0 - k0, and shifts past 32 bits with even more keys, keep the band exact.
#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "backend/cuda/attention_cudnn_rules.h"

namespace tsp::cuda::attn::cudnn {
namespace {

CallShape covered_shape() {
  CallShape c;
  c.bf16 = true, c.d = 128, c.documents = false, c.aligned = true;
  c.nq = 4096, c.nk = 4096, c.hq = 32, c.hkv = 8;
  return c;
}

TEST(CudnnAttentionRules, ShapeCoveredNeedsEveryCondition) {
  EXPECT_TRUE(shape_covered(covered_shape()));
  CallShape c = covered_shape();
  c.d = 64;
  EXPECT_TRUE(shape_covered(c));
  c.hq = c.hkv = 4;  // MHA
  EXPECT_TRUE(shape_covered(c));
  c.nq = kMinQueries, c.nk = 1;  // the smallest covered call
  EXPECT_TRUE(shape_covered(c));

  // Each condition alone.
  c = covered_shape(), c.bf16 = false;
  EXPECT_FALSE(shape_covered(c)) << "F32";
  for (int d : {8, 32, 96, 200}) {
    c = covered_shape(), c.d = d;
    EXPECT_FALSE(shape_covered(c)) << "d=" << d;
  }
  c = covered_shape(), c.documents = true;
  EXPECT_FALSE(shape_covered(c)) << "documents";
  c = covered_shape(), c.aligned = false;
  EXPECT_FALSE(shape_covered(c)) << "misaligned";
  c = covered_shape(), c.nq = kMinQueries - 1;
  EXPECT_FALSE(shape_covered(c)) << "decode-sized nq";
  c = covered_shape(), c.nk = 0;
  EXPECT_FALSE(shape_covered(c)) << "no keys";
  c = covered_shape(), c.nq = kMaxRows + 1;
  EXPECT_FALSE(shape_covered(c)) << "nq past 32 bits";
  c = covered_shape(), c.nk = kMaxRows + 1;
  EXPECT_FALSE(shape_covered(c)) << "nk past 32 bits";
  c = covered_shape(), c.hq = 12, c.hkv = 8;
  EXPECT_FALSE(shape_covered(c)) << "hq not a multiple of hkv";
}

TEST(CudnnAttentionRules, InRun) {
  const std::vector<int64_t> run = {5, 6, 7, 8};
  for (int64_t i = 0; i < 4; ++i) EXPECT_TRUE(in_run(run.data(), i));
  const std::vector<int64_t> gap = {5, 6, 8, 9}, down = {5, 4, 3}, same = {5, 5};
  EXPECT_FALSE(in_run(gap.data(), 2));
  EXPECT_FALSE(in_run(down.data(), 1));
  EXPECT_FALSE(in_run(same.data(), 1));
  // Near the int64 limits: exact, no overflow. A sequence wrapping from INT64_MAX to INT64_MIN
  // descends, so it is no run (a signed pos[0] + i would wrap and accept it).
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  constexpr int64_t kMin = std::numeric_limits<int64_t>::min();
  const std::vector<int64_t> top = {kMax - 2, kMax - 1, kMax}, bottom = {kMin, kMin + 1};
  const std::vector<int64_t> wrap = {kMax, kMin}, negative = {-3, -2, -1, 0};
  for (int64_t i = 0; i < 3; ++i) EXPECT_TRUE(in_run(top.data(), i));
  EXPECT_TRUE(in_run(bottom.data(), 1));
  for (int64_t i = 0; i < 4; ++i) EXPECT_TRUE(in_run(negative.data(), i));
  EXPECT_FALSE(in_run(wrap.data(), 1));
}

// Brute force: every pair of a contiguous call against the band of its Coverage.
void check_band(int64_t nq, int64_t nk, int64_t q0, int64_t k0) {
  SCOPED_TRACE(::testing::Message() << "nq=" << nq << " nk=" << nk << " q0=" << q0 << " k0=" << k0);
  const Coverage cov = positions_covered(nq, nk, true, q0, k0);
  if (q0 < k0) {
    EXPECT_FALSE(cov.covered);
    return;
  }
  ASSERT_TRUE(cov.covered);
  ASSERT_GE(cov.nk, 1);
  ASSERT_LE(cov.nk, nk);
  if (cov.right_bound != kNoMask) {
    EXPECT_GE(cov.right_bound, 0);
    EXPECT_LT(cov.right_bound, cov.nk - 1) << "a bound that masks nothing must be kNoMask";
  }
  for (int64_t i = 0; i < nq; ++i) {
    int64_t seen = 0;
    for (int64_t j = 0; j < nk; ++j) {
      const bool ours = k0 + j <= q0 + i;
      const bool band = j < cov.nk && (cov.right_bound == kNoMask || j - i <= cov.right_bound);
      ASSERT_EQ(band, ours) << "pair (" << i << ", " << j << ")";
      seen += band;
    }
    ASSERT_GE(seen, 1) << "query " << i << " sees no key";
  }
}

TEST(CudnnAttentionRules, BandMatchesVisibility) {
  // Self-attention from 0 (nq = nk), a later query chunk against a key prefix (q0 > k0, nk < q0 +
  // nq: the band's bound q0 - k0), keys past the last query (truncated to nk'), queries after
  // every key (no mask), q0 < k0 (not covered).
  check_band(64, 64, 0, 0);
  check_band(70, 130, 100, 0);
  check_band(64, 300, 64, 0);
  check_band(64, 300, 100, 50);
  check_band(64, 20, 200, 0);
  check_band(64, 64, 63, 0);
  check_band(64, 64, 0, 1);
  for (int64_t nq : {1, 3, 64})
    for (int64_t nk : {1, 2, 5, 64, 100})
      for (int64_t q0 : {0, 1, 7, 64, 99})
        for (int64_t k0 : {0, 1, 7, 70}) check_band(nq, nk, q0, k0);
  EXPECT_EQ(positions_covered(64, 64, true, 0, 0).right_bound, 0);
  EXPECT_EQ(positions_covered(64, 64, true, 0, 0).nk, 64);
  EXPECT_EQ(positions_covered(64, 300, true, 64, 0).nk, 128);
  EXPECT_EQ(positions_covered(64, 300, true, 64, 0).right_bound, 64);
  EXPECT_EQ(positions_covered(64, 20, true, 200, 0).right_bound, kNoMask);
}

TEST(CudnnAttentionRules, NotCovered) {
  EXPECT_FALSE(positions_covered(64, 64, false, 0, 0).covered) << "non-contiguous";
  EXPECT_FALSE(positions_covered(64, 64, true, 0, 1).covered) << "q0 < k0";
  EXPECT_FALSE(positions_covered(64, 0, true, 0, 0).covered) << "no keys";
  EXPECT_FALSE(positions_covered(0, 64, true, 0, 0).covered) << "no queries";
  // Positions far apart: no 32-bit bound, but still exact (no mask, every key visible).
  const Coverage far = positions_covered(64, 100, true, int64_t{1} << 40, 0);
  EXPECT_TRUE(far.covered);
  EXPECT_EQ(far.right_bound, kNoMask);
  EXPECT_EQ(far.nk, 100);
  // Runs further apart than int64 can subtract (q0 - k0 > INT64_MAX): still no mask, all keys.
  const Coverage farthest = positions_covered(
      64, 100, true, std::numeric_limits<int64_t>::max() - 63, std::numeric_limits<int64_t>::min());
  EXPECT_TRUE(farthest.covered);
  EXPECT_EQ(farthest.right_bound, kNoMask);
  EXPECT_EQ(farthest.nk, 100);
}

// A shift past 32 bits masks nothing only when it also reaches the last key: with more keys than
// that (not a shape shape_covered passes, but positions_covered states the band for any sizes),
// keys past q0 + nq - 1 stay invisible. Checked on the pairs at the band's edges.
TEST(CudnnAttentionRules, BandPastThirtyTwoBits) {
  const int64_t nq = 64, nk = int64_t{1} << 40, q0 = int64_t{1} << 35, k0 = 0;
  const Coverage cov = positions_covered(nq, nk, true, q0, k0);
  ASSERT_TRUE(cov.covered);
  EXPECT_EQ(cov.nk, q0 + nq) << "keys past the last query are left out";
  EXPECT_EQ(cov.right_bound, q0 - k0);
  for (int64_t i : {int64_t{0}, nq / 2, nq - 1})
    for (int64_t j : {q0 + i - 1, q0 + i, q0 + i + 1, cov.nk - 1, cov.nk}) {
      const bool ours = k0 + j <= q0 + i;
      const bool band = j < cov.nk && (cov.right_bound == kNoMask || j - i <= cov.right_bound);
      EXPECT_EQ(band, ours) << "pair (" << i << ", " << j << ")";
    }
}

}  // namespace
}  // namespace tsp::cuda::attn::cudnn
