// Closed-form cost model; every formula is derived in docs/cost-model.md (section numbers below).
#include "tsp/plan/cost_model.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include <fmt/format.h>

#include "parallel/registry.h"
#include "plan/model_util.h"
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

std::string_view recompute_name(Recompute r) {
  switch (r) {
    case Recompute::None:
      return "none";
    case Recompute::Selective:
      return "selective";
    case Recompute::Full:
      return "full";
  }
  return "?";
}

Recompute parse_recompute(const std::string& s) {
  for (Recompute r : {Recompute::None, Recompute::Selective, Recompute::Full})
    if (s == recompute_name(r)) return r;
  TSP_FAIL("unknown recomputation mode '{}'; use none, selective or full", s);
}

// ---- the registered layout models -----------------------------------------------------------

const LayoutModel* find_layout_model(const std::string& name) {
  return find_registered_model(name);
}

std::vector<std::string> layout_model_names() {
  return registered_model_names();
}

const LayoutModel& layout_model(const std::string& name) {
  const LayoutModel* m = find_layout_model(name);
  if (!m) {
    std::string names;
    for (const std::string& n : layout_model_names()) names += (names.empty() ? "" : ", ") + n;
    TSP_FAIL("unknown layout '{}'; use one of: {}", name, names.empty() ? "(none)" : names);
  }
  return *m;
}

std::vector<LayoutSpec> LayoutModel::factorizations(const std::string& name, int D, int R) const {
  if (D == 1) return {};  // D = 1 is single's
  return {{name, D, 1, R}};
}

std::string LayoutModel::label(const LayoutSpec& l) const {
  return fmt::format("{} D={}", l.name, l.D);
}

int LayoutSpec::weight_shards() const {
  return static_cast<int>(layout_model(name).split(*this).w);
}

int LayoutSpec::token_shards() const {
  return static_cast<int>(layout_model(name).split(*this).t);
}

std::string LayoutSpec::label() const {
  std::string s = layout_model(name).label(*this);
  if (R > 1) s += fmt::format(" R={}", R);
  if (R > 1 && zero == 1) s += " ZeRO-1";  // ZeRO over one replica is no ZeRO: not shown
  return s;
}

ElemBytes ElemBytes::of(DType compute) {
  TSP_CHECK(compute == DType::F32 || compute == DType::BF16,
            "the compute dtype must be f32 or bf16, not {}", dtype_name(compute));
  return {static_cast<int64_t>(dtype_size(compute)), static_cast<int64_t>(dtype_size(compute)), 4};
}

double Link::group_bw(int k) const {
  if (k <= 1) return bw_bytes_per_s;
  return mesh ? bw_bytes_per_s * (k - 1) : bw_bytes_per_s;
}

double MemoryBreakdown::total() const {
  return std::accumulate(bytes.begin(), bytes.end(), 0.0);
}

// ---- §2 communication per block -------------------------------------------------------------

BlockComm block_comm(const LlamaConfig& m, const LayoutSpec& l, int64_t N, const ElemBytes& e,
                     bool regather_kv) {
  const LayoutModel& model = layout_model(l.name);
  if (l.D == 1) return {};
  return model.block_comm(m, l, N, e, regather_kv);
}

BlockComm block_comm(const LlamaConfig& m, const LayoutSpec& l, int64_t N, DType compute,
                     bool regather_kv) {
  return block_comm(m, l, N, ElemBytes::of(compute), regather_kv);
}

BlockComm block_comm(const LlamaConfig& m, const LayoutSpec& l, int64_t N, int elem_bytes,
                     bool regather_kv) {
  return block_comm(m, l, N, ElemBytes::uniform(elem_bytes), regather_kv);
}

