// The single layout: against the double-precision reference model (loss and every gradient; MHA
// and GQA, L=2, tied and untied), as pure data parallelism (--dp R equals R=1), gradient
// accumulation across calls, and the framework's errors.
// tsp-test-ranks: 1 2 4
#include <gtest/gtest.h>

#include <cmath>

#include "model/reference_model.h"
#include "mpi_test_util.h"
#include "parallel/layout_harness.h"
#include "parallel/registry.h"
#include "test_util.h"

namespace tsp {
namespace {

using test::error_of;

struct RefCase {
  const char* name;
  int64_t heads, kv_heads;
  bool tie;
  DType dtype = DType::F32;
};

class SingleVsReference : public ::testing::TestWithParam<RefCase> {};

TEST_P(SingleVsReference, LossAndEveryGradient) {
  const RefCase rc = GetParam();
  // h=32, d=8, FFN 64, V=64, L=2, B=2 rows of S=16.
  const LlamaConfig c = test::tiny_config(rc.heads, rc.kv_heads, 2, rc.tie, 32, 64, 64);
  const uint64_t seed = 5;
  const Batch batch = test::random_batch(2, 16, c.vocab_size, 3);
  // Every rank checks on its own (a size-1 communicator): no traffic, the same answer anywhere.
  std::unique_ptr<Communicator> self = test::world().split(test::world().rank(), 0);
  ParallelConfig pc;
  pc.dtype = rc.dtype;
  std::unique_ptr<Layout> single = make_layout(c, pc, *self);
  single->load(RandomWeights(seed));
  const double loss = single->forward_backward(batch);
  const test::GradMap got = test::gather_grads(*single);

  const test::RefTensors w = test::reference_weights(c, seed);
  const test::RefResult want = test::ReferenceModel(c, w).run(batch.tokens, batch.B, batch.S, true);

  // fp32 against the exact (double) function on the same fp32 weights. Per result the f32 error
  // is <= K·2^-24 for K-term sums (K <= 64 here: 4e-6 worst case, ~5e-7 typical), chained over
  // ~2L+2 = 6 sub-blocks forward and back; norm-wise 2e-5 holds that with margin (measured
  // ~1e-6), while a wrong term in any gradient is O(1e-2) or more.
  //
  // bf16 mixed precision against the same exact function: the weights are rounded to bf16 for
  // compute (round to nearest: 2^-9 = 2.0e-3 relative each), and so is every sub-block output
  // (q, k, v, o, the residual stream, the normed inputs, the MLP activation); accumulation and
  // gradients stay fp32. Norm-wise each rounded stage adds at most 2^-9; a gradient passes through
  // the weight rounding and at most ~11 rounded stages (2L+2 = 6 forward, their recomputation and
  // the GEMM inputs rounded in backward): 12·2^-9 = 2.3e-2. Measured 8.4e-3; a wrong term is O(1e-1).
  const double tol = rc.dtype == DType::BF16 ? 12.0 / 512.0 : 2e-5;
  EXPECT_NEAR(loss, want.loss, tol * want.loss);
  ASSERT_EQ(got.size(), want.grads.size());
  double worst = 0;
  for (const auto& [name, g_ref] : want.grads) {
    const std::vector<float>& g = got.at(name);
    ASSERT_EQ(g.size(), g_ref.size()) << name;
    double num = 0, den = 0;
    for (size_t i = 0; i < g.size(); ++i) {
      num += (g[i] - g_ref[i]) * (g[i] - g_ref[i]);
      den += g_ref[i] * g_ref[i];
    }
    ASSERT_GT(den, 0) << name << ": the reference gradient is zero, the check would be vacuous";
    const double err = std::sqrt(num / den);
    worst = std::max(worst, err);
    EXPECT_LE(err, tol) << rc.name << ": " << name;
  }
  if (test::world().rank() == 0)
    std::printf("# %s: loss %.9f, worst gradient rel err %.2e\n", rc.name, loss, worst);
}

INSTANTIATE_TEST_SUITE_P(Models, SingleVsReference,
                         ::testing::Values(RefCase{"mha_untied", 4, 4, false},
                                           RefCase{"gqa_tied", 4, 2, true},
                                           RefCase{"gqa_untied", 4, 1, false},
                                           RefCase{"mha_untied_bf16", 4, 4, false, DType::BF16},
                                           RefCase{"gqa_tied_bf16", 4, 2, true, DType::BF16}),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(Single, DataParallelEqualsOneRank) {
  // World of R ranks, all replicas (D = 1). At R = 1 the harness requires bitwise equality.
  for (bool tie : {false, true}) {
    test::LayoutCase lc;
    lc.layout = "single";
    lc.dp = test::world().size();
    lc.config = test::tiny_config(8, 4, 2, tie);
    lc.B = 8;  // divisible by R in {1, 2, 4, 8}
    lc.S = 16;
    const test::LayoutCaseResult r = test::check_layout_against_single(test::world(), lc);
    if (test::world().rank() == 0)
      std::printf("# single dp=%d tie=%d: max rel err %.2e (%s)\n", lc.dp, tie, r.max_rel_err,
                  r.worst_param.c_str());
  }
}

TEST(Single, GradientsAccumulateAcrossCalls) {
  // Two calls accumulate the sum of the two calls' gradients (also across replicas, where the
  // framework pre-scales what is already accumulated by 1/R before the replica all-reduce).
  const LlamaConfig c = test::tiny_config(8, 8, 2, false);
  ParallelConfig pc;
  pc.dp = test::world().size();
  std::unique_ptr<Layout> layout = make_layout(c, pc, test::world());
  layout->load(RandomWeights(8));
  const Batch b1 = test::random_batch(4, 16, c.vocab_size, 1);
  const Batch b2 = test::random_batch(4, 16, c.vocab_size, 2);
  test::check_gradient_accumulation(*layout, b1, b2, "single");
}

TEST(Single, ParametersAndGatheredWeights) {
  const LlamaConfig c = test::tiny_config(8, 8, 2, true);
  ParallelConfig pc;
  pc.dp = test::world().size();
  std::unique_ptr<Layout> layout = make_layout(c, pc, test::world());
  layout->load(RandomWeights(3));
  const std::vector<ParamShard> shards = layout->parameters();
  ASSERT_EQ(shards.size(), llama_param_specs(c).size());  // tied: no lm_head
  int64_t n = 0;
  for (const ParamShard& s : shards) {
    EXPECT_EQ(s.value.shape(), s.spec->shape) << s.spec->name;
    EXPECT_FALSE(s.replicated_in_group);  // D = 1: nothing to count twice within a group
    n += s.value.numel();
  }
  EXPECT_EQ(n, c.num_parameters());
  // Gathered weights are exactly what the source holds.
  int seen = 0;
  layout->gather(false, [&](const ParamSpec& s, TensorView t) {
    Tensor want = Tensor::f32(s.shape, MemCategory::Workspace);
    init_param(s, 3, want);
    EXPECT_EQ(0, std::memcmp(want.data(), t.data(), t.nbytes())) << s.name;
    ++seen;
  });
  if (test::world().rank() == 0)
    EXPECT_EQ(seen, static_cast<int>(shards.size()));
  else
    EXPECT_EQ(seen, 0);
}

TEST(Single, ErrorsSayWhatWouldWork) {
  Communicator& world = test::world();
  const int W = world.size();
  const LlamaConfig c = test::tiny_config();
  ParallelConfig bad;
  bad.layout = "no-such-layout";
  const std::string unknown = error_of([&] { make_layout(c, bad, world); });
  EXPECT_NE(unknown.find("unknown layout 'no-such-layout'; available layouts: "), std::string::npos)
      << unknown;
  EXPECT_NE(unknown.find("single"), std::string::npos) << unknown;
  if (W > 1) {
    EXPECT_EQ(error_of([&] { make_layout(c, ParallelConfig{}, world); }),
              fmt::format("layout single keeps the whole model on every rank, so all {} ranks "
                          "must be data-parallel replicas: use --dp {} (got --dp 1)",
                          W, W));
  }
  ParallelConfig pc;
  pc.dp = W;
  std::unique_ptr<Layout> layout = make_layout(c, pc, world);
  layout->load(RandomWeights(1));
  Batch b = test::random_batch(W, 8, c.vocab_size, 1);
  if (W > 1) {
    Batch odd = test::random_batch(W + 1, 8, c.vocab_size, 1);
    EXPECT_EQ(error_of([&] { layout->forward(odd); }),
              fmt::format("batch of B={} rows cannot be split evenly over dp={} replicas; use B a "
                          "multiple of {}",
                          W + 1, W, W));
  }
  Batch oov = b;
  oov.tokens[3] = static_cast<int32_t>(c.vocab_size);
  EXPECT_EQ(error_of([&] { layout->forward(oov); }),
            "token id 128 at row 0, column 3 is outside the vocabulary [0, 128)");
  Batch short_batch = b;
  short_batch.tokens.pop_back();
  EXPECT_NE(error_of([&] { layout->forward(short_batch); }).find("needs"), std::string::npos);
  Batch too_long = test::random_batch(W, 2048, c.vocab_size, 1);
  EXPECT_EQ(error_of([&] { layout->forward(too_long); }),
            "sequence length S=2048 exceeds max_position_embeddings=1024 of the model");
  // The layout still works after rejected batches (no collective was left half-done).
  EXPECT_TRUE(std::isfinite(layout->forward(b)));
}

TEST(Registry, ListsSingle) {
  EXPECT_NE(find_layout("single"), nullptr);
  EXPECT_NE(layout_names_str().find("single"), std::string::npos);
}

}  // namespace
}  // namespace tsp
