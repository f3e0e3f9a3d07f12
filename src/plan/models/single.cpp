// The model of the "single" layout (src/parallel/single.cpp): the whole model on every rank, no
// communication inside the group (D = 1); with R > 1 pure data parallelism.
#include "parallel/registry.h"
#include "plan/model_util.h"

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
  // gradients fp32; e.narrow is the CPU backend's transient bf16 copy of an fp32 operand of a
  // bf16 GEMM (fp32 gradients dy); zero under fp32.
  void local_moments(const LocalInputs& in, std::vector<Moment>& out) const override {
    const Dims s = dims_of(*in.m);
    const ElemBytes& e = in.e;
    const int64_t n = in.Br * in.S, h = s.h, d = s.d, qw = s.nh * d, kw = s.nkv * d;
    const int64_t r = std::min(n, kChunk);
    // All L layers saved (block::LayerSaved) and the final norm's rstd.
    const int64_t act = s.L * saved_bytes(s, n, s.nh, s.nkv, n, e) + kF32 * n;
    // run(): the tokens, x and xn [n, h] (compute dtype), dxn [n, h] fp32 ...
    const int64_t tokens = token_bytes(n, in.S, in.S);
    const int64_t fwd = tokens + 2 * e.act * n * h + kF32 * n * h;
    // loss head, forward and backward fused: one [r, V] fp32 logits chunk (dlogits in place),
    // narrowed for the backward GEMMs under bf16.
    out.push_back({act, 0, fwd + kF32 * r * s.V + e.narrow(r * s.V)});
    // ... and, through the backward, dx [n, h] fp32.
    const int64_t base = fwd + kF32 * n * h;
    // mlp_backward: g, u, da, du fp32 and act (compute dtype) chunks; inside, a dy or da chunk
    // narrowed to bf16 for the GEMMs.
    out.push_back({act, 0,
                   base + 4 * kF32 * r * s.F + e.act * r * s.F +
                       std::max(e.narrow(r * s.F), e.narrow(r * h))});
    // rmsnorm_backward_add: its fp32 temp [n, h] (the bf16 norm kernels read bf16 directly).
    out.push_back({act, 0, base + kF32 * n * h});
    // attention backward: d_o, dq, dk, dv fp32 of every token; inside, dy narrowed for o_proj's
    // backward, then the attention kernel's transients for one row, then dq narrowed for the q
    // projection's backward.
    const int64_t grads = kF32 * (2 * n * qw + 2 * n * kw);
    out.push_back({act, 0,
                   base + grads +
                       std::max({e.narrow(n * h), e.narrow(n * qw),
                                 attention_backward_transient(d, s.nh, s.nkv, in.S, in.S, e)})});
  }
};

const LayoutModelRegistration kRegister("single", std::make_shared<SingleModel>());

}  // namespace
}  // namespace tsp::plan