Traffic replay_comm(const LlamaConfig& m, const LayoutSpec& l, int64_t N, const ElemBytes& e) {
  if (l.D == 1) return {};
  return layout_model(l.name).replay_comm(m, l, N, e);
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
  const LayoutModel& model = layout_model(l.name);
  TSP_CHECK(l.D >= 1 && l.R >= 1, "{}: degrees must be positive (D={}, R={})", l.name, l.D, l.R);
  TSP_CHECK(l.zero == 0 || l.zero == 1,
            "{}: ZeRO stage {} is not modelled; use 0 (every replica keeps its shard's whole "
            "optimizer state) or 1 (optimizer state sharded over the R replicas)",
            l.name, l.zero);
  model.check(m, l);
  const Split sp = model.split(l);
  const int64_t nkv = m.num_key_value_heads;
  TSP_CHECK(nkv % sp.heads == 0,
            "{}: num_key_value_heads={} is not divisible by the head split {}; use a degree in "
            "{{{}}}",
            l.label(), nkv, sp.heads, divisors_list(nkv, nkv));
  TSP_CHECK(m.intermediate_size % sp.heads == 0 && m.vocab_size % sp.w == 0 &&
                m.hidden_size % sp.hidden == 0,
            "{}: intermediate_size={}, vocab_size={} or hidden_size={} is not divisible by the "
            "weight split {}",
            l.label(), m.intermediate_size, m.vocab_size, m.hidden_size, sp.w);
  const int64_t ts = sp.t;
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
  for (int D = 1; D <= gpus; ++D) {
    if (gpus % D != 0 || (only_degree && D != only_degree)) continue;
    for (const std::string& name : layout_model_names()) {
      for (const LayoutSpec& l : layout_model(name).factorizations(name, D, gpus / D)) {
        try {
          check_layout(w.model, l, w);
          out.push_back(l);
        } catch (const Error&) {
          // not a valid factorization for this model/workload: not listed
        }
      }
    }
  }
  return out;
}

// ---- §3 memory ------------------------------------------------------------------------------

double LayoutModel::saved_kv(const Workload& w, const LayoutSpec& l,
                             const MemoryAssumptions& a) const {
  // K and V as the attention consumed them: all tokens of the group, own heads.
  const Split sp = split(l);
  return 2.0 * static_cast<double>(w.tokens_per_microbatch()) * w.model.kv_dim() / sp.hd *
         a.act_bytes;
}

LayoutModel::Transients LayoutModel::layer_transients(const Workload& w, const LayoutSpec& l,
                                                      const MemoryAssumptions& a) const {
  const Split sp = split(l);
  const double N = static_cast<double>(w.tokens_per_microbatch()), h = w.model.hidden_size;
  const double ab = a.act_bytes;
  const double mlp_cols = static_cast<double>(w.model.intermediate_size) / sp.hd;
  // Only selective rebuilds the norm output and gate, up, act inside the backward; none kept them,
  // and full's replay saved them (it holds the layer's none set, §3.2).
  const double rebuilt = w.recompute == Recompute::Selective ? 1 : 0;
  Transients t;
  t.work = (1 + rebuilt) * N * h / sp.t * ab                // dx, recomputed norm output
           + 2 * N * h / (sp.t * sp.hd) * ab                // dq, do
           + (1 + 3 * rebuilt) * N * mlp_cols / sp.t * ab;  // one gradient, gate, up, act
  return t;
}

double LayoutModel::loss_vocab_cols(const LlamaConfig& m, const LayoutSpec& l) const {
  return static_cast<double>(m.vocab_size) / split(l).w;
}

double LayoutModel::prefill_mlp_cols(const LlamaConfig& m, const LayoutSpec& l) const {
  return static_cast<double>(m.intermediate_size) / split(l).hd;
}

