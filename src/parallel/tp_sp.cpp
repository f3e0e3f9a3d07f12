// The tp, sp and tp-sp layouts: one algorithm. A group of D = T·Σ ranks runs
// T-way Megatron tensor parallelism inside each TP group of T ranks and Σ-way
// sequence parallelism (zigzag tokens, K/V all-gathered) across the Σ TP
// groups:
//
//   tp    = T = D,    Σ = 1     every rank holds all tokens and 1/D of every weight matrix
//   sp    = T = 1,    Σ = D     every rank holds every weight and 1/D of the tokens
//   tp-sp = T = --tp, Σ = D/T
//
// Rank map (tp_sp.h): group rank g has tensor index t = g mod T and sequence
// index s = g / T, the cost model's numbering (T fastest). Rank (t, s) holds
//   weights  q, k, v, gate, up: rows of piece t of T (q/k/v by head group t: n_kv/T kv heads and
//            the g·n_kv/T query heads that read them, so GQA groups stay together); o, down:
//            columns of piece t; embedding and LM head: vocabulary rows [t·V/T, (t+1)·V/T);
//            RMSNorm weights whole. Every weight is replicated over the Σ ranks with the same t.
//   tokens   zigzag chunks s and 2Σ-1-s of every row of its replica's batch, n = B·S/Σ tokens,
//            replicated over the T ranks with the same s.
//
// One block, forward | backward (n local tokens; every collective is over T or
// over Σ ranks):
//
//   xn    = norm1(x)                                      | dxn all-reduced over T, then norm1 bwd
//   q,k,v = xn·W{q,k,v}_tᵀ, RoPE at global positions      |
//   K,V   = all-gather k, v over Σ  [B, S, hkv/T, d]      | dK, dV reduce-scattered over Σ
//   o     = causal attention(q; K, V) at global positions |
//   x2    = x + all-reduce_T(o·Wo_tᵀ)                     | identity (dx is replicated over T)
//   xn    = norm2(x2)                                     | dxn all-reduced over T, then norm2 bwd
//   x'    = x2 + all-reduce_T(mlp_t(xn))                  | identity
//   weight gradients of the block                         | all-reduced over Σ (one call)
//
// The all-reduces are Megatron's g (all-reduce forward, identity backward)
// after the row-parallel o / down projections and its dual f (identity forward,
// all-reduce backward) before the column-parallel q/k/v and gate/up
// projections. f sits between the norm and the projections, so every TP rank
// runs the norm's forward and backward on identical data: the norm weights'
// gradients come out bit-identical on the T ranks (the all-reduce hands every
// rank the same sum) and need no reduction over T. Over Σ they are partial sums
// over different tokens, reduced with the block's other weight gradients.
//
// Embedding and loss head (T > 1): the embedding is vocabulary-parallel (each
// rank looks up the ids in its rows, zeros elsewhere, all-reduce over T); the
// cross-entropy is vocabulary-parallel: local logits [chunk, V/T] only,
// per-token (max, sum-exp, target logit) all-gathered over T and merged in rank
// order (the Communicator reduces only by sums; a max needs the gather), then
// the backward recomputes the local logits and all-reduces d(xn) over T. No
// rank ever holds logits of the whole vocabulary. At T = 1 the loss head is
// block::lm_head_loss, as in single.
//
// Saving policy: block.h's, except that K and V are kept as gathered ([B, S]
// keys, the cost model's sp_keeps_gathered_kv) so backward needs no second
// all-gather.
//
// At D = 1 this runs exactly the single layout's operations (no staging, no
// communication): bitwise equal. Communication per block and per rank in closed
// form: docs/communication.md.
#include "parallel/tp_sp.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "parallel/layout_common.h"
#include "parallel/registry.h"
#include "tsp/model/block.h"
#include "tsp/ops/ops.h"

