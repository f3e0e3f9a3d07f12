// The "single" layout: every rank holds the whole model and its replica's rows of the batch
// (D = 1; with --dp R it is pure data parallelism). It is the reference every other layout is
// compared with, so it is the block maths of tsp/model/block.h composed in the plainest order:
//
//   x = embed(ids)                                        [n, h], n = B·S
//   per layer:  xn = rmsnorm(x);  q,k,v = qkv(xn) + RoPE;  o = attn(q,k,v)
//               x2 = x + o·woᵀ;   x = x2 + mlp(rmsnorm(x2))
//   loss = mean CE(rmsnorm(x)·W_headᵀ, labels)            (W_head = embedding when tied)
//
// and the backward in reverse order, with the saving policy of block.h (LayerSaved).
#include <numeric>

#include "parallel/layout_common.h"
#include "parallel/registry.h"
#include "tsp/model/block.h"
#include "tsp/ops/ops.h"

namespace tsp {
namespace {

class SingleLayout final : public LayoutCommon {
 public:
  SingleLayout(const LlamaConfig& config, const ParallelConfig& parallel, Communicator& world)
      : LayoutCommon("single", config, parallel, world) {
    TSP_CHECK(D() == 1,
              "layout single keeps the whole model on every rank, so all {} ranks must be "
              "data-parallel replicas: use --dp {} (got --dp {})",
              world.size(), world.size(), parallel.dp);
    for (int i = 0; i < static_cast<int>(specs_.size()); ++i)
      store_.add(i, ShardMap::whole(), /*replicated_in_group=*/false);
    store_.allocate(specs_, group());
  }

