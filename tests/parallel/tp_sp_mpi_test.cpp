// The tp, sp and tp-sp layouts (src/parallel/tp_sp.cpp) against the single reference: the loss
// and every gradient (MHA and GQA, L = 2, tied and untied, with and without --dp), bitwise at
// D = 1; exact shard maps with coordinate-hash weights; exact per-layer traffic against the closed
// forms of docs/communication.md; the replication claims (norm gradients bit-identical over the
// TP group, weight-shard gradients over the SP group); and the start-up errors.
// tsp-test-ranks: 1 2 4 8
#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <map>

#include "mpi_test_util.h"
#include "parallel/layout_harness.h"
#include "parallel/registry.h"
#include "parallel/tp_sp.h"
#include "test_util.h"
#include "tsp/plan/cost_model.h"

namespace tsp {
namespace {

using test::error_of;

struct Model {
  const char* name;
  LlamaConfig config;
  int max_T;  // largest T dividing its kv heads that we run
};
std::vector<Model> models() {
  return {
      {"mha_untied", test::tiny_config(8, 8, 2, false), 8},   // g = 1
      {"gqa_tied", test::tiny_config(8, 4, 2, true), 4},      // g = 2
      {"gqa4_untied", test::tiny_config(8, 2, 3, false), 2},  // g = 4, L = 3
  };
}

// One configuration of a test: layout, T (tp-sp), R, and the world size it needs.
struct Config {
  std::string layout;
  int T = 1;  // tp-sp only
  int dp = 1;
  int world = 1;
  std::string label() const {
    std::string s = layout == "tp-sp" ? fmt::format("tp-sp T={} S={}", T, world / dp / T)
                                      : fmt::format("{} D={}", layout, world / dp);
    return dp > 1 ? s + fmt::format(" R={}", dp) : s;
  }
  int D() const { return world / dp; }
  int tensor_degree() const { return layout == "tp" ? D() : layout == "sp" ? 1 : T; }
  int sequence_degree() const { return D() / tensor_degree(); }
};

// Every configuration the issue asks for: tp and tp-sp at D in {1, 2, 4}, sp also at 8, tp-sp
// (T, Σ) in {(2,2), (2,1), (1,2), (4,2)}, each with and without data parallelism.
std::vector<Config> configs_for(int W) {
  std::vector<Config> all = {
      {"tp", 1, 1, 1},    {"sp", 1, 1, 1},    {"tp-sp", 1, 1, 1},  // D = 1: bitwise
      {"tp", 1, 1, 2},    {"sp", 1, 1, 2},    {"tp-sp", 2, 1, 2},
      {"tp-sp", 1, 1, 2}, {"tp", 1, 2, 2},    {"sp", 1, 2, 2},  // D = 1, R = 2
      {"tp", 1, 1, 4},    {"sp", 1, 1, 4},    {"tp-sp", 2, 1, 4},
      {"tp", 1, 2, 4},    {"sp", 1, 2, 4},    {"tp-sp", 2, 2, 4},
      {"tp-sp", 1, 2, 4}, {"sp", 1, 1, 8},    {"tp-sp", 4, 1, 8},
      {"sp", 1, 2, 8},    {"tp-sp", 2, 2, 8}, {"tp", 1, 2, 8},  // tp D = 4 with R = 2
  };
  std::vector<Config> out;
  for (const Config& c : all)
    if (c.world == W) out.push_back(c);
  return out;
}

test::LayoutCase make_case(const Config& cf, const Model& m, DType dtype = DType::F32) {
  test::LayoutCase lc;
  lc.dtype = dtype;
  lc.layout = cf.layout;
  lc.tp = cf.layout == "tp-sp" ? cf.T : 1;
  lc.dp = cf.dp;
  lc.config = m.config;
  lc.B = 4;   // divisible by R
  lc.S = 16;  // 2Σ | S for Σ <= 8
  return lc;
}

void check_every_config_against_single(DType dtype) {
  const int W = test::world().size();
  const std::vector<Config> cfs = configs_for(W);
  ASSERT_FALSE(cfs.empty()) << "no configuration for " << W << " ranks";
  for (const Config& cf : cfs) {
    for (const Model& m : models()) {
      if (cf.tensor_degree() > m.max_T) continue;
      const test::LayoutCaseResult r =
          test::check_layout_against_single(test::world(), make_case(cf, m, dtype));
      if (test::world().rank() == 0)
        std::printf("# %-18s %-12s %s loss %.9f (single %.9f)  max rel err %.2e (%s)\n",
                    cf.label().c_str(), m.name, std::string(dtype_name(dtype)).c_str(), r.loss,
                    r.ref_loss, r.max_rel_err, r.worst_param.c_str());
    }
  }
}

TEST(TpSp, MatchesSingleEveryGradient) {
  check_every_config_against_single(DType::F32);
}

// Packed documents (about one token in five a separator, crossing the zigzag chunks of the Σ
// sequence ranks) in every configuration, fp32 and bf16, against single with the same documents;
// one document per row equals no documents bit for bit.
TEST(TpSp, DocumentsMatchSingle) {
  const int W = test::world().size();
  const Model m = models()[0];
  for (const Config& cf : configs_for(W)) {
    if (cf.tensor_degree() > m.max_T) continue;
    for (DType dt : {DType::F32, DType::BF16}) {
      test::LayoutCase lc = make_case(cf, m, dt);
      lc.S = 32;
      lc.doc_sep = 5;
      test::check_layout_against_single(test::world(), lc);
    }
    test::LayoutCase one = make_case(cf, m);
    one.S = 32;
    test::check_one_document_is_bitwise(test::world(), one);
  }
}

// The same in bf16 mixed precision against single in bf16 (the harness's kLayoutRtolBf16, and
// bitwise at D = 1, R = 1): every row-parallel partial sum and every reduction is fp32, so each
// sub-block output is rounded to bf16 once, as in single.
TEST(TpSp, Bf16MatchesSingleEveryGradient) {
  check_every_config_against_single(DType::BF16);
}

// ---- exact shard maps --------------------------------------------------------------------------

// A weight whose every element names its coordinates: integer-valued, exact in f32 (< 2^24).
float coord_value(const ParamSpec& s, int64_t row, int64_t col) {
  const int64_t tag = static_cast<int64_t>(std::hash<std::string>{}(s.name) % 400);
  return static_cast<float>(tag * 32768 + row * 128 + col);  // rows, cols <= 128 here
}
class CoordWeights final : public WeightSource {
 public:
  void read_rows(const ParamSpec& s, int64_t r0, int64_t r1, TensorView dst) const override {
    const int64_t cols = s.shape.size() == 2 ? s.shape[1] : 1;
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = 0; c < cols; ++c) dst.f32()[(r - r0) * cols + c] = coord_value(s, r, c);
  }
};

TEST(TpSp, RankMapIsTensorIndexFastest) {
  for (int D : {1, 2, 4, 8})
    for (int T = 1; T <= D; T *= 2)
      for (int g = 0; g < D; ++g) EXPECT_EQ(tp_sp_coords(g, D, T), (TpSpCoords{g % T, g / T}));
  // D = 8, T = 2 written out: TP groups {0,1} {2,3} ..., SP groups {0,2,4,6} {1,3,5,7}.
  EXPECT_EQ(tp_sp_coords(5, 8, 2), (TpSpCoords{1, 2}));
  EXPECT_EQ(tp_sp_coords(6, 8, 4), (TpSpCoords{2, 1}));
  EXPECT_NE(error_of([] { tp_sp_coords(0, 6, 4); }).find("T=4"), std::string::npos);
}

TEST(TpSp, ShardsAreExactlyTheDocumentedPieces) {
  const int W = test::world().size();
  for (const Config& cf : configs_for(W)) {
    const LlamaConfig c = test::tiny_config(8, 4, 2, /*tie=*/cf.dp == 1);
    ParallelConfig pc;
    pc.layout = cf.layout;
    pc.tp = cf.layout == "tp-sp" ? cf.T : 1;
    pc.dp = cf.dp;
    std::unique_ptr<Layout> layout = make_layout(c, pc, test::world());
    layout->load(CoordWeights());
    const int T = cf.tensor_degree(), D = cf.D();
    const TpSpDegrees deg = tp_sp_degrees(*layout);
    EXPECT_EQ(deg.T, T);
    EXPECT_EQ(deg.sigma, D / T);
    const TpSpCoords me = tp_sp_coords(layout->group().rank(), D, T);
    int64_t held = 0, expect_held = 0;
    for (const ParamShard& p : layout->parameters()) {
      const ParamSpec& s = *p.spec;
      const bool norm = s.shape.size() == 1;
      const bool by_cols = s.kind == ParamKind::Wo || s.kind == ParamKind::Wdown;
      const int64_t rows = s.shape[0], cols = norm ? 1 : s.shape[1];
      // Expected piece t of T: rows for q, k, v, gate, up, embedding, LM head; columns for o, down.
      const int64_t r0 = norm || by_cols ? 0 : me.t * rows / T;
      const int64_t r1 = norm || by_cols ? rows : (me.t + 1) * rows / T;
      const int64_t c0 = by_cols ? me.t * cols / T : 0, c1 = by_cols ? (me.t + 1) * cols / T : cols;
      ASSERT_EQ(p.value.numel(), (r1 - r0) * (c1 - c0)) << cf.label() << " " << s.name;
      int64_t wrong = 0;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t k = c0; k < c1; ++k)
          wrong += p.value.f32()[(r - r0) * (c1 - c0) + (k - c0)] != coord_value(s, r, k);
      EXPECT_EQ(wrong, 0) << cf.label() << " rank (t=" << me.t << ", s=" << me.s << "): " << s.name;
      // Norms: every rank of the group holds them. Matrices: replicated over the whole group
      // only when T = 1 (sp); otherwise copy s of the Σ holders of piece t.
      EXPECT_EQ(p.replicated_in_group, D > 1 && (norm || T == 1)) << cf.label() << " " << s.name;
      EXPECT_EQ(p.copy_index, !norm && T > 1 ? me.s : 0) << cf.label() << " " << s.name;
      held += p.value.numel();
      expect_held += norm ? rows : rows * cols / T;
    }
    EXPECT_EQ(held, expect_held) << cf.label();
    // Gathering the shards gives back every full tensor.
    layout->gather(false, [&](const ParamSpec& s, TensorView t) {
      const int64_t cols = s.shape.size() == 2 ? s.shape[1] : 1;
      int64_t wrong = 0;
      for (int64_t i = 0; i < t.numel(); ++i)
        wrong += t.f32()[i] != coord_value(s, i / cols, i % cols);
      EXPECT_EQ(wrong, 0) << cf.label() << " gathered " << s.name;
    });
  }
}