namespace tsp {

TpSpCoords tp_sp_coords(int group_rank, int D, int T) {
  TSP_CHECK(T >= 1 && D >= 1 && D % T == 0, "a TP×SP group of D={} ranks cannot have T={}", D, T);
  TSP_CHECK(0 <= group_rank && group_rank < D, "rank {} is outside a group of {}", group_rank, D);
  return {group_rank % T, group_rank / T};
}

namespace {

// Where backward writes a set of parameters' gradients. With Σ = 1 that is the
// store itself. With Σ > 1 each sequence shard computes a partial gradient from
// its own tokens: the partials go to a packed, zeroed staging buffer, are
// all-reduced over Σ in one call and then added to the store. Staging, rather
// than all-reducing the store in place, keeps what earlier calls accumulated
// out of the sum (it is already identical on every σ), so gradient accumulation
// stays exact.
class GradStage {
 public:
  GradStage(const ShardStore& store, const std::vector<int>& params, bool staged)
      : store_(store), params_(params) {
    if (!staged) return;
    int64_t total = 0;
    for (int p : params_) {
      offsets_.push_back(total);
      total += store_.grad(store_.entry_of(p)).numel();
    }
    buf_ = Tensor::f32({total}, MemCategory::Comm);  // zeroed by allocation
  }
  float* g(int param) const {
    if (buf_.empty()) return store_.g(param);
    for (size_t i = 0; i < params_.size(); ++i)
      if (params_[i] == param) return buf_.f32() + offsets_[i];
    TSP_FAIL("parameter #{} is not staged here", param);
  }
  // Sum the partials over the SP group and add them to the store (no-op when
  // not staged).
  void reduce_into_store(Communicator& sp) {
    if (buf_.empty()) return;
    sp.all_reduce(buf_.data(), buf_.numel(), DType::F32);
    for (size_t i = 0; i < params_.size(); ++i) {
      TensorView dst = store_.grad(store_.entry_of(params_[i]));
      add_inplace(dst.f32(), buf_.f32() + offsets_[i], dst.numel());
    }
    buf_ = Tensor();
  }

 private:
  const ShardStore& store_;
  std::vector<int> params_;
  std::vector<int64_t> offsets_;
  Tensor buf_;
};

// The --tp values that would work for a group of D ranks (for error messages).
std::string workable_tp(const LlamaConfig& c, int D) {
  std::string out;
  for (int t = 1; t <= D; ++t)
    if (D % t == 0 && c.num_key_value_heads % t == 0 && c.intermediate_size % t == 0 &&
        c.vocab_size % t == 0)
      out += (out.empty() ? "" : ", ") + std::to_string(t);
  return "{" + out + "}";
}

class TpSpLayout final : public LayoutCommon {
 public:
  TpSpLayout(const std::string& name, const LlamaConfig& config, const ParallelConfig& parallel,
             Communicator& world)
      : LayoutCommon(name, config, parallel, world) {
    T_ = name == "tp" ? D() : name == "sp" ? 1 : parallel.tp;
    sigma_ = D() / T_;
    check_tensor_split(name);
    const TpSpCoords me = tp_sp_coords(group_rank(), D(), T_);
    t_ = me.t;
    s_ = me.s;
    // TP group: the T ranks sharing a token shard; SP group: the Σ ranks
    // sharing a weight shard.
    tp_ = group().split(/*color=*/s_, /*key=*/t_);
    sp_ = group().split(/*color=*/t_, /*key=*/s_);
    hg_ = head_group(config_, T_, t_);
    v0_ = vocab_shard(config_.vocab_size, T_, t_).begin;

    // Shards in canonical order. Norms are whole on every rank; matrices are
    // piece t of T.
    const ShardMap by_rows = T_ == 1 ? ShardMap::whole() : ShardMap::rows(T_, t_);
    const ShardMap by_cols = T_ == 1 ? ShardMap::whole() : ShardMap::cols(T_, t_);
    const bool norm_rep = D() > 1, matrix_rep = D() > 1 && T_ == 1;
    for (int i = 0; i < static_cast<int>(specs_.size()); ++i) {
      switch (specs_[i].kind) {
        case ParamKind::InputNorm:
        case ParamKind::PostNorm:
        case ParamKind::FinalNorm:
          store_.add(i, ShardMap::whole(), norm_rep);
          break;
        case ParamKind::Wo:
        case ParamKind::Wdown:
          store_.add(i, by_cols, matrix_rep);
          break;
        default:  // embedding, q, k, v, gate, up, LM head
          store_.add(i, by_rows, matrix_rep);
          break;
      }
    }
    store_.allocate(specs_, group());
    // Every TP rank returns the loss of its token shard; count it once per
    // shard.
    loss_partial_ = true;
  }

