// A parallel layout of the Llama model: how weights and tokens are split over the ranks of one
// model replica (the layout group, D ranks), with R data-parallel replicas on top (world = D·R).
// Every layout computes the same function: the mean cross-entropy over the batch and the gradient
// of every parameter, equal to the single-rank reference up to fp32 rounding.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tsp/backend/backend.h"
#include "tsp/comm/communicator.h"
#include "tsp/core/tensor.h"
#include "tsp/model/config.h"
#include "tsp/model/params.h"
#include "tsp/plan/cost_model.h"  // plan::Recompute: one enum and one spelling for planner and engine

namespace tsp {

struct ParallelConfig {
  std::string layout = "single";  // single | tp | sp | tp-sp | tsp | fsdp-cp
  int tp = 1;                     // T for tp-sp (Σ = D / T)
  int dp = 1;                     // R data-parallel replicas; D = world / R
  // ZeRO stage over the R replicas (0 or 1): with 1 each replica owns 1/R of its shard's fp32
  // master weights and AdamW moments; gradients are reduce-scattered over the replicas, the
  // updated weights all-gathered (docs/layouts.md, "Data parallelism").
  int zero = 0;
  bool overlap = true;  // tsp: prefetch / double-buffer transfers (false: blocking)
  // Activation recomputation of a training step (docs/cost-model.md §3.2; docs/layouts.md,
  // "Recomputation"). Selective (the default): each layer keeps x, q, k, v, o, lse, x2 and the
  // norms' 1/rms, and its backward recomputes the normed inputs and the MLP's gate/up/act. None:
  // each layer also keeps the normed inputs and gate/up/act, and its backward reads them. Full:
  // each layer keeps only its input x; its backward first replays the layer's forward
  // (communication included) into a fresh LayerSaved, then runs as under selective. The three
  // give bit-identical gradients.
  plan::Recompute recompute = plan::Recompute::Selective;
  Device device;  // where weights, activations and compute live (Backend)
  // Compute dtype: F32, or BF16 mixed precision (bf16 weight copies, activations and transfers;
  // fp32 master weights, gradients, statistics and accumulation; docs/design.md).
  DType dtype = DType::F32;
};

// One micro-batch: B rows of S+1 tokens; inputs are the first S of each row, labels the last S.
// With R replicas, replica i takes rows [i·B/R, (i+1)·B/R).
//
// A rank need not hold the whole batch: the positions its layout reads are named by
// Layout::token_need(B, S) (its replica's rows; under sp, tp-sp, tsp and fsdp-cp only its zigzag
// chunks' inputs and their labels). Every other position may hold anything, conventionally
// kTokenNotRead: the layout neither validates nor reads it. The positions it reads must hold ids
// in [0, V), else forward / forward_backward throw tsp::Error (so a wrong need fails loudly).
//
// Packed documents (docs/layouts.md, "Documents"): with doc_sep >= 0 a token equal to doc_sep ends
// its document (it belongs to the document it ends). Within a row, attention never crosses a
// document boundary, RoPE positions restart at 0 with every document, the label after a separator
// (the next document's first token) is not counted in the loss, and every row starts a document
// at position 0. The mean loss divides by the labels counted over the whole batch.
//
// Gradient accumulation over micro-batches that count different numbers of labels (documents):
// loss_denominator > 0 replaces the batch's own count as the divisor of the loss it returns and
// of its gradient. A caller that sets every micro-batch's to their total count
// (Layout::counted_labels, summed) gets the step's exact token mean as the SUM of the returned
// losses and its gradient as the sum of the accumulated ones (docs/layouts.md, "Documents").
struct Batch {
  int64_t B = 0, S = 0;
  std::vector<int32_t> tokens;   // [B, S+1], row-major
  int32_t doc_sep = -1;          // separator token id, in [0, V); -1: no documents
  int64_t loss_denominator = 0;  // > 0: divide the loss sum by this; 0: by the counted labels
};
inline constexpr int32_t kTokenNotRead = -1;

// The tokens of a [B, S+1] batch a rank reads: rows [row_begin, row_end) and, within each row,
// the input positions as half-open ranges of [0, S) in increasing order; the label of input p
// (token p+1) is read with it, so a range [p0, p1) reads tokens p0..p1 of the row.
struct TokenNeed {
  int64_t row_begin = 0, row_end = -1;                    // -1: up to B
  std::vector<std::pair<int64_t, int64_t>> input_ranges;  // empty: all of [0, S)
  // Tokens of a [B, S+1] batch this need reads (inputs and labels, each token once when the
  // ranges do not touch, as token_need's ranges never do).
  int64_t tokens(int64_t B, int64_t S) const {
    const int64_t rows = (row_end < 0 ? B : row_end) - row_begin;
    if (input_ranges.empty()) return rows * (S + 1);
    int64_t per_row = 0;
    for (auto [p0, p1] : input_ranges) per_row += p1 > p0 ? p1 - p0 + 1 : 0;
    return rows * per_row;
  }
};

// Where a layout reads the weights it owns: rows [row_begin, row_end) of a full parameter.
class WeightSource {
 public:
  virtual ~WeightSource() = default;
  virtual void read_rows(const ParamSpec& spec, int64_t row_begin, int64_t row_end,
                         TensorView dst) const = 0;
};
class ModelDirWeights : public WeightSource {  // model.safetensors of a model directory
 public:
  explicit ModelDirWeights(const ModelDir& dir) : dir_(dir) {}
  void read_rows(const ParamSpec& s, int64_t r0, int64_t r1, TensorView dst) const override;

