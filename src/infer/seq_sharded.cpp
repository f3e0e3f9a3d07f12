// The sp and tsp engines (docs/inference.md): the prompt is zigzag-sharded (split_prompt), each
// rank caches the K/V of its own tokens for ALL heads, and decode tokens' K/V go round-robin, so
// the cache is 1/D per rank. The two differ only in where weights live:
//
//   sp   every rank holds the whole model.
//        prefill: per layer, K/V of the local tokens all-gathered, local queries attend to all.
//        decode : every rank runs the new token through the whole model (replicated, tiny); the
//                 attention over the cache is the one sharded step: partial (o, lse) per rank,
//                 merged exactly over the group.
//   tsp  rank p holds head group p, FFN slice p and vocabulary shard p (embedding and head).
//        prefill: the tsp forward (docs/tsp-schedule.md) with the training layout's schedules
//                 (parallel/tsp_schedule.h): per layer, for r in 0..D-1 the packed attention
//                 shard P_r = [Wq_r; Wk_r; Wv_r; Wo_r] is broadcast by its owner (the next one
//                 prefetched), the local tokens' k,v of head group r are all-gathered,
//                 y += attn·Wo_rᵀ; the MLP and the embedding use rings of their shards. Only the
//                 last position's logits are computed: its owner broadcasts the final hidden
//                 state (h values instead of a ring of V·h weights), each rank scores its
//                 vocabulary shard, all-gather.
//        decode : weight-stationary. Rank p applies head group p to the new token (q, k, v of
//                 its heads, all-gathered: n_h·d + 2·n_kv·d values), attends with ALL heads over
//                 its local cache, the partial attentions are merged with log-sum-exp weights,
//                 rank p projects its head group's output with its Wo_p (all-reduce of h floats),
//                 applies MLP slice p (all-reduce of h) and scores its vocabulary shard
//                 (all-gather of V floats). Only activations move; no weight shard leaves its rank.
//
// Precision: weights, the residual stream, q/k/v/o, K/V in flight and in the cache are in the
// compute dtype; a sub-block's output (attention rounds, ring steps, the partial outputs of the
// group) is summed in an F32 [n, h] buffer (all-reduced in fp32) and added to the residual once;
// lse, the log-sum-exp merge (on an fp32 copy of o) and the logits are fp32.
#include "infer/common.h"
#include "parallel/mappings.h"
#include "parallel/registry.h"
#include "parallel/tsp_schedule.h"
#include "tsp/parallel/sharding.h"

namespace tsp::infer {
namespace {

constexpr MemCategory kWork = MemCategory::Workspace;
constexpr MemCategory kComm = MemCategory::Comm;

class SeqShardedEngine final : public EngineBase {
 public:
  SeqShardedEngine(const LlamaConfig& c, Communicator& world, bool tsp, DType dtype, Device device)
      : EngineBase(tsp ? "tsp" : "sp", c, world, /*one_rank=*/false, dtype, device), tsp_(tsp) {
    const ParamIndex& I = w_.idx();
    if (tsp_) {
      check_heads(config_, D_);
      check_ffn(config_.intermediate_size, D_);
      check_vocab(config_.vocab_size, D_);
      hold_layer_shards();
      w_.hold(I.embed, ShardMap::rows(D_, p_));
      if (!config_.tie_word_embeddings) w_.hold(I.lm_head, ShardMap::rows(D_, p_));
      group_heads_ = head_group(config_, D_, p_);
      const int64_t h = config_.hidden_size, qw = group_heads_.q_rows().size(),
                    kw = group_heads_.kv_rows().size(), f = config_.intermediate_size / D_;
      attn_pack_.shapes = {{qw, h}, {kw, h}, {kw, h}, {h, qw}};
      mlp_pack_.shapes = {{f, h}, {f, h}, {h, f}};
      vocab_pack_.shapes = {{config_.vocab_size / D_, h}};
    } else {
      for (int i = 0; i < static_cast<int>(w_.specs().size()); ++i) hold_whole(i);
      group_heads_ = head_group(config_, 1, 0);
    }
    ad_ = block::attn_dims(config_);
    ad_g_ = block::attn_dims(config_, group_heads_.hq(), group_heads_.hkv());
  }

