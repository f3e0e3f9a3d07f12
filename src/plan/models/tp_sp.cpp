// The models of tp, sp and tp-sp (src/parallel/tp_sp.cpp): T tensor ranks (Megatron column/row
// parallel, heads and FFN columns split) times Σ sequence ranks (zigzag token chunks, K/V
// all-gathered, weights replicated over Σ). tp is T = D, Σ = 1; sp is T = 1, Σ = D; tp-sp numbers
// T fastest inside the group.
#include <fmt/format.h>

#include "parallel/registry.h"
#include "parallel/tp_sp.h"
#include "plan/model_util.h"

namespace tsp::plan {
namespace {

enum class Kind { Tp, Sp, TpSp };

class TpSpModel final : public LayoutModel {
 public:
  explicit TpSpModel(Kind kind) : kind_(kind) {}

  int64_t T(const LayoutSpec& l) const {
    return kind_ == Kind::Tp ? l.D : kind_ == Kind::Sp ? 1 : l.T;
  }
  int64_t Sg(const LayoutSpec& l) const { return l.D / T(l); }

  Split split(const LayoutSpec& l) const override {
    Split s;
    s.w = s.hd = s.heads = T(l);
    s.t = Sg(l);
    return s;
  }
  std::vector<LayoutSpec> factorizations(const std::string& name, int D, int R) const override {
    if (D == 1) return {};
    if (kind_ == Kind::Tp) return {{name, D, D, R}};
    if (kind_ == Kind::Sp) return {{name, D, 1, R}};
    std::vector<LayoutSpec> out;  // the proper factorizations T·Σ = D
    for (int t = 2; t < D; ++t)
      if (D % t == 0) out.push_back({name, D, t, R});
    return out;
  }
  std::string label(const LayoutSpec& l) const override {
    return kind_ == Kind::TpSp ? fmt::format("tp-sp T={} S={}", l.T, l.D / l.T)
                               : fmt::format("{} D={}", l.name, l.D);
  }
  void check(const LlamaConfig&, const LayoutSpec& l) const override {
    if (kind_ == Kind::TpSp)
      TSP_CHECK(l.T >= 1 && l.D % l.T == 0, "tp-sp: T={} does not divide D={}; use T in {{{}}}",
                l.T, l.D, divisors(l.D));
  }

  // §2: tp all-reduces the partial outputs of o_proj and down_proj [N/Σ, h] (forward) and the
  // input gradients before q/k/v and gate/up (backward): reductions, fp32. Σ all-gathers K and V
  // (compute dtype), reduce-scatters dK and dV and all-reduces the weight gradients (fp32).
  BlockComm block_comm(const LlamaConfig& m, const LayoutSpec& l, int64_t N, const ElemBytes& e,
                       bool regather_kv) const override {
    const Shape s = shape_of(m);
    const int64_t t = T(l), sg = Sg(l);
    const int64_t Nl = N / sg;  // tokens of this Σ-shard
    BlockComm c;
    if (t > 1)
      for (int i = 0; i < 2; ++i) c.forward += all_reduce(t, Nl * s.h * e.reduce);
    const Traffic tp_bwd = c.forward;  // the dual all-reduces of dx
    c.backward += tp_bwd;
    if (sg > 1) {
      const int64_t kv_elems = Nl * (s.kv / t);  // this rank's k (or v) rows, own heads
      c.forward += all_gather(sg, kv_elems * e.act);
      c.forward += all_gather(sg, kv_elems * e.act);
      if (regather_kv) {
        c.backward += all_gather(sg, kv_elems * e.act);
        c.backward += all_gather(sg, kv_elems * e.act);
      }
      c.backward += reduce_scatter(sg, kv_elems * e.reduce);  // dK
      c.backward += reduce_scatter(sg, kv_elems * e.reduce);  // dV
      // weights are replicated over Σ: their gradient shards (M/T matrix elements and the two
      // RMSNorm vectors) are all-reduced over it in one call
      c.backward += all_reduce(sg, (s.block_matrix_params() / t + s.norm_params()) * e.reduce);
    }
    return c;
  }

