// The communicator: the only way ranks talk. One interface, an MPI implementation for CPUs (and
// later NCCL for GPUs). Every call is counted (bytes sent / received per kind of operation) so
// measured traffic can be compared with the formulas of docs/communication.md.
//
// Structure: the public methods of Communicator are non-virtual. They validate the arguments
// (one clear tsp::Error for every bad input, whatever the implementation), count the bytes, time
// the blocking calls, and then call a protected do_* hook. An implementation (MpiCommunicator in
// src/comm/mpi.cpp, a future NCCL one) only moves bytes in its hooks.
//
// Byte-counting convention (per rank, "bandwidth-optimal algorithm" bytes, independent of the
// algorithm MPI actually picks), with B = count · dtype size of the call's buffer argument:
//   send / recv            : sent B / received B
//   sendrecv (one pair)    : one send and one recv: sent B_send, received B_recv
//   broadcast              : root sent B; every other rank received B
//   reduce (to root)       : every non-root sent B; root received B   (the dual of broadcast)
//   all_gather (B per rank): sent (D-1)·B, received (D-1)·B
//   reduce_scatter (B out) : sent (D-1)·B, received (D-1)·B
//   all_reduce (B)         : sent 2(D-1)·B/D, received 2(D-1)·B/D (rounded down)
// Non-blocking variants count like their blocking twins, at start.
// With D = 1 nothing moves, so every collective counts 0 bytes (broadcast and reduce included);
// calls are still counted. (A send to oneself counts B like any send.) split() is set-up traffic
// and is not counted. The control API (check_same, agree_*, any_true, sum_host, gather_host,
// broadcast_host) is counted apart, in CommStats::control, never in the per-op data counts that
// the traffic formulas check.
//
// Matching rule (there are no message tags; NCCL has none): between two ranks, point-to-point
// messages match in the order they are posted. A send from a to b matches the first receive from
// a that b posted and that no earlier send matched (MPI's non-overtaking rule; NCCL's group
// order). So every rank must post its sends, receives and sendrecv pairs in the same program
// order: two rings that share a pair of ranks (a weight ring and a gradient ring, say) interleave
// correctly as long as each rank posts "weight hop k, gradient hop k, weight hop k+1, ..." in
// that same order. A sendrecv pair is one send and one receive posted together.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

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
  // Host control traffic (the control API), counted like all_gather / broadcast; not part of
  // total_sent() / total_received(), which are the data path's traffic.
  CommOpStats control;
  // Wall time spent inside wait()/join_compute() and blocking calls, control calls included.
  double blocked_seconds = 0;
  const CommOpStats& operator[](CommOp op) const { return ops[static_cast<int>(op)]; }
  CommOpStats& operator[](CommOp op) { return ops[static_cast<int>(op)]; }
  int64_t total_sent() const;                           // data path only
  int64_t total_received() const;                       // data path only
  CommStats operator-(const CommStats& earlier) const;  // traffic between two snapshots
  CommStats& operator+=(const CommStats& other);
};

// Where compute runs, for ordering transfers against it. On a GPU this is the compute stream
// (e.g. a cudaStream_t in `handle`); on the CPU there is none (the host is the queue) and the
// handle stays null. It is opaque here so this header needs no device headers.
struct ComputeQueue {
  void* handle = nullptr;
};

// What an implementation returns for a started transfer; the base wraps it in a Request. The
// destructor must not abandon a transfer whose buffers the caller may reuse: it completes it
// (or aborts the job), except while an exception unwinds the stack.
class Transfer {
 public:
  virtual ~Transfer() = default;
  virtual bool test() = 0;  // true once complete (throws tsp::Error on failure); drives progress
  virtual void wait() = 0;  // the host blocks until complete
  // Make work enqueued on the compute queue from now on run after this transfer, without
  // blocking the host (a GPU records an event on the transfer's stream and makes the compute
  // stream wait on it). The default, right for the CPU, is wait().
  virtual void join_compute() { wait(); }
};

// A pending non-blocking operation.
//
// Two ways to finish one, because a GPU implementation runs transfers on their own stream:
//   wait()          the host blocks until the transfer is complete; afterwards the host may read
//                   or write the buffers (CPU semantics).
//   join_compute()  the compute queue (Communicator::set_compute_queue) waits for the transfer:
//                   kernels enqueued afterwards see the received data and may overwrite the sent
//                   buffer, while the host goes on enqueueing. The host itself must not touch the
//                   buffers until the queue is synchronised. On the CPU it is wait().
// One of them (or test() returning true) must happen before the buffers are used; the destructor
// waits if the caller forgot, so no transfer is abandoned. Blocked time goes to stats().
class Request final {
 public:
  Request(std::unique_ptr<Transfer> transfer, std::shared_ptr<CommStats> stats);
  bool test();  // true once complete; also drives progress
  void wait();
  void join_compute();

