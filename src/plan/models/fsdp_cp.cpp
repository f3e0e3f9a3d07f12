// The model of fsdp-cp (src/parallel/fsdp_cp.cpp): every parameter cut into D row pieces (norms
// included), each layer gathered whole before use (forward and again backward) and its gradients
// reduce-scattered back; tokens in zigzag chunks with K/V all-gathered (context parallelism), only
// the local k, v saved.
#include "parallel/registry.h"
#include "plan/model_util.h"

namespace tsp::plan {
namespace {

class FsdpCpModel final : public LayoutModel {
 public:
  Split split(const LayoutSpec& l) const override {
    Split s;
    s.w = s.t = s.hidden = l.D;
    s.hd = s.heads = 1;
    return s;
  }

  // §2. K/V gathers and the layer's all-gathers in the compute dtype; dK/dV and the layer's
  // gradients reduce-scattered in fp32.
  BlockComm block_comm(const LlamaConfig& m, const LayoutSpec& l, int64_t N, const ElemBytes& e,
                       bool) const override {
    const Shape s = shape_of(m);
    const int64_t D = l.D;
    const int64_t kv_elems = (N / D) * s.kv;  // this rank's k (or v) rows
    BlockComm c;
    c.forward += all_gather(D, kv_elems * e.act);
    c.forward += all_gather(D, kv_elems * e.act);
    // only the local k, v are saved (like tsp): always re-gathered
    c.backward = c.forward;
    c.backward += reduce_scatter(D, kv_elems * e.reduce);  // dK
    c.backward += reduce_scatter(D, kv_elems * e.reduce);  // dV
    // FSDP: gather the whole layer (matrices and norms, one all-gather per parameter of numel/D
    // elements) before use, in forward and again in backward; reduce-scatter its gradients back
    // to the pieces
    const int64_t w_piece = s.block_params_per_piece(D);
    c.forward += all_gather(D, w_piece * e.weight);
    c.backward += all_gather(D, w_piece * e.weight);
    c.backward += reduce_scatter(D, w_piece * e.reduce);
    return c;
  }

  // ---- §3 the paper's memory --------------------------------------------------------------
  double saved_kv(const Workload& w, const LayoutSpec& l,
                  const MemoryAssumptions& a) const override {
    return 2.0 * static_cast<double>(w.tokens_per_microbatch()) * w.model.kv_dim() / l.D *
           a.act_bytes;  // local k, v only
  }
  Transients layer_transients(const Workload& w, const LayoutSpec& l,
                              const MemoryAssumptions& a) const override {
    Transients t = LayoutModel::layer_transients(w, l, a);
    const Shape s = shape_of(w.model);
    const double N = static_cast<double>(w.tokens_per_microbatch());
    if (l.D > 1) t.comm += 2 * N * s.kv * a.act_bytes;  // full dK, dV before the reduce-scatter
    // src/parallel/fsdp_cp.cpp, a layer's backward: the layer gathered whole (matrices and
    // norms) and the next one prefetched; its full-size gradients and the previous layer's
    // still in their reduce-scatter (full + pieces); K, V re-gathered for every key; tied
    // embeddings: the full [V, h] gradient waits through the backward for the lookup's part.
    const double layer_params = static_cast<double>(s.block_matrix_params() + 2 * s.h);
    t.comm += 2.0 * layer_params * a.weight_bytes +
              (2.0 + 1.0 / l.D) * layer_params * a.grad_bytes + 2 * N * s.kv * a.act_bytes;
    if (w.model.tie_word_embeddings) t.comm += static_cast<double>(s.V) * s.h * a.grad_bytes;
    return t;
  }
  double kv_cache_heads_split(const LayoutSpec&) const override { return 1; }
  double prefill_comm(const Workload& w, const LayoutSpec& l,
                      const MemoryAssumptions& a) const override {
    const Shape s = shape_of(w.model);
    double c = 2.0 * s.block_matrix_params() * a.weight_bytes;  // the layer and the next
    if (l.D > 1) c += 2.0 * static_cast<double>(w.tokens_per_microbatch()) * s.kv * a.act_bytes;
    return c;
  }
  double decode_comm(const Workload& w, const LayoutSpec&,
                     const MemoryAssumptions& a) const override {
    return 2.0 * shape_of(w.model).block_matrix_params() * a.weight_bytes;
  }

