// Closed-form cost model of every parallel layout: memory per rank by tracker category,
// communication per rank by link class, FLOPs, and step time (compute at peak × efficiency,
// α–β links, the overlap each schedule allows). Derivations: docs/cost-model.md.
//
// The model is written so a measurement can be compared with it line by line:
//  - memory uses the MemoryTracker's categories (weights, grads, optimizer, activations, comm,
//    workspace);
//  - per-block communication uses the Communicator's byte-counting convention (include/tsp/comm/
//    communicator.h), in exact integers, sent and received separately.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "tsp/core/memory.h"
#include "tsp/core/tensor.h"
#include "tsp/model/config.h"

namespace tsp::plan {

enum class Mode { Train, Prefill, Decode };
std::string_view mode_name(Mode m);  // "train", "prefill", "decode"

// Activation recomputation of a training step (docs/cost-model.md §3.2). Per layer:
//  - None: keep every tensor the backward reads: the layer input x, the normed inputs of the
//    attention and of the MLP, q, K/V (as the layout's attention consumed them), o, the attention's
//    log-sum-exp, the post-attention residual x2, the MLP's gate, up and act = silu(gate)·up.
//  - Selective: keep x, q, K/V, o, log-sum-exp and x2; recompute in backward the two normed inputs
//    and the MLP's gate, up, act (the gate/up GEMMs again). The attention's internals (scores,
//    probabilities) are recomputed by the flash-attention backward in every mode.
//  - Full: keep only each layer's input; the backward replays the layer's forward (one more
//    forward of every layer, with its communication: under tsp the attention-shard broadcasts,
//    the MLP ring and the K/V gathers again) and holds that layer's None set meanwhile.
enum class Recompute { None, Selective, Full };
std::string_view recompute_name(Recompute r);  // "none", "selective", "full"
// "none" | "selective" | "full"; throws tsp::Error naming them otherwise.
Recompute parse_recompute(const std::string& s);

// One parallel layout of one model replica (the layout group, D ranks) with R data-parallel
// replicas on top: world = D·R. For tp-sp, D = T·Σ with T (tensor) the inner, fastest-varying
// axis of the rank numbering and Σ (sequence) the outer one; other layouts have T=D,Σ=1 (tp),
// T=1,Σ=D (sp, fsdp-cp) or fold both on one axis (tsp: T=Σ=D).
struct LayoutSpec {
  std::string name = "single";  // single | tp | sp | tp-sp | tsp | fsdp-cp
  int D = 1;                    // ranks per replica
  int T = 1;                    // tp-sp tensor degree (Σ = D / T)
  int R = 1;                    // data-parallel replicas
  // ZeRO stage over the R replicas: 0 = every replica keeps the whole optimizer state of its
  // shard; 1 = each replica owns 1/R of it (fp32 master weights and AdamW moments), gradients
  // are reduce-scattered over the replicas and the updated weights all-gathered.
  int zero = 0;
  // The layout's model (include/tsp/plan/layout_model.h) answers these.
  // Degree by which weights (and grads, optimizer state) are split at rest.
  int weight_shards() const;
  // Degree by which tokens (activations of token-wise ops) are split.
  int token_shards() const;
  // "tsp D=8", "tp-sp T=4 S=2", ...
  std::string label() const;
};

// What one step processes: per replica, `micro_batches` micro-batches of B sequences of S tokens.
// Decode: one new token for each of the B sequences, attending to S cached positions.
struct Workload {
  LlamaConfig model;
  int64_t B = 1;
  int64_t S = 2048;
  int micro_batches = 1;
  Mode mode = Mode::Train;
  // Training only. Full is the paper's configuration (docs/cost-model.md §3.4).
  Recompute recompute = Recompute::Full;
  int64_t tokens_per_microbatch() const { return mode == Mode::Decode ? B : B * S; }
};

// One link class: time of a transfer step = alpha + bytes / bandwidth.
struct Link {
  double alpha_s = 0;         // per-message latency
  double bw_bytes_per_s = 0;  // per GPU, one direction
  // true: a full mesh of point-to-point links (MI300X Infinity Fabric): a group of k GPUs of one
  // node uses k-1 links of bw each. false: a switch (NVSwitch, NIC): bw per GPU whatever k.
  bool mesh = false;
  double group_bw(int k) const;  // per-GPU bandwidth available to a collective over k GPUs
};

struct Hardware {
  std::string name;
  double peak_flops = 0;    // dense matmul peak per GPU (bf16 on GPUs, fp32 on the CPU)
  double gemm_eff = 0.5;    // sustained fraction of peak for GEMMs
  double attn_eff = 0.5;    // sustained fraction of peak for (flash) attention
  double mem_bw = 0;        // HBM bytes/s per GPU (decode is bandwidth bound)
  double mem_capacity = 0;  // bytes per GPU
  int gpus_per_node = 8;
  Link intra;          // inside a node
  Link inter;          // across nodes (rails-only: GPU i's NIC talks to GPU i elsewhere)
  std::string source;  // where the figures come from (printed by `tsp plan`)
};

// "mi300x", "h100", "local" (stored defaults for this machine; see calibrate_local()).
Hardware hardware_profile(const std::string& name);
// Measure this machine: GEMM rate with tsp::gemm (f32, one thread) and the intra-node copy
// bandwidth (a large memcpy: what OpenMPI's shared-memory single-copy transport does).
Hardware calibrate_local();

// The assumptions behind the memory figures, one set for every layout (docs/cost-model.md §3).
// The default is the set that reproduces the paper's published peaks and the shape of its memory
// curve (§3.4, with Recompute::Full): a bf16 mixed-precision stack whose model state is DeepSpeed's
// bf16-optimizer accounting (bf16 weights and gradients, fp32 master weights, fp32 gradient
// accumulator, two fp32 AdamW moments: 20 bytes per parameter) plus a constant framework overhead.
struct MemoryAssumptions {
  double weight_bytes = 2;      // bf16 working weights (and every weight transfer)
  double grad_bytes = 4;        // fp32 gradient accumulator (and every gradient reduction)
  double grad_lowp_bytes = 2;   // bf16 gradient as autograd produces it, beside the accumulator
  double optimizer_bytes = 12;  // fp32 master copy + two fp32 AdamW moments
  int act_bytes = 2;            // activations and communication buffers (bf16)
  // Per GPU, whatever the model and the sequence: the runtime's context, the communication
  // library's buffers and the caching allocator's slack over the live tensors (a measured peak
  // is the allocator's reserved memory). Counted as workspace. §3.4 says where 6 GB comes from.
  double framework_bytes = 6e9;
  // sp and tp-sp keep the gathered K/V for backward, as autograd does with the input of the
  // attention kernel (and as src/parallel/tp_sp.cpp does). tsp (per head group) and fsdp-cp save
  // only the local k, v and re-gather in backward, as their implementations do, whatever this says.
  bool sp_keeps_gathered_kv = true;
  // A rank whose weight gradients must be all-reduced (weights replicated inside the group, as
  // under sp and tp-sp's Σ axis, or across R > 1 replicas) holds a flat bucket copy of its gradient
  // shard (grad_bytes per parameter), so the reduction can overlap backward (PyTorch DDP's
  // default). Counted as comm. ZeRO-1's reduce-scatter over the replicas runs in place on the flat
  // gradient buffer and needs none (docs/cost-model.md §4.5); an all-reduce inside the group (sp,
  // tp-sp's Σ) still does.
  bool grad_bucket_copy = true;

