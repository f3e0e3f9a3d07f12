// The "tsp" layout: Tensor and Sequence Parallelism folded onto one axis of D ranks (the
// algorithm and its schedule as implemented: docs/tsp-schedule.md). Every rank p owns
//
//   tokens   : zigzag chunks p and 2D-1-p of every row (n = B·S/D local tokens)
//   attention: head group p, packed for travel as P_p = [Wq_p; Wk_p; Wv_p; Wo_p]
//              (n_kv/D kv heads, their g·n_kv/D query heads, the o_proj columns reading them)
//   MLP      : rows p of W_gate and W_up (I/D each) and the matching columns of W_down
//   vocab    : rows p (V/D ids) of the embedding and of the LM head (one shard when tied)
//   norms    : replicated (O(h)); their gradients are all-reduced over the group once per step
//
// and moves WEIGHTS to its tokens instead of activations to the weights:
//
//   attention  for r in 0..D-1: P_r broadcast from owner r (P_{r+1} prefetched meanwhile);
//              q,k,v of the local tokens for group r; K,V of group r all-gathered (whole
//              sequence, that group only); attention; y += o·Wo_rᵀ (no all-reduce).
//   MLP        ring: step k uses shard s = p-k while it travels p -> p+1 (double buffered).
//   loss       vocabulary ring with an online cross-entropy: [n, V/D] logits at a time.
//   backward   attention: rounds again (re-broadcast, re-gather K/V from the saved local k/v),
//              dK/dV reduce-scattered to their tokens' owners, the partial gradient of P_r
//              reduced to owner r. MLP, LM head, embedding: a ring in the other direction in
//              which each rank handles its OWN shard last: shards travel s -> s-1 and a
//              gradient accumulator created at s-1 travels s-1 -> s-2 -> ... -> s, so it
//              reaches the owner after D-1 hops holding every other rank's contribution.
//
// No rank ever allocates a whole layer's weights or weight gradients, or [n, V] logits.
// With overlap off every transfer is waited for as soon as it is started; the arithmetic (and
// its order) is the same, so results are bitwise identical. At D = 1 every loop degenerates to
// the single layout's calls on the same shapes, so results are bitwise equal to the reference.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "parallel/layout_common.h"
#include "parallel/registry.h"
#include "parallel/tsp.h"
#include "tsp/model/block.h"
#include "tsp/ops/ops.h"

namespace tsp {
namespace {

constexpr MemCategory kComm = MemCategory::Comm;
constexpr MemCategory kWork = MemCategory::Workspace;

// A shard made of several store tensors that travels as ONE contiguous buffer: the pieces are
// concatenated in order (e.g. [W_gate rows; W_up rows; W_down columns]).
struct Packing {
  std::vector<int64_t> sizes;  // elements of each piece
  int64_t total() const { return std::accumulate(sizes.begin(), sizes.end(), int64_t{0}); }
  std::vector<float*> split(float* base) const {
    std::vector<float*> out;
    for (int64_t s : sizes) {
      out.push_back(base);
      base += s;
    }
    return out;
  }
  void pack(const std::vector<float*>& pieces, float* dst) const {
    for (size_t i = 0; i < sizes.size(); ++i) {
      std::memcpy(dst, pieces[i], sizes[i] * sizeof(float));
      dst += sizes[i];
    }
  }
  void add_into(const std::vector<float*>& pieces, const float* src) const {  // pieces += src
    for (size_t i = 0; i < sizes.size(); ++i) {
      add_inplace(pieces[i], src, sizes[i]);
      src += sizes[i];
    }
  }
};

using Pieces = std::vector<float*>;

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
    const int64_t h = c.hidden_size;
    attn_pack_.sizes = {ad_.q_width() * h, ad_.kv_width() * h, ad_.kv_width() * h,
                        h * ad_.q_width()};
    mlp_pack_.sizes = {f_ * h, f_ * h, h * f_};
    vocab_pack_.sizes = {vs_ * h};

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
    store_.allocate(specs_, group());
  }

  const TspTraffic& last_traffic() const override { return traffic_; }

 protected:
  void check_batch(const ReplicaBatch& rb) const override { check_zigzag(rb.S, D()); }
  // run() takes the zigzag chunks' tokens (Tokens::ids / labels at q_pos) and nothing else.
  std::vector<Range> input_ranges(int64_t S) const override {
    return zigzag_ranges(S, D(), group_rank());
  }