  // ---- §4 the paper's time ----------------------------------------------------------------
  void layer_time(const TimeInputs& in, LayerTime& out) const override {
    const Shape s = shape_of(in.w->model);
    const Axis& group = in.group;
    const double D = in.l->D;
    if (!in.decode) {
      const double kv_block = in.N / group.k * s.kv * in.e;
      const double ag = 2 * t_all_gather(group, kv_block);
      out.exposed += std::max(0.0, ag - in.q_proj);  // only the q projection does not need K/V
      out.bytes.add(group, 2.0 * (group.k - 1) * kv_block);
      if (in.train) {
        const double rs = ag;  // dK, dV reduce-scatter: overlaps the input projections' backward
        out.exposed += std::max(0.0, rs - in.in_proj_bwd);
        out.bytes.add(group, 2.0 * (group.k - 1) * kv_block);
        out.exposed += std::max(0.0, ag - in.q_proj);  // K/V re-gathered
        out.bytes.add(group, 2.0 * (group.k - 1) * kv_block);
      }
    }
    // gather the layer (prefetched during the previous layer: hides behind its compute);
    // backward gathers again and reduce-scatters the gradients, hidden behind backward compute
    const double layer_params = in.Pm + 2.0 * s.h;  // the matrices and the two norms
    const double block = layer_params / D * in.we;
    const double ag = t_all_gather(group, block);
    out.exposed += std::max(0.0, ag - in.t_fwd);
    out.bytes.add(group, (D - 1) * block);
    if (in.train) {
      const double rs = t_all_gather(group, layer_params / D * in.ge);
      out.exposed += std::max(0.0, ag + rs - in.t_bwd);
      out.bytes.add(group, (D - 1) * block + (D - 1) * layer_params / D * in.ge);
    }
  }
  void decode_time(const TimeInputs& in, LayerTime& out) const override {
    const Workload& w = *in.w;
    const Axis& group = in.group;
    const double D = in.l->D, Bt = static_cast<double>(w.B);
    const double h = w.model.hidden_size, nh = w.model.num_attention_heads;
    const double wblock = in.Pm / D * in.we;  // the layer's weights, every token
    out.exposed += t_all_gather(group, wblock);
    out.bytes.add(group, (group.k - 1) * wblock);
    const double b = Bt * (h + nh) * in.e;  // log-sum-exp merge
    out.exposed += t_all_reduce(group, b);
    out.bytes.add(group, 2.0 * (group.k - 1) / group.k * b);
  }

