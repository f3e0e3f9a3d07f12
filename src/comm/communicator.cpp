// Backend-independent parts of the Communicator: op names and traffic-statistics arithmetic.
#include "tsp/comm/communicator.h"

#include "tsp/core/error.h"

namespace tsp {

std::string_view comm_op_name(CommOp op) {
  switch (op) {
    case CommOp::Send:
      return "send";
    case CommOp::Recv:
      return "recv";
    case CommOp::Broadcast:
      return "broadcast";
    case CommOp::Reduce:
      return "reduce";
    case CommOp::AllGather:
      return "all_gather";
    case CommOp::ReduceScatter:
      return "reduce_scatter";
    case CommOp::AllReduce:
      return "all_reduce";
    case CommOp::Barrier:
      return "barrier";
  }
  TSP_FAIL("unknown CommOp {}", static_cast<int>(op));
}

int64_t CommStats::total_sent() const {
  int64_t total = 0;
  for (const CommOpStats& s : ops) total += s.bytes_sent;
  return total;
}

int64_t CommStats::total_received() const {
  int64_t total = 0;
  for (const CommOpStats& s : ops) total += s.bytes_received;
  return total;
}

CommStats CommStats::operator-(const CommStats& earlier) const {
  CommStats d;
  for (int i = 0; i < kNumCommOps; ++i) {
    d.ops[i].calls = ops[i].calls - earlier.ops[i].calls;
    d.ops[i].bytes_sent = ops[i].bytes_sent - earlier.ops[i].bytes_sent;
    d.ops[i].bytes_received = ops[i].bytes_received - earlier.ops[i].bytes_received;
  }
  d.blocked_seconds = blocked_seconds - earlier.blocked_seconds;
  return d;
}

CommStats& CommStats::operator+=(const CommStats& other) {
  for (int i = 0; i < kNumCommOps; ++i) {
    ops[i].calls += other.ops[i].calls;
    ops[i].bytes_sent += other.ops[i].bytes_sent;
    ops[i].bytes_received += other.ops[i].bytes_received;
  }
  blocked_seconds += other.blocked_seconds;
  return *this;
}

}  // namespace tsp
