// The tsp layout: against the single reference (loss and every gradient; MHA and GQA, L=2, tied
// and untied, with and without data parallelism; in fp32 and in bf16 mixed precision), overlap
// on/off bitwise identical, exact per-layer communication against the closed forms of
// docs/communication.md (and bf16's halved compute-dtype transfers), the shard map with
// coordinate-hash weights, the memory bound (no whole layer in flight) and the start-up errors.
// tsp-test-ranks: 1 2 4 8
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "mpi_test_util.h"
#include "parallel/layout_harness.h"
#include "parallel/tsp.h"
#include "test_util.h"
#include "tsp/core/memory.h"
#include "tsp/parallel/sharding.h"
#include "tsp/plan/cost_model.h"

namespace tsp {
namespace {

using test::error_of;

std::unique_ptr<Layout> make_tsp(const LlamaConfig& c, int dp, bool overlap = true,
                                 DType dtype = DType::F32) {
  ParallelConfig pc;
  pc.layout = "tsp";
  pc.dp = dp;
  pc.overlap = overlap;
  pc.dtype = dtype;
  return make_layout(c, pc, test::world());
}

// The data-parallel degrees to try on this world: none, and 2 replicas when the world allows.
std::vector<int> dp_choices() {
  const int W = test::world().size();
  std::vector<int> out{1};
  if (W >= 2) out.push_back(2);
  return out;
}

struct ModelCase {
  const char* name;
  int64_t heads, kv_heads;
  bool tie;
  int max_D;  // D must divide kv_heads
};
const ModelCase kModels[] = {
    {"mha_untied", 8, 8, false, 8},
    {"mha_tied", 8, 8, true, 8},
    {"gqa2_untied", 16, 8, false, 8},  // g = 2, head_dim 4
    {"gqa2_tied", 16, 8, true, 8},
    {"gqa4_untied", 8, 2, false, 2},  // g = 4, one kv head per rank at D = 2
};

// Every model at D = world / R for R in {1, 2}: loss and every gradient against single. The
// harness's tolerance (layout_harness.h, kLayoutRtol = 1e-4 norm-wise in fp32) applies: TSP
// sums the same terms in other orders (attention over gathered keys, o_proj and MLP by shard
// rounds, dK/dV and weight gradients by reductions over the group, the online softmax over
// vocabulary shards); each f32 sum of K <= 256 terms is off by at most K·2^-24 ≈ 1.5e-5, chained
// over ~6 sub-blocks, while a wrong shard, position or scale moves a gradient by 1e-2 or more.
// At D = 1, R = 1 the harness demands bit-for-bit equality.
TEST(Tsp, MatchesSingle) {
  const int W = test::world().size();
  for (int dp : dp_choices()) {
    const int D = W / dp;
    for (const ModelCase& mc : kModels) {
      if (D > mc.max_D) continue;
      test::LayoutCase lc;
      lc.layout = "tsp";
      lc.dp = dp;
      lc.config = test::tiny_config(mc.heads, mc.kv_heads, 2, mc.tie);
      lc.B = 2 * dp;
      lc.S = 16;  // 2D | S for D <= 8
      const test::LayoutCaseResult r = test::check_layout_against_single(test::world(), lc);
      if (test::world().rank() == 0)
        std::printf("# tsp D=%d R=%d %s: loss %.9f (single %.9f), max rel err %.2e (%s)\n", D, dp,
                    mc.name, r.loss, r.ref_loss, r.max_rel_err, r.worst_param.c_str());
    }
  }
}

// Packed documents (docs/layouts.md, "Documents"): about one token in five a separator, so
// documents of a few tokens cross zigzag chunks and ranks (at D = 8 the chunks are 2 tokens), and
// the layout must equal single with the same documents (the harness's tolerance; bitwise at D = 1,
// R = 1); fp32 and bf16. A batch of one document per row (separator given, absent) equals the
// batch without documents bit for bit at every D.
TEST(Tsp, DocumentsMatchSingle) {
  const int W = test::world().size();
  for (int dp : dp_choices()) {
    for (DType dt : {DType::F32, DType::BF16}) {
      test::LayoutCase lc;
      lc.layout = "tsp";
      lc.dp = dp;
      lc.dtype = dt;
      lc.config = test::tiny_config(16, 8, 2, false);  // GQA g = 2, D up to 8
      lc.B = 2 * dp;
      lc.S = 32;
      lc.doc_sep = 5;
      const test::LayoutCaseResult r = test::check_layout_against_single(test::world(), lc);
      if (test::world().rank() == 0)
        std::printf("# tsp documents D=%d R=%d %s: loss %.9f (single %.9f), max rel err %.2e\n",
                    W / dp, dp, std::string(dtype_name(dt)).c_str(), r.loss, r.ref_loss,
                    r.max_rel_err);
    }
    test::LayoutCase one;
    one.layout = "tsp";
    one.dp = dp;
    one.config = test::tiny_config(16, 8, 2, false);
    one.B = 2 * dp;
    one.S = 32;
    test::check_one_document_is_bitwise(test::world(), one);
  }
}

// The same in bf16 mixed precision, against single in bf16: weights, K/V and the residual stream
// in bf16, gradients and reductions in fp32. The harness's kLayoutRtolBf16 (layout_harness.h:
// every sub-block output rounded to bf16 once, 6 rounded stages) applies; at D = 1, R = 1 it
// demands bit-for-bit equality with single in bf16. Overlap off on one MHA and one GQA model
// (the schedules' blocking variants; that they compute the same is OverlapOffIsBitwiseIdentical).

// Gradient accumulation with documents (layout_harness.h): the group's ranks read different
// chunks, so counted_labels needs the group's scan (find_documents); D = world and D·R = world.
TEST(Tsp, AccumulationWithDocumentsIsTheExactTokenMean) {
  const int W = test::world().size();
  for (int dp : dp_choices()) {
    test::LayoutCase lc;
    lc.layout = "tsp";
    lc.dp = dp;
    lc.config = test::tiny_config(16, 8, 2, false);
    lc.B = 2 * dp;
    lc.S = 32;
    lc.doc_sep = 5;
    if (test::world().rank() == 0) std::printf("# D=%d R=%d\n", W / dp, dp);
    test::check_accumulation_with_documents(test::world(), lc);
  }
}
TEST(Tsp, Bf16MatchesSingle) {
  const int W = test::world().size();
  for (int dp : dp_choices()) {
    const int D = W / dp;
    for (const ModelCase& mc : kModels) {
      if (D > mc.max_D) continue;
      const std::string name = mc.name;
      for (bool overlap : {true, false}) {
        if (!overlap && name != "mha_tied" && name != "gqa2_untied") continue;
        test::LayoutCase lc;
        lc.layout = "tsp";
        lc.dp = dp;
        lc.overlap = overlap;
        lc.dtype = DType::BF16;
        lc.config = test::tiny_config(mc.heads, mc.kv_heads, 2, mc.tie);
        lc.B = 2 * dp;
        lc.S = 16;
        const test::LayoutCaseResult r = test::check_layout_against_single(test::world(), lc);
        if (test::world().rank() == 0)
          std::printf(
              "# tsp bf16 D=%d R=%d %s overlap=%d: loss %.9f (single %.9f), max rel err "
              "%.2e (%s)\n",
              D, dp, mc.name, overlap ? 1 : 0, r.loss, r.ref_loss, r.max_rel_err,
              r.worst_param.c_str());
      }
    }
  }
}

// Several rows per replica and a longer sequence, so attention crosses rows and chunks and the
// MLP / loss work in more than one token chunk at D = 1 (n > block::kTokenChunkCpu = 512).
TEST(Tsp, MatchesSingleLongerRows) {
  test::LayoutCase lc;
  lc.layout = "tsp";
  lc.config = test::tiny_config(8, 4, 2, false);
  if (test::world().size() > 4) lc.config = test::tiny_config(16, 8, 2, false);
  lc.B = 3;
  lc.S = 208;  // 3·208 = 624 tokens; 208 = 16·13 splits into 2D chunks for D in {1, 2, 4, 8}
  const test::LayoutCaseResult r = test::check_layout_against_single(test::world(), lc);
  if (test::world().rank() == 0)
    std::printf("# tsp D=%d B=3 S=208: max rel err %.2e (%s)\n", test::world().size(),
                r.max_rel_err, r.worst_param.c_str());
}

// Overlap only changes WHEN transfers complete, never the arithmetic: bitwise identical loss
// and gradients with blocking transfers, in fp32 and in bf16.
TEST(Tsp, OverlapOffIsBitwiseIdentical) {
  for (DType dtype : {DType::F32, DType::BF16}) {
    for (int dp : dp_choices()) {
      for (bool tie : {false, true}) {
        const LlamaConfig c = test::tiny_config(16, 8, 2, tie);
        const Batch batch = test::random_batch(2 * dp, 16, c.vocab_size, 7);
        double loss[2];
        test::GradMap grads[2];
        for (int o = 0; o < 2; ++o) {
          std::unique_ptr<Layout> layout = make_tsp(c, dp, /*overlap=*/o == 0, dtype);
          layout->load(RandomWeights(11));
          loss[o] = layout->forward_backward(batch);
          grads[o] = test::gather_grads(*layout);
        }
        const std::string tag = fmt::format("{} dp={} tie={}", dtype_name(dtype), dp, tie);
        EXPECT_EQ(0, std::memcmp(&loss[0], &loss[1], sizeof(double)))
            << tag << ": " << loss[0] << " vs " << loss[1];
        ASSERT_EQ(grads[0].size(), grads[1].size());
        for (const auto& [name, g] : grads[0]) {
          const std::vector<float>& h = grads[1].at(name);
          ASSERT_EQ(g.size(), h.size()) << name;
          EXPECT_EQ(0, std::memcmp(g.data(), h.data(), g.size() * sizeof(float)))
              << tag << ": gradient of " << name << " differs between overlap on and off";
        }
      }
    }
  }
}

// Gradients ACCUMULATE across calls: every path that writes a gradient (the owner's direct
// contribution, the travelling accumulator, the reduced dP_r, the staged norm all-reduce, the
// tied embedding's two rings) adds to what is there.
TEST(Tsp, GradientsAccumulateAcrossCalls) {
  for (int dp : dp_choices()) {
    const LlamaConfig c = test::tiny_config(16, 8, 2, /*tie=*/true);
    std::unique_ptr<Layout> layout = make_tsp(c, dp);
    layout->load(RandomWeights(8));
    const Batch b1 = test::random_batch(2 * dp, 16, c.vocab_size, 1);
    const Batch b2 = test::random_batch(2 * dp, 16, c.vocab_size, 2);
    test::check_gradient_accumulation(*layout, b1, b2, "tsp dp=" + std::to_string(dp));
  }
}

// ---- communication, exactly --------------------------------------------------------------------

struct Bytes {
  int64_t sent = 0, received = 0;
};
Bytes bytes_of(const CommStats& s) {
  return {s.total_sent(), s.total_received()};
}

// The closed forms of docs/communication.md ("tsp"), in bytes (fp32), per rank, for one layer of
// a replica micro-batch of N tokens.
struct TspFormulas {
  int64_t D, N, h, kv, I, V, L;
  int64_t e = 4;
  int64_t A() const { return (2 * h * h + 2 * kv * h) / D; }       // packed attention shard P_r
  int64_t M() const { return 3 * I * h / D; }                      // MLP shard (gate, up, down)
  int64_t U() const { return V * h / D; }                          // vocabulary shard
  int64_t kv_gathers() const { return 2 * (D - 1) * N * kv / D; }  // K and V, D rounds
  // A broadcast's root counts its buffer once as sent, a reduce's root once as received, but
  // only when something moves (D > 1).
  int64_t A_root() const { return D > 1 ? A() : 0; }
  Bytes layer_forward() const {
    // broadcast: the owner sends its shard once, receives the D-1 others
    return {e * (A_root() + (D - 1) * M() + kv_gathers()),
            e * ((D - 1) * A() + (D - 1) * M() + kv_gathers())};
  }
  Bytes layer_backward() const {
    // broadcasts again (A sent, (D-1)A received) + reduce of dP_r to owner r ((D-1)A sent,
    // A received) + K/V re-gather + dK/dV reduce-scatter + MLP weights and gradients (D-1 hops)
    const int64_t b = e * (A_root() + D * A() - A() + 2 * kv_gathers() + 2 * (D - 1) * M());
    return {b, b};
  }
  Bytes ring(int64_t hops) const { return {e * hops * U(), e * hops * U()}; }
  Bytes embedding_forward() const { return ring(D - 1); }
  Bytes head_forward() const { return ring(D - 1); }
  // weights D-2 hops (shard p+1 is still in hand from the forward ring), accumulator D-1 hops
  Bytes head_backward() const { return ring(D == 1 ? 0 : 2 * D - 3); }
  Bytes embedding_backward() const { return ring(D - 1); }
  Bytes norms() const {
    const int64_t b = 2 * (D - 1) * ((2 * L + 1) * h * e) / D;
    return {b, b};
  }
};

void expect_bytes(const CommStats& got, Bytes want, const std::string& what) {
  EXPECT_EQ(got.total_sent(), want.sent) << what << ": bytes sent";
  EXPECT_EQ(got.total_received(), want.received) << what << ": bytes received";
}

TEST(Tsp, CommunicationEqualsFormulas) {
  for (int dp : dp_choices()) {
    for (const ModelCase& mc : kModels) {
      const int D = test::world().size() / dp;
      if (D > mc.max_D) continue;
      const LlamaConfig c = test::tiny_config(mc.heads, mc.kv_heads, 2, mc.tie);
      const int64_t B = 2 * dp, S = 16;
      const Batch batch = test::random_batch(B, S, c.vocab_size, 5);
      std::unique_ptr<Layout> layout = make_tsp(c, dp);
      layout->load(RandomWeights(3));
      const auto* report = dynamic_cast<const TspTrafficReport*>(layout.get());
      ASSERT_NE(report, nullptr) << "the tsp layout reports its traffic";
      const TspFormulas f{D,
                          B / dp * S,
                          c.hidden_size,
                          c.kv_dim(),
                          c.intermediate_size,
                          c.vocab_size,
                          c.num_hidden_layers};
      const std::string tag = fmt::format("{} D={} R={}", mc.name, D, dp);

      const CommStats g0 = layout->group().stats();
      layout->forward_backward(batch);
      const CommStats total = layout->group().stats() - g0;
      const TspTraffic& t = report->last_traffic();
      ASSERT_EQ(t.layer_forward.size(), 2u);
      // The planner's block formulas (include/tsp/plan) must agree with what moved.
      const plan::BlockComm planned =
          plan::block_comm(c, plan::LayoutSpec{"tsp", D, D, dp}, f.N, 4, /*regather_kv=*/true);
      for (int l = 0; l < 2; ++l) {
        expect_bytes(t.layer_forward[l], f.layer_forward(), tag + " layer forward");
        expect_bytes(t.layer_backward[l], f.layer_backward(), tag + " layer backward");
        EXPECT_EQ(bytes_of(t.layer_forward[l]).sent, planned.forward.sent) << tag << " planner";
        EXPECT_EQ(bytes_of(t.layer_forward[l]).received, planned.forward.received) << tag;
        EXPECT_EQ(bytes_of(t.layer_backward[l]).sent, planned.backward.sent) << tag << " planner";
        EXPECT_EQ(bytes_of(t.layer_backward[l]).received, planned.backward.received) << tag;
        // The paper's per-block forward figure (docs/communication.md) is what a rank receives.
        const int64_t g = c.gqa_group(), h = c.hidden_size, F_h2 = c.intermediate_size * h;
        EXPECT_EQ(t.layer_forward[l].total_received() * D,
                  4 * (D - 1) * ((2 * h * h + 2 * h * h / g) + 3 * F_h2 + 2 * f.N * h / g))
            << tag << ": per-block traffic (2 + 2/g)·h² + 3·F·h² + 2·N·h/g, × (D-1)/D";
      }
      expect_bytes(t.embedding_forward, f.embedding_forward(), tag + " embedding forward");
      expect_bytes(t.head_forward, f.head_forward(), tag + " head forward");
      expect_bytes(t.head_backward, f.head_backward(), tag + " head backward");
      expect_bytes(t.embedding_backward, f.embedding_backward(), tag + " embedding backward");
      expect_bytes(t.norms, f.norms(), tag + " norm gradients");
      // Nothing else moved on the group.
      CommStats parts = t.embedding_forward;
      for (int l = 0; l < 2; ++l) {
        parts += t.layer_forward[l];
        parts += t.layer_backward[l];
      }
      for (const CommStats* s :
           {&t.head_forward, &t.head_backward, &t.embedding_backward, &t.norms})
        parts += *s;
      EXPECT_EQ(total.total_sent(), parts.total_sent()) << tag;
      EXPECT_EQ(total.total_received(), parts.total_received()) << tag;
      // Weights move only by broadcast (attention) and point-to-point (rings); K/V by
      // all-gather, dK/dV by reduce-scatter, dP by reduce: one call per round each.
      if (D > 1) {
        EXPECT_EQ(t.layer_forward[0][CommOp::Broadcast].calls, D) << tag;
        EXPECT_EQ(t.layer_forward[0][CommOp::AllGather].calls, 2 * D) << tag;
        EXPECT_EQ(t.layer_backward[0][CommOp::ReduceScatter].calls, 2 * D) << tag;
        EXPECT_EQ(t.layer_backward[0][CommOp::Reduce].calls, D) << tag;
        EXPECT_EQ(t.layer_forward[0][CommOp::AllReduce].calls, 0) << tag << ": no all-reduce";
      }

      // forward(): the forward parts only.
      layout->forward(batch);
      const TspTraffic& tf = report->last_traffic();
      for (int l = 0; l < 2; ++l) {
        expect_bytes(tf.layer_forward[l], f.layer_forward(), tag + " forward() layer");
        expect_bytes(tf.layer_backward[l], {0, 0}, tag + " forward() has no backward");
      }
      expect_bytes(tf.head_forward, f.head_forward(), tag + " forward() head");
      expect_bytes(tf.head_backward, {0, 0}, tag + " forward() head backward");
    }
  }
}

// Under bf16 the compute-dtype transfers (weight broadcasts and ring hops, K/V all-gathers) move
// 2-byte elements, the F32 ones (reduce of the partial dP_r, dK/dV reduce-scatters, travelling
// gradient accumulators, the norm all-reduce) stay 4-byte: every element count is the same. So
// part by part, the bf16 record equals the f32 record minus half of the f32 bytes of its
// compute-dtype transfers, which TspFormulas names (in f32 bytes, e = 4):
//   layer forward     everything: broadcasts of P_r, the MLP ring, the K/V gathers
//   layer backward    sent: the own broadcast (A_root), the K/V re-gathers, the MLP weight hops
//                     ((D-1)·M); received: the D-1 others' broadcasts, the K/V re-gathers, the MLP
//                     weight hops (the reduce's (D-1)·A sent / A received, dK/dV and the MLP
//                     accumulators are F32)
//   embedding / head forward: the vocabulary ring (D-1 hops of weights)
//   head backward     the D-2 weight hops (the accumulator's D-1 hops are F32)
//   embedding backward, norms: nothing (accumulator and all-reduce are F32)
TEST(Tsp, Bf16TrafficHalvesComputeDtypeTransfers) {
  for (int dp : dp_choices()) {
    for (const ModelCase& mc : kModels) {
      const int D = test::world().size() / dp;
      if (D > mc.max_D) continue;
      const LlamaConfig c = test::tiny_config(mc.heads, mc.kv_heads, 2, mc.tie);
      const int64_t B = 2 * dp, S = 16;
      const Batch batch = test::random_batch(B, S, c.vocab_size, 5);
      TspTraffic rec[2];  // f32, bf16
      for (int i = 0; i < 2; ++i) {
        std::unique_ptr<Layout> layout =
            make_tsp(c, dp, /*overlap=*/true, i == 0 ? DType::F32 : DType::BF16);
        layout->load(RandomWeights(3));
        layout->forward_backward(batch);
        rec[i] = dynamic_cast<const TspTrafficReport&>(*layout).last_traffic();
      }
      const TspFormulas f{D,
                          B / dp * S,
                          c.hidden_size,
                          c.kv_dim(),
                          c.intermediate_size,
                          c.vocab_size,
                          c.num_hidden_layers};
      const int64_t e = f.e, D1 = D - 1;
      const std::string tag = fmt::format("{} D={} R={} bf16", mc.name, D, dp);
      // The f32 bytes of a part's compute-dtype transfers -> what bf16 must have recorded.
      const auto expect_half = [&](const CommStats& f32, const CommStats& bf16, Bytes compute,
                                   const std::string& part) {
        expect_bytes(
            bf16,
            {f32.total_sent() - compute.sent / 2, f32.total_received() - compute.received / 2},
            tag + " " + part);
      };
      const Bytes layer_bwd_compute{e * (f.A_root() + f.kv_gathers() + D1 * f.M()),
                                    e * (D1 * f.A() + f.kv_gathers() + D1 * f.M())};
      for (int l = 0; l < 2; ++l) {
        expect_half(rec[0].layer_forward[l], rec[1].layer_forward[l], f.layer_forward(),
                    "layer forward");
        expect_half(rec[0].layer_backward[l], rec[1].layer_backward[l], layer_bwd_compute,
                    "layer backward");
      }
      expect_half(rec[0].embedding_forward, rec[1].embedding_forward, f.ring(D1),
                  "embedding forward");
      expect_half(rec[0].head_forward, rec[1].head_forward, f.ring(D1), "head forward");
      expect_half(rec[0].head_backward, rec[1].head_backward, f.ring(D > 1 ? D - 2 : 0),
                  "head backward");
      expect_half(rec[0].embedding_backward, rec[1].embedding_backward, {0, 0},
                  "embedding backward");
      expect_half(rec[0].norms, rec[1].norms, {0, 0}, "norm gradients");
      // The f32 records themselves are the closed forms (CommunicationEqualsFormulas), so a
      // transfer that moved in the wrong dtype shows up as a difference here.
      expect_bytes(rec[0].layer_backward[0], f.layer_backward(), tag + " f32 layer backward");
    }
  }
}

// ---- the shard map, exactly ------------------------------------------------------------------

// Every element a distinct integer (exact in f32) derived from its coordinates.
class HashWeights : public WeightSource {
 public:
  static float value(int param, int64_t row, int64_t col) {
    return static_cast<float>((param * 7919 + row * 131 + col * 3) % (1 << 22));
  }
  void read_rows(const ParamSpec& s, int64_t r0, int64_t r1, TensorView dst) const override {
    const int64_t cols = s.shape.size() == 2 ? s.shape[1] : 1;
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = 0; c < cols; ++c) dst.f32()[(r - r0) * cols + c] = value(index(s), r, c);
  }
  explicit HashWeights(const std::vector<ParamSpec>& specs) : specs_(specs) {}

