// Every kernel of tsp/ops/ops.h against a naive double-precision reference; backward references
// are themselves checked against central finite differences of the double forward, so a wrong
// derivative in the reference cannot hide a wrong kernel. Tolerances are stated where used.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "tsp/core/error.h"
#include "tsp/ops/ops.h"

namespace tsp {
namespace {

using VecF = std::vector<float>;
using VecD = std::vector<double>;
constexpr double kU = 0x1p-24;  // fp32 unit roundoff

VecF random_vec(int64_t n, std::mt19937& rng, float lo = -1.f, float hi = 1.f) {
  std::uniform_real_distribution<float> d(lo, hi);
  VecF v(n);
  for (float& x : v) x = d(rng);
  return v;
}
VecD to_double(const VecF& v) {
  return VecD(v.begin(), v.end());
}

// max_i |got_i - want_i| / (abs + rel·|want_i|) <= 1
void expect_close(const VecF& got, const VecD& want, double abs, double rel, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_NEAR(got[i], want[i], abs + rel * std::fabs(want[i])) << what << " at " << i;
  }
}

// Central differences of a scalar function f(x) (double), step h: error O(h²·f''').
VecD finite_difference(const std::function<double(const VecD&)>& f, VecD x, double h = 1e-5) {
  VecD g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    x[i] = x0 + h;
    const double fp = f(x);
    x[i] = x0 - h;
    const double fm = f(x);
    x[i] = x0;
    g[i] = (fp - fm) / (2 * h);
  }
  return g;
}
double dot(const VecD& a, const VecD& b) {
  return std::inner_product(a.begin(), a.end(), b.begin(), 0.0);
}

// ---- Linear ----------------------------------------------------------------------------------

TEST(Linear, ForwardAndBackwardMatchDouble) {
  std::mt19937 rng(10);
  const int64_t N = 7, in = 33, out = 13;
  const VecF x = random_vec(N * in, rng), w = random_vec(out * in, rng);
  const VecF y0 = random_vec(N * out, rng), dy = random_vec(N * out, rng);
  const VecF dx0 = random_vec(N * in, rng), dw0 = random_vec(out * in, rng);
  VecD y_ref(N * out), dx_ref(N * in), dw_ref(out * in);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < out; ++o)
      for (int64_t i = 0; i < in; ++i) {
        y_ref[n * out + o] += double(x[n * in + i]) * w[o * in + i];
        dx_ref[n * in + i] += double(dy[n * out + o]) * w[o * in + i];
        dw_ref[o * in + i] += double(dy[n * out + o]) * x[n * in + i];
      }
  // Sums of K <= 33 products of values in [-1, 1], plus the accumulated value: any summation
  // order is within (K+2)·u·Σ|a||b| <= 35·u·33 ≈ 7e-5 (Higham Thm 3.1), while an indexing or
  // transpose mistake gives errors of order 1.
  const double tol = 35 * kU * 33;
  VecF y(N * out, 123.f);
  linear_forward(x.data(), w.data(), y.data(), N, in, out);
  expect_close(y, y_ref, tol, 0, "y (=)");
  VecF y_acc = y0;
  linear_forward(x.data(), w.data(), y_acc.data(), N, in, out, /*accumulate=*/true);
  VecD y_acc_ref = y_ref;
  for (int64_t i = 0; i < N * out; ++i) y_acc_ref[i] += y0[i];
  expect_close(y_acc, y_acc_ref, tol, 0, "y (+=)");

  VecF dx = dx0, dw = dw0;
  linear_backward(dy.data(), x.data(), w.data(), dx.data(), dw.data(), N, in, out);
  for (int64_t i = 0; i < N * in; ++i) dx_ref[i] += dx0[i];
  for (int64_t i = 0; i < out * in; ++i) dw_ref[i] += dw0[i];
  expect_close(dx, dx_ref, tol, 0, "dx (+=)");
  expect_close(dw, dw_ref, tol, 0, "dw (+=)");

  // Null outputs are skipped.
  VecF dx2 = dx0;
  linear_backward(dy.data(), x.data(), w.data(), dx2.data(), nullptr, N, in, out);
  EXPECT_EQ(dx2, dx);
  VecF dw2 = dw0;
  linear_backward(dy.data(), x.data(), w.data(), nullptr, dw2.data(), N, in, out);
  EXPECT_EQ(dw2, dw);
}

