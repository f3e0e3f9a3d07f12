// The "tsp" layout: Tensor and Sequence Parallelism folded onto one axis of D ranks (the
// algorithm and its schedule as implemented: docs/tsp-schedule.md). Every rank p owns
//
//   tokens   : zigzag chunks p and 2D-1-p of every row (n = B·S/D local tokens: LocalTokens with
//              parts = D, index = p)
//   attention: head group p, packed for travel as P_p = [Wq_p; Wk_p; Wv_p; Wo_p]
//              (n_kv/D kv heads, their g·n_kv/D query heads, the o_proj columns reading them)
//   MLP      : rows p of W_gate and W_up (I/D each) and the matching columns of W_down
//   vocab    : rows p (V/D ids) of the embedding and of the LM head (one shard when tied)
//   norms    : replicated (O(h)); their gradients are all-reduced over the group once per step
//
// and moves WEIGHTS to its tokens instead of activations to the weights. The layer recipe of
// layout_common.h runs the norms and the residual stream; this file supplies its hooks:
//
//   attention  for r in 0..D-1: P_r broadcast from owner r (P_{r+1} prefetched meanwhile);
//              q,k,v of the local tokens for group r; K,V of group r all-gathered (whole
//              sequence, that group only: gather_sequence); attention; y += o·Wo_rᵀ (no
//              all-reduce).
//   MLP        ring: step k uses shard s = p-k while it travels p -> p+1 (double buffered).
//   loss       vocabulary ring with an online cross-entropy: [n, V/D] logits at a time.
//   backward   attention: rounds again (re-broadcast, re-gather K/V from the saved local k/v),
//              dK/dV reduce-scattered to their tokens' owners (reduce_scatter_sequence), the
//              partial gradient of P_r reduced to owner r. MLP, LM head, embedding: a ring in the
//              other direction in which each rank handles its OWN shard last: shards travel
//              s -> s-1 and a gradient accumulator created at s-1 travels s-1 -> s-2 -> ... -> s,
//              so it reaches the owner after D-1 hops holding every other rank's contribution.
//
// Precision (docs/design.md, "Mixed precision"): weight shards are packed from the store's
// compute copy and travel in the compute dtype (broadcasts, ring hops), as do K and V; every
// gradient buffer that travels (partial dP_r, dK/dV, accumulators) and every reduction is F32.
// Under bf16 a sub-block's output is rounded into the residual once: the rounds' out-projections
// and the MLP ring's steps accumulate in an F32 [n, h] buffer added to x2 / x at the end (under
// f32 they add straight into the residual, which is the same arithmetic).
//
// Under --recompute full the recipe replays each layer's forward at the start of its backward
// (layout_common.h): the attention rounds (broadcasts, K/V gathers) and the MLP ring run once more,
// recorded in the layer's backward traffic; the hooks keep no state between layers, so nothing
// else changes.
//
// No rank ever allocates a whole layer's weights or weight gradients, or [n, V] logits.
// With overlap off every transfer is waited for as soon as it is started; the arithmetic (and
// its order) is the same, so results are bitwise identical. At D = 1 every loop degenerates to
// the single layout's calls on the same shapes, so results are bitwise equal to the reference.
#include <algorithm>
#include <functional>
#include <limits>

#include "infer/engines.h"
#include "parallel/layout_common.h"
#include "parallel/mappings.h"
#include "parallel/registry.h"
#include "parallel/tsp.h"
#include "parallel/tsp_schedule.h"
#include "plan/model_util.h"
#include "tsp/model/block.h"

