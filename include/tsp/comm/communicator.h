// The communicator: the only way ranks talk. One interface, an MPI implementation for CPUs (and
// later NCCL for GPUs). Every call is counted (bytes sent / received per kind of operation) so
// measured traffic can be compared with the formulas of docs/communication.md.
//
// Byte-counting convention (per rank, "bandwidth-optimal algorithm" bytes, independent of the
// algorithm MPI actually picks), with B = count · dtype size of the call's buffer argument:
//   send / recv            : sent B / received B
//   broadcast              : root sent B; every other rank received B
//   reduce (to root)       : every non-root sent B; root received B   (the dual of broadcast)
//   all_gather (B per rank): sent (D-1)·B, received (D-1)·B
//   reduce_scatter (B out) : sent (D-1)·B, received (D-1)·B
//   all_reduce (B)         : sent 2(D-1)·B/D, received 2(D-1)·B/D (rounded down)
// Non-blocking variants count like their blocking twins, at start.
// With D = 1 nothing moves, so every op counts 0 bytes (broadcast and reduce included); calls are
// still counted. split() and check_same() are set-up/validation traffic and are not counted.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "tsp/core/tensor.h"

namespace tsp {

enum class CommOp : int {
  Send,
  Recv,
  Broadcast,
  Reduce,
  AllGather,
  ReduceScatter,
  AllReduce,
  Barrier
};
inline constexpr int kNumCommOps = 8;
std::string_view comm_op_name(CommOp op);  // "send", "all_gather", ...

struct CommOpStats {
  int64_t calls = 0;
  int64_t bytes_sent = 0;
  int64_t bytes_received = 0;
};

struct CommStats {
  std::array<CommOpStats, kNumCommOps> ops{};
  double blocked_seconds = 0;  // wall time spent inside wait()/blocking calls
  const CommOpStats& operator[](CommOp op) const { return ops[static_cast<int>(op)]; }
  CommOpStats& operator[](CommOp op) { return ops[static_cast<int>(op)]; }
  int64_t total_sent() const;
  int64_t total_received() const;
  CommStats operator-(const CommStats& earlier) const;  // traffic between two snapshots
  CommStats& operator+=(const CommStats& other);
};

// A pending non-blocking operation. wait() must be called (or test() return true) before the
// buffers are touched; the destructor waits if the caller forgot, so no transfer is abandoned.
class Request {
 public:
  virtual ~Request() = default;
  virtual bool test() = 0;  // true once complete; also drives progress
  virtual void wait() = 0;
};
using RequestPtr = std::unique_ptr<Request>;

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Ranks with the same color form a new communicator, ordered by key (then by old rank).
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

  // All reductions are sums. Reductions accept F32 (and I32/I64); transfers accept any DType.
  virtual void broadcast(void* buf, int64_t count, DType dt, int root) = 0;
  virtual void all_gather(const void* send, void* recv, int64_t count_per_rank, DType dt) = 0;
  // send holds size()·count_out elements, block i destined to rank i; recv gets count_out.
  virtual void reduce_scatter(const void* send, void* recv, int64_t count_out, DType dt) = 0;
  virtual void all_reduce(void* buf, int64_t count, DType dt) = 0;
  // recv is only written on root (may be null elsewhere); send may equal recv on root.
  virtual void reduce(const void* send, void* recv, int64_t count, DType dt, int root) = 0;
  virtual void send(const void* buf, int64_t count, DType dt, int dst) = 0;
  virtual void recv(void* buf, int64_t count, DType dt, int src) = 0;
  virtual void sendrecv(const void* send, int64_t send_count, DType dt, int dst, void* recv,
                        int64_t recv_count, int src) = 0;
  virtual void barrier() = 0;

  virtual RequestPtr ibroadcast(void* buf, int64_t count, DType dt, int root) = 0;
  virtual RequestPtr iall_gather(const void* send, void* recv, int64_t count_per_rank,
                                 DType dt) = 0;
  virtual RequestPtr ireduce_scatter(const void* send, void* recv, int64_t count_out, DType dt) = 0;
  virtual RequestPtr iall_reduce(void* buf, int64_t count, DType dt) = 0;
  virtual RequestPtr ireduce(const void* send, void* recv, int64_t count, DType dt, int root) = 0;
  virtual RequestPtr isend(const void* buf, int64_t count, DType dt, int dst) = 0;
  virtual RequestPtr irecv(void* buf, int64_t count, DType dt, int src) = 0;
  virtual RequestPtr isendrecv(const void* send, int64_t send_count, DType dt, int dst, void* recv,
                               int64_t recv_count, int src) = 0;

  // Let pending non-blocking transfers of this communicator advance. MPI (Debian's OpenMPI) has no
  // asynchronous progress: a transfer above the eager limit only moves inside MPI calls. Compute
  // loops call progress() between chunks; a background progress thread is an alternative
  // (set_progress_thread).
  virtual void progress() = 0;

  // Agree across all ranks: throws tsp::Error on every rank if any rank's value differs, naming
  // the values ("sizes disagree across ranks: rank 0 has 4096, rank 2 has 2048").
  virtual void check_same(int64_t value, std::string_view what) = 0;

  CommStats& stats() { return stats_; }
  const CommStats& stats() const { return stats_; }
  void reset_stats() { stats_ = CommStats{}; }

 protected:
  CommStats stats_;
};

// Typed convenience wrappers over tensors/views.
inline void broadcast(Communicator& c, TensorView t, int root) {
  c.broadcast(t.data(), t.numel(), t.dtype(), root);
}
inline void all_reduce(Communicator& c, TensorView t) {
  c.all_reduce(t.data(), t.numel(), t.dtype());
}

}  // namespace tsp