  std::vector<float> prefill(const std::vector<int32_t>& prompt, int64_t extra) override {
    begin(prompt, extra);
    const LlamaConfig& c = config_;
    const int64_t n_prompt = static_cast<int64_t>(prompt.size()), h = c.hidden_size;
    const float eps = static_cast<float>(c.rms_norm_eps);
    const Device dev = be_.device();
    const PromptSplit sp = split_prompt(n_prompt, D_, p_);
    const int64_t n = sp.n_max, nl = sp.n_local();  // rows computed (padded), tokens owned
    cache_.reset(be_, c.num_hidden_layers, nl + decode_share(extra, D_, p_), c.num_key_value_heads,
                 ad_.d, dtype_, memory_);
    cache_.append(sp.pos);

    std::vector<int32_t> ids_host(nl);
    for (int64_t i = 0; i < nl; ++i) ids_host[i] = prompt[sp.pos[i]];
    const Tensor ids = be_.device_copy(ids_host, kWork);
    Prefill pf(be_, sp, ad_g_, D_, dtype_);
    Tensor x({n, h}, dtype_, kWork, dev);  // residual stream; padding rows 0
    Tensor xn({n, h}, dtype_, kWork, dev);
    Tensor y = Tensor::f32({n, h}, kWork, dev);  // a sub-block's output, summed in fp32
    Tensor rstd = Tensor::f32({n}, kWork, dev);
    be_.zero(x.view());
    embed_prompt(ids.view(), x.slice(0, nl));

    for (int l = 0; l < c.num_hidden_layers; ++l) {
      be_.rmsnorm_forward(x.view(), w_.w(P(l).input_norm), xn.view(), rstd.view(), eps);
      be_.zero(y.view());
      if (tsp_) {
        tsp_attention_rounds(l, pf, xn.view(), y.view());
      } else {
        attention_gathered(attn_weights(l), l, 0, pf, xn.view(), y.view());
      }
      be_.add(x.view(), y.view());
      be_.rmsnorm_forward(x.view(), w_.w(P(l).post_norm), xn.view(), rstd.view(), eps);
      be_.zero(y.view());
      if (tsp_) {
        tsp_mlp_ring(l, xn.view(), y.view());
      } else {
        block::mlp_forward(be_, mlp_weights(l), xn.view(), y.view());
      }
      be_.add(x.view(), y.view());
    }
    // The last position lives on one rank: it sends its final-normed state to all.
    Tensor xn_last({1, h}, dtype_, kWork, dev);
    if (p_ == sp.last_owner)
      be_.rmsnorm_forward(x.slice(sp.last_local, sp.last_local + 1), w_.w(w_.idx().final_norm),
                          xn_last.view(), rstd.slice(0, 1), eps);
    if (D_ > 1) broadcast(*group_, xn_last.view(), sp.last_owner);
    return logits(xn_last.view());
  }

  std::vector<float> decode(int32_t token) override {
    const LlamaConfig& c = config_;
    const int64_t h = c.hidden_size, d = ad_.d;
    const float eps = static_cast<float>(c.rms_norm_eps);
    const Device dev = be_.device();
    const int64_t pos_host = next_decode_position();
    const bool owner = decode_owner(decoded_, D_) == p_;  // this token's K/V stays here
    const int64_t slot = owner ? cache_.append({pos_host}) : -1;
    const Tensor pos = be_.device_copy(std::vector<int64_t>{pos_host}, kWork);

    Tensor x({1, h}, dtype_, kWork, dev);
    Tensor xn({1, h}, dtype_, kWork, dev);
    Tensor y = Tensor::f32({1, h}, kWork, dev);
    Tensor rstd = Tensor::f32({1}, kWork, dev);
    // q, k, v of ALL heads (tsp: assembled from the ranks' head groups), o, lse of all heads.
    Tensor q({1, ad_.hq, d}, dtype_, kWork, dev);
    Tensor k({1, ad_.hkv, d}, dtype_, kWork, dev);
    Tensor v({1, ad_.hkv, d}, dtype_, kWork, dev);
    Tensor o({1, ad_.hq, d}, dtype_, kWork, dev);
    Tensor lse = Tensor::f32({1, ad_.hq}, kWork, dev);
    Tensor qg, kg, vg;  // tsp over D > 1 ranks: this rank's head group
    const bool groups = tsp_ && D_ > 1;
    if (groups) {
      qg = Tensor({1, ad_g_.hq, d}, dtype_, kWork, dev);
      kg = Tensor({1, ad_g_.hkv, d}, dtype_, kWork, dev);
      vg = Tensor({1, ad_g_.hkv, d}, dtype_, kWork, dev);
    }
    GroupMerge merge(be_, *group_, 1, ad_.hq, d, dtype_);
    embed_token(token, x.view());

    for (int l = 0; l < c.num_hidden_layers; ++l) {
      be_.rmsnorm_forward(x.view(), w_.w(P(l).input_norm), xn.view(), rstd.view(), eps);
      if (groups) {  // head groups are contiguous: rank order = head order
        block::qkv_forward(be_, ad_g_, attn_weights(l), xn.view(), pos.view(), qg.view(), kg.view(),
                           vg.view());
        group_->all_gather(qg.data(), q.data(), qg.numel(), dtype_);
        group_->all_gather(kg.data(), k.data(), kg.numel(), dtype_);
        group_->all_gather(vg.data(), v.data(), vg.numel(), dtype_);
      } else {
        block::qkv_forward(be_, ad_, attn_weights(l), xn.view(), pos.view(), q.view(), k.view(),
                           v.view());
      }
      if (owner) cache_.put(l, slot, 0, k.view(), v.view());
      attend_cache(be_, ad_, cache_, l, q.view(), pos.view(), o.view(), lse.view());
      merge.merge(o.view(), lse.view());
      be_.zero(y.view());
      // o of this rank's head group (all heads under sp) times its columns of Wo.
      const int64_t o0 = group_heads_.q.begin * d;
      block::out_proj_forward(be_, w_.w(P(l).wo), o.window(o0, {1, ad_g_.q_width()}), y.view());
      if (tsp_) all_reduce_sum(be_, *group_, y.view());
      be_.add(x.view(), y.view());

      be_.rmsnorm_forward(x.view(), w_.w(P(l).post_norm), xn.view(), rstd.view(), eps);
      be_.zero(y.view());
      block::mlp_forward(be_, mlp_weights(l), xn.view(), y.view());
      if (tsp_) all_reduce_sum(be_, *group_, y.view());
      be_.add(x.view(), y.view());
    }
    be_.rmsnorm_forward(x.view(), w_.w(w_.idx().final_norm), xn.view(), rstd.view(), eps);
    ++seq_len_;
    ++decoded_;
    return logits(xn.view());
  }