// ---- replication claims ------------------------------------------------------------------------

void check_replicated_gradients_bit_identical(DType dtype) {
  // Norm gradients must agree bit for bit over the whole group (TP ranks compute them from
  // identical data; SP ranks receive the same all-reduced sum), matrix-shard gradients over the
  // Σ ranks holding the same piece: otherwise replicated weights would drift apart in training.
  const int W = test::world().size();
  for (const Config& cf : configs_for(W)) {
    if (cf.D() == 1) continue;
    const LlamaConfig c = test::tiny_config(8, 4, 2, false);
    ParallelConfig pc;
    pc.layout = cf.layout;
    pc.tp = cf.layout == "tp-sp" ? cf.T : 1;
    pc.dp = cf.dp;
    pc.dtype = dtype;
    std::unique_ptr<Layout> layout = make_layout(c, pc, test::world());
    layout->load(RandomWeights(7));
    layout->forward_backward(test::random_batch(4, 16, c.vocab_size, 5));
    const int T = cf.tensor_degree();
    const TpSpCoords me = tp_sp_coords(layout->group().rank(), cf.D(), T);
    Communicator& g = layout->group();
    // Norms: group rank 0 broadcasts its gradient. Matrices: for each piece t, the rank (t, s=0),
    // which is group rank t, broadcasts; the other holders of piece t compare with it.
    for (const ParamShard& p : layout->parameters()) {
      const bool norm = p.spec->shape.size() == 1;
      const int src = norm ? 0 : me.t;
      for (int root = 0; root < (norm ? 1 : T); ++root) {
        Tensor theirs = Tensor::f32(p.grad.shape(), MemCategory::Workspace);
        if (g.rank() == root) std::memcpy(theirs.data(), p.grad.data(), p.grad.nbytes());
        g.broadcast(theirs.data(), theirs.numel(), DType::F32, root);
        if (root == src) {
          EXPECT_EQ(0, std::memcmp(theirs.data(), p.grad.data(), p.grad.nbytes()))
              << cf.label() << " rank (t=" << me.t << ", s=" << me.s << "): gradient of "
              << p.spec->name << " differs from its copy on group rank " << src << " ("
              << dtype_name(dtype) << ")";
        }
      }
    }
  }
}