namespace tsp {
namespace {

constexpr MemCategory kComm = MemCategory::Comm;
constexpr MemCategory kWork = MemCategory::Workspace;
constexpr int32_t kIgnoreIndex = block::kIgnoreIndex;  // labels the loss skips

class TspLayout final : public LayoutCommon, public TspTrafficReport {
 public:
  TspLayout(const LlamaConfig& config, const ParallelConfig& parallel, Communicator& world)
      : LayoutCommon("tsp", config, parallel, world) {
    const LlamaConfig& c = config_;
    const int D = this->D(), p = group_rank();
    // Every split must be even: say which D would work (sharding.h messages).
    check_heads(c, D);
    check_ffn(c.intermediate_size, D);
    check_vocab(c.vocab_size, D);

    group_ = head_group(c, D, p);
    ad_ = block::attn_dims(c, group_.hq(), group_.hkv());
    f_ = c.intermediate_size / D;
    vs_ = c.vocab_size / D;
    const int64_t h = c.hidden_size, qw = ad_.q_width(), kw = ad_.kv_width();
    attn_pack_.shapes = {{qw, h}, {kw, h}, {kw, h}, {h, qw}};
    mlp_pack_.shapes = {{f_, h}, {f_, h}, {h, f_}};
    vocab_pack_.shapes = {{vs_, h}};

    // Store: the row / column pieces above; they coincide with head group p because the groups
    // are contiguous and even (checked, so a change in sharding.h cannot silently desync them).
    for (int i = 0; i < static_cast<int>(specs_.size()); ++i) {
      switch (specs_[i].kind) {
        case ParamKind::InputNorm:
        case ParamKind::PostNorm:
        case ParamKind::FinalNorm:
          store_.add(i, ShardMap::whole(), /*replicated_in_group=*/true);
          break;
        case ParamKind::Wo:
        case ParamKind::Wdown:
          store_.add(i, ShardMap::cols(D, p), false);
          break;
        default:  // embedding, q, k, v, gate, up, LM head: by output rows / vocabulary
          store_.add(i, ShardMap::rows(D, p), false);
      }
    }
    const Shape& wq = specs_[idx_.layers.at(0).wq].shape;
    const Shape& wk = specs_[idx_.layers.at(0).wk].shape;
    TSP_CHECK(ShardMap::rows(D, p).range(wq) == group_.q_rows() &&
                  ShardMap::rows(D, p).range(wk) == group_.kv_rows() &&
                  ShardMap::cols(D, p).range(specs_[idx_.layers[0].wo].shape) == group_.q_rows(),
              "tsp: the row shards of q/k/v/o do not match head group {} of {}", p, D);
    allocate_store();
  }

  const TspTraffic& last_traffic() const override { return traffic_; }

 protected:
  // Zigzag chunks p and 2D-1-p of every row (take_tokens; input_ranges follows).
  int token_parts() const override { return D(); }
  int token_index() const override { return group_rank(); }
  // S must cut into 2D chunks at every D, D = 1 included (chunks 0 and 1: every token in order),
  // so a batch shape tsp accepts does not depend on the group size.
  void check_batch(const ReplicaBatch& rb) const override { check_zigzag(rb.S, D()); }

  void embed_forward(const LocalTokens& t, TensorView x) override;
  void embed_backward(const LocalTokens& t, TensorView dx) override;
  void attention_forward(int l, const LocalTokens& t, TensorView xn, block::LayerSaved& s) override;
  void attention_backward(int l, const LocalTokens& t, TensorView xn, const block::LayerSaved& s,
                          TensorView dx, TensorView dxn) override;
  // --recompute none keeps the activations of each of the D FFN shards the ring brings.
  int64_t mlp_slices() const override { return D(); }
  int64_t mlp_slice_rows() const override { return f_; }
  void mlp_forward(int l, const LocalTokens& t, TensorView xn, TensorView x,
                   block::LayerSaved& s) override;
  void mlp_backward(int l, const LocalTokens& t, TensorView xn, TensorView dy, TensorView dxn,
                    const block::LayerSaved& s) override;
  void head_loss(const LocalTokens& t, TensorView xn, float grad_scale, TensorView loss,
                 TensorView dxn) override;
  TensorView grad_target(int param) override;
  void end_backward(const LocalTokens& t) override;
  void part_done(Part part, int layer) override;
  // At D > 1 the norm gradients reach the store in end_backward (one all-reduce of all of them).
  bool grad_final_at_end(int param) const override {
    const ParamKind k = specs_[param].kind;
    return D() > 1 && (k == ParamKind::InputNorm || k == ParamKind::PostNorm);
  }

 private:
  using BwdBody = std::function<void(int s, const Pieces& w, const Pieces& g)>;

  // ---- communication schedules (the only places that move weights) --------------------------
  // The forward ones (ring_forward, attention_rounds) are shared with the tsp inference engine
  // (parallel/tsp_schedule.h); they run on this context.
  ScheduleContext schedule() { return {be_, group(), act_dtype(), parallel().overlap}; }
  void ring_backward(const Packing& wpk, const Pieces& own_w, Tensor first, const Packing& gpk,
                     const Pieces& own_g, const BwdBody& body);

  // ---- head group r's slices of the saved activations -----------------------------------------
  // Saved q, k, v, o, lse hold every head of the local tokens, one contiguous block per head
  // group ([D][n, hq_r, d] ...), so each round reads and writes plain [n, ...] tensors.
  struct Slices {
    TensorView q, k, v, o, lse;  // [n, hq_r, d], [n, hkv_r, d] ×2, [n, hq_r, d], F32 [n, hq_r]
  };
  Slices group_slices(const block::LayerSaved& s, int r, int64_t n) const {
    const int64_t qw = ad_.q_width(), kw = ad_.kv_width(), hq = ad_.hq, hkv = ad_.hkv, d = ad_.d;
    return {s.q.window(r * n * qw, {n, hq, d}), s.k.window(r * n * kw, {n, hkv, d}),
            s.v.window(r * n * kw, {n, hkv, d}), s.o.window(r * n * qw, {n, hq, d}),
            s.lse.window(r * n * hq, {n, hq})};
  }
  // Where a sub-block adds its output (the residual r [n, h]): the residual itself, or under bf16
  // with D > 1 (several rounds / ring steps) an F32 sum, zeroed here and added by finish_sum.
  TensorView begin_sum(TensorView r, Tensor& sum) const {
    if (act_dtype() == DType::F32 || D() == 1) return r;
    sum = Tensor::zeros(r.shape(), DType::F32, kWork, device());
    return sum.view();
  }
  void finish_sum(TensorView r, const Tensor& sum) {
    if (!sum.empty()) be_.add(r, sum.view());  // the sub-block's output, rounded once
  }