// ---- RMSNorm ---------------------------------------------------------------------------------

VecD rmsnorm_ref(const VecD& x, const VecD& w, int64_t N, int64_t h, double eps, VecD* rstd) {
  VecD y(N * h);
  for (int64_t n = 0; n < N; ++n) {
    double ss = 0;
    for (int64_t i = 0; i < h; ++i) ss += x[n * h + i] * x[n * h + i];
    const double r = 1 / std::sqrt(ss / h + eps);
    if (rstd) (*rstd)[n] = r;
    for (int64_t i = 0; i < h; ++i) y[n * h + i] = x[n * h + i] * r * w[i];
  }
  return y;
}

TEST(RmsNorm, ForwardMatchesDouble) {
  std::mt19937 rng(11);
  const int64_t N = 5, h = 130;
  const float eps = 1e-5f;
  VecF x = random_vec(N * h, rng, -2.f, 2.f);
  for (int64_t i = 0; i < h; ++i) x[4 * h + i] *= 1e-3f;  // a row where eps matters
  const VecF w = random_vec(h, rng, 0.5f, 1.5f);
  VecD rstd_ref(N);
  const VecD y_ref = rmsnorm_ref(to_double(x), to_double(w), N, h, eps, &rstd_ref);
  VecF y(N * h), rstd(N);
  rmsnorm_forward(x.data(), w.data(), y.data(), rstd.data(), N, h, eps);
  // The mean of h squares in fp32 is within h·u relatively; sqrt, division and two products
  // add a few u: 200 u relative covers h = 130 with margin.
  expect_close(rstd, rstd_ref, 0, 200 * kU, "rstd");
  expect_close(y, y_ref, 1e-7, 200 * kU, "y");
}

TEST(RmsNorm, BackwardMatchesDoubleAndFiniteDifferences) {
  std::mt19937 rng(12);
  const int64_t N = 4, h = 33;
  const double eps = 1e-5;
  const VecF x = random_vec(N * h, rng, -2.f, 2.f), w = random_vec(h, rng, 0.5f, 1.5f);
  const VecF dy = random_vec(N * h, rng), dw0 = random_vec(h, rng);
  const VecD xd = to_double(x), wd = to_double(w), dyd = to_double(dy);
  // Analytic double reference, see kernels.cpp for the formula.
  VecD rstd(N), dx_ref(N * h), dw_ref(dw0.begin(), dw0.end());
  rmsnorm_ref(xd, wd, N, h, eps, &rstd);
  for (int64_t n = 0; n < N; ++n) {
    double dotv = 0;
    for (int64_t i = 0; i < h; ++i) dotv += dyd[n * h + i] * wd[i] * xd[n * h + i];
    const double r = rstd[n];
    for (int64_t i = 0; i < h; ++i) {
      dx_ref[n * h + i] = r * wd[i] * dyd[n * h + i] - r * r * r / h * xd[n * h + i] * dotv;
      dw_ref[i] += dyd[n * h + i] * xd[n * h + i] * r;
    }
  }
  // The reference is right: L = <dy, y(x, w)> has gradients dx_ref and dw_ref - dw0.
  // Central differences with h=1e-5 on O(1) smooth functions: error ~1e-10 + roundoff 1e-11.
  const VecD fd_x = finite_difference(
      [&](const VecD& xv) { return dot(dyd, rmsnorm_ref(xv, wd, N, h, eps, nullptr)); }, xd);
  const VecD fd_w = finite_difference(
      [&](const VecD& wv) { return dot(dyd, rmsnorm_ref(xd, wv, N, h, eps, nullptr)); }, wd);
  for (int64_t i = 0; i < N * h; ++i) ASSERT_NEAR(fd_x[i], dx_ref[i], 1e-8) << i;
  for (int64_t i = 0; i < h; ++i) ASSERT_NEAR(fd_w[i], dw_ref[i] - dw0[i], 1e-8) << i;

  VecF rstd_f(N), y(N * h);
  rmsnorm_forward(x.data(), w.data(), y.data(), rstd_f.data(), N, h, static_cast<float>(eps));
  VecF dx(N * h, 7.f), dw = dw0;
  rmsnorm_backward(dy.data(), x.data(), w.data(), rstd_f.data(), dx.data(), dw.data(), N, h);
  // fp32: rstd carries ~h·u relative error and dx is a difference of two O(1) terms; 500 u
  // (3e-5) absolute + relative is the fp32 budget for sums of 33 terms plus that cancellation.
  expect_close(dx, dx_ref, 500 * kU, 500 * kU, "dx (=)");
  expect_close(dw, dw_ref, 500 * kU, 500 * kU, "dw (+=)");
}

