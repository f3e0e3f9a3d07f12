// Measured against predicted on this machine (issue 6 §4), for every registered layout at two
// configurations and in both compute dtypes (fp32, and bf16 mixed precision): the peak memory of
// one training step (forward_backward + AdamW) per rank within 5% of src/plan/measure.cpp's model
// of our implementation, and the bytes each rank sends and receives — forward() and the backward
// part of forward_backward() — exactly equal to L × plan::block_comm() plus the traffic outside
// the blocks, at the element sizes of the dtype (plan::ElemBytes).
// tsp-test-ranks: 1 2 4
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <random>

#include "mpi_test_util.h"
#include "parallel/registry.h"
#include "plan/memory_cases.h"
#include "tsp/core/memory.h"
#include "tsp/parallel/layout.h"
#include "tsp/plan/measure.h"
#include "tsp/train/optimizer.h"

namespace tsp {
namespace {

using test::Case;
using test::cases;
using test::default_tp;
using test::random_batch;

// Peak memory: the bar (within 5%). The model is of our own tracked allocations (the
// attention kernel's scratch included) and at these shapes it lands on the measured peak to the
// printed precision; what it leaves out — untracked index vectors and the ordering of
// short-lived buffers inside a kernel — is far below 5%.
constexpr double kMemoryRtol = 0.05;

TEST(MeasuredVsPredicted, MemoryAndTrafficOfEveryLayout) {
  Communicator& world = test::world();
  const int W = world.size();
  int ran = 0;
  for (const plan::Recompute mode :
       {plan::Recompute::None, plan::Recompute::Selective, plan::Recompute::Full})
    for (const DType dtype : {DType::F32, DType::BF16})
      for (const Case& k : cases()) {
        const Batch batch = random_batch(k.config, k.B, k.S);
        for (const LayoutInfo& info : registered_layouts()) {
          ParallelConfig pc;
          pc.layout = info.name;
          pc.dtype = dtype;
          pc.recompute = mode;
          pc.dp = info.name == "single" ? W : 1;  // single: pure data parallelism over the world
          if (info.name == "tp-sp") pc.tp = default_tp(W);
          if (k.B % pc.dp != 0) continue;
          std::unique_ptr<Layout> layout;
          try {
            layout = make_layout(k.config, pc, world);
          } catch (const Error& e) {
            // A degree this configuration cannot split (heads, FFN, vocabulary): not a failure here.
            if (world.rank() == 0)
              std::printf("[ skip ] %s %s %s at %d ranks: %s\n", k.name, info.name.c_str(),
                          std::string(dtype_name(dtype)).c_str(), W, e.what());
            continue;
          }
          const std::string rc(plan::recompute_name(mode));
          SCOPED_TRACE(fmt::format("{} {} {} --recompute {} world={}", k.name, info.name,
                                   dtype_name(dtype), rc, W));
          layout->load(RandomWeights(11));
          AdamW opt(*layout, AdamWConfig{});
          const plan::LayoutSpec spec = plan::layout_spec_of(*layout, W);

          MemoryTracker::instance().reset_peaks();
          const CommStats fwd =
              plan::measure_call_traffic(*layout, world, [&] { layout->forward(batch); });
          const CommStats fb =
              plan::measure_call_traffic(*layout, world, [&] { layout->forward_backward(batch); });
          opt.step(0.0, 1.0);
          const MemorySnapshot snap = MemoryTracker::instance().snapshot();

          plan::MemoryBreakdown pred;
          try {
            pred = plan::predict_local_memory(k.config, spec, k.B, k.S, true, dtype, mode);
          } catch (const Error& e) {
            // Registered but not modelled: a failure (the model must follow the layouts), and the
            // other layouts are still checked.
            ADD_FAILURE() << e.what();
            continue;
          }
          const double measured = static_cast<double>(snap.peak_total);
          std::string cats;
          for (int c = 0; c < kNumMemCategories; ++c)
            cats += fmt::format(" {} {:.3f}/{:.3f}", mem_category_name(static_cast<MemCategory>(c)),
                                to_mb(snap.at_peak[c]), pred.bytes[c] / 1e6);
          // The figures behind docs/benchmarks.md's measured-vs-predicted paragraph (rank 0).
          if (world.rank() == 0)
            std::printf(
                "[ mem  ] %-10s %-7s %-4s %-9s world=%d  peak %.3f MB  predicted %.3f MB  ratio "
                "%.4f\n",
                k.name, info.name.c_str(), std::string(dtype_name(dtype)).c_str(), rc.c_str(), W,
                to_mb(snap.peak_total), pred.total() / 1e6, measured / pred.total());
          if (world.rank() == 0 && std::getenv("TSP_TEST_VERBOSE"))
            std::printf("[ cats ] measured/predicted MB:%s\n", cats.c_str());
          EXPECT_NEAR(measured / pred.total(), 1.0, kMemoryRtol)
              << "rank " << world.rank() << " peak " << to_mb(snap.peak_total) << " MB, predicted "
              << pred.total() / 1e6 << " MB; measured/predicted MB by category:" << cats;

          const plan::StepTraffic t = plan::predict_local_traffic(
              k.config, spec, k.B, k.S, layout->group().rank(), dtype, mode);
          if (world.rank() == 0)  // the figures behind docs/cost-model.md §2.1
            std::printf(
                "[ traf ] %-10s %-7s %-4s %-9s world=%d  rank 0 sends %lld B forward, %lld B "
                "backward (predicted %lld, %lld)\n",
                k.name, info.name.c_str(), std::string(dtype_name(dtype)).c_str(), rc.c_str(), W,
                static_cast<long long>(fwd.total_sent()),
                static_cast<long long>(fb.total_sent() - fwd.total_sent()),
                static_cast<long long>(t.forward.sent), static_cast<long long>(t.backward.sent));
          EXPECT_EQ(fwd.total_sent(), t.forward.sent)
              << "forward bytes sent, rank " << world.rank();
          EXPECT_EQ(fwd.total_received(), t.forward.received)
              << "forward bytes received, rank " << world.rank();
          EXPECT_EQ(fb.total_sent() - fwd.total_sent(), t.backward.sent)
              << "backward bytes sent, rank " << world.rank();
          EXPECT_EQ(fb.total_received() - fwd.total_received(), t.backward.received)
              << "backward bytes received, rank " << world.rank();
          ++ran;
        }
      }
  EXPECT_GE(ran, 8) << "at least one layout at both configurations, dtypes and modes";
}

// ZeRO-1 (issue 13) at R = 2 and 4 replicas, every layout that has a form at D = W / R, both
// dtypes, against the same run without it:
//  - the state that lives all run (weights, gradients, moments) is exactly the model's
//    (predict_state_memory), and the optimizer's bytes per rank are exactly 1/R of --zero 0's
//    (R divides 16, so the buckets need no padding);
//  - the replica traffic is counted exactly: the backward's reduce-scatter of every bucket (fp32)
//    instead of the all-reduce, and the optimizer step's all-gather of the updated weights in the
//    compute dtype (StepTraffic::update; nothing at --zero 0);
//  - the step's peak stays within the 5% of the test above.
TEST(MeasuredVsPredicted, ZeroOneOverReplicas) {
  Communicator& world = test::world();
  const int W = world.size();
  if (W == 1) GTEST_SKIP() << "ZeRO-1 needs R > 1 replicas (this run has 1 rank)";
  const Case k = cases().front();
  const Batch batch = random_batch(k.config, k.B, k.S);
  int ran = 0;
  for (const DType dtype : {DType::F32, DType::BF16})
    for (int R = 2; R <= W; R *= 2)
      for (const LayoutInfo& info : registered_layouts()) {
        if (info.name == "single" && R != W) continue;  // single is pure data parallelism
        int64_t optimizer_bytes[2] = {0, 0};
        for (int zero : {0, 1}) {
          ParallelConfig pc;
          pc.layout = info.name;
          pc.dtype = dtype;
          pc.dp = R;
          pc.zero = zero;
          if (info.name == "tp-sp") pc.tp = default_tp(W / R);
          SCOPED_TRACE(
              fmt::format("{} {} R={} zero={} world={}", info.name, dtype_name(dtype), R, zero, W));
          const int64_t before = MemoryTracker::instance().snapshot().current_total;
          std::unique_ptr<Layout> layout = make_layout(k.config, pc, world);
          layout->load(RandomWeights(11));
          AdamW opt(*layout, AdamWConfig{});
          ASSERT_EQ(layout->zero_stage(), zero);
          const plan::LayoutSpec spec = plan::layout_spec_of(*layout, W);
          ASSERT_EQ(spec.zero, zero);

          // The state: exactly the model's, category by category.
          const MemorySnapshot held = MemoryTracker::instance().snapshot();
          const plan::MemoryBreakdown state =
              plan::predict_state_memory(k.config, spec, true, dtype);
          for (MemCategory c : {MemCategory::Weights, MemCategory::Grads, MemCategory::Optimizer})
            EXPECT_EQ(held.current[static_cast<int>(c)], static_cast<int64_t>(state[c]))
                << mem_category_name(c) << " bytes of the state, rank " << world.rank();
          EXPECT_EQ(held.current_total - before, static_cast<int64_t>(state.total()))
              << "nothing but the state is held between steps, rank " << world.rank();
          optimizer_bytes[zero] = held.current[static_cast<int>(MemCategory::Optimizer)];

          MemoryTracker::instance().reset_peaks();
          const CommStats fwd =
              plan::measure_call_traffic(*layout, world, [&] { layout->forward(batch); });
          const CommStats fb =
              plan::measure_call_traffic(*layout, world, [&] { layout->forward_backward(batch); });
          const CommStats upd =
              plan::measure_call_traffic(*layout, world, [&] { opt.step(1e-3, 1.0); });
          const MemorySnapshot snap = MemoryTracker::instance().snapshot();
          const plan::StepTraffic t =
              plan::predict_local_traffic(k.config, spec, k.B, k.S, layout->group().rank(), dtype);
          EXPECT_EQ(fwd.total_sent(), t.forward.sent) << "forward, rank " << world.rank();
          EXPECT_EQ(fb.total_sent() - fwd.total_sent(), t.backward.sent)
              << "backward bytes sent (the replica reduction included), rank " << world.rank();
          EXPECT_EQ(fb.total_received() - fwd.total_received(), t.backward.received)
              << "backward bytes received, rank " << world.rank();
          EXPECT_EQ(upd.total_sent(), t.update.sent) << "update bytes sent, rank " << world.rank();
          EXPECT_EQ(upd.total_received(), t.update.received)
              << "update bytes received, rank " << world.rank();
          if (zero == 0) {
            EXPECT_EQ(t.update.sent, 0);
          } else {
            EXPECT_GT(t.update.sent, 0);
          }
          const plan::MemoryBreakdown pred =
              plan::predict_local_memory(k.config, spec, k.B, k.S, true, dtype);
          EXPECT_NEAR(static_cast<double>(snap.peak_total) / pred.total(), 1.0, kMemoryRtol)
              << "peak " << to_mb(snap.peak_total) << " MB, predicted " << pred.total() / 1e6;
          if (world.rank() == 0)
            std::printf(
                "[ zero ] %-7s %-4s R=%d zero=%d  optimizer %.4f MB  weights %.4f MB  grads %.4f "
                "MB  peak %.3f MB (predicted %.3f)  replica update %lld B\n",
                info.name.c_str(), std::string(dtype_name(dtype)).c_str(), R, zero,
                to_mb(held.current[static_cast<int>(MemCategory::Optimizer)]),
                to_mb(held.current[static_cast<int>(MemCategory::Weights)]),
                to_mb(held.current[static_cast<int>(MemCategory::Grads)]), to_mb(snap.peak_total),
                pred.total() / 1e6, static_cast<long long>(upd.total_sent()));
          ++ran;
        }
        EXPECT_EQ(optimizer_bytes[1] * R, optimizer_bytes[0])
            << info.name << " R=" << R << ": ZeRO-1 keeps 1/R of the optimizer state";
      }
  EXPECT_GE(ran, 8);
}

}  // namespace
}  // namespace tsp