  Pieces attn_own_w(const ParamIndex::Layer& P) const {
    return {store_.w(P.wq), store_.w(P.wk), store_.w(P.wv), store_.w(P.wo)};
  }
  Pieces attn_own_g(const ParamIndex::Layer& P) const {
    return {store_.g(P.wq), store_.g(P.wk), store_.g(P.wv), store_.g(P.wo)};
  }
  Pieces mlp_own_w(const ParamIndex::Layer& P) const {
    return {store_.w(P.wg), store_.w(P.wu), store_.w(P.wd)};
  }
  Pieces mlp_own_g(const ParamIndex::Layer& P) const {
    return {store_.g(P.wg), store_.g(P.wu), store_.g(P.wd)};
  }
  static block::AttnWeights attn_weights(const Pieces& w) { return {w[0], w[1], w[2], w[3]}; }
  static block::AttnGrads attn_grads(const Pieces& g) { return {g[0], g[1], g[2], g[3]}; }
  static block::MlpWeights mlp_weights(const Pieces& w) { return {w[0], w[1], w[2]}; }
  static block::MlpGrads mlp_grads(const Pieces& g) { return {g[0], g[1], g[2]}; }
  int64_t v0(int s) const { return s * vs_; }
  int mod(int i) const { return ((i % D()) + D()) % D(); }
  void progress() { group().progress(); }