// ---- RoPE ------------------------------------------------------------------------------------

// Hugging Face's LlamaRotaryEmbedding, line by line in fp32 (the convention we promise):
//   inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
//   freqs = inv_freq[None, :] * position_ids.float()          (fp32 product)
//   cos, sin = cat(freqs, freqs).cos(), .sin()                 (fp32 results)
// cos/sin are taken in double of the fp32 angle, i.e. the correctly rounded fp32 values.
void hf_cos_sin(int64_t pos, int64_t d, float theta, VecD& c, VecD& s) {
  c.resize(d / 2);
  s.resize(d / 2);
  for (int64_t i = 0; i < d / 2; ++i) {
    const float e = static_cast<float>(2 * i) / static_cast<float>(d);
    const float inv = 1.f / std::pow(theta, e);
    const float angle = static_cast<float>(pos) * inv;
    c[i] = static_cast<float>(std::cos(static_cast<double>(angle)));
    s[i] = static_cast<float>(std::sin(static_cast<double>(angle)));
  }
}

VecD rope_ref(const VecD& x, const std::vector<int64_t>& pos, int64_t N, int64_t H, int64_t d,
              float theta, double sign) {
  VecD y(x.size()), c, s;
  for (int64_t n = 0; n < N; ++n) {
    hf_cos_sin(pos[n], d, theta, c, s);
    for (int64_t hd = 0; hd < H; ++hd)
      for (int64_t i = 0; i < d / 2; ++i) {
        const int64_t lo = (n * H + hd) * d + i, hi = lo + d / 2;
        y[lo] = x[lo] * c[i] - sign * x[hi] * s[i];
        y[hi] = x[hi] * c[i] + sign * x[lo] * s[i];
      }
  }
  return y;
}

TEST(Rope, ForwardMatchesHuggingFaceConventionAtLargePositions) {
  std::mt19937 rng(13);
  const int64_t N = 7, H = 3, d = 16;
  const float theta = 500000.f;
  // Arbitrary order and size, as a zigzag shard or a decode step sees them; 2^24 + 1 is not an
  // fp32 value, and HF rounds the position to fp32 before multiplying.
  const std::vector<int64_t> pos = {0, 1, 4097, 131071, 1000003, 17, 16777217};
  const VecF x = random_vec(N * H * d, rng);
  VecF y = x;
  rope_forward(y.data(), pos.data(), N, H, d, theta);
  // cos/sin within 1 ulp of the correctly rounded values (glibc), then 2 products and a sum of
  // O(1) values: 8 u absolute. Computing the angle in double instead would differ by up to
  // 1000003·2^-24 ≈ 0.06 rad at the last position and fail this test.
  expect_close(y, rope_ref(to_double(x), pos, N, H, d, theta, 1.0), 8 * kU, 0, "rope forward");
}

