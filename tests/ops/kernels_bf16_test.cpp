// The bf16 kernels of tsp/ops/ops.h against their fp32 kernels on the same (bf16-valued) inputs.
//
// Each bf16 kernel widens its inputs (exact), runs the fp32 kernel's arithmetic and rounds a bf16
// output once. So the expectations are EXACT, not tolerances:
//   - fp32 outputs (rstd, dx, dw) are bitwise the fp32 kernel's on the widened inputs;
//   - a bf16 output is bitwise bf16(the fp32 kernel's output), i.e. within one rounding (relative
//     2^-8) of it, and with no other error.
// The linear layers go through oneDNN's bf16 GEMM, whose accumulation order differs from the fp32
// GEMM's: those are checked against a double reference with the derived fp32 bound.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "tsp/core/error.h"
#include "tsp/ops/ops.h"

namespace tsp {
namespace {

using VecF = std::vector<float>;
using VecB = std::vector<bf16>;
constexpr double kU32 = 0x1p-24;  // fp32 unit roundoff
constexpr double kU16 = 0x1p-8;   // bf16 unit roundoff

// Random bf16 values and their exact fp32 widening.
struct Bf16Data {
  VecB b;
  VecF f;
};
Bf16Data random_bf16(int64_t n, std::mt19937& rng, float lo = -1.f, float hi = 1.f) {
  std::uniform_real_distribution<float> d(lo, hi);
  Bf16Data r{VecB(n), VecF(n)};
  for (int64_t i = 0; i < n; ++i) r.b[i] = bf16(d(rng)), r.f[i] = float(r.b[i]);
  return r;
}
VecF random_f32(int64_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> d(-1.f, 1.f);
  VecF v(n);
  for (float& x : v) x = d(rng);
  return v;
}
VecB rounded(const VecF& f) {
  VecB b(f.size());
  for (size_t i = 0; i < f.size(); ++i) b[i] = bf16(f[i]);  // scalar rounding rule
  return b;
}
void expect_same_bits(const VecB& got, const VecB& want, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_EQ(got[i].bits, want[i].bits)
        << what << " at " << i << ": " << float(got[i]) << " vs " << float(want[i]);
}
void expect_same_bits(const VecF& got, const VecF& want, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  ASSERT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0) << what;
}

// ---- Linear ----------------------------------------------------------------------------------

// y = x·Wᵀ in double. Products of bf16 values are exact in fp32 and the GEMM accumulates in fp32,
// so an fp32 result is within e32 = (K+1)·u32·Σ|x||w| (+ u32·|y0| for the accumulate; Higham,
// Thm 3.1) of it; a bf16 result adds one rounding, u16·(|ref| + e32).
TEST(LinearBf16, ForwardBothOutputTypesAndBackwardMatchDouble) {
  std::mt19937 rng(1);
  const int64_t N = 5, in = 40, out = 24;
  const Bf16Data x = random_bf16(N * in, rng), w = random_bf16(out * in, rng),
                 dy = random_bf16(N * out, rng), y0 = random_bf16(N * out, rng);
  for (bool acc : {false, true}) {
    VecF yf(y0.f);
    VecB yb(y0.b);
    linear_forward(x.b.data(), w.b.data(), yf.data(), N, in, out, acc);
    linear_forward(x.b.data(), w.b.data(), yb.data(), N, in, out, acc);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t o = 0; o < out; ++o) {
        double s = acc ? y0.f[n * out + o] : 0.0, a = acc ? std::fabs(s) : 0.0;
        for (int64_t i = 0; i < in; ++i) {
          s += double(x.f[n * in + i]) * w.f[o * in + i];
          a += std::fabs(double(x.f[n * in + i]) * w.f[o * in + i]);
        }
        const double e32 = (in + 1) * kU32 * a;
        ASSERT_NEAR(yf[n * out + o], s, e32) << "fp32 y, accumulate=" << acc;
        ASSERT_NEAR(float(yb[n * out + o]), s, kU16 * (std::fabs(s) + e32) + e32)
            << "bf16 y, accumulate=" << acc;
      }
  }
  // Backward accumulates into fp32: start from a nonzero dx, dw; either may be skipped.
  VecF dx(N * in, 0.5f), dw(out * in, -0.25f);
  linear_backward(dy.b.data(), x.b.data(), w.b.data(), dx.data(), dw.data(), N, in, out);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < in; ++i) {
      double s = 0.5, a = 0.5;
      for (int64_t o = 0; o < out; ++o) {
        s += double(dy.f[n * out + o]) * w.f[o * in + i];
        a += std::fabs(double(dy.f[n * out + o]) * w.f[o * in + i]);
      }
      ASSERT_NEAR(dx[n * in + i], s, (out + 1) * kU32 * a) << "dx";
    }
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = 0; i < in; ++i) {
      double s = -0.25, a = 0.25;
      for (int64_t n = 0; n < N; ++n) {
        s += double(dy.f[n * out + o]) * x.f[n * in + i];
        a += std::fabs(double(dy.f[n * out + o]) * x.f[n * in + i]);
      }
      ASSERT_NEAR(dw[o * in + i], s, (N + 1) * kU32 * a) << "dw";
    }
  VecF dx2(N * in, 0.f);
  linear_backward(dy.b.data(), x.b.data(), w.b.data(), dx2.data(), nullptr, N, in, out);
  linear_backward(dy.b.data(), x.b.data(), w.b.data(), nullptr, nullptr, N, in, out);
  for (int64_t e = 0; e < N * in; ++e) ASSERT_NEAR(dx2[e], dx[e] - 0.5f, 1e-5) << "dx only";
}