  // ---- §3 the paper's memory --------------------------------------------------------------
  bool grads_replicated_in_group(const LayoutSpec& l) const override {
    return kind_ != Kind::Tp && Sg(l) > 1;
  }
  double saved_kv(const Workload& w, const LayoutSpec& l,
                  const MemoryAssumptions& a) const override {
    const Split sp = split(l);
    const double N = static_cast<double>(w.tokens_per_microbatch());
    // sp and tp-sp keep the gathered K/V (all tokens, own heads) unless told not to
    if (kind_ != Kind::Tp && !a.sp_keeps_gathered_kv)
      return 2 * N * w.model.kv_dim() / (sp.t * sp.hd) * a.act_bytes;
    return 2 * N * w.model.kv_dim() / sp.hd * a.act_bytes;
  }
  Transients layer_transients(const Workload& w, const LayoutSpec& l,
                              const MemoryAssumptions& a) const override {
    Transients t = LayoutModel::layer_transients(w, l, a);
    const Split sp = split(l);
    const double N = static_cast<double>(w.tokens_per_microbatch());
    if (kind_ != Kind::Sp)
      t.comm += N * w.model.hidden_size / sp.t * a.act_bytes;  // all-reduce buffer
    if (kind_ != Kind::Tp && l.D > 1)
      t.comm += 2 * N * w.model.kv_dim() / sp.hd * a.act_bytes;  // full dK, dV
    return t;
  }
  double prefill_comm(const Workload& w, const LayoutSpec& l,
                      const MemoryAssumptions& a) const override {
    if (kind_ == Kind::Tp || l.D == 1) return 0;
    return 2.0 * static_cast<double>(w.tokens_per_microbatch()) * w.model.kv_dim() / split(l).hd *
           a.act_bytes;
  }

  // ---- §4 the paper's time ----------------------------------------------------------------
  double decode_kv_split(const LayoutSpec& l) const override {
    return static_cast<double>(split(l).t * split(l).hd);
  }
  void layer_time(const TimeInputs& in, LayerTime& out) const override {
    const LayoutSpec& l = *in.l;
    const Workload& w = *in.w;
    const int t = static_cast<int>(T(l)), sg = static_cast<int>(Sg(l));
    const Axis t_axis = axis_of(*in.hw, t, 1);
    const Axis s_axis = axis_of(*in.hw, sg, t);
    const double h = w.model.hidden_size, kv = w.model.kv_dim(), e = in.e;
    if (kind_ == Kind::Tp || (kind_ == Kind::TpSp && t > 1)) {
      const double Nl = in.N / sg;
      const double ar = t_all_reduce(t_axis, Nl * h * e);
      // forward 2, recomputed o_proj 1, backward 2: each on the critical path
      const int count = in.train ? 5 : 2;
      out.exposed += count * ar;
      out.bytes.add(t_axis, count * 2.0 * (t_axis.k - 1) / t_axis.k * Nl * h * e);
    }
    if (!in.decode && (kind_ == Kind::Sp || (kind_ == Kind::TpSp && sg > 1))) {
      const Axis& ax = s_axis;
      const double kv_block = in.N / ax.k * kv / t * e;
      const double ag = 2 * t_all_gather(ax, kv_block);
      out.exposed += std::max(0.0, ag - in.q_proj);  // only the q projection does not need K/V
      out.bytes.add(ax, 2.0 * (ax.k - 1) * kv_block);
      if (in.train) {
        const double rs = ag;  // dK, dV reduce-scatter: overlaps the input projections' backward
        out.exposed += std::max(0.0, rs - in.in_proj_bwd);
        out.bytes.add(ax, 2.0 * (ax.k - 1) * kv_block);
        if (!in.a->sp_keeps_gathered_kv) {
          out.exposed += std::max(0.0, ag - in.q_proj);
          out.bytes.add(ax, 2.0 * (ax.k - 1) * kv_block);
        }
        const double wb = (in.Pm / t + 2.0 * h) * in.ge;  // the shard's matrices and the norms
        out.grad_sync += t_all_reduce(ax, wb);
        out.bytes.add(ax, 2.0 * (ax.k - 1) / ax.k * wb);
      }
    }
  }
  void decode_time(const TimeInputs& in, LayerTime& out) const override {
    const LayoutSpec& l = *in.l;
    const Workload& w = *in.w;
    const int t = static_cast<int>(T(l)), sg = static_cast<int>(Sg(l));
    const Axis t_axis = axis_of(*in.hw, t, 1);
    const Axis s_axis = axis_of(*in.hw, sg, t);
    const double Bt = static_cast<double>(w.B), h = w.model.hidden_size;
    const double nh = w.model.num_attention_heads, e = in.e;
    auto ar = [&](const Axis& ax, double b) {
      out.exposed += t_all_reduce(ax, b);
      out.bytes.add(ax, 2.0 * (ax.k - 1) / ax.k * b);
    };
    if (t > 1) {  // the o_proj and MLP partial sums
      ar(t_axis, Bt * h * e);
      ar(t_axis, Bt * h * e);
    }
    if (sg > 1) ar(s_axis, Bt * (h + nh) / t * e);  // log-sum-exp merge of partial attention
  }

