// The cost and memory model of one parallel layout, registered with the layout itself
// (registry.h: LayoutInfo::model), so the planner (cost_model.cpp) and the model of our
// implementation (measure.cpp) ask the layout's model instead of comparing layout names. Adding a
// layout means adding one file, src/parallel/<layout>.cpp: the layout, and at its end its model,
// each registered under the layout's name:
//   static const tsp::LayoutModelRegistration reg("tsp", std::make_shared<TspModel>());
//
// A model answers four kinds of question, each in the units of the code that asks:
//  - geometry: how the layout splits weights, tokens and heads (Split), which factorizations of D
//    ranks exist, what a degree must divide;
//  - the per-block traffic of docs/cost-model.md §2 (block_comm), exact integers;
//  - the paper's mixed-precision memory (§3) and time (§4) of `tsp plan`: the layout-specific
//    pieces that memory_of() and estimate() in cost_model.cpp add up;
//  - OUR implementation (measure.h): the busiest moments of one training step by tracker category,
//    and the traffic outside the blocks, at the compute dtype's element sizes.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tsp/plan/cost_model.h"
#include "tsp/plan/measure.h"

namespace tsp {
class Layout;
}

namespace tsp::plan {

// How a layout splits one replica's model and tokens over its D ranks.
struct Split {
  int64_t w = 1;       // weight shards (matrices, gradients, optimizer state)
  int64_t t = 1;       // token shards (activations of token-wise ops)
  int64_t hd = 1;      // head shards of saved attention tensors (q, o) and of the MLP width
  int64_t heads = 1;   // the head split: num_key_value_heads and intermediate_size divide by it
  int64_t hidden = 1;  // the split of hidden_size (tsp and fsdp-cp cut rows of every matrix)
};

// ---- what estimate() hands a model for the time of one layer (docs §4) ------------------------

// One link class a collective over `k` ranks uses (inside a node or across; cost_model.cpp).
struct Axis {
  int k = 1;
  const Link* link = nullptr;
  bool inter = false;
  double bw() const { return link->group_bw(inter ? 2 : k); }
  double ring_bw() const { return link->bw_bytes_per_s; }  // one neighbour at a time
};
Axis axis_of(const Hardware& hw, int k, int stride);
double t_all_gather(const Axis& a, double block);
double t_all_reduce(const Axis& a, double B);
double t_broadcast(const Axis& a, double B);  // bandwidth-optimal (scatter + all-gather)
double t_ring_hop(const Axis& a, double B);

// Bytes per GPU per step, by link class.
struct Accum {
  double intra = 0, inter = 0;
  void add(const Axis& a, double bytes) { (a.inter ? inter : intra) += bytes; }
};

struct TimeInputs {
  const Workload* w = nullptr;
  const LayoutSpec* l = nullptr;
  const Hardware* hw = nullptr;
  const MemoryAssumptions* a = nullptr;
  double N = 0;                  // tokens per micro-batch per replica
  double e = 2, we = 2, ge = 2;  // bytes: activations, weights, gradients
  double Pm = 0;                 // matrix parameters of one block
  double gemm_rate = 0;          // sustained FLOP/s of GEMMs
  double t_fwd = 0, t_bwd = 0;   // compute of one layer
  double q_proj = 0;             // the q projection (what runs before K/V are needed)
  double in_proj_bwd = 0;        // the backward of the input projections
  bool train = false;
  bool decode = false;
  // The backward's replay of the layer's forward (full recomputation): what the layout's
  // replay_comm moves, not necessarily the whole forward's traffic.
  bool replay = false;
  Axis group;  // the D ranks of the layout group
};
struct LayerTime {
  double exposed = 0;    // communication not hidden behind compute, per layer
  double grad_sync = 0;  // weight-gradient reductions that overlap other layers' backward
  Accum bytes;           // per layer and micro-batch
};

// ---- what measure.cpp hands a model for our implementation -------------------------------------

// One candidate busiest moment of a training step: bytes by category on top of the persistent
// state (weights, gradients, moments). predict_local_memory takes the first of equal totals, as
// MemoryTracker keeps the categories of the first time the total reaches its peak: moments that
// can tie are listed in the order they happen.
struct Moment {
  int64_t act = 0, comm = 0, work = 0, grads_extra = 0;
};

struct LocalInputs {
  const LlamaConfig* m = nullptr;
  const LayoutSpec* l = nullptr;
  int64_t Br = 0, S = 0;                       // rows of this replica, tokens per row
  ElemBytes e;                                 // element sizes of the compute dtype
  Recompute recompute = Recompute::Selective;  // ParallelConfig::recompute
  MemoryTarget target;                         // the backend whose transients are counted
  int token_part = -1;                         // predict_local_memory's (-1: the largest)