 private:
  std::unique_ptr<Transfer> transfer_;
  std::shared_ptr<CommStats> stats_;  // shared: a request may outlive its communicator
};
using RequestPtr = std::unique_ptr<Request>;

class Communicator {
 public:
  virtual ~Communicator() = default;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  // Ranks with the same color (>= 0) form a new communicator, ordered by key (then by old rank).
  std::unique_ptr<Communicator> split(int color, int key);

  // ---- the data path: device (or host) buffers, counted in stats().ops ----
  //
  // Reductions are sums and accept F32, I32 and I64; transfers accept any DType. Counts are
  // elements (>= 0); a buffer may be null only when its count is 0; roots and peers are ranks of
  // this communicator.
  void broadcast(void* buf, int64_t count, DType dt, int root);
  // recv holds size()·count_per_rank elements, rank i's block at i·count_per_rank. In place when
  // send is this rank's block of recv; any other overlap of send and recv is rejected.
  void all_gather(const void* send, void* recv, int64_t count_per_rank, DType dt);
  // send holds size()·count_out elements, block i destined to rank i; recv gets count_out. In
  // place when send == recv (recv then holds the size()·count_out input); partial overlap is
  // rejected.
  void reduce_scatter(const void* send, void* recv, int64_t count_out, DType dt);
  void all_reduce(void* buf, int64_t count, DType dt);  // in place
  // recv is only written on root (may be null elsewhere); send may equal recv on root.
  void reduce(const void* send, void* recv, int64_t count, DType dt, int root);
  // Point-to-point, matched in posting order (the matching rule above). For rings use sendrecv.
  void send(const void* buf, int64_t count, DType dt, int dst);
  void recv(void* buf, int64_t count, DType dt, int src);
  // One ring step: send send_count elements to dst and receive recv_count from src, posted
  // together (one grouped pair; a self-pair dst == src == rank() is allowed). The send and
  // receive buffers must not overlap. Counted as one send and one recv.
  void sendrecv(const void* send, int64_t send_count, DType dt, int dst, void* recv,
                int64_t recv_count, int src);
  void barrier();

  // Non-blocking variants: validated and counted like their blocking twins, at start.
  RequestPtr ibroadcast(void* buf, int64_t count, DType dt, int root);
  RequestPtr iall_gather(const void* send, void* recv, int64_t count_per_rank, DType dt);
  RequestPtr ireduce_scatter(const void* send, void* recv, int64_t count_out, DType dt);
  RequestPtr iall_reduce(void* buf, int64_t count, DType dt);
  RequestPtr ireduce(const void* send, void* recv, int64_t count, DType dt, int root);
  RequestPtr isend(const void* buf, int64_t count, DType dt, int dst);
  RequestPtr irecv(void* buf, int64_t count, DType dt, int src);
  RequestPtr isendrecv(const void* send, int64_t send_count, DType dt, int dst, void* recv,
                       int64_t recv_count, int src);

  // Let pending non-blocking transfers of this communicator advance. MPI (Debian's OpenMPI) has no
  // asynchronous progress: a transfer above the eager limit only moves inside MPI calls. Compute
  // loops call progress() between chunks; a background progress thread is an alternative
  // (set_progress_thread in mpi.h).
  void progress();

  // The queue that Request::join_compute() orders transfers against (see ComputeQueue). The
  // default (null handle) is the host; the CPU implementation ignores it.
  void set_compute_queue(ComputeQueue queue);
  ComputeQueue compute_queue() const { return compute_queue_; }

  // ---- the control API: small host values every rank agrees on, counted in stats().control ----
  //
  // Collective: every rank of the communicator calls the same function in the same order. Values
  // live in host memory (never a device buffer), and results are identical on every rank.

  // Throws tsp::Error on every rank if any rank's value differs, naming the values ("sizes
  // disagree across ranks: rank 0 has 4096, rank 2 has 2048").
  void check_same(int64_t value, std::string_view what);
  int64_t agree_max(int64_t value);
  int64_t agree_min(int64_t value);
  double max_host(double value);
  bool any_true(bool value);
  // Sum in rank order on every rank: bit-identical everywhere, whatever the reduction order of
  // the transport.
  double sum_host(double value);
  // Every rank's values, in rank order: size()·mine.size() values (every rank passes as many).
  std::vector<int64_t> gather_host(std::span<const int64_t> mine);
  std::vector<double> gather_host(std::span<const double> mine);
  std::vector<int64_t> gather_host(int64_t mine) { return gather_host(std::span(&mine, 1)); }
  // root's value on every rank.
  int64_t broadcast_host(int64_t value, int root);
  std::string broadcast_host(const std::string& value, int root);  // e.g. an error message