TEST(TpSp, ReplicatedGradientsAreBitIdentical) {
  check_replicated_gradients_bit_identical(DType::F32);
}
// In bf16 too: the TP ranks' bf16 activations are identical (one fp32 all-reduce, one rounding).
TEST(TpSp, Bf16ReplicatedGradientsAreBitIdentical) {
  check_replicated_gradients_bit_identical(DType::BF16);
}

void check_gradients_accumulate(DType dtype) {
  // Two calls accumulate the sum of the two calls' gradients: the Σ all-reduce works on a staging
  // buffer of the new partials only, so what is already accumulated is not summed Σ times.
  const int W = test::world().size();
  for (const Config& cf : configs_for(W)) {
    const LlamaConfig c = test::tiny_config(8, 4, 2, true);
    ParallelConfig pc;
    pc.layout = cf.layout;
    pc.tp = cf.layout == "tp-sp" ? cf.T : 1;
    pc.dp = cf.dp;
    pc.dtype = dtype;
    std::unique_ptr<Layout> layout = make_layout(c, pc, test::world());
    layout->load(RandomWeights(8));
    const Batch b1 = test::random_batch(4, 16, c.vocab_size, 1);
    const Batch b2 = test::random_batch(4, 16, c.vocab_size, 2);
    test::check_gradient_accumulation(*layout, b1, b2,
                                      cf.label() + " " + std::string(dtype_name(dtype)));
  }
}

