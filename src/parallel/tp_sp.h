// The tp, sp and tp-sp layouts (src/parallel/tp_sp.cpp): what tests and tools may ask of them
// beyond the Layout interface — the rank map and the traffic of the last step, per layer.
#pragma once

#include <vector>

#include "tsp/comm/communicator.h"
#include "tsp/parallel/layout.h"

namespace tsp {

// Where group rank g sits in a TP×SP group of D = T·Σ ranks. The numbering is the cost model's
// (include/tsp/plan/cost_model.h, LayoutSpec): the tensor index varies fastest,
//   t = g mod T  (which weight shard: head group / FFN slice / vocabulary rows t of T),
//   s = g / T    (which token shard: zigzag chunks s and 2Σ-1-s of every row),
// so a TP group (same s) is T consecutive ranks and an SP group (same t) is every T-th rank.
// tp is T = D (s = 0), sp is T = 1 (t = 0).
struct TpSpCoords {
  int t = 0;  // tensor index in [0, T)
  int s = 0;  // sequence index in [0, Σ)
  bool operator==(const TpSpCoords&) const = default;
};
TpSpCoords tp_sp_coords(int group_rank, int D, int T);  // throws unless T | D and 0 <= g < D

// Traffic of this rank in the last forward_backward() or forward() call, split where the
// algorithm splits (snapshots of Communicator::stats() of the TP and SP sub-communicators before
// and after each piece). docs/communication.md gives the closed forms these equal.
struct TpSpTraffic {
  std::vector<CommStats> layer_forward;   // [L] one transformer block's forward
  std::vector<CommStats> layer_backward;  // [L] its backward, incl. its weight-gradient reduction
  CommStats head_forward;                 // embedding lookup + loss statistics (outside the blocks)
  CommStats head_backward;  // loss-head input gradient + embedding / final norm / LM head grads
};

// Null when `layout` is not one of tp, sp, tp-sp.
const TpSpTraffic* tp_sp_traffic(const Layout& layout);
// The degrees (T, Σ) of a tp, sp or tp-sp layout; throws for another layout.
struct TpSpDegrees {
  int T = 1, sigma = 1;
};
TpSpDegrees tp_sp_degrees(const Layout& layout);

}  // namespace tsp
