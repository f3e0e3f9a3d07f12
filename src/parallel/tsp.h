// What the tsp layout (src/parallel/tsp.cpp) moved in its last forward / forward_backward call,
// per transformer layer and per part, on the layout group's communicator (the replica all-reduce
// of the framework is not included). Tests compare these records exactly with the closed forms
// of docs/communication.md ("tsp"); a Layout built with make_layout(..., "tsp", ...) implements
// TspTrafficReport, so `dynamic_cast<const TspTrafficReport*>(layout.get())` reaches it.
// Bytes are counted at each transfer's dtype: under bf16 the weight broadcasts and ring hops and
// the K/V all-gathers move 2-byte elements; the reductions (partial dP_r, dK/dV, norm gradients)
// and the travelling gradient accumulators stay fp32. Element counts do not depend on the dtype.
#pragma once

#include <vector>

#include "tsp/comm/communicator.h"

namespace tsp {

struct TspTraffic {
  std::vector<CommStats> layer_forward;   // [L] attention rounds + MLP ring of layer l
  std::vector<CommStats> layer_backward;  // [L] zero after forward()
  CommStats embedding_forward;            // vocabulary ring of the embedding lookup
  CommStats head_forward;                 // vocabulary ring of the online cross-entropy
  CommStats head_backward;                // LM-head ring again (travelling gradient)
  CommStats embedding_backward;           // travelling embedding-gradient accumulator
  CommStats norms;                        // one all-reduce of every RMSNorm weight gradient
};

class TspTrafficReport {
 public:
  virtual ~TspTrafficReport() = default;
  virtual const TspTraffic& last_traffic() const = 0;
};

}  // namespace tsp