 private:
  // The prompt split on the device and the prefill attention's buffers, allocated once per
  // prefill for one head group (under tsp every group has the same shape).
  struct Prefill {
    const PromptSplit& sp;
    Tensor q_pos;         // I64 [n]
    Tensor gathered_pos;  // I64 [D·n]
    Tensor q, k, v, o, lse, kg, vg;
    Prefill(Backend& be, const PromptSplit& split, const block::AttnDims& a, int D, DType dtype)
        : sp(split),
          q_pos(be.device_copy(split.q_pos, kWork)),
          gathered_pos(be.device_copy(split.gathered_pos, kWork)) {
      const int64_t n = sp.n_max, d = a.d;
      const Device dev = be.device();
      q = Tensor({n, a.hq, d}, dtype, kWork, dev);
      k = Tensor({n, a.hkv, d}, dtype, kWork, dev);
      v = Tensor({n, a.hkv, d}, dtype, kWork, dev);
      o = Tensor({n, a.hq, d}, dtype, kWork, dev);
      lse = Tensor::f32({n, a.hq}, kWork, dev);
      if (D > 1) {  // rank-major: every rank's n rows, padding included
        kg = Tensor({D * n, a.hkv, d}, dtype, kComm, dev);
        vg = Tensor({D * n, a.hkv, d}, dtype, kComm, dev);
      }
    }
  };

  // ---- embedding -------------------------------------------------------------------------------
  // ids I32 [nl] -> x [nl, h] (=). tsp: ring of vocabulary shards, each rank looking up the ids
  // that fall in the shard in hand.
  void embed_prompt(TensorView ids, TensorView x) {
    const int64_t V = config_.vocab_size;
    const TensorView table = w_.w(w_.idx().embed);
    if (!tsp_) {
      be_.embedding_forward(ids, table, x, 0);
      return;
    }
    ring_forward(schedule(), vocab_pack_, {table}, /*keep_last=*/false,
                 [&](int s, const Pieces& shard) {
                   be_.embedding_forward(ids, shard[0], x, vocab_shard(V, D_, s).begin);
                 });
  }
  // token -> x [1, h] (=). tsp: the owner of the token's vocabulary shard broadcasts its row.
  void embed_token(int32_t token, TensorView x) {
    const int64_t V = config_.vocab_size;
    const Tensor id = be_.device_copy(std::vector<int32_t>{token}, kWork);
    if (!tsp_) {
      be_.embedding_forward(id.view(), w_.w(w_.idx().embed), x, 0);
      return;
    }
    const int owner = static_cast<int>(token / (V / D_));
    if (p_ == owner)
      be_.embedding_forward(id.view(), w_.w(w_.idx().embed), x, vocab_shard(V, D_, p_).begin);
    if (D_ > 1) broadcast(*group_, x, owner);
  }