// ---- RMSNorm ---------------------------------------------------------------------------------

TEST(RmsNormBf16, ForwardApplyAndBackwardAreTheFp32KernelOnWidenedInputs) {
  std::mt19937 rng(2);
  const int64_t N = 7, h = 96;
  const Bf16Data x = random_bf16(N * h, rng, -3.f, 3.f), w = random_bf16(h, rng, 0.5f, 1.5f);
  const VecF dy = random_f32(N * h, rng);
  const float eps = 1e-5f;

  VecF y32(N * h), rstd32(N);
  rmsnorm_forward(x.f.data(), w.f.data(), y32.data(), rstd32.data(), N, h, eps);
  VecB y(N * h);
  VecF rstd(N);
  rmsnorm_forward(x.b.data(), w.b.data(), y.data(), rstd.data(), N, h, eps);
  expect_same_bits(rstd, rstd32, "rstd");
  expect_same_bits(y, rounded(y32), "y");

  // Apply from the saved rstd reproduces the forward's output bit for bit, in both precisions.
  VecF ya32(N * h);
  rmsnorm_apply(x.f.data(), w.f.data(), rstd32.data(), ya32.data(), N, h);
  expect_same_bits(ya32, y32, "fp32 apply");
  VecB ya(N * h);
  rmsnorm_apply(x.b.data(), w.b.data(), rstd.data(), ya.data(), N, h);
  expect_same_bits(ya, y, "bf16 apply");

  VecF dx32(N * h), dw32(h, 0.125f), dx(N * h, 9.f), dw(h, 0.125f);
  rmsnorm_backward(dy.data(), x.f.data(), w.f.data(), rstd32.data(), dx32.data(), dw32.data(), N,
                   h);
  rmsnorm_backward(dy.data(), x.b.data(), w.b.data(), rstd.data(), dx.data(), dw.data(), N, h);
  expect_same_bits(dx, dx32, "dx (=)");
  expect_same_bits(dw, dw32, "dw (+=)");
  VecF dw_only(h, 0.125f);
  rmsnorm_backward(dy.data(), x.b.data(), w.b.data(), rstd.data(), nullptr, dw_only.data(), N, h);
  expect_same_bits(dw_only, dw32, "dw without dx");
}

// ---- RoPE, SwiGLU, Embedding -------------------------------------------------------------------

