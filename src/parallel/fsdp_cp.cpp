// The "fsdp-cp" layout: FSDP (ZeRO-3) on the context-parallel axis. Not in the TSP paper; it is the
// fairest baseline for TSP's claims because it reaches the same 1/D weights + 1/D tokens per rank
// by a different route: it moves WHOLE LAYERS of weights to the tokens, where TSP moves one shard
// at a time.
//
//   at rest   every parameter [rows, cols] is cut by rows into D equal contiguous pieces (its
//             row-major flattening cut into D pieces); group rank p holds piece p of every
//             parameter and of its gradient. We require D | rows of every parameter (h,
//             n_kv·head_dim, intermediate_size, vocab_size) instead of padding, so a piece is
//             an even ShardMap::rows(D, p) shard and load / gather / parameters() come from the
//             framework's ShardStore unchanged.
//   tokens    zigzag: rows cut into 2D chunks, rank p holds chunks p and 2D-1-p ([B, S/D] local).
//   units     what is gathered at once: the embedding; each layer (its two norms and seven
//             matrices); the head (final norm and the LM head, or the embedding when tied).
//
// Forward, for every unit in order embedding, layer 0 … L-1, head:
//   wait for the unit's full weights (all-gather of every rank's pieces into a Comm buffer),
//   start the all-gather of the NEXT unit (prefetch), compute, free the unit's full weights.
//   A layer's attention all-gathers the local k and v ([B, S/D, kv] per rank) into the full
//   sequence ([B, S, kv] at zigzag_gathered_positions), so queries attend at global positions.
// The head runs the loss forward and backward at once (block::lm_head_loss), as in single.
// Backward, for layer L-1 … 0:
//   wait for the layer's weights (gathered again; prefetched during the previous layer's
//   backward), start the K/V re-gather, run the MLP backward meanwhile, attention backward on the
//   full K/V, reduce-scatter dK/dV back to the ranks that own those tokens, finish the layer into
//   a full-size gradient buffer, then reduce-scatter it (non-blocking: it completes during the
//   next layer's backward) and add the rank's piece into its gradient shard.
// Last, the embedding's gradient (lookup rows, plus the head's part when tied) is reduce-scattered.
// Under --recompute full the recipe replays layer l's forward at the start of its backward
// (layout_common.h): begin_layer_replay acquires the layer's unit (and starts the prefetch of l-1)
// as begin_layer_backward would, the replay's attention all-gathers K/V into the fresh saved set
// (saved_[l] points at it), and begin_layer_backward then finds the unit in hand: the weights are
// gathered once per layer in the backward either way, and the replay's traffic is counted in the
// layer's backward record.
//
// The order above is the layer recipe of layout_common.h: this file implements its hooks, and the
// unit schedule rides on them (part_done: free the unit just used, wait for the next and start
// the prefetch of the one after; begin/end_layer_backward: the same in backward, plus the K/V
// re-gather; norm_weight / grad_target: the norms inside the gathered unit and its gradients).
//
// Mixed precision: a unit's full weights are gathered from the compute-dtype copies (bf16 moves
// half the bytes of f32) and K/V travel in the compute dtype; every gradient buffer and every
// reduce-scatter (weights, dK/dV) is fp32.
//
// Memory: at most two units' full weights exist at once (the one computing and the prefetched one;
// one with --no-overlap), and at most two full-size layer gradients (the one being computed and
// the previous one in flight). The weight and K/V all-gathers and the weight-gradient
// reduce-scatters are non-blocking starts; with overlap off each is waited right after its start
// (dK/dV's reduce-scatter, needed at once, blocks in both modes), so both modes run the same MPI
// calls on the same buffers and give bit-identical results. At D=1 the arithmetic is single's, in
// single's order (the collectives of a one-rank group are copies): bitwise equal.
#include "parallel/fsdp_cp.h"

#include <algorithm>
#include <numeric>
#include <utility>

#include "parallel/layout_common.h"
#include "parallel/mappings.h"
#include "parallel/registry.h"
#include "plan/model_util.h"
#include "tsp/model/block.h"

