// Memory per rank of the layouts on a long-sequence configuration, measured by the MemoryTracker
// (peak of the total over load + one forward_backward, worst rank of the group), in fp32 and in
// bf16 mixed precision: TSP keeps 1/D of the weights (unlike sp) AND 1/D of the tokens'
// activations (unlike tp), so its peak must be below both at the same D, in either dtype. Each
// rank's peak is also checked against the model of our implementation (plan::
// predict_local_memory, no optimizer state). The figures are printed for comparison with
// `tsp plan`.
// tsp-test-ranks: 4 8
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <map>

#include "mpi_test_util.h"
#include "parallel/layout_harness.h"
#include "tsp/core/memory.h"
#include "tsp/plan/measure.h"

namespace tsp {
namespace {

// The bar of tests/plan/measured_vs_predicted_mpi_test.cpp: the model counts our own tracked
// allocations (the kernels' scratch included); what it leaves out — untracked host vectors and
// the ordering of short-lived buffers inside a kernel — is far below 5%.
constexpr double kMemoryRtol = 0.05;

// Peak bytes of the total, worst rank of the group, for one layout; and this rank's snapshot.
struct Peak {
  int64_t total = 0;
  MemorySnapshot here;
  double predicted = 0;  // this rank's, bytes
};

Peak measure(const std::string& name, DType dtype, const LlamaConfig& c, const Batch& batch) {
  Communicator& world = test::world();
  ParallelConfig pc;
  pc.layout = name;
  pc.dtype = dtype;
  MemoryTracker::instance().reset_peaks();
  const int64_t base = MemoryTracker::instance().snapshot().current_total;
  MemorySnapshot s;
  plan::LayoutSpec spec;
  {
    std::unique_ptr<Layout> layout = make_layout(c, pc, world);
    spec = plan::layout_spec_of(*layout, world.size());
    layout->load(RandomWeights(7));
    layout->forward_backward(batch);
    s = MemoryTracker::instance().snapshot();
  }
  // Tensors this process held before (none expected) are not the layout's.
  const int64_t mine = s.peak_total - base;
  const double predicted =
      plan::predict_local_memory(c, spec, batch.B, batch.S, /*optimizer=*/false, dtype).total();
  EXPECT_NEAR(static_cast<double>(mine) / predicted, 1.0, kMemoryRtol)
      << name << " " << dtype_name(dtype) << " rank " << world.rank() << ": peak " << to_mb(mine)
      << " MB, predicted " << predicted / 1e6 << " MB";
  std::vector<int64_t> all(world.size());
  world.all_gather(&mine, all.data(), 1, DType::I64);
  Peak p;
  p.total = *std::max_element(all.begin(), all.end());
  p.here = s;
  p.predicted = predicted;
  return p;
}

TEST(MemoryCompare, TspPeakBelowTpAndSpOnLongSequences) {
  const int D = test::world().size();
  // h=64, 8 heads (MHA), FFN 128, V=128, L=2; one row of S=2048 tokens: activations dominate
  // the weights, as in long-context training.
  LlamaConfig c = test::tiny_config(8, 8, 2, false);
  c.max_position_embeddings = 2048;
  const Batch batch = test::random_batch(1, 2048, c.vocab_size, 3);
  for (const DType dtype : {DType::F32, DType::BF16}) {
    std::map<std::string, Peak> peak;
    for (const char* name : {"tsp", "tp", "sp"}) peak[name] = measure(name, dtype, c, batch);

    if (test::world().rank() == 0) {
      std::printf(
          "# memory per rank, D=%d, %s, h=64 L=2 S=2048 B=1 (peak of the total, worst rank)\n", D,
          std::string(dtype_name(dtype)).c_str());
      std::printf(
          "#  layout  peak_MB  weights_MB  grads_MB  act_MB  comm_MB  work_MB  model_MB  (rank 0)\n");
      for (const auto& [name, p] : peak) {
        auto mb = [&](MemCategory cat) { return to_mb(p.here.at_peak[static_cast<int>(cat)]); };
        std::printf("   %-6s  %7.3f  %10.3f  %8.3f  %6.3f  %7.3f  %7.3f  %8.3f\n", name.c_str(),
                    to_mb(p.total), mb(MemCategory::Weights), mb(MemCategory::Grads),
                    mb(MemCategory::Activations), mb(MemCategory::Comm), mb(MemCategory::Workspace),
                    p.predicted / 1e6);
      }
    }
    EXPECT_LT(peak["tsp"].total, peak["tp"].total)
        << "tsp must hold less than tp at D=" << D << " in " << dtype_name(dtype);
    EXPECT_LT(peak["tsp"].total, peak["sp"].total)
        << "tsp must hold less than sp at D=" << D << " in " << dtype_name(dtype);
  }
}

}  // namespace
}  // namespace tsp