TEST(TpSp, GradientsAccumulateAcrossCalls) {
  check_gradients_accumulate(DType::F32);
}
// Gradients are fp32 in bf16 too, so the harness's fp32 bound holds unchanged.
TEST(TpSp, Bf16GradientsAccumulateAcrossCalls) {
  check_gradients_accumulate(DType::BF16);
}

// ---- exact traffic -----------------------------------------------------------------------------
// The closed forms of docs/communication.md (sections tp, sp, tp-sp), in the Communicator's
// byte convention, for one layer and one rank; e = 4 (f32), n = B/R·S/Σ local tokens.
int64_t ar(int64_t k, int64_t bytes) {
  return 2 * (k - 1) * bytes / k;
}  // all-reduce
int64_t ag(int64_t k, int64_t block) {
  return (k - 1) * block;
}  // all-gather / r-s

struct Expected {
  int64_t all_reduce = 0, all_gather = 0, reduce_scatter = 0;  // bytes sent (= received)
};
void expect_traffic(const CommStats& got, const Expected& want, const std::string& what) {
  EXPECT_EQ(got[CommOp::AllReduce].bytes_sent, want.all_reduce) << what << ": all-reduce";
  EXPECT_EQ(got[CommOp::AllGather].bytes_sent, want.all_gather) << what << ": all-gather";
  EXPECT_EQ(got[CommOp::ReduceScatter].bytes_sent, want.reduce_scatter) << what << ": r-s";
  EXPECT_EQ(got.total_sent(), want.all_reduce + want.all_gather + want.reduce_scatter) << what;
  EXPECT_EQ(got.total_received(), got.total_sent()) << what << ": sent != received";
}

