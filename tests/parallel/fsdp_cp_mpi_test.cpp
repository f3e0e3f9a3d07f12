// The fsdp-cp layout: against the single reference (loss and every gradient;
// MHA, GQA and MQA, L = 2 and 3, tied and untied, with and without data
// parallelism), bitwise at D = 1, overlap on/off bit-identical, exact per-layer
// communication against the closed forms of docs/communication.md ("fsdp-cp")
// and against the planner's block_comm, the shard map with coordinate-hash
// weights, the memory bounds (at most two units gathered, every buffer freed
// after use, 1/D of the model at rest), gradient accumulation and the start-up
// errors; the same against single in bf16 mixed precision (bitwise at D = 1, bf16
// weight and K/V gathers at half the bytes, fp32 reductions). tsp-test-ranks: 1 2 4 8
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "mpi_test_util.h"
#include "parallel/fsdp_cp.h"
#include "parallel/layout_harness.h"
#include "test_util.h"
#include "tsp/core/memory.h"
#include "tsp/parallel/sharding.h"
#include "tsp/plan/cost_model.h"

namespace tsp {
namespace {

using test::error_of;

std::unique_ptr<Layout> make_fsdp(const LlamaConfig& c, int dp, bool overlap = true,
                                  Communicator& world = test::world(), DType dtype = DType::F32) {
  ParallelConfig pc;
  pc.layout = "fsdp-cp";
  pc.dp = dp;
  pc.overlap = overlap;
  pc.dtype = dtype;
  return make_layout(c, pc, world);
}

// The data-parallel degrees to try on this world: none, and 2 replicas when the
// world allows.
std::vector<int> dp_choices() {
  const int W = test::world().size();
  std::vector<int> out{1};
  if (W % 2 == 0) out.push_back(2);
  return out;
}

struct ModelCase {
  const char* name;
  int64_t heads, kv_heads, layers;
  bool tie;
};
// fsdp-cp needs D | rows of every parameter, not D | heads: MQA (one kv head,
// kv_dim 8) works at D = 8, which tp and tsp cannot do.
const ModelCase kModels[] = {
    {"mha_untied", 8, 8, 2, false},
    {"mha_tied", 8, 8, 2, true},
    {"gqa4_tied", 8, 2, 2, true},       // g = 4
    {"mqa_untied_L3", 8, 1, 3, false},  // g = 8, three layers
};

LlamaConfig model_of(const ModelCase& m) {
  return test::tiny_config(m.heads, m.kv_heads, m.layers, m.tie);
}

// ---- correctness against single -----------------------------------------------------------------

TEST(FsdpCp, MatchesSingle) {
  for (const ModelCase& m : kModels) {
    for (int dp : dp_choices()) {
      test::LayoutCase lc;
      lc.layout = "fsdp-cp";
      lc.dp = dp;
      lc.config = model_of(m);
      lc.B = 2;   // divisible by dp
      lc.S = 16;  // 2D chunks for D <= 8
      const test::LayoutCaseResult r = test::check_layout_against_single(test::world(), lc);
      if (test::world().rank() == 0)
        std::printf(
            "# fsdp-cp %s D=%d R=%d: loss %.9f (ref %.9f), max rel err "
            "%.2e (%s)\n",
            m.name, test::world().size() / dp, dp, r.loss, r.ref_loss, r.max_rel_err,
            r.worst_param.c_str());
    }
  }
}

// Packed documents crossing zigzag chunks and ranks (about one token in five a separator; at
// D = 8 the chunks are 2 tokens) equal single with the same documents, fp32 and bf16; one
// document per row equals no documents bit for bit.
TEST(FsdpCp, DocumentsMatchSingle) {
  for (int dp : dp_choices()) {
    for (DType dt : {DType::F32, DType::BF16}) {
      test::LayoutCase lc;
      lc.layout = "fsdp-cp";
      lc.dp = dp;
      lc.dtype = dt;
      lc.config = model_of(kModels[2]);  // GQA g = 4, tied
      lc.B = 2 * dp;
      lc.S = 32;
      lc.doc_sep = 5;
      test::check_layout_against_single(test::world(), lc);
    }
    test::LayoutCase one;
    one.layout = "fsdp-cp";
    one.dp = dp;
    one.config = model_of(kModels[0]);
    one.B = 2 * dp;
    one.S = 32;
    test::check_one_document_is_bitwise(test::world(), one);
  }
}

TEST(FsdpCp, BitwiseEqualToSingleAtDegreeOne) {
  // Every rank on its own (D = 1, R = 1): the harness then requires bit-for-bit
  // equality of the loss and of every gradient, whatever the world size.
  std::unique_ptr<Communicator> self = test::world().split(test::world().rank(), 0);
  for (const ModelCase& m : kModels) {
    for (bool overlap : {true, false}) {
      test::LayoutCase lc;
      lc.layout = "fsdp-cp";
      lc.overlap = overlap;
      lc.config = model_of(m);
      test::check_layout_against_single(*self, lc);
    }
  }
}

// bf16 mixed precision against single in bf16 (the harness's kLayoutRtolBf16, derived there):
// bf16 weight all-gathers, bf16 K/V, fp32 gradient reduce-scatters. Every model (MHA / GQA / MQA,
// tied and untied), with and without data parallelism, overlap on and off.
TEST(FsdpCp, MatchesSingleBf16) {
  for (const ModelCase& m : kModels) {
    for (int dp : dp_choices()) {
      for (bool overlap : {true, false}) {
        test::LayoutCase lc;
        lc.layout = "fsdp-cp";
        lc.dp = dp;
        lc.overlap = overlap;
        lc.dtype = DType::BF16;
        lc.config = model_of(m);
        const test::LayoutCaseResult r = test::check_layout_against_single(test::world(), lc);
        if (test::world().rank() == 0)
          std::printf(
              "# fsdp-cp bf16 %s D=%d R=%d overlap=%d: loss %.9f (ref %.9f), max rel err "
              "%.2e (%s)\n",
              m.name, test::world().size() / dp, dp, overlap ? 1 : 0, r.loss, r.ref_loss,
              r.max_rel_err, r.worst_param.c_str());
      }
    }
  }
}

TEST(FsdpCp, BitwiseEqualToSingleAtDegreeOneBf16) {
  // D = 1, R = 1 in bf16: the harness requires single's loss and gradients bit for bit.
  std::unique_ptr<Communicator> self = test::world().split(test::world().rank(), 0);
  for (const ModelCase& m : kModels) {
    for (bool overlap : {true, false}) {
      test::LayoutCase lc;
      lc.layout = "fsdp-cp";
      lc.overlap = overlap;
      lc.dtype = DType::BF16;
      lc.config = model_of(m);
      test::check_layout_against_single(*self, lc);
    }
  }
}

TEST(FsdpCp, LongerSequencesAndMoreRowsBf16) {
  // B = 4 rows through the K/V staging and layout swaps, in bf16.
  test::LayoutCase lc;
  lc.layout = "fsdp-cp";
  lc.config = test::tiny_config(8, 4, 2, true);
  lc.B = 4;
  lc.S = 64;
  lc.dtype = DType::BF16;
  lc.dp = test::world().size() % 2 == 0 ? 2 : 1;
  test::check_layout_against_single(test::world(), lc);
}

TEST(FsdpCp, LongerSequencesAndMoreRows) {
  // Four zigzag chunk pairs per rank row and B = 4 (several rows through the
  // per-row attention loop and the K/V layout swap).
  test::LayoutCase lc;
  lc.layout = "fsdp-cp";
  lc.config = test::tiny_config(8, 4, 2, false);
  lc.B = 4;
  lc.S = 64;
  lc.dp = test::world().size() % 2 == 0 ? 2 : 1;
  test::check_layout_against_single(test::world(), lc);
}

TEST(FsdpCp, OverlapOffIsBitIdentical) {
  // Both modes start the same non-blocking MPI calls on the same buffers
  // (overlap off waits right after each start), so summation orders are equal
  // and results identical to the bit.
  const LlamaConfig c = test::tiny_config(8, 2, 2, false);
  const Batch batch = test::random_batch(2, 16, c.vocab_size, 7);
  double loss[2];
  test::GradMap grads[2];
  int units[2];
  for (int i = 0; i < 2; ++i) {
    std::unique_ptr<Layout> layout = make_fsdp(c, 1, /*overlap=*/i == 0);
    layout->load(RandomWeights(11));
    loss[i] = layout->forward_backward(batch);
    units[i] = fsdp_cp_traffic(*layout)->max_gathered_units;
    grads[i] = test::gather_grads(*layout);
  }
  EXPECT_EQ(loss[0], loss[1]);
  EXPECT_EQ(units[0], 2) << "overlap: the unit in use and the prefetched one";
  EXPECT_EQ(units[1], 1) << "no overlap: one unit at a time";
  if (test::world().rank() != 0) return;
  ASSERT_EQ(grads[0].size(), grads[1].size());
  for (const auto& [name, g] : grads[0]) {
    const std::vector<float>& h = grads[1].at(name);
    ASSERT_EQ(g.size(), h.size()) << name;
    EXPECT_EQ(0, std::memcmp(g.data(), h.data(), g.size() * sizeof(float))) << name;
  }
}

TEST(FsdpCp, GradientsAccumulateAcrossCalls) {
  const LlamaConfig c = test::tiny_config(8, 4, 2, true);
  const int dp = dp_choices().back();
  std::unique_ptr<Layout> layout = make_fsdp(c, dp);
  layout->load(RandomWeights(8));
  const Batch b1 = test::random_batch(2, 16, c.vocab_size, 1);
  const Batch b2 = test::random_batch(2, 16, c.vocab_size, 2);
  test::check_gradient_accumulation(*layout, b1, b2, "fsdp-cp");
}

// ---- the shard map ------------------------------------------------------------------------------

// Every element of every parameter a distinct small integer (exact in f32) that
// names its parameter, row and column, so a misplaced piece cannot hide.
float coord_hash(int param, int64_t row, int64_t col) {
  return static_cast<float>((param * 7919 + row * 131 + col * 17) % 65521);
}
class CoordinateWeights : public WeightSource {
 public:
  explicit CoordinateWeights(const std::vector<ParamSpec>& specs) : specs_(specs) {}
  void read_rows(const ParamSpec& s, int64_t r0, int64_t r1, TensorView dst) const override {
    const int param = index_of(s);
    const int64_t cols = s.shape.size() > 1 ? s.shape[1] : 1;
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t j = 0; j < cols; ++j) dst.f32()[(r - r0) * cols + j] = coord_hash(param, r, j);
  }
  int index_of(const ParamSpec& s) const {
    for (size_t i = 0; i < specs_.size(); ++i)
      if (specs_[i].name == s.name) return static_cast<int>(i);
    ADD_FAILURE() << "unknown parameter " << s.name;
    return -1;
  }

