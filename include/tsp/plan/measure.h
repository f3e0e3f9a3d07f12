// Measured against predicted, on this machine: what `tsp bench` and
// tests/plan/measured_vs_predicted_mpi_test.cpp compare.
//
//  - predict_local(): the memory per rank of OUR implementation (fp32 weights, gradients and
//    AdamW moments; the saving policy of include/tsp/model/block.h; the buffers each layout
//    allocates), by MemoryTracker category, at the busiest moment of a training step. The
//    planner's memory_of() (cost_model.h) instead models the paper's mixed-precision stack
//    (bf16 weights, ZeRO optimizer accounting); both share the categories.
//  - predict_local_traffic(): bytes per rank per step, forward and backward, in the Communicator's
//    convention: L × plan::block_comm() (f32) plus what lies outside the blocks (embedding, loss
//    head, norm-gradient and data-parallel all-reduces, the loss reduction).
//  - measure_call_traffic(): the traffic of one call of a layout over every communicator it uses.
#pragma once

#include <cstdint>
#include <functional>

#include "tsp/comm/communicator.h"
#include "tsp/model/config.h"
#include "tsp/parallel/layout.h"
#include "tsp/plan/cost_model.h"

namespace tsp::plan {

// Peak memory per rank of one training step of our implementation: layout `l` (D ranks, R
// replicas), micro-batch of B rows of S tokens over the whole job (each replica takes B/R rows),
// AdamW moments allocated when `optimizer`. Returns the bytes by category at the moment the total
// peaks (MemorySnapshot::at_peak), for the rank with the largest peak.
MemoryBreakdown predict_local_memory(const LlamaConfig& m, const LayoutSpec& l, int64_t B,
                                     int64_t S, bool optimizer);

// Bytes one rank sends and receives in one forward (the loss only) and in the backward part of
// one forward_backward (= forward_backward − forward), f32 elements, for rank `group_rank` of the
// layout group (broadcast roots make ranks differ).
struct StepTraffic {
  Traffic forward;
  Traffic backward;
};
StepTraffic predict_local_traffic(const LlamaConfig& m, const LayoutSpec& l, int64_t B, int64_t S,
                                  int group_rank);

// Runs `call` and returns the traffic it caused on this rank over every communicator the layout
// uses: `world` (the loss reduction), layout.group(), layout.replicas(), and the tensor/sequence
// sub-communicators of tp, sp and tp-sp (through tp_sp_traffic()). blocked_seconds adds up too.
CommStats measure_call_traffic(Layout& layout, Communicator& world,
                               const std::function<void()>& call);

// The cost model's LayoutSpec of a layout built by make_layout (T from tp_sp_degrees for tp-sp).
LayoutSpec layout_spec_of(Layout& layout, int world_size);

}  // namespace tsp::plan