namespace tsp {
namespace {

// Offsets inside unit buffers are kept aligned to 16 elements (64 bytes in f32), like the shard
// slabs.
int64_t aligned(int64_t n) {
  return (n + 15) / 16 * 16;
}

// Every parameter must split by rows into D equal pieces. The message names the first parameter
// that does not and the degrees that would work for every parameter.
void check_fsdp_rows(const std::vector<ParamSpec>& specs, int D) {
  int64_t g = 0;
  for (const ParamSpec& s : specs) g = std::gcd(g, s.shape[0]);
  for (const ParamSpec& s : specs)
    TSP_CHECK(s.shape[0] % D == 0,
              "fsdp-cp cuts every parameter into D={} equal pieces of rows, but {} has {} rows; "
              "use D in {} (the common divisors of hidden_size, num_key_value_heads·head_dim, "
              "intermediate_size and vocab_size)",
              D, s.name, s.shape[0], divisors_str(g));
}

// A set of parameters gathered (and their gradients reduce-scattered) together. Full tensors lie
// one after another in a buffer of full_size elements; the pieces of this rank in one of
// piece_size.
struct Unit {
  std::vector<int> params;
  std::vector<Shape> shape;        // full shape of each parameter
  std::vector<int64_t> numel;      // full elements of each parameter
  std::vector<int64_t> full_off;   // offset of each full tensor in the full buffer
  std::vector<int64_t> piece_off;  // offset of each piece in the piece buffer
  int64_t full_size = 0, piece_size = 0;

  Unit() = default;
  Unit(const std::vector<ParamSpec>& specs, std::vector<int> ps, int D) : params(std::move(ps)) {
    for (int p : params) {
      const int64_t e = shape_numel(specs[p].shape);
      shape.push_back(specs[p].shape);
      numel.push_back(e);
      full_off.push_back(full_size);
      piece_off.push_back(piece_size);
      full_size += aligned(e);
      piece_size += aligned(e / D);
    }
  }
  int position(int param) const {
    const auto it = std::find(params.begin(), params.end(), param);
    TSP_CHECK(it != params.end(), "parameter #{} is not part of this fsdp-cp unit", param);
    return static_cast<int>(it - params.begin());
  }
  // Parameter k's full tensor [shape] in a full-size buffer.
  TensorView full(const Tensor& buf, int k) const { return buf.window(full_off[k], shape[k]); }
  // Parameter k's piece [numel / D] in a piece buffer.
  TensorView piece(const Tensor& buf, int k, int D) const {
    return buf.window(piece_off[k], {numel[k] / D});
  }
};

// How many units' full weights are alive (allocated), and the most at once.
struct LiveUnits {
  int live = 0;
  int max = 0;
};

// The full weights of one unit in the compute dtype, gathered or being gathered (pending
// non-empty), in MemCategory::Comm. Move-only; freeing it (release() or destruction) waits for
// its transfers.
class Gathered {
 public:
  Gathered() = default;
  Gathered(const Unit& u, LiveUnits& live, DType dtype, Device device)
      : unit_(&u), live_(&live), buf_({u.full_size}, dtype, MemCategory::Comm, device) {
    live.max = std::max(live.max, ++live.live);
  }
  Gathered(Gathered&& o) noexcept { *this = std::move(o); }
  Gathered& operator=(Gathered&& o) noexcept {
    if (this != &o) {
      release();
      unit_ = std::exchange(o.unit_, nullptr);
      live_ = std::exchange(o.live_, nullptr);
      buf_ = std::move(o.buf_);
      pending = std::move(o.pending);
      o.pending.clear();
    }
    return *this;
  }
  ~Gathered() { release(); }

  void release() {
    pending.clear();  // a Request's destructor waits: no transfer into freed memory
    if (live_) --live_->live;
    live_ = nullptr;
    unit_ = nullptr;
    buf_ = Tensor();
  }
  void wait() {
    for (RequestPtr& r : pending) r->wait();
    pending.clear();
  }
  const Unit* unit() const { return unit_; }
  TensorView full(int k) const { return unit_->full(buf_, k); }
  TensorView w(int param) const {
    TSP_CHECK(unit_, "fsdp-cp: weight #{} asked for while no unit is gathered", param);
    return full(unit_->position(param));
  }

  std::vector<RequestPtr> pending;