namespace {

// Parameters one rank holds (its shard): matrices (embedding, head, blocks) split by the weight
// split; RMSNorm weights replicated everywhere (O(h) each). The data-parallel reduction moves
// exactly this shard.
double shard_params(const LlamaConfig& m, const Split& sp) {
  const double norms = static_cast<double>(m.num_hidden_layers * 2 * m.hidden_size + m.hidden_size);
  const double matrices = static_cast<double>(m.num_parameters()) - norms;
  return matrices / sp.w + norms;
}

// ZeRO-1 in effect: the optimizer state is sharded over the replicas (one replica: nothing to
// shard, the layout behaves as zero = 0).
bool zero1(const LayoutSpec& l) {
  return l.zero == 1 && l.R > 1;
}

MemoryBreakdown memory_of(const Workload& w, const LayoutSpec& l, const MemoryAssumptions& a) {
  const LayoutModel& model = layout_model(l.name);
  const Shape s = shape_of(w.model);
  const Split sp = model.split(l);
  const double ab = a.act_bytes;
  const double N = static_cast<double>(w.tokens_per_microbatch());
  const double ctx = w.mode == Mode::Decode ? w.S : w.B * w.S;  // cached positions
  const bool train = w.mode == Mode::Train;
  const double params_here = shard_params(w.model, sp);

  MemoryBreakdown mb;
  using C = MemCategory;
  mb[C::Weights] = a.weight_bytes * params_here;
  // The framework's own memory (runtime, communication library, allocator slack), every mode.
  mb[C::Workspace] = a.framework_bytes;
  if (train) {
    // ZeRO-1 keeps whole gradients (they are reduce-scattered, then each replica reads its 1/R)
    // but each replica owns 1/R of the fp32 master weights and AdamW moments (docs §4.5).
    mb[C::Grads] = (a.grad_bytes + a.grad_lowp_bytes) * params_here;
    mb[C::Optimizer] = a.optimizer_bytes * params_here / (zero1(l) ? l.R : 1);
    // The bucket copy belongs to an all-reduce from per-parameter gradients (PyTorch DDP). The
    // replicas' reduce-scatter of ZeRO-1 runs in place on the flat gradient buffer, each bucket
    // a contiguous view whose 1/R result lands in this replica's slice (Megatron's distributed
    // optimizer): no copy for the R axis. Gradients replicated inside the group (sp, tp-sp's Σ)
    // are still all-reduced there, and keep theirs.
    const bool all_reduced = (l.R > 1 && !zero1(l)) || model.grads_replicated_in_group(l);
    if (a.grad_bucket_copy && all_reduced) mb[C::Comm] += a.grad_bytes * params_here;
  }

  if (train) {
    // Saved per layer and rank (docs §3.2), by recomputation mode. t: token shards, hd: head
    // shards of q, o and of the MLP width.
    const double x = N * s.h / sp.t * ab;                 // layer input; also x2
    const double normed = 2 * N * s.h / sp.t * ab;        // the two RMSNorm outputs
    const double qo = 2 * N * s.h / (sp.t * sp.hd) * ab;  // q, o
    const double lse = N * s.nh / (sp.t * sp.hd) * 4.0;   // log-sum-exp, fp32
    const double mlp = 3 * N * (static_cast<double>(s.I) / sp.hd) / sp.t * ab;  // gate, up, act
    const double selective_layer = 2 * x + qo + lse + model.saved_kv(w, l, a);
    const double none_layer = selective_layer + normed + mlp;
    switch (w.recompute) {
      case Recompute::None:
        mb[C::Activations] = none_layer * s.L;
        break;
      case Recompute::Selective:
        mb[C::Activations] = selective_layer * s.L;
        break;
      case Recompute::Full:
        // every layer's input, and the replayed layer's None set while its backward runs (whose
        // input is that layer's checkpoint: counted once)
        mb[C::Activations] = x * (s.L - 1) + none_layer;
        break;
    }

    // Transients of the busiest moment: the backward of one layer, or the loss (docs §3.3).
    // The layer's backward workspace is the layout's (the same in every mode).
    const LayoutModel::Transients layer = model.layer_transients(w, l, a);
    // Loss: fp32 logits and their gradient for this rank's tokens and vocabulary columns.
    const double loss_ws = 2 * N / sp.t * model.loss_vocab_cols(w.model, l) * 4.0;
    if (layer.work + layer.comm >= loss_ws) {
      mb[C::Workspace] += layer.work;
      mb[C::Comm] += layer.comm;
    } else {
      mb[C::Workspace] += loss_ws;
    }
  } else {
    // Inference: the K/V cache of every layer (tokens split by token shards, heads by the head
    // split; tsp keeps the cache of its own tokens for all heads).
    mb[C::Activations] = 2.0 * s.L * w.B * ctx * s.kv / (sp.t * model.kv_cache_heads_split(l)) * ab;
    if (w.mode == Mode::Prefill) {
      // one layer's forward in flight
      mb[C::Workspace] += 2 * N * s.h / sp.t * ab + 2 * N * s.h / (sp.t * sp.hd) * ab +
                          3 * N * model.prefill_mlp_cols(w.model, l) / sp.t * ab;
      mb[C::Comm] = model.prefill_comm(w, l, a);
    } else {
      mb[C::Workspace] += 4.0 * w.B * (s.h + s.I) * ab;  // one token's activations
      mb[C::Comm] = model.decode_comm(w, l, a);
    }
  }
  return mb;
}

// ---- §4 time --------------------------------------------------------------------------------

}  // namespace

