// ZeRO-1 over the data-parallel replicas (issue 13; docs/layouts.md, "Data parallelism and
// ZeRO-1"): every layout with the optimizer state partitioned over R = 2 and 4 replicas computes
// single's loss and gradients (the harness's fp32 and bf16 bounds); at R = 2 its gradients, its
// update and the loss after it are bit-identical to the all-reduce's (--zero 0), since a sum of
// two terms does not depend on the order; gradient accumulation over micro-batches adds up; and
// the optimizer's parameters are the replica's parts, covering every element exactly once; the
// update's all-gathers, left in flight for the next forward, give the blocking schedule's (and at
// R = 2 --zero 0's) losses, gradients and weights bit for bit over several steps, and a layout
// destroyed with them in flight (normally or while an exception unwinds) neither hangs nor breaks
// the world.
// tsp-test-ranks: 2 4
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <map>

#include "mpi_test_util.h"
#include "parallel/layout_harness.h"
#include "parallel/registry.h"
#include "tsp/comm/mpi.h"
#include "tsp/parallel/layout.h"
#include "tsp/train/optimizer.h"

namespace tsp {
namespace {

using test::GradMap;

// The replica counts of this world, and whether `layout` has a form with D = W / R there.
std::vector<int> replica_choices() {
  const int W = test::world().size();
  std::vector<int> out;
  for (int R = 2; R <= W; R *= 2)
    if (W % R == 0) out.push_back(R);
  return out;
}
bool runs_at(const std::string& layout, int R) {
  return layout != "single" || R == test::world().size();  // single is pure data parallelism
}

// MHA untied and GQA tied; every sharded size divides by 4.
std::vector<LlamaConfig> models() {
  return {test::tiny_config(8, 8, 2, false), test::tiny_config(8, 4, 2, true)};
}

// overlap false: --no-overlap (under ZeRO-1, the blocking all-gather after the update).
std::unique_ptr<Layout> build(const std::string& name, int R, int zero, DType dtype,
                              const LlamaConfig& c, bool overlap = true) {
  ParallelConfig pc;
  pc.layout = name;
  pc.dp = R;
  pc.zero = zero;
  pc.dtype = dtype;
  pc.overlap = overlap;
  std::unique_ptr<Layout> layout = make_layout(c, pc, test::world());
  layout->load(RandomWeights(1234));
  return layout;
}

GradMap gather_values(Layout& layout) {
  GradMap out;
  layout.gather(false, [&](const ParamSpec& s, TensorView t) {
    out[s.name].assign(t.f32(), t.f32() + t.numel());
  });
  return out;
}

void expect_bitwise(const GradMap& a, const GradMap& b, const std::string& what) {
  if (test::world().rank() != 0) return;  // gather delivers on world rank 0
  ASSERT_EQ(a.size(), b.size()) << what;
  for (const auto& [name, x] : a) {
    const std::vector<float>& y = b.at(name);
    ASSERT_EQ(x.size(), y.size()) << what << ": " << name;
    EXPECT_EQ(0, std::memcmp(x.data(), y.data(), x.size() * sizeof(float)))
        << what << ": " << name << " differs";
  }
}

// Loss and every gradient against single (the harness), fp32 and bf16.
TEST(Zero, EveryLayoutMatchesSingle) {
  int ran = 0;
  for (int R : replica_choices())
    for (const LayoutInfo& info : registered_layouts())
      for (const DType dtype : {DType::F32, DType::BF16}) {
        if (!runs_at(info.name, R)) continue;
        test::LayoutCase lc;
        lc.layout = info.name;
        lc.dp = R;
        lc.zero = 1;
        lc.dtype = dtype;
        lc.config = test::tiny_config(8, 4, 2, false);
        lc.B = 2 * R;
        lc.S = 16;  // 2D | S for D <= 8
        const test::LayoutCaseResult r = test::check_layout_against_single(test::world(), lc);
        if (test::world().rank() == 0)
          std::printf("# zero-1 %-7s R=%d %-4s: loss %.9f (single %.9f), max rel err %.2e (%s)\n",
                      info.name.c_str(), R, std::string(dtype_name(dtype)).c_str(), r.loss,
                      r.ref_loss, r.max_rel_err, r.worst_param.c_str());
        ++ran;
      }
  EXPECT_GE(ran, 10);
}

// At R = 2, --zero 1 and --zero 0 give the same bits: the reduced gradients (a + b either way),
// the AdamW update of each element from them, the weights the replicas gather, and the next loss.
TEST(Zero, TwoReplicasEqualAllReduceBitForBit) {
  const int W = test::world().size();
  if (W % 2 != 0) GTEST_SKIP() << "needs an even world";
  int ran = 0;
  for (const LlamaConfig& c : models())
    for (const LayoutInfo& info : registered_layouts())
      for (const DType dtype : {DType::F32, DType::BF16}) {
        if (!runs_at(info.name, 2)) continue;
        SCOPED_TRACE(
            fmt::format("{} {} tied={}", info.name, dtype_name(dtype), c.tie_word_embeddings));
        const Batch first = test::random_batch(4, 16, c.vocab_size, 5);
        const Batch second = test::random_batch(4, 16, c.vocab_size, 6);
        double loss[2][2];
        GradMap grads[2], values[2];
        for (int zero : {0, 1}) {
          std::unique_ptr<Layout> layout = build(info.name, 2, zero, dtype, c);
          ASSERT_EQ(layout->zero_stage(), zero);
          AdamW opt(*layout, AdamWConfig{});
          loss[zero][0] = layout->forward_backward(first);
          grads[zero] = test::gather_grads(*layout);
          opt.step(1e-2, 1.0);
          values[zero] = gather_values(*layout);
          layout->zero_grads();
          loss[zero][1] = layout->forward_backward(second);
        }
        EXPECT_EQ(loss[0][0], loss[1][0]);
        expect_bitwise(grads[0], grads[1], "gradients");
        expect_bitwise(values[0], values[1], "weights after one update");
        EXPECT_EQ(loss[0][1], loss[1][1]) << "the loss after the update";
        ++ran;
      }
  EXPECT_GE(ran, 10);
}

// One training run: its losses, gradients and weights, and how many of the replicas' requests
// each update left in flight.
struct TrainRun {
  std::vector<double> losses;      // forward_backward of each step, then forward after the last
  std::vector<GradMap> grads;      // after each step's forward_backward
  GradMap values;                  // after the last update
  std::vector<int64_t> in_flight;  // replicas' requests pending right after each update
};

// Three steps (zero_grads, forward_backward, AdamW), then a second update with no forward
// between (the first one's gathers must be over before the master parts change), a forward
// alone (validation's path), and the weights gathered. Nothing reads the weights between an
// update and the next forward, so under the prefetched schedule every bucket's gather is still in
// flight when the forward reaches it (the gradients are gathered after forward_backward, when
// the forward has waited for every bucket).
TrainRun train_run(const std::string& name, int R, int zero, bool overlap, DType dtype,
                   const LlamaConfig& c) {
  std::unique_ptr<Layout> layout = build(name, R, zero, dtype, c, overlap);
  AdamW opt(*layout, AdamWConfig{});
  TrainRun run;
  const int64_t B = 2 * R;
  for (int step = 0; step < 3; ++step) {
    layout->zero_grads();
    run.losses.push_back(
        layout->forward_backward(test::random_batch(B, 16, c.vocab_size, 20 + step)));
    run.grads.push_back(test::gather_grads(*layout));
    opt.step(1e-2, 1.0);
    run.in_flight.push_back(pending_requests(layout->replicas()));
  }
  opt.step(1e-2, 1.0);
  run.in_flight.push_back(pending_requests(layout->replicas()));
  run.losses.push_back(layout->forward(test::random_batch(B, 16, c.vocab_size, 30)));
  run.values = gather_values(*layout);
  return run;
}

void expect_same_run(const TrainRun& a, const TrainRun& b, const std::string& what) {
  ASSERT_EQ(a.losses.size(), b.losses.size());
  for (size_t i = 0; i < a.losses.size(); ++i)
    EXPECT_EQ(a.losses[i], b.losses[i]) << what << ": loss " << i;  // exact: identical on ranks
  for (size_t i = 0; i < a.grads.size(); ++i)
    expect_bitwise(a.grads[i], b.grads[i], fmt::format("{}: gradients of step {}", what, i));
  expect_bitwise(a.values, b.values, what + ": weights after the last update");
}

// The post-update all-gathers of ZeRO-1 are left in flight and waited for bucket by bucket in
// the next forward (ShardStore::sync_compute, LayoutCommon::run); only the waiting moves, so
// every loss, gradient and weight over several steps equals the blocking schedule's
// (--no-overlap: sync_compute's gathers waited for before parameters_updated returns) bit for
// bit, and at R = 2 also --zero 0's (the sum of two terms has one order). Every layout, fp32 and
// bf16, R = 2 and 4 (single: R = the world). in_flight checks that the schedule under test
// really leaves one gather per bucket pending (the layers, and the end bucket) and the blocking
// one none.
TEST(Zero, PrefetchedWeightGatherIsBitwiseOverSteps) {
  const LlamaConfig c = test::tiny_config(8, 4, 3, false);
  const int64_t buckets = c.num_hidden_layers + 1;
  int ran = 0;
  for (int R : replica_choices())
    for (const LayoutInfo& info : registered_layouts())
      for (const DType dtype : {DType::F32, DType::BF16}) {
        if (!runs_at(info.name, R)) continue;
        const std::string what = fmt::format("{} R={} {}", info.name, R, dtype_name(dtype));
        SCOPED_TRACE(what);
        const TrainRun prefetched = train_run(info.name, R, 1, /*overlap=*/true, dtype, c);
        const TrainRun blocking = train_run(info.name, R, 1, /*overlap=*/false, dtype, c);
        for (int64_t n : prefetched.in_flight) EXPECT_EQ(n, buckets) << "gathers left in flight";
        for (int64_t n : blocking.in_flight) EXPECT_EQ(n, 0) << "the blocking schedule waits";
        expect_same_run(prefetched, blocking, what + " against the blocking schedule");
        if (R == 2) {
          const TrainRun all_reduce = train_run(info.name, R, 0, /*overlap=*/true, dtype, c);
          expect_same_run(prefetched, all_reduce, what + " against --zero 0");
        }
        ++ran;
      }
  EXPECT_GE(ran, 10);
}

// No exit path hangs or leaves a transfer writing freed memory: a layout destroyed with its
// gathers in flight waits for them, and one destroyed while an exception unwinds (every rank
// throws here) lets them go and keeps their slab (ShardStore::settle_gathers); the world goes on
// working afterwards, and a fresh layout trains.
TEST(Zero, DestroyedWithGathersInFlight) {
  const LlamaConfig c = test::tiny_config(8, 4, 2, false);
  const int W = test::world().size();
  const Batch batch = test::random_batch(2 * W, 16, c.vocab_size, 9);
  auto updated = [&] {
    std::unique_ptr<Layout> layout = build("fsdp-cp", W, 1, DType::BF16, c);
    AdamW opt(*layout, AdamWConfig{});
    layout->forward_backward(batch);
    opt.step(1e-2, 1.0);
    EXPECT_GT(pending_requests(layout->replicas()), 0);
    return layout;
  };
  updated().reset();  // waits
  try {
    std::unique_ptr<Layout> layout = updated();
    throw Error("an error with the weights' all-gathers in flight");
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("in flight"), std::string::npos);
  }
  EXPECT_EQ(test::world().sum_host(1.0), static_cast<double>(W));
  const double loss = build("fsdp-cp", W, 1, DType::BF16, c)->forward_backward(batch);
  EXPECT_TRUE(std::isfinite(loss));
}

// Two forward_backward calls without zero_grads accumulate: the partition's gradient is the sum
// of both micro-batches' reduced gradients, equal to --zero 0's accumulation to fp32 rounding
// (which scales by 1/R and re-adds, another order), and to single's.
TEST(Zero, AccumulatesOverMicroBatches) {
  const LlamaConfig c = test::tiny_config(8, 4, 2, false);
  const Batch a = test::random_batch(4, 16, c.vocab_size, 7);
  const Batch b = test::random_batch(4, 16, c.vocab_size, 8);
  for (int R : replica_choices())
    for (const char* name : {"tsp", "fsdp-cp", "tp"}) {
      SCOPED_TRACE(fmt::format("{} R={}", name, R));
      std::unique_ptr<Layout> zero = build(name, R, 1, DType::F32, c);
      zero->forward_backward(a);
      zero->forward_backward(b);
      const GradMap got = test::gather_grads(*zero);
      std::unique_ptr<Communicator> self = test::world().split(test::world().rank(), 0);
      ParallelConfig ref_pc;
      std::unique_ptr<Layout> ref = make_layout(c, ref_pc, *self);
      ref->load(RandomWeights(1234));
      ref->forward_backward(a);
      ref->forward_backward(b);
      const GradMap want = test::gather_grads(*ref);
      if (test::world().rank() != 0) continue;
      for (const auto& [param, w] : want) {
        const std::vector<float>& g = got.at(param);
        EXPECT_LE(test::norm_rel_err(g.data(), w.data(), static_cast<int64_t>(g.size())),
                  test::kLayoutRtol)
            << param;
      }
    }
}

// The optimizer's parameters under ZeRO-1 are this replica's parts: over the replicas they cover
// every element of every shard once (sizes add up to the shards'), each replica holds about 1/R,
// and each part carries the store's moments.
TEST(Zero, PartsCoverEveryElementOnce) {
  const LlamaConfig c = test::tiny_config(8, 4, 2, false);
  for (int R : replica_choices())
    for (const char* name : {"tsp", "fsdp-cp", "tp-sp"}) {
      if (!runs_at(name, R)) continue;
      SCOPED_TRACE(fmt::format("{} R={}", name, R));
      std::unique_ptr<Layout> whole = build(name, R, 0, DType::BF16, c);
      std::unique_ptr<Layout> parts = build(name, R, 1, DType::BF16, c);
      std::map<std::string, int64_t> held, owned;
      for (const ParamShard& s : whole->parameters()) {
        EXPECT_FALSE(s.partitioned_over_replicas);
        held[s.spec->name] += s.value.numel();
      }
      for (const ParamShard& s : parts->parameters()) {
        EXPECT_TRUE(s.partitioned_over_replicas);
        EXPECT_EQ(s.exp_avg.numel(), s.value.numel());
        EXPECT_EQ(s.exp_avg_sq.numel(), s.value.numel());
        EXPECT_EQ(s.grad.numel(), s.value.numel());
        owned[s.spec->name] += s.value.numel();
      }
      // Summed over the replicas (the ranks with this group rank), each shard exactly once.
      int64_t mine = 0, all_held = 0;
      for (const auto& [param, n] : held) {
        const int64_t total = parts->replicas().sum_host(static_cast<double>(owned[param]));
        EXPECT_EQ(total, n) << param;
        mine += owned[param];
        all_held += n;
      }
      // Each replica owns R equal parts of every bucket, so about 1/R (padding aside).
      EXPECT_NEAR(static_cast<double>(mine) * R / static_cast<double>(all_held), 1.0, 0.1);
    }
}

}  // namespace
}  // namespace tsp