TEST(Rope, SmallPositionsMatchExactRotation) {
  // Independent of the fp32 recipe: at small positions, the textbook formula in double,
  // inv_freq_i = theta^(-2i/d). The fp32 angle is then within a few ulp of 64 rad: 1e-5.
  std::mt19937 rng(14);
  const int64_t N = 4, H = 2, d = 8;
  const float theta = 10000.f;
  const std::vector<int64_t> pos = {0, 3, 31, 64};
  const VecF x = random_vec(N * H * d, rng);
  VecF y = x;
  rope_forward(y.data(), pos.data(), N, H, d, theta);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t hd = 0; hd < H; ++hd)
      for (int64_t i = 0; i < d / 2; ++i) {
        const double a = pos[n] * std::pow(10000.0, -2.0 * i / d);
        const int64_t lo = (n * H + hd) * d + i, hi = lo + d / 2;
        EXPECT_NEAR(y[lo], x[lo] * std::cos(a) - x[hi] * std::sin(a), 1e-5);
        EXPECT_NEAR(y[hi], x[hi] * std::cos(a) + x[lo] * std::sin(a), 1e-5);
      }
}

TEST(Rope, BackwardIsTheTranspose) {
  // <R x, g> = <x, Rᵀ g> for the rotation R, and Rᵀ R = I.
  std::mt19937 rng(15);
  const int64_t N = 5, H = 2, d = 32;
  const float theta = 10000.f;
  const std::vector<int64_t> pos = {5, 100, 2047, 65535, 9};
  const VecF x = random_vec(N * H * d, rng), g = random_vec(N * H * d, rng);
  VecF rx = x, rtg = g;
  rope_forward(rx.data(), pos.data(), N, H, d, theta);
  rope_backward(rtg.data(), pos.data(), N, H, d, theta);
  // 320 products of O(1) values rotated with ~1 ulp cos/sin: 1e-5 is ~100 u·sqrt(320).
  EXPECT_NEAR(dot(to_double(rx), to_double(g)), dot(to_double(x), to_double(rtg)), 1e-5);
  expect_close(rtg, rope_ref(to_double(g), pos, N, H, d, theta, -1.0), 8 * kU, 0, "rope backward");
  VecF back = rx;
  rope_backward(back.data(), pos.data(), N, H, d, theta);
  expect_close(back, to_double(x), 8 * kU, 0, "R^T R x");
}

TEST(Rope, OddHeadDimRaises) {
  VecF x(6);
  const int64_t pos[1] = {0};
  EXPECT_THROW(rope_forward(x.data(), pos, 1, 2, 3, 10000.f), Error);
  EXPECT_THROW(rope_backward(x.data(), pos, 1, 2, 3, 10000.f), Error);
}

// ---- SwiGLU ----------------------------------------------------------------------------------

double silu(double g) {
  return g / (1 + std::exp(-g));
}