// The link a collective over `k` ranks spaced `stride` apart uses: inside a node when the group
// fits in one, else the NIC (rails-only: GPU i's traffic leaves through NIC i).
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
double t_broadcast(const Axis& a, double B) {
  return a.k <= 1 ? 0 : 2 * (a.k - 1) * a.link->alpha_s + 2.0 * (a.k - 1) / a.k * B / a.bw();
}
double t_ring_hop(const Axis& a, double B) {
  return a.link->alpha_s + B / a.ring_bw();
}

Estimate estimate(const Workload& w, const LayoutSpec& l, const Hardware& hw,
                  const MemoryAssumptions& a) {
  check_layout(w.model, l, w);
  const LayoutModel& model = layout_model(l.name);
  const Shape s = shape_of(w.model);
  const Split sp = model.split(l);
  Estimate est;
  est.layout = l;
  est.recompute = w.mode == Mode::Train ? w.recompute : Recompute::None;
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

  // Axes: ranks of a replica are contiguous (a layout's sub-axes are its model's); replicas
  // outermost.
  const Axis dp_axis = axis_of(hw, l.R, l.D);
  Accum dp_bytes;  // per step

  // Per-rank FLOPs of one layer's forward: GEMMs and causal attention are split D ways under
  // every layout except where decode keeps whole weights (docs §4.1).
  double gemm_f, attn_f;
  if (decode) {
    const double ctx = static_cast<double>(w.S);
    gemm_f = 2 * N * Pm / model.decode_weight_split(l);
    attn_f = 4 * N * ctx * s.h / D;
  } else {
    gemm_f = 2 * N * Pm / D;
    attn_f = 2.0 * w.B * static_cast<double>(w.S) * w.S * s.h / D;  // causal: half of 4·S²·h
  }
  const double t_gemm = gemm_f / gemm_rate;
  const double t_attn = attn_f / attn_rate;
  // Backward: 2x the GEMMs and 2.5x the attention forward (flash attention's backward: 5 matmuls
  // against 2; it recomputes the attention's internals in every mode). Recomputation (docs
  // §4.1): selective runs the gate/up GEMMs again; full replays the whole layer's forward.
  const Recompute rc = train ? w.recompute : Recompute::None;
  const double gate_up = 2.0 * s.I * s.h / Pm;  // of the block's GEMMs
  double t_fwd = t_gemm + t_attn;
  const double t_bwd =
      train ? (2 + (rc == Recompute::Selective ? gate_up : 0)) * t_gemm + 2.5 * t_attn : 0;
  if (decode) {
    // Decode is bound by reading this rank's weights and K/V cache from memory.
    const double read = Pm / model.decode_weight_split(l) * we +
                        2.0 * w.B * w.S * s.kv / model.decode_kv_split(l) * e;
    t_fwd = std::max(t_fwd, read / hw.mem_bw);
  }
  const double t_replay = rc == Recompute::Full ? t_fwd : 0;
  const double layer_flops =
      gemm_f + attn_f +
      (train ? (2 + (rc == Recompute::Selective ? gate_up : 0)) * gemm_f + 2.5 * attn_f : 0) +
      (rc == Recompute::Full ? gemm_f + attn_f : 0);

  // Per-layer communication time, split into what is exposed and what can hide (docs §4.2): the
  // layout's model says what its layer sends.
  TimeInputs in;
  in.w = &w;
  in.l = &l;
  in.hw = &hw;
  in.a = &a;
  in.N = N;
  in.e = e;
  in.we = we;
  in.ge = ge;
  in.Pm = Pm;
  in.gemm_rate = gemm_rate;
  in.t_fwd = t_fwd;
  in.t_bwd = t_bwd;
  in.q_proj = 2 * N * s.h * s.h / D / gemm_rate;
  in.in_proj_bwd = 2 * 2 * N * (s.h + 2.0 * s.kv) * s.h / D / gemm_rate;
  in.train = train;
  in.group = axis_of(hw, l.D, 1);
  in.decode = decode;
  LayerTime lt;
  model.layer_time(in, lt);
  if (rc == Recompute::Full) {
    // The replayed forward moves what the forward moved (under tsp: the attention-shard
    // broadcasts, the MLP ring and the K/V gathers again), overlapped with its compute the way
    // the forward's is: the layout's forward, asked once more (TimeInputs::replay: fsdp-cp's
    // backward gathers the layer once for the replay and itself, replay_comm).
    TimeInputs replay = in;
    replay.train = false;
    replay.replay = true;
    model.layer_time(replay, lt);
  }
  if (decode && l.D > 1)
    // Weight-stationary decode: per layer, small collectives of the new tokens' activations
    // (docs §4.4); latency bound.
    model.decode_time(in, lt);

  // Whole step: L layers per micro-batch, LM head and loss (vocab split like the weights), then
  // the data-parallel gradient reduction, overlapped with the backward of all but the last layer.
  const double head_f = (train ? 3 : 1) * 2 * N * s.V * s.h / D;
  const double per_micro = s.L * (t_fwd + t_replay + t_bwd) + head_f / gemm_rate;
  const double compute = w.micro_batches * per_micro;
  // Data-parallel traffic over the R replicas (docs §4.5), spread per layer for the overlap rule
  // (buckets launched as layers finish their backward):
  //  - zero = 0: all-reduce of the gradient shard, 2(R-1)/R · shard · ge;
  //  - ZeRO-1: reduce-scatter of the gradient shard, (R-1)/R · shard · ge, overlapped the same
  //    way; after the optimizer step, the all-gather of the updated weights in the compute dtype,
  //    (R-1)/R · shard · we, counted exposed in full: an upper bound (the engine waits for each
  //    bucket as the next forward reaches it, so part of it may hide; docs §4.5).
  double grad_sync = lt.grad_sync;
  double weight_gather_s = 0;
  if (train && l.R > 1) {
    const double params = shard_params(w.model, sp);
    const double R = l.R;
    if (zero1(l)) {
      // A reduce-scatter over k ranks has an all-gather's cost (k-1)(α + block/bw), block = the
      // 1/R piece each replica keeps.
      grad_sync += t_all_gather(dp_axis, params * ge / R) / s.L;
      weight_gather_s = t_all_gather(dp_axis, params * we / R);
      dp_bytes.add(dp_axis, (R - 1) / R * params * (ge + we));
    } else {
      grad_sync += t_all_reduce(dp_axis, params * ge) / s.L;
      dp_bytes.add(dp_axis, 2.0 * (R - 1) / R * params * ge);
    }
  }
  const double grad_exposed = train
                                  ? std::max(0.0, s.L * grad_sync - (s.L - 1) * (t_replay + t_bwd))
                                  : 0;  // last micro-batch only
  est.compute_s = compute;
  est.exposed_comm_s = w.micro_batches * s.L * lt.exposed + grad_exposed + weight_gather_s;
  est.comm_replica_bytes = dp_bytes.intra + dp_bytes.inter;
  est.step_s = est.compute_s + est.exposed_comm_s;
  est.flops = w.micro_batches * (s.L * layer_flops + head_f);
  est.comm_intra_bytes = lt.bytes.intra * s.L * w.micro_batches + dp_bytes.intra;
  est.comm_inter_bytes = lt.bytes.inter * s.L * w.micro_batches + dp_bytes.inter;
  const double tokens = decode ? l.R * w.B : l.R * w.micro_batches * static_cast<double>(w.B * w.S);
  est.tokens_per_s = tokens / est.step_s;
  return est;
}

