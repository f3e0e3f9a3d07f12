// tsp's forward weight-moving schedules (docs/tsp-schedule.md, "Forward, one block"), written once
// for the two users of the tsp forward: the training layout (src/parallel/tsp.cpp) and the tsp
// inference engine's prefill (src/infer/seq_sharded.cpp). Each schedule hands the caller's body
// the weight shard in hand as views of a packed buffer; the body computes on this rank's tokens.
//
//   attention_rounds  for r in 0..D-1: head group r's packed attention shard, broadcast by its
//                     owner r (the broadcast of round r+1 started before round r computes)
//   ring_forward      step k: shard s = p - k while it travels p -> p+1 (double buffered)
//
// Shards travel in the compute dtype; with overlap off every transfer is waited for as soon as it
// starts (the same arithmetic in the same order, so results are bitwise equal). At D = 1 each
// schedule runs the body once on the own shard and moves nothing.
#pragma once

#include <functional>
#include <vector>

#include "tsp/backend/backend.h"
#include "tsp/comm/communicator.h"
#include "tsp/core/tensor.h"

namespace tsp {

using Pieces = std::vector<TensorView>;

// A shard made of several tensors that travels as ONE contiguous buffer: the pieces are
// concatenated in order (e.g. [W_gate rows; W_up rows; W_down columns]). The same packing cuts a
// compute-dtype weight buffer and an F32 gradient buffer.
struct Packing {
  std::vector<Shape> shapes;  // of each piece
  int64_t total() const;
  // The pieces as windows of a packed buffer.
  Pieces split(TensorView packed) const;
  void pack(Backend& be, const Pieces& pieces, TensorView packed) const;
  void add_into(Backend& be, const Pieces& pieces, TensorView packed) const;  // pieces += packed
};

// What a schedule runs on: the backend, the group (rank p of D), the dtype shards travel in (the
// compute dtype) and whether transfers overlap the body.
struct ScheduleContext {
  Backend& be;
  Communicator& group;
  DType dtype;
  bool overlap = true;
};

using ShardBody = std::function<void(int s, const Pieces& w)>;

// Forward ring: step k handles shard s = (p - k) mod D, starting with the own shard (`own`, used
// in place). The shard in hand is sent to p+1 while the step computes, and the next one arrives
// from p-1 into the other buffer: D-1 hops of one shard. With keep_last the buffer holding the
// last shard handled (s = p+1) is returned, so a backward ring can start with it.
Tensor ring_forward(const ScheduleContext& ctx, const Packing& pk, const Pieces& own,
                    bool keep_last, const ShardBody& body);

// Attention rounds: round r computes with head group r's packed shard P_r (the pieces of `pk`),
// broadcast by its owner r; the broadcast of P_{r+1} is started before round r computes (two
// buffers: the one of round r-1 is free by then). The owner computes from `own` (the same values).
void attention_rounds(const ScheduleContext& ctx, const Packing& pk, const Pieces& own,
                      const ShardBody& body);

}  // namespace tsp
