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
//
// Memory: at most two units' full weights exist at once (the one computing and the prefetched one;
// one with --no-overlap), and at most two full-size layer gradients (the one being computed and
// the previous one in flight). All transfers are non-blocking starts; with overlap off each is
// waited right after its start, so both modes run the same MPI calls on the same buffers and give
// bit-identical results. At D=1 the operations are single's, in single's order: bitwise equal.
#include "parallel/fsdp_cp.h"

#include <algorithm>
#include <numeric>
#include <utility>

#include "parallel/layout_common.h"
#include "parallel/registry.h"
#include "tsp/model/block.h"
#include "tsp/ops/ops.h"

namespace tsp {
namespace {

// Offsets inside unit buffers are kept 64-byte aligned (16 floats), like the shard slabs.
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
// one after another in a buffer of full_size floats; the pieces of this rank in one of piece_size.
struct Unit {
  std::vector<int> params;
  std::vector<int64_t> numel;      // full elements of each parameter
  std::vector<int64_t> full_off;   // offset of each full tensor in the full buffer
  std::vector<int64_t> piece_off;  // offset of each piece in the piece buffer
  int64_t full_size = 0, piece_size = 0;

  Unit() = default;
  Unit(const std::vector<ParamSpec>& specs, std::vector<int> ps, int D) : params(std::move(ps)) {
    for (int p : params) {
      const int64_t e = shape_numel(specs[p].shape);
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
};

// How many units' full weights are alive (allocated), and the most at once.
struct LiveUnits {
  int live = 0;
  int max = 0;
};

// The full weights of one unit, gathered or being gathered (pending non-empty), in
// MemCategory::Comm. Move-only; freeing it (release() or destruction) waits for its transfers.
class Gathered {
 public:
  Gathered() = default;
  Gathered(const Unit& u, LiveUnits& live)
      : unit_(&u), live_(&live), buf_(Tensor::f32({u.full_size}, MemCategory::Comm)) {
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
  float* full(int k) const { return buf_.f32() + unit_->full_off[k]; }
  const float* w(int param) const { return full(unit_->position(param)); }

  std::vector<RequestPtr> pending;

 private:
  const Unit* unit_ = nullptr;
  LiveUnits* live_ = nullptr;
  Tensor buf_;
};

// Full-size gradients of one unit (zeroed, MemCategory::Comm), then their reduce-scatter into this
// rank's pieces.
struct FullGrads {
  const Unit* unit = nullptr;
  Tensor full;    // [full_size]
  Tensor pieces;  // [piece_size], written by the reduce-scatter
  std::vector<RequestPtr> pending;
  float* g(int param) const { return full.f32() + unit->full_off[unit->position(param)]; }
};

// This replica's rows cut into this rank's zigzag shard.
struct Tokens {
  int64_t B = 0, S = 0, nr = 0, n = 0;  // rows, sequence, local tokens per row, local tokens
  std::vector<int32_t> ids, labels;     // [B, nr]
  std::vector<int64_t> q_pos;           // [nr] global positions of the local tokens of a row
  std::vector<int64_t> k_pos;           // [S] positions of the gathered keys (rank order)
  std::vector<int64_t> tok_pos;         // [n] position of every local token (for RoPE)
};

// Non-blocking all-gather of the local k and v of one layer ([B, nr, kv] per rank -> [D, B,
// nr·kv]).
struct KvGather {
  Tensor recv_k, recv_v;  // [D, B, nr·kv] in MemCategory::Comm
  RequestPtr rk, rv;
};

class FsdpCpLayout final : public LayoutCommon {
 public:
  FsdpCpLayout(const LlamaConfig& config, const ParallelConfig& parallel, Communicator& world)
      : LayoutCommon("fsdp-cp", config, parallel, world) {
    check_fsdp_rows(specs_, D());
    for (int i = 0; i < static_cast<int>(specs_.size()); ++i)
      store_.add(i, ShardMap::rows(D(), group_rank()), /*replicated_in_group=*/false);
    store_.allocate(specs_, group());

    const int L = static_cast<int>(config_.num_hidden_layers);
    const int head = config_.tie_word_embeddings ? idx_.embed : idx_.lm_head;
    for (int l = 0; l < L; ++l) {
      const ParamIndex::Layer& P = idx_.layers[l];
      units_.emplace_back(
          specs_,
          std::vector<int>{P.input_norm, P.wq, P.wk, P.wv, P.wo, P.post_norm, P.wg, P.wu, P.wd},
          D());
    }
    units_.emplace_back(specs_, std::vector<int>{idx_.embed}, D());             // kEmbed = L
    units_.emplace_back(specs_, std::vector<int>{idx_.final_norm, head}, D());  // kHead = L + 1
    // The head's gradients: the final norm and the untied LM head. When tied, the head's part of
    // the embedding gradient waits in the embedding's buffer for the lookup's part (one sum, in
    // single's order), so it is not reduce-scattered with the head.
    head_grads_ = config_.tie_word_embeddings ? Unit(specs_, {idx_.final_norm}, D())
                                              : Unit(specs_, {idx_.final_norm, idx_.lm_head}, D());
  }

  const FsdpCpTraffic& traffic() const { return traffic_; }

 protected:
  void check_batch(const ReplicaBatch& rb) const override { check_zigzag(rb.S, D()); }
  // take_tokens reads the zigzag chunks (zigzag_take) and nothing else.
  std::vector<Range> input_ranges(int64_t S) const override {
    return zigzag_ranges(S, D(), group_rank());
  }
  double run(const ReplicaBatch& rb, bool backward) override;

 private:
  int L() const { return static_cast<int>(config_.num_hidden_layers); }
  int embed_unit() const { return L(); }
  int head_unit() const { return L() + 1; }
  void progress() { group().progress(); }

  // Adds the traffic counted while f() runs (starts of transfers) to rec.
  template <typename F>
  void counted(CommStats& rec, F&& f) {
    const CommStats before = group().stats();
    f();
    rec += group().stats() - before;
  }

  Tokens take_tokens(const ReplicaBatch& rb) const;
  Gathered start_gather(int unit, CommStats& rec);
  // The unit's weights, ready: taken from the prefetch slot when it holds them, else gathered now.
  Gathered acquire(int unit, Gathered& prefetched, CommStats& rec);
  FullGrads new_grads(const Unit& u) const;
  void start_reduce_scatter(FullGrads& g, CommStats& rec);
  void finish(FullGrads& g);  // wait; add this rank's pieces into its gradient shards; free

  KvGather start_kv_gather(const block::LayerSaved& s, const Tokens& tk, CommStats& rec);
  // Waits and lays the gathered keys / values out as [B, S, kv] per row (zigzag_gathered order).
  void finish_kv_gather(KvGather& g, const Tokens& tk, Tensor& K, Tensor& V);
  // Full-sequence gradient [B, S, kv] -> this rank's tokens' gradient local [B, nr, kv] (=).
  void scatter_dkv(const Tensor& full, float* local, const Tokens& tk, CommStats& rec);

  void layer_forward(int l, const Gathered& W, block::LayerSaved& s, Tensor& x, Tensor& xn,
                     const Tokens& tk);
  void layer_backward(int l, const Gathered& W, const FullGrads& G, const block::LayerSaved& s,
                      Tensor& dx, Tensor& xn, Tensor& dxn, const Tokens& tk);

  block::AttnWeights attn_w(const Gathered& W, const ParamIndex::Layer& P) const {
    return {W.w(P.wq), W.w(P.wk), W.w(P.wv), W.w(P.wo)};
  }
  block::AttnGrads attn_g(const FullGrads& G, const ParamIndex::Layer& P) const {
    return {G.g(P.wq), G.g(P.wk), G.g(P.wv), G.g(P.wo)};
  }
  block::MlpWeights mlp_w(const Gathered& W, const ParamIndex::Layer& P) const {
    return {W.w(P.wg), W.w(P.wu), W.w(P.wd), config_.intermediate_size};
  }
  block::MlpGrads mlp_g(const FullGrads& G, const ParamIndex::Layer& P) const {
    return {G.g(P.wg), G.g(P.wu), G.g(P.wd)};
  }

  std::vector<Unit> units_;  // [L] layers, then the embedding, then the head
  Unit head_grads_;
  LiveUnits live_;
  FsdpCpTraffic traffic_;
};

Tokens FsdpCpLayout::take_tokens(const ReplicaBatch& rb) const {
  Tokens tk;
  tk.B = rb.B;
  tk.S = rb.S;
  tk.nr = rb.S / D();
  tk.n = tk.B * tk.nr;
  tk.ids.resize(tk.n);
  tk.labels.resize(tk.n);
  auto view = [&](const std::vector<int32_t>& v, int64_t cols) {
    return TensorView(const_cast<int32_t*>(v.data()), {tk.B, cols}, DType::I32);
  };
  zigzag_take(view(rb.inputs, tk.S), view(tk.ids, tk.nr), D(), group_rank());
  zigzag_take(view(rb.labels, tk.S), view(tk.labels, tk.nr), D(), group_rank());
  tk.q_pos = zigzag_positions(tk.S, D(), group_rank());
  tk.k_pos = zigzag_gathered_positions(tk.S, D());
  tk.tok_pos.resize(tk.n);
  for (int64_t i = 0; i < tk.n; ++i) tk.tok_pos[i] = tk.q_pos[i % tk.nr];
  return tk;
}

// ---- weights and gradients of a unit ----------------------------------------------------------

Gathered FsdpCpLayout::start_gather(int unit, CommStats& rec) {
  const Unit& u = units_.at(unit);
  Gathered g(u, live_);
  counted(rec, [&] {
    // Piece p of every rank, in rank order, is the full row-major tensor: each parameter's
    // all-gather lands in place, no unpacking.
    for (size_t k = 0; k < u.params.size(); ++k)
      g.pending.push_back(group().iall_gather(store_.w(u.params[k]), g.full(static_cast<int>(k)),
                                              u.numel[k] / D(), DType::F32));
  });
  return g;
}

Gathered FsdpCpLayout::acquire(int unit, Gathered& prefetched, CommStats& rec) {
  Gathered g =
      prefetched.unit() == &units_.at(unit) ? std::move(prefetched) : start_gather(unit, rec);
  g.wait();
  return g;
}

FullGrads FsdpCpLayout::new_grads(const Unit& u) const {
  FullGrads g;
  g.unit = &u;
  g.full = Tensor::f32({u.full_size}, MemCategory::Comm);  // zeroed: block maths accumulates
  return g;
}

void FsdpCpLayout::start_reduce_scatter(FullGrads& g, CommStats& rec) {
  const Unit& u = *g.unit;
  g.pieces = Tensor::f32({u.piece_size}, MemCategory::Comm);
  counted(rec, [&] {
    // Block r of a full row-major gradient is rank r's piece: the sum over the group lands there.
    for (size_t k = 0; k < u.params.size(); ++k)
      g.pending.push_back(group().ireduce_scatter(g.full.f32() + u.full_off[k],
                                                  g.pieces.f32() + u.piece_off[k], u.numel[k] / D(),
                                                  DType::F32));
  });
}

void FsdpCpLayout::finish(FullGrads& g) {
  if (!g.unit) return;
  const Unit& u = *g.unit;
  for (RequestPtr& r : g.pending) r->wait();
  for (size_t k = 0; k < u.params.size(); ++k)
    add_inplace(store_.g(u.params[k]), g.pieces.f32() + u.piece_off[k], u.numel[k] / D());
  g = FullGrads();
}

// ---- K / V over the sequence -----------------------------------------------------------------

KvGather FsdpCpLayout::start_kv_gather(const block::LayerSaved& s, const Tokens& tk,
                                       CommStats& rec) {
  const int64_t kv = config_.kv_dim();
  KvGather g;
  g.recv_k = Tensor::f32({D(), tk.B, tk.nr * kv}, MemCategory::Comm);
  g.recv_v = Tensor::f32({D(), tk.B, tk.nr * kv}, MemCategory::Comm);
  counted(rec, [&] {
    g.rk = group().iall_gather(s.k.data(), g.recv_k.data(), tk.n * kv, DType::F32);
    g.rv = group().iall_gather(s.v.data(), g.recv_v.data(), tk.n * kv, DType::F32);
  });
  return g;
}

void FsdpCpLayout::finish_kv_gather(KvGather& g, const Tokens& tk, Tensor& K, Tensor& V) {
  const int64_t kv = config_.kv_dim();
  g.rk->wait();
  g.rv->wait();
  K = Tensor::f32({tk.B, tk.S, kv}, MemCategory::Workspace);
  V = Tensor::f32({tk.B, tk.S, kv}, MemCategory::Workspace);
  // [D, B, nr·kv] -> [B, D, nr·kv] = [B, S, kv] with keys at zigzag_gathered_positions.
  swap_leading_dims(g.recv_k.view(), K.view().reshape({tk.B, D(), tk.nr * kv}));
  swap_leading_dims(g.recv_v.view(), V.view().reshape({tk.B, D(), tk.nr * kv}));
  g = KvGather();
}

void FsdpCpLayout::scatter_dkv(const Tensor& full, float* local, const Tokens& tk, CommStats& rec) {
  const int64_t kv = config_.kv_dim();
  Tensor send = Tensor::f32({D(), tk.B, tk.nr * kv}, MemCategory::Comm);
  swap_leading_dims(full.view().reshape({tk.B, D(), tk.nr * kv}), send.view());
  // Needed at once by the k / v projections' backward: blocking (in both overlap modes).
  counted(rec, [&] { group().reduce_scatter(send.data(), local, tk.n * kv, DType::F32); });
}

// ---- one layer --------------------------------------------------------------------------------

void FsdpCpLayout::layer_forward(int l, const Gathered& W, block::LayerSaved& s, Tensor& x,
                                 Tensor& xn, const Tokens& tk) {
  const ParamIndex::Layer& P = idx_.layers[l];
  const block::AttnDims ad = block::attn_dims(config_);
  const int64_t n = tk.n, h = config_.hidden_size;
  const float eps = static_cast<float>(config_.rms_norm_eps);
  // Attention sub-block on the local tokens; K / V of the whole sequence from the group.
  copy(x, s.x);
  rmsnorm_forward(s.x.f32(), W.w(P.input_norm), xn.f32(), s.rstd1.f32(), n, h, eps);
  block::qkv_forward(ad, attn_w(W, P), xn.f32(), tk.tok_pos.data(), n, s.q.f32(), s.k.f32(),
                     s.v.f32());
  KvGather kvg = start_kv_gather(s, tk, traffic_.layer_forward[l]);
  Tensor K, V;  // [B, S, kv]
  finish_kv_gather(kvg, tk, K, V);
  const int64_t qs = tk.nr * ad.q_width(), ks = tk.S * ad.kv_width();
  for (int64_t b = 0; b < tk.B; ++b) {  // one row at a time: a progress point between rows
    block::attention_forward(ad, 1, tk.nr, tk.S, s.q.f32() + b * qs, K.f32() + b * ks,
                             V.f32() + b * ks, tk.q_pos.data(), tk.k_pos.data(), s.o.f32() + b * qs,
                             s.lse.f32() + b * tk.nr * ad.hq);
    progress();
  }
  K = Tensor();
  V = Tensor();
  copy(s.x, s.x2);
  block::out_proj_forward(ad, W.w(P.wo), s.o.f32(), n, s.x2.f32());
  // MLP sub-block, token-wise, in block::kTokenChunk pieces (the chunking mlp_forward does
  // inside, so the arithmetic is unchanged) with progress points between them.
  rmsnorm_forward(s.x2.f32(), W.w(P.post_norm), xn.f32(), s.rstd2.f32(), n, h, eps);
  copy(s.x2, x);
  const block::MlpWeights mw = mlp_w(W, P);
  for (int64_t t0 = 0; t0 < n; t0 += block::kTokenChunk) {
    const int64_t m = std::min(block::kTokenChunk, n - t0);
    block::mlp_forward(mw, h, xn.f32() + t0 * h, m, x.f32() + t0 * h);
    progress();
  }
}

void FsdpCpLayout::layer_backward(int l, const Gathered& W, const FullGrads& G,
                                  const block::LayerSaved& s, Tensor& dx, Tensor& xn, Tensor& dxn,
                                  const Tokens& tk) {
  const ParamIndex::Layer& P = idx_.layers[l];
  const block::AttnDims ad = block::attn_dims(config_);
  const int64_t n = tk.n, h = config_.hidden_size;
  CommStats& rec = traffic_.layer_backward[l];
  // Re-gather K / V (only local k, v were saved); it moves while the MLP backward computes.
  KvGather kvg = start_kv_gather(s, tk, rec);
  if (!parallel().overlap) {
    kvg.rk->wait();
    kvg.rv->wait();
  }
  // MLP sub-block: x_out = x2 + mlp(norm(x2)); dx holds d x_out, becomes d x2.
  block::rmsnorm_apply(s.x2.f32(), W.w(P.post_norm), s.rstd2.f32(), xn.f32(), n, h);
  dxn.zero();
  const block::MlpWeights mw = mlp_w(W, P);
  const block::MlpGrads mg = mlp_g(G, P);
  for (int64_t t0 = 0; t0 < n; t0 += block::kTokenChunk) {
    const int64_t m = std::min(block::kTokenChunk, n - t0);
    block::mlp_backward(mw, mg, h, xn.f32() + t0 * h, dx.f32() + t0 * h, m, dxn.f32() + t0 * h);
    progress();
  }
  block::rmsnorm_backward_add(dxn.f32(), s.x2.f32(), W.w(P.post_norm), s.rstd2.f32(), dx.f32(),
                              G.g(P.post_norm), n, h);
  // Attention sub-block: x2 = x + attn(norm(x))·woᵀ; dx becomes d x.
  Tensor d_o = Tensor::f32({n, ad.hq, ad.d}, MemCategory::Workspace);
  block::out_proj_backward(ad, W.w(P.wo), s.o.f32(), dx.f32(), n, d_o.f32(), G.g(P.wo));
  Tensor K, V;  // [B, S, kv]
  finish_kv_gather(kvg, tk, K, V);
  Tensor dq = Tensor::f32({n, ad.hq, ad.d}, MemCategory::Workspace);             // zeroed
  Tensor dK = Tensor::f32({tk.B, tk.S, ad.kv_width()}, MemCategory::Workspace);  // every key
  Tensor dV = Tensor::f32({tk.B, tk.S, ad.kv_width()}, MemCategory::Workspace);
  const int64_t qs = tk.nr * ad.q_width(), ks = tk.S * ad.kv_width();
  for (int64_t b = 0; b < tk.B; ++b) {
    block::attention_backward(
        ad, 1, tk.nr, tk.S, s.q.f32() + b * qs, K.f32() + b * ks, V.f32() + b * ks, tk.q_pos.data(),
        tk.k_pos.data(), s.o.f32() + b * qs, s.lse.f32() + b * tk.nr * ad.hq, d_o.f32() + b * qs,
        dq.f32() + b * qs, dK.f32() + b * ks, dV.f32() + b * ks);
    progress();
  }
  K = Tensor();
  V = Tensor();
  // Every rank's queries contributed to every key: sum them at the key's owner.
  Tensor dk = Tensor::f32({n, ad.hkv, ad.d}, MemCategory::Workspace);
  Tensor dv = Tensor::f32({n, ad.hkv, ad.d}, MemCategory::Workspace);
  scatter_dkv(dK, dk.f32(), tk, rec);
  scatter_dkv(dV, dv.f32(), tk, rec);
  dK = Tensor();
  dV = Tensor();
  block::rmsnorm_apply(s.x.f32(), W.w(P.input_norm), s.rstd1.f32(), xn.f32(), n, h);
  dxn.zero();
  block::qkv_backward(ad, attn_w(W, P), attn_g(G, P), xn.f32(), tk.tok_pos.data(), n, dq.f32(),
                      dk.f32(), dv.f32(), dxn.f32());
  block::rmsnorm_backward_add(dxn.f32(), s.x.f32(), W.w(P.input_norm), s.rstd1.f32(), dx.f32(),
                              G.g(P.input_norm), n, h);
}

// ---- the step ---------------------------------------------------------------------------------

double FsdpCpLayout::run(const ReplicaBatch& rb, bool backward) {
  const LlamaConfig& c = config_;
  const Tokens tk = take_tokens(rb);
  const int64_t n = tk.n, h = c.hidden_size, V = c.vocab_size;
  const int L = this->L();
  const float eps = static_cast<float>(c.rms_norm_eps);
  const bool overlap = parallel().overlap;
  const block::AttnDims ad = block::attn_dims(c);
  const int head = c.tie_word_embeddings ? idx_.embed : idx_.lm_head;

  traffic_ = FsdpCpTraffic();
  traffic_.layer_forward.assign(L, CommStats());
  traffic_.layer_backward.assign(L, CommStats());
  live_ = LiveUnits();

  // Forward units in order; each one's transfer is counted where the unit is used.
  std::vector<int> order{embed_unit()};
  for (int l = 0; l < L; ++l) order.push_back(l);
  order.push_back(head_unit());
  auto forward_rec = [&](int u) -> CommStats& {
    if (u < L) return traffic_.layer_forward[u];
    return u == embed_unit() ? traffic_.embedding_forward : traffic_.head_forward;
  };

  Tensor x = Tensor::f32({n, h}, MemCategory::Workspace);   // residual stream
  Tensor xn = Tensor::f32({n, h}, MemCategory::Workspace);  // normed input of a sub-block
  Tensor dx, dxn;                                           // their gradients (backward)
  Tensor rstd_f = Tensor::f32({n}, MemCategory::Activations);
  // Forward-only keeps one layer's activations at a time; backward keeps all L.
  std::vector<block::LayerSaved> saved(backward ? L : 1);
  FullGrads in_flight;  // the last gradients being reduce-scattered (overlap)
  FullGrads embed_grads;
  double loss = 0;

  Gathered next;  // the prefetch slot: at most this one and the unit in use are gathered
  for (size_t i = 0; i < order.size(); ++i) {
    const int u = order[i];
    Gathered cur = acquire(u, next, forward_rec(u));
    if (overlap) {
      if (i + 1 < order.size())
        next = start_gather(order[i + 1], forward_rec(order[i + 1]));
      else if (backward && L > 0)  // the first layer of the backward (re-gathered)
        next = start_gather(L - 1, traffic_.layer_backward[L - 1]);
    }
    if (u == embed_unit()) {
      embedding_forward(tk.ids.data(), cur.w(idx_.embed), x.f32(), n, h, 0, V);
    } else if (u < L) {
      block::LayerSaved& s = saved[backward ? u : 0];
      if (s.x.empty()) s.allocate(n, h, ad.hq, ad.hkv, ad.d);
      layer_forward(u, cur, s, x, xn, tk);
    } else {
      // Final norm and loss head (forward and backward fused; logits never stored whole).
      rmsnorm_forward(x.f32(), cur.w(idx_.final_norm), xn.f32(), rstd_f.f32(), n, h, eps);
      FullGrads head_grads;
      float* dhead = nullptr;
      if (backward) {
        dxn = Tensor::f32({n, h}, MemCategory::Workspace);
        head_grads = new_grads(head_grads_);
        if (c.tie_word_embeddings) {
          embed_grads = new_grads(units_[embed_unit()]);
          dhead = embed_grads.g(idx_.embed);
        } else {
          dhead = head_grads.g(idx_.lm_head);
        }
      }
      loss = block::lm_head_loss(xn.f32(), cur.w(head), tk.labels.data(), n, h, V, rb.grad_scale,
                                 backward ? dxn.f32() : nullptr, dhead);
      if (backward) {
        dx = Tensor::f32({n, h}, MemCategory::Workspace);
        block::rmsnorm_backward_add(dxn.f32(), x.f32(), cur.w(idx_.final_norm), rstd_f.f32(),
                                    dx.f32(), head_grads.g(idx_.final_norm), n, h);
        start_reduce_scatter(head_grads, traffic_.head_backward);
        in_flight = std::move(head_grads);
        if (!overlap) finish(in_flight);
      }
    }
    cur.release();  // free the full weights right after use
  }
  traffic_.max_gathered_units = live_.max;
  if (!backward) return loss;

  for (int l = L - 1; l >= 0; --l) {
    CommStats& rec = traffic_.layer_backward[l];
    Gathered cur = acquire(l, next, rec);
    if (overlap && l > 0) next = start_gather(l - 1, traffic_.layer_backward[l - 1]);
    FullGrads grads = new_grads(units_[l]);
    layer_backward(l, cur, grads, saved[l], dx, xn, dxn, tk);
    cur.release();
    saved[l] = block::LayerSaved();  // this layer's activations are no longer needed
    finish(in_flight);               // the previous unit's reduce-scatter moved meanwhile
    start_reduce_scatter(grads, rec);
    in_flight = std::move(grads);
    if (!overlap) finish(in_flight);
  }
  finish(in_flight);

  // The embedding's gradient: the lookup's rows (after the head's part when tied, as in single).
  if (!embed_grads.unit) embed_grads = new_grads(units_[embed_unit()]);
  embedding_backward(tk.ids.data(), dx.f32(), embed_grads.g(idx_.embed), n, h, 0, V);
  start_reduce_scatter(embed_grads, traffic_.embedding_backward);
  finish(embed_grads);
  traffic_.max_gathered_units = live_.max;
  return loss;
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
