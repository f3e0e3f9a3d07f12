// Closed-form cost model; every formula is derived in docs/cost-model.md (section numbers below).
#include "tsp/plan/cost_model.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include <fmt/format.h>

#include "tsp/core/error.h"

namespace tsp::plan {

std::string_view mode_name(Mode m) {
  switch (m) {
    case Mode::Train:
      return "train";
    case Mode::Prefill:
      return "prefill";
    case Mode::Decode:
      return "decode";
  }
  return "?";
}

int LayoutSpec::weight_shards() const {
  if (name == "tp" || name == "tsp" || name == "fsdp-cp") return D;
  if (name == "tp-sp") return T;
  return 1;  // single, sp
}

int LayoutSpec::token_shards() const {
  if (name == "sp" || name == "tsp" || name == "fsdp-cp") return D;
  if (name == "tp-sp") return D / T;
  return 1;  // single, tp
}

std::string LayoutSpec::label() const {
  std::string s =
      name == "tp-sp" ? fmt::format("tp-sp T={} S={}", T, D / T) : fmt::format("{} D={}", name, D);
  if (R > 1) s += fmt::format(" R={}", R);
  return s;
}

double Link::group_bw(int k) const {
  if (k <= 1) return bw_bytes_per_s;
  return mesh ? bw_bytes_per_s * (k - 1) : bw_bytes_per_s;
}

double MemoryBreakdown::total() const {
  return std::accumulate(bytes.begin(), bytes.end(), 0.0);
}

namespace {

// Shapes of one block (docs §1).
struct Shape {
  int64_t h, kv, I, nh, V, L;
  int64_t attn_params() const { return 2 * h * h + 2 * kv * h; }  // q, k, v, o
  int64_t mlp_params() const { return 3 * I * h; }                // gate, up, down
  int64_t block_matrix_params() const { return attn_params() + mlp_params(); }
  int64_t norm_params() const { return 2 * h; }  // input and post-attention RMSNorm weights
  // Elements of one rank's row pieces of a whole block (fsdp-cp cuts every parameter, norms
  // included, into D pieces; D divides every parameter's rows, so this is the sum of the pieces).
  int64_t block_params_per_piece(int64_t D) const {
    return (block_matrix_params() + norm_params()) / D;
  }
};
Shape shape_of(const LlamaConfig& m) {
  return {m.hidden_size,         m.kv_dim(),   m.intermediate_size,
          m.num_attention_heads, m.vocab_size, m.num_hidden_layers};
}

// Communicator counting convention (include/tsp/comm/communicator.h), B in bytes.
Traffic all_gather(int64_t k, int64_t block) {
  return {(k - 1) * block, (k - 1) * block};
}
Traffic reduce_scatter(int64_t k, int64_t block_out) {
  return {(k - 1) * block_out, (k - 1) * block_out};
}
Traffic all_reduce(int64_t k, int64_t B) {
  const int64_t x = 2 * (k - 1) * B / k;
  return {x, x};
}
// D rounds of broadcast (round r rooted at rank r) of a B-byte block: each rank is root once
// (sends B) and receives the D-1 others.
Traffic broadcast_rounds(int64_t D, int64_t B) {
  return {B, (D - 1) * B};
}
// D rounds of reduce to root r: each rank sends D-1 times and receives (as root) once.
Traffic reduce_rounds(int64_t D, int64_t B) {
  return {(D - 1) * B, B};
}
// A ring of D-1 hops of a B-byte block.
Traffic ring(int64_t D, int64_t B) {
  return {(D - 1) * B, (D - 1) * B};
}

bool is_sp_family(const std::string& n) {
  return n == "sp" || n == "tp-sp" || n == "fsdp-cp";
}

}  // namespace

// ---- §2 communication per block -------------------------------------------------------------

BlockComm block_comm(const LlamaConfig& m, const LayoutSpec& l, int64_t N, int elem_bytes,
                     bool regather_kv) {
  const Shape s = shape_of(m);
  const int64_t e = elem_bytes, D = l.D;
  BlockComm c;
  if (l.name == "single" || D == 1) return c;
  if (l.name == "tp") {
    // forward: all-reduce after o_proj and after down_proj, each [N, h]; backward: the dual
    // all-reduces of dx before the q/k/v and gate/up projections.
    for (int i = 0; i < 2; ++i) c.forward += all_reduce(D, N * s.h * e);
    c.backward = c.forward;
  } else if (l.name == "sp" || l.name == "fsdp-cp") {
    const bool fsdp = l.name == "fsdp-cp";
    const int64_t kv_block = (N / D) * s.kv * e;  // this rank's k (or v) rows
    c.forward += all_gather(D, kv_block);
    c.forward += all_gather(D, kv_block);
    // fsdp-cp saves only the local k, v (like tsp) and always re-gathers; sp keeps the gathered
    // K/V unless asked (MemoryAssumptions::sp_keeps_gathered_kv).
    if (regather_kv || fsdp) c.backward = c.forward;
    c.backward += reduce_scatter(D, kv_block);  // dK
    c.backward += reduce_scatter(D, kv_block);  // dV
    if (!fsdp) {
      // every rank holds the whole block: its weight gradients — the matrices and the two
      // RMSNorm vectors, replicated too — are all-reduced over the group in one call
      c.backward += all_reduce(D, (s.block_matrix_params() + s.norm_params()) * e);
    } else {
      // FSDP: gather the whole layer (matrices and norms, one all-gather per parameter of
      // numel/D elements) before use, in forward and again in backward; reduce-scatter its
      // gradients back to the pieces
      const int64_t w_block = s.block_params_per_piece(D) * e;
      c.forward += all_gather(D, w_block);
      c.backward += all_gather(D, w_block);
      c.backward += reduce_scatter(D, w_block);
    }
  } else if (l.name == "tp-sp") {
    const int64_t T = l.T, Sg = D / l.T;
    const int64_t Nl = N / Sg;  // tokens of this Σ-shard
    if (T > 1)
      for (int i = 0; i < 2; ++i) c.forward += all_reduce(T, Nl * s.h * e);
    Traffic tp_bwd = c.forward;  // the dual all-reduces of dx
    if (Sg > 1) {
      const int64_t kv_block = Nl * (s.kv / T) * e;
      c.forward += all_gather(Sg, kv_block);
      c.forward += all_gather(Sg, kv_block);
      c.backward += tp_bwd;
      if (regather_kv) {
        c.backward += all_gather(Sg, kv_block);
        c.backward += all_gather(Sg, kv_block);
      }
      c.backward += reduce_scatter(Sg, kv_block);
      c.backward += reduce_scatter(Sg, kv_block);
      // weights are replicated over Σ: their gradient shards (M/T matrix elements and the two
      // RMSNorm vectors) are all-reduced over it in one call
      c.backward += all_reduce(Sg, (s.block_matrix_params() / T + s.norm_params()) * e);
    } else {
      c.backward += tp_bwd;
    }
  } else if (l.name == "tsp") {
    const int64_t attn_shard = s.attn_params() / D * e;  // packed [Wq_r; Wk_r; Wv_r; Wo_r]
    const int64_t mlp_shard = s.mlp_params() / D * e;    // gate/up rows + down columns
    const int64_t kv_block = (N / D) * (s.kv / D) * e;   // this rank's k rows of head group r
    Traffic kv_gathers;                                  // D head groups, K and V each
    for (int64_t r = 0; r < D; ++r) {
      kv_gathers += all_gather(D, kv_block);
      kv_gathers += all_gather(D, kv_block);
    }
    c.forward += broadcast_rounds(D, attn_shard);
    c.forward += ring(D, mlp_shard);
    c.forward += kv_gathers;
    // backward (docs/tsp-schedule.md): shards again, K/V re-gathered, dK/dV reduce-scattered per
    // group, attention-shard gradients reduced to their owner, MLP gradients travel the ring with
    // the shard (a fused ring reduce-scatter: D-1 hops of the gradient block).
    c.backward += broadcast_rounds(D, attn_shard);
    c.backward += kv_gathers;
    for (int64_t r = 0; r < D; ++r) {
      c.backward += reduce_scatter(D, kv_block);
      c.backward += reduce_scatter(D, kv_block);
    }
    c.backward += reduce_rounds(D, attn_shard);
    c.backward += ring(D, mlp_shard);
    c.backward += ring(D, mlp_shard);
  } else {
    TSP_FAIL("unknown layout '{}'; use single, tp, sp, tp-sp, tsp or fsdp-cp", l.name);
  }
  return c;
}

// ---- validation and enumeration -------------------------------------------------------------

namespace {
std::string divisors_list(int64_t n, int64_t limit) {
  std::string out;
  for (int64_t d = 1; d <= std::min(n, limit); ++d)
    if (n % d == 0) {
      if (!out.empty()) out += ',';
      out += std::to_string(d);
    }
  return out;
}
}  // namespace

void check_layout(const LlamaConfig& m, const LayoutSpec& l, const Workload& w) {
  static const char* kNames[] = {"single", "tp", "sp", "tp-sp", "tsp", "fsdp-cp"};
  TSP_CHECK(std::find(std::begin(kNames), std::end(kNames), l.name) != std::end(kNames),
            "unknown layout '{}'; use single, tp, sp, tp-sp, tsp or fsdp-cp", l.name);
  TSP_CHECK(l.D >= 1 && l.R >= 1, "{}: degrees must be positive (D={}, R={})", l.name, l.D, l.R);
  TSP_CHECK(l.name != "single" || l.D == 1, "single: D must be 1, got {}", l.D);
  const int64_t nkv = m.num_key_value_heads;
  const int heads_split = l.name == "tp" || l.name == "tsp" ? l.D : l.name == "tp-sp" ? l.T : 1;
  if (l.name == "tp-sp")
    TSP_CHECK(l.T >= 1 && l.D % l.T == 0, "tp-sp: T={} does not divide D={}; use T in {{{}}}", l.T,
              l.D, divisors_list(l.D, l.D));
  TSP_CHECK(nkv % heads_split == 0,
            "{}: num_key_value_heads={} is not divisible by the head split {}; use a degree in "
            "{{{}}}",
            l.label(), nkv, heads_split, divisors_list(nkv, nkv));
  TSP_CHECK(m.intermediate_size % heads_split == 0 && m.vocab_size % l.weight_shards() == 0 &&
                ((l.name != "tsp" && l.name != "fsdp-cp") || m.hidden_size % l.D == 0),
            "{}: intermediate_size={}, vocab_size={} or hidden_size={} is not divisible by the "
            "weight split {}",
            l.label(), m.intermediate_size, m.vocab_size, m.hidden_size, l.weight_shards());
  const int ts = l.token_shards();
  if (w.mode != Mode::Decode && ts > 1)
    // zigzag: 2·shards equal chunks of every sequence
    TSP_CHECK(w.S % (2 * ts) == 0,
              "{}: sequence length {} is not divisible by 2x{} (zigzag chunks); use a multiple "
              "of {}",
              l.label(), w.S, ts, 2 * ts);
}

std::vector<LayoutSpec> enumerate_layouts(const Workload& w, int gpus, int only_degree) {
  TSP_CHECK(gpus >= 1, "--gpus must be positive, got {}", gpus);
  TSP_CHECK(only_degree == 0 || gpus % only_degree == 0,
            "degree D={} does not divide {} GPUs; use D in {{{}}}", only_degree, gpus,
            divisors_list(gpus, gpus));
  std::vector<LayoutSpec> out;
  auto add = [&](LayoutSpec l) {
    try {
      check_layout(w.model, l, w);
      out.push_back(l);
    } catch (const Error&) {
      // not a valid factorization for this model/workload: not listed
    }
  };
  for (int D = 1; D <= gpus; ++D) {
    if (gpus % D != 0 || (only_degree && D != only_degree)) continue;
    const int R = gpus / D;
    if (D == 1) {
      add({"single", 1, 1, R});
      continue;
    }
    for (const char* n : {"tp", "sp", "tsp", "fsdp-cp"})
      add({n, D, n == std::string("tp") ? D : 1, R});
    for (int T = 2; T < D; ++T)
      if (D % T == 0) add({"tp-sp", D, T, R});
  }
  return out;
}

// ---- §3 memory ------------------------------------------------------------------------------

namespace {

struct Split {
  int64_t w;   // weight shards
  int64_t t;   // token shards
  int64_t hd;  // head shards of saved attention tensors (q, o) and of the MLP width
};
Split split_of(const LayoutSpec& l) {
  if (l.name == "tp") return {l.D, 1, l.D};
  if (l.name == "tp-sp") return {l.T, l.D / l.T, l.T};
  if (l.name == "sp") return {1, l.D, 1};
  if (l.name == "tsp" || l.name == "fsdp-cp") return {l.D, l.D, 1};
  return {1, 1, 1};
}

MemoryBreakdown memory_of(const Workload& w, const LayoutSpec& l, const MemoryAssumptions& a) {
  const Shape s = shape_of(w.model);
  const Split sp = split_of(l);
  const double ab = a.act_bytes;
  const double N = static_cast<double>(w.tokens_per_microbatch());
  const double ctx = w.mode == Mode::Decode ? w.S : w.B * w.S;  // cached positions
  const bool train = w.mode == Mode::Train;
  // Parameters: matrices (embedding, head, blocks) split by the weight split; RMSNorm weights
  // replicated everywhere (O(h) each).
  const double norms = static_cast<double>(s.L * 2 * s.h + s.h);
  const double matrices = static_cast<double>(w.model.num_parameters()) - norms;
  const double params_here = matrices / sp.w + norms;

  MemoryBreakdown mb;
  using C = MemCategory;
  mb[C::Weights] = a.weight_bytes * params_here;
  if (train) {
    mb[C::Grads] = a.grad_bytes * params_here;
    mb[C::Optimizer] = a.optimizer_bytes * params_here;
    const bool replicated_grads = l.R > 1 || (l.name == "sp" && l.D > 1) ||
                                  (l.name == "tp-sp" && l.D / l.T > 1) ||
                                  (l.name == "single" && l.R > 1);
    if (a.grad_bucket_copy && replicated_grads) mb[C::Comm] += a.grad_bytes * params_here;
  }

  const bool tsp = l.name == "tsp";
  const bool fsdp = l.name == "fsdp-cp";
  const double kv_group = N * s.kv / l.D * ab;  // tsp: one head group's K or V, all tokens
  if (train) {
    // Saved per layer: layer input, q and o (and the attention log-sum-exp), K and V as the
    // attention consumed them (docs §3.2).
    double per_layer = N * s.h / sp.t * ab                  // x_in
                       + 2 * N * s.h / (sp.t * sp.hd) * ab  // q, o
                       + N * s.nh / (sp.t * sp.hd) * 4.0;   // lse, fp32
    // tsp and fsdp-cp save only the local k, v (their implementations re-gather in backward).
    if (tsp || fsdp || (is_sp_family(l.name) && !a.sp_keeps_gathered_kv))
      per_layer += 2 * N * s.kv / (sp.t * sp.hd) * ab;  // local k, v only
    else
      per_layer += 2 * N * s.kv / sp.hd * ab;  // all tokens of the group, own heads
    mb[C::Activations] = per_layer * s.L;

    // Transients of the busiest moment: the backward of one layer, or the loss (docs §3.3).
    const double mlp_cols = tsp ? static_cast<double>(s.I) / l.D : static_cast<double>(s.I) / sp.hd;
    double layer_ws = 2 * N * s.h / sp.t * ab              // recomputed norm output, dx
                      + 2 * N * s.h / (sp.t * sp.hd) * ab  // dq, do
                      + 4 * N * mlp_cols / sp.t * ab;      // gate, up, act, one gradient
    double layer_comm = 0;
    if (tsp) {
      // src/parallel/tsp.cpp runs a layer's backward in two phases that never overlap, each with
      // its own buffers (freed when it ends); the busier one counts.
      //  - MLP ring: the shard in hand and the next (2 weight shards); the travelling gradient
      //    accumulator double-buffered plus the step's own part (3 gradient shards; 2 at D = 2).
      //  - attention rounds: the broadcast shard in use and the prefetched one (2), the partial
      //    gradient being reduced to its owner and the next round's (2); K, V of head group r
      //    and their gradients (all tokens); d_o, dq of the rank's tokens for head group r.
      const double base_ws = 2 * N * s.h / sp.t * ab;  // recomputed norm output, dx
      const double mlp_ws = base_ws + 4 * N * mlp_cols / sp.t * ab;
      const double mlp_comm = l.D > 1
                                  ? 2.0 * s.mlp_params() / l.D * a.weight_bytes +
                                        (l.D > 2 ? 3.0 : 2.0) * s.mlp_params() / l.D * a.grad_bytes
                                  : 0;
      const double attn_ws = base_ws + 2 * N / l.D * (static_cast<double>(s.h) / l.D) * ab;
      const double attn_comm = l.D > 1
                                   ? 4 * kv_group + 2.0 * s.attn_params() / l.D * a.weight_bytes +
                                         2.0 * s.attn_params() / l.D * a.grad_bytes
                                   : 0;
      if (mlp_ws + mlp_comm >= attn_ws + attn_comm) {
        layer_ws = mlp_ws;
        layer_comm = mlp_comm;
      } else {
        layer_ws = attn_ws;
        layer_comm = attn_comm;
      }
    } else {
      if (l.name == "tp" || l.name == "tp-sp")
        layer_comm += N * s.h / sp.t * ab;  // all-reduce buffer of the residual branch
      if (is_sp_family(l.name) && l.D > 1)
        layer_comm += 2 * N * s.kv / sp.hd * ab;  // full dK, dV before the reduce-scatter
      if (fsdp) {
        // src/parallel/fsdp_cp.cpp, a layer's backward: the layer gathered whole (matrices and
        // norms) and the next one prefetched; its full-size gradients and the previous layer's
        // still in their reduce-scatter (full + pieces); K, V re-gathered for every key; tied
        // embeddings: the full [V, h] gradient waits through the backward for the lookup's part.
        const double layer_params = static_cast<double>(s.block_matrix_params() + 2 * s.h);
        layer_comm += 2.0 * layer_params * a.weight_bytes +
                      (2.0 + 1.0 / l.D) * layer_params * a.grad_bytes + 2 * N * s.kv * ab;
        if (w.model.tie_word_embeddings)
          layer_comm += static_cast<double>(s.V) * s.h * a.grad_bytes;
      }
    }
    // Loss: fp32 logits and their gradient for this rank's tokens and vocabulary columns. TSP
    // never forms full logits: one [N/D, V/D] block at a time (online cross-entropy).
    const double vocab_cols = tsp ? static_cast<double>(s.V) / l.D
                                  : static_cast<double>(s.V) / (l.name == "sp" ? 1 : sp.w);
    const double loss_ws = 2 * N / sp.t * vocab_cols * 4.0;
    if (layer_ws + layer_comm >= loss_ws) {
      mb[C::Workspace] = layer_ws;
      mb[C::Comm] += layer_comm;
    } else {
      mb[C::Workspace] = loss_ws;
    }
  } else {
    // Inference: the K/V cache of every layer (tokens split by token shards, heads by the head
    // split; tsp keeps the cache of its own tokens for all heads).
    const double kv_heads_split = tsp || fsdp || l.name == "sp" ? 1 : sp.hd;
    mb[C::Activations] = 2.0 * s.L * w.B * ctx * s.kv / (sp.t * kv_heads_split) * ab;
    if (w.mode == Mode::Prefill) {
      // one layer's forward in flight
      const double mlp_cols =
          tsp ? static_cast<double>(s.I) / l.D : static_cast<double>(s.I) / sp.hd;
      mb[C::Workspace] = 2 * N * s.h / sp.t * ab + 2 * N * s.h / (sp.t * sp.hd) * ab +
                         3 * N * mlp_cols / sp.t * ab;
      if (tsp)
        mb[C::Comm] = 2 * kv_group + 2.0 * s.block_matrix_params() / l.D * a.weight_bytes;
      else if (is_sp_family(l.name) && l.D > 1)
        mb[C::Comm] = 2 * N * s.kv / sp.hd * ab;
      if (fsdp) mb[C::Comm] += 2.0 * s.block_matrix_params() * a.weight_bytes;
    } else {
      mb[C::Workspace] = 4.0 * w.B * (s.h + s.I) * ab;  // one token's activations
      if (fsdp) mb[C::Comm] = 2.0 * s.block_matrix_params() * a.weight_bytes;
    }
  }
  return mb;
}

// ---- §4 time --------------------------------------------------------------------------------

// The link a collective over `k` ranks spaced `stride` apart uses: inside a node when the group
// fits in one, else the NIC (rails-only: GPU i's traffic leaves through NIC i).
struct Axis {
  int k = 1;
  const Link* link = nullptr;
  bool inter = false;
  double bw() const { return link->group_bw(inter ? 2 : k); }
  double ring_bw() const { return link->bw_bytes_per_s; }  // one neighbour at a time
};
Axis axis_of(const Hardware& hw, int k, int stride) {
  const bool inside =
      static_cast<int64_t>(k) * stride <= hw.gpus_per_node && hw.gpus_per_node % (k * stride) == 0;
  Axis ax;
  ax.k = k;
  ax.inter = !inside;
  ax.link = inside ? &hw.intra : &hw.inter;
  return ax;
}

double t_all_gather(const Axis& a, double block) {
  return a.k <= 1 ? 0 : (a.k - 1) * (a.link->alpha_s + block / a.bw());
}
double t_all_reduce(const Axis& a, double B) {
  return a.k <= 1 ? 0 : 2 * (a.k - 1) * a.link->alpha_s + 2.0 * (a.k - 1) / a.k * B / a.bw();
}
// Bandwidth-optimal broadcast (scatter + all-gather).
double t_broadcast(const Axis& a, double B) {
  return a.k <= 1 ? 0 : 2 * (a.k - 1) * a.link->alpha_s + 2.0 * (a.k - 1) / a.k * B / a.bw();
}
double t_ring_hop(const Axis& a, double B) {
  return a.link->alpha_s + B / a.ring_bw();
}

struct Accum {
  double intra = 0, inter = 0;
  void add(const Axis& a, double bytes) { (a.inter ? inter : intra) += bytes; }
};

}  // namespace

Estimate estimate(const Workload& w, const LayoutSpec& l, const Hardware& hw,
                  const MemoryAssumptions& a) {
  check_layout(w.model, l, w);
  const Shape s = shape_of(w.model);
  const Split sp = split_of(l);
  Estimate est;
  est.layout = l;
  est.memory = memory_of(w, l, a);
  est.fits = est.memory.total() <= hw.mem_capacity;

  const double e = a.act_bytes, we = a.weight_bytes, ge = a.grad_bytes;
  const double N = static_cast<double>(w.tokens_per_microbatch());
  const double D = l.D;
  const double Pm = static_cast<double>(s.block_matrix_params());
  const double gemm_rate = hw.peak_flops * hw.gemm_eff;
  const double attn_rate = hw.peak_flops * hw.attn_eff;
  const bool decode = w.mode == Mode::Decode;
  const bool train = w.mode == Mode::Train;

  // Axes: ranks of a replica are contiguous; tp-sp numbers T fastest, then Σ; replicas outermost.
  const int T = l.name == "tp-sp" ? l.T : 1;
  const int Sg = l.name == "tp-sp" ? l.D / l.T : 1;
  const Axis group = axis_of(hw, l.D, 1);
  const Axis t_axis = axis_of(hw, T, 1);
  const Axis s_axis = axis_of(hw, Sg, T);
  const Axis dp_axis = axis_of(hw, l.R, l.D);
  Accum bytes;     // per layer and micro-batch
  Accum dp_bytes;  // per step

  // Per-rank FLOPs of one layer's forward: GEMMs and causal attention are split D ways under
  // every layout except sp's decode, where every rank holds the whole block (docs §4.1).
  double gemm_f, attn_f;
  if (decode) {
    const double ctx = static_cast<double>(w.S);
    const double split = l.name == "sp" || l.name == "single" ? 1 : (l.name == "tp-sp" ? T : D);
    gemm_f = 2 * N * Pm / split;
    attn_f = 4 * N * ctx * s.h / D;
  } else {
    gemm_f = 2 * N * Pm / D;
    attn_f = 2.0 * w.B * static_cast<double>(w.S) * w.S * s.h / D;  // causal: half of 4·S²·h
  }
  const double t_gemm = gemm_f / gemm_rate;
  const double t_attn = attn_f / attn_rate;
  // Training recomputes o_proj, gate and up (docs §3.2), then backward costs 2x the GEMMs and
  // 2.5x the attention forward (flash attention's backward: 5 matmuls against 2).
  const double recompute = (static_cast<double>(s.h) * s.h + 2.0 * s.I * s.h) / Pm;
  double t_fwd = t_gemm + t_attn;
  double t_bwd = train ? (recompute + 2) * t_gemm + 2.5 * t_attn : 0;
  if (decode) {
    // Decode is bound by reading this rank's weights and K/V cache from memory.
    const double wsplit = l.name == "sp" || l.name == "single" ? 1 : sp.w;
    const double read =
        Pm / wsplit * we +
        2.0 * w.B * w.S * s.kv / (sp.t * (l.name == "tp" || l.name == "tp-sp" ? sp.hd : 1)) * e;
    t_fwd = std::max(t_fwd, read / hw.mem_bw);
  }
  double layer_flops = gemm_f + attn_f + (train ? (recompute + 2) * gemm_f + 2.5 * attn_f : 0);

  // Per-layer communication time, split into what is exposed and what can hide (docs §4.2).
  double exposed = 0;
  double grad_sync = 0;  // weight-gradient reductions: overlap with the backward of other layers
  const double q_proj = 2 * N * s.h * s.h / D / gemm_rate;
  const double in_proj_bwd = 2 * 2 * N * (s.h + 2.0 * s.kv) * s.h / D / gemm_rate;
  if (l.name == "tp" || (l.name == "tp-sp" && T > 1)) {
    const Axis& ax = l.name == "tp" ? group : t_axis;
    const double Nl = N / Sg;
    const double ar = t_all_reduce(ax, Nl * s.h * e);
    // forward 2, recomputed o_proj 1, backward 2: each on the critical path
    const int count = train ? 5 : 2;
    exposed += count * ar;
    bytes.add(ax, count * 2.0 * (ax.k - 1) / ax.k * Nl * s.h * e);
  }
  if (!decode && (l.name == "sp" || l.name == "fsdp-cp" || (l.name == "tp-sp" && Sg > 1))) {
    const Axis& ax = l.name == "tp-sp" ? s_axis : group;
    const double kv_block = N / ax.k * s.kv / T * e;
    const double ag = 2 * t_all_gather(ax, kv_block);
    exposed += std::max(0.0, ag - q_proj);  // only the q projection does not need K/V
    bytes.add(ax, 2.0 * (ax.k - 1) * kv_block);
    if (train) {
      const double rs = ag;  // dK, dV reduce-scatter: overlaps the input projections' backward
      exposed += std::max(0.0, rs - in_proj_bwd);
      bytes.add(ax, 2.0 * (ax.k - 1) * kv_block);
      if (!a.sp_keeps_gathered_kv || l.name == "fsdp-cp") {  // fsdp-cp always re-gathers
        exposed += std::max(0.0, ag - q_proj);
        bytes.add(ax, 2.0 * (ax.k - 1) * kv_block);
      }
      if (l.name != "fsdp-cp") {
        const double wb = (Pm / T + 2.0 * s.h) * ge;  // the shard's matrices and the two norms
        grad_sync += t_all_reduce(ax, wb);
        bytes.add(ax, 2.0 * (ax.k - 1) / ax.k * wb);
      }
    }
  }
  if (l.name == "fsdp-cp") {
    // gather the layer (prefetched during the previous layer: hides behind its compute);
    // backward gathers again and reduce-scatters the gradients, hidden behind backward compute
    const double layer_params = Pm + 2.0 * s.h;  // the matrices and the two norms
    const double block = layer_params / D * we;
    const double ag = t_all_gather(group, block);
    exposed += std::max(0.0, ag - t_fwd);
    bytes.add(group, (D - 1) * block);
    if (train) {
      const double rs = t_all_gather(group, layer_params / D * ge);
      exposed += std::max(0.0, ag + rs - t_bwd);
      bytes.add(group, (D - 1) * block + (D - 1) * layer_params / D * ge);
    }
  }
  if (l.name == "tsp" && !decode) {
    // forward: D shard broadcasts, D-1 MLP ring hops, D K/V group gathers; prefetching hides them
    // behind the layer's GEMMs and attention, except the first shard and first K/V group (fill).
    const double attn_shard = s.attn_params() / D * we, mlp_shard = s.mlp_params() / D * we;
    const double kv_block = N / D * s.kv / D * e;
    const double t_bc = t_broadcast(group, attn_shard);
    const double t_hop = t_ring_hop(group, mlp_shard);
    const double t_kv = 2 * t_all_gather(group, kv_block);
    const double fwd_comm = D * t_bc + (D - 1) * t_hop + D * t_kv;
    const double fill = t_bc + t_kv;
    exposed += fill + std::max(0.0, fwd_comm - fill - t_fwd);
    bytes.add(group, (D - 1) * attn_shard + (D - 1) * mlp_shard + 2 * D * (D - 1) * kv_block);
    if (train) {
      const double grad_shard = s.attn_params() / D * ge, mlp_grad = s.mlp_params() / D * ge;
      const double bwd_comm = D * t_bc + D * t_kv + D * t_kv /* dK,dV reduce-scatter */ +
                              D * t_broadcast(group, grad_shard) /* reduce to owner */ +
                              (D - 1) * (t_hop + t_ring_hop(group, mlp_grad));
      exposed += fill + std::max(0.0, bwd_comm - fill - t_bwd);
      bytes.add(group, (D - 1) * attn_shard + 4 * D * (D - 1) * kv_block + grad_shard +
                           (D - 1) * (mlp_shard + mlp_grad));
    }
  }
  if (decode && l.D > 1) {
    // Weight-stationary decode: per layer, small collectives of the new tokens' activations
    // (docs §4.4); latency bound.
    const double Bt = static_cast<double>(w.B);
    auto ar = [&](const Axis& ax, double b) {
      exposed += t_all_reduce(ax, b);
      bytes.add(ax, 2.0 * (ax.k - 1) / ax.k * b);
    };
    auto ag = [&](const Axis& ax, double block) {
      exposed += t_all_gather(ax, block);
      bytes.add(ax, (ax.k - 1) * block);
    };
    if (l.name == "tp") {
      ar(group, Bt * s.h * e);
      ar(group, Bt * s.h * e);
    } else if (l.name == "sp") {
      ar(group, Bt * (s.h + s.nh) * e);  // log-sum-exp merge of partial attention
    } else if (l.name == "tp-sp") {
      if (T > 1) {
        ar(t_axis, Bt * s.h * e);
        ar(t_axis, Bt * s.h * e);
      }
      if (Sg > 1) ar(s_axis, Bt * (s.h + s.nh) / T * e);
    } else if (l.name == "tsp") {
      ag(group, Bt * s.h / D * e);           // q of every head group to every rank
      ag(group, Bt * (s.h + s.nh) / D * e);  // partial attention to the head-group owner
      ar(group, Bt * s.h * e);               // o_proj partial sums
      ar(group, Bt * s.h * e);               // MLP partial sums
      ag(group, Bt * 2 * s.kv / D * e);      // new K/V to the rank that appends them
    } else if (l.name == "fsdp-cp") {
      ag(group, Pm / D * we);  // the layer's weights, every token
      ar(group, Bt * (s.h + s.nh) * e);
    }
  }

  // Whole step: L layers per micro-batch, LM head and loss (vocab split like the weights), then
  // the data-parallel gradient reduction, overlapped with the backward of all but the last layer.
  const double head_f = (train ? 3 : 1) * 2 * N * s.V * s.h / D;
  const double per_micro = s.L * (t_fwd + t_bwd) + head_f / gemm_rate;
  const double compute = w.micro_batches * per_micro;
  if (train && l.R > 1) {
    const double shard = static_cast<double>(w.model.num_parameters()) / sp.w * ge;
    grad_sync += t_all_reduce(dp_axis, shard) / s.L;  // spread per layer for the overlap rule
    dp_bytes.add(dp_axis, 2.0 * (l.R - 1) / l.R * shard);
  }
  const double grad_exposed =
      train ? std::max(0.0, s.L * grad_sync - (s.L - 1) * t_bwd) : 0;  // last micro-batch only
  est.compute_s = compute;
  est.exposed_comm_s = w.micro_batches * s.L * exposed + grad_exposed;
  est.step_s = est.compute_s + est.exposed_comm_s;
  est.flops = w.micro_batches * (s.L * layer_flops + head_f);
  est.comm_intra_bytes = bytes.intra * s.L * w.micro_batches + dp_bytes.intra;
  est.comm_inter_bytes = bytes.inter * s.L * w.micro_batches + dp_bytes.inter;
  const double tokens = decode ? l.R * w.B : l.R * w.micro_batches * static_cast<double>(w.B * w.S);
  est.tokens_per_s = tokens / est.step_s;
  return est;
}

int recommend(const std::vector<Estimate>& all, std::string* reason) {
  int best = -1;
  for (int i = 0; i < static_cast<int>(all.size()); ++i) {
    if (!all[i].fits) continue;
    if (best < 0 || all[i].tokens_per_s > all[best].tokens_per_s * (1 + 1e-9) ||
        (all[i].tokens_per_s >= all[best].tokens_per_s * (1 - 1e-9) &&
         all[i].memory.total() < all[best].memory.total()))
      best = i;
  }
  if (reason) {
    if (best < 0)
      *reason = "no layout fits in GPU memory; add GPUs, shorten the sequence or the batch";
    else
      *reason =
          fmt::format("{}: highest predicted tokens/s among layouts that fit; {:.1f} GB per GPU",
                      all[best].layout.label(), all[best].memory.total() / 1e9);
  }
  return best;
}

}  // namespace tsp::plan
