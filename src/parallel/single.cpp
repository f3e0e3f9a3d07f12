// The "single" layout: every rank holds the whole model and its replica's rows of the batch
// (D = 1; with --dp R it is pure data parallelism). It is the reference every other layout is
// compared with, so it is the block maths of tsp/model/block.h composed in the plainest order:
//
//   x = embed(ids)                                        [n, h], n = B·S
//   per layer:  xn = rmsnorm(x);  q,k,v = qkv(xn) + RoPE;  o = attn(q,k,v)
//               x2 = x + o·woᵀ;   x = x2 + mlp(rmsnorm(x2))
//   loss = mean CE(rmsnorm(x)·W_headᵀ, labels)            (W_head = embedding when tied)
//
// and the backward in reverse order, with the saving policy of block.h (LayerSaved). The order of
// the operations is the layer recipe of layout_common.h; this file only says that every piece
// runs on the whole model and all of the replica's tokens, with no communication.
#include "infer/engines.h"
#include "parallel/layout_common.h"
#include "parallel/registry.h"
#include "plan/model_util.h"
#include "tsp/model/block.h"

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
    allocate_store();
    ad_ = block::attn_dims(config_);
  }

 protected:
  void embed_forward(const LocalTokens& t, TensorView x) override {
    be_.embedding_forward(t.ids.view(), store_.w(idx_.embed), x, /*v0=*/0);
  }
  void embed_backward(const LocalTokens& t, TensorView dx) override {
    be_.embedding_backward(t.ids.view(), dx, store_.g(idx_.embed), 0);
  }

  void attention_forward(int l, const LocalTokens& t, TensorView xn,
                         block::LayerSaved& s) override {
    const ParamIndex::Layer& P = idx_.layers[l];
    block::qkv_forward(be_, ad_, attn_weights(P), xn, t.tok_pos.view(), s.q.view(), s.k.view(),
                       s.v.view());
    block::attention_forward(be_, ad_, t.B, s.q.view(), s.k.view(), s.v.view(), t.q_pos.view(),
                             t.k_pos.view(), s.o.view(), s.lse.view(), t.doc_pos());
    block::out_proj_forward(be_, store_.w(P.wo), s.o.view(), s.x2.view());
  }
  void attention_backward(int l, const LocalTokens& t, TensorView xn, const block::LayerSaved& s,
                          TensorView dx, TensorView dxn) override {
    const ParamIndex::Layer& P = idx_.layers[l];
    const Device dev = device();
    Tensor d_o = Tensor::f32(s.q.shape(), MemCategory::Workspace, dev);
    Tensor dq = Tensor::zeros(s.q.shape(), DType::F32, MemCategory::Workspace, dev);
    Tensor dk = Tensor::zeros(s.k.shape(), DType::F32, MemCategory::Workspace, dev);
    Tensor dv = Tensor::zeros(s.v.shape(), DType::F32, MemCategory::Workspace, dev);
    block::out_proj_backward(be_, store_.w(P.wo), s.o.view(), dx, d_o.view(), store_.g(P.wo));
    block::attention_backward(be_, ad_, t.B, s.q.view(), s.k.view(), s.v.view(), t.q_pos.view(),
                              t.k_pos.view(), s.o.view(), s.lse.view(), d_o.view(), dq.view(),
                              dk.view(), dv.view(), t.doc_pos());
    block::qkv_backward(be_, ad_, attn_weights(P), attn_grads(P), xn, t.tok_pos.view(), dq.view(),
                        dk.view(), dv.view(), dxn);
  }

  void mlp_forward(int l, const LocalTokens&, TensorView xn, TensorView x,
                   block::LayerSaved& s) override {
    block::mlp_forward(be_, mlp_weights(idx_.layers[l]), xn, x, s.mlp());
  }
  void mlp_backward(int l, const LocalTokens&, TensorView xn, TensorView dy, TensorView dxn,
                    const block::LayerSaved& s) override {
    const ParamIndex::Layer& P = idx_.layers[l];
    block::mlp_backward(be_, mlp_weights(P), mlp_grads(P), xn, dy, dxn, s.mlp());
  }

  void head_loss(const LocalTokens& t, TensorView xn, float grad_scale, TensorView loss,
                 TensorView dxn) override {
    block::lm_head_loss(be_, xn, store_.w(head_param()), t.labels.view(), grad_scale, loss, dxn,
                        dxn.empty() ? TensorView() : store_.g(head_param()));
  }

 private:
  block::AttnWeights attn_weights(const ParamIndex::Layer& P) const {
    return {store_.w(P.wq), store_.w(P.wk), store_.w(P.wv), store_.w(P.wo)};
  }
  block::AttnGrads attn_grads(const ParamIndex::Layer& P) const {
    return {store_.g(P.wq), store_.g(P.wk), store_.g(P.wv), store_.g(P.wo)};
  }
  block::MlpWeights mlp_weights(const ParamIndex::Layer& P) const {
    return {store_.w(P.wg), store_.w(P.wu), store_.w(P.wd)};
  }
  block::MlpGrads mlp_grads(const ParamIndex::Layer& P) const {
    return {store_.g(P.wg), store_.g(P.wu), store_.g(P.wd)};
  }

  block::AttnDims ad_;
};

