// 1. The double-precision reference model (the oracle of every layout test) against central
//    finite differences of its own loss, on a tiny model, every parameter element.
// 2. The block maths properties the layouts rely on, run on the backend, each in fp32 and in bf16
//    mixed precision: a head group's or FFN slice's pieces compose to the whole (forward sums,
//    backward slices), attention over zigzag-ordered keys at explicit positions equals attention
//    in natural order, and the token-chunked MLP / loss head match naive double loops across a
//    chunk boundary.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <type_traits>

#include "model/reference_model.h"
#include "tsp/backend/backend.h"
#include "tsp/core/bf16.h"
#include "tsp/model/block.h"
#include "tsp/parallel/sharding.h"

namespace tsp {
namespace {

LlamaConfig fd_config(bool tie) {
  LlamaConfig c;
  c.hidden_size = 8;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;  // GQA, g = 2, head_dim 4
  c.intermediate_size = 12;
  c.num_hidden_layers = 2;
  c.vocab_size = 11;
  c.tie_word_embeddings = tie;
  c.rope_theta = 100.0;  // visible rotation at positions < 6
  return c;
}

// Weights far from init scale (std 0.02 would make the model nearly linear and the check weak).
test::RefTensors fd_weights(const LlamaConfig& c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> U(-0.5, 0.5);
  test::RefTensors w;
  for (const ParamSpec& s : llama_param_specs(c)) {
    auto& v = w[s.name];
    v.resize(shape_numel(s.shape));
    const bool norm = s.shape.size() == 1;
    for (double& x : v) x = norm ? 1.0 + 0.4 * U(rng) : U(rng);
  }
  return w;
}

class ReferenceFiniteDifference : public ::testing::TestWithParam<bool> {};

TEST_P(ReferenceFiniteDifference, EveryParameterElement) {
  const LlamaConfig c = fd_config(GetParam());
  test::RefTensors w = fd_weights(c, 7);
  const int64_t B = 2, S = 5;
  std::vector<int32_t> tokens(B * (S + 1));
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>((i * 7 + 3) % 11);
  test::ReferenceModel model(c, w);
  const test::RefResult res = model.run(tokens, B, S, true);
  // Central differences in double: truncation ~eps²·|f'''| ≈ 1e-10, rounding ≈ 1e-16·|L|/eps ≈
  // 1e-11 with eps = 1e-5 and |L| ≈ 3, so 1e-8 absolute separates a correct gradient (agreement
  // ~1e-10) from any wrong term (gradients here are O(1e-3 .. 1)).
  const double eps = 1e-5, tol = 1e-8;
  int64_t checked = 0;
  for (auto& [name, v] : w) {
    for (size_t i = 0; i < v.size(); ++i) {
      const double orig = v[i];
      v[i] = orig + eps;
      const double lp = model.run(tokens, B, S, false).loss;
      v[i] = orig - eps;
      const double lm = model.run(tokens, B, S, false).loss;
      v[i] = orig;
      const double fd = (lp - lm) / (2 * eps);
      ASSERT_NEAR(res.grads.at(name)[i], fd, tol) << name << "[" << i << "]";
      ++checked;
    }
  }
  EXPECT_EQ(checked, c.num_parameters());
}
INSTANTIATE_TEST_SUITE_P(TiedAndUntied, ReferenceFiniteDifference, ::testing::Bool());

// ---- block maths on the backend, in fp32 and in bf16 ----------------------------------------
//
// Host std::vectors wrapped as CPU tensor views: the CPU backend computes on host memory, so the
// tests fill and read them directly. Weights and activations are in the compute dtype T (float or
// bf16); rstd, lse and every gradient are F32 (block.h, "Precision").

Backend& cpu() {
  return backend_for(Device::cpu());
}

template <typename T>
TensorView tv(const std::vector<T>& v, Shape s) {
  TSP_CHECK(shape_numel(s) == static_cast<int64_t>(v.size()), "test view {} of {} elements",
            shape_str(s), v.size());
  return TensorView(const_cast<T*>(v.data()), std::move(s), dtype_of<T>());
}

std::vector<float> randn(int64_t n, uint32_t seed, float scale = 1.f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> N(0.f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = N(rng);
  return v;
}

// The values in the compute dtype T: a copy for float, rounded once (to nearest even) for bf16.
template <typename T>
std::vector<T> as(const std::vector<float>& v) {
  return std::vector<T>(v.begin(), v.end());
}
template <>
std::vector<bf16> as<bf16>(const std::vector<float>& v) {
  std::vector<bf16> out(v.size());
  convert_f32_to_bf16(v.data(), out.data(), static_cast<int64_t>(v.size()));
  return out;
}

// Norm-wise relative error ||a - b|| / ||b||.
template <typename A, typename B>
double rel_err(const std::vector<A>& a, const std::vector<B>& b) {
  EXPECT_EQ(a.size(), b.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    const double x = static_cast<float>(a[i]), y = static_cast<float>(b[i]);
    num += (x - y) * (x - y);
    den += y * y;
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

// Rows [r0, r1) of a [rows, cols] matrix, or columns [c0, c1).
template <typename T>
std::vector<T> rows_of(const std::vector<T>& m, int64_t cols, Range r) {
  return std::vector<T>(m.begin() + r.begin * cols, m.begin() + r.end * cols);
}
template <typename T>
std::vector<T> cols_of(const std::vector<T>& m, int64_t rows, int64_t cols, Range c) {
  std::vector<T> out;
  for (int64_t i = 0; i < rows; ++i)
    out.insert(out.end(), m.begin() + i * cols + c.begin, m.begin() + i * cols + c.end);
  return out;
}

// A partial sum accumulated in fp32, rounded ONCE into the compute dtype (what a layout does when
// it adds row-parallel pieces into the bf16 residual): a copy under f32.
template <typename T>
std::vector<T> round_once(const std::vector<float>& sum) {
  std::vector<T> out(sum.size());
  cpu().copy(tv(sum, {static_cast<int64_t>(sum.size())}),
             tv(out, {static_cast<int64_t>(out.size())}));
  return out;
}

// Slicing tolerance: a slice and the whole differ only in GEMM blocking / summation order over
// K <= 64 fp32 terms (|rel| <= K·2^-24 ≈ 4e-6 worst case); sums of D partial products add D-1
// roundings. 1e-5 norm-wise holds that with margin; a wrong row or column gives O(1).
constexpr double kSliceTol = 1e-5;

// The same comparisons in bf16 mixed precision: weights and activations bf16, gradients and every
// accumulation fp32, and the slices' partial outputs summed in an F32 buffer and rounded ONCE, as
// the whole's output is (and as a layout adds row-parallel pieces into its bf16 residual).
// Every fp32 accumulation still differs from the whole's only by summation order (kSliceTol).
// What bf16 adds is the single rounding of each value stored or multiplied in bf16: q, k, v, o,
// the MLP activation, the output y, the F32 gradients a bf16 GEMM rounds on input (dq, dk, dv, dg,
// du), and inside the native bf16 attention the probabilities P, dO and dS it rounds for its
// products (src/ops/cpu/attention_bf16.cpp). Inputs that are bitwise equal round alike; two fp32
// values that agree to 1e-5 round to the same bf16 or to neighbours one ulp apart, and a bf16
// ulp (8-bit significand) is at most 2^-7 of the value. At worst every element of such a stage
// flips: 2^-7 norm-wise per stage, added (first order) along the longest chain of stages before a
// compared result:
//   head groups: y: q/k/v, P, o, y (4); dwq/dwk/dwv/dxn: q/k/v, P, o, dO, dS, dq/dk/dv (6).
//   FFN slices:  y: activation, y (2); dwd: activation (1); dwg/dwu/dxn: dg/du (1).
//   zigzag keys: q, k, v, dO are the same values permuted (and round alike); o: P, o (2); dq/dk: P, o, dS (3).
//                (S = 16 keys fit one 64-key tile of the kernel, so the running max, hence the
//                P it rounds, is the same in either key order.)
// In practice every rounded stage here comes out bitwise equal and the errors are the fp32 ones
// (~1e-7 measured), far inside these bounds; a wrong row, column, head or position moves a result
// by O(1), far outside them.
constexpr double kBf16Stage = 0x1p-7;
constexpr double kHeadGroupTolBf16 = kSliceTol + 6 * kBf16Stage;  // 4.7e-2
constexpr double kFfnSliceTolBf16 = kSliceTol + 2 * kBf16Stage;   // 1.6e-2
constexpr double kZigzagTolBf16 = kSliceTol + 3 * kBf16Stage;     // 2.3e-2

// Attention + o_proj of all heads against the sum of D head groups, forward and backward.
template <typename T>
void head_groups_compose_to_whole_attention(double tol) {
  Backend& be = cpu();
  LlamaConfig c;
  c.hidden_size = 32;
  c.num_attention_heads = 8;
  c.num_key_value_heads = 4;  // g = 2, d = 4
  const int D = 2;
  const int64_t B = 2, S = 8, n = B * S, h = c.hidden_size, d = c.head_dim();
  const int64_t hq = c.num_attention_heads, hkv = c.num_key_value_heads;
  const int64_t qw = hq * d, kw = c.kv_dim();
  const auto wq = as<T>(randn(qw * h, 1, 0.2f)), wk = as<T>(randn(kw * h, 2, 0.2f)),
             wv = as<T>(randn(kw * h, 3, 0.2f)), wo = as<T>(randn(h * qw, 4, 0.2f)),
             xn = as<T>(randn(n * h, 5));
  const auto dy = randn(n * h, 6);  // F32, as every gradient
  std::vector<int64_t> pos(S), tpos(n);
  std::iota(pos.begin(), pos.end(), 0);
  for (int64_t i = 0; i < n; ++i) tpos[i] = i % S;
  const TensorView P = tv(pos, {S}), TP = tv(tpos, {n}), X = tv(xn, {n, h});

  // Whole: forward and backward of attention + o_proj on all heads.
  const block::AttnDims A = block::attn_dims(c);
  std::vector<T> q(n * qw), k(n * kw), v(n * kw), o(n * qw), y(n * h, T(0.f));
  std::vector<float> lse(n * hq), dO(n * qw), dq(n * qw, 0.f), dk(n * kw, 0.f), dv(n * kw, 0.f),
      dxn(n * h, 0.f);
  std::vector<float> dwq(qw * h, 0.f), dwk(kw * h, 0.f), dwv(kw * h, 0.f), dwo(h * qw, 0.f);
  const block::AttnWeights W{tv(wq, {qw, h}), tv(wk, {kw, h}), tv(wv, {kw, h}), tv(wo, {h, qw})};
  const TensorView Q = tv(q, {n, hq, d}), K = tv(k, {n, hkv, d}), Vv = tv(v, {n, hkv, d}),
                   O = tv(o, {n, hq, d}), L = tv(lse, {n, hq}), dQ = tv(dq, {n, hq, d}),
                   dK = tv(dk, {n, hkv, d}), dV = tv(dv, {n, hkv, d});
  block::qkv_forward(be, A, W, X, TP, Q, K, Vv);
  block::attention_forward(be, A, B, Q, K, Vv, P, P, O, L);
  block::out_proj_forward(be, W.wo, tv(o, {n, qw}), tv(y, {n, h}));
  block::out_proj_backward(be, W.wo, tv(o, {n, qw}), tv(dy, {n, h}), tv(dO, {n, qw}),
                           tv(dwo, {h, qw}));
  block::attention_backward(be, A, B, Q, K, Vv, P, P, O, L, tv(dO, {n, hq, d}), dQ, dK, dV);
  block::qkv_backward(be, A, W, {tv(dwq, {qw, h}), tv(dwk, {kw, h}), tv(dwv, {kw, h}), {}}, X, TP,
                      dQ, dK, dV, tv(dxn, {n, h}));

  // By head group: y and dxn are sums over groups; weight grads are the group's rows / columns.
  std::vector<float> y_sum(n * h, 0.f), dxn_sum(n * h, 0.f);
  for (int r = 0; r < D; ++r) {
    const HeadGroup hg = head_group(c, D, r);
    const block::AttnDims a = block::attn_dims(c, hg.hq(), hg.hkv());
    const auto wq_r = rows_of(wq, h, hg.q_rows()), wk_r = rows_of(wk, h, hg.kv_rows()),
               wv_r = rows_of(wv, h, hg.kv_rows()), wo_r = cols_of(wo, h, qw, hg.q_rows());
    const int64_t qr = a.q_width(), kr = a.kv_width();
    std::vector<T> q_r(n * qr), k_r(n * kr), v_r(n * kr), o_r(n * qr);
    std::vector<float> lse_r(n * a.hq), dO_r(n * qr), dq_r(n * qr, 0.f), dk_r(n * kr, 0.f),
        dv_r(n * kr, 0.f);
    std::vector<float> dwq_r(qr * h, 0.f), dwk_r(kr * h, 0.f), dwv_r(kr * h, 0.f),
        dwo_r(h * qr, 0.f);
    const block::AttnWeights Wr{tv(wq_r, {qr, h}), tv(wk_r, {kr, h}), tv(wv_r, {kr, h}),
                                tv(wo_r, {h, qr})};
    const TensorView Qr = tv(q_r, {n, a.hq, d}), Kr = tv(k_r, {n, a.hkv, d}),
                     Vr = tv(v_r, {n, a.hkv, d}), Or = tv(o_r, {n, a.hq, d}),
                     Lr = tv(lse_r, {n, a.hq}), dQr = tv(dq_r, {n, a.hq, d}),
                     dKr = tv(dk_r, {n, a.hkv, d}), dVr = tv(dv_r, {n, a.hkv, d});
    block::qkv_forward(be, a, Wr, X, TP, Qr, Kr, Vr);
    block::attention_forward(be, a, B, Qr, Kr, Vr, P, P, Or, Lr);
    EXPECT_LT(rel_err(o_r, cols_of(o, n, qw, hg.q_rows())), tol);
    block::out_proj_forward(be, Wr.wo, tv(o_r, {n, qr}), tv(y_sum, {n, h}));
    block::out_proj_backward(be, Wr.wo, tv(o_r, {n, qr}), tv(dy, {n, h}), tv(dO_r, {n, qr}),
                             tv(dwo_r, {h, qr}));
    block::attention_backward(be, a, B, Qr, Kr, Vr, P, P, Or, Lr, tv(dO_r, {n, a.hq, d}), dQr, dKr,
                              dVr);
    block::qkv_backward(be, a, Wr, {tv(dwq_r, {qr, h}), tv(dwk_r, {kr, h}), tv(dwv_r, {kr, h}), {}},
                        X, TP, dQr, dKr, dVr, tv(dxn_sum, {n, h}));
    EXPECT_LT(rel_err(dwq_r, rows_of(dwq, h, hg.q_rows())), tol);
    EXPECT_LT(rel_err(dwk_r, rows_of(dwk, h, hg.kv_rows())), tol);
    EXPECT_LT(rel_err(dwv_r, rows_of(dwv, h, hg.kv_rows())), tol);
    EXPECT_LT(rel_err(dwo_r, cols_of(dwo, h, qw, hg.q_rows())), tol);
  }
  EXPECT_LT(rel_err(round_once<T>(y_sum), y), tol);
  EXPECT_LT(rel_err(dxn_sum, dxn), tol);
}

TEST(BlockMaths, HeadGroupsComposeToWholeAttention) {
  head_groups_compose_to_whole_attention<float>(kSliceTol);
}
TEST(BlockMaths, HeadGroupsComposeToWholeAttentionBf16) {
  head_groups_compose_to_whole_attention<bf16>(kHeadGroupTolBf16);
}

// The SwiGLU MLP against the sum of D FFN slices, forward and backward.
template <typename T>
void ffn_slices_compose_to_whole_mlp(double tol) {
  Backend& be = cpu();
  const int64_t h = 16, F = 48, n = 10;
  const int D = 3;
  const auto wg = as<T>(randn(F * h, 11, 0.3f)), wu = as<T>(randn(F * h, 12, 0.3f)),
             wd = as<T>(randn(h * F, 13, 0.3f)), xn = as<T>(randn(n * h, 14));
  const auto dy = randn(n * h, 15);
  const TensorView X = tv(xn, {n, h}), dY = tv(dy, {n, h});
  std::vector<T> y(n * h, T(0.f));
  std::vector<float> dxn(n * h, 0.f), dwg(F * h, 0.f), dwu(F * h, 0.f), dwd(h * F, 0.f);
  const block::MlpWeights W{tv(wg, {F, h}), tv(wu, {F, h}), tv(wd, {h, F})};
  block::mlp_forward(be, W, X, tv(y, {n, h}));
  block::mlp_backward(be, W, {tv(dwg, {F, h}), tv(dwu, {F, h}), tv(dwd, {h, F})}, X, dY,
                      tv(dxn, {n, h}));
  std::vector<float> y_sum(n * h, 0.f), dxn_sum(n * h, 0.f);
  for (int s = 0; s < D; ++s) {
    const Range r = row_shard(F, D, s);
    const int64_t f = r.size();
    const auto wg_s = rows_of(wg, h, r), wu_s = rows_of(wu, h, r), wd_s = cols_of(wd, h, F, r);
    std::vector<float> dwg_s(f * h, 0.f), dwu_s(f * h, 0.f), dwd_s(h * f, 0.f);
    const block::MlpWeights w{tv(wg_s, {f, h}), tv(wu_s, {f, h}), tv(wd_s, {h, f})};
    block::mlp_forward(be, w, X, tv(y_sum, {n, h}));
    block::mlp_backward(be, w, {tv(dwg_s, {f, h}), tv(dwu_s, {f, h}), tv(dwd_s, {h, f})}, X, dY,
                        tv(dxn_sum, {n, h}));
    EXPECT_LT(rel_err(dwg_s, rows_of(dwg, h, r)), tol);
    EXPECT_LT(rel_err(dwu_s, rows_of(dwu, h, r)), tol);
    EXPECT_LT(rel_err(dwd_s, cols_of(dwd, h, F, r)), tol);
  }
  EXPECT_LT(rel_err(round_once<T>(y_sum), y), tol);
  EXPECT_LT(rel_err(dxn_sum, dxn), tol);
}

TEST(BlockMaths, FfnSlicesComposeToWholeMlp) {
  ffn_slices_compose_to_whole_mlp<float>(kSliceTol);
}
TEST(BlockMaths, FfnSlicesComposeToWholeMlpBf16) {
  ffn_slices_compose_to_whole_mlp<bf16>(kFfnSliceTolBf16);
}

// --recompute none: the MLP activations kept by the forward (MlpSaved) give the backward exactly
// what selective's recomputation gives (the same kernels on the same operands), so the output and
// every gradient are bitwise equal; n spans three token chunks, so a chunk reading another's rows
// of the kept activations would show.
template <typename T>
void kept_mlp_activations_equal_recomputed() {
  Backend& be = cpu();
  const int64_t h = 16, F = 24, n = 2 * block::kTokenChunkCpu + 37;
  const auto wg = as<T>(randn(F * h, 41, 0.3f)), wu = as<T>(randn(F * h, 42, 0.3f)),
             wd = as<T>(randn(h * F, 43, 0.3f)), xn = as<T>(randn(n * h, 44));
  const auto dy = randn(n * h, 45);
  const block::MlpWeights W{tv(wg, {F, h}), tv(wu, {F, h}), tv(wd, {h, F})};
  struct Run {
    std::vector<T> y;
    std::vector<float> dxn, dwg, dwu, dwd;
  };
  auto run = [&](const block::MlpSaved& keep) {
    Run r{std::vector<T>(n * h, T(0.f)), std::vector<float>(n * h, 0.f),
          std::vector<float>(F * h, 0.f), std::vector<float>(F * h, 0.f),
          std::vector<float>(h * F, 0.f)};
    block::mlp_forward(be, W, tv(xn, {n, h}), tv(r.y, {n, h}), keep);
    block::mlp_backward(be, W, {tv(r.dwg, {F, h}), tv(r.dwu, {F, h}), tv(r.dwd, {h, F})},
                        tv(xn, {n, h}), tv(dy, {n, h}), tv(r.dxn, {n, h}), keep);
    return r;
  };
  const Run recomputed = run({});
  std::vector<float> gate(n * F, 0.f), up(n * F, 0.f);
  std::vector<T> act(n * F, T(0.f));
  const Run kept = run({tv(gate, {n, F}), tv(up, {n, F}), tv(act, {n, F})});
  EXPECT_EQ(std::memcmp(kept.y.data(), recomputed.y.data(), n * h * sizeof(T)), 0);
  EXPECT_EQ(kept.dxn, recomputed.dxn);
  EXPECT_EQ(kept.dwg, recomputed.dwg);
  EXPECT_EQ(kept.dwu, recomputed.dwu);
  EXPECT_EQ(kept.dwd, recomputed.dwd);
  // The last token's kept gate is its row of xn·wgᵀ (the forward filled every chunk).
  double g_last = 0;
  for (int64_t k = 0; k < h; ++k)
    g_last += double(float(xn[(n - 1) * h + k])) * double(float(wg[(F - 1) * h + k]));
  EXPECT_NEAR(gate[n * F - 1], g_last, 1e-4 * (1 + std::abs(g_last)));
}

TEST(BlockMaths, KeptMlpActivationsEqualRecomputed) {
  kept_mlp_activations_equal_recomputed<float>();
}
TEST(BlockMaths, KeptMlpActivationsEqualRecomputedBf16) {
  kept_mlp_activations_equal_recomputed<bf16>();
}

// Attention over keys gathered in zigzag order at explicit positions against natural order.
template <typename T>
void zigzag_keys_equal_natural_order(double tol) {
  Backend& be = cpu();
  LlamaConfig c;
  c.hidden_size = 16;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  const block::AttnDims A = block::attn_dims(c);
  const int D = 2;
  const int64_t B = 2, S = 16, nl = S / D, qw = A.q_width(), kw = A.kv_width();
  const int64_t hq = A.hq, hkv = A.hkv, d = A.d;
  const auto q = as<T>(randn(B * S * qw, 21)), k = as<T>(randn(B * S * kw, 22)),
             v = as<T>(randn(B * S * kw, 23));
  const auto dO = randn(B * S * qw, 24);
  std::vector<int64_t> pos(S);
  std::iota(pos.begin(), pos.end(), 0);
  const TensorView P = tv(pos, {S});
  std::vector<T> o(B * S * qw);
  std::vector<float> lse(B * S * hq), dq(B * S * qw, 0.f), dk(B * S * kw, 0.f), dv(B * S * kw, 0.f);
  block::attention_forward(be, A, B, tv(q, {B * S, hq, d}), tv(k, {B * S, hkv, d}),
                           tv(v, {B * S, hkv, d}), P, P, tv(o, {B * S, hq, d}),
                           tv(lse, {B * S, hq}));
  block::attention_backward(be, A, B, tv(q, {B * S, hq, d}), tv(k, {B * S, hkv, d}),
                            tv(v, {B * S, hkv, d}), P, P, tv(o, {B * S, hq, d}),
                            tv(lse, {B * S, hq}), tv(dO, {B * S, hq, d}), tv(dq, {B * S, hq, d}),
                            tv(dk, {B * S, hkv, d}), tv(dv, {B * S, hkv, d}));
  // Keys in gathered zigzag order (rank 0's chunks, then rank 1's), queries of rank 1.
  std::vector<T> kz(B * S * kw), vz(B * S * kw), qz(B * nl * qw);
  std::vector<float> dOz(B * nl * qw);
  {
    std::vector<T> kg(B * S * kw), vg(B * S * kw);  // [D, B, nl, kw]
    for (int p = 0; p < D; ++p) {
      zigzag_take(tv(k, {B, S, kw}), tv(kg, {D, B, nl, kw}).window(p * B * nl * kw, {B, nl, kw}), D,
                  p);
      zigzag_take(tv(v, {B, S, kw}), tv(vg, {D, B, nl, kw}).window(p * B * nl * kw, {B, nl, kw}), D,
                  p);
    }
    swap_leading_dims(tv(kg, {D, B, nl, kw}), tv(kz, {B, D, nl, kw}));
    swap_leading_dims(tv(vg, {D, B, nl, kw}), tv(vz, {B, D, nl, kw}));
  }
  const TensorView Kz = tv(kz, {B * S, hkv, d}), Vz = tv(vz, {B * S, hkv, d});
  const int p = 1;
  zigzag_take(tv(q, {B, S, qw}), tv(qz, {B, nl, qw}), D, p);
  zigzag_take(tv(dO, {B, S, qw}), tv(dOz, {B, nl, qw}), D, p);
  const auto qpos = zigzag_positions(S, D, p), kpos = zigzag_gathered_positions(S, D);
  const TensorView QP = tv(qpos, {nl}), KP = tv(kpos, {S});
  std::vector<T> oz(B * nl * qw);
  std::vector<float> lsez(B * nl * hq), dkz(B * S * kw, 0.f), dvz(B * S * kw, 0.f);
  block::attention_forward(be, A, B, tv(qz, {B * nl, hq, d}), Kz, Vz, QP, KP,
                           tv(oz, {B * nl, hq, d}), tv(lsez, {B * nl, hq}));
  std::vector<T> o_want(B * nl * qw);
  zigzag_take(tv(o, {B, S, qw}), tv(o_want, {B, nl, qw}), D, p);
  // Same keys, another summation order in the online softmax: fp32 rounding only.
  EXPECT_LT(rel_err(oz, o_want), tol);
  // Backward of the other rank's queries too, so dK/dV sum over both ranks' contributions.
  for (int pp = 0; pp < D; ++pp) {
    const auto qp = zigzag_positions(S, D, pp);
    std::vector<T> qpz(B * nl * qw), op(B * nl * qw);
    std::vector<float> dOp(B * nl * qw), lsep(B * nl * hq), dqp(B * nl * qw, 0.f);
    zigzag_take(tv(q, {B, S, qw}), tv(qpz, {B, nl, qw}), D, pp);
    zigzag_take(tv(dO, {B, S, qw}), tv(dOp, {B, nl, qw}), D, pp);
    const TensorView Qp = tv(qpz, {B * nl, hq, d}), Op = tv(op, {B * nl, hq, d}),
                     Lp = tv(lsep, {B * nl, hq}), PP = tv(qp, {nl});
    block::attention_forward(be, A, B, Qp, Kz, Vz, PP, KP, Op, Lp);
    block::attention_backward(be, A, B, Qp, Kz, Vz, PP, KP, Op, Lp, tv(dOp, {B * nl, hq, d}),
                              tv(dqp, {B * nl, hq, d}), tv(dkz, {B * S, hkv, d}),
                              tv(dvz, {B * S, hkv, d}));
    std::vector<float> dq_p(B * nl * qw);
    zigzag_take(tv(dq, {B, S, qw}), tv(dq_p, {B, nl, qw}), D, pp);
    EXPECT_LT(rel_err(dqp, dq_p), tol);
  }
  // dK in gathered order [B, D·nl, kw] back to natural order.
  std::vector<float> dkg(B * S * kw), dk_nat(B * S * kw, 0.f);
  swap_leading_dims(tv(dkz, {B, D, nl, kw}), tv(dkg, {D, B, nl, kw}));
  for (int pp = 0; pp < D; ++pp)
    zigzag_put(tv(dkg, {D, B, nl, kw}).window(pp * B * nl * kw, {B, nl, kw}),
               tv(dk_nat, {B, S, kw}), D, pp);
  EXPECT_LT(rel_err(dk_nat, dk), tol);
}

TEST(BlockMaths, ZigzagKeysAtExplicitPositionsEqualNaturalOrder) {
  zigzag_keys_equal_natural_order<float>(kSliceTol);
}
TEST(BlockMaths, ZigzagKeysAtExplicitPositionsEqualNaturalOrderBf16) {
  zigzag_keys_equal_natural_order<bf16>(kZigzagTolBf16);
}

// The token-chunked MLP and loss head (chunks of kTokenChunkCpu rows on the CPU, the last one partial) against
// naive double loops on the same (compute-dtype) values. Besides the results, the reference keeps
// for every element the sum of the absolute values of its terms, which bounds what rounding one
// factor of every term to bf16 can change: Σ_f |a_f·wd_jf| for y, Σ_v |dl_v·wh_vj| for dxn,
// Σ_t |dl_tv·x_tj| for dwh.
struct ChunkedReference {
  std::vector<double> y, dxn, dwh, y_abs, dxn_abs, dwh_abs;
  double loss = 0;
};

template <typename T>
ChunkedReference chunked_reference(const std::vector<T>& xn_t, const std::vector<T>& wg_t,
                                   const std::vector<T>& wu_t, const std::vector<T>& wd_t,
                                   const std::vector<T>& wh_t, const std::vector<int32_t>& labels,
                                   int64_t h, int64_t F, int64_t V, float scale) {
  const std::vector<float> xn(xn_t.begin(), xn_t.end()), wg(wg_t.begin(), wg_t.end()),
      wu(wu_t.begin(), wu_t.end()), wd(wd_t.begin(), wd_t.end()), wh(wh_t.begin(), wh_t.end());
  const int64_t n = static_cast<int64_t>(labels.size());
  ChunkedReference r;
  for (auto* v : {&r.y, &r.dxn, &r.y_abs, &r.dxn_abs}) v->assign(n * h, 0.0);
  for (auto* v : {&r.dwh, &r.dwh_abs}) v->assign(V * h, 0.0);
  for (int64_t t = 0; t < n; ++t) {
    const float* x = &xn[t * h];
    for (int64_t f = 0; f < F; ++f) {
      double g = 0, u = 0;
      for (int64_t j = 0; j < h; ++j)
        g += double(x[j]) * wg[f * h + j], u += double(x[j]) * wu[f * h + j];
      const double a = g / (1 + std::exp(-g)) * u;
      for (int64_t j = 0; j < h; ++j) {
        r.y[t * h + j] += a * wd[j * F + f];
        r.y_abs[t * h + j] += std::abs(a * wd[j * F + f]);
      }
    }
    std::vector<double> logit(V);
    double mx = -INFINITY, z = 0;
    for (int64_t v = 0; v < V; ++v) {
      logit[v] = 0;
      for (int64_t j = 0; j < h; ++j) logit[v] += double(x[j]) * wh[v * h + j];
      mx = std::max(mx, logit[v]);
    }
    for (int64_t v = 0; v < V; ++v) z += std::exp(logit[v] - mx);
    r.loss += std::log(z) + mx - logit[labels[t]];
    for (int64_t v = 0; v < V; ++v) {
      const double dl = scale * (std::exp(logit[v] - mx) / z - (v == labels[t]));
      for (int64_t j = 0; j < h; ++j) {
        r.dxn[t * h + j] += dl * wh[v * h + j];
        r.dwh[v * h + j] += dl * x[j];
        r.dxn_abs[t * h + j] += std::abs(dl * wh[v * h + j]);
        r.dwh_abs[v * h + j] += std::abs(dl * x[j]);
      }
    }
  }
  return r;
}

double norm2(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x * x;
  return std::sqrt(s);
}

template <typename T>
void chunked_mlp_and_loss_head_match_double() {
  Backend& be = cpu();
  const int64_t h = 8, F = 12, V = 20, n = block::kTokenChunkCpu + 37;
  const auto wg = as<T>(randn(F * h, 31, 0.4f)), wu = as<T>(randn(F * h, 32, 0.4f)),
             wd = as<T>(randn(h * F, 33, 0.4f)), wh = as<T>(randn(V * h, 34, 0.4f)),
             xn = as<T>(randn(n * h, 35));
  std::vector<int32_t> labels(n);
  for (int64_t i = 0; i < n; ++i) labels[i] = static_cast<int32_t>((i * 13) % V);
  std::vector<T> y(n * h, T(0.f));
  block::mlp_forward(be, {tv(wg, {F, h}), tv(wu, {F, h}), tv(wd, {h, F})}, tv(xn, {n, h}),
                     tv(y, {n, h}));
  const float scale = 1.f / n;
  std::vector<float> dxn(n * h), dwh(V * h, 0.f);
  std::vector<double> loss_sum(1, 0.0);  // F64 [1] (+=)
  block::lm_head_loss(be, tv(xn, {n, h}), tv(wh, {V, h}), tv(labels, {n}), scale, tv(loss_sum, {1}),
                      tv(dxn, {n, h}), tv(dwh, {V, h}));
  const double loss = loss_sum[0];
  const ChunkedReference ref = chunked_reference(xn, wg, wu, wd, wh, labels, h, F, V, scale);
  const std::vector<float> y_f(ref.y.begin(), ref.y.end()), dxn_f(ref.dxn.begin(), ref.dxn.end()),
      dwh_f(ref.dwh.begin(), ref.dwh.end());
  if constexpr (std::is_same_v<T, float>) {
    // fp32 against double over K <= 20-term dot products and n = 549 token sums (dwh):
    // n·2^-24 ≈ 3e-5 worst case, random-walk ≈ 1.4e-6; 1e-5 norm-wise is the bound we hold.
    EXPECT_LT(rel_err(y, y_f), 1e-5);
    EXPECT_LT(rel_err(dxn, dxn_f), 1e-5);
    EXPECT_LT(rel_err(dwh, dwh_f), 1e-5);
  } else {
    // bf16 inputs (the reference uses the same bf16 values), fp32 accumulation. Against exact
    // arithmetic on those values, with u = 2^-8 the unit roundoff of bf16 and the fp32 errors
    // bounded by 1e-5 of the sums of absolute terms (as in fp32 above):
    //   y:   the SwiGLU activation is rounded to bf16 for the down projection, and y rounded once:
    //        |Δy_j| <= (u + 1e-5)·Σ_f |a_f·wd_jf| + u·|y_j|;
    //   dxn, dwh: the F32 dlogits are rounded to bf16 for the bf16 GEMMs with x and W_head:
    //        |Δdxn_j| <= (u + 1e-5)·Σ_v |dl_v·wh_vj|,  |Δdwh_vj| <= (u + 1e-5)·Σ_t |dl_tv·x_tj|.
    // Norm-wise these give the bounds below (from the reference's sums of absolute terms); 1.1
    // covers the second-order terms (u² relative to u is 0.4%). The softmax gradient sums to zero
    // over the vocabulary, so dxn cancels and its bound is several u, data-dependent: that is why
    // it is computed rather than fixed. A chunk boundary off by a row moves results by O(1).
    const double u = 0x1p-8;
    const double tol_y = 1.1 * ((u + 1e-5) * norm2(ref.y_abs) + u * norm2(ref.y)) / norm2(ref.y);
    const double tol_dxn = 1.1 * (u + 1e-5) * norm2(ref.dxn_abs) / norm2(ref.dxn);
    const double tol_dwh = 1.1 * (u + 1e-5) * norm2(ref.dwh_abs) / norm2(ref.dwh);
    EXPECT_LT(rel_err(y, y_f), tol_y);
    EXPECT_LT(rel_err(dxn, dxn_f), tol_dxn);
    EXPECT_LT(rel_err(dwh, dwh_f), tol_dwh);
  }
  // The logits are fp32 sums of exact products of the inputs' values (bf16 products are exact in
  // fp32) and the loss is summed in double: fp32 accuracy in both dtypes.
  EXPECT_NEAR(loss, ref.loss, 1e-5 * ref.loss);
}

TEST(BlockMaths, ChunkedMlpAndLossHeadMatchDoubleAcrossChunkBoundary) {
  chunked_mlp_and_loss_head_match_double<float>();
}
TEST(BlockMaths, ChunkedMlpAndLossHeadMatchDoubleAcrossChunkBoundaryBf16) {
  chunked_mlp_and_loss_head_match_double<bf16>();
}

}  // namespace
}  // namespace tsp
