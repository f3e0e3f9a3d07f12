// The model of tsp (src/parallel/tsp.cpp, docs/tsp-schedule.md): D ranks each own 1/D of every
// matrix (attention heads as packed [Wq_r; Wk_r; Wv_r; Wo_r] shards, MLP rows/columns, vocabulary
// rows) AND 1/D of the tokens (zigzag chunks). Attention shards are broadcast round by round, MLP
// and vocabulary shards travel a ring, K/V of one head group are all-gathered per round.
#include "parallel/registry.h"
#include "plan/model_util.h"

namespace tsp::plan {
namespace {

class TspModel final : public LayoutModel {
 public:
  Split split(const LayoutSpec& l) const override {
    Split s;
    s.w = s.t = s.heads = s.hidden = l.D;
    s.hd = 1;  // every rank saves all heads of its own tokens
    return s;
  }

  // §2. Weight shards (broadcasts, rings) and K/V in the compute dtype; dK/dV reduce-scatters,
  // the attention-shard gradients reduced to their owner and the MLP gradient accumulators that
  // travel the ring in fp32.
  BlockComm block_comm(const LlamaConfig& m, const LayoutSpec& l, int64_t N, const ElemBytes& e,
                       bool) const override {
    const Shape s = shape_of(m);
    const int64_t D = l.D;
    const int64_t attn_shard = s.attn_params() / D;  // packed [Wq_r; Wk_r; Wv_r; Wo_r], elements
    const int64_t mlp_shard = s.mlp_params() / D;    // gate/up rows + down columns
    const int64_t kv_block = (N / D) * (s.kv / D);   // this rank's k rows of head group r
    Traffic kv_gathers;                              // D head groups, K and V each
    for (int64_t r = 0; r < D; ++r) {
      kv_gathers += all_gather(D, kv_block * e.act);
      kv_gathers += all_gather(D, kv_block * e.act);
    }
    BlockComm c;
    c.forward += broadcast_rounds(D, attn_shard * e.weight);
    c.forward += hops(D - 1, mlp_shard * e.weight);
    c.forward += kv_gathers;
    // backward (docs/tsp-schedule.md): shards again, K/V re-gathered, dK/dV reduce-scattered per
    // group, attention-shard gradients reduced to their owner, MLP gradients travel the ring with
    // the shard (a fused ring reduce-scatter: D-1 hops of the gradient block).
    c.backward += broadcast_rounds(D, attn_shard * e.weight);
    c.backward += kv_gathers;
    for (int64_t r = 0; r < D; ++r) {
      c.backward += reduce_scatter(D, kv_block * e.reduce);
      c.backward += reduce_scatter(D, kv_block * e.reduce);
    }
    c.backward += reduce_rounds(D, attn_shard * e.reduce);
    c.backward += hops(D - 1, mlp_shard * e.weight);
    c.backward += hops(D - 1, mlp_shard * e.reduce);
    return c;
  }

  // ---- §3 the paper's memory --------------------------------------------------------------
  double saved_kv(const Workload& w, const LayoutSpec& l,
                  const MemoryAssumptions& a) const override {
    // only the local k, v (re-gathered in backward)
    return 2.0 * static_cast<double>(w.tokens_per_microbatch()) * w.model.kv_dim() / l.D *
           a.act_bytes;
  }
  Transients layer_transients(const Workload& w, const LayoutSpec& l,
                              const MemoryAssumptions& a) const override {
    // src/parallel/tsp.cpp runs a layer's backward in two phases that never overlap, each with
    // its own buffers (freed when it ends); the busier one counts.
    //  - MLP ring: the shard in hand and the next (2 weight shards); the travelling gradient
    //    accumulator double-buffered plus the step's own part (3 gradient shards; 2 at D = 2).
    //  - attention rounds: the broadcast shard in use and the prefetched one (2), the partial
    //    gradient being reduced to its owner and the next round's (2); K, V of head group r
    //    and their gradients (all tokens); d_o, dq of the rank's tokens for head group r.
    const Shape s = shape_of(w.model);
    const double N = static_cast<double>(w.tokens_per_microbatch()), D = l.D, ab = a.act_bytes;
    const double kv_group = N * s.kv / D * ab;  // one head group's K or V, all tokens
    const double mlp_cols = static_cast<double>(s.I) / D;
    const double base_ws = 2 * N * s.h / D * ab;  // recomputed norm output, dx
    const double mlp_ws = base_ws + 4 * N * mlp_cols / D * ab;
    const double mlp_comm = l.D > 1 ? 2.0 * s.mlp_params() / D * a.weight_bytes +
                                          (l.D > 2 ? 3.0 : 2.0) * s.mlp_params() / D * a.grad_bytes
                                    : 0;
    const double attn_ws = base_ws + 2 * N / D * (static_cast<double>(s.h) / D) * ab;
    const double attn_comm = l.D > 1 ? 4 * kv_group + 2.0 * s.attn_params() / D * a.weight_bytes +
                                           2.0 * s.attn_params() / D * a.grad_bytes
                                     : 0;
    if (mlp_ws + mlp_comm >= attn_ws + attn_comm) return {mlp_ws, mlp_comm};
    return {attn_ws, attn_comm};
  }
  double kv_cache_heads_split(const LayoutSpec&) const override { return 1; }
  double prefill_mlp_cols(const LlamaConfig& m, const LayoutSpec& l) const override {
    return static_cast<double>(m.intermediate_size) / l.D;
  }
  double prefill_comm(const Workload& w, const LayoutSpec& l,
                      const MemoryAssumptions& a) const override {
    const Shape s = shape_of(w.model);
    const double kv_group =
        static_cast<double>(w.tokens_per_microbatch()) * s.kv / l.D * a.act_bytes;
    return 2 * kv_group + 2.0 * s.block_matrix_params() / l.D * a.weight_bytes;
  }