// dtype is the compute dtype. e = 4: every reduction (all-reduce, reduce-scatter) and the softmax
// statistics' all-gather move fp32 in every compute dtype; ea: the activations' element size, which
// only the K/V all-gathers move (4 in f32, 2 in bf16: they halve).
void check_traffic_equals_closed_forms(DType dtype) {
  const int W = test::world().size();
  for (const Config& cf : configs_for(W)) {
    for (const Model& m : models()) {
      if (cf.tensor_degree() > m.max_T) continue;
      const LlamaConfig& c = m.config;
      ParallelConfig pc;
      pc.layout = cf.layout;
      pc.tp = cf.layout == "tp-sp" ? cf.T : 1;
      pc.dp = cf.dp;
      pc.dtype = dtype;
      std::unique_ptr<Layout> layout = make_layout(c, pc, test::world());
      layout->load(RandomWeights(3));
      const int64_t B = 4, S = 16, e = 4, ea = static_cast<int64_t>(dtype_size(dtype));
      const CommStats g0 = layout->group().stats();
      layout->forward_backward(test::random_batch(B, S, c.vocab_size, 2));
      const CommStats group_total = layout->group().stats() - g0;
      const TpSpTraffic* tr = tp_sp_traffic(*layout);
      ASSERT_NE(tr, nullptr);
      const int64_t T = cf.tensor_degree(), Sg = cf.sequence_degree();
      const int64_t h = c.hidden_size, kv = c.kv_dim(), I = c.intermediate_size;
      const int64_t V = c.vocab_size, n = B / cf.dp * S / Sg;
      const int64_t M = 2 * h * h + 2 * kv * h + 3 * I * h;  // a block's matrix parameters
      Expected fwd, bwd, head_f, head_b;
      if (T > 1) {
        fwd.all_reduce = 2 * ar(T, n * h * e);  // after o_proj and after down_proj
        bwd.all_reduce = 2 * ar(T, n * h * e);  // d(xn) before each norm's backward
        head_f.all_reduce = ar(T, n * h * e);   // vocabulary-parallel embedding
        head_f.all_gather = ag(T, 3 * n * e);   // (max, sum-exp, target) per token
        head_b.all_reduce = ar(T, n * h * e);   // d(xn) of the loss head
      }
      if (Sg > 1) {
        // This rank's k (or v) rows: gathered in the compute dtype, their gradients
        // reduce-scattered in fp32.
        fwd.all_gather = 2 * ag(Sg, n * (kv / T) * ea);
        bwd.reduce_scatter = 2 * ag(Sg, n * (kv / T) * e);
        bwd.all_reduce += ar(Sg, (M / T + 2 * h) * e);  // the block's weight gradients
        const int64_t outer = (c.tie_word_embeddings ? 1 : 2) * V * h / T + h;
        head_b.all_reduce += ar(Sg, outer * e);  // embedding, final norm, LM head
      }
      const std::string what = cf.label() + " " + m.name + " " + std::string(dtype_name(dtype));
      ASSERT_EQ(tr->layer_forward.size(), static_cast<size_t>(c.num_hidden_layers));
      for (int l = 0; l < c.num_hidden_layers; ++l) {
        expect_traffic(tr->layer_forward[l], fwd, what + fmt::format(" layer {} forward", l));
        expect_traffic(tr->layer_backward[l], bwd, what + fmt::format(" layer {} backward", l));
      }
      expect_traffic(tr->head_forward, head_f, what + " embedding + loss forward");
      expect_traffic(tr->head_backward, head_b, what + " loss + embedding backward");
      // The group's counters carry exactly this traffic (the replica all-reduce is elsewhere).
      int64_t sum = tr->head_forward.total_sent() + tr->head_backward.total_sent();
      for (int l = 0; l < c.num_hidden_layers; ++l)
        sum += tr->layer_forward[l].total_sent() + tr->layer_backward[l].total_sent();
      EXPECT_EQ(group_total.total_sent(), sum) << what;

      // The planner's block_comm (include/tsp/plan/cost_model.h) is the same count, forward and
      // backward (its Σ all-reduce carries the two RMSNorm vectors with the matrices, as here).
      // It models f32 (one element size for every transfer).
      if (dtype == DType::F32) {
        plan::LayoutSpec ls;
        ls.name = cf.layout;
        ls.D = cf.D();
        ls.T = cf.layout == "tp-sp" ? cf.T : 1;
        ls.R = cf.dp;
        const plan::BlockComm pb = plan::block_comm(c, ls, B / cf.dp * S, static_cast<int>(e));
        EXPECT_EQ(pb.forward.sent, tr->layer_forward[0].total_sent()) << what << " vs planner";
        EXPECT_EQ(pb.forward.received, tr->layer_forward[0].total_received()) << what;
        EXPECT_EQ(pb.backward.sent, tr->layer_backward[0].total_sent()) << what << " vs planner";
        EXPECT_EQ(pb.backward.received, tr->layer_backward[0].total_received()) << what;
      }

      // forward() records the forward only.
      layout->forward(test::random_batch(B, S, c.vocab_size, 2));
      for (int l = 0; l < c.num_hidden_layers; ++l) {
        expect_traffic(tr->layer_forward[l], fwd, what + " forward() only");
        EXPECT_EQ(tr->layer_backward[l].total_sent(), 0) << what;
      }
    }
  }
}