TEST(SwiGlu, ForwardAndBackwardMatchDouble) {
  std::mt19937 rng(16);
  const int64_t N = 3, F = 37;
  VecF g = random_vec(N * F, rng, -6.f, 6.f);
  // Saturated ends: silu -> 0 (negative) and -> g (positive); exp overflows internally at -100.
  g[0] = -100.f, g[1] = -30.f, g[2] = 30.f, g[3] = 100.f, g[4] = 0.f;
  const VecF u = random_vec(N * F, rng, -2.f, 2.f), da = random_vec(N * F, rng);
  VecF a(N * F), dg(N * F, 5.f), du(N * F, 5.f);
  swiglu_forward(g.data(), u.data(), a.data(), N, F);
  swiglu_backward(da.data(), g.data(), u.data(), dg.data(), du.data(), N, F);
  VecD a_ref(N * F), dg_ref(N * F), du_ref(N * F);
  for (int64_t i = 0; i < N * F; ++i) {
    const double gi = g[i], s = 1 / (1 + std::exp(-gi));
    a_ref[i] = silu(gi) * u[i];
    dg_ref[i] = double(da[i]) * u[i] * s * (1 + gi * (1 - s));
    du_ref[i] = double(da[i]) * silu(gi);
    // The derivative formula against central differences (double, step 1e-6): truncation
    // ~1e-12, roundoff |silu(g)|·2e-16/1e-6 <= 2e-8 at g = 100, times |da·u| <= 2.
    const double fd = (silu(gi + 1e-6) - silu(gi - 1e-6)) / 2e-6;
    ASSERT_NEAR(fd * da[i] * u[i], dg_ref[i], 1e-7) << i;
  }
  // exp_fast is within ~1 ulp; sigmoid, the product chain and 1 + g(1-s) add a few roundings,
  // amplified by |g| <= 100 in the last factor only where s(1-s) ~ 0: 30 u relative, 1e-6
  // absolute for values that cancel to ~0.
  expect_close(a, a_ref, 1e-6, 30 * kU, "a");
  expect_close(dg, dg_ref, 1e-6, 30 * kU, "dg (=)");
  expect_close(du, du_ref, 1e-6, 30 * kU, "du (=)");
}

// ---- Embedding -------------------------------------------------------------------------------

TEST(Embedding, ShardedLookupAndGradient) {
  const int64_t V = 10, h = 3, N = 6;
  VecF table(V * h);
  for (int64_t i = 0; i < V * h; ++i) table[i] = static_cast<float>(i);
  const std::vector<int32_t> ids = {9, 0, 4, 4, 7, 2};
  // Shards [0,4), [4,8), [8,10): together they fill every row exactly once.
  VecF out(N * h, -1.f);
  for (int64_t v0 : {0, 4, 8}) {
    const int64_t vs = std::min<int64_t>(4, V - v0);
    embedding_forward(ids.data(), table.data() + v0 * h, out.data(), N, h, v0, vs);
  }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < h; ++i) EXPECT_EQ(out[n * h + i], table[ids[n] * h + i]);

  // One shard leaves out-of-range rows untouched.
  VecF partial(N * h, -1.f);
  embedding_forward(ids.data(), table.data() + 4 * h, partial.data(), N, h, 4, 4);
  for (int64_t n = 0; n < N; ++n) {
    const bool in = ids[n] >= 4 && ids[n] < 8;
    for (int64_t i = 0; i < h; ++i)
      EXPECT_EQ(partial[n * h + i], in ? table[ids[n] * h + i] : -1.f) << n;
  }

  // Backward accumulates (repeated id 4 gets both rows), only inside the shard. Small integers:
  // exact.
  VecF dout(N * h);
  for (int64_t i = 0; i < N * h; ++i) dout[i] = static_cast<float>(i + 1);
  VecF dshard(4 * h, 1.f);
  embedding_backward(ids.data(), dout.data(), dshard.data(), N, h, 4, 4);
  VecF expect(4 * h, 1.f);
  for (int64_t n = 0; n < N; ++n)
    if (ids[n] >= 4 && ids[n] < 8)
      for (int64_t i = 0; i < h; ++i) expect[(ids[n] - 4) * h + i] += dout[n * h + i];
  EXPECT_EQ(dshard, expect);
}

// ---- Cross-entropy ---------------------------------------------------------------------------

// Double reference: per-row losses and grad_scale·(softmax - onehot).
double ce_ref(const VecD& logits, const std::vector<int32_t>& labels, int64_t N, int64_t V,
              double scale, int32_t ignore, VecD* grad) {
  double total = 0;
  if (grad) grad->assign(N * V, 0.0);
  for (int64_t n = 0; n < N; ++n) {
    if (labels[n] == ignore) continue;
    const double* l = logits.data() + n * V;
    const double m = *std::max_element(l, l + V);
    double s = 0;
    for (int64_t j = 0; j < V; ++j) s += std::exp(l[j] - m);
    total += m + std::log(s) - l[labels[n]];
    if (grad)
      for (int64_t j = 0; j < V; ++j)
        (*grad)[n * V + j] = scale * (std::exp(l[j] - m) / s - (j == labels[n]));
  }
  return total;
}