const LayoutRegistration kRegisterSingle(
    "single", "whole model on every rank (reference; --dp R for pure data parallelism)",
    [](const LlamaConfig& c, const ParallelConfig& p, Communicator& world) {
      return std::unique_ptr<Layout>(new SingleLayout(c, p, world));
    });
// Inference: every rank a whole-model replica (src/infer/tensor_parallel.cpp).
const EngineRegistration kRegisterSingleEngine("single", infer::make_single_engine);

}  // namespace
}  // namespace tsp

// ---- The model of this layout for the planner ---------------------------------------------------
//
// The model of the "single" layout (src/parallel/single.cpp): the whole model on every rank, no
// communication inside the group (D = 1); with R > 1 pure data parallelism.
//
// Registered with the layout's name: src/plan asks it (include/tsp/plan/layout_model.h)
// instead of comparing names, so the layout, its algorithm and its formulas live in one file.
namespace tsp::plan {
namespace {

class SingleModel final : public LayoutModel {
 public:
  Split split(const LayoutSpec&) const override { return {}; }
  std::vector<LayoutSpec> factorizations(const std::string& name, int D, int R) const override {
    if (D != 1) return {};
    return {{name, 1, 1, R}};
  }
  void check(const LlamaConfig&, const LayoutSpec& l) const override {
    TSP_CHECK(l.D == 1, "single: D must be 1, got {}", l.D);
  }
  BlockComm block_comm(const LlamaConfig&, const LayoutSpec&, int64_t, const ElemBytes&,
                       bool) const override {
    return {};
  }

  // Our implementation: LayoutCommon::run's recipe with single's hooks on all n = B·S tokens of
  // the replica. Every term names its tensor; e.act / e.weight are the compute dtype's sizes,
  // gradients fp32; e.narrow is the backend's transient bf16 copy of an fp32 operand of a bf16
  // GEMM (fp32 gradients dy; CPU and CUDA alike); zero under fp32. The backend ops' other
  // transients are LocalInputs' (in.attention_backward_transient, in.row_loss). Under CUDA and
  // bf16 the forward's accumulating GEMMs (o_proj into x2, the down projection into x) widen
  // their output to fp32 (in.accumulate_widening: [n, h] and [r, h]); no moment below needs
  // them: the forward holds x, xn and at most the widened [n, h], the backward at the same
  // saved activations x, xn, dxn, dx and rmsnorm_backward_add's [n, h] temp at least.
  void local_moments(const LocalInputs& in, std::vector<Moment>& out) const override {
    const Dims s = dims_of(*in.m);
    const ElemBytes& e = in.e;
    const int64_t n = in.Br * in.S, h = s.h, d = s.d, qw = s.nh * d, kw = s.nkv * d;
    const int64_t r = std::min(n, in.target.token_chunk());  // rows at once
    // The layers' saved activations (block::LayerSaved, with what none keeps besides; under full
    // recomputation checkpoints and one whole set, LocalInputs::saved_through) and the final
    // norm's rstd: at the loss head,
    // and in the backward of the last layer (its replay first under full), the busiest.
    const int64_t set = saved_bytes(s, n, s.nh, s.nkv, n, e) + in.kept(n, h, s.F),
                  checkpoint = e.act * n * h;
    const int64_t act_head = in.saved_all(s.L, set, checkpoint) + kF32 * n;
    const int64_t act = in.saved_through(s.L - 1, set, checkpoint) + kF32 * n;
    // run(): the tokens, x and xn [n, h] (compute dtype), dxn [n, h] fp32 ...
    const int64_t tokens = token_bytes(n, in.S, in.S);
    const int64_t fwd = tokens + 2 * e.act * n * h + kF32 * n * h;
    // loss head, forward and backward fused: one [r, V] fp32 logits chunk (dlogits in place);
    // with it, first cross_entropy's per-row loss (CUDA), then dlogits narrowed for the backward
    // GEMMs (bf16).
    out.push_back(
        {act_head, 0, fwd + kF32 * r * s.V + std::max(e.narrow(r * s.V), in.row_loss(r))});
    // ... and, through the backward, dx [n, h] fp32.
    const int64_t base = fwd + kF32 * n * h;
    // mlp_backward: its chunk buffers (LocalInputs::mlp_backward_work); inside, a dy or da chunk
    // narrowed to bf16 for the GEMMs.
    out.push_back(
        {act, 0,
         base + in.mlp_backward_work(r, s.F) + std::max(e.narrow(r * s.F), e.narrow(r * h))});
    // rmsnorm_backward_add: its fp32 temp [n, h] (the bf16 norm kernels read bf16 directly).
    out.push_back({act, 0, base + kF32 * n * h});
    // attention backward: d_o, dq, dk, dv fp32 of every token; inside, dy narrowed for o_proj's
    // backward, then the attention kernel's transients for one row, then dq narrowed for the q
    // projection's backward.
    const int64_t grads = kF32 * (2 * n * qw + 2 * n * kw);
    out.push_back({act, 0,
                   base + grads +
                       std::max({e.narrow(n * h), e.narrow(n * qw),
                                 in.attention_backward_transient(d, s.nh, s.nkv, in.S, in.S)})});
  }
};

const LayoutModelRegistration kRegister("single", std::make_shared<SingleModel>());

}  // namespace
}  // namespace tsp::plan