  // ---- §4 the paper's time ----------------------------------------------------------------
  void layer_time(const TimeInputs& in, LayerTime& out) const override {
    if (in.decode) return;
    const Shape s = shape_of(in.w->model);
    const Axis& group = in.group;
    const double D = in.l->D;
    // forward: D shard broadcasts, D-1 MLP ring hops, D K/V group gathers; prefetching hides them
    // behind the layer's GEMMs and attention, except the first shard and first K/V group (fill).
    const double attn_shard = s.attn_params() / D * in.we, mlp_shard = s.mlp_params() / D * in.we;
    const double kv_block = in.N / D * s.kv / D * in.e;
    const double t_bc = t_broadcast(group, attn_shard);
    const double t_hop = t_ring_hop(group, mlp_shard);
    const double t_kv = 2 * t_all_gather(group, kv_block);
    const double fwd_comm = D * t_bc + (D - 1) * t_hop + D * t_kv;
    const double fill = t_bc + t_kv;
    out.exposed += fill + std::max(0.0, fwd_comm - fill - in.t_fwd);
    out.bytes.add(group, (D - 1) * attn_shard + (D - 1) * mlp_shard + 2 * D * (D - 1) * kv_block);
    if (in.train) {
      const double grad_shard = s.attn_params() / D * in.ge, mlp_grad = s.mlp_params() / D * in.ge;
      const double bwd_comm = D * t_bc + D * t_kv + D * t_kv /* dK,dV reduce-scatter */ +
                              D * t_broadcast(group, grad_shard) /* reduce to owner */ +
                              (D - 1) * (t_hop + t_ring_hop(group, mlp_grad));
      out.exposed += fill + std::max(0.0, bwd_comm - fill - in.t_bwd);
      out.bytes.add(group, (D - 1) * attn_shard + 4 * D * (D - 1) * kv_block + grad_shard +
                               (D - 1) * (mlp_shard + mlp_grad));
    }
  }
  void decode_time(const TimeInputs& in, LayerTime& out) const override {
    const Workload& w = *in.w;
    const Axis& group = in.group;
    const double D = in.l->D, Bt = static_cast<double>(w.B), h = w.model.hidden_size;
    const double nh = w.model.num_attention_heads, kv = w.model.kv_dim(), e = in.e;
    auto ar = [&](double b) {
      out.exposed += t_all_reduce(group, b);
      out.bytes.add(group, 2.0 * (group.k - 1) / group.k * b);
    };
    auto ag = [&](double block) {
      out.exposed += t_all_gather(group, block);
      out.bytes.add(group, (group.k - 1) * block);
    };
    ag(Bt * h / D * e);         // q of every head group to every rank
    ag(Bt * (h + nh) / D * e);  // partial attention to the head-group owner
    ar(Bt * h * e);             // o_proj partial sums
    ar(Bt * h * e);             // MLP partial sums
    ag(Bt * 2 * kv / D * e);    // new K/V to the rank that appends them
  }

