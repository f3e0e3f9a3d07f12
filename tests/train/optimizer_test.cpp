// AdamW, global-norm bookkeeping and clipping against hand-written double-precision references.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "tsp/train/optimizer.h"

namespace tsp {
namespace {

// A parameter with its own storage, exposed as a ParamShard like a layout would.
struct OwnedParam {
  ParamSpec spec;
  Tensor value, grad;
  OwnedParam(std::string name, ParamKind kind, Shape shape)
      : spec{std::move(name), kind, -1, shape},
        value(Tensor::zeros(shape, DType::F32, MemCategory::Weights)),
        grad(Tensor::zeros(shape, DType::F32, MemCategory::Grads)) {}
  ParamShard shard(bool replicated = false, int copy_index = 0) {
    ParamShard s;
    s.spec = &spec;
    s.value = value.view();
    s.grad = grad.view();
    s.replicated_in_group = replicated;
    s.copy_index = copy_index;
    return s;
  }
};

// Deterministic values in [-1, 1] away from 0 (|x| >= 0.1), so Adam's denominators stay far from
// eps and the comparison measures rounding, not eps.
float test_value(int64_t i, int salt) {
  const double x = std::sin(0.7 * static_cast<double>(i) + 1.3 * salt);
  return static_cast<float>(x >= 0 ? 0.1 + 0.9 * x : -0.1 + 0.9 * x);
}

// torch.optim.AdamW in double.
struct RefAdamW {
  std::vector<double> w, m, v;
  int64_t t = 0;
  void step(const std::vector<double>& g, double lr, double scale, double b1, double b2, double eps,
            double wd) {
    ++t;
    const double bc1 = 1 - std::pow(b1, t), bc2 = 1 - std::pow(b2, t);
    for (size_t j = 0; j < w.size(); ++j) {
      const double gj = g[j] * scale;
      m[j] = b1 * m[j] + (1 - b1) * gj;
      v[j] = b2 * v[j] + (1 - b2) * gj * gj;
      w[j] = w[j] * (1 - lr * wd) - lr / bc1 * m[j] / (std::sqrt(v[j]) / std::sqrt(bc2) + eps);
    }
  }
};

TEST(AdamW, MatchesDoubleReferenceOverSeveralSteps) {
  OwnedParam matrix("model.layers.0.mlp.up_proj.weight", ParamKind::Wup, {6, 5});
  OwnedParam norm("model.layers.0.input_layernorm.weight", ParamKind::InputNorm, {5});
  const AdamWConfig cfg{0.9, 0.95, 1e-8, 0.1};
  for (int64_t j = 0; j < matrix.value.numel(); ++j) matrix.value.f32()[j] = test_value(j, 1);
  for (int64_t j = 0; j < norm.value.numel(); ++j)
    norm.value.f32()[j] = 1.0f + 0.1f * test_value(j, 2);
  RefAdamW ref_m, ref_n;
  for (auto [ref, p] : {std::pair{&ref_m, &matrix}, std::pair{&ref_n, &norm}}) {
    const int64_t n = p->value.numel();
    ref->w.assign(p->value.f32(), p->value.f32() + n);
    ref->m.assign(n, 0);
    ref->v.assign(n, 0);
  }
  AdamW opt({matrix.shard(), norm.shard(true)}, cfg);
  const double lrs[] = {1e-2, 3e-3, 2e-2, 5e-3, 1e-2};
  const double scales[] = {1.0, 0.5, 0.25, 1.0, 0.8};
  for (int step = 0; step < 5; ++step) {
    for (auto [ref, p, wd] :
         {std::tuple{&ref_m, &matrix, cfg.weight_decay}, std::tuple{&ref_n, &norm, 0.0}}) {
      std::vector<double> g(p->grad.numel());
      for (int64_t j = 0; j < p->grad.numel(); ++j) {
        p->grad.f32()[j] = test_value(j, 10 + step);
        g[j] = p->grad.f32()[j];
      }
      ref->step(g, lrs[step], scales[step], cfg.beta1, cfg.beta2, cfg.eps, wd);
    }
    opt.step(lrs[step], scales[step]);
  }
  EXPECT_EQ(opt.step_count(), 5);
  // Tolerance: each step rounds ~10 f32 operations per element; the Adam direction m/denom is
  // O(1) (|g| >= 0.1 keeps denom >> eps), so after 5 steps the weights (O(1)) carry at most a few
  // tens of f32 ulps (6e-8 each) of error: 2e-6 absolute. A wrong bias correction, decay or
  // moment update is off by >= 1e-4 here.
  for (auto [ref, p] : {std::pair{&ref_m, &matrix}, std::pair{&ref_n, &norm}}) {
    for (int64_t j = 0; j < p->value.numel(); ++j) {
      EXPECT_NEAR(p->value.f32()[j], ref->w[j], 2e-6) << p->spec.name << " element " << j;
      EXPECT_NEAR(opt.exp_avg(p == &matrix ? 0 : 1).f32()[j], ref->m[j], 1e-6);
      EXPECT_NEAR(opt.exp_avg_sq(p == &matrix ? 0 : 1).f32()[j], ref->v[j], 1e-6);
    }
  }
}

TEST(AdamW, FirstStepMovesEachWeightByLrTimesSignOfGradient) {
  // With bias correction, m̂ = g and v̂ = g² on step 1, so the update is lr·g/(|g| + eps).
  OwnedParam p("model.layers.0.self_attn.q_proj.weight", ParamKind::Wq, {4, 3});
  for (int64_t j = 0; j < 12; ++j) p.grad.f32()[j] = test_value(j, 3);
  AdamW opt({p.shard()}, AdamWConfig{0.9, 0.95, 1e-8, 0.0});
  opt.step(1e-2, 1.0);
  for (int64_t j = 0; j < 12; ++j) {
    const double expected = -1e-2 * (p.grad.f32()[j] > 0 ? 1 : -1);
    // |g| >= 0.1, so eps moves the result by <= 1e-7 relative; f32 rounding of a 1e-2 value is
    // ~1e-9: 1e-8 absolute separates these from any real error.
    EXPECT_NEAR(p.value.f32()[j], expected, 1e-8);
  }
}

TEST(AdamW, WeightDecaySkipsNormsButShrinksMatrices) {
  OwnedParam emb("model.embed_tokens.weight", ParamKind::Embedding, {3, 2});
  OwnedParam final_norm("model.norm.weight", ParamKind::FinalNorm, {2});
  for (int64_t j = 0; j < 6; ++j) emb.value.f32()[j] = 2.0f;
  for (int64_t j = 0; j < 2; ++j) final_norm.value.f32()[j] = 2.0f;
  // Zero gradients: m = v = 0, so only the decay moves the weights.
  AdamW opt({emb.shard(), final_norm.shard(true)}, AdamWConfig{0.9, 0.95, 1e-8, 0.5});
  opt.step(0.1, 1.0);
  for (int64_t j = 0; j < 6; ++j) EXPECT_FLOAT_EQ(emb.value.f32()[j], 2.0f * (1 - 0.1 * 0.5));
  for (int64_t j = 0; j < 2; ++j) EXPECT_EQ(final_norm.value.f32()[j], 2.0f);
  EXPECT_TRUE(applies_weight_decay(ParamKind::LmHead));
  EXPECT_TRUE(applies_weight_decay(ParamKind::Wdown));
  EXPECT_FALSE(applies_weight_decay(ParamKind::PostNorm));
  EXPECT_FALSE(applies_weight_decay(ParamKind::InputNorm));
}

TEST(AdamW, RejectsBadConfigurationAndMismatchedShards) {
  OwnedParam p("w", ParamKind::Wq, {2, 2});
  EXPECT_THROW(AdamW({p.shard()}, AdamWConfig{1.0, 0.95, 1e-8, 0.1}), Error);
  EXPECT_THROW(AdamW({p.shard()}, AdamWConfig{0.9, 0.95, 0.0, 0.1}), Error);
  ParamShard bad = p.shard();
  bad.grad = bad.grad.slice(0, 1);
  EXPECT_THROW(AdamW({bad}, AdamWConfig{}), Error);
}

TEST(GradNorm, CountsEveryParameterOnce) {
  OwnedParam sharded("a", ParamKind::Wq, {2, 2});         // only this rank holds it
  OwnedParam replicated("n", ParamKind::InputNorm, {3});  // every group rank holds it
  OwnedParam sigma_copy("b", ParamKind::Wup, {2});        // tp-sp: held by Σ ranks, this is copy 1
  for (int64_t j = 0; j < 4; ++j) sharded.grad.f32()[j] = 1.0f;     // sumsq 4
  for (int64_t j = 0; j < 3; ++j) replicated.grad.f32()[j] = 2.0f;  // sumsq 12
  for (int64_t j = 0; j < 2; ++j) sigma_copy.grad.f32()[j] = 3.0f;  // sumsq 18
  const std::vector<ParamShard> shards{sharded.shard(), replicated.shard(true),
                                       sigma_copy.shard(false, 1)};
  EXPECT_DOUBLE_EQ(local_grad_sumsq(shards, 0, 0), 4 + 12);  // group rank 0 counts the replica
  EXPECT_DOUBLE_EQ(local_grad_sumsq(shards, 2, 0), 4);       // other group ranks do not
  EXPECT_DOUBLE_EQ(local_grad_sumsq(shards, 0, 1), 0);       // replica 1 counts nothing
  EXPECT_DOUBLE_EQ(local_grad_sumsq(shards, 0, 0, 0.5), 0.25 * (4 + 12));
  const std::vector<ParamShard> copy0{sigma_copy.shard(false, 0)};
  EXPECT_DOUBLE_EQ(local_grad_sumsq(copy0, 1, 0), 18);
}

TEST(GradNorm, ClipFactorFollowsTorch) {
  EXPECT_DOUBLE_EQ(clip_factor(0.5, 1.0), 1.0);
  EXPECT_DOUBLE_EQ(clip_factor(4.0, 1.0), 1.0 / (4.0 + 1e-6));
  EXPECT_DOUBLE_EQ(clip_factor(4.0, 0.0), 1.0);       // clipping off
  EXPECT_DOUBLE_EQ(clip_factor(INFINITY, 1.0), 1.0);  // the caller stops on a non-finite norm
}

}  // namespace
}  // namespace tsp