  double run(const ReplicaBatch& rb, bool backward) override;

 private:
  using FwdBody = std::function<void(int s, const Pieces& w)>;
  using BwdBody = std::function<void(int s, const Pieces& w, const Pieces& g)>;
  using RoundBody = std::function<void(int r, const Pieces& w)>;

  // ---- communication schedules (the only places that move weights) --------------------------
  Tensor ring_forward(const Packing& pk, const Pieces& own, bool keep_last, const FwdBody& body);
  void ring_backward(const Packing& wpk, const Pieces& own_w, Tensor first, const Packing& gpk,
                     const Pieces& own_g, const BwdBody& body);
  void attention_rounds(const Pieces& own, const RoundBody& body);

  // ---- pieces of the model --------------------------------------------------------------------
  struct Tokens;  // this rank's tokens, positions, ids and labels
  void layer_forward(int l, const Tokens& t, block::LayerSaved& s, Tensor& x, Tensor& xn);
  void layer_backward(int l, const Tokens& t, const block::LayerSaved& s, Tensor& dx,
                      float* dnorm_in, float* dnorm_post);
  double head_loss(const Tokens& t, const float* xn, float grad_scale, float* dxn);
  const float* gather_kv(const Tokens& t, const float* local, Tensor& gathered, Tensor& full);
  void scatter_dkv(const Tokens& t, const float* full_grad, Tensor& swapped, float* local);

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
  int head_param() const { return config_.tie_word_embeddings ? idx_.embed : idx_.lm_head; }
  int64_t v0(int s) const { return s * vs_; }
  int mod(int i) const { return ((i % D()) + D()) % D(); }
  void progress() { group().progress(); }

  HeadGroup group_;  // head group of this rank (every group has the same sizes)
  block::AttnDims ad_;
  int64_t f_ = 0, vs_ = 0;  // FFN rows and vocabulary ids per shard
  Packing attn_pack_, mlp_pack_, vocab_pack_;
  TspTraffic traffic_;
};

// This rank's tokens of the replica's batch in zigzag order: row b, local index i holds global
// position q_pos[i] of row b.
struct TspLayout::Tokens {
  int64_t B = 0, S = 0, nl = 0, n = 0;  // rows, sequence, local tokens per row, local tokens
  std::vector<int64_t> q_pos;           // [nl] global positions of the local tokens of a row
  std::vector<int64_t> k_pos;           // [S] positions of an all-gather of every rank's tokens
  std::vector<int64_t> tok_pos;         // [n] RoPE position of each local token
  std::vector<int32_t> ids, labels;     // [n]
};

// ---- schedules ------------------------------------------------------------------------------

// Forward ring (docs/tsp-schedule.md, "Forward, one block"): step k handles shard s = (p - k) mod
// D, starting with the own shard (read from the store). The shard in hand is sent to p+1 while the
// step computes, and the next one arrives from p-1 into the other buffer: D-1 hops of one shard.
// With keep_last the buffer holding the last shard handled (s = p+1) is returned, so a backward
// ring can start with it.
Tensor TspLayout::ring_forward(const Packing& pk, const Pieces& own, bool keep_last,
                               const FwdBody& body) {
  const int D = this->D(), p = group_rank();
  if (D == 1) {
    body(p, own);
    return Tensor();
  }
  Communicator& c = group();
  const int64_t total = pk.total();
  Tensor buf[2] = {Tensor::f32({total}, kComm), Tensor::f32({total}, kComm)};
  pk.pack(own, buf[0].f32());
  int cur = 0;
  for (int k = 0; k < D; ++k) {
    RequestPtr hop;  // the shard in hand to p+1, the next one from p-1
    if (k < D - 1) {
      hop = c.isendrecv(buf[cur].data(), total, DType::F32, mod(p + 1), buf[1 - cur].data(), total,
                        mod(p - 1));
      if (!parallel().overlap) hop->wait();
    }
    body(mod(p - k), k == 0 ? own : pk.split(buf[cur].f32()));
    if (hop) {
      hop->wait();
      cur = 1 - cur;
    }
  }
  // The last step used buf[cur] (no transfer flipped it).
  return keep_last ? std::move(buf[cur]) : Tensor();
}