  // ---- our implementation -----------------------------------------------------------------
  // src/parallel/tsp.cpp, D ranks: all heads of n = B·S/D tokens saved; head group r of
  // hq = nh/D query and hkv = nkv/D kv heads in flight. Weight shards in flight in the compute
  // dtype, gradient partials and accumulators fp32.
  void local_moments(const LocalInputs& in, std::vector<Moment>& out) const override {
    const Dims s = dims_of(*in.m);
    const ElemBytes& e = in.e;
    const int64_t D = in.l->D, h = s.h, d = s.d;
    const int64_t n = in.Br * in.S / D, all = in.Br * in.S, hq = s.nh / D, hkv = s.nkv / D;
    const int64_t qw = hq * d, kw = hkv * d, f = s.F / D, vs = s.V / D;
    const int64_t r = std::min(n, kChunk);
    const int64_t act = s.L * saved_bytes(s, n, s.nh, s.nkv, n, e) + kF32 * n;
    // Grads: the replicated norms' gradients collected for one all-reduce at the end
    const int64_t norm_grads = D > 1 ? kF32 * (2 * s.L + 1) * h : 0;
    const int64_t tokens = token_bytes(n, n / in.Br, in.S);
    // run(): the tokens, x and xn (compute dtype), dxn and dx (fp32)
    const int64_t base = tokens + 2 * e.act * n * h + 2 * kF32 * n * h;
    const int64_t mlp_shard = 3 * f * h, attn_shard = 2 * h * qw + 2 * h * kw;
    if (D == 1) {  // D = 1 runs exactly single's operations
      layout_model("single").local_moments(in, out);
      return;
    }
    // MLP ring backward (ring_backward): two weight buffers (compute dtype), two travelling fp32
    // accumulators (+ the step's part when D > 2); mlp_backward's chunk buffers and, inside, a dy
    // or da chunk narrowed to bf16 for the GEMMs.
    out.push_back(
        {act, 2 * e.weight * mlp_shard + kF32 * (2 * mlp_shard + (D > 2 ? mlp_shard : 0)),
         base + 4 * kF32 * r * f + e.act * r * f + std::max(e.narrow(r * f), e.narrow(r * h)),
         norm_grads});
    // attention rounds backward: two broadcast buffers (compute dtype), two fp32 partial-gradient
    // buffers; K and V of head group r for the whole sequence (compute dtype): with B = 1 the
    // all-gather lands in them (Comm), else in gather_sequence's staging (Comm) and they are the
    // re-ordered copy (Workspace), and dK/dV's reduce-scatter has a staging buffer (fp32, Comm);
    // workspace d_o, dq, dK, dV (all tokens), dk, dv (own tokens) fp32; inside, dy or dq
    // narrowed, or the attention kernel's transients for one row.
    const bool rows = in.Br > 1;
    out.push_back({act,
                   2 * e.weight * attn_shard + 2 * kF32 * attn_shard + 2 * e.act * all * kw +
                       (rows ? 2 * kF32 * all * kw : 0),
                   base + kF32 * (2 * n * qw + 2 * all * kw + 2 * n * kw) +
                       (rows ? 2 * e.act * all * kw : 0) +
                       std::max({e.narrow(n * h), e.narrow(n * qw),
                                 attention_backward_transient(d, hq, hkv, n / in.Br, in.S, e)}),
                   norm_grads});
    // loss head backward ring: the shard in hand (+ the next when D > 2), accumulators (+ part),
    // logits and dlogits chunks (dlogits narrowed for the GEMMs), running statistics; before
    // run() allocates dx.
    out.push_back({act,
                   (D > 2 ? 2 : 1) * e.weight * vs * h + kF32 * (2 * vs * h + (D > 2 ? vs * h : 0)),
                   tokens + 2 * e.act * n * h + kF32 * n * h + kF32 * (2 * r * vs + 3 * n) +
                       e.narrow(r * vs)});
  }
  void outside_traffic(const LocalInputs& in, StepTraffic& t) const override {
    const Dims s = dims_of(*in.m);
    const ElemBytes& e = in.e;
    const int64_t D = in.l->D, shard = s.V / D * s.h;  // elements of a vocabulary shard
    t.forward += hops(D - 1, shard * e.weight);        // embedding ring
    t.forward += hops(D - 1, shard * e.weight);        // loss head ring (online cross-entropy)
    // LM head backward ring: the shard in hand starts it (D-2 weight hops), the gradient
    // accumulator makes D-1 hops; the embedding gradient accumulator D-1 hops, no weights.
    t.backward += hops(D - 2, shard * e.weight);
    t.backward += hops(D - 1, shard * e.reduce);
    t.backward += hops(D - 1, shard * e.reduce);
    t.backward += all_reduce(D, (2 * s.L + 1) * s.h * e.reduce);  // replicated RMSNorm gradients
  }
};

const LayoutModelRegistration kRegister("tsp", std::make_shared<TspModel>());

}  // namespace
}  // namespace tsp::plan