  std::vector<ParamShard> parameters() override {
    std::vector<ParamShard> out = LayoutCommon::parameters();
    // A matrix shard (T > 1) is held identically by the Σ ranks with the same
    // t: copy s.
    if (T_ > 1)
      for (ParamShard& p : out)
        if (!p.replicated_in_group) p.copy_index = s_;
    return out;
  }

  const TpSpTraffic& traffic() const { return traffic_; }
  TpSpDegrees degrees() const { return {T_, sigma_}; }

 protected:
  void check_batch(const ReplicaBatch& rb) const override {
    if (sigma_ == 1 || rb.S % (2 * sigma_) == 0) return;
    if (name() == "sp") check_zigzag(rb.S, sigma_);  // its message speaks of D = Σ
    TSP_FAIL(
        "tp-sp: sequence length S={} cannot be cut into 2Σ={} equal zigzag chunks "
        "(Σ = D/T = {}/{} = {} sequence shards); use S a multiple of {}, or a --tp that leaves "
        "fewer sequence shards",
        rb.S, 2 * sigma_, D(), T_, sigma_, 2 * sigma_);
  }
  // take_tokens reads every token under tp (Σ = 1), else the zigzag chunks of sequence shard s.
  std::vector<Range> input_ranges(int64_t S) const override {
    if (sigma_ == 1) return {};
    return zigzag_ranges(S, sigma_, s_);
  }

  double run(const ReplicaBatch& rb, bool backward) override;

 private:
  // Per-run token data of this rank: [B, S/Σ] ids and labels, positions.
  struct Tokens {
    int64_t B = 0, S = 0, nr = 0,
            n = 0;                     // rows, sequence, tokens per row here, tokens here
    std::vector<int32_t> ids, labels;  // [B, nr]
    std::vector<int64_t> q_pos;        // [nr] global positions of this rank's tokens
    std::vector<int64_t> k_pos;        // [S] positions of the gathered keys
    std::vector<int64_t> tok_pos;      // [n] position of every local token (RoPE)
  };
  Tokens take_tokens(const ReplicaBatch& rb) const;

  void check_tensor_split(const std::string& name) const;
  CommStats snapshot() const {
    CommStats s = tp_->stats();
    s += sp_->stats();
    return s;
  }
  block::AttnDims attn_dims() const { return block::attn_dims(config_, hg_.hq(), hg_.hkv()); }
  block::AttnWeights attn_weights(const ParamIndex::Layer& P) const {
    return {store_.w(P.wq), store_.w(P.wk), store_.w(P.wv), store_.w(P.wo)};
  }
  block::MlpWeights mlp_weights(const ParamIndex::Layer& P) const {
    return {store_.w(P.wg), store_.w(P.wu), store_.w(P.wd), config_.intermediate_size / T_};
  }
  int head_param() const { return config_.tie_word_embeddings ? idx_.embed : idx_.lm_head; }

  void allocate_saved(block::LayerSaved& s, const Tokens& tk) const;
  // y [n, h] (+=) the all-reduced output of a row-parallel projection. At T = 1
  // the block adds straight into the residual (as single does); at T > 1 the
  // partial sum goes through a buffer.
  template <typename F>
  void row_parallel_add(float* y, int64_t n, F&& partial);
  void gather_kv(const float* local, float* gathered, const Tokens& tk, int64_t width);
  void scatter_dkv(const float* full, float* local, const Tokens& tk, int64_t width);

  void layer_forward(int l, block::LayerSaved& s, Tensor& x, Tensor& xn, const Tokens& tk);
  void layer_backward(int l, block::LayerSaved& s, Tensor& dx, Tensor& xn, const Tokens& tk);
  double vocab_parallel_loss(const float* xn, const float* w, const Tokens& tk, float grad_scale,
                             float* dxn, float* dw);