struct CeCase {
  int64_t N = 6, V = 37;
  VecF logits;
  std::vector<int32_t> labels;
};

CeCase make_ce_case(std::mt19937& rng) {
  CeCase c;
  c.logits = random_vec(c.N * c.V, rng, -8.f, 8.f);
  for (int64_t j = 0; j < c.V; ++j) c.logits[2 * c.V + j] += 1000.f;  // needs the max shift
  c.labels = {3, 36, 0, -100, 20, 7};                                 // row 3 ignored
  return c;
}

TEST(CrossEntropy, LossAndGradientMatchDouble) {
  std::mt19937 rng(17);
  const CeCase c = make_ce_case(rng);
  const float scale = 1.f / 5;  // mean over the 5 counted rows
  VecD grad_ref;
  const double loss_ref = ce_ref(to_double(c.logits), c.labels, c.N, c.V, scale, -100, &grad_ref);
  VecF dl(c.N * c.V, 9.f);
  const double loss =
      cross_entropy_forward_backward(c.logits.data(), c.labels.data(), dl.data(), c.N, c.V, scale);
  // Per row the fp32 sum of V=37 exps is within ~56 u relative: rounding of l - max (|l - max|
  // <= 16, so 16 u on the exponent), exp_fast (1 u), V u for the sum; its log is then within
  // 56 u ≈ 3.3e-6 absolute. Five counted rows: 5e-5 leaves 3x margin.
  EXPECT_NEAR(loss, loss_ref, 5e-5);
  // Each entry is scale·(p - [label]) with p <= 1 carrying the same ~56 u relative error, so
  // the absolute error is below 100·u·scale (also where p ≈ 1 cancels against the label).
  expect_close(dl, grad_ref, 100 * kU * scale, 0, "dlogits");
  for (int64_t j = 0; j < c.V; ++j) EXPECT_EQ(dl[3 * c.V + j], 0.f) << "ignored row";

  // The gradient of the reference is right: d(loss_ref·scale)/dlogits by central differences.
  const VecD fd = finite_difference(
      [&](const VecD& l) { return scale * ce_ref(l, c.labels, c.N, c.V, scale, -100, nullptr); },
      to_double(c.logits), 1e-4);
  for (int64_t i = 0; i < c.N * c.V; ++i) ASSERT_NEAR(fd[i], grad_ref[i], 1e-7) << i;

  // dlogits may alias logits.
  VecF inplace = c.logits;
  const double loss2 = cross_entropy_forward_backward(inplace.data(), c.labels.data(),
                                                      inplace.data(), c.N, c.V, scale);
  EXPECT_EQ(loss2, loss);
  EXPECT_EQ(inplace, dl);
}

TEST(CrossEntropy, BadLabelRaises) {
  VecF logits(2 * 4, 0.f), dl(2 * 4);
  const std::vector<int32_t> labels = {1, 4};
  EXPECT_THROW(cross_entropy_forward_backward(logits.data(), labels.data(), dl.data(), 2, 4, 1.f),
               Error);
  const std::vector<int32_t> negative = {-1, 0};
  EXPECT_THROW(cross_entropy_forward_backward(logits.data(), negative.data(), dl.data(), 2, 4, 1.f),
               Error);
}

// Vocabulary split into `shards` contiguous pieces of uneven size.
std::vector<int64_t> shard_starts(int64_t V, int shards) {
  std::vector<int64_t> starts;
  for (int s = 0; s <= shards; ++s) starts.push_back(V * s * s / (shards * shards));  // uneven
  return starts;
}

// The loss from final statistics: max + log(sum) - target for counted rows.
double loss_from_stats(const VecF& m, const VecF& s, const VecF& t,
                       const std::vector<int32_t>& labels, int32_t ignore) {
  double loss = 0;
  for (size_t n = 0; n < labels.size(); ++n)
    if (labels[n] != ignore) loss += double(m[n]) + std::log(double(s[n])) - t[n];
  return loss;
}