  // ---- our implementation -----------------------------------------------------------------
  void local_moments(const LocalInputs& in, std::vector<Moment>& out) const override {
    const Dims s = dims_of(*in.m);
    const ElemBytes& e = in.e;
    const LayoutSpec& l = *in.l;
    const int64_t t = T(l), sg = Sg(l), h = s.h, d = s.d;
    const int64_t n = in.Br * in.S / sg, all = in.Br * in.S, hq = s.nh / t, hkv = s.nkv / t;
    const int64_t qw = hq * d, kw = hkv * d, Ft = s.F / t, Vt = s.V / t;
    const int64_t r = std::min(n, kChunk);
    // Saved: K/V of the whole rows (gathered over Σ) when Σ > 1.
    const int64_t act = s.L * saved_bytes(s, n, hq, hkv, sg > 1 ? all : n, e) + kF32 * n;
    // Σ > 1: the gradients of embedding / final norm / LM head are staged (Comm, fp32) through
    // the whole backward, each layer's in its own stage buffer during its backward.
    const int64_t outer_stage = sg > 1 ? kF32 * (Vt * h * (s.tied ? 1 : 2) + h) : 0;
    const int64_t layer_stage = sg > 1 ? kF32 * ((2 * h * qw + 2 * h * kw + 3 * Ft * h) + 2 * h)
                                       : 0;  // q,k,v,o rows/cols + gate,up,down + norms
    const int64_t stage = outer_stage + layer_stage;
    // run(): the tokens, x and xn (compute dtype), dxn and dx (fp32).
    const int64_t tokens = token_bytes(n, n / in.Br, in.S);
    const int64_t base = tokens + 2 * e.act * n * h + 2 * kF32 * n * h;
    const int64_t kv_rows = sg > 1 ? all : n;
    // MLP backward chunk buffers (fp32 g, u, da, du; act in the compute dtype); inside, a dy or
    // da chunk narrowed to bf16 for the GEMMs
    out.push_back(
        {act, stage,
         base + 4 * kF32 * r * Ft + e.act * r * Ft + std::max(e.narrow(r * Ft), e.narrow(r * h))});
    out.push_back({act, stage, base + kF32 * n * h});  // rmsnorm_backward_add's temp
    // attention backward: d_o, dq, dk and dv of every key (fp32); inside, dy or dq narrowed, or
    // the attention kernel's transients for one row
    out.push_back(
        {act, stage,
         base + kF32 * (2 * n * qw + 2 * kv_rows * kw) +
             std::max({e.narrow(n * h), e.narrow(n * qw),
                       attention_backward_transient(d, hq, hkv, n / in.Br, kv_rows / in.Br, e)})});
    // reduce-scatter of dV: dq, full dK/dV, dk_local, dv_local, and reduce_scatter_sequence's
    // send buffer when rows must be reordered (B > 1)
    if (sg > 1)
      out.push_back({act, stage + (in.Br > 1 ? kF32 * all * kw : 0),
                     base + kF32 * (n * qw + 2 * all * kw + 2 * n * kw)});
    // loss head (forward): one [r, V/T] logits chunk; T > 1: statistics
    out.push_back({act, outer_stage + (t > 1 ? kF32 * (3 * n + 3 * n * t) : 0),
                   tokens + 2 * e.act * n * h + kF32 * n * h + kF32 * r * Vt + e.narrow(r * Vt)});
  }
  void outside_traffic(const LocalInputs& in, StepTraffic& tr) const override {
    const Dims s = dims_of(*in.m);
    const ElemBytes& e = in.e;
    const int64_t t = T(*in.l), sg = Sg(*in.l), h = s.h;
    const int64_t n = in.Br * in.S / sg;
    if (t > 1) {
      tr.forward += all_reduce(t, n * h * e.reduce);   // embedding: vocabulary-parallel lookup
      tr.forward += all_gather(t, 3 * n * kF32);       // loss statistics (max, sum-exp, target)
      tr.backward += all_reduce(t, n * h * e.reduce);  // loss head's dxn
    }
    if (sg > 1)  // embedding, final norm, head gradients
      tr.backward += all_reduce(sg, (s.V / t * h * (s.tied ? 1 : 2) + h) * e.reduce);
  }
  LayoutSpec spec_of(Layout& layout, int D, int R) const override {
    LayoutSpec l{layout.name(), D, 1, R};
    l.T = kind_ == Kind::Tp ? D : kind_ == Kind::Sp ? 1 : tp_sp_degrees(layout).T;
    return l;
  }

 private:
  static std::string divisors(int64_t n) {
    std::string out;
    for (int64_t d = 1; d <= n; ++d)
      if (n % d == 0) out += (out.empty() ? "" : ",") + std::to_string(d);
    return out;
  }
  Kind kind_;
};

const LayoutModelRegistration kRegisterTp("tp", std::make_shared<TpSpModel>(Kind::Tp));
const LayoutModelRegistration kRegisterSp("sp", std::make_shared<TpSpModel>(Kind::Sp));
const LayoutModelRegistration kRegisterTpSp("tp-sp", std::make_shared<TpSpModel>(Kind::TpSp));

}  // namespace
}  // namespace tsp::plan