  // ---- the backend ops' own transients (Workspace; docs/cost-model.md, "On a GPU"), bytes ----
  // attention_backward's for one call of nq queries × hq heads against nk keys × hkv heads (one
  // row of the batch): the CPU's attention_backward_transient; under CUDA the v2 flash kernels'
  // scratch (flash_v2_backward_scratch) or the cuDNN path's (cudnn_attention_transient) when
  // they serve the call, else none (v1 flash and the reference kernels allocate nothing).
  int64_t attention_backward_transient(int64_t d, int64_t hq, int64_t hkv, int64_t nq,
                                       int64_t nk) const;
  // add(y, x) with a bf16 y and an fp32 x, n elements: the CPU backend adds in an fp32 copy of y
  // (F32Out, cpu_backend.cpp), 4n; the CUDA kernel adds in place, 0. 0 under f32.
  int64_t add_widening(int64_t n) const;
  // linear_forward accumulating into a bf16 y of n elements: the CUDA backend runs the GEMM into
  // an fp32 copy of y (gemm.cpp, "Precision"), 4n; oneDNN's sum post-op needs none, 0.
  int64_t accumulate_widening(int64_t n) const;
  // cross_entropy of m rows: the CUDA backend's per-row F64 loss (row_loss [m], summed in a fixed
  // order), 8m; none on the CPU.
  int64_t row_loss(int64_t m) const;

  // What one layer's set keeps beside selective's under none (block::LayerSaved::allocate_kept):
  // the two normed inputs [n, h] in the compute dtype and the MLP activations of the f FFN rows
  // the rank computes for its n tokens (gate and up fp32, act in the compute dtype); 0 in the
  // other modes. Bytes.
  int64_t kept(int64_t n, int64_t h, int64_t f) const;
  // block::mlp_backward's chunk buffers for r token rows of f FFN rows: da and du fp32, and
  // (selective, full) the recomputed gate and up fp32 and act in the compute dtype. Bytes.
  int64_t mlp_backward_work(int64_t r, int64_t f) const;

  // The saved activations (bytes, MemCategory::Activations) while layer l's forward, its replay
  // or its backward runs (LayoutCommon::run): `set` is one layer's whole block::LayerSaved,
  // `checkpoint` its input x alone. Selective: layers 0..l keep their sets (those above l were
  // freed by their backward, or are not made yet). Full: layers 0..l-1 keep their checkpoints and
  // layer l its whole set (being filled by the forward or the replay, read by the backward).
  int64_t saved_through(int64_t l, int64_t set, int64_t checkpoint) const {
    return recompute == Recompute::Full ? l * checkpoint + set : (l + 1) * set;
  }
  // ... at the loss head, between the last forward and the first backward: every layer's set, or
  // under full every layer's checkpoint.
  int64_t saved_all(int64_t L, int64_t set, int64_t checkpoint) const {
    return L * (recompute == Recompute::Full ? checkpoint : set);
  }
};

class LayoutModel {
 public:
  virtual ~LayoutModel() = default;

  // ---- geometry ---------------------------------------------------------------------------
  virtual Split split(const LayoutSpec& l) const = 0;
  // The LayoutSpecs of this layout for a group of D ranks and R replicas (none when the layout
  // has no form of that size, e.g. single for D > 1).
  virtual std::vector<LayoutSpec> factorizations(const std::string& name, int D, int R) const;
  // "tsp D=8", "tp-sp T=4 S=2" (without the R part, which label() adds).
  virtual std::string label(const LayoutSpec& l) const;
  // Checks specific to the layout (degrees, what they must divide); tsp::Error saying what would
  // work. The common checks (positive degrees, heads, zigzag) are check_layout's.
  virtual void check(const LlamaConfig& m, const LayoutSpec& l) const {}