  CommStats& stats() { return *stats_; }
  const CommStats& stats() const { return *stats_; }
  void reset_stats() { *stats_ = CommStats{}; }

 protected:
  Communicator(int rank, int size);

  // ---- hooks: arguments are already validated and counted; only move bytes ----
  // Blocking hooks default to their non-blocking twin and a wait; override them where the
  // transport has a faster blocking call.
  virtual std::unique_ptr<Communicator> do_split(int color, int key) = 0;
  virtual void do_broadcast(void* buf, int64_t count, DType dt, int root);
  virtual void do_all_gather(const void* send, void* recv, int64_t count_per_rank, DType dt);
  virtual void do_reduce_scatter(const void* send, void* recv, int64_t count_out, DType dt);
  virtual void do_all_reduce(void* buf, int64_t count, DType dt);
  virtual void do_reduce(const void* send, void* recv, int64_t count, DType dt, int root);
  virtual void do_send(const void* buf, int64_t count, DType dt, int dst);
  virtual void do_recv(void* buf, int64_t count, DType dt, int src);
  virtual void do_sendrecv(const void* send, int64_t send_count, DType dt, int dst, void* recv,
                           int64_t recv_count, int src);
  virtual void do_barrier() = 0;

  virtual std::unique_ptr<Transfer> do_ibroadcast(void* buf, int64_t count, DType dt, int root) = 0;
  virtual std::unique_ptr<Transfer> do_iall_gather(const void* send, void* recv,
                                                   int64_t count_per_rank, DType dt) = 0;
  virtual std::unique_ptr<Transfer> do_ireduce_scatter(const void* send, void* recv,
                                                       int64_t count_out, DType dt) = 0;
  virtual std::unique_ptr<Transfer> do_iall_reduce(void* buf, int64_t count, DType dt) = 0;
  virtual std::unique_ptr<Transfer> do_ireduce(const void* send, void* recv, int64_t count,
                                               DType dt, int root) = 0;
  virtual std::unique_ptr<Transfer> do_isend(const void* buf, int64_t count, DType dt, int dst) = 0;
  virtual std::unique_ptr<Transfer> do_irecv(void* buf, int64_t count, DType dt, int src) = 0;
  // One grouped pair (NCCL: ncclGroupStart; ncclSend; ncclRecv; ncclGroupEnd).
  virtual std::unique_ptr<Transfer> do_isendrecv(const void* send, int64_t send_count, DType dt,
                                                 int dst, void* recv, int64_t recv_count,
                                                 int src) = 0;
  virtual void do_progress() {}
  // The largest element count one call may move (MPI: INT_MAX, its counts are int), and why;
  // larger calls are rejected before anything is counted.
  struct CountLimit {
    int64_t max = INT64_MAX;
    std::string_view why;
  };
  virtual CountLimit count_limit() const { return {}; }
  virtual void do_set_compute_queue(ComputeQueue) {}

  // Control hooks, host memory: every rank's `bytes_per_rank` bytes into recv in rank order, and
  // root's `bytes` bytes to every rank.
  virtual void do_control_all_gather(const void* send, void* recv, int64_t bytes_per_rank) = 0;
  virtual void do_control_broadcast(void* buf, int64_t bytes, int root) = 0;

 private:
  RequestPtr make_request(std::unique_ptr<Transfer> t);
  template <typename F>
  void timed(F&& call);
  void count(CommOp op, int64_t sent, int64_t received);
  struct Checks;  // the argument checks of every op (communicator.cpp)
  Checks checks() const;
  void control_gather(const void* send, void* recv, int64_t bytes_per_rank);
  void control_broadcast(void* buf, int64_t bytes, int root);

  int rank_ = 0;
  int size_ = 1;
  ComputeQueue compute_queue_;
  std::shared_ptr<CommStats> stats_;
};

// Typed convenience wrappers over tensors/views.
inline void broadcast(Communicator& c, TensorView t, int root) {
  c.broadcast(t.data(), t.numel(), t.dtype(), root);
}
inline void all_reduce(Communicator& c, TensorView t) {
  c.all_reduce(t.data(), t.numel(), t.dtype());
}

}  // namespace tsp
