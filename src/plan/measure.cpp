// Predictions of OUR implementation on this machine, to compare with `tsp bench` measurements
// (include/tsp/plan/measure.h). Every term below names the tensor of src/parallel/*.cpp or
// src/model/block.cpp it stands for; when a layout changes what it allocates or sends, this is
// the file to update (tests/plan/measured_vs_predicted_mpi_test.cpp says which term is off).
#include "tsp/plan/measure.h"

#include <algorithm>
#include <vector>

#include "ops/cpu/attention_internal.h"
#include "parallel/tp_sp.h"
#include "tsp/core/error.h"
#include "tsp/ops/gemm.h"
#include "tsp/parallel/layout.h"

namespace tsp::plan {
namespace {

constexpr int64_t kF32 = 4;
constexpr int64_t kChunk = 512;  // block::kTokenChunk (MLP and loss-head rows at once)

// The fast attention backward's per-thread scratch (src/ops/cpu/attention_fast.cpp,
// backward_scratch_floats with kBq = kBk = 64: dO·V and P/dS tiles, row statistics), one per
// thread for min(compute threads, kv heads of the call); none on the reference path. At test
// shapes it is several percent of a rank's peak, so it is modelled.
int64_t attention_backward_scratch(int64_t d, int64_t kv_heads) {
  if (!attn::fast_path_available(d)) return 0;
  constexpr int64_t kBq = 64, kBk = 64;
  const int64_t threads = std::min<int64_t>(compute_threads(), kv_heads);
  return threads * (2 * d * kBq + 2 * kBk * kBq + 2 * kBq);
}

// Communicator counting convention (include/tsp/comm/communicator.h), bytes.
Traffic ag(int64_t k, int64_t block) {
  return {(k - 1) * block, (k - 1) * block};
}
Traffic ar(int64_t k, int64_t b) {
  const int64_t x = k > 1 ? 2 * (k - 1) * b / k : 0;
  return {x, x};
}
Traffic hops(int64_t count, int64_t b) {
  return {count * b, count * b};
}

struct Dims {
  int64_t h, d, nh, nkv, F, V, L;
  bool tied;
};
Dims dims_of(const LlamaConfig& m) {
  return {m.hidden_size,       m.head_dim(), m.num_attention_heads, m.num_key_value_heads,
          m.intermediate_size, m.vocab_size, m.num_hidden_layers,   m.tie_word_embeddings};
}

// block::LayerSaved of n tokens, hq query heads and kv rows `kv_tokens` × hkv heads, floats.
int64_t saved_floats(const Dims& s, int64_t n, int64_t hq, int64_t hkv, int64_t kv_tokens) {
  return n * s.h * 2                  // x, x2
         + n * 2                      // rstd1, rstd2
         + n * hq * s.d * 2           // q, o
         + kv_tokens * hkv * s.d * 2  // k, v
         + n * hq;                    // lse
}

// One candidate "busiest moment": bytes by category on top of the persistent state.
struct Moment {
  int64_t act = 0, comm = 0, work = 0, grads_extra = 0;
};

MemoryBreakdown pick_peak(const MemoryBreakdown& state, const std::vector<Moment>& moments) {
  MemoryBreakdown best;
  double best_total = -1;
  for (const Moment& mo : moments) {
    MemoryBreakdown b = state;
    b[MemCategory::Activations] += kF32 * mo.act;
    b[MemCategory::Comm] += kF32 * mo.comm;
    b[MemCategory::Workspace] += kF32 * mo.work;
    b[MemCategory::Grads] += kF32 * mo.grads_extra;
    if (b.total() > best_total) best_total = b.total(), best = b;
  }
  return best;
}

// ShardStore lays every shard 64-byte aligned (16 floats): src/parallel/layout_common.cpp.
int64_t aligned(int64_t n) {
  return (n + 15) / 16 * 16;
}

// The parameters of one block, elements: input norm, q, k, v, o, post norm, gate, up, down (the
// order of fsdp-cp's layer unit).
std::vector<int64_t> block_param_numels(const Dims& s) {
  const int64_t q = s.nh * s.d, kv = s.nkv * s.d;
  return {s.h, q * s.h, kv * s.h, kv * s.h, s.h * q, s.h, s.F * s.h, s.F * s.h, s.h * s.F};
}

// Parameters held by this rank, floats, as ShardStore allocates them (each shard aligned):
// matrices split `w` ways (embedding and LM head by vocabulary rows); RMSNorm weights whole, or
// split too when `split_norms` (fsdp-cp cuts every parameter).
int64_t params_held(const Dims& s, int w, bool split_norms = false) {
  const int64_t norm = split_norms ? s.h / w : s.h;
  int64_t block = 0;
  for (size_t i = 0; i < block_param_numels(s).size(); ++i) {
    const bool is_norm = i == 0 || i == 5;
    block += aligned(is_norm ? norm : block_param_numels(s)[i] / w);
  }
  const int64_t vocab = aligned(s.V / w * s.h) * (s.tied ? 1 : 2);
  return s.L * block + vocab + aligned(norm);
}

// A unit of fsdp-cp (src/parallel/fsdp_cp.cpp, struct Unit): its full tensors one after another,
// each aligned, and this rank's pieces likewise.
struct UnitSize {
  int64_t full = 0, piece = 0;
};
UnitSize unit_size(const std::vector<int64_t>& numels, int64_t D) {
  UnitSize u;
  for (int64_t e : numels) {
    u.full += aligned(e);
    u.piece += aligned(e / D);
  }
  return u;
}

}  // namespace

MemoryBreakdown predict_local_memory(const LlamaConfig& m, const LayoutSpec& l, int64_t B,
                                     int64_t S, bool optimizer) {
  const Dims s = dims_of(m);
  TSP_CHECK(B % l.R == 0, "predict_local_memory: B={} rows do not split over R={} replicas", B,
            l.R);
  const int64_t Br = B / l.R, h = s.h, d = s.d;
  const int64_t w = l.name == "single" || l.name == "sp" ? 1 : (l.name == "tp-sp" ? l.T : l.D);
  const bool fsdp = l.name == "fsdp-cp";
  MemoryBreakdown state;
  const int64_t held = params_held(s, static_cast<int>(w), fsdp);
  state[MemCategory::Weights] = kF32 * held;
  state[MemCategory::Grads] = kF32 * held;
  if (optimizer) state[MemCategory::Optimizer] = 2 * kF32 * held;  // AdamW m and v, fp32

  std::vector<Moment> moments;
  if (l.name == "single") {
    // src/parallel/single.cpp: x, xn, dxn, dx [n, h] and d_o, dq [n, nh·d], dk, dv [n, nkv·d]
    // live through the whole backward; layer L-1's backward has all L layers saved.
    const int64_t n = Br * S, qw = s.nh * d, kw = s.nkv * d;
    const int64_t act = s.L * saved_floats(s, n, s.nh, s.nkv, n) + n;  // + rstd of the final norm
    const int64_t base = 4 * n * h + 2 * n * qw + 2 * n * kw;
    const int64_t r = std::min(n, kChunk);
    moments.push_back({act, 0, base + 5 * r * s.F});   // mlp_backward chunk buffers
    moments.push_back({act, 0, base + n * h});         // rmsnorm_backward_add temp
    moments.push_back({act, 0, 3 * n * h + r * s.V});  // loss head: logits chunk
    moments.push_back({act, 0, base + attention_backward_scratch(d, s.nkv)});
  } else if (l.name == "tp" || l.name == "sp" || l.name == "tp-sp") {
    // src/parallel/tp_sp.cpp with T tensor and Σ sequence ranks.
    const int64_t T = l.name == "tp" ? l.D : (l.name == "sp" ? 1 : l.T);
    const int64_t Sg = l.D / T;
    const int64_t n = Br * S / Sg, all = Br * S, hq = s.nh / T, hkv = s.nkv / T;
    const int64_t qw = hq * d, kw = hkv * d, Ft = s.F / T, Vt = s.V / T;
    const int64_t r = std::min(n, kChunk);
    // Saved: K/V of the whole rows (gathered over Σ) when Σ > 1.
    const int64_t act = s.L * saved_floats(s, n, hq, hkv, Sg > 1 ? all : n) + n;
    // Σ > 1: the gradients of embedding / final norm / LM head are staged (Comm) through the
    // whole backward, each layer's in its own stage buffer during its backward.
    const int64_t outer_stage = Sg > 1 ? Vt * h * (s.tied ? 1 : 2) + h : 0;
    const int64_t layer_stage = Sg > 1 ? (2 * h * qw + 2 * h * kw + 3 * Ft * h) + 2 * h
                                       : 0;  // q,k,v,o rows/cols + gate,up,down
    const int64_t base = 3 * n * h;          // run(): x, xn, dx
    const int64_t kv_rows = Sg > 1 ? all : n;
    moments.push_back({act, outer_stage + layer_stage, base + n * h + 5 * r * Ft});  // MLP bwd
    moments.push_back({act, outer_stage + layer_stage + (T > 1 ? 0 : 0), base + 2 * n * h});
    // attention backward: dxn, d_o, dq, dk and dv of every key
    moments.push_back(
        {act, outer_stage + layer_stage,
         base + n * h + 2 * n * qw + 2 * kv_rows * kw + attention_backward_scratch(d, hkv)});
    if (Sg > 1)  // reduce-scatter of dV: dq, full dK/dV, dk_local, dv_local, the send buffer
      moments.push_back({act, outer_stage + layer_stage + all * kw,
                         base + n * h + n * qw + 2 * all * kw + 2 * n * kw});
    // loss head (forward): x, xn, dxn and one [rows, V/T] logits chunk; T > 1: statistics
    moments.push_back({act, outer_stage + (T > 1 ? 3 * n + 3 * n * T : 0), 3 * n * h + r * Vt});
  } else if (l.name == "tsp") {
    // src/parallel/tsp.cpp, D ranks: all heads of n = B·S/D tokens saved; head group r of
    // hq = nh/D query and hkv = nkv/D kv heads in flight.
    const int64_t D = l.D, n = Br * S / D, all = Br * S, hq = s.nh / D, hkv = s.nkv / D;
    const int64_t qw = hq * d, kw = hkv * d, f = s.F / D, vs = s.V / D;
    const int64_t r = std::min(n, kChunk);
    const int64_t act = s.L * saved_floats(s, n, s.nh, s.nkv, n) + n;
    const int64_t norm_grads = D > 1 ? (2 * s.L + 1) * h : 0;  // Grads: one all-reduce at the end
    const int64_t base = 3 * n * h + 2 * n * h;  // run(): x, xn, dx; layer_backward: xn, dxn
    const int64_t mlp_shard = 3 * f * h, attn_shard = 2 * h * qw + 2 * h * kw;
    if (D > 1) {
      // MLP ring backward: two weight buffers, two travelling accumulators (+ part when D > 2),
      // mlp_backward's five [rows, f] buffers.
      moments.push_back({act, 2 * mlp_shard + 2 * mlp_shard + (D > 2 ? mlp_shard : 0),
                         base + 5 * r * f, norm_grads});
      // attention rounds backward: two broadcast buffers, two partial-gradient buffers, gathered
      // K and V (all tokens of head group r), their swapped dK/dV send buffers; workspace d_o,
      // dq, dK, dV (all tokens), dk, dv (own tokens), K/V in row order.
      moments.push_back({act, 2 * attn_shard + 2 * attn_shard + 2 * all * kw + 2 * all * kw,
                         base + 2 * n * qw + 2 * all * kw + 2 * n * kw + 2 * all * kw +
                             attention_backward_scratch(d, hkv),
                         norm_grads});
      // loss head backward ring: shard in hand + next, accumulators (+ part), logits, dlogits,
      // running statistics; x, xn, dxn of run().
      moments.push_back(
          {act, 2 * vs * h + 2 * vs * h + (D > 2 ? vs * h : 0), 3 * n * h + 2 * r * vs + 3 * n});
    } else {
      moments.push_back({act, 0, base + 5 * r * s.F});
      moments.push_back({act, 0, base + 2 * n * qw + 4 * n * kw + n * h});
      moments.push_back(
          {act, 0, base + 2 * n * qw + 2 * n * kw + attention_backward_scratch(d, s.nkv)});
      moments.push_back({act, 0, 3 * n * h + r * s.V});
    }
  } else if (fsdp) {
    // src/parallel/fsdp_cp.cpp (overlap on, the default), D ranks: all heads of n = B·S/D
    // tokens saved (local k, v only); units gathered whole into Comm buffers.
    const int64_t D = l.D, n = Br * S / D, all = Br * S, qw = s.nh * d, kw = s.nkv * d;
    const int64_t r = std::min(n, kChunk);
    const int64_t saved = saved_floats(s, n, s.nh, s.nkv, n);
    const UnitSize layer = unit_size(block_param_numels(s), D);
    const UnitSize head_grads =
        unit_size(s.tied ? std::vector<int64_t>{h} : std::vector<int64_t>{h, s.V * h},
                  D);                                          // final norm (+ LM head)
    const UnitSize head_unit = unit_size({h, s.V * h}, D);     // final norm + head matrix
    const int64_t embed_full = s.tied ? aligned(s.V * h) : 0;  // tied: kept through backward
    const int64_t kv_all = all * kw;                           // K or V of the whole rows
    const int64_t next = s.L > 0 ? layer.full : 0;             // layer L-1 prefetched
    // The head (forward and backward fused): all L layers saved; the head unit and the
    // prefetched layer L-1 gathered; the head's full gradients (and, tied, the embedding's).
    const int64_t act_all = s.L * saved + n;  // + rstd of the final norm
    const int64_t head_comm = head_unit.full + next + head_grads.full + embed_full;
    moments.push_back({act_all, head_comm, 3 * n * h + r * s.V});  // x, xn, dxn, logits chunk
    moments.push_back({act_all, head_comm, 5 * n * h});            // + dx, norm-backward temp
    moments.push_back({act_all, head_comm + head_grads.piece, 4 * n * h});  // reduce-scatter
    // The last layer's forward: it and the head unit gathered, K/V received and laid out.
    moments.push_back({act_all, layer.full + head_unit.full + 2 * kv_all, 2 * n * h + 2 * kv_all});
    // Backward of layer l (all saved activations up to l): its weights, the prefetch of l-1, its
    // full-size gradients being accumulated, the previous unit's gradients still in their
    // reduce-scatter (full + pieces: the head's for l = L-1, a layer's after that).
    for (int64_t l = s.L - 1; l >= std::max<int64_t>(0, s.L - 2); --l) {
      const int64_t act = (l + 1) * saved + n;
      const int64_t prev =
          l == s.L - 1 ? head_grads.full + head_grads.piece : layer.full + layer.piece;
      const int64_t outer = layer.full + (l > 0 ? layer.full : 0) + layer.full + prev + embed_full;
      const int64_t base = 4 * n * h;  // run(): x, xn, dx, dxn
      // MLP backward while K/V are re-gathered into their receive buffers
      moments.push_back({act, outer + 2 * kv_all, base + 5 * r * s.F});
      moments.push_back({act, outer + 2 * kv_all, base + n * h});  // norm-backward temp
      // K/V laid out [B, S, kv] while still in the receive buffers; d_o
      moments.push_back({act, outer + 2 * kv_all, base + n * qw + 2 * kv_all});
      // attention backward: d_o, dq, K, V, dK, dV of every key
      moments.push_back(
          {act, outer, base + 2 * n * qw + 4 * kv_all + attention_backward_scratch(d, s.nkv)});
      // dK/dV reduce-scatter: send buffer, dK, dV, local dk, dv
      moments.push_back({act, outer + kv_all, base + 2 * n * qw + 2 * kv_all + 2 * n * kw});
      // q/k/v backward and the input norm's backward temp
      moments.push_back({act, outer, base + 2 * n * qw + 2 * n * kw + n * h});
    }
  } else {
    TSP_FAIL(
        "predict_local_memory: no model of layout '{}' yet; add its allocations to "
        "src/plan/measure.cpp (single, tp, sp, tp-sp, tsp and fsdp-cp are modelled)",
        l.name);
  }
  return pick_peak(state, moments);
}

StepTraffic predict_local_traffic(const LlamaConfig& m, const LayoutSpec& l, int64_t B, int64_t S,
                                  int group_rank) {
  const Dims s = dims_of(m);
  const int64_t Br = B / l.R, N = Br * S, h = s.h, e = kF32;
  const int64_t world = static_cast<int64_t>(l.D) * l.R;
  StepTraffic t;
  // The loss: one int64 per rank all-gathered over the world, in forward() and forward_backward().
  t.forward += ag(world, 8);
  // One source of truth for the blocks: block_comm (sp and tp-sp keep the gathered K/V, as
  // tp_sp.cpp does; tsp and fsdp-cp re-gather whatever regather_kv says).
  const BlockComm blk = block_comm(m, l, N, static_cast<int>(e), /*regather_kv=*/false);
  for (int64_t i = 0; i < s.L; ++i) {
    t.forward += blk.forward;
    t.backward += blk.backward;
  }
  const int64_t vocab_mats = s.tied ? 1 : 2;
  if (l.name == "tp" || l.name == "sp" || l.name == "tp-sp") {
    const int64_t T = l.name == "tp" ? l.D : (l.name == "sp" ? 1 : l.T), Sg = l.D / T;
    const int64_t n = N / Sg;
    if (T > 1) {
      t.forward += ar(T, n * h * e);   // embedding: vocabulary-parallel lookup summed
      t.forward += ag(T, 3 * n * e);   // loss statistics (max, sum-exp, target)
      t.backward += ar(T, n * h * e);  // loss head's dxn
    }
    if (Sg > 1)
      t.backward += ar(Sg, (s.V / T * h * vocab_mats + h) * e);  // embedding, final norm, head
  } else if (l.name == "tsp" && l.D > 1) {
    const int64_t D = l.D, shard = s.V / D * h * e;
    t.forward += hops(D - 1, shard);  // embedding ring
    t.forward += hops(D - 1, shard);  // loss head ring (online cross-entropy)
    // LM head backward ring: the shard in hand starts it (D-2 weight hops), the gradient
    // accumulator makes D-1 hops; the embedding gradient accumulator D-1 hops, no weights.
    t.backward += hops(D - 2, shard);
    t.backward += hops(D - 1, shard);
    t.backward += hops(D - 1, shard);
    t.backward += ar(D, (2 * s.L + 1) * h * e);  // replicated RMSNorm gradients
  } else if (l.name == "fsdp-cp" && l.D > 1) {
    // Units outside the blocks, gathered per parameter (blocks of numel/D) and their gradients
    // reduce-scattered back (docs/communication.md, fsdp-cp).
    const int64_t D = l.D, table = s.V / D * h * e, norm = h / D * e;
    t.forward += ag(D, table);                // embedding, for the lookup
    t.forward += ag(D, norm);                 // head: final norm ...
    t.forward += ag(D, table);                // ... and LM head (the embedding again when tied)
    t.backward += ag(D, norm);                // final-norm gradient (reduce-scatter: same count)
    if (!s.tied) t.backward += ag(D, table);  // LM-head gradient
    t.backward += ag(D, table);               // embedding gradient (tied: + the head's part)
  } else if (l.name != "single" && l.name != "tsp" && l.name != "fsdp-cp") {
    TSP_FAIL("predict_local_traffic: no model of layout '{}' yet (src/plan/measure.cpp)", l.name);
  }
  if (l.R > 1) {
    // LayoutCommon: the whole gradient slab all-reduced over the replicas.
    const int64_t w = l.name == "single" || l.name == "sp" ? 1 : (l.name == "tp-sp" ? l.T : l.D);
    t.backward += ar(l.R, params_held(s, static_cast<int>(w), l.name == "fsdp-cp") * e);
  }
  (void)group_rank;  // broadcast roots: every rank is root once per round set, so totals agree
  return t;
}

CommStats measure_call_traffic(Layout& layout, Communicator& world,
                               const std::function<void()>& call) {
  // tp, sp, tp-sp fold their sub-communicators' traffic into group().stats() at the end of each
  // call, so world + group + replicas covers every layout.
  Communicator* comms[3] = {&world, &layout.group(), &layout.replicas()};
  CommStats before[3];
  for (int i = 0; i < 3; ++i) before[i] = comms[i]->stats();
  call();
  CommStats total;
  for (int i = 0; i < 3; ++i) {
    bool seen = false;  // the same communicator object twice (e.g. R = 1 with no split) counts once
    for (int j = 0; j < i; ++j) seen = seen || comms[j] == comms[i];
    if (!seen) total += comms[i]->stats() - before[i];
  }
  return total;
}

LayoutSpec layout_spec_of(Layout& layout, int world_size) {
  LayoutSpec l;
  l.name = layout.name();
  l.D = layout.group().size();
  l.R = layout.replicas().size();
  TSP_CHECK(l.D * l.R == world_size, "layout {}: D={} × R={} is not the world size {}", l.name, l.D,
            l.R, world_size);
  l.T = l.name == "tp" ? l.D : 1;
  if (l.name == "tp-sp") l.T = tp_sp_degrees(layout).T;
  return l;
}

}  // namespace tsp::plan
