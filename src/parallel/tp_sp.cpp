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
// all-gather. Under --recompute full only each layer's input is kept and the
// backward replays the layer's forward, all-reduces and K/V all-gathers
// included (layout_common.h), counted in the layer's backward traffic.
//
// Mixed precision (bf16 compute dtype): the activations (x, xn, q, k, v, o)
// and the K/V all-gathers are bf16; the softmax statistics and their gather,
// every gradient and every reduction are fp32. A row-parallel projection's
// partial sum is produced in an fp32 buffer, all-reduced in fp32 and added into
// the bf16 residual once, so each sub-block output is rounded once, as in
// single.
//
// The order of the pieces is the layer recipe of layout_common.h; this file
// implements its hooks. At D = 1 it runs exactly the single layout's operations
// (no staging, no communication): bitwise equal, in fp32 and in bf16.
// Communication per block and per rank in closed form: docs/communication.md.
#include "parallel/tp_sp.h"

#include <algorithm>
#include <limits>

#include <fmt/format.h>

#include "infer/engines.h"
#include "parallel/layout_common.h"
#include "parallel/mappings.h"
#include "parallel/registry.h"
#include "plan/model_util.h"
#include "tsp/model/block.h"

namespace tsp {

TpSpCoords tp_sp_coords(int group_rank, int D, int T) {
  TSP_CHECK(T >= 1 && D >= 1 && D % T == 0, "a TP×SP group of D={} ranks cannot have T={}", D, T);
  TSP_CHECK(0 <= group_rank && group_rank < D, "rank {} is outside a group of {}", group_rank, D);
  return {group_rank % T, group_rank / T};
}

namespace {

constexpr MemCategory kWork = MemCategory::Workspace;
constexpr int32_t kIgnoreIndex = block::kIgnoreIndex;  // labels that count neither in the loss
                                                       // nor its gradient

// Where backward writes a set of parameters' gradients when Σ > 1. Each
// sequence shard computes a partial gradient from its own tokens: the partials
// go to one packed, zeroed F32 buffer, are all-reduced over Σ in one call and
// then added to the store. Staging, rather than all-reducing the store in
// place, keeps what earlier calls accumulated out of the sum (it is already
// identical on every σ), so gradient accumulation stays exact.
class GradStage {
 public:
  // Stage `params` (their gradients' shapes, packed in this order), zeroed. The
  // buffer (MemCategory::Comm) is allocated on first use and reused while the
  // size is the same (every layer's set is).
  void stage(Backend& be, const ShardStore& store, const std::vector<int>& params) {
    params_ = params;
    views_.clear();
    int64_t total = 0;
    std::vector<int64_t> offsets;
    for (int p : params_) {
      offsets.push_back(total);
      total += store.g(p).numel();
    }
    if (buf_.empty() || buf_.numel() != total) {
      buf_ = Tensor();
      buf_ = Tensor::f32({total}, MemCategory::Comm, be.device());
    }
    be.zero(buf_.view());
    for (size_t i = 0; i < params_.size(); ++i)
      views_.push_back(buf_.window(offsets[i], store.g(params_[i]).shape()));
  }
  // The staged gradient of `param`; empty when it is not staged here.
  TensorView find(int param) const {
    for (size_t i = 0; i < params_.size(); ++i)
      if (params_[i] == param) return views_[i];
    return {};
  }
  // Sum the partials over the SP group and add them to the store.
  void reduce_into_store(Backend& be, Communicator& sp, const ShardStore& store) {
    all_reduce_sum(be, sp, buf_.view());
    for (size_t i = 0; i < params_.size(); ++i) be.add(store.g(params_[i]), views_[i]);
  }
  void release() {
    params_.clear();
    views_.clear();
    buf_ = Tensor();
  }

 private:
  std::vector<int> params_;
  std::vector<TensorView> views_;
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
    ad_ = block::attn_dims(config_, hg_.hq(), hg_.hkv());
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
    allocate_store();
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
  // ---- tokens: zigzag chunks s and 2Σ-1-s of every row (all of them under tp) ----
  int token_parts() const override { return sigma_; }
  int token_index() const override { return s_; }
  void check_batch(const ReplicaBatch& rb) const override {
    if (sigma_ == 1 || rb.S % (2 * sigma_) == 0) return;
    if (name() == "sp") check_zigzag(rb.S, sigma_);  // its message speaks of D = Σ
    TSP_FAIL(
        "tp-sp: sequence length S={} cannot be cut into 2Σ={} equal zigzag chunks "
        "(Σ = D/T = {}/{} = {} sequence shards); use S a multiple of {}, or a --tp that leaves "
        "fewer sequence shards",
        rb.S, 2 * sigma_, D(), T_, sigma_, 2 * sigma_);
  }
  // Every TP rank computes the same loss of its token shard: count it once.
  bool counts_loss() const override { return t_ == 0; }

