// GEMM (fp32 and bf16) against a double-precision reference over transposes, leading
// dimensions, beta 0/1, alpha != 1 and odd sizes; argument validation; threads and concurrency.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <thread>
#include <vector>

#include "tsp/core/error.h"
#include "tsp/ops/gemm.h"

namespace tsp {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr double kU = 0x1p-24;  // unit roundoff of fp32

struct Problem {
  Trans ta, tb;
  int64_t M, N, K;
  int64_t pad;  // extra elements at the end of every stored row of A, B and C
  float alpha, beta;
};

std::string describe(const Problem& p) {
  return fmt::format("ta={} tb={} M={} N={} K={} pad={} alpha={} beta={}",
                     p.ta == Trans::N ? "N" : "T", p.tb == Trans::N ? "N" : "T", p.M, p.N, p.K,
                     p.pad, p.alpha, p.beta);
}

// Stored matrices with NaN in the padding: a kernel that reads past a row poisons its result.
struct Operands {
  int64_t lda, ldb, ldc;
  std::vector<float> A, B, C0;
};

Operands make_operands(const Problem& p, std::mt19937& rng) {
  std::uniform_real_distribution<float> dist(-1.f, 1.f);
  const int64_t a_rows = p.ta == Trans::N ? p.M : p.K, a_cols = p.ta == Trans::N ? p.K : p.M;
  const int64_t b_rows = p.tb == Trans::N ? p.K : p.N, b_cols = p.tb == Trans::N ? p.N : p.K;
  Operands o;
  o.lda = a_cols + p.pad;
  o.ldb = b_cols + p.pad;
  o.ldc = p.N + p.pad;
  auto fill = [&](std::vector<float>& v, int64_t rows, int64_t cols, int64_t ld) {
    v.assign(rows * ld, kNaN);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) v[r * ld + c] = dist(rng);
  };
  fill(o.A, a_rows, a_cols, o.lda);
  fill(o.B, b_rows, b_cols, o.ldb);
  fill(o.C0, p.M, p.N, o.ldc);
  return o;
}

float at_a(const Problem& p, const Operands& o, int64_t i, int64_t k) {
  return p.ta == Trans::N ? o.A[i * o.lda + k] : o.A[k * o.lda + i];
}
float at_b(const Problem& p, const Operands& o, int64_t k, int64_t j) {
  return p.tb == Trans::N ? o.B[k * o.ldb + j] : o.B[j * o.ldb + k];
}

// Compares C with alpha·op(A)·op(B) + beta·C0 computed in double. Tolerance: any summation
// order of K products in fp32 (FMA or not, blocked or not) is within γ_K·Σ|a||b| of the exact
// sum, γ_K = K·u/(1-K·u) (Higham, Thm 3.1); the alpha scaling and the beta add cost one more
// rounding each. So tol = (K+2)·u·(|alpha|·Σ_k|a_ik||b_kj| + |beta·c0|) is a rigorous bound,
// while a wrong transpose, stride or beta gives errors of order 1.
void expect_matches_reference(const Problem& p, const Operands& o, const std::vector<float>& C) {
  for (int64_t i = 0; i < p.M; ++i) {
    for (int64_t j = 0; j < p.N; ++j) {
      double sum = 0, abs_sum = 0;
      for (int64_t k = 0; k < p.K; ++k) {
        const double prod = static_cast<double>(at_a(p, o, i, k)) * at_b(p, o, k, j);
        sum += prod;
        abs_sum += std::fabs(prod);
      }
      const double c0 = o.C0[i * o.ldc + j];
      const double ref = p.alpha * sum + p.beta * c0;
      const double tol =
          (p.K + 2) * kU * (std::fabs(p.alpha) * abs_sum + std::fabs(p.beta * c0)) + 1e-30;
      ASSERT_NEAR(C[i * o.ldc + j], ref, tol) << describe(p) << " at (" << i << ", " << j << ")";
    }
    for (int64_t j = p.N; j < o.ldc; ++j) {
      ASSERT_TRUE(std::isnan(C[i * o.ldc + j])) << "padding of C written: " << describe(p);
    }
  }
}

