// The single layout: against the double-precision reference model (loss and every gradient; MHA
// and GQA, L=2, tied and untied), as pure data parallelism (--dp R equals R=1), gradient
// accumulation across calls, and the framework's errors.
// tsp-test-ranks: 1 2 4
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <string>

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

// ---- packed documents (docs/layouts.md, "Documents") ------------------------------------------

TEST(Single, DocumentsWithDataParallelism) {
  // Documents crossing rows and replicas: the mean divides by the labels counted over the whole
  // batch (all replicas), so R replicas equal one rank (bitwise at R = 1).
  test::LayoutCase lc;
  lc.layout = "single";
  lc.dp = test::world().size();
  lc.config = test::tiny_config(8, 4, 2, false);
  lc.B = 8;
  lc.S = 16;
  lc.doc_sep = 3;
  test::check_layout_against_single(test::world(), lc);
  lc.doc_sep = -1;
  test::check_one_document_is_bitwise(test::world(), lc);
}

TEST(Single, PackedDocumentsEqualEachDocumentOnItsOwn) {
  // Two rows of S = 24 packed with documents (separator 7): row 0 has separators at inputs 6, 7
  // (a document that is only its separator) and 15, and its last document is cut by the row's
  // end; row 1 has separators at inputs 3 and 20 and one as its last label (token 24). Single
  // with documents on the packed batch must equal running every document as its own row: the
  // loss sums (mean · counted labels) and the gradients of the sums (gradient · counted).
  //
  // Tolerance: both run the same per-token operations; they differ only in GEMM row counts (a
  // token's dot products may be blocked differently), in the order the weight gradients sum over
  // tokens (one GEMM over the packed rows; per document here, added in double), and in the
  // rounding of the gradient scale (1/counted vs 1/S_k, 2^-24 relative). The attention of a
  // query sees the same keys in the same order in both (d = 8: the reference kernel). So the
  // harness's argument for kLayoutRtol holds: K·2^-24 per sum (K <= 64), over ~6 chained stages,
  // 2.3e-5 worst case, under 1e-4. A document leaking into another (a missing mask, a RoPE
  // position not restarted, a separator's label counted) moves the loss or a gradient by 1e-2
  // or more.
  const LlamaConfig c = test::tiny_config(8, 4, 2, false);
  const int32_t sep = 7;
  const int64_t S = 24;
  Batch packed = test::random_batch(2, S, c.vocab_size, 17);
  for (int32_t& t : packed.tokens)
    if (t == sep) t = sep + 1;
  for (int64_t x : {6, 7, 15}) packed.tokens[x] = sep;
  for (int64_t x : {3, 20, 24}) packed.tokens[(S + 1) + x] = sep;
  packed.doc_sep = sep;

  std::unique_ptr<Communicator> self = test::world().split(test::world().rank(), 0);
  ParallelConfig pc;
  std::unique_ptr<Layout> single = make_layout(c, pc, *self);
  single->load(RandomWeights(11));
  const double mean = single->forward_backward(packed);
  const test::GradMap g_packed = test::gather_grads(*single);

  // Every document as its own row: tokens [s, e] where e is a separator at an input position, or
  // the row's last token; S_k = e - s inputs (none for a document that is only its separator).
  double loss_sum = 0;
  int64_t counted = 0;
  std::map<std::string, std::vector<double>> g_sum;
  for (int64_t b = 0; b < 2; ++b) {
    const int32_t* row = packed.tokens.data() + b * (S + 1);
    for (int64_t s0 = 0, x = 0; x <= S; ++x) {
      if (!(x == S || row[x] == sep)) continue;
      const int64_t Sk = x - s0;
      if (Sk > 0) {
        Batch doc;
        doc.B = 1;
        doc.S = Sk;
        doc.tokens.assign(row + s0, row + x + 1);
        single->zero_grads();
        loss_sum += single->forward_backward(doc) * static_cast<double>(Sk);
        counted += Sk;
        for (const auto& [name, g] : test::gather_grads(*single)) {
          std::vector<double>& acc = g_sum[name];
          acc.resize(g.size());
          for (size_t i = 0; i < g.size(); ++i) acc[i] += static_cast<double>(g[i]) * Sk;
        }
      }
      s0 = x + 1;
    }
  }
  EXPECT_EQ(counted, 2 * S - 5);  // five separators at input positions
  const double packed_sum = mean * static_cast<double>(counted);
  EXPECT_NEAR(packed_sum, loss_sum, test::kLayoutRtol * loss_sum);
  for (const auto& [name, want] : g_sum) {
    const std::vector<float>& got = g_packed.at(name);
    double num = 0, den = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      const double d = static_cast<double>(got[i]) * counted - want[i];
      num += d * d;
      den += want[i] * want[i];
    }
    ASSERT_GT(den, 0) << name;
    EXPECT_LE(std::sqrt(num / den), test::kLayoutRtol) << name;
  }
}

TEST(Single, AccumulationWithDocumentsIsTheExactTokenMean) {
  // Two micro-batches with the step's shared denominator equal one batch holding both, across
  // R = world replicas (each replica counts its rows; the world sums), and a micro-batch counting
  // 3 labels is not over-weighted (layout_harness.h).
  test::LayoutCase lc;
  lc.layout = "single";
  lc.dp = test::world().size();
  lc.config = test::tiny_config(8, 4, 2, false);
  lc.B = 4;
  lc.S = 16;
  lc.doc_sep = 3;
  test::check_accumulation_with_documents(test::world(), lc);
}

TEST(Single, RejectsBadDocumentSeparators) {
  const LlamaConfig c = test::tiny_config(8, 8, 2, false);
  ParallelConfig pc;
  pc.dp = test::world().size();
  std::unique_ptr<Layout> layout = make_layout(c, pc, test::world());
  layout->load(RandomWeights(1));
  Batch b = test::random_batch(4, 8, c.vocab_size, 1);
  b.doc_sep = static_cast<int32_t>(c.vocab_size);
  EXPECT_NE(error_of([&] { layout->forward_backward(b); }).find("outside the vocabulary"),
            std::string::npos);
  b.doc_sep = -2;
  EXPECT_NE(error_of([&] { layout->forward(b); }).find("must be a token id, or -1"),
            std::string::npos);
  // Every label after a separator: nothing to count.
  Batch all_sep = test::random_batch(4, 1, c.vocab_size, 2);
  for (int64_t r = 0; r < 4; ++r) all_sep.tokens[r * 2] = 9;
  all_sep.doc_sep = 9;
  EXPECT_NE(error_of([&] { layout->forward(all_sep); }).find("counts no token"), std::string::npos);
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