  // Saving policy of block.h, except that K and V are kept as gathered: every
  // key of the rows, [B·S, hkv/T, d].
  void allocate_saved(block::LayerSaved& s, const LocalTokens& t) const override {
    constexpr MemCategory A = MemCategory::Activations;
    const int64_t n = t.n, h = config_.hidden_size, d = ad_.d, keys = t.B * t.S;
    const DType act = act_dtype();
    const Device dev = device();
    s.x = Tensor({n, h}, act, A, dev);
    s.rstd1 = Tensor::f32({n}, A, dev);
    s.q = Tensor({n, ad_.hq, d}, act, A, dev);
    s.k = Tensor({keys, ad_.hkv, d}, act, A, dev);
    s.v = Tensor({keys, ad_.hkv, d}, act, A, dev);
    s.o = Tensor({n, ad_.hq, d}, act, A, dev);
    s.lse = Tensor::f32({n, ad_.hq}, A, dev);
    s.x2 = Tensor({n, h}, act, A, dev);
    s.rstd2 = Tensor::f32({n}, A, dev);
  }

  // ---- embedding ----
  // x [n, h] (=): vocabulary-parallel lookup (this rank's rows [v0, v0 + V/T),
  // zeros elsewhere), summed over T. all_reduce_sum sums in fp32 (a bf16 x is
  // widened into an fp32 buffer and rounded once: one non-zero term per
  // element, so the lookup is exact).
  void embed_forward(const LocalTokens& t, TensorView x) override {
    start_traffic();
    if (T_ == 1) {
      be_.embedding_forward(t.ids.view(), store_.w(idx_.embed), x, /*v0=*/0);
      return;
    }
    be_.zero(x);
    be_.embedding_forward(t.ids.view(), store_.w(idx_.embed), x, v0_);
    all_reduce_sum(be_, *tp_, x);
  }
  // dx F32 [n, h] is replicated over T: each rank adds the rows of its ids.
  void embed_backward(const LocalTokens& t, TensorView dx) override {
    be_.embedding_backward(t.ids.view(), dx, grad(idx_.embed), v0_);
  }

  // ---- attention: q, k, v of head group t; K, V all-gathered over Σ; o·Wo_tᵀ all-reduced over T
  void attention_forward(int l, const LocalTokens& t, TensorView xn,
                         block::LayerSaved& s) override {
    const ParamIndex::Layer& P = idx_.layers[l];
    if (sigma_ == 1) {
      block::qkv_forward(be_, ad_, attn_weights(P), xn, t.tok_pos.view(), s.q.view(), s.k.view(),
                         s.v.view());
    } else {  // this rank's keys and values, then every row's keys of the Σ ranks
      Tensor k({t.n, ad_.hkv, ad_.d}, act_dtype(), kWork, device());
      Tensor v({t.n, ad_.hkv, ad_.d}, act_dtype(), kWork, device());
      block::qkv_forward(be_, ad_, attn_weights(P), xn, t.tok_pos.view(), s.q.view(), k.view(),
                         v.view());
      Tensor staging;
      gather_sequence(be_, *sp_, t, k.view(), s.k.view(), staging);
      gather_sequence(be_, *sp_, t, v.view(), s.v.view(), staging);
    }
    block::attention_forward(be_, ad_, t.B, s.q.view(), s.k.view(), s.v.view(), t.q_pos.view(),
                             t.k_pos.view(), s.o.view(), s.lse.view(), t.doc_pos());
    row_parallel_add(s.x2.view(), [&](TensorView y) {  // Megatron's g
      block::out_proj_forward(be_, store_.w(P.wo), s.o.view(), y);
    });
  }
  void attention_backward(int l, const LocalTokens& t, TensorView xn, const block::LayerSaved& s,
                          TensorView dx, TensorView dxn) override {
    const ParamIndex::Layer& P = idx_.layers[l];
    const Device dev = device();
    // g's dual is the identity: dx is the same on every TP rank.
    Tensor d_o = Tensor::f32(s.q.shape(), kWork, dev);
    block::out_proj_backward(be_, store_.w(P.wo), s.o.view(), dx, d_o.view(), grad(P.wo));
    Tensor dq = Tensor::zeros(s.q.shape(), DType::F32, kWork, dev);
    Tensor dk = Tensor::zeros(s.k.shape(), DType::F32, kWork, dev);  // every key of the rows
    Tensor dv = Tensor::zeros(s.v.shape(), DType::F32, kWork, dev);
    block::attention_backward(be_, ad_, t.B, s.q.view(), s.k.view(), s.v.view(), t.q_pos.view(),
                              t.k_pos.view(), s.o.view(), s.lse.view(), d_o.view(), dq.view(),
                              dk.view(), dv.view(), t.doc_pos());
    d_o = Tensor();
    if (sigma_ > 1) {  // this rank's keys' gradients, summed over every rank's queries
      Tensor dk_local = Tensor::f32({t.n, ad_.hkv, ad_.d}, kWork, dev);
      Tensor dv_local = Tensor::f32({t.n, ad_.hkv, ad_.d}, kWork, dev);
      Tensor staging;
      reduce_scatter_sequence(be_, *sp_, t, dk.view(), dk_local.view(), staging);
      reduce_scatter_sequence(be_, *sp_, t, dv.view(), dv_local.view(), staging);
      dk = std::move(dk_local);
      dv = std::move(dv_local);
    }
    block::qkv_backward(be_, ad_, attn_weights(P), {grad(P.wq), grad(P.wk), grad(P.wv), {}}, xn,
                        t.tok_pos.view(), dq.view(), dk.view(), dv.view(), dxn);
    if (T_ > 1) all_reduce_sum(be_, *tp_, dxn);  // f's dual
  }

