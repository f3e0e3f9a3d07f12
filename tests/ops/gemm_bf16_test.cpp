// gemm_bf16 with a bf16 destination: against a double-precision reference over transposes,
// leading dimensions, beta 0/1 and alpha != 1; the accumulate is rounded once; argument checks.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "tsp/core/error.h"
#include "tsp/ops/gemm.h"

namespace tsp {
namespace {

constexpr double kU32 = 0x1p-24;  // unit roundoff of fp32
constexpr double kU16 = 0x1p-8;   // unit roundoff of bf16 (8 significant bits, round to nearest)

struct Problem {
  Trans ta, tb;
  int64_t M, N, K;
  int64_t pad;  // extra elements at the end of every stored row of A, B and C
  float alpha, beta;
};

// Stored bf16 operands with NaN in the padding (a kernel reading past a row poisons its result),
// and the old C, all exactly representable in bf16.
struct Operands {
  int64_t lda, ldb, ldc;
  std::vector<bf16> A, B, C0;
};

Operands make_operands(const Problem& p, std::mt19937& rng) {
  std::uniform_real_distribution<float> dist(-1.f, 1.f);
  const int64_t a_rows = p.ta == Trans::N ? p.M : p.K, a_cols = p.ta == Trans::N ? p.K : p.M;
  const int64_t b_rows = p.tb == Trans::N ? p.K : p.N, b_cols = p.tb == Trans::N ? p.N : p.K;
  Operands o;
  o.lda = a_cols + p.pad, o.ldb = b_cols + p.pad, o.ldc = p.N + p.pad;
  auto fill = [&](std::vector<bf16>& v, int64_t rows, int64_t cols, int64_t ld) {
    v.assign(rows * ld, bf16(std::numeric_limits<float>::quiet_NaN()));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) v[r * ld + c] = bf16(dist(rng));
  };
  fill(o.A, a_rows, a_cols, o.lda);
  fill(o.B, b_rows, b_cols, o.ldb);
  fill(o.C0, p.M, p.N, o.ldc);
  return o;
}

// Tolerance. The inputs are exact bf16 values and a product of two of them is exact in fp32
// (8 + 8 significant bits), so up to the final rounding this is the fp32 GEMM on those values:
// within e32 = (K+2)·u32·(|alpha|·Σ|a||b| + |beta·c0|) of the exact result (Higham, Thm 3.1, plus
// the alpha scaling and the beta add). The bf16 store then rounds once more, by at most
// u16·|fp32 result| <= u16·(|ref| + e32). Total: u16·|ref| + (1 + u16)·e32. (A second rounding
// of the product before the beta add would add up to u16·|alpha·Σab|; see AccumulateRoundsOnce.)
void expect_matches_reference(const Problem& p, const Operands& o, const std::vector<bf16>& C) {
  auto a = [&](int64_t i, int64_t k) {
    return double(p.ta == Trans::N ? o.A[i * o.lda + k] : o.A[k * o.lda + i]);
  };
  auto b = [&](int64_t k, int64_t j) {
    return double(p.tb == Trans::N ? o.B[k * o.ldb + j] : o.B[j * o.ldb + k]);
  };
  for (int64_t i = 0; i < p.M; ++i) {
    for (int64_t j = 0; j < p.N; ++j) {
      double sum = 0, abs_sum = 0;
      for (int64_t k = 0; k < p.K; ++k)
        sum += a(i, k) * b(k, j), abs_sum += std::fabs(a(i, k) * b(k, j));
      const double c0 = o.C0[i * o.ldc + j];
      const double ref = p.alpha * sum + p.beta * c0;
      const double e32 = (p.K + 2) * kU32 * (std::fabs(p.alpha) * abs_sum + std::fabs(p.beta * c0));
      const double tol = kU16 * std::fabs(ref) + (1 + kU16) * e32;
      ASSERT_NEAR(double(C[i * o.ldc + j]), ref, tol)
          << "ta=" << int(p.ta) << " tb=" << int(p.tb) << " M=" << p.M << " N=" << p.N
          << " K=" << p.K << " beta=" << p.beta << " at (" << i << ", " << j << ")";
    }
    for (int64_t j = p.N; j < o.ldc; ++j)
      ASSERT_TRUE(std::isnan(float(C[i * o.ldc + j]))) << "padding of C written";
  }
}

TEST(GemmBf16Out, MatchesReferenceOnBf16Inputs) {
  std::mt19937 rng(3);
  const int64_t sizes[][3] = {{1, 1, 1}, {7, 33, 130}, {130, 7, 33}, {33, 130, 1}, {64, 48, 256}};
  for (Trans ta : {Trans::N, Trans::T})
    for (Trans tb : {Trans::N, Trans::T})
      for (const auto& s : sizes)
        for (float beta : {0.f, 1.f}) {
          const bool odd = (s[0] + s[1] + (beta == 1.f)) % 2;
          const Problem p{ta, tb, s[0], s[1], s[2], odd ? 3 : 0, odd ? -0.75f : 1.f, beta};
          const Operands o = make_operands(p, rng);
          std::vector<bf16> C = o.C0;
          gemm_bf16(p.ta, p.tb, p.M, p.N, p.K, p.alpha, o.A.data(), o.lda, o.B.data(), o.ldb,
                    p.beta, C.data(), o.ldc);
          expect_matches_reference(p, o, C);
        }
}

TEST(GemmBf16Out, EqualsTheFp32OutputRoundedOnce) {
  // Same operands through the fp32-output kernel, then one rounding: identical bits except where
  // the two kernels' fp32 results differ in their last bits across a bf16 rounding boundary
  // (then by one bf16 ulp). Count those: with random data they are a small fraction (~K·2^-16).
  std::mt19937 rng(4);
  const Problem p{Trans::N, Trans::T, 37, 70, 96, 0, 1.f, 1.f};
  const Operands o = make_operands(p, rng);
  std::vector<bf16> C = o.C0;
  std::vector<float> Cf(o.C0.begin(), o.C0.end());
  gemm_bf16(p.ta, p.tb, p.M, p.N, p.K, 1.f, o.A.data(), o.lda, o.B.data(), o.ldb, 1.f, C.data(),
            o.ldc);
  gemm_bf16(p.ta, p.tb, p.M, p.N, p.K, 1.f, o.A.data(), o.lda, o.B.data(), o.ldb, 1.f, Cf.data(),
            o.ldc);
  int64_t differ = 0;
  for (size_t i = 0; i < C.size(); ++i) {
    const bf16 want(Cf[i]);
    if (want.bits == C[i].bits) continue;
    ++differ;
    EXPECT_LE(std::abs(int(want.bits) - int(C[i].bits)), 1) << "at " << i;
  }
  EXPECT_LE(differ, int64_t(C.size()) / 50);
}

TEST(GemmBf16Out, AccumulateRoundsOnce) {
  // a·b = 1 + 3·2^-10 (exact in fp32), c0 = -1: the fp32 sum is 3·2^-10, a bf16 value. Rounding
  // the product to bf16 first (spacing 2^-7 at 1) would give 1, and 1 - 1 = 0.
  const bf16 A[2] = {bf16(1.f), bf16(3.f * 0x1p-10f)}, B[2] = {bf16(1.f), bf16(1.f)};
  bf16 C[1] = {bf16(-1.f)};
  gemm_bf16(Trans::N, Trans::N, 1, 1, 2, 1.f, A, 2, B, 1, 1.f, C, 1);
  EXPECT_EQ(float(C[0]), 3.f * 0x1p-10f);
}

TEST(GemmBf16Out, EmptyReductionAndBadArguments) {
  std::vector<bf16> C(6, bf16(2.f));
  gemm_bf16(Trans::N, Trans::N, 2, 3, 0, 1.f, static_cast<const bf16*>(nullptr), 1,
            static_cast<const bf16*>(nullptr), 3, 1.f, C.data(), 3);
  for (bf16 c : C) EXPECT_EQ(float(c), 2.f);  // beta = 1: C unchanged
  gemm_bf16(Trans::N, Trans::N, 2, 3, 0, 1.f, static_cast<const bf16*>(nullptr), 1,
            static_cast<const bf16*>(nullptr), 3, 0.f, C.data(), 3);
  for (bf16 c : C) EXPECT_EQ(c.bits, 0);  // beta = 0: C = +0
  const bf16 A[4] = {}, B[4] = {};
  EXPECT_THROW(gemm_bf16(Trans::N, Trans::N, 2, 2, 2, 1.f, A, 2, B, 2, 0.5f, C.data(), 2), Error);
  EXPECT_THROW(gemm_bf16(Trans::N, Trans::N, 2, 2, 2, 1.f, A, 1, B, 2, 0.f, C.data(), 2), Error);
  EXPECT_THROW(
      gemm_bf16(Trans::N, Trans::N, 2, 2, 2, 1.f, A, 2, B, 2, 0.f, static_cast<bf16*>(nullptr), 2),
      Error);
}

}  // namespace
}  // namespace tsp