  // ---- prefill attention -----------------------------------------------------------------------
  // Attention of the local tokens (n_max rows, xn [n, h]) with one head group (weights w, cache
  // heads from kv0): k, v all-gathered over the group, y F32 [n, h] (+=) o·Woᵀ, and the local
  // tokens' k, v stored in the cache.
  void attention_gathered(const block::AttnWeights& w, int l, int64_t kv0, Prefill& pf,
                          TensorView xn, TensorView y) {
    const block::AttnDims& a = tsp_ ? ad_g_ : ad_;
    const int64_t nl = pf.sp.n_local();
    block::qkv_forward(be_, a, w, xn, pf.q_pos.view(), pf.q.view(), pf.k.view(), pf.v.view());
    cache_.put(l, 0, kv0, pf.k.slice(0, nl), pf.v.slice(0, nl));
    group_->progress();  // drives the next round's broadcast (tsp) between the steps
    TensorView K = pf.k.view(), V = pf.v.view();  // D = 1: the local rows are all rows
    if (D_ > 1) {
      group_->all_gather(pf.k.data(), pf.kg.data(), pf.k.numel(), dtype_);
      group_->all_gather(pf.v.data(), pf.vg.data(), pf.v.numel(), dtype_);
      K = pf.kg.view();
      V = pf.vg.view();
    }
    block::attention_forward(be_, a, 1, pf.q.view(), K, V, pf.q_pos.view(), pf.gathered_pos.view(),
                             pf.o.view(), pf.lse.view());
    group_->progress();
    block::out_proj_forward(be_, w.wo, pf.o.view(), y);
  }

  // tsp: for r in 0..D-1, P_r = [Wq_r; Wk_r; Wv_r; Wo_r] broadcast from owner r (the training
  // layout's schedule, parallel/tsp_schedule.h), then attention with head group r.
  void tsp_attention_rounds(int l, Prefill& pf, TensorView xn, TensorView y) {
    const block::AttnWeights own = attn_weights(l);
    attention_rounds(schedule(), attn_pack_, {own.wq, own.wk, own.wv, own.wo},
                     [&](int r, const Pieces& w) {
                       attention_gathered({w[0], w[1], w[2], w[3]}, l,
                                          head_group(config_, D_, r).kv.begin, pf, xn, y);
                     });
  }

  // tsp: MLP ring; step k uses slice s = p - k while it travels p -> p+1. xn [n, h], y (+=).
  void tsp_mlp_ring(int l, TensorView xn, TensorView y) {
    const block::MlpWeights own = mlp_weights(l);
    ring_forward(
        schedule(), mlp_pack_, {own.wg, own.wu, own.wd}, /*keep_last=*/false,
        [&](int, const Pieces& w) {
          block::mlp_forward(be_, {w[0], w[1], w[2]}, xn, y, {}, [&] { group_->progress(); });
        });
  }

  // The weight-moving schedules of the tsp forward run on the group in the compute dtype, each
  // transfer overlapping the computation on the shard in hand.
  ScheduleContext schedule() { return {be_, *group_, dtype_, /*overlap=*/true}; }

  // xn [1, h] final-normed (identical on every rank) -> logits [V] on every rank.
  std::vector<float> logits(TensorView xn) {
    return head_logits(be_, *group_, xn, w_.w(head_param()), config_.vocab_size,
                       /*sharded=*/tsp_);
  }

  bool tsp_;
  HeadGroup group_heads_;                      // tsp: head group p; sp: all heads
  block::AttnDims ad_;                         // all heads (the cache, the merged attention)
  block::AttnDims ad_g_;                       // this rank's head group (all heads under sp)
  Packing attn_pack_, mlp_pack_, vocab_pack_;  // tsp: the shards as they travel
};

}  // namespace

// Registered by the layouts that use them (src/parallel/tp_sp.cpp, tsp.cpp).
std::unique_ptr<Engine> make_sp_engine(const LlamaConfig& c, Communicator& world, DType dtype,
                                       Device device) {
  return std::make_unique<SeqShardedEngine>(c, world, /*tsp=*/false, dtype, device);
}
std::unique_ptr<Engine> make_tsp_engine(const LlamaConfig& c, Communicator& world, DType dtype,
                                        Device device) {
  return std::make_unique<SeqShardedEngine>(c, world, /*tsp=*/true, dtype, device);
}

}  // namespace tsp::infer