std::vector<Problem> problems() {
  std::vector<Problem> out;
  const int64_t sizes[][3] = {{1, 1, 1}, {7, 33, 130}, {130, 7, 33}, {33, 130, 1}, {1, 130, 7}};
  for (Trans ta : {Trans::N, Trans::T})
    for (Trans tb : {Trans::N, Trans::T})
      for (const auto& s : sizes)
        for (float beta : {0.f, 1.f}) {
          // Alternate alpha and the padding so both appear with every other parameter.
          const bool odd = (s[0] + s[1] + (beta == 1.f)) % 2;
          out.push_back({ta, tb, s[0], s[1], s[2], odd ? 3 : 0, odd ? -0.75f : 1.f, beta});
          out.push_back({ta, tb, s[0], s[1], s[2], odd ? 0 : 5, odd ? 1.f : 2.5f, beta});
        }
  return out;
}

TEST(Gemm, F32MatchesDoubleReference) {
  std::mt19937 rng(1);
  for (const Problem& p : problems()) {
    const Operands o = make_operands(p, rng);
    std::vector<float> C = o.C0;
    gemm(p.ta, p.tb, p.M, p.N, p.K, p.alpha, o.A.data(), o.lda, o.B.data(), o.ldb, p.beta, C.data(),
         o.ldc);
    expect_matches_reference(p, o, C);
  }
}

TEST(Gemm, Bf16MatchesReferenceOnRoundedInputs) {
  std::mt19937 rng(2);
  for (const Problem& p : problems()) {
    Operands o = make_operands(p, rng);
    // Round the inputs to bf16 once; the reference then uses exactly the values the kernel sees.
    // Products of two bf16 values are exact in fp32 (8+8 significant bits), so the fp32 bound of
    // expect_matches_reference applies unchanged.
    std::vector<bf16> A(o.A.size()), B(o.B.size());
    convert_f32_to_bf16(o.A.data(), A.data(), static_cast<int64_t>(A.size()));
    convert_f32_to_bf16(o.B.data(), B.data(), static_cast<int64_t>(B.size()));
    convert_bf16_to_f32(A.data(), o.A.data(), static_cast<int64_t>(A.size()));
    convert_bf16_to_f32(B.data(), o.B.data(), static_cast<int64_t>(B.size()));
    std::vector<float> C = o.C0;
    gemm_bf16(p.ta, p.tb, p.M, p.N, p.K, p.alpha, A.data(), o.lda, B.data(), o.ldb, p.beta,
              C.data(), o.ldc);
    expect_matches_reference(p, o, C);
  }
}

TEST(Gemm, RepeatedCallsHitTheCacheAndStayCorrect) {
  // The same problem twice (second call served from the primitive cache) and then with other
  // pointers: the cached primitive must not remember the first call's buffers.
  std::mt19937 rng(3);
  const Problem p{Trans::N, Trans::T, 33, 7, 130, 2, 1.f, 1.f};
  for (int round = 0; round < 3; ++round) {
    const Operands o = make_operands(p, rng);
    std::vector<float> C = o.C0;
    gemm(p.ta, p.tb, p.M, p.N, p.K, p.alpha, o.A.data(), o.lda, o.B.data(), o.ldb, p.beta, C.data(),
         o.ldc);
    expect_matches_reference(p, o, C);
  }
}

TEST(Gemm, EmptyReductionScalesC) {
  // K = 0: C = beta·C, i.e. zeroed for beta = 0 and untouched for beta = 1.
  std::vector<float> C = {1.f, 2.f, 3.f, 4.f, 5.f, 6.f};
  gemm(Trans::N, Trans::N, 2, 3, 0, 1.f, nullptr, 1, nullptr, 3, 1.f, C.data(), 3);
  EXPECT_EQ(C, (std::vector<float>{1.f, 2.f, 3.f, 4.f, 5.f, 6.f}));
  gemm(Trans::N, Trans::N, 2, 2, 0, 1.f, nullptr, 1, nullptr, 2, 0.f, C.data(), 3);
  EXPECT_EQ(C, (std::vector<float>{0.f, 0.f, 3.f, 0.f, 0.f, 6.f}));
  // M = 0 or N = 0: nothing to do, nothing touched.
  gemm(Trans::N, Trans::N, 0, 3, 4, 1.f, nullptr, 4, nullptr, 3, 0.f, nullptr, 3);
}

