// Activation recomputation (issue 11 item 2; docs/layouts.md, "Recomputation"): under
// --recompute full every layout keeps only each layer's input and replays the layer's forward,
// with its communication, in the backward; under --recompute none it also keeps the normed inputs
// and the MLP's gate/up/act that selective recomputes. The replay is the same arithmetic on the
// same inputs (the same weights, the same collectives on the same buffers), so it rebuilds every
// saved tensor bit for bit, and what none keeps is what selective's recomputation rebuilds (the
// same kernels on the same operands; tsp's backward ring reads each FFN shard's kept activations
// by shard, in its own order): the loss and every gradient must be BITWISE equal to selective's
// in both modes, for every layout at 1, 2 and 4 ranks, fp32 and bf16, with overlap on and off,
// under ZeRO-1 replicas and with packed documents. No layout reorders anything under full or
// none, so there is no tolerance in the bitwise checks. The replay's traffic is recorded in each
// layer's backward and equals plan::replay_comm; none moves exactly selective's bytes.
// tsp-test-ranks: 1 2 4
#include <gtest/gtest.h>

#include <cstring>

#include <fmt/format.h>

#include "mpi_test_util.h"
#include "parallel/fsdp_cp.h"
#include "parallel/layout_harness.h"
#include "parallel/registry.h"
#include "parallel/tp_sp.h"
#include "parallel/tsp.h"
#include "tsp/parallel/layout.h"
#include "tsp/plan/measure.h"

