// Measured against predicted, on this machine: what `tsp bench` and
// tests/plan/measured_vs_predicted_mpi_test.cpp compare.
//
//  - predict_local_memory(): the memory per rank of OUR implementation (fp32 master weights,
//    gradients and AdamW moments, and under bf16 a bf16 compute copy of the weights; the saving
//    policy of include/tsp/model/block.h in the compute dtype; the buffers each layout and the
//    backend allocate), by MemoryTracker category, at the busiest moment of a training step. The
//    planner's memory_of() (cost_model.h) instead models the paper's mixed-precision stack
//    (bf16 weights, ZeRO optimizer accounting); both share the categories.
//  - predict_local_traffic(): bytes per rank per step, forward and backward, in the Communicator's
//    convention: L × plan::block_comm() in the compute dtype plus what lies outside the blocks
//    (embedding, loss head, norm-gradient and data-parallel all-reduces). The loss reduction and
//    the batch checks are host control traffic (CommStats::control), not modelled here.
//  Each layout's part of both is its model's (include/tsp/plan/layout_model.h).
//  - measure_call_traffic(): the traffic of one call of a layout over every communicator it uses.
#pragma once

#include <cstdint>
#include <functional>

#include "tsp/comm/communicator.h"
#include "tsp/core/device.h"
#include "tsp/model/config.h"
#include "tsp/parallel/layout.h"
#include "tsp/plan/cost_model.h"

namespace tsp::plan {

// The backend whose allocations a prediction counts. The layouts and block.cpp allocate the same
// tensors on every device, but the backends' ops allocate different transients (the table "On a
// GPU" of docs/cost-model.md): under CUDA, no CPU attention scratch and no fp32 widening of a bf16
// add's output, but an F64 per-row loss in cross_entropy and, with the v2 flash kernels or cuDNN,
// their scratch in the bf16 attention backward. The default is the CPU backend (and the planner's
// callers need nothing else).
struct MemoryTarget {
  DeviceKind device = DeviceKind::CPU;
  int device_index = 0;  // CUDA: the ordinal (cuDNN's plans are per device)
  // CUDA: bf16 attention with head_dim 64 or 128 runs the v2 flash kernels (TSP_CUDA_FLASH=v2,
  // cuda::set_flash_version); false: v1, the default, which allocates nothing.
  bool flash_v2 = false;
  // CUDA: TSP_CUDA_FLASH=cudnn: the calls the cuDNN path covers run on cuDNN (its transients,
  // LocalInputs::attention_backward_transient), every other flash-sized call on v1.
  bool cudnn = false;
  bool cuda() const { return device == DeviceKind::CUDA; }
  // The MLP's and the loss head's token rows at once on this device (block::token_chunk).
  int64_t token_chunk() const;
};
// The target of a run whose backend is `device`'s, in this process: under CUDA the flash version
// the backend will use (cuda::flash_version(), through the query below); the CPU target for the
// CPU or a build without CUDA.
MemoryTarget memory_target_of(Device device);
// The CUDA backend registers, at load time, whether the v2 flash kernels are in force
// (src/backend/cuda/attention.cpp); the CPU part of the library has no other tie to CUDA.
void set_cuda_flash_v2_query(bool (*v2_in_force)());

// One cuDNN call of the cuDNN attention path (src/backend/cuda/attention_cudnn.cpp: a piece of an
// attention call, attention_cudnn_pieces.h): nq queries against the first nk keys in position
// order, band j - i <= right_bound (or cuda::attn::cudnn::kNoMask), on CUDA device `device`.
struct CudnnPieceQuery {
  bool backward = false;
  int64_t nq = 0, nk = 0;
  int hq = 0, hkv = 0, d = 0;
  int64_t right_bound = 0;
  float scale = 0;
  int device = 0;
};
// The CUDA backend registers, at load time, whether the cuDNN path is in force and the workspace
// cuDNN's plan for a piece asks for (bytes; -1 when cuDNN supports no plan for it, and the call
// then takes the v1 kernels). The workspace is cuDNN's own figure (the engine it picks on this
// device and version), so the model asks for it: the backend builds the plan the call will use
// and caches it.
void set_cuda_cudnn_query(bool (*cudnn_in_force)(),
                          int64_t (*cudnn_workspace)(const CudnnPieceQuery&));

// Peak memory per rank of one training step of our implementation: layout `l` (D ranks, R
// replicas), micro-batch of B rows of S tokens over the whole job (each replica takes B/R rows),
// AdamW moments allocated when `optimizer`, compute dtype `compute` (ParallelConfig::dtype), on
// the backend `target`. Returns the bytes by category at the moment the total peaks
// (MemorySnapshot::at_peak), for the rank with the largest peak. `token_part`: the zigzag part
// of the sequence the rank holds (its sequence index: the group rank, or g / T under tp-sp), for
// that rank's prediction; only the cuDNN path's transients depend on it (the pieces of its
// attention calls: which part is largest depends on the heads), and the default, -1, takes the
// largest over the parts (asking cuDNN for the plans of every part's pieces).
MemoryBreakdown predict_local_memory(const LlamaConfig& m, const LayoutSpec& l, int64_t B,
                                     int64_t S, bool optimizer, DType compute = DType::F32,
                                     Recompute recompute = Recompute::Selective,
                                     MemoryTarget target = {}, int token_part = -1);

// The part of it that lives for the whole run: the ShardStore's slabs (weights, gradients, and
// under ZeRO-1 the replica's partition) and the AdamW moments when `optimizer`. Exact bytes.
MemoryBreakdown predict_state_memory(const LlamaConfig& m, const LayoutSpec& l, bool optimizer,
                                     DType compute = DType::F32);

// Bytes one rank sends and receives in one forward (the loss only) and in the backward part of
// one forward_backward (= forward_backward − forward), at the element sizes of the compute dtype
// (ElemBytes::of), for rank `group_rank` of the layout group (broadcast roots make ranks differ).
// With ZeRO-1 over R > 1 replicas, `update` is the traffic of the optimizer step's weight
// all-gather (Layout::parameters_updated); zero otherwise.
struct StepTraffic {
  Traffic forward;
  Traffic backward;
  Traffic update;
};
StepTraffic predict_local_traffic(const LlamaConfig& m, const LayoutSpec& l, int64_t B, int64_t S,
                                  int group_rank, DType compute = DType::F32,
                                  Recompute recompute = Recompute::Selective);

// Runs `call` and returns the traffic it caused on this rank over every communicator the layout
// uses: `world` (the loss reduction, whose control traffic stays apart in CommStats::control),
// layout.group(), layout.replicas(), and the tensor/sequence sub-communicators of tp, sp and tp-sp
// (through tp_sp_traffic()). blocked_seconds adds up too.
CommStats measure_call_traffic(Layout& layout, Communicator& world,
                               const std::function<void()>& call);

// The cost model's LayoutSpec of a layout built by make_layout (T from tp_sp_degrees for tp-sp).
LayoutSpec layout_spec_of(Layout& layout, int world_size);

}  // namespace tsp::plan