 private:
  const Unit* unit_ = nullptr;
  LiveUnits* live_ = nullptr;
  Tensor buf_;
};

// Full-size gradients of one unit (F32, zeroed, MemCategory::Comm), then their reduce-scatter into
// this rank's pieces.
struct FullGrads {
  const Unit* unit = nullptr;
  Tensor full;    // [full_size]
  Tensor pieces;  // [piece_size], written by the reduce-scatter
  std::vector<RequestPtr> pending;
  TensorView g(int param) const {
    TSP_CHECK(unit, "fsdp-cp: gradient of #{} asked for while no unit is being reduced", param);
    return unit->full(full, unit->position(param));
  }
};

class FsdpCpLayout final : public LayoutCommon {
 public:
  FsdpCpLayout(const LlamaConfig& config, const ParallelConfig& parallel, Communicator& world)
      : LayoutCommon("fsdp-cp", config, parallel, world) {
    check_fsdp_rows(specs_, D());
    for (int i = 0; i < static_cast<int>(specs_.size()); ++i)
      store_.add(i, ShardMap::rows(D(), group_rank()), /*replicated_in_group=*/false);
    allocate_store();
    ad_ = block::attn_dims(config_);

    for (int l = 0; l < L(); ++l) {
      const ParamIndex::Layer& P = idx_.layers[l];
      units_.emplace_back(
          specs_,
          std::vector<int>{P.input_norm, P.wq, P.wk, P.wv, P.wo, P.post_norm, P.wg, P.wu, P.wd},
          D());
    }
    units_.emplace_back(specs_, std::vector<int>{idx_.embed}, D());                     // L
    units_.emplace_back(specs_, std::vector<int>{idx_.final_norm, head_param()}, D());  // L + 1
    // The head's gradients: the final norm and the untied LM head. When tied, the head's part of
    // the embedding gradient waits in the embedding's buffer for the lookup's part (one sum, in
    // single's order), so it is not reduce-scattered with the head.
    head_grads_ = config_.tie_word_embeddings ? Unit(specs_, {idx_.final_norm}, D())
                                              : Unit(specs_, {idx_.final_norm, idx_.lm_head}, D());
  }

  const FsdpCpTraffic& traffic() const { return traffic_; }

 protected:
  // Zigzag tokens: chunks p and 2D-1-p of every row (check_batch and input_ranges follow).
  int token_parts() const override { return D(); }
  int token_index() const override { return group_rank(); }

  // ---- forward: embedding, layers, head, one gathered unit at a time ------------------------
  void embed_forward(const LocalTokens& t, TensorView x) override;
  void attention_forward(int l, const LocalTokens& t, TensorView xn, block::LayerSaved& s) override;
  void mlp_forward(int l, const LocalTokens&, TensorView xn, TensorView x,
                   block::LayerSaved& s) override {
    const ParamIndex::Layer& P = idx_.layers[l];
    block::mlp_forward(be_, mlp_w(P), xn, x, s.mlp(), [this] { progress(); });
  }
  void head_loss(const LocalTokens& t, TensorView xn, float grad_scale, TensorView loss,
                 TensorView dxn) override;
  void part_done(Part part, int layer) override;
  TensorView norm_weight(int param) override { return cur_.w(param); }
  TensorView grad_target(int param) override { return cur_grads_.g(param); }

  // ---- backward ----------------------------------------------------------------------------
  void begin_layer_replay(int l) override;
  void end_layer_replay(int) override { replaying_ = false; }
  void begin_layer_backward(int l) override;
  void mlp_backward(int l, const LocalTokens&, TensorView xn, TensorView dy, TensorView dxn,
                    const block::LayerSaved& s) override {
    const ParamIndex::Layer& P = idx_.layers[l];
    block::mlp_backward(be_, mlp_w(P), mlp_g(P), xn, dy, dxn, s.mlp(), [this] { progress(); });
  }
  void attention_backward(int l, const LocalTokens& t, TensorView xn, const block::LayerSaved& s,
                          TensorView dx, TensorView dxn) override;
  void end_layer_backward(int) override { cur_.release(); }
  // A layer's gradient pieces are added into the store when its reduce-scatter is finished, at
  // the end of the next layer's backward (part_done).
  int grads_final_from_layer(int l) const override { return l + 1; }
  void embed_backward(const LocalTokens& t, TensorView dx) override;

 private:
  int L() const { return static_cast<int>(config_.num_hidden_layers); }
  int embed_unit() const { return L(); }
  int head_unit() const { return L() + 1; }
  // The unit after u in the forward order embedding, layer 0 … L-1, head; -1 after the head.
  int next_forward(int u) const {
    if (u == embed_unit()) return L() > 0 ? 0 : head_unit();
    if (u < L()) return u + 1 < L() ? u + 1 : head_unit();
    return -1;
  }
  // Where layer l's forward traffic is recorded: its forward, or its backward while the backward
  // replays it (full recomputation).
  CommStats& layer_forward_rec(int l) {
    return replaying_ ? traffic_.layer_backward[l] : traffic_.layer_forward[l];
  }
  CommStats& forward_rec(int u) {
    if (u < L()) return traffic_.layer_forward[u];
    return u == embed_unit() ? traffic_.embedding_forward : traffic_.head_forward;
  }
  bool overlap() const { return parallel().overlap; }
  void progress() { group().progress(); }

  // Adds the traffic counted while f() runs (starts of transfers) to rec.
  template <typename F>
  void counted(CommStats& rec, F&& f) {
    const CommStats before = group().stats();
    f();
    rec += group().stats() - before;
  }