TEST(Gemm, BadArgumentsRaise) {
  std::vector<float> a(64, 1.f), b(64, 1.f), c(64, 0.f);
  auto call = [&](Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb,
                  int64_t ldc, float beta) {
    gemm(ta, tb, M, N, K, 1.f, a.data(), lda, b.data(), ldb, beta, c.data(), ldc);
  };
  EXPECT_THROW(call(Trans::N, Trans::N, -1, 2, 2, 2, 2, 2, 0.f), Error);
  EXPECT_THROW(call(Trans::N, Trans::N, 2, -2, 2, 2, 2, 2, 0.f), Error);
  EXPECT_THROW(call(Trans::N, Trans::N, 2, 2, -3, 2, 2, 2, 0.f), Error);
  // A is [M=2, K=4] -> lda >= 4; transposed it is stored [K=4, M=2] -> lda >= 2.
  EXPECT_THROW(call(Trans::N, Trans::N, 2, 3, 4, 3, 3, 3, 0.f), Error);
  EXPECT_NO_THROW(call(Trans::T, Trans::N, 2, 3, 4, 2, 3, 3, 0.f));
  EXPECT_THROW(call(Trans::T, Trans::N, 2, 3, 4, 1, 3, 3, 0.f), Error);
  // B is [K=4, N=3] -> ldb >= 3; transposed [N=3, K=4] -> ldb >= 4.
  EXPECT_THROW(call(Trans::N, Trans::N, 2, 3, 4, 4, 2, 3, 0.f), Error);
  EXPECT_THROW(call(Trans::N, Trans::T, 2, 3, 4, 4, 3, 3, 0.f), Error);
  EXPECT_THROW(call(Trans::N, Trans::N, 2, 3, 4, 4, 3, 2, 0.f), Error);   // ldc < N
  EXPECT_THROW(call(Trans::N, Trans::N, 2, 3, 4, 4, 3, 3, 0.5f), Error);  // beta not 0 or 1
  EXPECT_THROW(gemm(Trans::N, Trans::N, 2, 3, 4, 1.f, nullptr, 4, b.data(), 3, 0.f, c.data(), 3),
               Error);
  try {
    call(Trans::N, Trans::N, 2, 3, 4, 3, 3, 3, 0.f);
    FAIL() << "lda too small was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("lda=3"), std::string::npos) << e.what();
  }
  std::vector<bf16> ab(64), bb(64);
  EXPECT_THROW(
      gemm_bf16(Trans::N, Trans::N, 2, 3, 4, 1.f, ab.data(), 3, bb.data(), 3, 0.f, c.data(), 3),
      Error);
}

TEST(Gemm, ComputeThreads) {
  const int before = compute_threads();
  EXPECT_GE(before, 1);
  EXPECT_THROW(set_compute_threads(0), Error);
  set_compute_threads(2);
  EXPECT_EQ(compute_threads(), 2);
  // Two threads must give a correct (not necessarily bitwise equal) result.
  std::mt19937 rng(4);
  const Problem p{Trans::T, Trans::N, 130, 33, 130, 1, 1.f, 0.f};
  const Operands o = make_operands(p, rng);
  std::vector<float> C = o.C0;
  gemm(p.ta, p.tb, p.M, p.N, p.K, p.alpha, o.A.data(), o.lda, o.B.data(), o.ldb, p.beta, C.data(),
       o.ldc);
  expect_matches_reference(p, o, C);
  set_compute_threads(before);
  EXPECT_EQ(compute_threads(), before);
}

TEST(Gemm, ConcurrentCallersShareTheCache) {
  // Four threads run the same and different shapes at once (first use creates the primitives
  // concurrently); every result must be right.
  std::vector<Problem> ps = {{Trans::N, Trans::N, 33, 130, 7, 0, 1.f, 0.f},
                             {Trans::N, Trans::N, 33, 130, 7, 0, 1.f, 0.f},
                             {Trans::T, Trans::T, 7, 33, 130, 1, 0.5f, 1.f},
                             {Trans::N, Trans::T, 130, 7, 33, 0, 1.f, 1.f}};
  std::vector<Operands> os;
  std::mt19937 rng(5);
  for (const Problem& p : ps) os.push_back(make_operands(p, rng));
  std::vector<std::vector<float>> Cs(ps.size());
  std::vector<std::thread> threads;
  for (size_t t = 0; t < ps.size(); ++t) {
    threads.emplace_back([&, t] {
      const Problem& p = ps[t];
      for (int rep = 0; rep < 20; ++rep) {
        Cs[t] = os[t].C0;
        gemm(p.ta, p.tb, p.M, p.N, p.K, p.alpha, os[t].A.data(), os[t].lda, os[t].B.data(),
             os[t].ldb, p.beta, Cs[t].data(), os[t].ldc);
      }
    });
  }
  for (auto& th : threads) th.join();
  for (size_t t = 0; t < ps.size(); ++t) expect_matches_reference(ps[t], os[t], Cs[t]);
}

}  // namespace
}  // namespace tsp