  // ---- §2 traffic of one block (D > 1; block_comm answers zero at D = 1) -------------------
  virtual BlockComm block_comm(const LlamaConfig& m, const LayoutSpec& l, int64_t N,
                               const ElemBytes& e, bool regather_kv) const = 0;
  // What OUR implementation moves when the backward replays one block's forward (full
  // recomputation, LayoutCommon::run): by default the block's forward traffic again; a layout
  // whose backward already brings something the replay needs (fsdp-cp: the layer's weights)
  // says less.
  virtual Traffic replay_comm(const LlamaConfig& m, const LayoutSpec& l, int64_t N,
                              const ElemBytes& e) const {
    return block_comm(m, l, N, e, false).forward;
  }

  // ---- §3 the paper's memory: the layout-specific pieces of memory_of() ---------------------
  // Whether the weight gradients are replicated inside the group (sp, tp-sp's Σ axis): they are
  // all-reduced, from a bucket copy when MemoryAssumptions::grad_bucket_copy.
  virtual bool grads_replicated_in_group(const LayoutSpec& l) const { return false; }
  // Saved K and V of one layer, bytes (training).
  virtual double saved_kv(const Workload& w, const LayoutSpec& l, const MemoryAssumptions& a) const;
  // Transients of one layer's backward, bytes: {workspace, comm}.
  struct Transients {
    double work = 0, comm = 0;
  };
  virtual Transients layer_transients(const Workload& w, const LayoutSpec& l,
                                      const MemoryAssumptions& a) const;
  // Vocabulary columns of one rank's logits block.
  virtual double loss_vocab_cols(const LlamaConfig& m, const LayoutSpec& l) const;
  // Inference: the head split of the K/V cache, the MLP columns of one rank, and the Comm bytes
  // of a prefill layer and of a decode step.
  virtual double kv_cache_heads_split(const LayoutSpec& l) const { return split(l).hd; }
  virtual double prefill_mlp_cols(const LlamaConfig& m, const LayoutSpec& l) const;
  virtual double prefill_comm(const Workload& w, const LayoutSpec& l,
                              const MemoryAssumptions& a) const {
    return 0;
  }
  virtual double decode_comm(const Workload& w, const LayoutSpec& l,
                             const MemoryAssumptions& a) const {
    return 0;
  }

  // ---- §4 the paper's time ------------------------------------------------------------------
  // Decode: the split of the block's GEMMs and weight reads, and of the K/V cache read.
  virtual double decode_weight_split(const LayoutSpec& l) const { return split(l).w; }
  virtual double decode_kv_split(const LayoutSpec& l) const { return split(l).t; }
  // Communication of one layer: layer_time in every mode (a layout whose sequence-parallel
  // transfers do not happen in decode checks in.decode), then decode_time in decode at D > 1.
  virtual void layer_time(const TimeInputs& in, LayerTime& out) const {}
  virtual void decode_time(const TimeInputs& in, LayerTime& out) const {}

  // ---- our implementation (measure.h) ------------------------------------------------------
  // Weight split of the ShardStore and whether it cuts the RMSNorm weights too.
  virtual int64_t store_split(const LayoutSpec& l) const { return split(l).w; }
  virtual bool store_splits_norms() const { return false; }
  // Whether the norm weights' gradients reach the store only at the end of the backward (tsp at
  // D > 1: one all-reduce of all of them), which puts them in ZeRO-1's end bucket.
  virtual bool norm_grads_final_at_end(const LayoutSpec& l) const { return false; }
  // The candidate busiest moments of one training step (forward_backward, then AdamW).
  virtual void local_moments(const LocalInputs& in, std::vector<Moment>& out) const = 0;
  // Traffic outside the blocks (embedding, loss head, norm gradients), added to L × block_comm.
  virtual void outside_traffic(const LocalInputs& in, StepTraffic& t) const {}
  // The LayoutSpec of a built layout (T for tp-sp).
  virtual LayoutSpec spec_of(Layout& layout, int D, int R) const;
};

// The model registered for a layout name (nullptr when none); the names of all.
const LayoutModel* find_layout_model(const std::string& name);
// Throws tsp::Error naming the registered models when `name` has none.
const LayoutModel& layout_model(const std::string& name);
std::vector<std::string> layout_model_names();

}  // namespace tsp::plan