  HeadGroup group_;  // head group of this rank (every group has the same sizes)
  block::AttnDims ad_;
  int64_t f_ = 0, vs_ = 0;  // FFN rows and vocabulary ids per shard
  Packing attn_pack_, mlp_pack_, vocab_pack_;
  // Norm weights are replicated: one step's gradients collect here, F32 [(2L + 1)·h] (final;
  // per layer input, post), and are summed over the group with ONE all-reduce in end_backward.
  // D > 1 only, allocated by the first grad_target of a backward (MemCategory::Grads).
  Tensor norm_grads_;
  TspTraffic traffic_;
  CommStats mark_;  // group traffic at the end of the last part
};

// ---- schedules ------------------------------------------------------------------------------

// Backward ring, own shard last: step k handles s = (p + 1 + k) mod D, so step D-1 is the own
// shard. Weights (compute dtype) travel s -> s-1: the first hop before step 0 (skipped when
// `first` already holds shard p+1), then one hop during each step whose successor is not the own
// shard: D-1 hops in all (D-2 with `first`). The F32 gradient of shard s is created at rank s-1
// (step 0), passed left after each step with the local contribution added (acc + part), and
// lands at the owner s (step D-1), who adds it to its gradient after accumulating its own
// contribution directly: D-1 hops. `wpk` may be empty (no weights needed, e.g. the embedding
// gradient).
void TspLayout::ring_backward(const Packing& wpk, const Pieces& own_w, Tensor first,
                              const Packing& gpk, const Pieces& own_g, const BwdBody& body) {
  const int D = this->D(), p = group_rank();
  if (D == 1) {
    body(p, own_w, own_g);
    return;
  }
  Communicator& c = group();
  const bool overlap = parallel().overlap, has_w = !wpk.shapes.empty();
  const int left = mod(p - 1), right = mod(p + 1);
  const int64_t wn = wpk.total(), gn = gpk.total();
  const DType wt = act_dtype();
  const Device dev = device();

  Tensor wbuf[2];
  int cur = 0;
  if (has_w) {
    if (first.empty()) {
      // First hop: every rank hands its own shard to its left neighbour.
      wbuf[0] = Tensor({wn}, wt, kComm, dev);
      wbuf[1] = Tensor({wn}, wt, kComm, dev);
      wpk.pack(be_, own_w, wbuf[1].view());
      c.sendrecv(wbuf[1].data(), wn, wt, left, wbuf[0].data(), wn, right);
    } else {
      TSP_CHECK(first.numel() == wn && first.dtype() == wt,
                "tsp: shard in hand is {} {}, expected {} {}", dtype_name(first.dtype()),
                first.numel(), dtype_name(wt), wn);
      wbuf[0] = std::move(first);
      if (D > 2) wbuf[1] = Tensor({wn}, wt, kComm, dev);
    }
  }
  // acc[k % 2] holds the accumulator of step k's shard; `part` receives a step's contribution
  // while the accumulator it will be added to is still arriving.
  Tensor acc[2] = {Tensor::f32({gn}, kComm, dev), Tensor::f32({gn}, kComm, dev)};
  Tensor part = D > 2 ? Tensor::f32({gn}, kComm, dev) : Tensor();
  // Every rank posts its pairs in the same order (the weight hop of step k, then the accumulator
  // hop of step k), which is how pairs between two ranks match (communicator.h).
  RequestPtr acc_hop;  // acc[k % 2] to p-1, the next accumulator from p+1 into acc[(k + 1) % 2]
  for (int k = 0; k < D; ++k) {
    const int s = mod(p + 1 + k);
    RequestPtr w_hop;
    if (has_w && k + 1 <= D - 2) {  // the shard of step k+1 (not the own one) travels meanwhile
      w_hop = c.isendrecv(wbuf[cur].data(), wn, wt, left, wbuf[1 - cur].data(), wn, right);
      if (!overlap) w_hop->wait();
    }
    if (k == D - 1) {
      // The owner: its contribution straight into its gradients, then the others' sum.
      body(p, own_w, own_g);
      acc_hop->wait();
      gpk.add_into(be_, own_g, acc[k % 2].view());
    } else {
      Tensor& target = k == 0 ? acc[0] : part;
      be_.zero(target.view());
      body(s, has_w ? wpk.split(wbuf[cur].view()) : Pieces{}, gpk.split(target.view()));
      if (k > 0) {
        // The previous hop brought this step's accumulator and freed the other buffer.
        acc_hop->wait();
        be_.add(acc[k % 2].view(), part.view());
      }
      acc_hop =
          c.isendrecv(acc[k % 2].data(), gn, DType::F32, left, acc[(k + 1) % 2].data(), gn, right);
      if (!overlap) acc_hop->wait();
    }
    if (w_hop) {
      w_hop->wait();
      cur = 1 - cur;
    }
  }
}

// ---- embedding: vocabulary ring ---------------------------------------------------------------

// x [n, h] (=): each token's row is written by the shard holding its id, as that shard passes.
void TspLayout::embed_forward(const LocalTokens& t, TensorView x) {
  // The first hook of a call: the traffic records start here.
  const int L = static_cast<int>(config_.num_hidden_layers);
  traffic_ = TspTraffic{};
  traffic_.layer_forward.assign(L, CommStats{});
  traffic_.layer_backward.assign(L, CommStats{});
  mark_ = group().stats();
  norm_grads_ = Tensor();
  ring_forward(
      schedule(), vocab_pack_, {store_.w(idx_.embed)}, /*keep_last=*/false,
      [&](int s, const Pieces& w) { be_.embedding_forward(t.ids.view(), w[0], x, v0(s)); });
}

// dx F32 [n, h]: no weights needed, only the travelling accumulator of each shard.
void TspLayout::embed_backward(const LocalTokens& t, TensorView dx) {
  ring_backward(Packing{}, Pieces{}, Tensor(), vocab_pack_, {store_.g(idx_.embed)},
                [&](int s, const Pieces&, const Pieces& g) {
                  be_.embedding_backward(t.ids.view(), dx, g[0], v0(s));
                });
}

// ---- attention: broadcast rounds ----------------------------------------------------------------

// s.x2 holds x (the recipe copied it): x2 = x + Σ_r o_r·Wo_rᵀ, accumulated round by round.
void TspLayout::attention_forward(int l, const LocalTokens& t, TensorView xn,
                                  block::LayerSaved& s) {
  const ParamIndex::Layer& P = idx_.layers[l];
  const int D = this->D();
  const int64_t n = t.n, BS = t.B * t.S;
  // K and V of one head group for the whole sequence [B·S, hkv_r, d] at t.k_pos. When B = 1 the
  // all-gather lands in them directly (they are the transfer buffers, Comm); else it lands in
  // gather_sequence's staging (Comm) and they are the re-ordered copy (Workspace).
  const MemCategory full_cat = t.B == 1 ? kComm : kWork;
  Tensor K_full, V_full, k_staging, v_staging;
  if (D > 1) {
    K_full = Tensor({BS, ad_.hkv, ad_.d}, act_dtype(), full_cat, device());
    V_full = Tensor({BS, ad_.hkv, ad_.d}, act_dtype(), full_cat, device());
  }
  Tensor sum;
  const TensorView y = begin_sum(s.x2.view(), sum);
  attention_rounds(schedule(), attn_pack_, attn_own_w(P), [&](int r, const Pieces& w) {
    const block::AttnWeights aw = attn_weights(w);
    const Slices g = group_slices(s, r, n);
    block::qkv_forward(be_, ad_, aw, xn, t.tok_pos.view(), g.q, g.k, g.v);
    progress();
    TensorView K = g.k, V = g.v;  // D = 1: the whole sequence is local
    if (D > 1) {
      gather_sequence(be_, group(), t, g.k, K_full.view(), k_staging);
      gather_sequence(be_, group(), t, g.v, V_full.view(), v_staging);
      K = K_full.view();
      V = V_full.view();
    }
    for (int64_t b = 0; b < t.B; ++b) {  // row by row, driving the transfers in between
      const int64_t q0 = b * t.nl, k0 = b * t.S;
      block::attention_forward(be_, ad_, 1, g.q.slice(q0, q0 + t.nl), K.slice(k0, k0 + t.S),
                               V.slice(k0, k0 + t.S), t.q_pos.view(), t.k_pos.view(),
                               g.o.slice(q0, q0 + t.nl), g.lse.slice(q0, q0 + t.nl),
                               t.doc_pos(b, b + 1));
      progress();
    }
    block::out_proj_forward(be_, aw.wo, g.o, y);  // local accumulation, no all-reduce
    progress();
  });
  finish_sum(s.x2.view(), sum);
}

// dx F32 [n, h] = d x2 -> dxn F32 [n, h] (+=). The partial gradient of P_r (from this rank's
// tokens) is reduced to owner r while the next round computes.
void TspLayout::attention_backward(int l, const LocalTokens& t, TensorView xn,
                                   const block::LayerSaved& s, TensorView dx, TensorView dxn) {
  const ParamIndex::Layer& P = idx_.layers[l];
  const int D = this->D(), p = group_rank();
  const int64_t n = t.n, BS = t.B * t.S, hq = ad_.hq, hkv = ad_.hkv, d = ad_.d;
  const Device dev = device();
  Tensor d_o = Tensor::f32({n, hq, d}, kWork, dev);
  Tensor dq = Tensor::f32({n, hq, d}, kWork, dev);
  Tensor dK = Tensor::f32({BS, hkv, d}, kWork, dev);  // whole sequence of head group r
  Tensor dV = Tensor::f32({BS, hkv, d}, kWork, dev);
  Tensor dk = D > 1 ? Tensor::f32({n, hkv, d}, kWork, dev) : Tensor();  // own tokens, after
  Tensor dv = D > 1 ? Tensor::f32({n, hkv, d}, kWork, dev) : Tensor();  // the reduce-scatter
  const MemCategory full_cat = t.B == 1 ? kComm : kWork;                // as in attention_forward
  Tensor K_full, V_full, k_staging, v_staging, dk_staging, dv_staging;
  if (D > 1) {
    K_full = Tensor({BS, hkv, d}, act_dtype(), full_cat, dev);
    V_full = Tensor({BS, hkv, d}, act_dtype(), full_cat, dev);
  }
  // Two F32 buffers for the partial gradients of P_r; the owner adds the sum to its gradients
  // once it has arrived.
  const int64_t total = attn_pack_.total();
  Tensor gpart[2];
  RequestPtr reducing[2];
  int reduced_round[2] = {-1, -1};
  auto finish_reduce = [&](int slot) {
    if (!reducing[slot]) return;
    reducing[slot]->wait();
    reducing[slot].reset();
    if (reduced_round[slot] == p) attn_pack_.add_into(be_, attn_own_g(P), gpart[slot].view());
  };
  attention_rounds(schedule(), attn_pack_, attn_own_w(P), [&](int r, const Pieces& w) {
    const int slot = r % 2;
    Pieces gp;
    if (D == 1) {
      gp = attn_own_g(P);  // nobody else contributes: straight into the gradients
    } else {
      finish_reduce(slot);
      if (gpart[slot].empty()) gpart[slot] = Tensor::f32({total}, kComm, dev);
      be_.zero(gpart[slot].view());
      gp = attn_pack_.split(gpart[slot].view());
    }
    const block::AttnWeights aw = attn_weights(w);
    const block::AttnGrads ag = attn_grads(gp);
    const Slices g = group_slices(s, r, n);
    block::out_proj_backward(be_, aw.wo, g.o, dx, d_o.view(), ag.dwo);
    progress();
    TensorView K = g.k, V = g.v;
    if (D > 1) {
      gather_sequence(be_, group(), t, g.k, K_full.view(), k_staging);
      gather_sequence(be_, group(), t, g.v, V_full.view(), v_staging);
      K = K_full.view();
      V = V_full.view();
    }
    be_.zero(dq.view());
    be_.zero(dK.view());
    be_.zero(dV.view());
    for (int64_t b = 0; b < t.B; ++b) {
      const int64_t q0 = b * t.nl, k0 = b * t.S;
      const auto qr = [&](TensorView x) { return x.slice(q0, q0 + t.nl); };
      const auto kr = [&](TensorView x) { return x.slice(k0, k0 + t.S); };
      block::attention_backward(be_, ad_, 1, qr(g.q), kr(K), kr(V), t.q_pos.view(), t.k_pos.view(),
                                qr(g.o), qr(g.lse), qr(d_o.view()), qr(dq.view()), kr(dK.view()),
                                kr(dV.view()), t.doc_pos(b, b + 1));
      progress();
    }
    TensorView dk_own = dK.view(), dv_own = dV.view();  // D = 1: the whole sequence is local
    if (D > 1) {
      reduce_scatter_sequence(be_, group(), t, dK.view(), dk.view(), dk_staging);
      reduce_scatter_sequence(be_, group(), t, dV.view(), dv.view(), dv_staging);
      dk_own = dk.view();
      dv_own = dv.view();
    }
    block::qkv_backward(be_, ad_, aw, ag, xn, t.tok_pos.view(), dq.view(), dk_own, dv_own, dxn);
    if (D > 1) {
      void* buf = gpart[slot].data();
      reducing[slot] = group().ireduce(buf, buf, total, DType::F32, r);
      reduced_round[slot] = r;
      if (!parallel().overlap) finish_reduce(slot);
    }
  });
  finish_reduce(0);
  finish_reduce(1);
}

// ---- MLP: weight ring --------------------------------------------------------------------------

// x [n, h] (+=) Σ_s mlp_s(xn) over the D FFN slices as they pass. Under --recompute none slice
// s's activations are kept in s.mlp(s, D), whatever step of the ring brings it.
void TspLayout::mlp_forward(int l, const LocalTokens&, TensorView xn, TensorView x,
                            block::LayerSaved& saved) {
  Tensor sum;
  const TensorView y = begin_sum(x, sum);
  ring_forward(schedule(), mlp_pack_, mlp_own_w(idx_.layers[l]), /*keep_last=*/false,
               [&](int s, const Pieces& w) {
                 block::mlp_forward(be_, mlp_weights(w), xn, y, saved.mlp(s, D()),
                                    [&] { progress(); });
               });
  finish_sum(x, sum);
}

// dy F32 [n, h] -> dxn F32 [n, h] (+=); each slice's weight gradient travels to its owner. The
// backward ring visits the slices in another order than the forward's: each reads its own kept
// activations by slice index.
void TspLayout::mlp_backward(int l, const LocalTokens&, TensorView xn, TensorView dy,
                             TensorView dxn, const block::LayerSaved& saved) {
  const ParamIndex::Layer& P = idx_.layers[l];
  ring_backward(mlp_pack_, mlp_own_w(P), Tensor(), mlp_pack_, mlp_own_g(P),
                [&](int s, const Pieces& w, const Pieces& g) {
                  block::mlp_backward(be_, mlp_weights(w), mlp_grads(g), xn, dy, dxn,
                                      saved.mlp(s, D()), [&] { progress(); });
                });
}

// ---- loss head: vocabulary ring with an online cross-entropy ----------------------------------

// xn [n, h] final-normed. loss (+=) the sum of the local tokens' losses; with dxn [n, h] (=) also
// the backward, the LM-head gradient landing at each shard's owner. Records head_forward and
// head_backward itself (the recipe runs both in this one hook).
void TspLayout::head_loss(const LocalTokens& t, TensorView xn, float grad_scale, TensorView loss,
                          TensorView dxn) {
  const int head = head_param();
  if (D() == 1) {
    // One shard: the online cross-entropy is the plain one, so call the shared head (it sums
    // the exponentials in another order), which keeps D = 1 bitwise equal to single.
    block::lm_head_loss(be_, xn, store_.w(head), t.labels.view(), grad_scale, loss, dxn,
                        dxn.empty() ? TensorView() : store_.g(head));
    return;
  }
  const int64_t n = t.n, h = config_.hidden_size;
  const Device dev = device();
  // Per token: running max and sum of exp over the vocabulary seen so far, and the target's logit.
  Tensor row_max = Tensor::f32({n}, kWork, dev);
  Tensor row_sum = Tensor::zeros({n}, DType::F32, kWork, dev);
  Tensor target = Tensor::zeros({n}, DType::F32, kWork, dev);  // stays 0 on ignored tokens
  be_.fill(row_max.view(), -std::numeric_limits<float>::infinity());
  const int64_t rows_at_once = block::token_chunk(dev.kind), rows = std::min(n, rows_at_once);
  Tensor logits = Tensor::f32({rows, vs_}, kWork, dev);  // one shard of one token chunk at a time
  const Pieces own_w{store_.w(head)}, own_g{store_.g(head)};
  // Token chunk [t0, t0 + m): its normed inputs, labels, statistics and logits.
  const auto chunk = [&](TensorView v, int64_t t0, int64_t m, int64_t cols) {
    return v.window(t0 * cols, cols == 1 ? Shape{m} : Shape{m, cols});
  };

  CommStats before = group().stats();
  Tensor in_hand = ring_forward(
      schedule(), vocab_pack_, own_w, /*keep_last=*/!dxn.empty(), [&](int s, const Pieces& w) {
        for (int64_t t0 = 0; t0 < n; t0 += rows_at_once) {
          const int64_t m = std::min(rows_at_once, n - t0);
          const TensorView lv = logits.window(0, {m, vs_});
          be_.linear_forward(chunk(xn, t0, m, h), w[0], lv, /*accumulate=*/false);
          be_.online_softmax_update(
              lv, chunk(t.labels.view(), t0, m, 1), chunk(row_max.view(), t0, m, 1),
              chunk(row_sum.view(), t0, m, 1), chunk(target.view(), t0, m, 1), v0(s));
          progress();
        }
      });
  traffic_.head_forward = group().stats() - before;
  be_.online_softmax_loss(row_max.view(), row_sum.view(), target.view(), t.labels.view(), loss,
                          kIgnoreIndex);
  if (dxn.empty()) return;

  // Backward: the same shards again (the ring starts with shard p+1, still in hand), logits
  // recomputed, dlogits = grad_scale·(softmax - onehot) from the final statistics.
  before = group().stats();
  be_.zero(dxn);
  Tensor dlogits = Tensor::f32({rows, vs_}, kWork, dev);
  ring_backward(vocab_pack_, own_w, std::move(in_hand), vocab_pack_, own_g,
                [&](int s, const Pieces& w, const Pieces& g) {
                  for (int64_t t0 = 0; t0 < n; t0 += rows_at_once) {
                    const int64_t m = std::min(rows_at_once, n - t0);
                    const TensorView lv = logits.window(0, {m, vs_}),
                                     dl = dlogits.window(0, {m, vs_}), x = chunk(xn, t0, m, h);
                    be_.linear_forward(x, w[0], lv, false);
                    be_.online_softmax_backward(
                        lv, chunk(t.labels.view(), t0, m, 1), chunk(row_max.view(), t0, m, 1),
                        chunk(row_sum.view(), t0, m, 1), dl, v0(s), grad_scale, kIgnoreIndex);
                    be_.linear_backward(dl, x, w[0], chunk(dxn, t0, m, h), g[0]);
                    progress();
                  }
                });
  traffic_.head_backward = group().stats() - before;
}

// ---- replicated norms ---------------------------------------------------------------------------

// At D > 1 the group's ranks hold different tokens of the same norm weights: their gradients
// collect in norm_grads_ (slot 0 the final norm, 1 + 2l / 2 + 2l layer l's input / post norm).
TensorView TspLayout::grad_target(int param) {
  if (D() == 1) return store_.g(param);
  const int64_t h = config_.hidden_size;
  const int L = static_cast<int>(config_.num_hidden_layers);
  if (norm_grads_.empty())
    norm_grads_ = Tensor::zeros({(2 * L + 1) * h}, DType::F32, MemCategory::Grads, device());
  int slot = -1;
  if (param == idx_.final_norm) slot = 0;
  for (int l = 0; l < L && slot < 0; ++l) {
    if (param == idx_.layers[l].input_norm) slot = 1 + 2 * l;
    if (param == idx_.layers[l].post_norm) slot = 2 + 2 * l;
  }
  TSP_CHECK(slot >= 0, "tsp: parameter #{} is not a norm weight", param);
  return norm_grads_.window(slot * h, {h});
}

// One all-reduce of every norm gradient of the step, then into the store.
void TspLayout::end_backward(const LocalTokens&) {
  if (norm_grads_.empty()) return;  // D = 1: they went straight in
  all_reduce_sum(be_, group(), norm_grads_.view());
  const int64_t h = config_.hidden_size;
  be_.add(store_.g(idx_.final_norm), norm_grads_.window(0, {h}));
  for (int l = 0; l < static_cast<int>(config_.num_hidden_layers); ++l) {
    be_.add(store_.g(idx_.layers[l].input_norm), norm_grads_.window((1 + 2 * l) * h, {h}));
    be_.add(store_.g(idx_.layers[l].post_norm), norm_grads_.window((2 + 2 * l) * h, {h}));
  }
  norm_grads_ = Tensor();
}

// ---- traffic records ----------------------------------------------------------------------------

void TspLayout::part_done(Part part, int layer) {
  const CommStats now = group().stats(), moved = now - mark_;
  mark_ = now;
  switch (part) {
    case Part::EmbeddingForward:
      traffic_.embedding_forward = moved;
      break;
    case Part::LayerForward:
      traffic_.layer_forward.at(layer) = moved;
      break;
    case Part::HeadForward:   // head_loss recorded its forward and backward rings itself
    case Part::HeadBackward:  // the final norm's backward: nothing moves
      break;
    case Part::LayerBackward:
      traffic_.layer_backward.at(layer) = moved;
      break;
    case Part::EmbeddingBackward:
      traffic_.embedding_backward = moved;
      break;
    case Part::End:  // end_backward: the norm gradients' all-reduce
      traffic_.norms = moved;
      break;
  }
}

const LayoutRegistration kRegisterTsp(
    "tsp",
    "tensor and sequence parallel folded on one axis: 1/D of every weight and 1/D of the tokens "
    "per rank; weight shards travel (broadcast rounds, rings), overlapped with compute",
    [](const LlamaConfig& c, const ParallelConfig& p, Communicator& world) {
      return std::unique_ptr<Layout>(new TspLayout(c, p, world));
    });
// Inference: prefill with this file's schedules, weight-stationary decode
// (src/infer/seq_sharded.cpp).
const EngineRegistration kRegisterTspEngine("tsp", infer::make_tsp_engine);

}  // namespace
}  // namespace tsp

