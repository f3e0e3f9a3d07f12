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
//
// Precision: weights, x, xn, q/k/v/o and the cache are in the compute dtype; o·Wo_pᵀ and the MLP
// slice's output go to an F32 buffer, are all-reduced in fp32 and added to x once (the rounding
// single does); rstd, lse and the logits are F32.
#include <numeric>

#include "infer/common.h"
#include "parallel/mappings.h"
#include "parallel/registry.h"
#include "tsp/parallel/sharding.h"

namespace tsp::infer {
namespace {

class TensorParallelEngine final : public EngineBase {
 public:
  TensorParallelEngine(const LlamaConfig& c, Communicator& world, bool single, DType dtype,
                       Device device)
      : EngineBase(single ? "single" : "tp", c, world, /*one_rank=*/single, dtype, device) {
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
    cache_.reset(be_, config_.num_hidden_layers, P + extra, ad_.hkv, ad_.d, dtype_, memory_);
    std::vector<int64_t> pos(P);
    std::iota(pos.begin(), pos.end(), 0);
    return forward(prompt, pos);
  }

  std::vector<float> decode(int32_t token) override {
    std::vector<float> logits = forward({token}, {next_decode_position()});
    ++seq_len_;
    ++decoded_;
    return logits;
  }

 private:
  // ids [n] at positions pos [n] (the next n positions) -> logits of the last one [V].
  std::vector<float> forward(const std::vector<int32_t>& ids_host,
                             const std::vector<int64_t>& pos_host) {
    const LlamaConfig& c = config_;
    const int64_t n = static_cast<int64_t>(ids_host.size()), h = c.hidden_size, V = c.vocab_size;
    const float eps = static_cast<float>(c.rms_norm_eps);
    const Device dev = be_.device();
    constexpr MemCategory kWork = MemCategory::Workspace;
    const int64_t slot0 = cache_.append(pos_host);
    const Tensor ids = be_.device_copy(ids_host, kWork);
    const Tensor pos = be_.device_copy(pos_host, kWork);

    Tensor x({n, h}, dtype_, kWork, dev);   // residual stream
    Tensor xn({n, h}, dtype_, kWork, dev);  // normed input of a sub-block
    // A sub-block's (partial) output, summed in fp32 over the group and added to x once.
    Tensor y = Tensor::f32({n, h}, kWork, dev);
    Tensor rstd = Tensor::f32({n}, kWork, dev);
    Tensor q({n, ad_.hq, ad_.d}, dtype_, kWork, dev);
    Tensor o({n, ad_.hq, ad_.d}, dtype_, kWork, dev);
    Tensor lse = Tensor::f32({n, ad_.hq}, kWork, dev);
    be_.embedding_forward(ids.view(), w_.w(w_.idx().embed), x.view(), /*v0=*/0);

    for (int l = 0; l < c.num_hidden_layers; ++l) {
      be_.rmsnorm_forward(x.view(), w_.w(P(l).input_norm), xn.view(), rstd.view(), eps);
      // The new tokens' k, v go straight into their cache slots.
      block::qkv_forward(be_, ad_, attn_weights(l), xn.view(), pos.view(), q.view(),
                         cache_.k(l, slot0, n), cache_.v(l, slot0, n));
      block::attention_forward(be_, ad_, 1, q.view(), cache_.k(l), cache_.v(l), pos.view(),
                               cache_.positions(), o.view(), lse.view());
      be_.zero(y.view());
      block::out_proj_forward(be_, w_.w(P(l).wo), o.view(), y.view());
      all_reduce_sum(be_, *group_, y.view());
      be_.add(x.view(), y.view());

      be_.rmsnorm_forward(x.view(), w_.w(P(l).post_norm), xn.view(), rstd.view(), eps);
      be_.zero(y.view());
      block::mlp_forward(be_, mlp_weights(l), xn.view(), y.view());
      all_reduce_sum(be_, *group_, y.view());
      be_.add(x.view(), y.view());
    }
    // Only the last position's logits are needed (the next token).
    const TensorView xn_last = xn.slice(0, 1);
    be_.rmsnorm_forward(x.slice(n - 1, n), w_.w(w_.idx().final_norm), xn_last, rstd.slice(0, 1),
                        eps);
    const Range vs = vocab_shard(V, D_, p_);
    const TensorView head = c.tie_word_embeddings ? w_.w(w_.idx().embed).slice(vs.begin, vs.end)
                                                  : w_.w(w_.idx().lm_head);
    return head_logits(be_, *group_, xn_last, head, V, /*sharded=*/true);
  }

  block::AttnDims ad_;
};

}  // namespace

// Registered by the layouts that use them (src/parallel/single.cpp, tp_sp.cpp).
std::unique_ptr<Engine> make_single_engine(const LlamaConfig& c, Communicator& world, DType dtype,
                                           Device device) {
  return std::make_unique<TensorParallelEngine>(c, world, /*single=*/true, dtype, device);
}
std::unique_ptr<Engine> make_tp_engine(const LlamaConfig& c, Communicator& world, DType dtype,
                                       Device device) {
  return std::make_unique<TensorParallelEngine>(c, world, /*single=*/false, dtype, device);
}

}  // namespace tsp::infer