  // ---- MLP: FFN slice t, its output all-reduced over T ----
  int64_t mlp_slice_rows() const override { return config_.intermediate_size / T_; }
  void mlp_forward(int l, const LocalTokens&, TensorView xn, TensorView x,
                   block::LayerSaved& s) override {
    const ParamIndex::Layer& P = idx_.layers[l];
    row_parallel_add(x, [&](TensorView y) {  // Megatron's g
      block::mlp_forward(be_, mlp_weights(P), xn, y, s.mlp());
    });
  }
  void mlp_backward(int l, const LocalTokens&, TensorView xn, TensorView dy, TensorView dxn,
                    const block::LayerSaved& s) override {
    const ParamIndex::Layer& P = idx_.layers[l];
    block::mlp_backward(be_, mlp_weights(P), {grad(P.wg), grad(P.wu), grad(P.wd)}, xn, dy, dxn,
                        s.mlp());
    if (T_ > 1) all_reduce_sum(be_, *tp_, dxn);  // f's dual
  }

  // ---- loss head ----
  void head_loss(const LocalTokens& t, TensorView xn, float grad_scale, TensorView loss,
                 TensorView dxn) override {
    const bool backward = !dxn.empty();
    if (backward && sigma_ > 1) {  // partial sums over this shard's tokens, reduced in end_backward
      std::vector<int> outer = {idx_.embed, idx_.final_norm};
      if (!config_.tie_word_embeddings) outer.push_back(idx_.lm_head);
      outer_stage_.stage(be_, store_, outer);
    }
    const TensorView dw = backward ? grad(head_param()) : TensorView();
    if (T_ == 1) {
      block::lm_head_loss(be_, xn, store_.w(head_param()), t.labels.view(), grad_scale, loss, dxn,
                          dw);
      return;
    }
    vocab_parallel_loss(t, xn, grad_scale, loss, dxn, dw);
  }

  // ---- gradients: staged and all-reduced over Σ (the store itself when Σ = 1) ----
  TensorView grad_target(int param) override { return grad(param); }
  void begin_layer_backward(int l) override {
    if (sigma_ == 1) return;
    const ParamIndex::Layer& P = idx_.layers[l];
    layer_stage_.stage(be_, store_,
                       {P.input_norm, P.wq, P.wk, P.wv, P.wo, P.post_norm, P.wg, P.wu, P.wd});
  }
  void end_layer_backward(int l) override {
    if (sigma_ == 1) return;
    layer_stage_.reduce_into_store(be_, *sp_, store_);
    if (l == 0) layer_stage_.release();
  }
  // The embedding's, final norm's and LM head's partial gradients.
  void end_backward(const LocalTokens&) override {
    if (sigma_ == 1) return;
    outer_stage_.reduce_into_store(be_, *sp_, store_);
    outer_stage_.release();
  }