 private:
  int index(const ParamSpec& s) const {
    for (size_t i = 0; i < specs_.size(); ++i)
      if (specs_[i].name == s.name) return static_cast<int>(i);
    return -1;
  }
  const std::vector<ParamSpec>& specs_;
};

TEST(Tsp, ShardMapHoldsHeadGroupFfnSliceAndVocabularyShard) {
  for (bool tie : {false, true}) {
    const LlamaConfig c = test::tiny_config(16, 8, 2, tie);
    const std::vector<ParamSpec> specs = llama_param_specs(c);
    const int W = test::world().size(), D = W, p = test::world().rank();
    std::unique_ptr<Layout> layout = make_tsp(c, 1);
    layout->load(HashWeights(specs));
    const HeadGroup hg = head_group(c, D, p);
    const int64_t h = c.hidden_size, f = c.intermediate_size / D, vs = c.vocab_size / D;
    int64_t held = 0;
    for (const ParamShard& sh : layout->parameters()) {
      const ParamSpec& s = *sh.spec;
      int pi = 0;  // index in canonical order (what HashWeights hashes)
      while (specs[pi].name != s.name) ++pi;
      // Rows [r0, r1) and columns [c0, c1) of the full tensor this rank must hold.
      int64_t r0 = 0, r1 = s.shape[0], c0 = 0, c1 = s.shape.size() == 2 ? s.shape[1] : 1;
      bool replicated = false;
      switch (s.kind) {
        case ParamKind::Wq:
          r0 = hg.q_rows().begin, r1 = hg.q_rows().end;
          break;
        case ParamKind::Wk:
        case ParamKind::Wv:
          r0 = hg.kv_rows().begin, r1 = hg.kv_rows().end;
          break;
        case ParamKind::Wo:
          c0 = hg.q_rows().begin, c1 = hg.q_rows().end;
          break;
        case ParamKind::Wgate:
        case ParamKind::Wup:
          r0 = p * f, r1 = (p + 1) * f;
          break;
        case ParamKind::Wdown:
          c0 = p * f, c1 = (p + 1) * f;
          break;
        case ParamKind::Embedding:
        case ParamKind::LmHead:
          r0 = p * vs, r1 = (p + 1) * vs;
          break;
        default:
          replicated = true;  // norms
      }
      EXPECT_EQ(sh.replicated_in_group, replicated) << s.name;
      ASSERT_EQ(sh.value.numel(), (r1 - r0) * (c1 - c0)) << s.name;
      int64_t wrong = 0;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t col = c0; col < c1; ++col)
          wrong +=
              sh.value.f32()[(r - r0) * (c1 - c0) + (col - c0)] != HashWeights::value(pi, r, col);
      EXPECT_EQ(wrong, 0) << s.name << " on rank " << p;
      held += sh.value.numel();
    }
    // 1/D of every matrix, plus the replicated norms.
    const int64_t norms = (2 * c.num_hidden_layers + 1) * h;
    EXPECT_EQ(held, (c.num_parameters() - norms) / D + norms);
    // A head group's query heads read exactly its kv heads (GQA: query head j reads j / g).
    EXPECT_EQ(hg.q.begin / c.gqa_group(), hg.kv.begin);
    EXPECT_EQ(hg.q.end / c.gqa_group(), hg.kv.end);
  }
}