int64_t seq_step(const LayoutSpec& l) {
  const int64_t t = l.token_shards();
  return t > 1 ? 2 * t : 1;  // zigzag: 2·t equal chunks of every sequence
}

MaxSeq max_seq(const Workload& w0, const LayoutSpec& l, const Hardware& hw,
               const MemoryAssumptions& a) {
  Workload w = w0;
  w.mode = Mode::Train;
  MaxSeq out;
  out.layout = l;
  out.step = seq_step(l);
  auto fits = [&](int64_t k) {
    w.S = k * out.step;
    return memory_of(w, l, a).total() <= hw.mem_capacity;
  };
  // Memory is nondecreasing in S (every term is a nonnegative multiple of S or S², or constant),
  // so bisect on the multiple k of the step. The bound keeps B·S far inside int64.
  const int64_t k_max = (int64_t{1} << 40) / (out.step * std::max<int64_t>(w.B, 1));
  if (!fits(1)) return out;
  int64_t lo = 1, hi = 2;  // fits(lo); hi: first candidate not yet known
  while (hi <= k_max && fits(hi)) {
    lo = hi;
    hi *= 2;
  }
  hi = std::min(hi, k_max + 1);  // fits(lo), !fits(hi) or hi beyond the bound
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    (fits(mid) ? lo : hi) = mid;
  }
  w.S = lo * out.step;
  out.S = w.S;
  out.at = estimate(w, l, hw, a);
  return out;
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