  // ---- traffic records: one lap of the TP and SP sub-communicators per part ----
  void part_done(Part part, int layer) override {
    const CommStats d = lap();
    switch (part) {
      case Part::EmbeddingForward:
      case Part::HeadForward:
        traffic_.head_forward += d;
        break;
      case Part::LayerForward:
        traffic_.layer_forward[layer] = d;
        break;
      case Part::LayerBackward:
        traffic_.layer_backward[layer] = d;
        break;
      case Part::HeadBackward:
      case Part::EmbeddingBackward:
      case Part::End:
        traffic_.head_backward += d;
        break;
    }
  }

 private:
  void check_tensor_split(const std::string& name) const;
  // Where backward accumulates a parameter's gradient: its staged partial when
  // staged, else the store.
  TensorView grad(int param) const {
    if (TensorView g = layer_stage_.find(param); !g.empty()) return g;
    if (TensorView g = outer_stage_.find(param); !g.empty()) return g;
    return store_.g(param);
  }
  block::AttnWeights attn_weights(const ParamIndex::Layer& P) const {
    return {store_.w(P.wq), store_.w(P.wk), store_.w(P.wv), store_.w(P.wo)};
  }
  block::MlpWeights mlp_weights(const ParamIndex::Layer& P) const {
    return {store_.w(P.wg), store_.w(P.wu), store_.w(P.wd)};
  }

  // y [n, h] (+=) the all-reduced output of a row-parallel projection. At T = 1
  // the block adds straight into the residual (as single does); at T > 1 the
  // partial sum is produced in an fp32 buffer, all-reduced in fp32 and added
  // into y once (one rounding of a bf16 residual).
  template <typename F>
  void row_parallel_add(TensorView y, F&& partial) {
    if (T_ == 1) {
      partial(y);
      return;
    }
    Tensor part = Tensor::zeros(y.shape(), DType::F32, MemCategory::Comm, device());
    partial(part.view());
    all_reduce_sum(be_, *tp_, part.view());
    be_.add(y, part.view());
  }

  void vocab_parallel_loss(const LocalTokens& t, TensorView xn, float grad_scale, TensorView loss,
                           TensorView dxn, TensorView dw);

  CommStats snapshot() const {
    CommStats s = tp_->stats();
    s += sp_->stats();
    return s;
  }
  void start_traffic() {
    const size_t L = static_cast<size_t>(config_.num_hidden_layers);
    traffic_ = TpSpTraffic{};
    traffic_.layer_forward.resize(L);
    traffic_.layer_backward.resize(L);
    mark_ = snapshot();
  }
  // Traffic since the previous lap; also counted in the layout group's stats
  // (the sub-communicators' traffic is the group's traffic).
  CommStats lap() {
    const CommStats now = snapshot();
    const CommStats d = now - mark_;
    mark_ = now;
    group().stats() += d;
    return d;
  }