// ---- The model of this layout for the planner ---------------------------------------------------
//
// The model of tsp (src/parallel/tsp.cpp, docs/tsp-schedule.md): D ranks each own 1/D of every
// matrix (attention heads as packed [Wq_r; Wk_r; Wv_r; Wo_r] shards, MLP rows/columns, vocabulary
// rows) AND 1/D of the tokens (zigzag chunks). Attention shards are broadcast round by round, MLP
// and vocabulary shards travel a ring, K/V of one head group are all-gathered per round.
//
// Registered with the layout's name: src/plan asks it (include/tsp/plan/layout_model.h)
// instead of comparing names, so the layout, its algorithm and its formulas live in one file.
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
  // TspLayout::grad_final_at_end: the norm gradients' one all-reduce at the end of the backward.
  bool norm_grads_final_at_end(const LayoutSpec& l) const override { return l.D > 1; }

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
    // Only selective rebuilds the norm output and gate, up, act in the backward (LayoutModel's).
    const double rebuilt = w.recompute == Recompute::Selective ? 1 : 0;
    const double base_ws = (1 + rebuilt) * N * s.h / D * ab;  // dx, recomputed norm output
    const double mlp_ws = base_ws + (1 + 3 * rebuilt) * N * mlp_cols / D * ab;
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
    const int64_t r = std::min(n, in.target.token_chunk());  // rows at once
    // Every head of the local tokens saved per layer, under none with the normed inputs and the
    // activations of all D FFN shards (under full recomputation checkpoints and one whole set:
    // LocalInputs::saved_through), and the final norm's rstd.
    const int64_t set = saved_bytes(s, n, s.nh, s.nkv, n, e) + in.kept(n, h, s.F),
                  checkpoint = e.act * n * h;
    const int64_t act = in.saved_through(s.L - 1, set, checkpoint) + kF32 * n;
    const int64_t act_head = in.saved_all(s.L, set, checkpoint) + kF32 * n;
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
    out.push_back({act, 2 * e.weight * mlp_shard + kF32 * (2 * mlp_shard + (D > 2 ? mlp_shard : 0)),
                   base + in.mlp_backward_work(r, f) + std::max(e.narrow(r * f), e.narrow(r * h)),
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
                                 in.attention_backward_transient(d, hq, hkv, n / in.Br, in.S)}),
                   norm_grads});
    // Full recomputation under bf16: the backward's replay of a layer's attention ends with
    // finish_sum, the rounds' fp32 sum [n, h] (Workspace) added into the bf16 residual (on the
    // CPU through the backend's fp32 widening of it, [n, h] Workspace: in.add_widening), while K
    // and V of the last head group (and with B > 1 their staging) are still held; dx and dxn are
    // alive. (Under f32 the rounds add straight into the residual: no such moment.)
    if (in.recompute == Recompute::Full && e.mixed())
      out.push_back(
          {act, 2 * e.act * all * kw,
           base + (rows ? 2 * e.act * all * kw : 0) + kF32 * n * h + in.add_widening(n * h),
           norm_grads});
    // loss head backward ring: the shard in hand (+ the next when D > 2), accumulators (+ part),
    // logits and dlogits chunks (dlogits narrowed for the GEMMs), running statistics; before
    // run() allocates dx. (CUDA's online_softmax_loss adds an F64 [n] at the end of the forward
    // ring, when neither the accumulators nor dlogits exist yet: below this moment whenever
    // 8·vs·h + 4·r·vs >= 8n, i.e. at every shape with vs·h >= n.)
    out.push_back({act_head,
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