  int T_ = 1, sigma_ = 1, t_ = 0, s_ = 0;
  int64_t v0_ = 0;  // first vocabulary id of this rank's embedding / LM head rows
  HeadGroup hg_;
  std::unique_ptr<Communicator> tp_, sp_;
  TpSpTraffic traffic_;
};

void TpSpLayout::check_tensor_split(const std::string& name) const {
  const LlamaConfig& c = config_;
  if (name != "tp-sp") {  // T is 1 (sp) or D (tp): the generic messages speak of D
    check_heads(c, T_);
    check_ffn(c.intermediate_size, T_);
    check_vocab(c.vocab_size, T_);
    return;
  }
  const std::string ok = workable_tp(c, D());
  TSP_CHECK(c.num_key_value_heads % T_ == 0,
            "tp-sp: --tp {} does not divide num_key_value_heads={} (each TP rank takes whole "
            "kv heads with their query heads); use --tp in {}",
            T_, c.num_key_value_heads, ok);
  TSP_CHECK(c.intermediate_size % T_ == 0,
            "tp-sp: --tp {} does not divide intermediate_size={}; use --tp in {}", T_,
            c.intermediate_size, ok);
  TSP_CHECK(c.vocab_size % T_ == 0,
            "tp-sp: --tp {} does not divide vocab_size={} (the embedding and LM head are split "
            "by vocabulary); use --tp in {} or pad the vocabulary to a multiple of {}",
            T_, c.vocab_size, ok, T_);
}

TpSpLayout::Tokens TpSpLayout::take_tokens(const ReplicaBatch& rb) const {
  Tokens tk;
  tk.B = rb.B;
  tk.S = rb.S;
  tk.nr = rb.S / sigma_;
  tk.n = tk.B * tk.nr;
  tk.ids.resize(tk.n);
  tk.labels.resize(tk.n);
  if (sigma_ == 1) {  // all tokens in their order (no zigzag: S need not be even)
    tk.ids = rb.inputs;
    tk.labels = rb.labels;
    tk.q_pos.resize(tk.S);
    std::iota(tk.q_pos.begin(), tk.q_pos.end(), int64_t{0});
    tk.k_pos = tk.q_pos;
  } else {
    auto view = [&](const std::vector<int32_t>& v, int64_t S) {
      return TensorView(const_cast<int32_t*>(v.data()), {tk.B, S}, DType::I32);
    };
    zigzag_take(view(rb.inputs, tk.S), view(tk.ids, tk.nr), sigma_, s_);
    zigzag_take(view(rb.labels, tk.S), view(tk.labels, tk.nr), sigma_, s_);
    tk.q_pos = zigzag_positions(tk.S, sigma_, s_);
    tk.k_pos = zigzag_gathered_positions(tk.S, sigma_);
  }
  tk.tok_pos.resize(tk.n);
  for (int64_t i = 0; i < tk.n; ++i) tk.tok_pos[i] = tk.q_pos[i % tk.nr];
  return tk;
}

void TpSpLayout::allocate_saved(block::LayerSaved& s, const Tokens& tk) const {
  const auto A = MemCategory::Activations;
  const int64_t n = tk.n, h = config_.hidden_size, d = hg_.head_dim;
  s.x = Tensor::f32({n, h}, A);
  s.rstd1 = Tensor::f32({n}, A);
  s.q = Tensor::f32({n, hg_.hq(), d}, A);
  // K and V of every token of the rows (gathered over Σ), kept for backward.
  s.k = Tensor::f32({tk.B * tk.S, hg_.hkv(), d}, A);
  s.v = Tensor::f32({tk.B * tk.S, hg_.hkv(), d}, A);
  s.o = Tensor::f32({n, hg_.hq(), d}, A);
  s.lse = Tensor::f32({n, hg_.hq()}, A);
  s.x2 = Tensor::f32({n, h}, A);
  s.rstd2 = Tensor::f32({n}, A);
}

template <typename F>
void TpSpLayout::row_parallel_add(float* y, int64_t n, F&& partial) {
  const int64_t h = config_.hidden_size;
  if (T_ == 1) {
    partial(y);
    return;
  }
  Tensor part = Tensor::f32({n, h}, MemCategory::Comm);  // zeroed by allocation
  partial(part.f32());
  tp_->all_reduce(part.data(), part.numel(), DType::F32);
  add_inplace(y, part.f32(), n * h);
}

// local [B, nr, width] of this rank -> gathered [B, S, width] (keys in
// zigzag_gathered_positions order): all-gather gives [Σ, B, nr·width], swapping
// the leading dims gives [B, Σ·nr, width].
void TpSpLayout::gather_kv(const float* local, float* gathered, const Tokens& tk, int64_t width) {
  const int64_t block = tk.n * width;
  Tensor recv = Tensor::f32({sigma_, tk.B, tk.nr * width}, MemCategory::Comm);
  sp_->all_gather(local, recv.data(), block, DType::F32);
  swap_leading_dims(recv.view(), TensorView(gathered, {tk.B, sigma_, tk.nr * width}, DType::F32));
}

// The dual: full [B, S, width] gradient -> [Σ, B, nr·width] -> reduce-scatter:
// local [B, nr, width] holds the sum over the Σ ranks of the gradient of this
// rank's keys.
void TpSpLayout::scatter_dkv(const float* full, float* local, const Tokens& tk, int64_t width) {
  Tensor send = Tensor::f32({sigma_, tk.B, tk.nr * width}, MemCategory::Comm);
  swap_leading_dims(TensorView(const_cast<float*>(full), {tk.B, sigma_, tk.nr * width}, DType::F32),
                    send.view());
  sp_->reduce_scatter(send.data(), local, tk.n * width, DType::F32);
}

void TpSpLayout::layer_forward(int l, block::LayerSaved& s, Tensor& x, Tensor& xn,
                               const Tokens& tk) {
  const ParamIndex::Layer& P = idx_.layers[l];
  const block::AttnDims ad = attn_dims();
  const int64_t n = tk.n, h = config_.hidden_size;
  const float eps = static_cast<float>(config_.rms_norm_eps);

  copy(x, s.x);
  rmsnorm_forward(s.x.f32(), store_.w(P.input_norm), xn.f32(), s.rstd1.f32(), n, h, eps);
  if (sigma_ == 1) {
    block::qkv_forward(ad, attn_weights(P), xn.f32(), tk.tok_pos.data(), n, s.q.f32(), s.k.f32(),
                       s.v.f32());
  } else {
    Tensor k = Tensor::f32({n, ad.hkv, ad.d}, MemCategory::Workspace);
    Tensor v = Tensor::f32({n, ad.hkv, ad.d}, MemCategory::Workspace);
    block::qkv_forward(ad, attn_weights(P), xn.f32(), tk.tok_pos.data(), n, s.q.f32(), k.f32(),
                       v.f32());
    gather_kv(k.f32(), s.k.f32(), tk, ad.kv_width());
    gather_kv(v.f32(), s.v.f32(), tk, ad.kv_width());
  }
  block::attention_forward(ad, tk.B, tk.nr, tk.S, s.q.f32(), s.k.f32(), s.v.f32(), tk.q_pos.data(),
                           tk.k_pos.data(), s.o.f32(), s.lse.f32());
  copy(s.x, s.x2);
  row_parallel_add(s.x2.f32(), n,
                   [&](float* y) { block::out_proj_forward(ad, store_.w(P.wo), s.o.f32(), n, y); });
  rmsnorm_forward(s.x2.f32(), store_.w(P.post_norm), xn.f32(), s.rstd2.f32(), n, h, eps);
  copy(s.x2, x);
  row_parallel_add(x.f32(), n,
                   [&](float* y) { block::mlp_forward(mlp_weights(P), h, xn.f32(), n, y); });
}

void TpSpLayout::layer_backward(int l, block::LayerSaved& s, Tensor& dx, Tensor& xn,
                                const Tokens& tk) {
  const ParamIndex::Layer& P = idx_.layers[l];
  const block::AttnDims ad = attn_dims();
  const int64_t n = tk.n, h = config_.hidden_size;
  GradStage gs(store_, {P.input_norm, P.wq, P.wk, P.wv, P.wo, P.post_norm, P.wg, P.wu, P.wd},
               /*staged=*/sigma_ > 1);
  Tensor dxn = Tensor::f32({n, h}, MemCategory::Workspace);

  // MLP sub-block: x' = x2 + mlp(norm2(x2)); dx holds d x', becomes d x2.
  block::rmsnorm_apply(s.x2.f32(), store_.w(P.post_norm), s.rstd2.f32(), xn.f32(), n, h);
  dxn.zero();
  block::mlp_backward(mlp_weights(P), {gs.g(P.wg), gs.g(P.wu), gs.g(P.wd)}, h, xn.f32(), dx.f32(),
                      n, dxn.f32());
  if (T_ > 1) tp_->all_reduce(dxn.data(), dxn.numel(), DType::F32);  // f's dual
  block::rmsnorm_backward_add(dxn.f32(), s.x2.f32(), store_.w(P.post_norm), s.rstd2.f32(), dx.f32(),
                              gs.g(P.post_norm), n, h);

  // Attention sub-block: x2 = x + attn(norm1(x))·woᵀ; dx becomes d x.
  Tensor d_o = Tensor::f32({n, ad.hq, ad.d}, MemCategory::Workspace);
  block::out_proj_backward(ad, store_.w(P.wo), s.o.f32(), dx.f32(), n, d_o.f32(), gs.g(P.wo));
  // Tensors are zeroed by allocation: dq, dk, dv accumulate from 0.
  Tensor dq = Tensor::f32({n, ad.hq, ad.d}, MemCategory::Workspace);
  Tensor dk = Tensor::f32({tk.B * tk.S, ad.hkv, ad.d},
                          MemCategory::Workspace);  // all keys
  Tensor dv = Tensor::f32({tk.B * tk.S, ad.hkv, ad.d}, MemCategory::Workspace);
  block::attention_backward(ad, tk.B, tk.nr, tk.S, s.q.f32(), s.k.f32(), s.v.f32(), tk.q_pos.data(),
                            tk.k_pos.data(), s.o.f32(), s.lse.f32(), d_o.f32(), dq.f32(), dk.f32(),
                            dv.f32());
  d_o = Tensor();
  if (sigma_ > 1) {  // this rank's keys' gradients, summed over every rank's queries
    Tensor dk_local = Tensor::f32({n, ad.hkv, ad.d}, MemCategory::Workspace);
    Tensor dv_local = Tensor::f32({n, ad.hkv, ad.d}, MemCategory::Workspace);
    scatter_dkv(dk.f32(), dk_local.f32(), tk, ad.kv_width());
    scatter_dkv(dv.f32(), dv_local.f32(), tk, ad.kv_width());
    dk = std::move(dk_local);
    dv = std::move(dv_local);
  }
  block::rmsnorm_apply(s.x.f32(), store_.w(P.input_norm), s.rstd1.f32(), xn.f32(), n, h);
  dxn.zero();
  block::qkv_backward(ad, attn_weights(P), {gs.g(P.wq), gs.g(P.wk), gs.g(P.wv), nullptr}, xn.f32(),
                      tk.tok_pos.data(), n, dq.f32(), dk.f32(), dv.f32(), dxn.f32());
  if (T_ > 1) tp_->all_reduce(dxn.data(), dxn.numel(), DType::F32);  // f's dual
  block::rmsnorm_backward_add(dxn.f32(), s.x.f32(), store_.w(P.input_norm), s.rstd1.f32(), dx.f32(),
                              gs.g(P.input_norm), n, h);
  gs.reduce_into_store(*sp_);
}

// Vocabulary-parallel cross-entropy of this rank's n tokens against its rows
// [v0, v0 + V/T) of the LM head. Logits exist only as a [kTokenChunk, V/T]
// workspace. Pass 1 folds each chunk into per-token (max, sum-exp, target
// logit); the T ranks' statistics are all-gathered and merged in rank order, so
// every TP rank holds the same full-vocabulary softmax statistics and loss.
// When dxn is non-null, pass 2 recomputes the local logits, turns them into
// dlogits and writes this shard's part of dxn [n, h] (=; the caller all-reduces
// it over T) and dw [V/T, h] (+=).
double TpSpLayout::vocab_parallel_loss(const float* xn, const float* w, const Tokens& tk,
                                       float grad_scale, float* dxn, float* dw) {
  const int64_t n = tk.n, h = config_.hidden_size, Vs = config_.vocab_size / T_;
  const int64_t rows = std::min(n, block::kTokenChunk);
  Tensor logits = Tensor::f32({rows, Vs}, MemCategory::Workspace);
  // stats [3, n]: running max, running sum of exp(logit - max), target logit (0
  // unless the label is in this shard, so the sum over ranks is exactly the
  // target logit).
  Tensor stats = Tensor::f32({3, n}, MemCategory::Comm);
  float* run_max = stats.f32();
  float* run_sum = run_max + n;
  float* target = run_sum + n;
  std::fill(run_max, run_max + n, -std::numeric_limits<float>::infinity());
  std::fill(run_sum, run_sum + 2 * n, 0.f);  // sums and targets
  for (int64_t t0 = 0; t0 < n; t0 += block::kTokenChunk) {
    const int64_t m = std::min(block::kTokenChunk, n - t0);
    linear_forward(xn + t0 * h, w, logits.f32(), m, h, Vs);
    online_softmax_update(logits.f32(), tk.labels.data() + t0, run_max + t0, run_sum + t0,
                          target + t0, m, Vs, v0_);
  }
  Tensor all = Tensor::f32({T_, 3, n}, MemCategory::Comm);
  tp_->all_gather(stats.data(), all.data(), 3 * n, DType::F32);
  const float* a0 = all.f32();
  std::copy(a0, a0 + 3 * n, stats.f32());
  for (int r = 1; r < T_; ++r) {
    const float* ar = all.f32() + r * 3 * n;
    online_softmax_merge(run_max, run_sum, ar, ar + n, n);
    add_inplace(target, ar + 2 * n, n);
  }
  all = Tensor();
  double loss = 0;
  for (int64_t i = 0; i < n; ++i)
    loss += static_cast<double>(run_max[i]) + std::log(static_cast<double>(run_sum[i])) -
            static_cast<double>(target[i]);
  if (!dxn) return loss;

  for (int64_t t0 = 0; t0 < n; t0 += block::kTokenChunk) {
    const int64_t m = std::min(block::kTokenChunk, n - t0);
    linear_forward(xn + t0 * h, w, logits.f32(), m, h, Vs);
    // dlogits overwrite the logits in place (each element is read before it is
    // written).
    online_softmax_backward(logits.f32(), tk.labels.data() + t0, run_max + t0, run_sum + t0,
                            logits.f32(), m, Vs, v0_, grad_scale);
    std::fill(dxn + t0 * h, dxn + (t0 + m) * h, 0.f);
    linear_backward(logits.f32(), xn + t0 * h, w, dxn + t0 * h, dw, m, h, Vs);
  }
  return loss;
}

double TpSpLayout::run(const ReplicaBatch& rb, bool backward) {
  const LlamaConfig& c = config_;
  const Tokens tk = take_tokens(rb);
  const int64_t n = tk.n, h = c.hidden_size, Vs = c.vocab_size / T_;
  const int L = static_cast<int>(c.num_hidden_layers);
  const float eps = static_cast<float>(c.rms_norm_eps);
  const CommStats run_start = snapshot();
  traffic_ = TpSpTraffic{};
  traffic_.layer_forward.resize(L);
  traffic_.layer_backward.resize(L);
  CommStats mark = snapshot();
  auto lap = [&]() {  // traffic since the previous lap
    const CommStats now = snapshot();
    const CommStats d = now - mark;
    mark = now;
    return d;
  };

  // Embedding: vocabulary-parallel lookup (rows outside [v0, v0 + V/T) stay 0),
  // summed over T.
  Tensor x = Tensor::f32({n, h}, MemCategory::Workspace);   // residual stream (zeroed)
  Tensor xn = Tensor::f32({n, h}, MemCategory::Workspace);  // normed input of a sub-block
  embedding_forward(tk.ids.data(), store_.w(idx_.embed), x.f32(), n, h, v0_, Vs);
  if (T_ > 1) tp_->all_reduce(x.data(), x.numel(), DType::F32);
  traffic_.head_forward += lap();

  // Forward-only keeps one layer's activations at a time; backward keeps all L.
  std::vector<block::LayerSaved> saved(backward ? L : 1);
  for (int l = 0; l < L; ++l) {
    block::LayerSaved& s = saved[backward ? l : 0];
    if (s.x.empty()) allocate_saved(s, tk);
    layer_forward(l, s, x, xn, tk);
    traffic_.layer_forward[l] = lap();
  }

  // Final norm and loss head. With Σ > 1 their gradients (and the embedding's,
  // which the tied head shares) are partial sums over tokens: staged and
  // all-reduced over Σ at the end.
  Tensor rstd_f = Tensor::f32({n}, MemCategory::Activations);
  rmsnorm_forward(x.f32(), store_.w(idx_.final_norm), xn.f32(), rstd_f.f32(), n, h, eps);
  std::vector<int> outer = {idx_.embed, idx_.final_norm};
  if (!c.tie_word_embeddings) outer.push_back(idx_.lm_head);
  GradStage gs(store_, backward ? outer : std::vector<int>{}, backward && sigma_ > 1);
  Tensor dxn = backward ? Tensor::f32({n, h}, MemCategory::Workspace) : Tensor();
  float* dw_head = backward ? gs.g(head_param()) : nullptr;
  const double loss = T_ == 1
                          ? block::lm_head_loss(xn.f32(), store_.w(head_param()), tk.labels.data(),
                                                n, h, c.vocab_size, rb.grad_scale,
                                                backward ? dxn.f32() : nullptr, dw_head)
                          : vocab_parallel_loss(xn.f32(), store_.w(head_param()), tk, rb.grad_scale,
                                                backward ? dxn.f32() : nullptr, dw_head);
  traffic_.head_forward += lap();
  // Every TP rank computed the same loss of this token shard: count it once.
  const double local_loss = t_ == 0 ? loss : 0.0;
  if (!backward) {
    group().stats() += snapshot() - run_start;
    return local_loss;
  }

  Tensor dx = Tensor::f32({n, h}, MemCategory::Workspace);  // d residual stream (zeroed)
  if (T_ > 1) tp_->all_reduce(dxn.data(), dxn.numel(), DType::F32);
  block::rmsnorm_backward_add(dxn.f32(), x.f32(), store_.w(idx_.final_norm), rstd_f.f32(), dx.f32(),
                              gs.g(idx_.final_norm), n, h);
  dxn = Tensor();
  traffic_.head_backward += lap();
  for (int l = L - 1; l >= 0; --l) {
    layer_backward(l, saved[l], dx, xn, tk);
    saved[l] = block::LayerSaved();  // this layer's activations are no longer needed
    traffic_.layer_backward[l] = lap();
  }
  embedding_backward(tk.ids.data(), dx.f32(), gs.g(idx_.embed), n, h, v0_, Vs);
  gs.reduce_into_store(*sp_);
  traffic_.head_backward += lap();
  // The sub-communicators' traffic is the layout group's traffic (what
  // group().stats() reports).
  group().stats() += snapshot() - run_start;
  return local_loss;
}

std::unique_ptr<Layout> make(const std::string& name, const LlamaConfig& c, const ParallelConfig& p,
                             Communicator& world) {
  return std::unique_ptr<Layout>(new TpSpLayout(name, c, p, world));
}

const LayoutRegistration kRegisterTp(
    "tp",
    "Megatron tensor parallelism over D ranks: q,k,v,gate,up by rows, o,down by columns, "
    "vocabulary-parallel embedding and cross-entropy; tokens replicated",
    [](const LlamaConfig& c, const ParallelConfig& p, Communicator& w) {
      return make("tp", c, p, w);
    });
const LayoutRegistration kRegisterSp(
    "sp",
    "sequence parallelism over D ranks: weights replicated, zigzag "
    "tokens, K/V all-gathered",
    [](const LlamaConfig& c, const ParallelConfig& p, Communicator& w) {
      return make("sp", c, p, w);
    });
const LayoutRegistration kRegisterTpSp("tp-sp",
                                       "--tp T-way tensor parallelism inside groups, D/T-way "
                                       "sequence parallelism across them",
                                       [](const LlamaConfig& c, const ParallelConfig& p,
                                          Communicator& w) { return make("tp-sp", c, p, w); });

}  // namespace

const TpSpTraffic* tp_sp_traffic(const Layout& layout) {
  const auto* l = dynamic_cast<const TpSpLayout*>(&layout);
  return l ? &l->traffic() : nullptr;
}

TpSpDegrees tp_sp_degrees(const Layout& layout) {
  const auto* l = dynamic_cast<const TpSpLayout*>(&layout);
  TSP_CHECK(l, "layout '{}' is not tp, sp or tp-sp", layout.name());
  return l->degrees();
}

}  // namespace tsp