TEST(OnlineSoftmax, ShardedMatchesFullForOneToFourShards) {
  std::mt19937 rng(18);
  const CeCase c = make_ce_case(rng);
  const float scale = 0.25f;
  VecF dl_full(c.N * c.V);
  const double loss_full = cross_entropy_forward_backward(c.logits.data(), c.labels.data(),
                                                          dl_full.data(), c.N, c.V, scale);
  const float inf = std::numeric_limits<float>::infinity();
  for (int shards = 1; shards <= 4; ++shards) {
    SCOPED_TRACE(fmt::format("{} shards", shards));
    const std::vector<int64_t> starts = shard_starts(c.V, shards);
    // Each shard's logits as its own contiguous [N, V_shard] array, as a rank holds them.
    std::vector<VecF> pieces(shards);
    for (int s = 0; s < shards; ++s) {
      const int64_t v0 = starts[s], vs = starts[s + 1] - v0;
      pieces[s].resize(c.N * vs);
      for (int64_t n = 0; n < c.N; ++n)
        std::copy_n(c.logits.begin() + n * c.V + v0, vs, pieces[s].begin() + n * vs);
    }
    // (a) Ring style: one running state folded over the shards in turn, in the ring's order
    // s = (p - k) mod D (here p = D - 1: descending), so no shard's result is hidden by a later
    // higher shard overwriting it.
    VecF m(c.N, -inf), sum(c.N, 0.f), target(c.N, 0.f);
    for (int k = 0, s = shards - 1; k < shards; ++k, s = (s + shards - 1) % shards)
      online_softmax_update(pieces[s].data(), c.labels.data(), m.data(), sum.data(), target.data(),
                            c.N, starts[s + 1] - starts[s], starts[s]);
    // (b) Rank style: a state per shard, merged afterwards (target from its owner), merging in
    // a rotated order 1, 2, ..., 0.
    VecF mm(c.N, -inf), ms(c.N, 0.f), mt(c.N, 0.f);
    for (int k = 0; k < shards; ++k) {
      const int s = (k + 1) % shards;
      VecF m1(c.N, -inf), s1(c.N, 0.f);
      online_softmax_update(pieces[s].data(), c.labels.data(), m1.data(), s1.data(), mt.data(), c.N,
                            starts[s + 1] - starts[s], starts[s]);
      online_softmax_merge(mm.data(), ms.data(), m1.data(), s1.data(), c.N);
    }
    // The sums differ from the full kernel's by summation order (<= 2·V·u relative), by the
    // rounding of l - max against another max (<= 16 u per term) and one rescale per shard
    // (~2 u): under 150 u ≈ 1e-5 on each row's log, 5 rows: 1e-4 absolute.
    EXPECT_NEAR(loss_from_stats(m, sum, target, c.labels, -100), loss_full, 1e-4);
    EXPECT_NEAR(loss_from_stats(mm, ms, mt, c.labels, -100), loss_full, 1e-4);
    for (int64_t n = 0; n < c.N; ++n) {
      EXPECT_EQ(m[n], mm[n]);                         // max is exact whatever the grouping
      EXPECT_NEAR(sum[n], ms[n], 150 * kU * sum[n]);  // same budget as above
    }
    for (int s = 0; s < shards; ++s) {
      const int64_t v0 = starts[s], vs = starts[s + 1] - v0;
      VecF dl(c.N * vs, 3.f);
      online_softmax_backward(pieces[s].data(), c.labels.data(), m.data(), sum.data(), dl.data(),
                              c.N, vs, v0, scale);
      // Same max, same exp terms; only the sums differ (150 u relative, above): entries
      // scale·p with p <= 1 are within 150·u·scale.
      for (int64_t n = 0; n < c.N; ++n)
        for (int64_t j = 0; j < vs; ++j)
          ASSERT_NEAR(dl[n * vs + j], dl_full[n * c.V + v0 + j], 150 * kU * scale)
              << "row " << n << " vocab " << v0 + j;
    }
  }
}