 private:
  const ModelDir& dir_;
};
class RandomWeights : public WeightSource {  // init_param_rows with a seed
 public:
  explicit RandomWeights(uint64_t seed) : seed_(seed) {}
  void read_rows(const ParamSpec& s, int64_t r0, int64_t r1, TensorView dst) const override;

 private:
  uint64_t seed_;
};

// This rank's piece of one parameter and its gradient (same shape), for the optimizer.
struct ParamShard {
  const ParamSpec* spec = nullptr;
  TensorView value;  // f32 master weights (the layout computes with a copy in its compute dtype)
  TensorView grad;   // f32, accumulated by forward_backward
  // True when every rank of the layout group holds an identical copy (e.g. norm weights under
  // tsp, every weight under sp): count it once in global norms, update it identically everywhere.
  bool replicated_in_group = false;
  // For a shard held identically by only some ranks of the group (tp-sp: a weight's T-shard is
  // replicated over the Σ sequence ranks), this rank's index among those holders. Global sums
  // (the gradient norm) count copy 0 only. 0 for a shard no other rank of the group holds.
  int copy_index = 0;
  // ZeRO-1: this is this replica's part of the shard (value and grad are 1-D windows of it), and
  // the other replicas own the rest: every replica counts its part in global sums. The store
  // provides its AdamW moments (exp_avg, exp_avg_sq: F32, the same elements) in its partition;
  // without ZeRO-1 they are empty and the optimizer allocates them.
  bool partitioned_over_replicas = false;
  TensorView exp_avg, exp_avg_sq;
};

class Layout {
 public:
  virtual ~Layout() = default;
  virtual std::string name() const = 0;
  virtual const LlamaConfig& config() const = 0;
  // Read this rank's shards (and nothing else) from the source.
  virtual void load(const WeightSource& src) = 0;
  // Forward and backward of one micro-batch. Gradients are ACCUMULATED into the shards (so
  // gradient accumulation is repeated calls), scaled so that one call on the whole batch gives the
  // gradient of the mean loss over all counted tokens of the batch, all-reduced across replicas.
  // Returns that mean loss, identical on every rank. With batch.loss_denominator > 0 both the
  // loss and the gradient are of (sum of the counted tokens' losses) / loss_denominator instead.
  virtual double forward_backward(const Batch& batch) = 0;
  // Loss only (validation), identical on every rank (loss_denominator as above).
  virtual double forward(const Batch& batch) = 0;
  // The labels the batch counts in its loss over all replicas: B·S, less the labels that follow
  // a document separator (Batch::doc_sep). Validates the batch as forward does, with the same
  // errors. Collective over the world (with documents the ranks of a group read different
  // chunks); identical on every rank.
  virtual int64_t counted_labels(const Batch& batch) = 0;
  // The backend every operation of this layout runs on, and its compute dtype.
  virtual Backend& backend() const = 0;
  virtual DType compute_dtype() const = 0;
  // The tokens of a batch of B rows of S this rank reads in forward / forward_backward (see
  // Batch); a data loader reads only these (DataLoader::set_need). Validates B and S as a step
  // would (rows per replica, zigzag chunks), with the same errors. Default: everything.
  virtual TokenNeed token_need(int64_t /*B*/, int64_t /*S*/) const { return {}; }
  virtual void zero_grads() = 0;
  // This rank's parameters for the optimizer: whole shards, or under ZeRO-1 this replica's parts
  // of them (ParamShard::partitioned_over_replicas).
  virtual std::vector<ParamShard> parameters() = 0;
  // The optimizer changed the master values of parameters(): bring the weights every step
  // computes with up to date (under ZeRO-1: round the owned parts and all-gather them over the
  // replicas; collective over them). AdamW(Layout&, ...) calls it after every step.
  virtual void parameters_updated() = 0;
  // Wait for what parameters_updated() left in flight (ZeRO-1: the replicas' all-gathers of the
  // updated weights, which the next forward otherwise waits for bucket by bucket, behind its
  // compute). The layout's own methods wait for what they touch; code that writes parameters()'
  // views outside them calls this first (AdamW::step does). Reading this replica's parts of them
  // needs no wait: a gather only sends them. Default: nothing is ever left in flight.
  virtual void wait_parameters() {}
  // The ZeRO stage in effect: 1 when the optimizer state is partitioned over R > 1 replicas.
  virtual int zero_stage() const = 0;
  // Reassemble full tensors on world rank 0, one parameter at a time in canonical order:
  // sink(spec, full) is called on world rank 0 only (the view lives until sink returns).
  virtual void gather(bool grads,
                      const std::function<void(const ParamSpec&, TensorView)>& sink) = 0;
  // The communicators: the layout group (D ranks) and the replica group (R ranks).
  virtual Communicator& group() = 0;
  virtual Communicator& replicas() = 0;
};

// Validates the configuration against the world size (clear error saying what would work) and
// builds the layout. `world` must outlive the layout.
std::unique_ptr<Layout> make_layout(const LlamaConfig& config, const ParallelConfig& parallel,
                                    Communicator& world);

}  // namespace tsp