// ---- memory ---------------------------------------------------------------------------------

// No rank holds a whole layer's weights: its weight shards plus every transfer buffer (shards in
// flight, gradient accumulators, gathered K/V) stay below one layer's weights at their peaks.
// The bound needs D large enough that ~1/D of the model plus ~5/D of an MLP (the backward ring:
// two weight buffers, two accumulators, one local contribution) is under one layer: D = 8 here.
TEST(Tsp, NoWholeLayerInFlight) {
  const int D = test::world().size();
  if (D < 8) GTEST_SKIP() << "the bound is meaningful at D >= 8 for this model (see comment)";
  const LlamaConfig c = test::tiny_config(8, 8, 2, false);
  const int64_t h = c.hidden_size, I = c.intermediate_size;
  const int64_t layer_bytes = 4 * (2 * h * h + 2 * c.kv_dim() * h + 3 * I * h);
  const Batch batch = test::random_batch(2, 64, c.vocab_size, 1);
  std::unique_ptr<Layout> layout = make_tsp(c, 1);
  layout->load(RandomWeights(1));
  MemoryTracker::instance().reset_peaks();
  layout->forward_backward(batch);
  const MemorySnapshot m = MemoryTracker::instance().snapshot();
  const int64_t weights = m.peak[static_cast<int>(MemCategory::Weights)];
  const int64_t comm = m.peak[static_cast<int>(MemCategory::Comm)];
  EXPECT_LT(weights + comm, layer_bytes) << "weights " << weights << " + comm " << comm;
  // The largest set of transfer buffers is the MLP backward ring's: two weight shards in hand /
  // arriving, two travelling accumulators and one local contribution, each 3·I·h/D floats (the
  // attention backward holds 2 + 2 packed shards of (2h² + 2·kv·h)/D plus one head group's K/V).
  EXPECT_EQ(comm, 5 * 4 * 3 * I * h / D) << "comm peak is not the MLP backward ring's buffers";
  if (test::world().rank() == 0)
    std::printf("# tsp D=%d: weights %lld + comm %lld bytes < one layer %lld bytes\n", D,
                static_cast<long long>(weights), static_cast<long long>(comm),
                static_cast<long long>(layer_bytes));
}