  Gathered start_gather(int unit, CommStats& rec);
  // The unit's weights, ready: taken from the prefetch slot when it holds them, else gathered now.
  Gathered acquire(int unit, CommStats& rec);
  // Forward: free the unit just used, wait for unit u and start the prefetch of the one after.
  void enter_forward_unit(int u);
  // Backward (or its replay): layer l's weights in cur_, and the prefetch of layer l-1 started.
  void acquire_layer_for_backward(int l);
  FullGrads new_grads(const Unit& u) const;
  void start_reduce_scatter(FullGrads& g, CommStats& rec);
  void finish(FullGrads& g);  // wait; add this rank's pieces into its gradient shards; free
  // The all-gather of a layer's local k and v into K_ / V_ ([B·S, hkv, d], compute dtype, at
  // t.k_pos), counted in rec; finish waits and lays them out.
  void start_kv_gather(const LocalTokens& t, const block::LayerSaved& s, CommStats& rec);
  void finish_kv_gather(const LocalTokens& t);

  block::AttnWeights attn_w(const ParamIndex::Layer& P) const {
    return {cur_.w(P.wq), cur_.w(P.wk), cur_.w(P.wv), cur_.w(P.wo)};
  }
  block::AttnGrads attn_g(const ParamIndex::Layer& P) const {
    return {cur_grads_.g(P.wq), cur_grads_.g(P.wk), cur_grads_.g(P.wv), cur_grads_.g(P.wo)};
  }
  block::MlpWeights mlp_w(const ParamIndex::Layer& P) const {
    return {cur_.w(P.wg), cur_.w(P.wu), cur_.w(P.wd)};
  }
  block::MlpGrads mlp_g(const ParamIndex::Layer& P) const {
    return {cur_grads_.g(P.wg), cur_grads_.g(P.wu), cur_grads_.g(P.wd)};
  }

  block::AttnDims ad_;
  std::vector<Unit> units_;  // [L] layers, then the embedding, then the head
  Unit head_grads_;
  LiveUnits live_;
  FsdpCpTraffic traffic_;

  // State of the step in progress (reset by embed_forward, the recipe's first hook).
  const LocalTokens* tokens_ = nullptr;
  bool backward_ = false;   // learnt in head_loss (dxn non-empty)
  bool replaying_ = false;  // between begin_layer_replay and end_layer_replay (full recompute)
  std::vector<const block::LayerSaved*> saved_;  // [L] each layer's saved k, v (re-gathered)

