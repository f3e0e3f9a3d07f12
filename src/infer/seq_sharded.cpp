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
//        prefill: the tsp forward (docs/tsp-schedule.md): per layer, for r in 0..D-1 the packed
//                 attention shard P_r = [Wq_r; Wk_r; Wv_r; Wo_r] is broadcast by its owner, the
//                 local tokens' k,v of head group r are all-gathered, y += attn·Wo_rᵀ; the MLP
//                 and the embedding use rings of their shards. Only the last position's logits
//                 are computed: its owner broadcasts the final hidden state (h floats instead of
//                 a ring of V·h weights), each rank scores its vocabulary shard, all-gather.
//        decode : weight-stationary. Rank p applies head group p to the new token (q, k, v of
//                 its heads, all-gathered: n_h·d + 2·n_kv·d floats), attends with ALL heads over
//                 its local cache, the partial attentions are merged with log-sum-exp weights,
//                 rank p projects its head group's output with its Wo_p (all-reduce of h floats),
//                 applies MLP slice p (all-reduce of h) and scores its vocabulary shard
//                 (all-gather of V floats). Only activations move; no weight shard leaves its rank.
#include <cstring>

#include "infer/common.h"
#include "tsp/ops/ops.h"
#include "tsp/parallel/sharding.h"

namespace tsp::infer {
namespace {

class SeqShardedEngine final : public EngineBase {
 public:
  SeqShardedEngine(const LlamaConfig& c, Communicator& world, bool tsp)
      : EngineBase(tsp ? "tsp" : "sp", c, world, /*one_rank=*/false), tsp_(tsp) {
    const ParamIndex& I = w_.idx();
    if (tsp_) {
      check_heads(config_, D_);
      check_ffn(config_.intermediate_size, D_);
      check_vocab(config_.vocab_size, D_);
      hold_layer_shards();
      w_.hold(I.embed, ShardMap::rows(D_, p_));
      if (!config_.tie_word_embeddings) w_.hold(I.lm_head, ShardMap::rows(D_, p_));
      group_heads_ = head_group(config_, D_, p_);
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
    const PromptSplit sp = split_prompt(n_prompt, D_, p_);
    const int64_t n = sp.n_max, nl = sp.n_local();  // rows computed (padded), tokens owned
    cache_.reset(c.num_hidden_layers, nl + decode_share(extra, D_, p_), c.num_key_value_heads,
                 ad_.d);
    for (int64_t t : sp.pos) cache_.append(t);

    std::vector<int32_t> ids(nl);
    for (int64_t i = 0; i < nl; ++i) ids[i] = prompt[sp.pos[i]];
    Tensor x = Tensor::f32({n, h}, MemCategory::Workspace);  // padding rows stay 0
    Tensor xn = Tensor::f32({n, h}, MemCategory::Workspace);
    Tensor y = Tensor::f32({n, h}, MemCategory::Workspace);
    Tensor rstd = Tensor::f32({n}, MemCategory::Workspace);
    embed_prompt(ids, x.f32());

    for (int l = 0; l < c.num_hidden_layers; ++l) {
      rmsnorm_forward(x.f32(), w_.w(P(l).input_norm), xn.f32(), rstd.f32(), n, h, eps);
      y.zero();
      if (tsp_) {
        tsp_attention_rounds(l, sp, xn.f32(), y.f32());
      } else {
        attention_gathered(ad_, attn_weights(l), l, 0, sp, xn.f32(), y.f32());
      }
      add_inplace(x.f32(), y.f32(), n * h);
      rmsnorm_forward(x.f32(), w_.w(P(l).post_norm), xn.f32(), rstd.f32(), n, h, eps);
      y.zero();
      if (tsp_) {
        tsp_mlp_ring(l, xn.f32(), n, y.f32());
      } else {
        block::mlp_forward(mlp_weights(l), h, xn.f32(), n, y.f32());
      }
      add_inplace(x.f32(), y.f32(), n * h);
    }
    // The last position lives on one rank: it sends its final-normed state to all.
    std::vector<float> xn_last(h);
    if (p_ == sp.last_owner)
      rmsnorm_forward(x.f32() + sp.last_local * h, w_.w(w_.idx().final_norm), xn_last.data(),
                      rstd.f32(), 1, h, eps);
    if (D_ > 1) group_->broadcast(xn_last.data(), h, DType::F32, sp.last_owner);
    return logits(xn_last.data());
  }

  std::vector<float> decode(int32_t token) override {
    const LlamaConfig& c = config_;
    const int64_t h = c.hidden_size, d = ad_.d;
    const float eps = static_cast<float>(c.rms_norm_eps);
    const int64_t pos = next_decode_position();
    const bool owner = decode_owner(decoded_, D_) == p_;  // this token's K/V stays here
    const int64_t slot = owner ? cache_.append(pos) : -1;

    Tensor x = Tensor::f32({1, h}, MemCategory::Workspace);
    Tensor xn = Tensor::f32({1, h}, MemCategory::Workspace);
    Tensor y = Tensor::f32({1, h}, MemCategory::Workspace);
    Tensor rstd = Tensor::f32({1}, MemCategory::Workspace);
    // q, k, v of ALL heads (tsp: assembled from the ranks' head groups), o, lse of all heads.
    Tensor q = Tensor::f32({ad_.hq, d}, MemCategory::Workspace);
    Tensor k = Tensor::f32({ad_.hkv, d}, MemCategory::Workspace);
    Tensor v = Tensor::f32({ad_.hkv, d}, MemCategory::Workspace);
    Tensor o = Tensor::f32({ad_.hq, d}, MemCategory::Workspace);
    Tensor lse = Tensor::f32({ad_.hq}, MemCategory::Workspace);
    Tensor qg, kg, vg;  // tsp: this rank's head group
    if (tsp_) {
      qg = Tensor::f32({ad_g_.hq, d}, MemCategory::Workspace);
      kg = Tensor::f32({ad_g_.hkv, d}, MemCategory::Workspace);
      vg = Tensor::f32({ad_g_.hkv, d}, MemCategory::Workspace);
    }
    embed_token(token, x.f32());

    for (int l = 0; l < c.num_hidden_layers; ++l) {
      rmsnorm_forward(x.f32(), w_.w(P(l).input_norm), xn.f32(), rstd.f32(), 1, h, eps);
      if (tsp_) {
        block::qkv_forward(ad_g_, attn_weights(l), xn.f32(), &pos, 1, qg.f32(), kg.f32(), vg.f32());
        if (D_ > 1) {  // head groups are contiguous: rank order = head order
          group_->all_gather(qg.data(), q.data(), qg.numel(), DType::F32);
          group_->all_gather(kg.data(), k.data(), kg.numel(), DType::F32);
          group_->all_gather(vg.data(), v.data(), vg.numel(), DType::F32);
        } else {
          copy(qg, q), copy(kg, k), copy(vg, v);
        }
      } else {
        block::qkv_forward(ad_, attn_weights(l), xn.f32(), &pos, 1, q.f32(), k.f32(), v.f32());
      }
      if (owner) cache_.put(l, slot, 0, ad_.hkv, 1, k.f32(), v.f32());
      attend_cache(ad_, cache_, l, q.f32(), &pos, 1, o.f32(), lse.f32());
      merge_over_group(*group_, o.f32(), lse.f32(), 1, ad_.hq, d);
      y.zero();
      // o of this rank's head group (all heads under sp) times its columns of Wo.
      block::out_proj_forward(ad_g_, w_.w(P(l).wo), o.f32() + group_heads_.q.begin * d, 1, y.f32());
      if (tsp_ && D_ > 1) all_reduce(*group_, y);
      add_inplace(x.f32(), y.f32(), h);

      rmsnorm_forward(x.f32(), w_.w(P(l).post_norm), xn.f32(), rstd.f32(), 1, h, eps);
      y.zero();
      block::mlp_forward(mlp_weights(l), h, xn.f32(), 1, y.f32());
      if (tsp_ && D_ > 1) all_reduce(*group_, y);
      add_inplace(x.f32(), y.f32(), h);
    }
    rmsnorm_forward(x.f32(), w_.w(w_.idx().final_norm), xn.f32(), rstd.f32(), 1, h, eps);
    ++seq_len_;
    ++decoded_;
    return logits(xn.f32());
  }

 private:
  // ---- embedding -------------------------------------------------------------------------------
  // ids [nl] -> x [nl, h] (=). tsp: ring of vocabulary shards, each rank looking up the ids that
  // fall in the shard in hand.
  void embed_prompt(const std::vector<int32_t>& ids, float* x) {
    const int64_t h = config_.hidden_size, V = config_.vocab_size, nl = ids.size();
    if (!tsp_) {
      embedding_forward(ids.data(), w_.w(w_.idx().embed), x, nl, h, 0, V);
      return;
    }
    const int64_t Vs = V / D_;
    ring(w_.w(w_.idx().embed), Vs * h, [&](int s, const float* table) {
      embedding_forward(ids.data(), table, x, nl, h, vocab_shard(V, D_, s).begin, Vs);
    });
  }
  // token -> x [h] (=). tsp: the owner of the token's vocabulary shard broadcasts its row.
  void embed_token(int32_t token, float* x) {
    const int64_t h = config_.hidden_size, V = config_.vocab_size;
    if (!tsp_) {
      embedding_forward(&token, w_.w(w_.idx().embed), x, 1, h, 0, V);
      return;
    }
    const int owner = static_cast<int>(token / (V / D_));
    if (p_ == owner)
      std::memcpy(x, w_.w(w_.idx().embed) + (token - vocab_shard(V, D_, p_).begin) * h,
                  sizeof(float) * h);
    if (D_ > 1) group_->broadcast(x, h, DType::F32, owner);
  }

  // ---- prefill attention -----------------------------------------------------------------------
  // Attention of the local tokens (n_max rows, xn [n, h]) with one head group (dims a, weights w,
  // cache heads from kv0): k,v all-gathered over the group, y [n, h] (+=) o·Woᵀ, and the local
  // tokens' k,v stored in the cache.
  void attention_gathered(const block::AttnDims& a, const block::AttnWeights& w, int l, int64_t kv0,
                          const PromptSplit& sp, const float* xn, float* y) {
    const int64_t n = sp.n_max, d = a.d;
    Tensor q = Tensor::f32({n, a.hq, d}, MemCategory::Workspace);
    Tensor k = Tensor::f32({n, a.hkv, d}, MemCategory::Workspace);
    Tensor v = Tensor::f32({n, a.hkv, d}, MemCategory::Workspace);
    Tensor o = Tensor::f32({n, a.hq, d}, MemCategory::Workspace);
    Tensor lse = Tensor::f32({n, a.hq}, MemCategory::Workspace);
    block::qkv_forward(a, w, xn, sp.q_pos.data(), n, q.f32(), k.f32(), v.f32());
    cache_.put(l, 0, kv0, a.hkv, sp.n_local(), k.f32(), v.f32());
    Tensor kg = Tensor::f32({D_ * n, a.hkv, d}, MemCategory::Workspace);  // rank-major
    Tensor vg = Tensor::f32({D_ * n, a.hkv, d}, MemCategory::Workspace);
    group_->all_gather(k.data(), kg.data(), k.numel(), DType::F32);
    group_->all_gather(v.data(), vg.data(), v.numel(), DType::F32);
    block::attention_forward(a, 1, n, D_ * n, q.f32(), kg.f32(), vg.f32(), sp.q_pos.data(),
                             sp.gathered_pos.data(), o.f32(), lse.f32());
    block::out_proj_forward(a, w.wo, o.f32(), n, y);
  }

  // tsp: for r in 0..D-1, P_r broadcast from owner r, then attention with head group r.
  void tsp_attention_rounds(int l, const PromptSplit& sp, const float* xn, float* y) {
    const block::AttnDims& a = ad_g_;  // every group has the same shape
    const int64_t h = a.h, nq = a.q_width() * h, nkv = a.kv_width() * h;
    Tensor packed = Tensor::f32({nq + 2 * nkv + nq}, MemCategory::Comm);
    float* pk = packed.f32();
    const block::AttnWeights own = attn_weights(l);
    const block::AttnWeights shard{pk, pk + nq, pk + nq + nkv, pk + nq + 2 * nkv};
    for (int r = 0; r < D_; ++r) {
      if (r == p_) {
        std::memcpy(pk, own.wq, sizeof(float) * nq);
        std::memcpy(pk + nq, own.wk, sizeof(float) * nkv);
        std::memcpy(pk + nq + nkv, own.wv, sizeof(float) * nkv);
        std::memcpy(pk + nq + 2 * nkv, own.wo, sizeof(float) * nq);
      }
      if (D_ > 1) broadcast(*group_, packed, r);
      attention_gathered(a, shard, l, head_group(config_, D_, r).kv.begin, sp, xn, y);
    }
  }

  // tsp: MLP ring; step k uses slice s = p - k while it travels p -> p+1. xn [n, h], y (+=).
  void tsp_mlp_ring(int l, const float* xn, int64_t n, float* y) {
    const int64_t h = config_.hidden_size, f = config_.intermediate_size / D_;
    const block::MlpWeights own = mlp_weights(l);
    Tensor packed = Tensor::f32({3 * f * h}, MemCategory::Comm);
    float* pk = packed.f32();
    std::memcpy(pk, own.wg, sizeof(float) * f * h);
    std::memcpy(pk + f * h, own.wu, sizeof(float) * f * h);
    std::memcpy(pk + 2 * f * h, own.wd, sizeof(float) * f * h);
    ring(pk, 3 * f * h, [&](int, const float* w) {
      block::mlp_forward({w, w + f * h, w + 2 * f * h, f}, h, xn, n, y);
    });
  }

  // Passes `count` floats (starting with own) around the ring p -> p+1; body(s, shard) runs
  // once per shard s = p, p-1, ... while the next one is in flight (double buffered).
  template <typename Body>
  void ring(const float* own, int64_t count, const Body& body) {
    Tensor buf[2] = {Tensor::f32({count}, MemCategory::Comm),
                     Tensor::f32({count}, MemCategory::Comm)};
    std::memcpy(buf[0].f32(), own, sizeof(float) * count);
    for (int k = 0; k < D_; ++k) {
      const int cur = k % 2, s = ((p_ - k) % D_ + D_) % D_;
      RequestPtr hop;
      if (k + 1 < D_) {
        hop = group_->isendrecv(buf[cur].data(), count, DType::F32, (p_ + 1) % D_,
                                buf[1 - cur].data(), count, (p_ + D_ - 1) % D_);
      }
      body(s, buf[cur].f32());
      if (hop) hop->wait();
    }
  }

  // xn [h] final-normed (identical on every rank) -> logits [V] on every rank.
  std::vector<float> logits(const float* xn) {
    const int64_t h = config_.hidden_size, V = config_.vocab_size;
    return head_logits(*group_, xn, w_.w(head_param()), h, V, /*sharded=*/tsp_);
  }

  bool tsp_;
  HeadGroup group_heads_;  // tsp: head group p; sp: all heads
  block::AttnDims ad_;     // all heads (the cache, the merged attention)
  block::AttnDims ad_g_;   // this rank's head group (all heads under sp)
};

}  // namespace

std::unique_ptr<Engine> make_sp_engine(const LlamaConfig& c, Communicator& world) {
  return std::make_unique<SeqShardedEngine>(c, world, /*tsp=*/false);
}
std::unique_ptr<Engine> make_tsp_engine(const LlamaConfig& c, Communicator& world) {
  return std::make_unique<SeqShardedEngine>(c, world, /*tsp=*/true);
}

}  // namespace tsp::infer