  int T_ = 1, sigma_ = 1, t_ = 0, s_ = 0;
  int64_t v0_ = 0;  // first vocabulary id of this rank's embedding / LM head rows
  HeadGroup hg_;
  block::AttnDims ad_;
  std::unique_ptr<Communicator> tp_, sp_;
  GradStage layer_stage_, outer_stage_;
  TpSpTraffic traffic_;
  CommStats mark_;
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

// Vocabulary-parallel cross-entropy of this rank's n tokens against its rows
// [v0, v0 + V/T) of the LM head (T > 1). Logits exist only as a
// [token_chunk, V/T] F32 workspace. Pass 1 folds each chunk into per-token
// (max, sum-exp, target logit); the T ranks' statistics (F32 in every compute
// dtype) are all-gathered and merged in rank order, so every TP rank holds the
// same full-vocabulary softmax statistics and loss (labels equal to
// kIgnoreIndex count for nothing). When dxn is non-empty, pass 2 recomputes the
// local logits, turns them into dlogits and writes this shard's part of dxn
// [n, h] (=), all-reduced over T (f's dual), and dw [V/T, h] (+=).
void TpSpLayout::vocab_parallel_loss(const LocalTokens& t, TensorView xn, float grad_scale,
                                     TensorView loss, TensorView dxn, TensorView dw) {
  const int64_t n = t.n, h = config_.hidden_size, Vs = config_.vocab_size / T_;
  const TensorView w = store_.w(head_param());
  const Device dev = device();
  const int64_t rows_at_once = block::token_chunk(dev.kind);
  Tensor logits = Tensor::f32({std::min(n, rows_at_once), Vs}, kWork, dev);
  // stats [3, n]: running max, running sum of exp(logit - max), target logit
  // (0 unless the label is in this shard, so the sum over ranks is exactly the
  // target logit).
  Tensor stats = Tensor::f32({3, n}, MemCategory::Comm, dev);
  const TensorView row_max = stats.window(0, {n}), row_sum = stats.window(n, {n}),
                   target = stats.window(2 * n, {n});
  be_.fill(row_max, -std::numeric_limits<float>::infinity());
  be_.zero(stats.window(n, {2 * n}));  // sums and targets
  for (int64_t t0 = 0; t0 < n; t0 += rows_at_once) {
    const int64_t m = std::min(rows_at_once, n - t0);
    const TensorView lv = logits.window(0, {m, Vs});
    be_.linear_forward(xn.window(t0 * h, {m, h}), w, lv, /*accumulate=*/false);
    be_.online_softmax_update(lv, t.labels.window(t0, {m}), row_max.window(t0, {m}),
                              row_sum.window(t0, {m}), target.window(t0, {m}), v0_);
  }
  {
    Tensor all = Tensor::f32({T_, 3, n}, MemCategory::Comm, dev);
    tp_->all_gather(stats.data(), all.data(), 3 * n, DType::F32);
    be_.copy(all.window(0, {3 * n}), stats.view());
    for (int r = 1; r < T_; ++r) {
      const int64_t o = r * 3 * n;
      be_.online_softmax_merge(row_max, row_sum, all.window(o, {n}), all.window(o + n, {n}));
      be_.add(target, all.window(o + 2 * n, {n}));
    }
  }
  be_.online_softmax_loss(row_max, row_sum, target, t.labels.view(), loss, kIgnoreIndex);
  if (dxn.empty()) return;

  for (int64_t t0 = 0; t0 < n; t0 += rows_at_once) {
    const int64_t m = std::min(rows_at_once, n - t0);
    const TensorView lv = logits.window(0, {m, Vs}), x = xn.window(t0 * h, {m, h}),
                     dx = dxn.window(t0 * h, {m, h});
    be_.linear_forward(x, w, lv, /*accumulate=*/false);
    // dlogits overwrite the logits in place (each element is read before it is
    // written).
    be_.online_softmax_backward(lv, t.labels.window(t0, {m}), row_max.window(t0, {m}),
                                row_sum.window(t0, {m}), lv, v0_, grad_scale, kIgnoreIndex);
    be_.zero(dx);
    be_.linear_backward(lv, x, w, dx, dw);
  }
  // The d(xn) all-reduce belongs to the backward in the traffic records, though
  // the recipe runs it inside the loss head.
  traffic_.head_forward += lap();
  all_reduce_sum(be_, *tp_, dxn);  // f's dual
  traffic_.head_backward += lap();
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
// Inference for tp (Megatron, src/infer/tensor_parallel.cpp) and sp (sequence-sharded KV cache,
// src/infer/seq_sharded.cpp); tp-sp has no engine.
const EngineRegistration kRegisterTpEngine("tp", infer::make_tp_engine);
const EngineRegistration kRegisterSpEngine("sp", infer::make_sp_engine);

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

// ---- The model of this layout for the planner ---------------------------------------------------
//
// The models of tp, sp and tp-sp (src/parallel/tp_sp.cpp): T tensor ranks (Megatron column/row
// parallel, heads and FFN columns split) times Σ sequence ranks (zigzag token chunks, K/V
// all-gathered, weights replicated over Σ). tp is T = D, Σ = 1; sp is T = 1, Σ = D; tp-sp numbers
// T fastest inside the group.
//
// Registered with the layout's name: src/plan asks it (include/tsp/plan/layout_model.h)
// instead of comparing names, so the layout, its algorithm and its formulas live in one file.
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
      // forward 2, backward 2, each on the critical path (a full recomputation's replay of the
      // forward's 2 is added by estimate())
      const int count = in.train ? 4 : 2;
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
    const int64_t r = std::min(n, in.target.token_chunk());  // rows at once
    // Saved: K/V of the whole rows (gathered over Σ) when Σ > 1, and under none the normed inputs
    // and the MLP activations of the rank's FFN shard; under full recomputation checkpoints and
    // one whole set (LocalInputs::saved_through). The final norm's rstd.
    const int64_t set = saved_bytes(s, n, hq, hkv, sg > 1 ? all : n, e) + in.kept(n, h, Ft),
                  checkpoint = e.act * n * h;
    const int64_t act = in.saved_through(s.L - 1, set, checkpoint) + kF32 * n;
    const int64_t act_head = in.saved_all(s.L, set, checkpoint) + kF32 * n;
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
    // loss head (forward): one [r, V/T] logits chunk; T > 1: statistics; T = 1 (block's
    // lm_head_loss) cross_entropy's per-row loss (CUDA). (T > 1: online_softmax_loss's per-row
    // loss on CUDA, 8n, comes after the [T, 3, n] statistics, 12·n·T bytes, are freed.)
    out.push_back({act_head, outer_stage + (t > 1 ? kF32 * (3 * n + 3 * n * t) : 0),
                   tokens + 2 * e.act * n * h + kF32 * n * h + kF32 * r * Vt +
                       std::max(e.narrow(r * Vt), t > 1 ? 0 : in.row_loss(r))});
    // Full recomputation: the backward replays each layer's forward with dx and dxn alive. Its
    // busiest points are in the MLP forward: under T > 1 inside row_parallel_add, whose fp32
    // partial sum [n, h] (Comm) holds while mlp_forward's chunk buffers (fp32 gate and up, the
    // activation in the compute dtype) work, and then while the all-reduced sum is added into
    // the residual (under bf16 the CPU backend's add widens the bf16 residual into an fp32 [n, h]
    // temporary: in.add_widening; the CUDA kernel adds in place). Layer L-1's replay precedes the
    // first staging of a layer's gradients; the replays below it find that stage buffer kept
    // (GradStage reuses it). At T = 1 the MLP adds into the bf16 residual itself: under CUDA its
    // down projection widens an [r, h] chunk (in.accumulate_widening), below the MLP backward's
    // chunk buffers at the same saved activations.
    // Layer l's replay comes before its backward (Moment: ties go to the first listed).
    const auto replay = [&](int64_t rl) {
      const int64_t act_rl = in.saved_through(rl, set, checkpoint) + kF32 * n;
      const int64_t comm_rl = (rl == s.L - 1 ? outer_stage : stage) + (t > 1 ? kF32 * n * h : 0);
      out.push_back({act_rl, comm_rl, base + 2 * kF32 * r * Ft + e.act * r * Ft});
      if (t > 1 && in.add_widening(n * h) > 0)
        out.push_back({act_rl, comm_rl, base + in.add_widening(n * h)});
    };
    if (in.recompute == Recompute::Full) replay(s.L - 1);
    // MLP backward chunk buffers (LocalInputs::mlp_backward_work); inside, a dy or da chunk
    // narrowed to bf16 for the GEMMs
    out.push_back(
        {act, stage,
         base + in.mlp_backward_work(r, Ft) + std::max(e.narrow(r * Ft), e.narrow(r * h))});
    out.push_back({act, stage, base + kF32 * n * h});  // rmsnorm_backward_add's temp
    // attention backward (fp32 gradients), in its order: d_o alone, with dy narrowed inside
    // o_proj's backward; d_o, dq, dk and dv of every key, with the attention kernel's transients
    // for one row; after d_o is freed (and dk, dv reduced to the local tokens), dq, dk, dv with dq
    // narrowed for the q projection's backward
    out.push_back({act, stage, base + kF32 * n * qw + e.narrow(n * h)});
    out.push_back({act, stage,
                   base + kF32 * (2 * n * qw + 2 * kv_rows * kw) +
                       in.attention_backward_transient(d, hq, hkv, n / in.Br, kv_rows / in.Br)});
    out.push_back({act, stage, base + kF32 * (n * qw + 2 * n * kw) + e.narrow(n * qw)});
    // reduce-scatter of dV: dq, full dK/dV, dk_local, dv_local, and reduce_scatter_sequence's
    // send buffer when rows must be reordered (B > 1)
    if (sg > 1)
      out.push_back({act, stage + (in.Br > 1 ? kF32 * all * kw : 0),
                     base + kF32 * (n * qw + 2 * all * kw + 2 * n * kw)});
    if (in.recompute == Recompute::Full && s.L >= 2) replay(s.L - 2);  // after layer L-1's backward
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