  // ZeRO's mixed-precision accounting (Rajbhandari et al., 2020): bf16 weights and gradients,
  // fp32 master + moments = 16 bytes per parameter, no framework overhead (the planner's
  // assumption set before the curve of §3.4; kept for comparison).
  static MemoryAssumptions zero16() {
    MemoryAssumptions a;
    a.grad_bytes = 2;
    a.grad_lowp_bytes = 0;
    a.framework_bytes = 0;
    return a;
  }
};

// Memory per rank by tracker category, in bytes.
struct MemoryBreakdown {
  std::array<double, kNumMemCategories> bytes{};
  double& operator[](MemCategory c) { return bytes[static_cast<int>(c)]; }
  double operator[](MemCategory c) const { return bytes[static_cast<int>(c)]; }
  double total() const;
};

// Bytes one rank sends and receives (Communicator convention).
struct Traffic {
  int64_t sent = 0;
  int64_t received = 0;
  Traffic& operator+=(const Traffic& o) {
    sent += o.sent;
    received += o.received;
    return *this;
  }
  bool operator==(const Traffic&) const = default;
};

// Bytes per element of each kind of tensor and transfer (docs/cost-model.md §2.1). Our
// implementation under a compute dtype (ElemBytes::of): weights for compute and every weight
// transfer (broadcast, ring, all-gather) and every activation saved or in flight (x, q, k, v, o,
// x2; K/V gathers) in the compute dtype; every gradient and every REDUCTION (reduce,
// reduce-scatter, all-reduce, tsp's travelling gradient accumulators, tp's all-reduces of partial
// outputs and input gradients) in fp32, whatever the compute dtype (decided: gradient reductions
// move fp32; MPI sums fp32 only). uniform(e): every element e bytes (the paper's model).
struct ElemBytes {
  int64_t weight = 4;  // weight copies for compute and weight transfers
  int64_t act = 4;     // activations saved and in flight
  int64_t reduce = 4;  // gradients and every reduction
  static ElemBytes of(DType compute);
  static ElemBytes uniform(int64_t e) { return {e, e, e}; }
  bool mixed() const { return act != reduce; }
  // Bytes of a transient bf16 copy of n fp32 elements (the CPU backend narrows fp32 operands of
  // bf16 GEMMs, e.g. an fp32 gradient dy): zero when the compute dtype is fp32.
  int64_t narrow(int64_t n) const { return mixed() ? act * n : 0; }
};

// Communication of one transformer block per rank, forward and backward, for a micro-batch of
// N tokens per replica. Exact integers for shapes that divide.
// It is the single source of truth for the per-block counts: with ElemBytes::of(dtype) it equals,
// byte for byte, what src/parallel/{tp_sp,tsp,fsdp_cp}.cpp record per layer (their tests assert
// it) in that compute dtype, including the two RMSNorm vectors of the block (reduced with the
// matrices over sp/tp-sp's Σ, gathered and reduce-scattered with the layer by fsdp-cp).
// `regather_kv`: whether sp and tp-sp re-gather K/V in backward (false: they keep them, as
// src/parallel/tp_sp.cpp does, see MemoryAssumptions); tsp and fsdp-cp always re-gather.
// The formula of each layout is its model's (include/tsp/plan/layout_model.h).
struct BlockComm {
  Traffic forward;
  Traffic backward;
};
BlockComm block_comm(const LlamaConfig& m, const LayoutSpec& l, int64_t N, const ElemBytes& e,
                     bool regather_kv = false);
// Our implementation in a compute dtype: ElemBytes::of(compute).
BlockComm block_comm(const LlamaConfig& m, const LayoutSpec& l, int64_t N, DType compute,
                     bool regather_kv = false);
// Every element `elem_bytes` bytes (elem_bytes = 4: our implementation in fp32).
BlockComm block_comm(const LlamaConfig& m, const LayoutSpec& l, int64_t N, int elem_bytes,
                     bool regather_kv = false);

// What the backward's replay of one block's forward moves under full recomputation (docs §4.1):
// the block's forward traffic again, except where the backward already brings it (fsdp-cp gathers
// the layer's weights once for the replay and the backward). Zero at D = 1.
Traffic replay_comm(const LlamaConfig& m, const LayoutSpec& l, int64_t N, const ElemBytes& e);

// Validates a layout against the model and workload; throws tsp::Error saying what would work
// ("tp degree 64 does not divide n_kv_heads=32; use D in {1,2,4,8,16,32}").
void check_layout(const LlamaConfig& m, const LayoutSpec& l, const Workload& w);

// Every valid layout and factorization for `gpus` GPUs (D over the divisors of gpus, R = gpus/D;
// every T·Σ = D for tp-sp). `only_degree` > 0 keeps only D = only_degree.
std::vector<LayoutSpec> enumerate_layouts(const Workload& w, int gpus, int only_degree = 0);

struct Estimate {
  LayoutSpec layout;
  MemoryBreakdown memory;       // per GPU
  bool fits = false;            // memory.total() <= hardware capacity
  double comm_intra_bytes = 0;  // per GPU per step (received), inside a node
  double comm_inter_bytes = 0;  // per GPU per step (received), across nodes
  double flops = 0;             // per GPU per step
  double compute_s = 0;         // per step
  double exposed_comm_s = 0;    // communication not hidden behind compute
  double step_s = 0;
  double tokens_per_s = 0;  // whole job (all replicas); decode: generated tokens/s
  // Of comm_intra_bytes + comm_inter_bytes: the data-parallel traffic over the R replicas
  // (all-reduce of the gradients, or ZeRO-1's reduce-scatter of the gradients + all-gather of the
  // updated weights), per GPU per step (received).
  double comm_replica_bytes = 0;
  Recompute recompute = Recompute::None;  // the workload's mode (training)
};

Estimate estimate(const Workload& w, const LayoutSpec& l, const Hardware& hw,
                  const MemoryAssumptions& a = {});

// The longest sequence a layout can train (Mode::Train, the workload's B, recompute and model)
// on `hw`: the largest S, a multiple of seq_step(), whose memory per GPU fits the capacity.
// S = 0 when not even S = seq_step() fits. Memory grows with S, so the search is a bisection.
struct MaxSeq {
  LayoutSpec layout;
  int64_t S = 0;     // tokens per sequence
  int64_t step = 1;  // the layout's granularity in S (zigzag: 2 x token shards)
  Estimate at;       // the estimate at S (when S > 0)
};
int64_t seq_step(const LayoutSpec& l);
MaxSeq max_seq(const Workload& w, const LayoutSpec& l, const Hardware& hw,
               const MemoryAssumptions& a = {});

// The recommendation: highest predicted tokens/s among layouts that fit (ties: less memory).
// Returns the index into `all`, or -1 when nothing fits; `reason` says why.
int recommend(const std::vector<Estimate>& all, std::string* reason);

}  // namespace tsp::plan
