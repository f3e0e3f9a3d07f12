// Cost model (docs/cost-model.md): the paper's published figures, the communication formulas and
// the consistency rules every layout must obey.
#include "tsp/plan/cost_model.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <map>
#include <set>

#include "parallel/registry.h"
#include "plan/model_util.h"
#include "tsp/core/error.h"
#include "tsp/plan/layout_model.h"
#include "tsp/plan/measure.h"

namespace tsp::plan {
namespace {

Workload paper(Mode mode) {
  Workload w;
  w.model = llama_preset("7b");  // h=4096, L=32, 32/32 heads, SwiGLU 16384, V=32000
  w.B = 1;
  w.S = 131072;
  w.mode = mode;
  return w;
}

double total_gb(const Workload& w, const LayoutSpec& l) {
  return estimate(w, l, hardware_profile("mi300x")).memory.total() / 1e9;
}

// Section 4 of the issue: peak memory per GPU on one node of 8 MI300X, 128K tokens, B=1, with the
// one assumption set of docs/cost-model.md §3.4 (the default MemoryAssumptions: 20 bytes/param of
// model state, a 6 GB framework overhead, full recomputation, gathered K/V kept by sp-family
// layouts in the replayed layer, DDP bucket copy of all-reduced gradients). The 10% band is the
// issue's acceptance criterion: the published figures are measured peaks that a closed-form model
// only approximates. (Until issue 11 the set was ZeRO's 16 bytes/param with attention-boundary
// checkpointing: within 10% at 128K too, but with a curve against S much steeper than the paper's;
// CostModelCurve below is the test that tells the two apart.)
TEST(CostModelPaper, PeakMemoryPerGpu) {
  const Workload w = paper(Mode::Train);
  struct Case {
    LayoutSpec l;
    double published_gb;
  };
  // Which TP+SP factorization is which: the model gives T=4,Σ=2 ≈ 87 GB and T=2,Σ=4 ≈ 136 GB
  // (more T shards more model state, which dominates); the reverse mapping would be off by >35%.
  const Case cases[] = {{{"tsp", 8, 1, 1}, 38.8},
                        {{"tp", 8, 8, 1}, 70.0},
                        {{"tp-sp", 8, 4, 1}, 85.0},
                        {{"tp-sp", 8, 2, 1}, 140.0}};
  for (const Case& c : cases) {
    const double gb = total_gb(w, c.l);
    std::printf("%-16s model %6.1f GB  published %6.1f GB  (%+.1f%%)\n", c.l.label().c_str(), gb,
                c.published_gb, 100 * (gb / c.published_gb - 1));
    EXPECT_NEAR(gb, c.published_gb, 0.10 * c.published_gb) << c.l.label();
  }
  EXPECT_GT(std::abs(total_gb(w, {"tp-sp", 8, 4, 1}) / 140.0 - 1), 0.10);
  EXPECT_GT(std::abs(total_gb(w, {"tp-sp", 8, 2, 1}) / 85.0 - 1), 0.10);
}

// 1,024 MI300X, 128K, D=8: TSP (8 GPUs of a node, R=128) against matched TP+SP (the same per-GPU
// sharding of weights and tokens, 1/8 each: T=8 in a node x Σ=8 across nodes, R=16). The
// published ratio (173M/66.3M = 2.6; Zyphra also quotes >2x) is read as forward throughput
// (docs/cost-model.md §4.3), i.e. our prefill.
TEST(CostModelPaper, ThroughputRatioMatchedTpSp) {
  const Hardware hw = hardware_profile("mi300x");
  const Workload w = paper(Mode::Prefill);
  const Estimate tsp = estimate(w, {"tsp", 8, 1, 128}, hw);
  const Estimate tpsp = estimate(w, {"tp-sp", 64, 8, 16}, hw);
  const double ratio = tsp.tokens_per_s / tpsp.tokens_per_s;
  std::printf("prefill tokens/s: tsp %.3g, tp-sp T=8 S=8 %.3g, ratio %.2f\n", tsp.tokens_per_s,
              tpsp.tokens_per_s, ratio);
  EXPECT_GE(ratio, 2.0);
  EXPECT_LE(ratio, 2.6);
  // Where the gain comes from: TSP's transfers hide behind its compute; TP+SP's K/V all-gather
  // over the NIC and its TP all-reduces are exposed.
  EXPECT_LT(tsp.exposed_comm_s, 0.05 * tsp.compute_s);
  EXPECT_GT(tpsp.exposed_comm_s, 0.8 * tpsp.compute_s);
  EXPECT_GT(tpsp.comm_inter_bytes, 0);
  EXPECT_EQ(tsp.comm_inter_bytes, 0);  // prefill: no gradient all-reduce across nodes
  // Same per-GPU work: a TSP rank computes for 1/8 of a replica, a TP+SP rank for 1/64 of one.
  EXPECT_NEAR(tsp.compute_s / tpsp.compute_s, 8.0, 1e-9);
}

// docs/cost-model.md §2: with g=1 and F=4, TSP's forward block traffic is below TP's iff N > 8h.
TEST(CostModelComm, CrossoverAtEightH) {
  LlamaConfig m = llama_preset("7b");
  const int64_t h = m.hidden_size;
  ASSERT_EQ(m.intermediate_size, 4 * h);
  ASSERT_EQ(m.gqa_group(), 1);
  for (int D : {2, 4, 8}) {
    const int64_t step = 2 * D * D;  // keeps every block integral
    auto fwd = [&](const char* name, int64_t N) {
      return block_comm(m, {name, D, std::string(name) == "tp" ? D : 1, 1}, N, 2).forward.received;
    };
    EXPECT_EQ(fwd("tsp", 8 * h), fwd("tp", 8 * h)) << "D=" << D;
    EXPECT_LT(fwd("tsp", 8 * h + step), fwd("tp", 8 * h + step)) << "D=" << D;
    EXPECT_GT(fwd("tsp", 8 * h - step), fwd("tp", 8 * h - step)) << "D=" << D;
  }
}

// Exact per-rank bytes for a small shape, worked by hand from the counting convention
// (broadcast: others receive B; all_gather/reduce_scatter (D-1)·B; all_reduce 2(D-1)B/D;
// reduce: root receives B, others send B).
TEST(CostModelComm, ExactSmallShape) {
  LlamaConfig m;
  m.hidden_size = 16;
  m.num_attention_heads = 4;
  m.num_key_value_heads = 2;  // kv_dim = 8, g = 2
  m.intermediate_size = 32;
  const int64_t N = 32, D = 2, e = 4;
  // attention shard (2·16·16 + 2·8·16)/2 = 384 elements; MLP shard 3·32·16/2 = 768;
  // K (or V) block of a head group: (32/2)·(8/2) = 64.
  const BlockComm t = block_comm(m, {"tsp", 2, 1, 1}, N, e);
  const int64_t attn = 384 * e, mlp = 768 * e, kvb = 64 * e;
  EXPECT_EQ(t.forward.received, (D - 1) * attn + (D - 1) * mlp + D * 2 * (D - 1) * kvb);
  EXPECT_EQ(t.forward.sent, attn + (D - 1) * mlp + D * 2 * (D - 1) * kvb);
  EXPECT_EQ(t.backward.received,
            (D - 1) * attn + 2 * D * 2 * (D - 1) * kvb + attn + 2 * (D - 1) * mlp);
  EXPECT_EQ(t.backward.sent, attn + 2 * D * 2 * (D - 1) * kvb + (D - 1) * attn + 2 * (D - 1) * mlp);
  // tp: two all-reduces of [32, 16] fp32 = 2048 bytes each: 2·(2·1·2048/2) = 4096 per pass.
  const BlockComm p = block_comm(m, {"tp", 2, 2, 1}, N, e);
  EXPECT_EQ(p.forward, (Traffic{4096, 4096}));
  EXPECT_EQ(p.backward, (Traffic{4096, 4096}));
  // sp: K and V all-gather of 16 rows x 8 = 512 bytes each; backward dK/dV reduce-scatter
  // (same) and the all-reduce of the block gradients, matrices and the two RMSNorm vectors in one
  // call, as src/parallel/tp_sp.cpp does: (512 + 256 + 1536 + 32) params · 4 B · 2(D-1)/D.
  const BlockComm s = block_comm(m, {"sp", 2, 1, 1}, N, e);
  EXPECT_EQ(s.forward, (Traffic{1024, 1024}));
  EXPECT_EQ(s.backward, (Traffic{1024 + 9344, 1024 + 9344}));
  // tp-sp T=2, Σ=2: two all-reduces of [16, 16] over T (1024 B each); K/V all-gathers over Σ of
  // [16, 4] (256 B each). Backward: the dual all-reduces, dK/dV reduce-scatters, and the Σ
  // all-reduce of the gradient shard (2304/2 matrix + 32 norm elements) · 4 B · 2(Σ-1)/Σ = 4736.
  const BlockComm ts = block_comm(m, {"tp-sp", 4, 2, 1}, N, e);
  EXPECT_EQ(ts.forward, (Traffic{2048 + 512, 2048 + 512}));
  EXPECT_EQ(ts.backward, (Traffic{2048 + 512 + 4736, 2048 + 512 + 4736}));
  // fsdp-cp: the whole layer gathered, matrices and norms cut in D pieces: (2304 + 32)/2 = 1168
  // elements per rank, 4672 B; K/V as sp. Backward: the layer and K/V gathered again (only local
  // k, v are saved), dK/dV and the layer's gradients reduce-scattered.
  const BlockComm f = block_comm(m, {"fsdp-cp", 2, 1, 1}, N, e);
  EXPECT_EQ(f.forward, (Traffic{1024 + 4672, 1024 + 4672}));
  EXPECT_EQ(f.backward, (Traffic{2 * 1024 + 2 * 4672, 2 * 1024 + 2 * 4672}));
  EXPECT_EQ(block_comm(m, {"fsdp-cp", 2, 1, 1}, N, e, /*regather_kv=*/true).backward, f.backward);
  // tp-sp with T=D: identical to tp; with T=1: sp's K/V traffic.
  LlamaConfig m4 = m;
  m4.num_key_value_heads = 4;
  EXPECT_EQ(block_comm(m4, {"tp-sp", 4, 4, 1}, N, e).forward,
            block_comm(m4, {"tp", 4, 4, 1}, N, e).forward);
  EXPECT_EQ(block_comm(m4, {"tp-sp", 4, 1, 1}, N, e).forward,
            block_comm(m4, {"sp", 4, 1, 1}, N, e).forward);
  EXPECT_EQ(block_comm(m, {"single", 1, 1, 1}, N, e).forward, Traffic{});
}

// docs/cost-model.md §2.1, the same small shape in bf16 mixed precision: weight and K/V
// transfers move 2-byte elements, every reduction (dK/dV reduce-scatters, gradient reduces and
// ring accumulators, tp's all-reduces, sp's gradient all-reduce) still 4-byte ones.
TEST(CostModelComm, ExactSmallShapeBf16) {
  LlamaConfig m;
  m.hidden_size = 16;
  m.num_attention_heads = 4;
  m.num_key_value_heads = 2;
  m.intermediate_size = 32;
  const int64_t N = 32, D = 2;
  // tsp: attention shard 384 elements, MLP shard 768, K block of a head group 64 (see above).
  const BlockComm t = block_comm(m, {"tsp", 2, 1, 1}, N, DType::BF16);
  const int64_t attn = 384, mlp = 768, kvb = 64;
  EXPECT_EQ(t.forward.received, (D - 1) * attn * 2 + (D - 1) * mlp * 2 + D * 2 * (D - 1) * kvb * 2);
  EXPECT_EQ(t.forward.sent, attn * 2 + (D - 1) * mlp * 2 + D * 2 * (D - 1) * kvb * 2);
  // backward: shards (2 B) again, K/V (2 B) again, dK/dV reduce-scatters (4 B), the attention
  // gradient reduced to its owner (4 B: root receives once), the MLP ring's weights (2 B) and
  // gradient accumulators (4 B)
  EXPECT_EQ(t.backward.received, (D - 1) * attn * 2 + D * 2 * (D - 1) * kvb * 2 +
                                     D * 2 * (D - 1) * kvb * 4 + attn * 4 + (D - 1) * mlp * 2 +
                                     (D - 1) * mlp * 4);
  EXPECT_EQ(t.backward.sent, attn * 2 + D * 2 * (D - 1) * kvb * 2 + D * 2 * (D - 1) * kvb * 4 +
                                 (D - 1) * attn * 4 + (D - 1) * mlp * 2 + (D - 1) * mlp * 4);
  // tp: its all-reduces sum partial outputs and input gradients: fp32 in both dtypes.
  EXPECT_EQ(block_comm(m, {"tp", 2, 2, 1}, N, DType::BF16).forward, (Traffic{4096, 4096}));
  EXPECT_EQ(block_comm(m, {"tp", 2, 2, 1}, N, DType::BF16).backward, (Traffic{4096, 4096}));
  // sp: K/V all-gathers halve (512 -> 256 B each); dK/dV reduce-scatters and the gradient
  // all-reduce (9344 B) do not.
  const BlockComm s = block_comm(m, {"sp", 2, 1, 1}, N, DType::BF16);
  EXPECT_EQ(s.forward, (Traffic{512, 512}));
  EXPECT_EQ(s.backward, (Traffic{1024 + 9344, 1024 + 9344}));
  // fsdp-cp: the layer's pieces (1168 elements) and K/V gathered at 2 B, forward and backward;
  // dK/dV and the layer's gradients reduce-scattered at 4 B.
  const BlockComm f = block_comm(m, {"fsdp-cp", 2, 1, 1}, N, DType::BF16);
  EXPECT_EQ(f.forward, (Traffic{512 + 2336, 512 + 2336}));
  EXPECT_EQ(f.backward, (Traffic{512 + 2336 + 1024 + 4672, 512 + 2336 + 1024 + 4672}));
  // fp32 is the 4-byte uniform count
  EXPECT_EQ(block_comm(m, {"tsp", 2, 1, 1}, N, DType::F32).backward,
            block_comm(m, {"tsp", 2, 1, 1}, N, 4).backward);
  EXPECT_THROW(ElemBytes::of(DType::I32), Error);
}

// Every registered layout has its model (at the end of src/parallel/<layout>.cpp), attached to its
// LayoutInfo; the planner enumerates exactly the modelled layouts.
TEST(CostModelLayouts, EveryLayoutRegistersItsModel) {
  ASSERT_FALSE(registered_layouts().empty());
  for (const LayoutInfo& info : registered_layouts()) {
    EXPECT_NE(info.model, nullptr) << info.name << " has no registered model";
    EXPECT_EQ(info.model, find_layout_model(info.name)) << info.name;
  }
  EXPECT_EQ(find_layout_model("zz"), nullptr);
  EXPECT_THROW(layout_model("zz"), Error);
}

// Model state and activations shrink 1/D under tsp; model state only under tp; activations only
// under sp.
TEST(CostModelMemory, ShrinksAsTheLayoutSays) {
  Workload w = paper(Mode::Train);
  w.S = 16384;
  const Hardware hw = hardware_profile("mi300x");
  using C = MemCategory;
  auto mem = [&](const LayoutSpec& l) { return estimate(w, l, hw).memory; };
  // Matrices are split D ways; the RMSNorm weights (2hL + h) stay replicated.
  const double matrices = static_cast<double>(w.model.num_parameters()) - (2 * 4096 * 32 + 4096);
  const MemoryBreakdown t2 = mem({"tsp", 2, 1, 1}), t4 = mem({"tsp", 4, 1, 1});
  // relative 1e-12: the same doubles summed in a different order
  EXPECT_NEAR(t2[C::Optimizer] - t4[C::Optimizer], 12 * matrices / 4, 1e-12 * 12 * matrices);
  EXPECT_NEAR(t2[C::Activations] / t4[C::Activations], 2.0, 1e-12);
  const MemoryBreakdown p2 = mem({"tp", 2, 2, 1}), p4 = mem({"tp", 4, 4, 1});
  EXPECT_NEAR(p2[C::Weights] - p4[C::Weights], 2 * matrices / 4, 1e-12 * 2 * matrices);
  // TP's layer inputs stay replicated: its activations shrink far less than 1/D.
  EXPECT_LT(p2[C::Activations] / p4[C::Activations], 1.6);
  const MemoryBreakdown s2 = mem({"sp", 2, 1, 1}), s4 = mem({"sp", 4, 1, 1});
  EXPECT_DOUBLE_EQ(s2[C::Weights], s4[C::Weights]);
  EXPECT_GT(s2[C::Activations], s4[C::Activations]);
  // TSP below every other layout of the same D.
  for (const LayoutSpec& l : enumerate_layouts(w, 8, 8))
    if (l.name != "tsp") {
      EXPECT_LT(mem({"tsp", 8, 1, 1}).total(), mem(l).total()) << l.label();
    }
}

// Inference: no gradients or optimizer state; the K/V cache is split 1/D under sp and tsp.
TEST(CostModelMemory, Inference) {
  Workload w = paper(Mode::Decode);
  w.B = 4;
  const Hardware hw = hardware_profile("mi300x");
  using C = MemCategory;
  const Estimate single = estimate(w, {"single", 1, 1, 1}, hw);
  EXPECT_EQ(single.memory[C::Grads], 0);
  EXPECT_EQ(single.memory[C::Optimizer], 0);
  // 2 (K,V) · L · B · S · kv_dim · 2 bytes
  EXPECT_DOUBLE_EQ(single.memory[C::Activations], 2.0 * 32 * 4 * 131072 * 4096 * 2);
  for (const char* n : {"sp", "tsp"})
    EXPECT_DOUBLE_EQ(estimate(w, {n, 8, 1, 1}, hw).memory[C::Activations],
                     single.memory[C::Activations] / 8)
        << n;
  // Weight-stationary TSP decode moves activations only: far less than a layer of weights.
  const Estimate t = estimate(w, {"tsp", 8, 1, 1}, hw);
  EXPECT_LT(t.comm_intra_bytes, 1e-3 * 16.0 * 4096 * 4096 * 2 * 32);
  EXPECT_GT(estimate(w, {"fsdp-cp", 8, 1, 1}, hw).comm_intra_bytes, 100 * t.comm_intra_bytes);
}

TEST(CostModelLayouts, EveryFactorizationListed) {
  const Workload w = paper(Mode::Train);
  std::set<std::string> labels;
  for (const LayoutSpec& l : enumerate_layouts(w, 8)) labels.insert(l.label());
  for (const char* want :
       {"single D=1 R=8", "tp D=8", "sp D=8", "tsp D=8", "fsdp-cp D=8", "tp-sp T=2 S=4",
        "tp-sp T=4 S=2", "tp D=4 R=2", "tsp D=2 R=4", "tp-sp T=2 S=2 R=2"})
    EXPECT_TRUE(labels.count(want)) << want;
  // D=8 layouts: tp, sp, tsp, fsdp-cp and the two proper factorizations of 8.
  EXPECT_EQ(enumerate_layouts(w, 8, 8).size(), 6u);
}

TEST(CostModelLayouts, NonDividingConfigurationsRejected) {
  Workload w = paper(Mode::Train);
  auto message = [&](const LayoutSpec& l) -> std::string {
    try {
      check_layout(w.model, l, w);
    } catch (const Error& e) {
      return e.message();
    }
    return "";
  };
  LlamaConfig gqa = w.model;
  gqa.num_key_value_heads = 8;
  w.model = gqa;
  EXPECT_NE(message({"tsp", 16, 1, 1}).find("use a degree in {1,2,4,8}"), std::string::npos);
  EXPECT_NE(message({"tp-sp", 8, 3, 1}).find("does not divide"), std::string::npos);
  w.S = 1000;  // not a multiple of 2·8
  EXPECT_NE(message({"sp", 8, 1, 1}).find("multiple of 16"), std::string::npos);
  EXPECT_NE(message({"zz", 2, 1, 1}).find("unknown layout"), std::string::npos);
  EXPECT_THROW(enumerate_layouts(w, 8, 3), Error);
  EXPECT_THROW(hardware_profile("tpu"), Error);
}

// ---- ZeRO-1 (issue 13; docs/cost-model.md §3.6, §4.5) -----------------------------------------

// Parameters of one rank's shard: matrices split D ways, RMSNorm weights (2hL + h) replicated.
double shard_params_7b(int w_split) {
  const LlamaConfig m = llama_preset("7b");
  const double norms = 2.0 * 4096 * 32 + 4096;
  return (static_cast<double>(m.num_parameters()) - norms) / w_split + norms;
}

// Each replica owns 1/R of its shard's fp32 master weights and moments; everything else it holds
// is unchanged, except that the replicas' reduce-scatter needs no gradient bucket copy (an
// all-reduce inside the group keeps its one).
TEST(CostModelZero, OptimizerStateShardedOverReplicas) {
  Workload w = paper(Mode::Train);
  w.S = 16384;
  const Hardware hw = hardware_profile("mi300x");
  const MemoryAssumptions a;
  using C = MemCategory;
  struct Case {
    LayoutSpec l;
    int w_split;
    bool group_all_reduce;  // gradients replicated inside the group (tp-sp's Σ)
  };
  const Case cases[] = {{{"tsp", 8, 1, 128}, 8, false},
                        {{"tp-sp", 8, 4, 4}, 4, true},
                        {{"single", 1, 1, 4}, 1, false}};
  for (const Case& c : cases) {
    LayoutSpec l0 = c.l, l1 = c.l;
    l1.zero = 1;
    const MemoryBreakdown m0 = estimate(w, l0, hw).memory, m1 = estimate(w, l1, hw).memory;
    const double params = shard_params_7b(c.w_split);
    // From first principles, not from the zero = 0 figure: 12 B/param of the shard over R.
    EXPECT_NEAR(m1[C::Optimizer], a.optimizer_bytes * params / c.l.R, 1e-9 * m1[C::Optimizer])
        << c.l.label();
    EXPECT_NEAR(m1[C::Optimizer], m0[C::Optimizer] / c.l.R, 1e-9 * m1[C::Optimizer]);
    for (C same : {C::Weights, C::Grads, C::Activations, C::Workspace})
      EXPECT_DOUBLE_EQ(m1[same], m0[same]) << c.l.label() << " category " << int(same);
    const double bucket = c.group_all_reduce ? 0 : a.grad_bytes * params;
    EXPECT_NEAR(m0[C::Comm] - m1[C::Comm], bucket, 1e-9 * m0[C::Comm]) << c.l.label();
  }
  // One replica: nothing to shard; ZeRO-1 is the same layout, byte for byte and second for second.
  const Estimate r0 = estimate(w, {"tsp", 8, 1, 1, 0}, hw);
  const Estimate r1 = estimate(w, {"tsp", 8, 1, 1, 1}, hw);
  EXPECT_EQ(r1.memory.bytes, r0.memory.bytes);
  EXPECT_EQ(r1.step_s, r0.step_s);
  EXPECT_EQ(r1.comm_replica_bytes, 0);
  EXPECT_EQ(r1.layout.label(), "tsp D=8");
  EXPECT_EQ((LayoutSpec{"tsp", 8, 1, 128, 1}.label()), "tsp D=8 R=128 ZeRO-1");
  EXPECT_EQ((LayoutSpec{"tsp", 8, 1, 128, 0}.label()), "tsp D=8 R=128");
  // Inference keeps no optimizer state: ZeRO-1 changes nothing there.
  const Workload pre = paper(Mode::Prefill);
  EXPECT_EQ(estimate(pre, {"tsp", 8, 1, 128, 1}, hw).memory.bytes,
            estimate(pre, {"tsp", 8, 1, 128, 0}, hw).memory.bytes);
}

// The paper's cluster: 1,024 MI300X, D = 8 in a node, R = 128 replicas across nodes. Replica
// traffic per GPU per step: all-reduce 2(R-1)/R·shard·ge (zero = 0) against reduce-scatter
// (R-1)/R·shard·ge + all-gather (R-1)/R·shard·we (ZeRO-1). ge = 4 (fp32 reductions, as our
// implementation moves them) and we = 2 so that the two terms cannot be confused.
TEST(CostModelZero, ReplicaTrafficAtOneThousandGpus) {
  const Workload w = paper(Mode::Train);
  const Hardware hw = hardware_profile("mi300x");
  MemoryAssumptions a;
  a.grad_bytes = 4;
  a.weight_bytes = 2;
  const double R = 128, shard = shard_params_7b(8);
  const Estimate z0 = estimate(w, {"tsp", 8, 1, 128, 0}, hw, a);
  const Estimate z1 = estimate(w, {"tsp", 8, 1, 128, 1}, hw, a);
  EXPECT_NEAR(z0.comm_replica_bytes, 2 * (R - 1) / R * shard * 4, 1e-9 * z0.comm_replica_bytes);
  EXPECT_NEAR(z1.comm_replica_bytes, (R - 1) / R * shard * (4 + 2), 1e-9 * z1.comm_replica_bytes);
  // The replicas are 128 nodes apart in rank order: all of it crosses nodes. tsp's own traffic
  // stays inside the node, and is the same under both stages.
  for (const Estimate* e : {&z0, &z1}) {
    EXPECT_EQ(e->comm_inter_bytes, e->comm_replica_bytes) << e->layout.label();
    EXPECT_GT(e->comm_intra_bytes, 0);
  }
  EXPECT_EQ(z1.comm_intra_bytes, z0.comm_intra_bytes);
  // Time: the reduce-scatter hides behind backward like the all-reduce (128K tokens: seconds of
  // compute against tens of ms), the weight all-gather after the step does not. Its time on the
  // NIC (50 GB/s, α = 10 µs): ·(α + shard·we/R / bw).
  const double ag = (R - 1) * (10e-6 + shard * 2 / R / 50e9);
  EXPECT_NEAR(z1.exposed_comm_s - z0.exposed_comm_s, ag, 1e-9);
  EXPECT_EQ(z1.compute_s, z0.compute_s);
  EXPECT_LT(z1.tokens_per_s, z0.tokens_per_s);
  // Nodes of 16 GPUs hold both replicas of D = 8, R = 2: the same bytes, now inside the node.
  Hardware big = hw;
  big.gpus_per_node = 16;
  const Estimate in_node = estimate(w, {"tsp", 8, 1, 2, 1}, big, a);
  EXPECT_EQ(in_node.comm_inter_bytes, 0);
  EXPECT_NEAR(in_node.comm_replica_bytes, 0.5 * shard * 6, 1e-9 * in_node.comm_replica_bytes);
  EXPECT_GT(estimate(w, {"tsp", 8, 1, 2, 1}, hw, a).comm_inter_bytes, 0);
}

TEST(CostModelZero, InvalidStageRejected) {
  const Workload w = paper(Mode::Train);
  for (int zero : {-1, 2, 3}) {
    const LayoutSpec l{"tsp", 8, 1, 128, zero};
    try {
      check_layout(w.model, l, w);
      ADD_FAILURE() << "zero=" << zero << " accepted";
    } catch (const Error& e) {
      EXPECT_NE(e.message().find("ZeRO stage"), std::string::npos) << e.message();
      EXPECT_NE(e.message().find("use 0"), std::string::npos) << e.message();
    }
    EXPECT_THROW(estimate(w, l, hardware_profile("mi300x")), Error);
  }
}

TEST(CostModelPlan, RecommendsFastestThatFits) {
  const Hardware hw = hardware_profile("mi300x");
  const Workload w = paper(Mode::Train);
  std::vector<Estimate> all;
  for (const LayoutSpec& l : enumerate_layouts(w, 8)) all.push_back(estimate(w, l, hw));
  std::string reason;
  const int best = recommend(all, &reason);
  ASSERT_GE(best, 0);
  EXPECT_EQ(all[best].layout.name, "tsp");
  EXPECT_NE(reason.find("highest predicted tokens/s among layouts that fit"), std::string::npos);
  for (const Estimate& e : all)
    if (e.fits) {
      EXPECT_LE(e.tokens_per_s, all[best].tokens_per_s * (1 + 1e-12));
    }
}

// ---- recomputation (docs/cost-model.md §3.2, §4.1) -------------------------------------------

// Every layout at D = 8, 7B, 32K tokens: the activations kept order full < selective < none and
// equal the per-layer sums of §3.2; the step costs more as more is recomputed.
TEST(CostModelRecompute, ModesOrderMemoryAndTime) {
  const Hardware hw = hardware_profile("mi300x");
  Workload w = paper(Mode::Train);
  w.S = 32768;
  using C = MemCategory;
  const double N = 32768, h = 4096, I = 16384, L = 32;
  for (const LayoutSpec& l : enumerate_layouts(w, 8, 8)) {
    Estimate e[3];
    for (Recompute r : {Recompute::None, Recompute::Selective, Recompute::Full}) {
      w.recompute = r;
      e[static_cast<int>(r)] = estimate(w, l, hw);
      EXPECT_EQ(e[static_cast<int>(r)].recompute, r);
    }
    const Estimate &none = e[0], &sel = e[1], &full = e[2];
    EXPECT_LT(full.memory[C::Activations], sel.memory[C::Activations]) << l.label();
    EXPECT_LT(sel.memory[C::Activations], none.memory[C::Activations]) << l.label();
    // Everything else is the same under none and full (their backward rebuilds nothing: none kept
    // the norm outputs and gate/up/act, full's replay saved them); selective's backward also
    // holds the recomputed ones, so its transients are never smaller.
    EXPECT_DOUBLE_EQ(full.memory.total() - full.memory[C::Activations],
                     none.memory.total() - none.memory[C::Activations])
        << l.label();
    EXPECT_GE(sel.memory.total() - sel.memory[C::Activations],
              none.memory.total() - none.memory[C::Activations])
        << l.label();
    // none − selective = the two normed inputs and gate, up, act, of every layer:
    // L·(2·N·h/t + 3·N·(I/hd)/t)·2 bytes.
    const double t = l.token_shards(), hd = layout_model(l.name).split(l).hd;
    const double x = N * h / t * 2;
    EXPECT_NEAR(none.memory[C::Activations] - sel.memory[C::Activations],
                L * (2 * x + 3 * N * (I / hd) / t * 2), 1e-9 * none.memory[C::Activations])
        << l.label();
    // full = every layer's input + the replayed layer's none set, which holds its own input:
    // none/L + (L−1)·x.
    EXPECT_NEAR(full.memory[C::Activations], none.memory[C::Activations] / L + (L - 1) * x,
                1e-9 * none.memory[C::Activations])
        << l.label();
    // Time: selective adds the gate/up GEMMs, full a whole forward (and its communication).
    EXPECT_LT(none.compute_s, sel.compute_s) << l.label();
    EXPECT_LT(sel.compute_s, full.compute_s) << l.label();
    // A step whose communication outlasts its compute hides the recomputed GEMMs behind it
    // (tsp at 32K: the backward's shard traffic), so the step never shrinks but may not grow.
    EXPECT_LE(none.step_s, sel.step_s) << l.label();
    EXPECT_LT(sel.step_s, full.step_s) << l.label();
    EXPECT_GT(full.flops, sel.flops);
    EXPECT_GT(sel.flops, none.flops);
  }
}

// Full recomputation replays the layer's forward with its communication: the extra bytes per step
// are exactly L forwards of block_comm (the paper's bf16 elements); under tsp that is the
// attention-shard broadcasts, the MLP ring and the K/V gathers of one more forward. Selective
// recomputation moves nothing more (tsp recomputes gate/up with the shard its backward ring
// already brings).
TEST(CostModelRecompute, ReplayTrafficIsOneMoreForward) {
  const Hardware hw = hardware_profile("mi300x");
  Workload w = paper(Mode::Train);
  w.S = 65536;
  for (const LayoutSpec& l : enumerate_layouts(w, 8, 8)) {
    w.recompute = Recompute::None;
    const Estimate none = estimate(w, l, hw);
    w.recompute = Recompute::Selective;
    const Estimate sel = estimate(w, l, hw);
    w.recompute = Recompute::Full;
    const Estimate full = estimate(w, l, hw);
    const double fwd =
        static_cast<double>(replay_comm(w.model, l, w.B * w.S, ElemBytes::uniform(2)).received);
    // every layout but fsdp-cp moves its whole forward again; fsdp-cp's backward gathers the
    // layer once for the replay and itself, so only the replay's K/V all-gathers are added
    const BlockComm blk = block_comm(w.model, l, w.B * w.S, ElemBytes::uniform(2));
    if (l.name == "fsdp-cp")
      EXPECT_LT(fwd, static_cast<double>(blk.forward.received)) << l.label();
    else
      EXPECT_EQ(fwd, static_cast<double>(blk.forward.received)) << l.label();
    const double extra = full.comm_intra_bytes - none.comm_intra_bytes;
    // tp's forward all-reduces round to whole bytes per call in block_comm: 1e-9 relative
    EXPECT_NEAR(extra, w.model.num_hidden_layers * fwd, 1e-9 * extra) << l.label();
    EXPECT_EQ(full.comm_inter_bytes, none.comm_inter_bytes);  // one node
    EXPECT_EQ(sel.comm_intra_bytes, none.comm_intra_bytes) << l.label();
    EXPECT_GE(full.exposed_comm_s, none.exposed_comm_s) << l.label();
    if (l.name == "tsp") {
      // the weights of one more forward: (D−1)/D of the block's matrices, bf16, per layer
      const double D = l.D, Pm = 4.0 * 4096 * 4096 + 3.0 * 16384 * 4096;
      const double kv = 2 * D * (D - 1) * (w.S / D) * (4096 / D) * 2;
      EXPECT_NEAR(extra, 32 * ((D - 1) / D * Pm * 2 + kv), 1e-9 * extra);
      // the replay's pipeline fill (first shard and first K/V group) is exposed again
      EXPECT_GT(full.exposed_comm_s, none.exposed_comm_s);
    }
  }
}

// ---- the paper's curve (docs/cost-model.md §3.4) ----------------------------------------------

// 8× MI300X, 7B, B = 1, full recomputation, 16K → 128K. The paper: TSP nearly flat (model state
// dominates at short S), TP rising steeply. Per layer TP keeps its whole N·h input, TSP 1/8 of it,
// so TSP's growth is about 1/8 of TP's (plus the smaller transients). The model: 16K→128K, TSP
// 29.5 → 35.9 GB (+6.5 GB, ×1.22), TP 33.8 → 73.5 GB (+39.7 GB, ×2.17).
TEST(CostModelCurve, TspNearlyFlatTpSteep) {
  const Hardware hw = hardware_profile("mi300x");
  Workload w = paper(Mode::Train);
  w.recompute = Recompute::Full;
  auto gb = [&](const LayoutSpec& l, int64_t S) {
    w.S = S;
    return estimate(w, l, hw).memory.total() / 1e9;
  };
  const LayoutSpec tsp{"tsp", 8, 1, 1}, tp{"tp", 8, 8, 1};
  for (int64_t S : {16384, 32768, 65536, 131072})
    std::printf("S=%6lld  tsp %6.1f GB  tp %6.1f GB\n", (long long)S, gb(tsp, S), gb(tp, S));
  const double g_tsp = gb(tsp, 131072) - gb(tsp, 16384), g_tp = gb(tp, 131072) - gb(tp, 16384);
  std::printf("growth 16K->128K: tsp %+.1f GB, tp %+.1f GB\n", g_tsp, g_tp);
  // TSP grows at most a quarter of TP's growth (the derivation says ~1/5: 1/8 of the inputs plus
  // TSP's 1/8-sized replayed layer against TP's replicated one).
  EXPECT_LT(g_tsp, 0.25 * g_tp);
  // TSP within 1.4x of its 16K figure, TP more than doubles.
  EXPECT_LT(gb(tsp, 131072) / gb(tsp, 16384), 1.4);
  EXPECT_GT(gb(tp, 131072) / gb(tp, 16384), 2.0);
  // At 16K, TSP's memory is mostly model state and the framework (not activations).
  w.S = 16384;
  const MemoryBreakdown m = estimate(w, tsp, hw).memory;
  using C = MemCategory;
  EXPECT_GT((m[C::Weights] + m[C::Grads] + m[C::Optimizer]) / m.total(), 0.6);
  EXPECT_LT(m[C::Activations] / m.total(), 0.1);
}

// ---- the longest sequence (tsp plan --max-seq) -----------------------------------------------

// For every layout on 8 MI300X: the S returned fits and the next valid S does not; full
// recomputation never shortens it, nor do more GPUs.
TEST(CostModelMaxSeq, LongestFitsNextDoesNot) {
  const Hardware hw = hardware_profile("mi300x");
  Workload w = paper(Mode::Train);
  w.S = 2 * 16;  // divisible by every zigzag split of up to 16 GPUs
  auto longest = [&](const LayoutSpec& l, Recompute r) {
    Workload v = w;
    v.recompute = r;
    return max_seq(v, l, hw);
  };
  for (const LayoutSpec& l : enumerate_layouts(w, 8)) {
    int64_t prev = 0;
    for (Recompute r : {Recompute::None, Recompute::Selective, Recompute::Full}) {
      const MaxSeq m = longest(l, r);
      EXPECT_EQ(m.step, seq_step(l));
      EXPECT_GE(m.S, prev) << l.label() << " " << recompute_name(r);
      prev = m.S;
      if (m.S == 0) continue;
      EXPECT_EQ(m.S % m.step, 0);
      EXPECT_TRUE(m.at.fits) << l.label();
      EXPECT_EQ(m.at.recompute, r);
      Workload next = w;
      next.recompute = r;
      next.S = m.S + m.step;
      EXPECT_FALSE(estimate(next, l, hw).fits) << l.label() << " S=" << next.S;
    }
  }
  // More GPUs (16, two nodes): the best of each layout name is never shorter.
  auto best_by_name = [&](int gpus) {
    std::map<std::string, int64_t> best;
    for (const LayoutSpec& l : enumerate_layouts(w, gpus))
      best[l.name] = std::max(best[l.name], longest(l, Recompute::Full).S);
    return best;
  };
  const auto b8 = best_by_name(8), b16 = best_by_name(16);
  for (const auto& [name, S] : b8) {
    EXPECT_GE(b16.at(name), S) << name;
  }
  // The tsp and tp numbers of docs/benchmarks.md: tsp D=8 trains longer sequences than tp D=8.
  EXPECT_GT(longest({"tsp", 8, 1, 1}, Recompute::Full).S,
            2 * longest({"tp", 8, 8, 1}, Recompute::Full).S);
}

// ---- our implementation on a GPU (docs/cost-model.md, "On a GPU") -------------------------------
// The CUDA prediction differs from the CPU one by the transients the CUDA backend's ops allocate
// instead of the CPU's. The differences below are derived by hand from the op-level rules, at
// shapes where the busiest moment is known, not by calling the model's own helpers.

LlamaConfig gpu_model(int64_t h, int64_t heads, int64_t F, int64_t V) {
  LlamaConfig c;
  c.hidden_size = h;
  c.num_attention_heads = heads;
  c.num_key_value_heads = heads;
  c.intermediate_size = F;
  c.num_hidden_layers = 2;
  c.vocab_size = V;
  c.max_position_embeddings = 4096;
  return c;
}

MemoryTarget cuda_target(bool flash_v2) {
  MemoryTarget t;
  t.device = DeviceKind::CUDA;
  t.flash_v2 = flash_v2;
  return t;
}

// The cuDNN path's cut of the layouts' attention calls, which sizes its transients
// (cudnn_attention_transient: max_nq, max_nk, the K/V copies), at S = 128, d = 64, by hand from
// the positions (take_tokens; attention_cudnn_pieces.h):
//   one part: queries and keys [0, 128) in order, one band piece of 128 × 128;
//   two parts (chunks of 32; keys in rank order 0-31, 96-127, 32-95: out of position order):
//     part 0 holds [0, 32) and [96, 128): pieces 32 × 32 (band from 0) and 32 × 128 (from 96);
//     part 1 holds [32, 96), one run: one piece of 64 queries × 96 keys (band from 32);
//   four parts: 32 queries, under the path's 64 (attention_cudnn_rules.h): v1 takes it;
//   head dim 16: not the path's.
TEST(LocalMemoryOnGpu, CudnnCutOfTheLayoutsCalls) {
  const CudnnCallCut one = cudnn_call_cut(128, 128, 4, 4, 64, 0);
  ASSERT_TRUE(one.covered);
  ASSERT_EQ(one.pieces.size(), 1u);
  EXPECT_EQ(one.pieces[0].nq, 128);
  EXPECT_EQ(one.pieces[0].nk, 128);
  EXPECT_EQ(one.pieces[0].right_bound, 0);
  EXPECT_TRUE(one.keys_in_order);

  const CudnnCallCut p0 = cudnn_call_cut(64, 128, 4, 4, 64, 0);
  ASSERT_TRUE(p0.covered);
  ASSERT_EQ(p0.pieces.size(), 2u);
  EXPECT_EQ(p0.pieces[0].nq, 32);
  EXPECT_EQ(p0.pieces[0].nk, 32);
  EXPECT_EQ(p0.pieces[0].right_bound, 0);
  EXPECT_EQ(p0.pieces[1].nq, 32);
  EXPECT_EQ(p0.pieces[1].nk, 128);
  EXPECT_EQ(p0.pieces[1].right_bound, 96);
  EXPECT_EQ(p0.max_nq, 32);
  EXPECT_EQ(p0.max_nk, 128);
  EXPECT_FALSE(p0.keys_in_order);

  const CudnnCallCut p1 = cudnn_call_cut(64, 128, 4, 4, 64, 1);
  ASSERT_TRUE(p1.covered);
  ASSERT_EQ(p1.pieces.size(), 1u);
  EXPECT_EQ(p1.pieces[0].nq, 64);
  EXPECT_EQ(p1.pieces[0].nk, 96);
  EXPECT_EQ(p1.pieces[0].right_bound, 32);
  EXPECT_FALSE(p1.keys_in_order);

  EXPECT_FALSE(cudnn_call_cut(32, 128, 4, 4, 64, 0).covered);
  EXPECT_FALSE(cudnn_call_cut(128, 128, 4, 4, 16, 0).covered);
  EXPECT_THROW(cudnn_call_cut(48, 128, 4, 4, 64, 0), Error);  // not a zigzag part
}

TEST(LocalMemoryOnGpu, CpuTargetIsTheDefault) {
  const MemoryTarget t = memory_target_of(Device::cpu());
  EXPECT_EQ(t.device, DeviceKind::CPU);
  EXPECT_FALSE(t.flash_v2);
  const LlamaConfig c = gpu_model(64, 4, 128, 256);
  const LayoutSpec l{"single", 1, 1, 1};
  for (DType dt : {DType::F32, DType::BF16})
    EXPECT_EQ(predict_local_memory(c, l, 2, 64, true, dt).total(),
              predict_local_memory(c, l, 2, 64, true, dt, Recompute::Selective, t).total());
}

// single, a vocabulary large enough that the loss head (one [r, V] fp32 logits chunk of r =
// min(n, token_chunk) rows: 512 on the CPU, 2048 under CUDA) is the busiest moment on both
// backends. CUDA's cross_entropy adds its per-row F64 loss [r] while the chunk is alive: under fp32
// nothing else is, so CUDA is above the CPU by its larger chunk and the row loss, 4·(r_gpu −
// r_cpu)·V + 8·r_gpu bytes (Workspace). Under bf16 the row loss is freed before linear_backward
// narrows dlogits to bf16 (2·r·V bytes > 8r): CUDA is above by the larger chunk alone, fp32 logits
// and their bf16 copy, (4 + 2)·(r_gpu − r_cpu)·V.
TEST(LocalMemoryOnGpu, LossHeadChunkAndRowLoss) {
  const LlamaConfig c = gpu_model(64, 4, 128, 8192);
  const LayoutSpec l{"single", 1, 1, 1};
  for (const auto& [B, S] : {std::pair<int64_t, int64_t>{2, 64}, {4, 256}, {2, 2048}}) {
    const int64_t r_cpu = std::min<int64_t>(B * S, 512), r_gpu = std::min<int64_t>(B * S, 2048);
    SCOPED_TRACE(fmt::format("B={} S={}", B, S));
    const MemoryBreakdown cpu = predict_local_memory(c, l, B, S, true, DType::F32);
    const MemoryBreakdown gpu = predict_local_memory(c, l, B, S, true, DType::F32,
                                                     Recompute::Selective, cuda_target(false));
    const double fp32_above = 4.0 * (r_gpu - r_cpu) * c.vocab_size + 8.0 * r_gpu;
    EXPECT_EQ(gpu[MemCategory::Workspace] - cpu[MemCategory::Workspace], fp32_above);
    EXPECT_EQ(gpu.total() - cpu.total(), fp32_above);
    const MemoryBreakdown cpu16 = predict_local_memory(c, l, B, S, true, DType::BF16);
    const MemoryBreakdown gpu16 = predict_local_memory(c, l, B, S, true, DType::BF16,
                                                       Recompute::Selective, cuda_target(false));
    EXPECT_EQ(gpu16.total() - cpu16.total(), 6.0 * (r_gpu - r_cpu) * c.vocab_size);
  }
}

// single under fp32 with a wide MLP and a small vocabulary: the busiest moment is mlp_backward,
// whose chunk buffers hold r = min(n, token_chunk) rows of F: da, du, the recomputed gate and up
// fp32 and act (fp32 here), 20·r·F bytes. Under fp32 no other CUDA transient is alive then (no
// narrowing, no widening), so CUDA is above the CPU by 20·(r_gpu − r_cpu)·F (Workspace).
TEST(LocalMemoryOnGpu, MlpChunkBuffers) {
  const LlamaConfig c = gpu_model(64, 4, 4096, 256);
  const LayoutSpec l{"single", 1, 1, 1};
  for (const auto& [B, S] :
       {std::pair<int64_t, int64_t>{1, 256}, {1, 1000}, {1, 2048}, {2, 2048}}) {
    const int64_t r_cpu = std::min<int64_t>(B * S, 512), r_gpu = std::min<int64_t>(B * S, 2048);
    SCOPED_TRACE(fmt::format("B={} S={}", B, S));
    const MemoryBreakdown cpu = predict_local_memory(c, l, B, S, true, DType::F32);
    const MemoryBreakdown gpu = predict_local_memory(c, l, B, S, true, DType::F32,
                                                     Recompute::Selective, cuda_target(false));
    const double above = 20.0 * (r_gpu - r_cpu) * c.intermediate_size;
    EXPECT_EQ(gpu[MemCategory::Workspace] - cpu[MemCategory::Workspace], above);
    EXPECT_EQ(gpu.total() - cpu.total(), above);
  }
}

// single under bf16 with a narrow MLP and a small vocabulary: the busiest moment is the attention
// backward (d_o, dq, dk, dv fp32 of every token, beside x, xn, dxn, dx). Inside it, with the v1
// flash kernels (no scratch), the largest transient is dq (or dy) narrowed to bf16, 2·n·h bytes
// (h = heads·d). The v2 kernels instead allocate, per row of S queries (query tiles of 32 rows,
// pieces rounded up to 256 bytes): padded positions 8·S, two tile bounds of S/32 I64 each (one
// 256-byte piece each), dout in bf16 2·S·heads·d, lse2 and delta 4·S·heads each. With B = 1 the
// dout copy equals the narrowed dq, so v2 is above v1 by 8·S + 2·256 + 8·S·heads (Workspace).
TEST(LocalMemoryOnGpu, FlashV2ScratchInTheAttentionBackward) {
  for (const auto& [heads, S] : {std::pair<int64_t, int64_t>{4, 256}, {8, 512}}) {
    const int64_t d = 64;
    const LlamaConfig c = gpu_model(heads * d, heads, 64, 256);
    const LayoutSpec l{"single", 1, 1, 1};
    SCOPED_TRACE(fmt::format("heads={} S={}", heads, S));
    ASSERT_LE(S / 32 * 8, 256) << "the tile bounds fit one 256-byte piece each";
    const MemoryBreakdown v1 = predict_local_memory(c, l, 1, S, true, DType::BF16,
                                                    Recompute::Selective, cuda_target(false));
    const MemoryBreakdown v2 = predict_local_memory(c, l, 1, S, true, DType::BF16,
                                                    Recompute::Selective, cuda_target(true));
    const double expected = 8.0 * S + 2 * 256 + 8.0 * S * heads;
    EXPECT_EQ(v2[MemCategory::Workspace] - v1[MemCategory::Workspace], expected);
    EXPECT_EQ(v2.total() - v1.total(), expected);
    // fp32 attention runs the reference kernels under either version: no scratch.
    EXPECT_EQ(
        predict_local_memory(c, l, 1, S, true, DType::F32, Recompute::Selective, cuda_target(true))
            .total(),
        predict_local_memory(c, l, 1, S, true, DType::F32, Recompute::Selective, cuda_target(false))
            .total());
  }
}

}  // namespace
}  // namespace tsp::plan
