// The communication of the layouts, each operation next to its backward dual (as Megatron's
// "mappings" pair f and g). A layout's file calls these by name, so reading it shows which
// transfer a forward step makes and which one its backward makes.
//
//   forward                                         | backward (the dual)
//   ------------------------------------------------+------------------------------------------------
//   gather_sequence: each rank's local tokens of a  | reduce_scatter_sequence: the whole sequence's
//     tensor, all-gathered to the whole sequence    |   gradient summed over the ranks, each keeping
//     (K and V under sp, tp-sp, tsp, fsdp-cp)       |   its own tokens' part
//   all_reduce_sum of partial outputs (tp's g:      | identity (every rank holds the same gradient)
//     row-parallel o / down projections)            |
//   identity (tp's f: before column-parallel q/k/v, | all_reduce_sum of the input gradient
//     gate/up)                                      |
//   broadcast of an owner's weight shard (tsp's     | reduce of the shard's gradient to its owner
//     attention rounds)                             |
//   ring step of a weight shard (tsp's MLP and      | ring step of the weight shard and of a
//     vocabulary rings)                             |   travelling gradient accumulator
//   all-gather of weight shards (fsdp)              | reduce-scatter of weight gradients
//
// The first three are written here once; the weight-moving schedules live with the layout whose
// algorithm they are (tsp.cpp, fsdp_cp.cpp), built from the Communicator's primitives.
#pragma once

#include "parallel/layout_common.h"

namespace tsp {

// local [n, c] (this rank's n = B·nl tokens, rows of t) -> full [B·S, c]: every row's tokens of all
// t.parts ranks of `comm`, in the order of t.k_pos (part 0's chunk pair, then part 1's, ...).
// `staging` is a reusable Comm buffer ([parts, n, c] when B > 1; unused when B = 1, where the
// all-gather lands in place). Same dtype in and out; bytes moved at that dtype's size.
void gather_sequence(Backend& be, Communicator& comm, const LocalTokens& t, TensorView local,
                     TensorView full, Tensor& staging);
// gather_sequence in two halves, so the all-gather moves while other work computes (fsdp-cp
// re-gathers K and V during the MLP backward). Until finish returns, `full` and `staging` must not
// be read, reused or freed. When the all-gather does not land in place (see below), `full` is
// written only by finish: start may then get an empty view, and `full` be allocated later.
RequestPtr start_gather_sequence(Backend& be, Communicator& comm, const LocalTokens& t,
                                 TensorView local, TensorView full, Tensor& staging);
void finish_gather_sequence(Backend& be, const LocalTokens& t, RequestPtr request, TensorView full,
                            const Tensor& staging);
// Whether the all-gather lands in `full` itself (one row, or one part): its receive buffer is then
// `full`, else `staging`.
inline bool gather_sequence_in_place(const LocalTokens& t) {
  return t.B == 1 || t.parts == 1;
}
// The dual: full_grad F32 [B·S, c] (this rank's partial gradient of every token) -> local F32
// [n, c] (=) the sum over the ranks of the gradient of this rank's own tokens.
void reduce_scatter_sequence(Backend& be, Communicator& comm, const LocalTokens& t,
                             TensorView full_grad, TensorView local, Tensor& staging);

// t (=) the sum of t over the ranks of comm. Sums happen in fp32: a BF16 tensor travels as fp32
// (widened into a staging buffer, summed, rounded once), so a reduction never accumulates in bf16.
void all_reduce_sum(Backend& be, Communicator& comm, TensorView t);

}  // namespace tsp