  Gathered cur_;         // the unit computing now
  Gathered next_;        // the prefetch slot: at most this one and cur_ are gathered
  FullGrads cur_grads_;  // the gradients being accumulated (head, then layer l)
  FullGrads in_flight_;  // the last gradients being reduce-scattered (overlap)
  FullGrads embed_grads_;
  // K / V of the layer computing ([B·S, hkv, d], compute dtype) and their transfers; in backward
  // started in begin_layer_backward so they move during the MLP backward.
  Tensor K_, V_, k_staging_, v_staging_;
  RequestPtr k_req_, v_req_;
};

// ---- weights and gradients of a unit ----------------------------------------------------------

Gathered FsdpCpLayout::start_gather(int unit, CommStats& rec) {
  const Unit& u = units_.at(unit);
  // ZeRO-1: this reads the store's weights ahead of the recipe (the next unit is gathered while
  // the previous one computes), so it waits here for the unit's bucket of the last update's
  // all-gather over the replicas (the layer's; the end bucket for the embedding and the head),
  // and with it for the earlier ones (ShardStore::wait_gathers_through).
  store_.wait_gathers_through(unit < L() ? unit : -1);
  Gathered g(u, live_, act_dtype(), device());
  counted(rec, [&] {
    // Piece p of every rank, in rank order, is the full row-major tensor: each parameter's
    // all-gather lands in place, no unpacking. The compute-dtype copies travel (bf16 halves it).
    for (size_t k = 0; k < u.params.size(); ++k) {
      const TensorView mine = store_.w(u.params[k]);
      g.pending.push_back(group().iall_gather(mine.data(), g.full(static_cast<int>(k)).data(),
                                              mine.numel(), mine.dtype()));
    }
  });
  return g;
}

Gathered FsdpCpLayout::acquire(int unit, CommStats& rec) {
  Gathered g = next_.unit() == &units_.at(unit) ? std::move(next_) : start_gather(unit, rec);
  g.wait();
  return g;
}

void FsdpCpLayout::enter_forward_unit(int u) {
  cur_.release();  // free the full weights right after use
  cur_ = acquire(u, forward_rec(u));
  const int nx = next_forward(u);
  if (overlap() && nx >= 0) next_ = start_gather(nx, forward_rec(nx));
}

FullGrads FsdpCpLayout::new_grads(const Unit& u) const {
  FullGrads g;
  g.unit = &u;
  // Zeroed: the block maths accumulates.
  g.full = Tensor::zeros({u.full_size}, DType::F32, MemCategory::Comm, device());
  return g;
}

void FsdpCpLayout::start_reduce_scatter(FullGrads& g, CommStats& rec) {
  const Unit& u = *g.unit;
  g.pieces = Tensor({u.piece_size}, DType::F32, MemCategory::Comm, device());
  counted(rec, [&] {
    // Block r of a full row-major gradient is rank r's piece: the sum over the group lands there.
    // Gradients are fp32 in every compute dtype.
    for (size_t k = 0; k < u.params.size(); ++k) {
      const int i = static_cast<int>(k);
      g.pending.push_back(group().ireduce_scatter(u.full(g.full, i).data(),
                                                  u.piece(g.pieces, i, D()).data(),
                                                  u.numel[k] / D(), DType::F32));
    }
  });
}

void FsdpCpLayout::finish(FullGrads& g) {
  if (!g.unit) return;
  const Unit& u = *g.unit;
  for (RequestPtr& r : g.pending) r->wait();
  for (size_t k = 0; k < u.params.size(); ++k)
    be_.add(store_.g(u.params[k]), u.piece(g.pieces, static_cast<int>(k), D()));
  g = FullGrads();
}

// ---- K / V over the sequence ----------------------------------------------------------------

void FsdpCpLayout::start_kv_gather(const LocalTokens& t, const block::LayerSaved& s,
                                   CommStats& rec) {
  // The receive buffers are Comm: K_ / V_ themselves when the all-gather lands in place (one row
  // or D = 1), else the staging buffers ([D, B, nl·kv] each), laid out into K_ / V_ by finish.
  K_ = Tensor();
  V_ = Tensor();
  if (gather_sequence_in_place(t)) {
    K_ = Tensor({t.B * t.S, ad_.hkv, ad_.d}, act_dtype(), MemCategory::Comm, device());
    V_ = Tensor({t.B * t.S, ad_.hkv, ad_.d}, act_dtype(), MemCategory::Comm, device());
  }
  counted(rec, [&] {
    k_req_ = start_gather_sequence(be_, group(), t, s.k.view(), K_.view(), k_staging_);
    v_req_ = start_gather_sequence(be_, group(), t, s.v.view(), V_.view(), v_staging_);
  });
}

void FsdpCpLayout::finish_kv_gather(const LocalTokens& t) {
  if (K_.empty()) {  // laid out from the staging buffers: the re-ordered copy is Workspace
    K_ = Tensor({t.B * t.S, ad_.hkv, ad_.d}, act_dtype(), MemCategory::Workspace, device());
    V_ = Tensor({t.B * t.S, ad_.hkv, ad_.d}, act_dtype(), MemCategory::Workspace, device());
  }
  finish_gather_sequence(be_, t, std::move(k_req_), K_.view(), k_staging_);
  finish_gather_sequence(be_, t, std::move(v_req_), V_.view(), v_staging_);
  k_staging_ = Tensor();
  v_staging_ = Tensor();
}

// ---- forward ----------------------------------------------------------------------------------

void FsdpCpLayout::embed_forward(const LocalTokens& t, TensorView x) {
  // The recipe's first hook: a new step.
  traffic_ = FsdpCpTraffic();
  traffic_.layer_forward.assign(L(), CommStats());
  traffic_.layer_backward.assign(L(), CommStats());
  cur_.release();
  next_.release();
  cur_grads_ = FullGrads();
  in_flight_ = FullGrads();
  embed_grads_ = FullGrads();
  live_ = LiveUnits();
  tokens_ = &t;
  backward_ = false;
  replaying_ = false;
  saved_.assign(L(), nullptr);

  enter_forward_unit(embed_unit());
  be_.embedding_forward(t.ids.view(), cur_.w(idx_.embed), x, /*v0=*/0);
}

void FsdpCpLayout::attention_forward(int l, const LocalTokens& t, TensorView xn,
                                     block::LayerSaved& s) {
  const ParamIndex::Layer& P = idx_.layers[l];
  saved_[l] = &s;  // the recipe keeps s until this layer's backward: k, v are re-gathered from it
  block::qkv_forward(be_, ad_, attn_w(P), xn, t.tok_pos.view(), s.q.view(), s.k.view(), s.v.view());
  // K / V of the whole sequence from the group ([B·S, hkv, d] at t.k_pos), in the compute dtype.
  start_kv_gather(t, s, layer_forward_rec(l));
  finish_kv_gather(t);
  for (int64_t b = 0; b < t.B; ++b) {  // one row at a time: a progress point between rows
    const TensorView q = s.q.slice(b * t.nl, (b + 1) * t.nl);
    block::attention_forward(be_, ad_, 1, q, K_.slice(b * t.S, (b + 1) * t.S),
                             V_.slice(b * t.S, (b + 1) * t.S), t.q_pos.view(), t.k_pos.view(),
                             s.o.slice(b * t.nl, (b + 1) * t.nl),
                             s.lse.slice(b * t.nl, (b + 1) * t.nl), t.doc_pos(b, b + 1));
    progress();
  }
  K_ = Tensor();
  V_ = Tensor();
  block::out_proj_forward(be_, cur_.w(P.wo), s.o.view(), s.x2.view());
}

void FsdpCpLayout::head_loss(const LocalTokens& t, TensorView xn, float grad_scale, TensorView loss,
                             TensorView dxn) {
  backward_ = !dxn.empty();
  // The backward's first layer is gathered again; its transfer moves during the loss head.
  if (backward_ && overlap() && L() > 0)
    next_ = start_gather(L() - 1, traffic_.layer_backward[L() - 1]);
  TensorView dhead;
  if (backward_) {
    cur_grads_ = new_grads(head_grads_);
    if (config_.tie_word_embeddings) {
      embed_grads_ = new_grads(units_[embed_unit()]);
      dhead = embed_grads_.g(idx_.embed);
    } else {
      dhead = cur_grads_.g(idx_.lm_head);
    }
  }
  block::lm_head_loss(be_, xn, cur_.w(head_param()), t.labels.view(), grad_scale, loss, dxn, dhead);
}

void FsdpCpLayout::part_done(Part part, int layer) {
  switch (part) {
    case Part::EmbeddingForward:
    case Part::LayerForward: {
      const int u = part == Part::EmbeddingForward ? embed_unit() : layer;
      enter_forward_unit(next_forward(u));
      break;
    }
    case Part::HeadForward:
      traffic_.max_gathered_units = live_.max;
      if (!backward_) cur_.release();  // forward only: done; else the final norm's backward
      break;
    case Part::HeadBackward:
      start_reduce_scatter(cur_grads_, traffic_.head_backward);
      in_flight_ = std::move(cur_grads_);
      if (!overlap()) finish(in_flight_);
      cur_.release();
      break;
    case Part::LayerBackward:
      // The layer's weights were freed (end_layer_backward) and so were its activations; the
      // previous unit's reduce-scatter moved meanwhile.
      finish(in_flight_);
      start_reduce_scatter(cur_grads_, traffic_.layer_backward[layer]);
      in_flight_ = std::move(cur_grads_);
      if (!overlap()) finish(in_flight_);
      break;
    case Part::EmbeddingBackward:
      break;
    case Part::End:
      traffic_.max_gathered_units = live_.max;
      tokens_ = nullptr;
      saved_.assign(L(), nullptr);
      break;
  }
}

// ---- backward ---------------------------------------------------------------------------------

// Full recomputation: the replay of layer l's forward needs the layer's weights, so the unit is
// acquired here (from the prefetch slot, as begin_layer_backward would) and the next one's
// prefetch starts; begin_layer_backward then finds it in hand and the unit schedule is the one
// without recomputation, entered one replay earlier. The replay's K/V all-gather is counted in
// the layer's backward, and begin_layer_backward re-gathers K/V from the replayed k, v as usual
// (saved_[l] points at the replay's set).
void FsdpCpLayout::begin_layer_replay(int l) {
  replaying_ = true;
  acquire_layer_for_backward(l);
}

void FsdpCpLayout::acquire_layer_for_backward(int l) {
  if (cur_.unit() == &units_.at(l)) return;  // the replay acquired it
  cur_ = acquire(l, traffic_.layer_backward[l]);
  if (overlap() && l > 0) next_ = start_gather(l - 1, traffic_.layer_backward[l - 1]);
}

void FsdpCpLayout::begin_layer_backward(int l) {
  CommStats& rec = traffic_.layer_backward[l];
  acquire_layer_for_backward(l);
  cur_grads_ = new_grads(units_[l]);
  // Re-gather K / V (only the local k, v were saved); it moves while the MLP backward computes.
  start_kv_gather(*tokens_, *saved_[l], rec);
  if (!overlap()) {
    if (k_req_) k_req_->wait();
    if (v_req_) v_req_->wait();
  }
}

void FsdpCpLayout::attention_backward(int l, const LocalTokens& t, TensorView xn,
                                      const block::LayerSaved& s, TensorView dx, TensorView dxn) {
  const ParamIndex::Layer& P = idx_.layers[l];
  const Device dev = device();
  constexpr MemCategory kWork = MemCategory::Workspace;
  Tensor d_o = Tensor::f32(s.q.shape(), kWork, dev);
  block::out_proj_backward(be_, cur_.w(P.wo), s.o.view(), dx, d_o.view(), cur_grads_.g(P.wo));
  finish_kv_gather(t);
  Tensor dq = Tensor::zeros(s.q.shape(), DType::F32, kWork, dev);
  Tensor dK = Tensor::zeros(K_.shape(), DType::F32, kWork, dev);  // every key of the sequence
  Tensor dV = Tensor::zeros(V_.shape(), DType::F32, kWork, dev);
  for (int64_t b = 0; b < t.B; ++b) {  // one row at a time: a progress point between rows
    const Range qr{b * t.nl, (b + 1) * t.nl}, kr{b * t.S, (b + 1) * t.S};
    block::attention_backward(
        be_, ad_, 1, s.q.slice(qr.begin, qr.end), K_.slice(kr.begin, kr.end),
        V_.slice(kr.begin, kr.end), t.q_pos.view(), t.k_pos.view(), s.o.slice(qr.begin, qr.end),
        s.lse.slice(qr.begin, qr.end), d_o.slice(qr.begin, qr.end), dq.slice(qr.begin, qr.end),
        dK.slice(kr.begin, kr.end), dV.slice(kr.begin, kr.end), t.doc_pos(b, b + 1));
    progress();
  }
  K_ = Tensor();
  V_ = Tensor();
  // Every rank's queries contributed to every key: sum them at the key's owner (fp32).
  Tensor dk = Tensor::f32(s.k.shape(), kWork, dev);
  Tensor dv = Tensor::f32(s.v.shape(), kWork, dev);
  Tensor staging;  // B > 1 only: [D, B, nl·kv] F32, reused for dV
  counted(traffic_.layer_backward[l], [&] {
    reduce_scatter_sequence(be_, group(), t, dK.view(), dk.view(), staging);
    reduce_scatter_sequence(be_, group(), t, dV.view(), dv.view(), staging);
  });
  staging = Tensor();
  dK = Tensor();
  dV = Tensor();
  block::qkv_backward(be_, ad_, attn_w(P), attn_g(P), xn, t.tok_pos.view(), dq.view(), dk.view(),
                      dv.view(), dxn);
}

void FsdpCpLayout::embed_backward(const LocalTokens& t, TensorView dx) {
  finish(in_flight_);
  // The embedding's gradient: the lookup's rows (after the head's part when tied, as in single).
  if (!embed_grads_.unit) embed_grads_ = new_grads(units_[embed_unit()]);
  be_.embedding_backward(t.ids.view(), dx, embed_grads_.g(idx_.embed), /*v0=*/0);
  start_reduce_scatter(embed_grads_, traffic_.embedding_backward);
  finish(embed_grads_);
}

const LayoutRegistration kRegisterFsdpCp(
    "fsdp-cp",
    "FSDP (ZeRO-3) over the sequence axis: weights 1/D at rest, each layer all-gathered while "
    "used, gradients reduce-scattered; tokens in zigzag shards with K/V all-gathered",
    [](const LlamaConfig& c, const ParallelConfig& p, Communicator& world) {
      return std::unique_ptr<Layout>(new FsdpCpLayout(c, p, world));
    });

}  // namespace

const FsdpCpTraffic* fsdp_cp_traffic(const Layout& layout) {
  const auto* f = dynamic_cast<const FsdpCpLayout*>(&layout);
  return f ? &f->traffic() : nullptr;
}

}  // namespace tsp