// Backward ring, own shard last: step k handles s = (p + 1 + k) mod D, so step D-1 is the own
// shard. Weights travel s -> s-1: the first hop before step 0 (skipped when `first` already holds
// shard p+1), then one hop during each step whose successor is not the own shard: D-1 hops in all
// (D-2 with `first`). The gradient of shard s is created at rank s-1 (step 0), passed left
// after each step with the local contribution added (acc + part), and lands at the owner s
// (step D-1), who adds it to its gradient after accumulating its own contribution directly: D-1
// hops. `wpk` may be empty (no weights needed, e.g. the embedding gradient).
void TspLayout::ring_backward(const Packing& wpk, const Pieces& own_w, Tensor first,
                              const Packing& gpk, const Pieces& own_g, const BwdBody& body) {
  const int D = this->D(), p = group_rank();
  if (D == 1) {
    body(p, own_w, own_g);
    return;
  }
  Communicator& c = group();
  const bool overlap = parallel().overlap, has_w = !wpk.sizes.empty();
  const int left = mod(p - 1), right = mod(p + 1);
  const int64_t wn = wpk.total(), gn = gpk.total();

  Tensor wbuf[2];
  int cur = 0;
  if (has_w) {
    if (first.empty()) {
      // First hop: every rank hands its own shard to its left neighbour.
      wbuf[0] = Tensor::f32({wn}, kComm);
      wbuf[1] = Tensor::f32({wn}, kComm);
      wpk.pack(own_w, wbuf[1].f32());
      c.sendrecv(wbuf[1].data(), wn, DType::F32, left, wbuf[0].data(), wn, right);
    } else {
      TSP_CHECK(first.numel() == wn, "tsp: shard in hand has {} elements, expected {}",
                first.numel(), wn);
      wbuf[0] = std::move(first);
      if (D > 2) wbuf[1] = Tensor::f32({wn}, kComm);
    }
  }
  // acc[k % 2] holds the accumulator of step k's shard; `part` receives a step's contribution
  // while the accumulator it will be added to is still arriving.
  Tensor acc[2] = {Tensor::f32({gn}, kComm), Tensor::f32({gn}, kComm)};
  Tensor part = D > 2 ? Tensor::f32({gn}, kComm) : Tensor();
  // Every rank posts its pairs in the same order (the weight hop of step k, then the accumulator
  // hop of step k), which is how pairs between two ranks match (communicator.h).
  RequestPtr acc_hop;  // acc[k % 2] to p-1, the next accumulator from p+1 into acc[(k + 1) % 2]
  for (int k = 0; k < D; ++k) {
    const int s = mod(p + 1 + k);
    RequestPtr w_hop;
    if (has_w && k + 1 <= D - 2) {  // the shard of step k+1 (not the own one) travels meanwhile
      w_hop = c.isendrecv(wbuf[cur].data(), wn, DType::F32, left, wbuf[1 - cur].data(), wn, right);
      if (!overlap) w_hop->wait();
    }
    if (k == D - 1) {
      // The owner: its contribution straight into its gradients, then the others' sum.
      body(p, own_w, own_g);
      acc_hop->wait();
      gpk.add_into(own_g, acc[k % 2].f32());
    } else {
      Tensor& target = k == 0 ? acc[0] : part;
      target.zero();
      body(s, has_w ? wpk.split(wbuf[cur].f32()) : Pieces{}, gpk.split(target.f32()));
      if (k > 0) {
        // The previous hop brought this step's accumulator and freed the other buffer.
        acc_hop->wait();
        add_inplace(acc[k % 2].f32(), part.f32(), gn);
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

// Attention rounds (docs/tsp-schedule.md, "Forward, one block"): round r computes with head group
// r's packed shard P_r, broadcast by its owner; the broadcast of P_{r+1} is started before round r
// computes (two buffers, the one of round r-1 is free by then). The owner computes from its store
// (the same values).
void TspLayout::attention_rounds(const Pieces& own, const RoundBody& body) {
  const int D = this->D(), p = group_rank();
  if (D == 1) {
    body(p, own);
    return;
  }
  Communicator& c = group();
  const int64_t total = attn_pack_.total();
  Tensor buf[2] = {Tensor::f32({total}, kComm), Tensor::f32({total}, kComm)};
  auto start = [&](int r) {
    Tensor& b = buf[r % 2];
    if (r == p) attn_pack_.pack(own, b.f32());
    RequestPtr req = c.ibroadcast(b.data(), total, DType::F32, r);
    if (!parallel().overlap) req->wait();
    return req;
  };
  RequestPtr pending = start(0);
  for (int r = 0; r < D; ++r) {
    pending->wait();
    RequestPtr next = r + 1 < D ? start(r + 1) : RequestPtr();
    body(r, r == p ? own : attn_pack_.split(buf[r % 2].f32()));
    pending = std::move(next);
  }
}

// K (or V) of one head group for the whole sequence: every rank's local [B, nl, c] block,
// all-gathered to [D, B, nl, c], then [B, D·nl, c] so each row's keys are contiguous (at
// positions t.k_pos). Returns the local block itself at D = 1.
const float* TspLayout::gather_kv(const Tokens& t, const float* local, Tensor& gathered,
                                  Tensor& full) {
  const int D = this->D();
  if (D == 1) return local;
  const int64_t cw = ad_.kv_width(), block = t.n * cw;
  if (gathered.empty()) gathered = Tensor::f32({D * block}, kComm);
  group().all_gather(local, gathered.data(), block, DType::F32);
  if (t.B == 1) return gathered.f32();  // [D, 1, nl, c] is already [1, S, c]
  if (full.empty()) full = Tensor::f32({t.B * t.S * cw}, kWork);
  swap_leading_dims(TensorView(gathered.data(), {D, t.B, t.nl * cw}, DType::F32),
                    TensorView(full.data(), {t.B, D, t.nl * cw}, DType::F32));
  return full.f32();
}

// The dual of gather_kv: full_grad [B, S, c] (every token of the sequence, this rank's partial
// sums) -> [D, B, nl, c] -> reduce-scatter: local [B, nl, c] (=) gets the sum over the group of
// the gradient of this rank's own tokens. At D = 1 it is a copy.
void TspLayout::scatter_dkv(const Tokens& t, const float* full_grad, Tensor& swapped,
                            float* local) {
  const int D = this->D();
  const int64_t cw = ad_.kv_width(), block = t.n * cw;
  const float* send = full_grad;
  if (t.B > 1) {
    if (swapped.empty()) swapped = Tensor::f32({D * block}, kComm);
    swap_leading_dims(TensorView(const_cast<float*>(full_grad), {t.B, D, t.nl * cw}, DType::F32),
                      TensorView(swapped.data(), {D, t.B, t.nl * cw}, DType::F32));
    send = swapped.f32();
  }
  group().reduce_scatter(send, local, block, DType::F32);
}

// ---- one block ---------------------------------------------------------------------------------

void TspLayout::layer_forward(int l, const Tokens& t, block::LayerSaved& s, Tensor& x, Tensor& xn) {
  const ParamIndex::Layer& P = idx_.layers[l];
  const int64_t n = t.n, h = config_.hidden_size, qw = ad_.q_width(), kw = ad_.kv_width();
  const float eps = static_cast<float>(config_.rms_norm_eps);
  copy(x, s.x);
  rmsnorm_forward(s.x.f32(), store_.w(P.input_norm), xn.f32(), s.rstd1.f32(), n, h, eps);
  copy(s.x, s.x2);  // x2 = x + Σ_r o_r·Wo_rᵀ, accumulated round by round

  // Saved q, k, v, o, lse hold every head of the local tokens, one contiguous block per head
  // group ([D][n, hq_r, d] ...), so each round reads and writes plain [n, ...] arrays.
  Tensor k_gathered, k_full, v_gathered, v_full;
  attention_rounds(attn_own_w(P), [&](int r, const Pieces& w) {
    const block::AttnWeights aw{w[0], w[1], w[2], w[3]};
    float* q = s.q.f32() + r * n * qw;          // [B, nl, hq_r, d]
    float* k = s.k.f32() + r * n * kw;          // [B, nl, hkv_r, d]
    float* v = s.v.f32() + r * n * kw;          // [B, nl, hkv_r, d]
    float* o = s.o.f32() + r * n * qw;          // [B, nl, hq_r, d]
    float* lse = s.lse.f32() + r * n * ad_.hq;  // [B, nl, hq_r]
    block::qkv_forward(ad_, aw, xn.f32(), t.tok_pos.data(), n, q, k, v);
    progress();
    const float* K = gather_kv(t, k, k_gathered, k_full);  // [B, S, hkv_r, d] at k_pos
    const float* V = gather_kv(t, v, v_gathered, v_full);
    for (int64_t b = 0; b < t.B; ++b) {
      block::attention_forward(ad_, 1, t.nl, t.S, q + b * t.nl * qw, K + b * t.S * kw,
                               V + b * t.S * kw, t.q_pos.data(), t.k_pos.data(), o + b * t.nl * qw,
                               lse + b * t.nl * ad_.hq);
      progress();
    }
    block::out_proj_forward(ad_, aw.wo, o, n, s.x2.f32());  // local accumulation
    progress();
  });

  rmsnorm_forward(s.x2.f32(), store_.w(P.post_norm), xn.f32(), s.rstd2.f32(), n, h, eps);
  copy(s.x2, x);
  ring_forward(mlp_pack_, mlp_own_w(P), /*keep_last=*/false, [&](int, const Pieces& w) {
    const block::MlpWeights mw{w[0], w[1], w[2], f_};
    for (int64_t t0 = 0; t0 < n; t0 += block::kTokenChunk) {
      const int64_t m = std::min(block::kTokenChunk, n - t0);
      block::mlp_forward(mw, h, xn.f32() + t0 * h, m, x.f32() + t0 * h);
      progress();
    }
  });
}

// dx [n, h]: d(layer output) in, d(layer input) out. Norm weight gradients (+=) into dnorm_*.
void TspLayout::layer_backward(int l, const Tokens& t, const block::LayerSaved& s, Tensor& dx,
                               float* dnorm_in, float* dnorm_post) {
  const ParamIndex::Layer& P = idx_.layers[l];
  const int D = this->D(), p = group_rank();
  const int64_t n = t.n, h = config_.hidden_size, qw = ad_.q_width(), kw = ad_.kv_width();
  Tensor xn = Tensor::f32({n, h}, kWork);   // recomputed normed input of a sub-block
  Tensor dxn = Tensor::f32({n, h}, kWork);  // its gradient

  // MLP sub-block: x_out = x2 + mlp(norm(x2)); dx = d x_out becomes d x2.
  block::rmsnorm_apply(s.x2.f32(), store_.w(P.post_norm), s.rstd2.f32(), xn.f32(), n, h);
  ring_backward(mlp_pack_, mlp_own_w(P), Tensor(), mlp_pack_, mlp_own_g(P),
                [&](int, const Pieces& w, const Pieces& g) {
                  const block::MlpWeights mw{w[0], w[1], w[2], f_};
                  const block::MlpGrads mg{g[0], g[1], g[2]};
                  for (int64_t t0 = 0; t0 < n; t0 += block::kTokenChunk) {
                    const int64_t m = std::min(block::kTokenChunk, n - t0);
                    block::mlp_backward(mw, mg, h, xn.f32() + t0 * h, dx.f32() + t0 * h, m,
                                        dxn.f32() + t0 * h);
                    progress();
                  }
                });
  block::rmsnorm_backward_add(dxn.f32(), s.x2.f32(), store_.w(P.post_norm), s.rstd2.f32(), dx.f32(),
                              dnorm_post, n, h);

  // Attention sub-block: x2 = x + Σ_r attn_r(norm(x))·Wo_rᵀ; dx becomes d x.
  block::rmsnorm_apply(s.x.f32(), store_.w(P.input_norm), s.rstd1.f32(), xn.f32(), n, h);
  dxn.zero();
  Tensor d_o = Tensor::f32({n, qw}, kWork);
  Tensor dq = Tensor::f32({n, qw}, kWork);
  Tensor dK = Tensor::f32({t.B * t.S, kw}, kWork);  // whole sequence of head group r
  Tensor dV = Tensor::f32({t.B * t.S, kw}, kWork);
  Tensor dk = D > 1 ? Tensor::f32({n, kw}, kWork) : Tensor();  // own tokens, after the
  Tensor dv = D > 1 ? Tensor::f32({n, kw}, kWork) : Tensor();  // reduce-scatter
  Tensor k_gathered, k_full, v_gathered, v_full, dk_swapped, dv_swapped;
  // The partial gradient of P_r (from this rank's tokens) is reduced to owner r while the next
  // round computes: two buffers; the owner adds the sum to its gradients once it has arrived.
  const int64_t total = attn_pack_.total();
  Tensor gpart[2];
  RequestPtr reducing[2];
  int reduced_round[2] = {-1, -1};
  auto finish_reduce = [&](int slot) {
    if (!reducing[slot]) return;
    reducing[slot]->wait();
    reducing[slot].reset();
    if (reduced_round[slot] == p) attn_pack_.add_into(attn_own_g(P), gpart[slot].f32());
  };
  attention_rounds(attn_own_w(P), [&](int r, const Pieces& w) {
    const int slot = r % 2;
    Pieces g;
    if (D == 1) {
      g = attn_own_g(P);  // nobody else contributes: straight into the gradients
    } else {
      finish_reduce(slot);
      if (gpart[slot].empty()) gpart[slot] = Tensor::f32({total}, kComm);
      gpart[slot].zero();
      g = attn_pack_.split(gpart[slot].f32());
    }
    const block::AttnWeights aw{w[0], w[1], w[2], w[3]};
    const block::AttnGrads ag{g[0], g[1], g[2], g[3]};
    const float* q = s.q.f32() + r * n * qw;
    const float* k = s.k.f32() + r * n * kw;
    const float* v = s.v.f32() + r * n * kw;
    const float* o = s.o.f32() + r * n * qw;
    const float* lse = s.lse.f32() + r * n * ad_.hq;
    block::out_proj_backward(ad_, aw.wo, o, dx.f32(), n, d_o.f32(), ag.dwo);
    progress();
    const float* K = gather_kv(t, k, k_gathered, k_full);
    const float* V = gather_kv(t, v, v_gathered, v_full);
    dq.zero();
    dK.zero();
    dV.zero();
    for (int64_t b = 0; b < t.B; ++b) {
      const int64_t qo = b * t.nl * qw, ko = b * t.S * kw;
      block::attention_backward(ad_, 1, t.nl, t.S, q + qo, K + ko, V + ko, t.q_pos.data(),
                                t.k_pos.data(), o + qo, lse + b * t.nl * ad_.hq, d_o.f32() + qo,
                                dq.f32() + qo, dK.f32() + ko, dV.f32() + ko);
      progress();
    }
    float* dk_own = dK.f32();  // D = 1: the whole sequence is this rank's
    float* dv_own = dV.f32();
    if (D > 1) {
      scatter_dkv(t, dK.f32(), dk_swapped, dk.f32());
      scatter_dkv(t, dV.f32(), dv_swapped, dv.f32());
      dk_own = dk.f32();
      dv_own = dv.f32();
    }
    block::qkv_backward(ad_, aw, ag, xn.f32(), t.tok_pos.data(), n, dq.f32(), dk_own, dv_own,
                        dxn.f32());
    if (D > 1) {
      float* buf = gpart[slot].f32();
      reducing[slot] = group().ireduce(buf, buf, total, DType::F32, r);
      reduced_round[slot] = r;
      if (!parallel().overlap) finish_reduce(slot);
    }
  });
  finish_reduce(0);
  finish_reduce(1);
  block::rmsnorm_backward_add(dxn.f32(), s.x.f32(), store_.w(P.input_norm), s.rstd1.f32(), dx.f32(),
                              dnorm_in, n, h);
}

// ---- loss head: vocabulary ring with an online cross-entropy (D > 1) --------------------------

// xn [n, h] final-normed. Returns the sum of the local tokens' losses; with dxn [n, h] (=) also
// the backward, the LM-head gradient landing at each shard's owner.
double TspLayout::head_loss(const Tokens& t, const float* xn, float grad_scale, float* dxn) {
  const int64_t n = t.n, h = config_.hidden_size;
  const int32_t* labels = t.labels.data();
  // Per token: running max and sum of exp over the vocabulary seen so far, and the target's logit.
  Tensor row_max = Tensor::f32({n}, kWork);
  Tensor row_sum = Tensor::f32({n}, kWork);
  Tensor target = Tensor::f32({n}, kWork);
  std::fill(row_max.f32(), row_max.f32() + n, -std::numeric_limits<float>::infinity());
  const int64_t rows = std::min(n, block::kTokenChunk);
  Tensor logits = Tensor::f32({rows, vs_}, kWork);  // one shard of one token chunk at a time
  const Pieces own_w{store_.w(head_param())}, own_g{store_.g(head_param())};

  CommStats before = group().stats();
  Tensor in_hand =
      ring_forward(vocab_pack_, own_w, /*keep_last=*/dxn != nullptr, [&](int s, const Pieces& w) {
        for (int64_t t0 = 0; t0 < n; t0 += block::kTokenChunk) {
          const int64_t m = std::min(block::kTokenChunk, n - t0);
          linear_forward(xn + t0 * h, w[0], logits.f32(), m, h, vs_);
          online_softmax_update(logits.f32(), labels + t0, row_max.f32() + t0, row_sum.f32() + t0,
                                target.f32() + t0, m, vs_, v0(s));
          progress();
        }
      });
  traffic_.head_forward = group().stats() - before;
  double loss = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (labels[i] == -100) continue;  // the kernels' ignore_index
    loss += static_cast<double>(row_max.f32()[i]) +
            std::log(static_cast<double>(row_sum.f32()[i])) - static_cast<double>(target.f32()[i]);
  }
  if (!dxn) return loss;

  // Backward: the same shards again (the ring starts with shard p+1, still in hand), logits
  // recomputed, dlogits = grad_scale·(softmax - onehot) from the final statistics.
  before = group().stats();
  std::fill(dxn, dxn + n * h, 0.f);
  Tensor dlogits = Tensor::f32({rows, vs_}, kWork);
  ring_backward(
      vocab_pack_, own_w, std::move(in_hand), vocab_pack_, own_g,
      [&](int s, const Pieces& w, const Pieces& g) {
        for (int64_t t0 = 0; t0 < n; t0 += block::kTokenChunk) {
          const int64_t m = std::min(block::kTokenChunk, n - t0);
          linear_forward(xn + t0 * h, w[0], logits.f32(), m, h, vs_);
          online_softmax_backward(logits.f32(), labels + t0, row_max.f32() + t0, row_sum.f32() + t0,
                                  dlogits.f32(), m, vs_, v0(s), grad_scale);
          linear_backward(dlogits.f32(), xn + t0 * h, w[0], dxn + t0 * h, g[0], m, h, vs_);
          progress();
        }
      });
  traffic_.head_backward = group().stats() - before;
  return loss;
}

// ---- the step ----------------------------------------------------------------------------------

double TspLayout::run(const ReplicaBatch& rb, bool backward) {
  const LlamaConfig& c = config_;
  const int D = this->D(), p = group_rank(), L = static_cast<int>(c.num_hidden_layers);
  const int64_t h = c.hidden_size, V = c.vocab_size;
  const float eps = static_cast<float>(c.rms_norm_eps);
  Communicator& comm = group();
  traffic_ = TspTraffic{};
  traffic_.layer_forward.assign(L, CommStats{});
  traffic_.layer_backward.assign(L, CommStats{});

  Tokens t;
  t.B = rb.B;
  t.S = rb.S;
  t.nl = rb.S / D;
  t.n = t.B * t.nl;
  t.q_pos = zigzag_positions(t.S, D, p);
  t.k_pos = zigzag_gathered_positions(t.S, D);
  t.tok_pos.resize(t.n);
  t.ids.resize(t.n);
  t.labels.resize(t.n);
  for (int64_t b = 0; b < t.B; ++b) {
    for (int64_t i = 0; i < t.nl; ++i) {
      const int64_t j = b * t.nl + i, src = b * t.S + t.q_pos[i];
      t.tok_pos[j] = t.q_pos[i];
      t.ids[j] = rb.inputs[src];
      t.labels[j] = rb.labels[src];
    }
  }
  const int64_t n = t.n;

  Tensor x = Tensor::f32({n, h}, kWork);   // residual stream of the local tokens
  Tensor xn = Tensor::f32({n, h}, kWork);  // normed input of a sub-block
  CommStats before = comm.stats();
  ring_forward(vocab_pack_, {store_.w(idx_.embed)}, false, [&](int s, const Pieces& w) {
    embedding_forward(t.ids.data(), w[0], x.f32(), n, h, v0(s), vs_);  // ids in shard s
  });
  traffic_.embedding_forward = comm.stats() - before;

  // Forward-only keeps one layer's activations at a time; backward keeps all L.
  std::vector<block::LayerSaved> saved(backward ? L : 1);
  for (int l = 0; l < L; ++l) {
    block::LayerSaved& s = saved[backward ? l : 0];
    if (s.x.empty()) s.allocate(n, h, c.num_attention_heads, c.num_key_value_heads, ad_.d);
    before = comm.stats();
    layer_forward(l, t, s, x, xn);
    traffic_.layer_forward[l] = comm.stats() - before;
  }

  Tensor rstd_f = Tensor::f32({n}, MemCategory::Activations);
  rmsnorm_forward(x.f32(), store_.w(idx_.final_norm), xn.f32(), rstd_f.f32(), n, h, eps);
  const int head = head_param();
  Tensor dxn = backward ? Tensor::f32({n, h}, kWork) : Tensor();
  double loss = 0;
  if (D == 1) {
    // One shard: the online cross-entropy is the plain one, so call the shared head (it sums
    // the exponentials in another order), which keeps D = 1 bitwise equal to single.
    loss = block::lm_head_loss(xn.f32(), store_.w(head), t.labels.data(), n, h, V, rb.grad_scale,
                               backward ? dxn.f32() : nullptr, backward ? store_.g(head) : nullptr);
  } else {
    loss = head_loss(t, xn.f32(), rb.grad_scale, backward ? dxn.f32() : nullptr);
  }
  if (!backward) return loss;

  // Norm weights are replicated: this call's gradients are summed over the group with ONE
  // all-reduce at the end ([final; per layer input, post] × h); at D = 1 they go straight in.
  Tensor norm_grads = D > 1 ? Tensor::f32({(2 * L + 1) * h}, MemCategory::Grads) : Tensor();
  auto dnorm = [&](int param, int slot) {
    return D > 1 ? norm_grads.f32() + slot * h : store_.g(param);
  };
  Tensor dx = Tensor::f32({n, h}, kWork);  // gradient of the residual stream
  block::rmsnorm_backward_add(dxn.f32(), x.f32(), store_.w(idx_.final_norm), rstd_f.f32(), dx.f32(),
                              dnorm(idx_.final_norm, 0), n, h);
  dxn = Tensor();
  for (int l = L - 1; l >= 0; --l) {
    const ParamIndex::Layer& P = idx_.layers[l];
    before = comm.stats();
    layer_backward(l, t, saved[l], dx, dnorm(P.input_norm, 1 + 2 * l),
                   dnorm(P.post_norm, 2 + 2 * l));
    traffic_.layer_backward[l] = comm.stats() - before;
    saved[l] = block::LayerSaved();  // this layer's activations are no longer needed
  }

  // Embedding gradient: no weights needed, only the travelling accumulator of each shard.
  before = comm.stats();
  ring_backward(Packing{}, Pieces{}, Tensor(), vocab_pack_, {store_.g(idx_.embed)},
                [&](int s, const Pieces&, const Pieces& g) {
                  embedding_backward(t.ids.data(), dx.f32(), g[0], n, h, v0(s), vs_);
                });
  traffic_.embedding_backward = comm.stats() - before;

  if (D > 1) {
    before = comm.stats();
    comm.all_reduce(norm_grads.data(), norm_grads.numel(), DType::F32);
    traffic_.norms = comm.stats() - before;
    add_inplace(store_.g(idx_.final_norm), norm_grads.f32(), h);
    for (int l = 0; l < L; ++l) {
      add_inplace(store_.g(idx_.layers[l].input_norm), norm_grads.f32() + (1 + 2 * l) * h, h);
      add_inplace(store_.g(idx_.layers[l].post_norm), norm_grads.f32() + (2 + 2 * l) * h, h);
    }
  }
  return loss;
}

const LayoutRegistration kRegisterTsp(
    "tsp",
    "tensor and sequence parallel folded on one axis: 1/D of every weight and 1/D of the tokens "
    "per rank; weight shards travel (broadcast rounds, rings), overlapped with compute",
    [](const LlamaConfig& c, const ParallelConfig& p, Communicator& world) {
      return std::unique_ptr<Layout>(new TspLayout(c, p, world));
    });

}  // namespace
}  // namespace tsp
