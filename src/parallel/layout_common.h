// The framework every layout is built on (see docs/layouts.md):
//
//   * LayoutCommon: splits the world (D·R ranks) into the layout group (D consecutive world ranks)
//     and the replica group (the R ranks with the same group rank); hands each replica its rows of
//     the batch; scales and all-reduces gradients across replicas so a step on the whole batch
//     gives the gradient of the mean loss; reduces the loss so every rank returns the same value;
//     implements load / zero_grads / parameters / gather from a ShardStore.
//   * ShardStore: this rank's shard of every parameter, values in one Weights slab and gradients
//     in one Grads slab, each with a ShardMap saying where the shard sits in the full tensor.
//   * ParamIndex: where each parameter sits in llama_param_specs order.
//
// A layout derives from LayoutCommon, declares its shards in the constructor (store_.add(...),
// then store_.allocate()), and implements run(): forward (and backward) of this replica's rows.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "tsp/comm/communicator.h"
#include "tsp/parallel/layout.h"
#include "tsp/parallel/sharding.h"

namespace tsp {

// ---- Parameter indices --------------------------------------------------------------------------
// Positions in llama_param_specs(config) (the canonical order). lm_head is -1 when tied.
struct ParamIndex {
  struct Layer {
    int input_norm, wq, wk, wv, wo, post_norm, wg, wu, wd;
  };
  int embed = -1, final_norm = -1, lm_head = -1;
  std::vector<Layer> layers;
  explicit ParamIndex(const std::vector<ParamSpec>& specs);
  ParamIndex() = default;
};

// ---- Shards -------------------------------------------------------------------------------------
// Where this rank's shard sits in the full [rows, cols] parameter (1-D norms are [rows]): the whole
// tensor, or piece `piece` of `parts` equal pieces by rows (output features, vocabulary) or by
// columns (input features: o_proj and down_proj under tp/tsp).
struct ShardMap {
  enum class Kind { Whole, Rows, Cols };
  Kind kind = Kind::Whole;
  int parts = 1;
  int piece = 0;
  static ShardMap whole() { return {}; }
  static ShardMap rows(int parts, int piece) { return {Kind::Rows, parts, piece}; }
  static ShardMap cols(int parts, int piece) { return {Kind::Cols, parts, piece}; }
  Shape shard_shape(const Shape& full) const;
  // The rows (Rows) or columns (Cols) of the full tensor held; all rows for Whole.
  Range range(const Shape& full) const;
};

// Reads this shard of a parameter from the source into dst (shard_shape). Column shards read the
// full rows in blocks of at most ~4 MiB and keep their columns, so only one block of one tensor is
// ever in memory beyond the shard itself.
void load_shard(const WeightSource& src, const ParamSpec& spec, const ShardMap& map,
                TensorView dst);

// This rank's shards: one Weights slab, one Grads slab (so replica all-reduce is one call).
class ShardStore {
 public:
  // Declare a shard of specs[param] before allocate(); returns its entry index. A parameter may be
  // declared at most once per rank.
  int add(int param, ShardMap map, bool replicated_in_group);
  // Allocates the slabs (grads zeroed) and learns, over `group`, which piece every group rank
  // holds (for gather). Collective over the group.
  void allocate(const std::vector<ParamSpec>& specs, Communicator& group);

  int size() const { return static_cast<int>(entries_.size()); }
  int entry_of(int param) const;  // -1 when this rank holds no shard of it
  TensorView value(int entry) const;
  TensorView grad(int entry) const;
  // Shorthands by parameter index (throws if not held).
  float* w(int param) const { return value(entry_of_checked(param)).f32(); }
  float* g(int param) const { return grad(entry_of_checked(param)).f32(); }
  const ShardMap& map(int entry) const { return entries_[entry].map; }
  TensorView grad_slab() const { return grads_.view(); }
  TensorView value_slab() const { return values_.view(); }

  void zero_grads() { grads_.zero(); }
  std::vector<ParamShard> shards(const std::vector<ParamSpec>& specs) const;
  void load(const WeightSource& src, const std::vector<ParamSpec>& specs);
  // Reassemble each full parameter on group rank 0, in canonical order, and pass it to sink there.
  // Collective over the group. Each piece comes from the lowest group rank holding it.
  void gather(const std::vector<ParamSpec>& specs, Communicator& group, bool grads,
              const std::function<void(const ParamSpec&, TensorView)>& sink) const;