TEST(TpSp, PerLayerTrafficEqualsClosedForms) {
  check_traffic_equals_closed_forms(DType::F32);
}

// In bf16 the K/V all-gathers move half the bytes (ea = 2); the vocabulary statistics' gather, the
// embedding's and the row-parallel projections' all-reduces, d(xn)'s all-reduces, the dK/dV
// reduce-scatters and the weight-gradient all-reduces stay fp32 (e = 4), so their counts are the
// f32 test's. E.g. sp D=2, mha_untied (n = 32 tokens, kv = 64): a layer's forward all-gathers
// 2·(2-1)·32·64·2 = 8192 bytes instead of 16384; its backward is unchanged.
TEST(TpSp, Bf16PerLayerTrafficEqualsClosedForms) {
  check_traffic_equals_closed_forms(DType::BF16);
}

// ---- errors ------------------------------------------------------------------------------------

TEST(TpSp, NonDividingConfigurationsSayWhatWouldWork) {
  Communicator& world = test::world();
  const int W = world.size();
  auto build = [&](const std::string& layout, int tp, int dp, const LlamaConfig& c) {
    ParallelConfig pc;
    pc.layout = layout;
    pc.tp = tp;
    pc.dp = dp;
    return error_of([&] { make_layout(c, pc, world); });
  };
  if (W == 1) {
    // Everything divides by 1; T = 1 needs no even sequence either.
    ParallelConfig pc;
    pc.layout = "tp-sp";
    std::unique_ptr<Layout> l = make_layout(test::tiny_config(), pc, world);
    l->load(RandomWeights(1));
    EXPECT_TRUE(std::isfinite(l->forward(test::random_batch(1, 7, 128, 1))));
    return;
  }
  // kv heads: 3 heads of d = 16 (h = 48), not divisible by 2 (or 4, 8).
  const LlamaConfig kv3 = test::tiny_config(3, 3, 2, false, 48, 128, 128);
  EXPECT_EQ(build("tp", 1, 1, kv3),
            fmt::format("num_key_value_heads=3 is not divisible by D={}; use D in {{1, 3}}", W));
  EXPECT_EQ(build("tp-sp", 2, 1, kv3),
            "tp-sp: --tp 2 does not divide num_key_value_heads=3 (each TP rank takes whole kv "
            "heads with their query heads); use --tp in {1}");
  // FFN width and vocabulary.
  const LlamaConfig ffn = test::tiny_config(8, 8, 2, false, 64, 132 + 2, 128);  // 134 = 2·67
  const LlamaConfig voc = test::tiny_config(8, 8, 2, false, 64, 128, 130);      // 130 = 2·5·13
  if (W >= 4) {
    EXPECT_EQ(build("tp", 1, 1, ffn).rfind("intermediate_size=134 is not divisible by D=", 0), 0u)
        << build("tp", 1, 1, ffn);
    EXPECT_EQ(build("tp-sp", 4, W / 4, ffn),
              "tp-sp: --tp 4 does not divide intermediate_size=134; use --tp in {1, 2}");
    EXPECT_EQ(build("tp-sp", 4, W / 4, voc),
              "tp-sp: --tp 4 does not divide vocab_size=130 (the embedding and LM head are split "
              "by vocabulary); use --tp in {1, 2} or pad the vocabulary to a multiple of 4");
    EXPECT_NE(build("tp", 1, W / 4, voc).find("vocab_size=130 is not divisible by D=4"),
              std::string::npos);
  }
  // T must divide D (the framework's check, before the layout is built).
  if (W == 4 || W == 8) {
    EXPECT_NE(build("tp-sp", 3, 1, test::tiny_config()).find("cannot be split into tp=3 groups"),
              std::string::npos);
  }
  EXPECT_NE(build("tp", 2, 1, test::tiny_config()).find("--tp 2 only applies to the tp-sp layout"),
            std::string::npos);

  // Sequence: S must cut into 2Σ zigzag chunks (checked per batch, on every rank).
  const LlamaConfig c = test::tiny_config();
  ParallelConfig sp;
  sp.layout = "sp";
  std::unique_ptr<Layout> l = make_layout(c, sp, world);
  l->load(RandomWeights(1));
  const Batch odd = test::random_batch(2, 2 * W + 2, c.vocab_size, 1);  // 2W+2 is not 2W·k
  EXPECT_EQ(
      error_of([&] { l->forward(odd); })
          .rfind(fmt::format("sequence length S={} cannot be cut into 2D={} equal zigzag chunks",
                             2 * W + 2, 2 * W),
                 0),
      0u)
      << error_of([&] { l->forward(odd); });
  if (W >= 4) {
    ParallelConfig ts;
    ts.layout = "tp-sp";
    ts.tp = 2;
    std::unique_ptr<Layout> l2 = make_layout(c, ts, world);
    l2->load(RandomWeights(1));
    const int Sg = W / 2;
    const Batch bad = test::random_batch(2, 2 * Sg + 2, c.vocab_size, 1);
    EXPECT_EQ(
        error_of([&] { l2->forward(bad); }),
        fmt::format("tp-sp: sequence length S={} cannot be cut into 2Σ={} equal zigzag chunks "
                    "(Σ = D/T = {}/2 = {} sequence shards); use S a multiple of {}, or a --tp "
                    "that leaves fewer sequence shards",
                    2 * Sg + 2, 2 * Sg, W, Sg, 2 * Sg));
    // Still usable after a rejected batch.
    EXPECT_TRUE(std::isfinite(l2->forward(test::random_batch(2, 4 * Sg, c.vocab_size, 1))));
  }
  EXPECT_TRUE(std::isfinite(l->forward(test::random_batch(2, 4 * W, c.vocab_size, 1))));
}

TEST(TpSp, Registered) {
  for (const char* name : {"tp", "sp", "tp-sp"}) EXPECT_NE(find_layout(name), nullptr) << name;
}

}  // namespace
}  // namespace tsp