TEST(RopeBf16, ForwardIsTheFp32RotationRoundedOnce) {
  std::mt19937 rng(3);
  const int64_t N = 6, H = 3, d = 32;
  const Bf16Data x = random_bf16(N * H * d, rng);
  const std::vector<int64_t> pos = {0, 1, 17, 4095, 100000, 3};
  VecF r32 = x.f;
  rope_forward(r32.data(), pos.data(), N, H, d, 500000.f);
  VecB r = x.b;
  rope_forward(r.data(), pos.data(), N, H, d, 500000.f);
  expect_same_bits(r, rounded(r32), "rope");
  VecB odd(6);
  EXPECT_THROW(rope_forward(odd.data(), pos.data(), 1, 2, 3, 10000.f), Error);
}

TEST(SwiGluBf16, ForwardIsTheFp32ActivationRoundedOnce) {
  std::mt19937 rng(4);
  const int64_t N = 3, F = 1500;  // more than one 1024-element scratch block per row range
  VecF g = random_f32(N * F, rng), u = random_f32(N * F, rng);
  for (float& e : g) e *= 8.f;  // both tails of the sigmoid
  VecF a32(N * F);
  swiglu_forward(g.data(), u.data(), a32.data(), N, F);
  VecB a(N * F);
  swiglu_forward(g.data(), u.data(), a.data(), N, F);
  expect_same_bits(a, rounded(a32), "swiglu");
}

TEST(EmbeddingBf16, ShardedRowsAreCopiedOthersUntouched) {
  std::mt19937 rng(5);
  const int64_t h = 8, v0 = 10, V_shard = 5, N = 6;
  const Bf16Data table = random_bf16(V_shard * h, rng);
  const std::vector<int32_t> ids = {10, 14, 9, 15, 12, 10};
  VecB out(N * h, bf16(7.f));
  embedding_forward(ids.data(), table.b.data(), out.data(), N, h, v0, V_shard);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t e = 0; e < h; ++e) {
      const int64_t row = ids[n] - v0;
      const uint16_t want =
          (row >= 0 && row < V_shard) ? table.b[row * h + e].bits : bf16(7.f).bits;
      ASSERT_EQ(out[n * h + e].bits, want) << "token " << n;
    }
}

TEST(ThreadsBf16, TwoThreadsGiveBitwiseTheSameResults) {
  // Big enough to cross the parallel threshold of the row partition.
  std::mt19937 rng(6);
  const int64_t N = 64, h = 1024;
  const Bf16Data x = random_bf16(N * h, rng), w = random_bf16(h, rng);
  const VecF dy = random_f32(N * h, rng);
  std::vector<int64_t> pos(N);
  std::iota(pos.begin(), pos.end(), 1000);
  auto run = [&](VecB& y, VecF& dx, VecF& dw, VecB& r, VecB& a) {
    VecF rstd(N);
    y.assign(N * h, bf16());
    rmsnorm_forward(x.b.data(), w.b.data(), y.data(), rstd.data(), N, h, 1e-6f);
    dx.assign(N * h, 0.f), dw.assign(h, 0.f);
    rmsnorm_backward(dy.data(), x.b.data(), w.b.data(), rstd.data(), dx.data(), dw.data(), N, h);
    r = x.b;
    rope_forward(r.data(), pos.data(), N, 8, h / 8, 10000.f);
    a.assign(N * h, bf16());
    swiglu_forward(dy.data(), x.f.data(), a.data(), N, h);
  };
  const int before = compute_threads();
  VecB y1, r1, a1, y2, r2, a2;
  VecF dx1, dw1, dx2, dw2;
  set_compute_threads(1);
  run(y1, dx1, dw1, r1, a1);
  set_compute_threads(2);
  run(y2, dx2, dw2, r2, a2);
  set_compute_threads(before);
  expect_same_bits(y1, y2, "rmsnorm y");
  expect_same_bits(dx1, dx2, "rmsnorm dx");
  expect_same_bits(dw1, dw2, "rmsnorm dw");
  expect_same_bits(r1, r2, "rope");
  expect_same_bits(a1, a2, "swiglu");
}

}  // namespace
}  // namespace tsp
