// AdamW over a layout's parameter shards, global gradient norm and clipping.
//
// Our compute is fp32, so the layout's fp32 weights ARE the fp32 master copy: the optimizer
// updates ParamShard::value in place and keeps, per shard, the two moments m and v with exactly
// the shard's shape (MemCategory::Optimizer). Optimizer state is therefore sharded exactly like
// the weights of the layout: 1/D under tsp, tp and fsdp-cp, replicated under sp.
#pragma once

#include <cstdint>
#include <vector>

#include "tsp/comm/communicator.h"
#include "tsp/core/tensor.h"
#include "tsp/parallel/layout.h"

namespace tsp {

struct AdamWConfig {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
};

// Decoupled weight decay applies to every matrix (projections, embedding, LM head), as GPT-2,
// nanoGPT and llm.c do, and never to the RMSNorm gains: decaying a gain pulls it towards 0 and
// so rescales the whole residual stream, which is not a regulariser.
bool applies_weight_decay(ParamKind kind);

class AdamW {
 public:
  // Allocates zeroed m and v for every shard (same shapes). The shards' views must stay valid
  // for the optimizer's lifetime (a layout's parameters() do).
  AdamW(std::vector<ParamShard> shards, AdamWConfig config);
  // Over a layout's parameters(), telling the layout after every step that its master values
  // changed (Layout::parameters_updated: under ZeRO-1 the replicas all-gather the update). The
  // layout must outlive the optimizer. Where the store provides the moments (ZeRO-1: its
  // partition, ParamShard::exp_avg) they are used, zeroed, instead of allocated.
  AdamW(Layout& layout, AdamWConfig config);

  // One update with learning rate lr, the gradients multiplied by grad_scale first (gradient
  // clipping and the 1/accumulation factor fold into it, so grads are read once). Increments
  // step_count() before the update (bias correction uses t = 1 on the first step), exactly like
  // torch.optim.AdamW:
  //   g = grad·s;  m = β1·m + (1-β1)·g;  v = β2·v + (1-β2)·g²
  //   w = w·(1 - lr·wd) - lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + eps)
  // Every rank holding a replicated shard applies the same arithmetic to the same inputs, so the
  // copies stay bit-identical.
  void step(double lr, double grad_scale);

  int64_t step_count() const { return t_; }
  void set_step_count(int64_t t) { t_ = t; }  // resume
  const AdamWConfig& config() const { return config_; }
  const std::vector<ParamShard>& shards() const { return shards_; }
  // The moments of shard i ([same shape as the shard], f32).
  TensorView exp_avg(size_t i) const { return m_.at(i); }
  TensorView exp_avg_sq(size_t i) const { return v_.at(i); }

 private:
  std::vector<ParamShard> shards_;
  AdamWConfig config_;
  std::vector<Tensor> owned_;      // the moments this optimizer allocated
  std::vector<TensorView> m_, v_;  // every shard's moments (owned_ or the store's)
  Layout* layout_ = nullptr;       // told after every step, when built over a layout
  int64_t t_ = 0;
  Backend* backend_ = nullptr;  // the device of the shards
};

// Whether this rank's copy of a shard is the one counted in global sums (norms): a shard
// replicated in the layout group is counted on group rank 0 only, and every shard on replica 0
// only (after the data-parallel all-reduce all replicas hold identical gradients), except a part
// partitioned over the replicas (ZeRO-1), which only its replica holds.
bool counts_in_global_sum(const ParamShard& shard, int group_rank, int replica_rank);

// Sum of squares of grad·grad_scale over the shards this rank counts, accumulated in double.
double local_grad_sumsq(const std::vector<ParamShard>& shards, int group_rank, int replica_rank,
                        double grad_scale = 1.0);

// Sums one double per rank over the communicator in rank order (Communicator::sum_host: the
// values gathered, then the same sequential sum on every rank): the result is bit-identical on
// every rank and does not depend on a transport's reduction order. Host control traffic
// (CommStats::control), not the step's data traffic. The data path reduces f32 only, and a global
// norm wants double accumulation.
double sum_over_ranks(Communicator& comm, double value);

// The L2 norm of the whole model's gradient (times grad_scale): every parameter counted once,
// over all shards of all ranks of `world`. Identical on every rank.
double global_grad_norm(const std::vector<ParamShard>& shards, Layout& layout, Communicator& world,
                        double grad_scale = 1.0);

// The factor that brings a gradient of norm `norm` down to max_norm (1 when it is already below
// or when clipping is off, max_norm <= 0), as torch.nn.utils.clip_grad_norm_ computes it.
double clip_factor(double norm, double max_norm);

}  // namespace tsp