// ---- The model of this layout for the planner ---------------------------------------------------
//
// The model of fsdp-cp (src/parallel/fsdp_cp.cpp): every parameter cut into D row pieces (norms
// included), each layer gathered whole before use (forward and again backward) and its gradients
// reduce-scattered back; tokens in zigzag chunks with K/V all-gathered (context parallelism), only
// the local k, v saved.
//
// Registered with the layout's name: src/plan asks it (include/tsp/plan/layout_model.h)
// instead of comparing names, so the layout, its algorithm and its formulas live in one file.
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

  // Full recomputation in our implementation: the replay gathers the layer's weights for itself
  // AND the backward that follows (FsdpCpLayout::begin_layer_replay), so it adds only its K/V
  // all-gathers; the backward still re-gathers K/V from the replayed k, v.
  Traffic replay_comm(const LlamaConfig& m, const LayoutSpec& l, int64_t N,
                      const ElemBytes& e) const override {
    const int64_t D = l.D, kv_elems = (N / D) * shape_of(m).kv;
    Traffic t = all_gather(D, kv_elems * e.act);
    t += all_gather(D, kv_elems * e.act);
    return t;
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
    // backward gathers again and reduce-scatters the gradients, hidden behind backward compute.
    // A replay (full recomputation) uses the backward's gather: K/V only (replay_comm).
    if (in.replay) return;
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
    const int64_t r = std::min(n, in.target.token_chunk());  // rows at once
    const int64_t saved = saved_bytes(s, n, s.nh, s.nkv, n, e) + in.kept(n, h, s.F);
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
    // + rstd of the final norm; under full recomputation checkpoints (LocalInputs::saved_all)
    const int64_t checkpoint = e.act * n * h;
    const int64_t act_all = in.saved_all(s.L, saved, checkpoint) + kF32 * n;
    const int64_t head_comm =
        e.weight * (head_unit.full + next) + kF32 * (head_grads.full + embed_full);
    out.push_back({act_all, head_comm,
                   xs + kF32 * n * h + kF32 * r * s.V +
                       std::max(e.narrow(r * s.V), in.row_loss(r))});  // lm_head_loss, as single
    out.push_back({act_all, head_comm, xs + 3 * kF32 * n * h});        // + dx, norm-backward temp
    out.push_back({act_all, head_comm + kF32 * head_grads.piece, xs + 2 * kF32 * n * h});
    // The last layer's forward: it and the head unit gathered, K/V received and laid out.
    const int64_t act_fwd = in.saved_through(s.L - 1, saved, checkpoint) + kF32 * n,
                  comm_fwd = e.weight * (layer.full + head_unit.full);
    out.push_back(
        {act_fwd, comm_fwd + 2 * e.act * kv_all, tokens + 2 * e.act * n * h + 2 * e.act * kv_all});
    // ... then, K/V freed, o_proj accumulating into the bf16 x2 (under CUDA widened to fp32,
    // in.accumulate_widening: [n, h]) and the MLP adding into x chunk by chunk (selective and
    // full: gate, up fp32 and act per chunk of r rows; the down projection's widened [r, h]).
    out.push_back({act_fwd, comm_fwd, tokens + 2 * e.act * n * h + in.accumulate_widening(n * h)});
    out.push_back(
        {act_fwd, comm_fwd,
         tokens + 2 * e.act * n * h +
             (in.recompute == Recompute::None ? 0 : 2 * kF32 * r * s.F + e.act * r * s.F) +
             in.accumulate_widening(r * h)});
    // Backward of layer l (all saved activations up to l): its weights, the prefetch of l-1, its
    // full-size gradients being accumulated, the previous unit's gradients still in their
    // reduce-scatter (full + pieces: the head's for l = L-1, a layer's after that).
    for (int64_t l = s.L - 1; l >= std::max<int64_t>(0, s.L - 2); --l) {
      const int64_t act = in.saved_through(l, saved, checkpoint) + kF32 * n;
      const int64_t prev =
          kF32 * (l == s.L - 1 ? head_grads.full + head_grads.piece : layer.full + layer.piece);
      const int64_t outer = e.weight * (layer.full + (l > 0 ? layer.full : 0)) + kF32 * layer.full +
                            prev + kF32 * embed_full;
      const int64_t base = xs + 2 * kF32 * n * h;  // + dx, dxn
      const int64_t kv_in = 2 * e.act * kv_all;    // K/V receive buffers
      // MLP backward while K/V are re-gathered into their receive buffers; inside, a dy or da
      // chunk narrowed to bf16 for the GEMMs
      out.push_back(
          {act, outer + kv_in,
           base + in.mlp_backward_work(r, s.F) + std::max(e.narrow(r * s.F), e.narrow(r * h))});
      out.push_back({act, outer + kv_in, base + kF32 * n * h});  // norm-backward temp
      // With B > 1 rows over D > 1 ranks, K/V are laid out [B, S, kv] (Workspace) from the
      // receive buffers, which are then freed, and dK/dV's reduce-scatter needs a send buffer;
      // with one row or one rank the all-gather lands in K/V themselves (Comm) and the
      // reduce-scatter sends dK/dV in place (gather_sequence_in_place).
      const bool rows = in.Br > 1 && D > 1;
      if (rows) out.push_back({act, outer + kv_in, base + kF32 * n * qw + 2 * e.act * kv_all});
      // attention backward: d_o, dq, K, V, dK, dV of every key; inside, dy or dq narrowed, or
      // the attention kernel's transients for one row
      out.push_back(
          {act, outer + (rows ? 0 : kv_in),
           base + kF32 * (2 * n * qw + 2 * kv_all) + (rows ? 2 * e.act * kv_all : 0) +
               std::max({e.narrow(n * h), e.narrow(n * qw),
                         in.attention_backward_transient(d, s.nh, s.nkv, n / in.Br, in.S)})});
      // dK/dV reduce-scatter: send buffer (B > 1), dK, dV, local dk, dv; K and V (either layout)
      // were freed before it
      out.push_back({act, outer + (rows ? kF32 * kv_all : 0),
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