// ---- errors -----------------------------------------------------------------------------------

TEST(Tsp, RejectsSplitsThatDoNotDivide) {
  const int W = test::world().size();
  if (W > 1) {
    // kv heads: 8 query heads, 1 kv head cannot be split over D >= 2.
    EXPECT_EQ(error_of([&] { make_tsp(test::tiny_config(8, 1, 2), 1); }),
              fmt::format("num_key_value_heads=1 is not divisible by D={}; use D in {{1}}", W));
    // vocabulary 129 (odd) over an even D.
    EXPECT_EQ(
        error_of([&] { make_tsp(test::tiny_config(8, 8, 2, false, 64, 128, 129), 1); }),
        fmt::format("vocab_size=129 is not divisible by D={}; use D in {{1, 3, 43, 129}} (or pad "
                    "the vocabulary to a multiple of D)",
                    W));
    // FFN width 129 over an even D.
    EXPECT_EQ(error_of([&] { make_tsp(test::tiny_config(8, 8, 2, false, 64, 129), 1); }),
              fmt::format("intermediate_size=129 is not divisible by D={}; use D in {{1, 3, 43, "
                          "129}}",
                          W));
  }
  // A sequence that cannot be cut into 2D zigzag chunks (raised before anything moves, and the
  // layout still works afterwards).
  const LlamaConfig c = test::tiny_config(8, 8, 2);
  std::unique_ptr<Layout> layout = make_tsp(c, 1);
  layout->load(RandomWeights(1));
  const int64_t S = 2 * W + 2 * (W > 1 ? 1 : 0) + (W == 1 ? 1 : 0);  // 3, 6, 10, 18
  const std::string msg = error_of([&] { layout->forward(test::random_batch(1, S, 128, 1)); });
  EXPECT_EQ(msg.rfind(fmt::format("sequence length S={} cannot be cut into 2D={} equal zigzag "
                                  "chunks; use S a multiple of {}",
                                  S, 2 * W, 2 * W),
                      0),
            0u)
      << msg;
  EXPECT_TRUE(std::isfinite(layout->forward(test::random_batch(1, 4 * W, 128, 1))));
}

}  // namespace
}  // namespace tsp