TEST(OnlineSoftmax, MergeWithEmptyStateIsIdentity) {
  const float inf = std::numeric_limits<float>::infinity();
  VecF ma = {-inf, 2.f}, sa = {0.f, 3.f};
  const VecF mb = {1.f, -inf}, sb = {4.f, 0.f};
  online_softmax_merge(ma.data(), sa.data(), mb.data(), sb.data(), 2);
  EXPECT_EQ(ma, (VecF{1.f, 2.f}));
  EXPECT_EQ(sa, (VecF{4.f, 3.f}));
  VecF me = {-inf}, se = {0.f};
  const VecF me2 = {-inf}, se2 = {0.f};
  online_softmax_merge(me.data(), se.data(), me2.data(), se2.data(), 1);
  EXPECT_EQ(me[0], -inf);
  EXPECT_EQ(se[0], 0.f);
}

// ---- Small helpers and threads ---------------------------------------------------------------

TEST(VectorHelpers, AddAndScaleAreExact) {
  VecF y = {1.f, 2.f, 3.f}, x = {0.5f, -2.f, 4.f};
  add_inplace(y.data(), x.data(), 3);
  EXPECT_EQ(y, (VecF{1.5f, 0.f, 7.f}));
  scale_inplace(y.data(), -2.f, 3);
  EXPECT_EQ(y, (VecF{-3.f, -0.f, -14.f}));
}

TEST(Threads, TwoThreadsGiveTheSameRowwiseResults) {
  // Big enough to cross the parallel threshold. Row-parallel kernels do the same arithmetic per
  // row whatever the split, so results must be bitwise equal; the cross-entropy loss sums
  // per-chunk partials in another order: equal within double rounding.
  std::mt19937 rng(19);
  const int64_t N = 64, h = 1024;
  const VecF x = random_vec(N * h, rng), w = random_vec(h, rng), u = random_vec(N * h, rng);
  std::vector<int32_t> labels(N);
  for (int64_t n = 0; n < N; ++n) labels[n] = static_cast<int32_t>((n * 37) % h);
  std::vector<int64_t> pos(N);
  std::iota(pos.begin(), pos.end(), 1000);
  auto run = [&](VecF& y, VecF& dw, VecF& a, VecF& r, VecF& dl) {
    VecF rstd(N);
    y.assign(N * h, 0.f);
    rmsnorm_forward(x.data(), w.data(), y.data(), rstd.data(), N, h, 1e-6f);
    dw.assign(h, 0.f);
    VecF dx(N * h);
    rmsnorm_backward(u.data(), x.data(), w.data(), rstd.data(), dx.data(), dw.data(), N, h);
    a.assign(N * h, 0.f);
    swiglu_forward(x.data(), u.data(), a.data(), N, h);
    r = x;
    rope_forward(r.data(), pos.data(), N, 8, h / 8, 10000.f);
    dl.assign(N * h, 0.f);
    return cross_entropy_forward_backward(x.data(), labels.data(), dl.data(), N, h, 1.f / N);
  };
  const int before = compute_threads();
  VecF y1, dw1, a1, r1, dl1, y2, dw2, a2, r2, dl2;
  set_compute_threads(1);
  const double l1 = run(y1, dw1, a1, r1, dl1);
  set_compute_threads(2);
  const double l2 = run(y2, dw2, a2, r2, dl2);
  set_compute_threads(before);
  EXPECT_EQ(y1, y2);
  EXPECT_EQ(dw1, dw2);
  EXPECT_EQ(a1, a2);
  EXPECT_EQ(r1, r2);
  EXPECT_EQ(dl1, dl2);
  EXPECT_NEAR(l1, l2, 1e-12 * std::fabs(l1));
}

}  // namespace
}  // namespace tsp
