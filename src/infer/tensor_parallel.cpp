// The single and tp engines (docs/inference.md). Both run the plain decoder on every token of the
// sequence; tp (Megatron) holds head group p and FFN slice p of every layer (single: D = 1, the
// whole model) and sums the partial outputs of the attention out-projection and of the MLP
// down-projection with an all-reduce of the new tokens' activations. The cache holds the head
// group's K/V of every token, so it too is 1/D per rank (split by heads, not by tokens).
//
//   per layer:  xn = rmsnorm(x);  q,k,v = qkv_p(xn) + RoPE -> k,v appended to the cache
//               o = attn(q, cache);  x += all_reduce(o·Wo_pᵀ)
//               x += all_reduce(mlp_p(rmsnorm(x)))
//   logits of the last position: rmsnorm, vocabulary shard p of the head, all-gather.
// Prefill is this on the whole prompt, decode on one token: the same code path.
#include <numeric>

#include "infer/common.h"
#include "tsp/ops/ops.h"
#include "tsp/parallel/sharding.h"

namespace tsp::infer {
namespace {

class TensorParallelEngine final : public EngineBase {
 public:
  TensorParallelEngine(const LlamaConfig& c, Communicator& world, bool single)
      : EngineBase(single ? "single" : "tp", c, world, /*one_rank=*/single) {
    if (D_ > 1) {
      check_heads(config_, D_);
      check_ffn(config_.intermediate_size, D_);
      check_vocab(config_.vocab_size, D_);
    }
    hold_layer_shards();
    hold_whole(w_.idx().embed);  // look-ups of a few tokens: not worth a vocabulary ring
    if (!config_.tie_word_embeddings) w_.hold(w_.idx().lm_head, ShardMap::rows(D_, p_));
    ad_ = block::attn_dims(config_, config_.num_attention_heads / D_,
                           config_.num_key_value_heads / D_);
  }

  std::vector<float> prefill(const std::vector<int32_t>& prompt, int64_t extra) override {
    begin(prompt, extra);
    const int64_t P = static_cast<int64_t>(prompt.size());
    cache_.reset(config_.num_hidden_layers, P + extra, ad_.hkv, ad_.d);
    std::vector<int64_t> pos(P);
    std::iota(pos.begin(), pos.end(), 0);
    return forward(prompt.data(), pos.data(), P);
  }

  std::vector<float> decode(int32_t token) override {
    const int64_t pos = next_decode_position();
    std::vector<float> logits = forward(&token, &pos, 1);
    ++seq_len_;
    ++decoded_;
    return logits;
  }

 private:
  // ids [n] at positions pos [n] (the next n positions) -> logits of the last one [V].
  std::vector<float> forward(const int32_t* ids, const int64_t* pos, int64_t n) {
    const LlamaConfig& c = config_;
    const int64_t h = c.hidden_size, V = c.vocab_size;
    const float eps = static_cast<float>(c.rms_norm_eps);
    const int64_t slot0 = cache_.size();
    for (int64_t i = 0; i < n; ++i) cache_.append(pos[i]);

    Tensor x = Tensor::f32({n, h}, MemCategory::Workspace);  // residual stream
    Tensor xn = Tensor::f32({n, h}, MemCategory::Workspace);
    Tensor y = Tensor::f32({n, h}, MemCategory::Workspace);  // a sub-block's (partial) output
    Tensor rstd = Tensor::f32({n}, MemCategory::Workspace);
    Tensor q = Tensor::f32({n, ad_.hq, ad_.d}, MemCategory::Workspace);
    Tensor o = Tensor::f32({n, ad_.hq, ad_.d}, MemCategory::Workspace);
    Tensor lse = Tensor::f32({n, ad_.hq}, MemCategory::Workspace);
    embedding_forward(ids, w_.w(w_.idx().embed), x.f32(), n, h, 0, V);

    for (int l = 0; l < c.num_hidden_layers; ++l) {
      rmsnorm_forward(x.f32(), w_.w(P(l).input_norm), xn.f32(), rstd.f32(), n, h, eps);
      block::qkv_forward(ad_, attn_weights(l), xn.f32(), pos, n, q.f32(), cache_.k(l, slot0),
                         cache_.v(l, slot0));
      block::attention_forward(ad_, 1, n, cache_.size(), q.f32(), cache_.k(l), cache_.v(l), pos,
                               cache_.positions(), o.f32(), lse.f32());
      y.zero();
      block::out_proj_forward(ad_, w_.w(P(l).wo), o.f32(), n, y.f32());
      if (D_ > 1) all_reduce(*group_, y);
      add_inplace(x.f32(), y.f32(), n * h);

      rmsnorm_forward(x.f32(), w_.w(P(l).post_norm), xn.f32(), rstd.f32(), n, h, eps);
      y.zero();
      block::mlp_forward(mlp_weights(l), h, xn.f32(), n, y.f32());
      if (D_ > 1) all_reduce(*group_, y);
      add_inplace(x.f32(), y.f32(), n * h);
    }
    // Only the last position's logits are needed (the next token).
    rmsnorm_forward(x.f32() + (n - 1) * h, w_.w(w_.idx().final_norm), xn.f32(), rstd.f32(), 1, h,
                    eps);
    const float* head = c.tie_word_embeddings
                            ? w_.w(w_.idx().embed) + vocab_shard(V, D_, p_).begin * h
                            : w_.w(w_.idx().lm_head);
    return head_logits(*group_, xn.f32(), head, h, V, /*sharded=*/true);
  }

  block::AttnDims ad_;
};

}  // namespace

std::unique_ptr<Engine> make_tensor_parallel_engine(const LlamaConfig& c, Communicator& world,
                                                    bool single) {
  return std::make_unique<TensorParallelEngine>(c, world, single);
}

}  // namespace tsp::infer