 private:
  const std::vector<ParamSpec>& specs_;
};

TEST(FsdpCp, ShardsAreEqualRowPiecesOfEveryParameter) {
  for (bool tie : {false, true}) {
    const LlamaConfig c = test::tiny_config(8, 2, 2, tie);
    const std::vector<ParamSpec> specs = llama_param_specs(c);
    const CoordinateWeights src(specs);
    for (int dp : dp_choices()) {
      std::unique_ptr<Layout> layout = make_fsdp(c, dp);
      layout->load(src);
      const int D = layout->group().size(), p = layout->group().rank();
      const std::vector<ParamShard> shards = layout->parameters();
      ASSERT_EQ(shards.size(), specs.size()) << "a piece of every parameter on every rank";
      int64_t held = 0;
      for (const ParamShard& sh : shards) {
        const ParamSpec& s = *sh.spec;
        const int param = src.index_of(s);
        const int64_t rows = s.shape[0], cols = s.shape.size() > 1 ? s.shape[1] : 1;
        EXPECT_FALSE(sh.replicated_in_group) << s.name;
        ASSERT_EQ(sh.value.numel(), rows * cols / D) << s.name;
        // Piece p of the row-major flattening = rows [p·rows/D, (p+1)·rows/D).
        const int64_t r0 = p * rows / D;
        for (int64_t i = 0; i < sh.value.numel(); ++i)
          ASSERT_EQ(sh.value.f32()[i], coord_hash(param, r0 + i / cols, i % cols))
              << s.name << " element " << i << " of piece " << p << "/" << D;
        held += sh.value.numel();
      }
      EXPECT_EQ(held * D, c.num_parameters()) << "exactly 1/D of the model at rest";
      // gather() puts the pieces back in order.
      int seen = 0;
      layout->gather(false, [&](const ParamSpec& s, TensorView t) {
        const int param = src.index_of(s);
        const int64_t cols = s.shape.size() > 1 ? s.shape[1] : 1;
        for (int64_t i = 0; i < t.numel(); ++i)
          ASSERT_EQ(t.f32()[i], coord_hash(param, i / cols, i % cols)) << s.name << " " << i;
        ++seen;
      });
      if (test::world().rank() == 0) {
        EXPECT_EQ(seen, static_cast<int>(specs.size()));
      }
    }
  }
}

// ---- communication, per layer, exactly ----------------------------------------------------------

// What one record must hold: all-gather and reduce-scatter bytes (sent =
// received for both) and calls; every other operation nothing.
struct Expect {
  int64_t ag_bytes = 0, ag_calls = 0, rs_bytes = 0, rs_calls = 0;
};
void expect_traffic(const CommStats& got, const Expect& e, const std::string& what) {
  for (int i = 0; i < kNumCommOps; ++i) {
    const CommOp op = static_cast<CommOp>(i);
    const CommOpStats& s = got[op];
    int64_t bytes = 0, calls = 0;
    if (op == CommOp::AllGather) bytes = e.ag_bytes, calls = e.ag_calls;
    if (op == CommOp::ReduceScatter) bytes = e.rs_bytes, calls = e.rs_calls;
    EXPECT_EQ(s.bytes_sent, bytes) << what << ": " << comm_op_name(op) << " bytes sent";
    EXPECT_EQ(s.bytes_received, bytes) << what << ": " << comm_op_name(op) << " bytes received";
    EXPECT_EQ(s.calls, calls) << what << ": " << comm_op_name(op) << " calls";
  }
}

// The closed forms of docs/communication.md ("fsdp-cp"), per rank, in bytes
// (f32), for a replica micro-batch of N = B·S/R tokens on a group of D ranks.
// W_layer counts the layer's two norm weights with its seven matrices: FSDP
// gathers the whole layer.
struct Formulas {
  int64_t D, N, h, kv, F, V;
  bool tie;
  int64_t k() const { return D - 1; }
  int64_t w_layer() const { return 2 * h + 2 * h * h + 2 * kv * h + 3 * F * h; }
  int64_t kv_elems() const { return 2 * N * kv; }  // K and V of the whole micro-batch
  Expect layer_forward() const {                   // gather the layer + all-gather K, V
    return {4 * k() * (w_layer() / D + kv_elems() / D), 9 + 2, 0, 0};
  }
  Expect layer_backward() const {  // re-gather both, reduce-scatter dW, dK, dV
    const int64_t b = 4 * k() * (w_layer() / D + kv_elems() / D);
    return {b, 9 + 2, b, 9 + 2};
  }
  Expect embedding_forward() const { return {4 * k() * V * h / D, 1, 0, 0}; }
  Expect head_forward() const { return {4 * k() * (h + V * h) / D, 2, 0, 0}; }
  Expect head_backward() const {
    return tie ? Expect{0, 0, 4 * k() * h / D, 1} : Expect{0, 0, 4 * k() * (h + V * h) / D, 2};
  }
  Expect embedding_backward() const { return {0, 0, 4 * k() * V * h / D, 1}; }
};

TEST(FsdpCp, CommunicationPerLayerEqualsTheClosedForms) {
  for (const ModelCase& m : kModels) {
    for (int dp : dp_choices()) {
      const LlamaConfig c = model_of(m);
      const int64_t B = 4, S = 32;
      std::unique_ptr<Layout> layout = make_fsdp(c, dp);
      layout->load(RandomWeights(3));
      const int D = layout->group().size();
      const Formulas f{D,
                       B / dp * S,
                       c.hidden_size,
                       c.kv_dim(),
                       c.intermediate_size,
                       c.vocab_size,
                       c.tie_word_embeddings};
      const std::string tag = fmt::format("{} D={} R={}", m.name, D, dp);
      const Batch batch = test::random_batch(B, S, c.vocab_size, 5);

      const CommStats g0 = layout->group().stats();
      layout->forward_backward(batch);
      const CommStats step = layout->group().stats() - g0;
      const FsdpCpTraffic& t = *fsdp_cp_traffic(*layout);
      ASSERT_EQ(t.layer_forward.size(), static_cast<size_t>(c.num_hidden_layers));
      ASSERT_EQ(t.layer_backward.size(), static_cast<size_t>(c.num_hidden_layers));
      CommStats sum;
      for (int l = 0; l < c.num_hidden_layers; ++l) {
        expect_traffic(t.layer_forward[l], f.layer_forward(),
                       tag + fmt::format(" layer {} fwd", l));
        expect_traffic(t.layer_backward[l], f.layer_backward(),
                       tag + fmt::format(" layer {} bwd", l));
        sum += t.layer_forward[l];
        sum += t.layer_backward[l];
      }
      expect_traffic(t.embedding_forward, f.embedding_forward(), tag + " embedding fwd");
      expect_traffic(t.head_forward, f.head_forward(), tag + " head fwd");
      expect_traffic(t.head_backward, f.head_backward(), tag + " head bwd");
      expect_traffic(t.embedding_backward, f.embedding_backward(), tag + " embedding bwd");
      for (const CommStats* s :
           {&t.embedding_forward, &t.head_forward, &t.head_backward, &t.embedding_backward})
        sum += *s;
      // The records account for every byte the group moved in the step: nothing
      // unattributed.
      for (int i = 0; i < kNumCommOps; ++i) {
        EXPECT_EQ(sum.ops[i].bytes_sent, step.ops[i].bytes_sent) << tag << " op " << i;
        EXPECT_EQ(sum.ops[i].bytes_received, step.ops[i].bytes_received) << tag << " op " << i;
        EXPECT_EQ(sum.ops[i].calls, step.ops[i].calls) << tag << " op " << i;
      }

      // The planner's block_comm (include/tsp/plan) is the same count: the whole layer (its
      // matrices and two norms) gathered twice and reduce-scattered, K/V re-gathered.
      const plan::BlockComm pc = plan::block_comm(c, plan::LayoutSpec{"fsdp-cp", D, 1, dp}, f.N, 4);
      EXPECT_EQ(t.layer_forward[0].total_sent(), pc.forward.sent) << tag;
      EXPECT_EQ(t.layer_forward[0].total_received(), pc.forward.received) << tag;
      EXPECT_EQ(t.layer_backward[0].total_sent(), pc.backward.sent) << tag;
      EXPECT_EQ(t.layer_backward[0].total_received(), pc.backward.received) << tag;

      // forward() alone: the same forward records, no backward traffic.
      layout->forward(batch);
      const FsdpCpTraffic& tf = *fsdp_cp_traffic(*layout);
      for (int l = 0; l < c.num_hidden_layers; ++l) {
        expect_traffic(tf.layer_forward[l], f.layer_forward(), tag + " forward() fwd");
        expect_traffic(tf.layer_backward[l], Expect{}, tag + " forward() bwd");
      }
      expect_traffic(tf.head_forward, f.head_forward(), tag + " forward() head");
      expect_traffic(tf.head_backward, Expect{}, tag + " forward() head bwd");
      expect_traffic(tf.embedding_backward, Expect{}, tag + " forward() embedding bwd");
    }
  }
}

// bf16: the same transfers with the same element counts, but a gathered element (a weight of the
// compute copy, a key or value) is 2 bytes instead of 4, and every reduce-scatter (weight
// gradients, dK/dV) still moves fp32. So from the closed forms above (written for 4-byte
// elements): all-gather bytes are halved, reduce-scatter bytes and every call count unchanged.
Expect bf16_of(const Expect& f32) {
  return {f32.ag_bytes / 2, f32.ag_calls, f32.rs_bytes, f32.rs_calls};
}

TEST(FsdpCp, Bf16HalvesGathersAndKeepsReductionsFp32) {
  for (const ModelCase& m : kModels) {
    for (int dp : dp_choices()) {
      const LlamaConfig c = model_of(m);
      const int64_t B = 4, S = 32;
      const Batch batch = test::random_batch(B, S, c.vocab_size, 5);
      std::unique_ptr<Layout> f32 = make_fsdp(c, dp, true, test::world(), DType::F32);
      std::unique_ptr<Layout> bf16 = make_fsdp(c, dp, true, test::world(), DType::BF16);
      f32->load(RandomWeights(3));
      bf16->load(RandomWeights(3));
      const int D = bf16->group().size();
      const Formulas f{D,
                       B / dp * S,
                       c.hidden_size,
                       c.kv_dim(),
                       c.intermediate_size,
                       c.vocab_size,
                       c.tie_word_embeddings};
      const std::string tag = fmt::format("bf16 {} D={} R={}", m.name, D, dp);
      f32->forward_backward(batch);
      const CommStats g0 = bf16->group().stats();
      bf16->forward_backward(batch);
      const CommStats step = bf16->group().stats() - g0;
      const FsdpCpTraffic& t = *fsdp_cp_traffic(*bf16);
      const FsdpCpTraffic& t32 = *fsdp_cp_traffic(*f32);
      ASSERT_EQ(t.layer_forward.size(), static_cast<size_t>(c.num_hidden_layers));
      ASSERT_EQ(t.layer_backward.size(), static_cast<size_t>(c.num_hidden_layers));
      CommStats sum;
      for (int l = 0; l < c.num_hidden_layers; ++l) {
        expect_traffic(t.layer_forward[l], bf16_of(f.layer_forward()),
                       tag + fmt::format(" layer {} fwd", l));
        expect_traffic(t.layer_backward[l], bf16_of(f.layer_backward()),
                       tag + fmt::format(" layer {} bwd", l));
        // The same relation measured against the f32 layout's own records.
        const CommStats* pairs[2][2] = {{&t.layer_forward[l], &t32.layer_forward[l]},
                                        {&t.layer_backward[l], &t32.layer_backward[l]}};
        for (auto& [b, w] : pairs) {
          EXPECT_EQ((*b)[CommOp::AllGather].bytes_sent * 2, (*w)[CommOp::AllGather].bytes_sent)
              << tag << " layer " << l;
          EXPECT_EQ((*b)[CommOp::ReduceScatter].bytes_sent, (*w)[CommOp::ReduceScatter].bytes_sent)
              << tag << " layer " << l;
        }
        sum += t.layer_forward[l];
        sum += t.layer_backward[l];
      }
      expect_traffic(t.embedding_forward, bf16_of(f.embedding_forward()), tag + " embedding fwd");
      expect_traffic(t.head_forward, bf16_of(f.head_forward()), tag + " head fwd");
      expect_traffic(t.head_backward, bf16_of(f.head_backward()), tag + " head bwd");
      expect_traffic(t.embedding_backward, bf16_of(f.embedding_backward()), tag + " embedding bwd");
      for (const CommStats* s :
           {&t.embedding_forward, &t.head_forward, &t.head_backward, &t.embedding_backward})
        sum += *s;
      // Nothing unattributed in bf16 either.
      for (int i = 0; i < kNumCommOps; ++i) {
        EXPECT_EQ(sum.ops[i].bytes_sent, step.ops[i].bytes_sent) << tag << " op " << i;
        EXPECT_EQ(sum.ops[i].bytes_received, step.ops[i].bytes_received) << tag << " op " << i;
        EXPECT_EQ(sum.ops[i].calls, step.ops[i].calls) << tag << " op " << i;
      }
      EXPECT_EQ(t.max_gathered_units, 2) << tag;
      // The planner's block_comm in bf16 is the same count.
      const plan::BlockComm pc =
          plan::block_comm(c, plan::LayoutSpec{"fsdp-cp", D, 1, dp}, f.N, DType::BF16);
      EXPECT_EQ(t.layer_forward[0].total_sent(), pc.forward.sent) << tag;
      EXPECT_EQ(t.layer_forward[0].total_received(), pc.forward.received) << tag;
      EXPECT_EQ(t.layer_backward[0].total_sent(), pc.backward.sent) << tag;
      EXPECT_EQ(t.layer_backward[0].total_received(), pc.backward.received) << tag;
    }
  }
}

// ---- memory -------------------------------------------------------------------------------------

TEST(FsdpCp, GathersAtMostTwoUnitsAndFreesThemAfterUse) {
  // MHA, h=64, F=128, V=128: a layer (41,088 floats) is the largest unit (head
  // 8,256).
  const int64_t B = 2, S = 16;
  int64_t peak_fb[2] = {0, 0};
  for (int Li = 0; Li < 2; ++Li) {
    const LlamaConfig c = test::tiny_config(8, 8, Li == 0 ? 3 : 5, false);
    const int64_t h = c.hidden_size, F = c.intermediate_size, kv = c.kv_dim();
    const int64_t layer = 2 * h + 2 * h * h + 2 * kv * h + 3 * F * h;
    const int64_t pad = 9 * 15;  // each full tensor starts 64-byte aligned in a unit buffer
    const Batch batch = test::random_batch(B, S, c.vocab_size, 2);
    for (bool overlap : {true, false}) {
      MemoryTracker& mt = MemoryTracker::instance();
      const int64_t w0 = mt.snapshot().current[static_cast<int>(MemCategory::Weights)];
      std::unique_ptr<Layout> layout = make_fsdp(c, 1, overlap);
      const int D = layout->group().size();
      // At rest: 1/D of every parameter (plus at most 15 floats of alignment
      // per shard).
      const int64_t at_rest = mt.snapshot().current[static_cast<int>(MemCategory::Weights)] - w0;
      const int64_t nparams = static_cast<int64_t>(llama_param_specs(c).size());
      EXPECT_GE(at_rest, 4 * c.num_parameters() / D);
      EXPECT_LE(at_rest, 4 * (c.num_parameters() / D + 15 * nparams));
      layout->load(RandomWeights(1));

      const int64_t comm0 = mt.snapshot().current[static_cast<int>(MemCategory::Comm)];
      mt.reset_peaks();
      layout->forward(batch);
      const MemorySnapshot m = mt.snapshot();
      const int64_t peak = m.peak[static_cast<int>(MemCategory::Comm)] - comm0;
      EXPECT_EQ(m.current[static_cast<int>(MemCategory::Comm)], comm0) << "all freed after use";
      // Gathered units (two with prefetch, one without) plus the K/V receive
      // buffers [D, B, S/D, kv].
      const int units = overlap ? 2 : 1;
      EXPECT_LE(peak, 4 * (units * (layer + pad) + 2 * B * S * kv)) << "overlap=" << overlap;
      EXPECT_GE(peak, 4 * units * layer) << "overlap=" << overlap;
      EXPECT_EQ(fsdp_cp_traffic(*layout)->max_gathered_units, units);

      mt.reset_peaks();
      layout->forward_backward(batch);
      EXPECT_EQ(mt.snapshot().current[static_cast<int>(MemCategory::Comm)], comm0);
      EXPECT_EQ(fsdp_cp_traffic(*layout)->max_gathered_units, units);
      if (overlap) peak_fb[Li] = mt.snapshot().peak[static_cast<int>(MemCategory::Comm)] - comm0;
    }
  }
  // Gathered weights and full-size gradients live per layer: the peak does not
  // grow with L (L=3 already has a middle layer, the steady state: two layers'
  // weights, two layers' gradients).
  EXPECT_EQ(peak_fb[0], peak_fb[1]) << "L=3 vs L=5";
}

// ---- errors -------------------------------------------------------------------------------------

TEST(FsdpCp, RejectsShapesThatDoNotSplit) {
  const int W = test::world().size();
  if (W == 1) GTEST_SKIP() << "every shape splits into one piece";
  // vocab 125 is odd: no D >= 2 cuts the embedding into equal row pieces; the
  // common divisor of every parameter's rows (64, 64, 128, 125) is 1.
  const LlamaConfig odd_vocab = test::tiny_config(8, 8, 2, false, 64, 128, 125);
  EXPECT_EQ(error_of([&] { make_fsdp(odd_vocab, 1); }),
            fmt::format("fsdp-cp cuts every parameter into D={} equal pieces of rows, but "
                        "model.embed_tokens.weight has 125 rows; use D in {{1}} (the common "
                        "divisors of hidden_size, num_key_value_heads·head_dim, "
                        "intermediate_size and vocab_size)",
                        W));
  // FFN 100 (common divisor of 64, 64, 100, 128 is 4): fine at D = 4, rejected
  // at D = 8 with the degrees that work.
  if (W >= 4) {
    const LlamaConfig ffn100 = test::tiny_config(8, 8, 2, false, 64, 100, 128);
    const std::string e = error_of([&] { make_fsdp(ffn100, 1); });
    if (W == 8)
      EXPECT_NE(e.find("but model.layers.0.mlp.gate_proj.weight has 100 rows; "
                       "use D in {1, 2, 4} "),
                std::string::npos)
          << e;
    else
      EXPECT_EQ(e, "(no error)") << "100 rows split into 4 pieces";
  }
  // A sequence that does not cut into 2D zigzag chunks is rejected by forward,
  // and the layout still works afterwards (no collective was left half-done).
  const LlamaConfig c = test::tiny_config();
  std::unique_ptr<Layout> layout = make_fsdp(c, 1);
  layout->load(RandomWeights(1));
  const Batch bad = test::random_batch(2, 2 * W + W, c.vocab_size,
                                       1);  // 3W: not a multiple of 2W
  const std::string e = error_of([&] { layout->forward(bad); });
  EXPECT_NE(e.find(fmt::format("cannot be cut into 2D={} equal zigzag chunks", 2 * W)),
            std::string::npos)
      << e;
  EXPECT_TRUE(std::isfinite(layout->forward(test::random_batch(2, 16, c.vocab_size, 1))));
}

TEST(FsdpCp, IsRegisteredAndReportsTraffic) {
  const LlamaConfig c = test::tiny_config();
  std::unique_ptr<Layout> layout = make_fsdp(c, 1);
  EXPECT_EQ(layout->name(), "fsdp-cp");
  ASSERT_NE(fsdp_cp_traffic(*layout), nullptr);
  ParallelConfig pc;
  pc.dp = test::world().size();
  std::unique_ptr<Layout> single = make_layout(c, pc, test::world());
  EXPECT_EQ(fsdp_cp_traffic(*single), nullptr);
}

}  // namespace
}  // namespace tsp