  // ---- our implementation -----------------------------------------------------------------
  bool store_splits_norms() const override { return true; }
  // src/parallel/fsdp_cp.cpp (overlap on, the default), D ranks: all heads of n = B·S/D tokens
  // saved (local k, v only); units gathered whole into Comm buffers (compute dtype), their full
  // gradients fp32.
  void local_moments(const LocalInputs& in, std::vector<Moment>& out) const override {
    const Dims s = dims_of(*in.m);
    const ElemBytes& e = in.e;
    const int64_t D = in.l->D, h = s.h, d = s.d;
    const int64_t n = in.Br * in.S / D, all = in.Br * in.S, qw = s.nh * d, kw = s.nkv * d;
    const int64_t r = std::min(n, kChunk);
    const int64_t saved = saved_bytes(s, n, s.nh, s.nkv, n, e);
    const UnitSize layer = unit_size(block_param_numels(s), D);
    const UnitSize head_grads =
        unit_size(s.tied ? std::vector<int64_t>{h} : std::vector<int64_t>{h, s.V * h},
                  D);                                          // final norm (+ LM head)
    const UnitSize head_unit = unit_size({h, s.V * h}, D);     // final norm + head matrix
    const int64_t embed_full = s.tied ? aligned(s.V * h) : 0;  // tied: kept through backward
    const int64_t kv_all = all * kw;                           // K or V of the whole rows
    const int64_t next = s.L > 0 ? layer.full : 0;             // layer L-1 prefetched
    const int64_t tokens = token_bytes(n, n / in.Br, in.S);
    const int64_t xs = tokens + 2 * e.act * n * h;  // run(): the tokens, x, xn
    // The head (forward and backward fused): all L layers saved; the head unit and the
    // prefetched layer L-1 gathered; the head's full gradients (and, tied, the embedding's).
    const int64_t act_all = s.L * saved + kF32 * n;  // + rstd of the final norm
    const int64_t head_comm =
        e.weight * (head_unit.full + next) + kF32 * (head_grads.full + embed_full);
    out.push_back({act_all, head_comm, xs + kF32 * n * h + kF32 * r * s.V + e.narrow(r * s.V)});
    out.push_back({act_all, head_comm, xs + 3 * kF32 * n * h});  // + dx, norm-backward temp
    out.push_back({act_all, head_comm + kF32 * head_grads.piece, xs + 2 * kF32 * n * h});
    // The last layer's forward: it and the head unit gathered, K/V received and laid out.
    out.push_back({act_all, e.weight * (layer.full + head_unit.full) + 2 * e.act * kv_all,
                   tokens + 2 * e.act * n * h + 2 * e.act * kv_all});
    // Backward of layer l (all saved activations up to l): its weights, the prefetch of l-1, its
    // full-size gradients being accumulated, the previous unit's gradients still in their
    // reduce-scatter (full + pieces: the head's for l = L-1, a layer's after that).
    for (int64_t l = s.L - 1; l >= std::max<int64_t>(0, s.L - 2); --l) {
      const int64_t act = (l + 1) * saved + kF32 * n;
      const int64_t prev =
          kF32 * (l == s.L - 1 ? head_grads.full + head_grads.piece : layer.full + layer.piece);
      const int64_t outer = e.weight * (layer.full + (l > 0 ? layer.full : 0)) + kF32 * layer.full +
                            prev + kF32 * embed_full;
      const int64_t base = xs + 2 * kF32 * n * h;  // + dx, dxn
      const int64_t kv_in = 2 * e.act * kv_all;    // K/V receive buffers
      // MLP backward while K/V are re-gathered into their receive buffers; inside, a dy or da
      // chunk narrowed to bf16 for the GEMMs
      out.push_back({act, outer + kv_in,
                     base + 4 * kF32 * r * s.F + e.act * r * s.F +
                         std::max(e.narrow(r * s.F), e.narrow(r * h))});
      out.push_back({act, outer + kv_in, base + kF32 * n * h});  // norm-backward temp
      // With B > 1 rows, K/V are laid out [B, S, kv] (Workspace) from the receive buffers, which
      // are then freed, and dK/dV's reduce-scatter needs a send buffer; with one row the
      // all-gather lands in K/V themselves (Comm) and the reduce-scatter sends dK/dV in place.
      const bool rows = in.Br > 1;
      if (rows) out.push_back({act, outer + kv_in, base + kF32 * n * qw + 2 * e.act * kv_all});
      // attention backward: d_o, dq, K, V, dK, dV of every key; inside, dy or dq narrowed, or
      // the attention kernel's transients for one row
      out.push_back(
          {act, outer + (rows ? 0 : kv_in),
           base + kF32 * (2 * n * qw + 2 * kv_all) + (rows ? 2 * e.act * kv_all : 0) +
               std::max({e.narrow(n * h), e.narrow(n * qw),
                         attention_backward_transient(d, s.nh, s.nkv, n / in.Br, in.S, e)})});
      // dK/dV reduce-scatter: send buffer (B > 1), dK, dV, local dk, dv
      out.push_back({act, outer + (rows ? kF32 * kv_all : 0) + (rows ? 0 : kv_in),
                     base + kF32 * (2 * n * qw + 2 * kv_all + 2 * n * kw)});
      // q/k/v backward and the input norm's backward temp
      out.push_back({act, outer, base + kF32 * (2 * n * qw + 2 * n * kw + n * h)});
    }
  }
  // Units outside the blocks, gathered per parameter (blocks of numel/D, compute dtype) and their
  // gradients reduce-scattered back (fp32; docs/communication.md, fsdp-cp).
  void outside_traffic(const LocalInputs& in, StepTraffic& t) const override {
    const Dims s = dims_of(*in.m);
    const ElemBytes& e = in.e;
    const int64_t D = in.l->D, table = s.V / D * s.h, norm = s.h / D;
    t.forward += all_gather(D, table * e.weight);  // embedding, for the lookup
    t.forward += all_gather(D, norm * e.weight);   // head: final norm ...
    t.forward +=
        all_gather(D, table * e.weight);  // ... and LM head (the embedding again when tied)
    t.backward += reduce_scatter(D, norm * e.reduce);                // final-norm gradient
    if (!s.tied) t.backward += reduce_scatter(D, table * e.reduce);  // LM-head gradient
    t.backward += reduce_scatter(D, table * e.reduce);  // embedding gradient (tied: + the head's)
  }
};

const LayoutModelRegistration kRegister("fsdp-cp", std::make_shared<FsdpCpModel>());

}  // namespace
}  // namespace tsp::plan