 protected:
  double run(const ReplicaBatch& rb, bool backward) override {
    const LlamaConfig& c = config_;
    const int64_t B = rb.B, S = rb.S, n = B * S, h = c.hidden_size, V = c.vocab_size;
    const int L = static_cast<int>(c.num_hidden_layers);
    const float eps = static_cast<float>(c.rms_norm_eps);
    const block::AttnDims ad = block::attn_dims(c);

    // Positions: attention takes each row's [S] positions; RoPE takes one per token [n].
    std::vector<int64_t> pos(S), tok_pos(n);
    std::iota(pos.begin(), pos.end(), 0);
    for (int64_t i = 0; i < n; ++i) tok_pos[i] = i % S;

    Tensor x = Tensor::f32({n, h}, MemCategory::Workspace);   // residual stream
    Tensor xn = Tensor::f32({n, h}, MemCategory::Workspace);  // normed input of a sub-block
    embedding_forward(rb.inputs.data(), store_.w(idx_.embed), x.f32(), n, h, 0, V);

    // Forward-only keeps one layer's activations at a time; backward keeps all L.
    std::vector<block::LayerSaved> saved(backward ? L : 1);
    for (int l = 0; l < L; ++l) {
      const ParamIndex::Layer& P = idx_.layers[l];
      block::LayerSaved& s = saved[backward ? l : 0];
      if (s.x.empty()) s.allocate(n, h, ad.hq, ad.hkv, ad.d);
      copy(x, s.x);
      rmsnorm_forward(s.x.f32(), store_.w(P.input_norm), xn.f32(), s.rstd1.f32(), n, h, eps);
      block::qkv_forward(ad, attn_weights(P), xn.f32(), tok_pos.data(), n, s.q.f32(), s.k.f32(),
                         s.v.f32());
      block::attention_forward(ad, B, S, S, s.q.f32(), s.k.f32(), s.v.f32(), pos.data(), pos.data(),
                               s.o.f32(), s.lse.f32());
      copy(s.x, s.x2);
      block::out_proj_forward(ad, store_.w(P.wo), s.o.f32(), n, s.x2.f32());
      rmsnorm_forward(s.x2.f32(), store_.w(P.post_norm), xn.f32(), s.rstd2.f32(), n, h, eps);
      copy(s.x2, x);
      block::mlp_forward(mlp_weights(P), h, xn.f32(), n, x.f32());
    }

    // Final norm and loss head (forward and backward fused; logits never stored whole).
    Tensor rstd_f = Tensor::f32({n}, MemCategory::Activations);
    rmsnorm_forward(x.f32(), store_.w(idx_.final_norm), xn.f32(), rstd_f.f32(), n, h, eps);
    const int head = c.tie_word_embeddings ? idx_.embed : idx_.lm_head;
    Tensor dxn = backward ? Tensor::f32({n, h}, MemCategory::Workspace) : Tensor();
    const double loss =
        block::lm_head_loss(xn.f32(), store_.w(head), rb.labels.data(), n, h, V, rb.grad_scale,
                            backward ? dxn.f32() : nullptr, backward ? store_.g(head) : nullptr);
    if (!backward) return loss;

    Tensor dx = Tensor::f32({n, h}, MemCategory::Workspace);  // gradient of the residual stream
    block::rmsnorm_backward_add(dxn.f32(), x.f32(), store_.w(idx_.final_norm), rstd_f.f32(),
                                dx.f32(), store_.g(idx_.final_norm), n, h);
    Tensor d_o = Tensor::f32({n, ad.hq, ad.d}, MemCategory::Workspace);
    Tensor dq = Tensor::f32({n, ad.hq, ad.d}, MemCategory::Workspace);
    Tensor dk = Tensor::f32({n, ad.hkv, ad.d}, MemCategory::Workspace);
    Tensor dv = Tensor::f32({n, ad.hkv, ad.d}, MemCategory::Workspace);
    for (int l = L - 1; l >= 0; --l) {
      const ParamIndex::Layer& P = idx_.layers[l];
      block::LayerSaved& s = saved[l];
      // MLP sub-block: x_out = x2 + mlp(norm(x2)); dx holds d x_out, becomes d x2.
      block::rmsnorm_apply(s.x2.f32(), store_.w(P.post_norm), s.rstd2.f32(), xn.f32(), n, h);
      dxn.zero();
      block::mlp_backward(mlp_weights(P), mlp_grads(P), h, xn.f32(), dx.f32(), n, dxn.f32());
      block::rmsnorm_backward_add(dxn.f32(), s.x2.f32(), store_.w(P.post_norm), s.rstd2.f32(),
                                  dx.f32(), store_.g(P.post_norm), n, h);
      // Attention sub-block: x2 = x + attn(norm(x)) ·woᵀ; dx becomes d x.
      block::out_proj_backward(ad, store_.w(P.wo), s.o.f32(), dx.f32(), n, d_o.f32(),
                               store_.g(P.wo));
      dq.zero();
      dk.zero();
      dv.zero();
      block::attention_backward(ad, B, S, S, s.q.f32(), s.k.f32(), s.v.f32(), pos.data(),
                                pos.data(), s.o.f32(), s.lse.f32(), d_o.f32(), dq.f32(), dk.f32(),
                                dv.f32());
      block::rmsnorm_apply(s.x.f32(), store_.w(P.input_norm), s.rstd1.f32(), xn.f32(), n, h);
      dxn.zero();
      block::qkv_backward(ad, attn_weights(P), attn_grads(P), xn.f32(), tok_pos.data(), n, dq.f32(),
                          dk.f32(), dv.f32(), dxn.f32());
      block::rmsnorm_backward_add(dxn.f32(), s.x.f32(), store_.w(P.input_norm), s.rstd1.f32(),
                                  dx.f32(), store_.g(P.input_norm), n, h);
      s = block::LayerSaved();  // this layer's activations are no longer needed
    }
    embedding_backward(rb.inputs.data(), dx.f32(), store_.g(idx_.embed), n, h, 0, V);
    return loss;
  }

 private:
  block::AttnWeights attn_weights(const ParamIndex::Layer& P) const {
    return {store_.w(P.wq), store_.w(P.wk), store_.w(P.wv), store_.w(P.wo)};
  }
  block::AttnGrads attn_grads(const ParamIndex::Layer& P) const {
    return {store_.g(P.wq), store_.g(P.wk), store_.g(P.wv), store_.g(P.wo)};
  }
  block::MlpWeights mlp_weights(const ParamIndex::Layer& P) const {
    return {store_.w(P.wg), store_.w(P.wu), store_.w(P.wd), config_.intermediate_size};
  }
  block::MlpGrads mlp_grads(const ParamIndex::Layer& P) const {
    return {store_.g(P.wg), store_.g(P.wu), store_.g(P.wd)};
  }
};

const LayoutRegistration kRegisterSingle(
    "single", "whole model on every rank (reference; --dp R for pure data parallelism)",
    [](const LlamaConfig& c, const ParallelConfig& p, Communicator& world) {
      return std::unique_ptr<Layout>(new SingleLayout(c, p, world));
    });

}  // namespace
}  // namespace tsp