namespace tsp {
namespace {

using plan::Recompute;
using test::GradMap;

struct Case {
  std::string layout;
  int dp = 1, zero = 0;
  bool overlap = true;
  DType dtype = DType::F32;
  LlamaConfig config;
  bool documents = false;
  std::string label() const {
    return fmt::format("{} dp={} zero={} overlap={} {} L={}{}", layout, dp, zero, overlap,
                       dtype_name(dtype), config.num_hidden_layers, documents ? " documents" : "");
  }
};

struct Run {
  double loss = 0, forward_loss = 0;
  GradMap grads;  // on world rank 0
};

Run run(const Case& c, Recompute mode) {
  Communicator& world = test::world();
  ParallelConfig pc;
  pc.layout = c.layout;
  pc.dp = c.dp;
  pc.zero = c.zero;
  pc.overlap = c.overlap;
  pc.dtype = c.dtype;
  pc.recompute = mode;
  const int D = world.size() / c.dp;
  // tp-sp: two tensor ranks when the group has more than two, else all of them.
  if (c.layout == "tp-sp") pc.tp = D >= 4 ? 2 : D;
  std::unique_ptr<Layout> layout = make_layout(c.config, pc, world);
  layout->load(RandomWeights(1234));
  // S = 16 cuts into 2D zigzag chunks for D <= 8; B = 4 rows split over dp <= 4 replicas.
  Batch batch = test::random_batch(4, 16, c.config.vocab_size, 99);
  if (c.documents) test::add_documents(batch, 3, c.config.vocab_size, 99);
  Run r;
  r.loss = layout->forward_backward(batch);
  r.grads = test::gather_grads(*layout);
  r.forward_loss = layout->forward(batch);
  return r;
}

// Selective against full and none.
void expect_bitwise(const Case& c) {
  const Run sel = run(c, Recompute::Selective);
  for (const Recompute mode : {Recompute::Full, Recompute::None}) {
    const std::string label = fmt::format("{} --recompute {}", c.label(), recompute_name(mode));
    const Run other = run(c, mode);
    EXPECT_EQ(sel.loss, other.loss) << label << ": loss";
    EXPECT_EQ(sel.forward_loss, other.forward_loss) << label << ": forward() loss";
    if (test::world().rank() != 0) continue;
    ASSERT_EQ(sel.grads.size(), other.grads.size()) << label;
    for (const auto& [name, g] : sel.grads) {
      const std::vector<float>& f = other.grads.at(name);
      ASSERT_EQ(g.size(), f.size()) << label << ": " << name;
      EXPECT_EQ(0, std::memcmp(g.data(), f.data(), g.size() * sizeof(float)))
          << label << ": gradient of " << name << " differs from selective's";
    }
  }
}

// Whether the layout has a form on this world with dp replicas (single only as pure data
// parallelism, and only where every rank is a replica).
bool runs(const std::string& layout, int dp) {
  const int W = test::world().size();
  if (W % dp) return false;
  return layout != "single" || dp == W;
}

// GQA untied, three layers (a replay between two others), every sharded size divisible by 4.
LlamaConfig model() {
  return test::tiny_config(/*heads=*/8, /*kv_heads=*/4, /*layers=*/3);
}

TEST(Recompute, FullAndNoneAreBitwiseSelectiveForEveryLayout) {
  int ran = 0;
  for (const LayoutInfo& info : registered_layouts())
    for (const DType dtype : {DType::F32, DType::BF16}) {
      const int dp = info.name == "single" ? test::world().size() : 1;
      if (!runs(info.name, dp)) continue;
      Case c{info.name, dp, 0, true, dtype, model()};
      expect_bitwise(c);
      ++ran;
    }
  EXPECT_GE(ran, 12);  // six layouts, two dtypes
}

// Blocking transfers: fsdp-cp's unit schedule and tsp's rings take their other path.
TEST(Recompute, FullAndNoneAreBitwiseSelectiveWithoutOverlap) {
  for (const std::string layout : {"tsp", "fsdp-cp", "tp-sp"}) {
    Case c{layout, 1, 0, /*overlap=*/false, DType::F32, model()};
    expect_bitwise(c);
  }
}

// ZeRO-1 over two replicas (its buckets start reducing after each layer's backward, replay
// included) and packed documents (the replay reads the same document positions).
TEST(Recompute, FullAndNoneAreBitwiseSelectiveWithReplicasAndDocuments) {
  const int W = test::world().size();
  for (const LayoutInfo& info : registered_layouts()) {
    if (W >= 2 && runs(info.name, 2) && (info.name != "single" || W == 2)) {
      Case c{info.name, 2, 1, true, DType::BF16, model()};
      expect_bitwise(c);
    }
    const int dp = info.name == "single" ? W : 1;
    Case d{info.name, dp, 0, true, DType::F32, test::tiny_config(8, 8, 2, /*tie=*/true)};
    d.documents = true;
    expect_bitwise(d);
  }
}

// Gradient accumulation (repeated forward_backward without zero_grads) under full and none: the
// replay state of each call (fsdp-cp's unit schedule and saved set pointers, tp-sp's gradient
// stages) and the kept activations start afresh, so two calls add up to the sum of the two
// separate gradients (the harness's 1e-6 bound, derived there).
TEST(Recompute, FullAndNoneAccumulateOverCalls) {
  for (const Recompute mode : {Recompute::Full, Recompute::None})
    for (const std::string layout : {"tsp", "fsdp-cp", "tp-sp"}) {
      ParallelConfig pc;
      pc.layout = layout;
      pc.recompute = mode;
      const int D = test::world().size();
      if (layout == "tp-sp") pc.tp = D >= 4 ? 2 : D;
      const LlamaConfig c = model();
      std::unique_ptr<Layout> l = make_layout(c, pc, test::world());
      l->load(RandomWeights(1234));
      test::check_gradient_accumulation(
          *l, test::random_batch(4, 16, c.vocab_size, 1),
          test::random_batch(4, 16, c.vocab_size, 2),
          fmt::format("{} --recompute {}", layout, recompute_name(mode)));
    }
}

// The layouts' per-layer traffic records under full: each layer's forward record is selective's,
// and its backward record is selective's plus the replay, which is exactly plan::replay_comm (the
// layer's forward traffic again, except fsdp-cp's, whose backward gathers the layer once for both:
// its replay adds only the K/V all-gathers). Under none every record is selective's.
struct LayerRecords {
  std::vector<CommStats> forward, backward;
};
LayerRecords records_of(const Layout& layout) {
  if (const auto* t = dynamic_cast<const TspTrafficReport*>(&layout))
    return {t->last_traffic().layer_forward, t->last_traffic().layer_backward};
  if (const TpSpTraffic* t = tp_sp_traffic(layout)) return {t->layer_forward, t->layer_backward};
  if (const FsdpCpTraffic* t = fsdp_cp_traffic(layout))
    return {t->layer_forward, t->layer_backward};
  return {};
}

TEST(Recompute, ReplayTrafficIsRecordedInEachLayersBackward) {
  const int W = test::world().size();
  if (W == 1) GTEST_SKIP() << "no traffic inside a one-rank group";
  const LlamaConfig c = model();
  const Batch batch = test::random_batch(4, 16, c.vocab_size, 5);
  const Recompute modes[3] = {Recompute::Selective, Recompute::Full, Recompute::None};
  for (const std::string name : {"tp", "sp", "tp-sp", "tsp", "fsdp-cp"}) {
    LayerRecords rec[3];
    plan::LayoutSpec spec;
    for (int m = 0; m < 3; ++m) {
      ParallelConfig pc;
      pc.layout = name;
      pc.recompute = modes[m];
      if (name == "tp-sp") pc.tp = W >= 4 ? 2 : W;
      std::unique_ptr<Layout> layout = make_layout(c, pc, test::world());
      layout->load(RandomWeights(1234));
      layout->forward_backward(batch);
      rec[m] = records_of(*layout);
      spec = plan::layout_spec_of(*layout, W);
    }
    const plan::Traffic replay =
        plan::replay_comm(c, spec, batch.B * batch.S, plan::ElemBytes::of(DType::F32));
    EXPECT_GT(replay.sent, 0) << name;
    ASSERT_EQ(rec[0].backward.size(), static_cast<size_t>(c.num_hidden_layers)) << name;
    for (int m = 1; m < 3; ++m) {
      ASSERT_EQ(rec[m].backward.size(), rec[0].backward.size()) << name;
      ASSERT_EQ(rec[m].forward.size(), rec[0].forward.size()) << name;
    }
    const LayerRecords &sel = rec[0], &full = rec[1], &none = rec[2];
    for (size_t l = 0; l < sel.backward.size(); ++l) {
      const std::string at = fmt::format("{} layer {} (rank {})", name, l, test::world().rank());
      for (const LayerRecords* r : {&full, &none}) {
        EXPECT_EQ(r->forward[l].total_sent(), sel.forward[l].total_sent()) << at;
        EXPECT_EQ(r->forward[l].total_received(), sel.forward[l].total_received()) << at;
      }
      EXPECT_EQ(full.backward[l].total_sent(), sel.backward[l].total_sent() + replay.sent) << at;
      EXPECT_EQ(full.backward[l].total_received(),
                sel.backward[l].total_received() + replay.received)
          << at;
      EXPECT_EQ(none.backward[l].total_sent(), sel.backward[l].total_sent()) << at;
      EXPECT_EQ(none.backward[l].total_received(), sel.backward[l].total_received()) << at;
    }
  }
}

// What none keeps beside selective's set, measured by the allocation tracker: at the loss head
// every layer holds its normed inputs and the activations of the MLP rows it computes for its
// tokens (mlp_slices() × mlp_slice_rows(): the rank's FFN shard under tp and tp-sp, every row
// under the others; fp32 gate and up, the compute dtype elsewhere). The whole prediction, per
// layout and dtype, is tests/plan/measured_vs_predicted_mpi_test.cpp's.
TEST(Recompute, NoneKeepsTheNormedInputsAndMlpActivationsOfEveryLayer) {
  const int W = test::world().size();
  const LlamaConfig c = model();
  const Batch batch = test::random_batch(4, 16, c.vocab_size, 6);
  for (const std::string name : {"tp", "tsp", "fsdp-cp"}) {
    int64_t act_peak[2] = {0, 0};
    for (int none = 0; none < 2; ++none) {
      ParallelConfig pc;
      pc.layout = name;
      pc.dtype = DType::BF16;
      pc.recompute = none ? Recompute::None : Recompute::Selective;
      std::unique_ptr<Layout> layout = make_layout(c, pc, test::world());
      layout->load(RandomWeights(1234));
      MemoryTracker::instance().reset_peaks();
      layout->forward_backward(batch);
      act_peak[none] = MemoryTracker::instance().snapshot().peak[int(MemCategory::Activations)];
    }
    const int64_t n = batch.B * batch.S / (name == "tp" ? 1 : W), h = c.hidden_size;
    const int64_t f = c.intermediate_size / (name == "tp" ? W : 1);
    const int64_t kept = c.num_hidden_layers * (2 * 2 * n * h + (4 + 4 + 2) * n * f);
    EXPECT_EQ(act_peak[1] - act_peak[0], kept) << name << " at " << W << " ranks";
  }
}

}  // namespace
}  // namespace tsp