 private:
  struct Entry {
    int param;
    ShardMap map;
    bool replicated;
    Shape shape;
    int64_t offset;  // elements into the slabs
  };
  int entry_of_checked(int param) const;
  std::vector<Entry> entries_;
  std::vector<int> entry_of_param_;  // by parameter index
  // held_[param][group rank] = piece held by that rank, or -1.
  std::vector<std::vector<int>> held_;
  std::vector<int> parts_;  // by parameter index
  std::vector<ShardMap::Kind> kinds_;
  Tensor values_, grads_;
  bool allocated_ = false;
};

// ---- The base class -----------------------------------------------------------------------------
// This replica's rows of a Batch, split into inputs and labels.
struct ReplicaBatch {
  int64_t B = 0;                // rows of this replica (= batch.B / R)
  int64_t S = 0;                // tokens per row
  int64_t row0 = 0;             // first row of the batch it holds
  std::vector<int32_t> inputs;  // [B, S]
  std::vector<int32_t> labels;  // [B, S]
  // Multiply into dlogits: 1 / (tokens of the WHOLE batch, all replicas), so that summing the
  // replicas' gradients gives the gradient of the mean loss.
  float grad_scale = 0;
};

class LayoutCommon : public Layout {
 public:
  std::string name() const override { return name_; }
  const LlamaConfig& config() const override { return config_; }
  Communicator& group() override { return *group_; }
  Communicator& replicas() override { return *replicas_; }
  void load(const WeightSource& src) override { store_.load(src, specs_); }
  void zero_grads() override { store_.zero_grads(); }
  std::vector<ParamShard> parameters() override { return store_.shards(specs_); }
  void gather(bool grads, const std::function<void(const ParamSpec&, TensorView)>& sink) override;
  // Validate, take this replica's rows, run(), all-reduce gradients over replicas, reduce loss.
  double forward_backward(const Batch& batch) override;
  double forward(const Batch& batch) override;
  // This replica's rows, and in each row input_ranges(S) (after check_batch on B and S).
  TokenNeed token_need(int64_t B, int64_t S) const override;

 protected:
  LayoutCommon(std::string name, const LlamaConfig& config, const ParallelConfig& parallel,
               Communicator& world);

  // The layout's algorithm on this replica's rows: forward, and backward when `backward`
  // (accumulating into store_ gradients, scaled by rb.grad_scale). Returns the SUM of token
  // losses counted by this rank; see loss_partial_.
  virtual double run(const ReplicaBatch& rb, bool backward) = 0;
  // Layout-specific batch checks (e.g. check_zigzag(S, D)), called before run() and by
  // token_need (there on a ReplicaBatch holding B and S only, no tokens).
  virtual void check_batch(const ReplicaBatch& rb) const {}
  // The input positions of each of its replica's rows this rank's run() reads (rb.inputs, and
  // rb.labels at the same places), as increasing half-open ranges of [0, S); empty: all of them.
  // Only these positions are validated; the others may hold kTokenNotRead, so run() must never
  // read them (tests/parallel/token_need_mpi_test.cpp checks every layout). Called after
  // check_batch.
  virtual std::vector<Range> input_ranges(int64_t /*S*/) const { return {}; }

  // True (default): the group's ranks return disjoint partial loss sums from run() (their sum is
  // the replica's loss sum). False: every group rank returns the replica's whole sum (e.g. tp).
  bool loss_partial_ = true;

  const std::vector<ParamSpec>& specs() const { return specs_; }
  int D() const { return D_; }
  int R() const { return R_; }
  int group_rank() const { return group_rank_; }
  int replica() const { return replica_; }
  const ParallelConfig& parallel() const { return parallel_; }

  LlamaConfig config_;
  ParallelConfig parallel_;
  std::vector<ParamSpec> specs_;  // canonical order; never resized (ParamShard points into it)
  ParamIndex idx_;
  ShardStore store_;

 private:
  ReplicaBatch replica_batch(const Batch& batch) const;
  // Ids in [0, V) at every position token_need(B, S) names; a clear error otherwise.
  void check_tokens(const Batch& batch) const;
  double reduce_loss(double local_sum, int64_t tokens);
  double step(const Batch& batch, bool backward);

  std::string name_;
  Communicator& world_;
  std::unique_ptr<Communicator> group_, replicas_;
  int D_ = 1, R_ = 1, group_rank_ = 0, replica_ = 0;
};

}  // namespace tsp
