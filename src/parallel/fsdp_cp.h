// The fsdp-cp layout (src/parallel/fsdp_cp.cpp): what tests and tools may ask of it beyond the
// Layout interface — the traffic of the last step per layer and per part, and how many gathered
// units (a layer, the embedding, the head) it held at once.
#pragma once

#include <vector>

#include "tsp/comm/communicator.h"
#include "tsp/parallel/layout.h"

namespace tsp {

// Traffic of this rank on the layout group's communicator in the last forward_backward() or
// forward() call (the framework's replica all-reduce and loss reduction are not included). Each
// transfer is attributed to the unit it serves, even when it was started earlier as a prefetch
// (layer l+1's weights are gathered while layer l computes): the records are snapshots of
// Communicator::stats() around each start. docs/communication.md ("fsdp-cp") gives the closed
// forms these equal.
struct FsdpCpTraffic {
  std::vector<CommStats> layer_forward;  // [L] layer weights all-gather + K/V all-gather
  // [L] weights re-gather, K/V re-gather, dK/dV and weight-gradient reduce-scatter; zero after
  // forward()
  std::vector<CommStats> layer_backward;
  CommStats embedding_forward;   // all-gather of the embedding for the lookup
  CommStats head_forward;        // all-gather of final norm + LM head (the embedding when tied)
  CommStats head_backward;       // reduce-scatter of final-norm (+ LM-head when untied) gradients
  CommStats embedding_backward;  // reduce-scatter of the embedding gradient (tied: + head part)
  // Most units whose full weights were gathered (or being gathered) at the same time: 2 with
  // prefetch (the one computing and the next), 1 with --no-overlap.
  int max_gathered_units = 0;
};

// Null when `layout` is not fsdp-cp.
const FsdpCpTraffic* fsdp_cp_traffic(const Layout& layout);

}  // namespace tsp
