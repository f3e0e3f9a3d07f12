// MPI implementation of the Communicator (CPU, OpenMPI) and the process-level MPI set-up. The
// base class (communicator.cpp) validates, counts and times every call; this file only moves
// bytes in the do_* hooks.
//
// Decisions worth knowing:
// - Every MPI call returns a code (MPI_ERRORS_RETURN); a non-success code becomes a tsp::Error
//   naming the operation and MPI's own error string.
// - Counts are MPI ints: a call with more than INT_MAX elements (or, for all_gather and
//   reduce_scatter, more than INT_MAX elements in the whole gathered/scattered buffer) is rejected
//   with a tsp::Error rather than chunked (count_limit(), checked by the base). INT_MAX f32 elements are 8 GiB per call, far beyond any
//   single transfer of this project; chunking would turn one request into several.
// - reduce_scatter uses MPI_Reduce_scatter with a recvcounts array: MPI_Reduce_scatter_block was
//   measured 2.5-5x slower on this machine class (docs/platform-notes.md).
// - Point-to-point messages all carry tag 0: sends and receives match in posting order, the rule
//   the interface promises (NCCL has no tags). A sendrecv pair is MPI_Irecv + MPI_Isend.
// - Debian's OpenMPI has no asynchronous progress, so each communicator keeps a registry of its
//   live non-blocking requests; progress() and the optional progress thread test them all.
// - Device buffers (a CUDA build; pointer_device says where a pointer lives) are staged through
//   pinned host memory (device_comm.h's HostStaging): inputs are copied to the host before the MPI
//   call, outputs back to the device once it completed (blocking: before returning; non-blocking:
//   in the test()/wait()/join_compute() that sees completion). MPI itself, including reductions,
//   only ever sees host memory. Host buffers pass straight through (one pointer query each; none
//   in a CPU build), so CPU runs are unchanged. Counting is the base's, so identical.
#include "tsp/comm/mpi.h"

#include <fmt/ranges.h>
#include <mpi.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)  // gcc -fsanitize=address (clang: __has_feature below)
#define TSP_LEAK_CHECK_BEFORE_FINALIZE 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TSP_LEAK_CHECK_BEFORE_FINALIZE 1
#endif
#endif
#ifdef TSP_LEAK_CHECK_BEFORE_FINALIZE
#include <sanitizer/lsan_interface.h>
#endif

#include "tsp/comm/device_comm.h"
#include "tsp/core/error.h"

namespace tsp {
namespace {

// Thread level granted by MPI_Init_thread (-1 before MpiRuntime ran).
std::atomic<int> g_thread_level{-1};

// Poll interval of the progress thread while requests are pending: short enough that a
// rendezvous transfer starts within a fraction of a GEMM chunk, long enough that the thread does
// not monopolise a core shared with compute.
constexpr auto kProgressPollInterval = std::chrono::microseconds(20);

std::string mpi_error_string(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS)
    return fmt::format("MPI error code {}", code);
  return std::string(text, len);
}

// Throws tsp::Error at the caller's location when an MPI call did not succeed.
void check_mpi(int rc, std::string_view what,
               std::source_location where = std::source_location::current()) {
  if (rc != MPI_SUCCESS) [[unlikely]] {
    throw Error(fmt::format("MPI {} failed: {}", what, mpi_error_string(rc)), where);
  }
}

MPI_Datatype mpi_type(DType dt) {
  switch (dt) {
    case DType::F32:
      return MPI_FLOAT;
    case DType::BF16:
      return MPI_UINT16_T;  // moved as raw 16-bit words
    case DType::I32:
      return MPI_INT32_T;
    case DType::I64:
      return MPI_INT64_T;
    case DType::F64:
      return MPI_DOUBLE;
  }
  TSP_FAIL("unknown DType {}", static_cast<int>(dt));
}

// One outstanding non-blocking operation. Shared between its Request handle and the registry of
// its communicator, so either may outlive the other.
struct PendingOp {
  MPI_Request req = MPI_REQUEST_NULL;
  CommOp op = CommOp::Send;
  bool done = false;
  std::string error;  // set when MPI reported an error on completion (possibly on another thread)
  // For irecv: the expected element count and type, checked against the message on completion.
  int64_t expect_count = -1;
  MPI_Datatype type = MPI_DATATYPE_NULL;
  int peer = -1;
  // Arrays MPI may read until completion (MPI_Ireduce_scatter's recvcounts).
  std::vector<int> counts;
};

// Record completion of `p` given its status; caller holds the registry mutex.
void complete_locked(PendingOp& p, const MPI_Status* status, int rc) {
  p.done = true;
  p.req = MPI_REQUEST_NULL;
  if (rc != MPI_SUCCESS) {
    p.error =
        fmt::format("MPI {} failed on completion: {}", comm_op_name(p.op), mpi_error_string(rc));
    return;
  }
  if (p.expect_count >= 0 && status != nullptr) {
    int got = 0;
    MPI_Get_count(status, p.type, &got);
    if (got != p.expect_count) {
      p.error = fmt::format(
          "recv from rank {} got {} elements but {} were expected; sender and receiver disagree on "
          "the message size",
          p.peer, got, p.expect_count);
    }
  }
}

// The live requests of one communicator. All MPI calls on a request handle happen under `mutex`:
// the MPI standard forbids two threads testing/waiting the same request concurrently.
struct RequestRegistry {
  std::mutex mutex;
  std::condition_variable wake;  // wakes the progress thread when work arrives or it must stop
  std::vector<std::shared_ptr<PendingOp>> live;
  bool stop_thread = false;

  void remove_locked(const PendingOp* p) {
    auto it = std::find_if(live.begin(), live.end(), [p](const auto& q) { return q.get() == p; });
    if (it != live.end()) {
      std::swap(*it, live.back());
      live.pop_back();
    }
  }

  // Test every live request once (one MPI_Testsome); completed ones leave the registry. Returns
  // the first error seen (empty when none); errors also stay on their PendingOp for wait().
  std::string test_all_locked() {
    if (live.empty()) return {};
    const int n = static_cast<int>(live.size());
    std::vector<MPI_Request> reqs(n);
    for (int i = 0; i < n; ++i) reqs[i] = live[i]->req;
    std::vector<int> indices(n);
    std::vector<MPI_Status> statuses(n);
    int outcount = 0;
    const int rc = MPI_Testsome(n, reqs.data(), &outcount, indices.data(), statuses.data());
    std::string first_error;
    if (rc != MPI_SUCCESS && rc != MPI_ERR_IN_STATUS) {
      // The whole call failed: every live request is in an unknown state; report on all of them.
      for (auto& p : live) complete_locked(*p, nullptr, rc);
      first_error = live.front()->error;
      live.clear();
      return first_error;
    }
    if (outcount == MPI_UNDEFINED) return {};  // only inactive requests (cannot happen here)
    std::vector<const PendingOp*> finished;
    for (int k = 0; k < outcount; ++k) {
      PendingOp& p = *live[indices[k]];
      const int op_rc = rc == MPI_ERR_IN_STATUS ? statuses[k].MPI_ERROR : MPI_SUCCESS;
      complete_locked(p, &statuses[k], op_rc);
      if (!p.error.empty() && first_error.empty()) first_error = p.error;
      finished.push_back(&p);
    }
    for (const PendingOp* p : finished) remove_locked(p);
    return first_error;
  }
};

// A non-blocking MPI operation, as the base's Request sees it.
class MpiTransfer final : public Transfer {
 public:
  MpiTransfer(std::shared_ptr<RequestRegistry> registry, std::shared_ptr<PendingOp> op)
      : registry_(std::move(registry)), op_(std::move(op)) {}

  ~MpiTransfer() override {
    {
      std::lock_guard lock(registry_->mutex);
      if (op_->done) return;
    }
    // An exception is unwinding the stack: the job is about to abort (run_mpi_main), and the
    // peer of this transfer may never match it, so waiting here could hang the rank forever.
    // The request stays in the registry; the process will not touch its buffer again.
    if (std::uncaught_exceptions() > 0) return;
    try {
      wait();
    } catch (const std::exception& e) {
      abort_job(e.what());  // a destructor cannot throw; an MPI failure must not pass silently
    }
  }

  bool test() override {
    std::string error;
    {
      std::lock_guard lock(registry_->mutex);
      if (!op_->done) {
        int flag = 0;
        MPI_Status status;
        const int rc = MPI_Test(&op_->req, &flag, &status);
        if (rc != MPI_SUCCESS || flag) {
          complete_locked(*op_, &status, rc);
          registry_->remove_locked(op_.get());
        }
      }
      if (!op_->done) return false;
      error = op_->error;
    }
    if (!error.empty()) throw Error(error);
    return true;
  }

  // MPI_Test in a loop rather than MPI_Wait: the request handle may only be touched under the
  // registry mutex, and holding it through a blocking MPI_Wait would stall the progress thread
  // and any other thread's progress(). OpenMPI's MPI_Wait spins on the same progress engine.
  void wait() override {
    while (!test()) {
    }
  }

 private:
  std::shared_ptr<RequestRegistry> registry_;
  std::shared_ptr<PendingOp> op_;
};

// A sendrecv pair: MPI_Isend and MPI_Irecv posted together (Debian's OpenMPI 4 has no MPI-4
// MPI_Isendrecv). Complete when both are.
class PairTransfer final : public Transfer {
 public:
  PairTransfer(std::unique_ptr<Transfer> send, std::unique_ptr<Transfer> recv)
      : send_(std::move(send)), recv_(std::move(recv)) {}
  bool test() override {
    const bool sent = send_->test();  // test both: each call drives progress
    return recv_->test() && sent;
  }
  void wait() override {
    send_->wait();
    recv_->wait();
  }

 private:
  std::unique_ptr<Transfer> send_, recv_;
};

// Host stand-ins for the device buffers of one MPI call. A host buffer passes through: add()
// returns it unchanged and nothing is copied.
class Stage {
 public:
  // The pointer MPI uses for the buffer p of `bytes` bytes. copy_in: the device contents go to the
  // host copy now (after the work queued on the compute stream). out_bytes: how many leading bytes
  // finish() copies back to the device (0 for a pure input).
  void* add(const void* p, int64_t bytes, bool copy_in, int64_t out_bytes) {
    if (p == nullptr || bytes == 0) return const_cast<void*>(p);
    const Device device = pointer_device(p);
    if (device.is_cpu()) return const_cast<void*>(p);
    TSP_CHECK(n_ < static_cast<int>(entries_.size()), "MPI staging: more than {} device buffers",
              entries_.size());
    Entry& e = entries_[n_++];
    e.dev = const_cast<void*>(p);
    e.bytes = bytes;
    e.out_bytes = out_bytes;
    e.device = device;
    e.host = StagingBuffer(static_cast<size_t>(bytes));
    if (copy_in) cuda_comm_hooks()->staging.to_host(e.host.data(), p, bytes, device);
    return e.host.data();
  }
  // The stand-in of a pointer into a buffer added before (the in-place forms); p itself when it is
  // in none (host memory).
  void* alias(const void* p) const {
    const auto x = reinterpret_cast<uintptr_t>(p);
    for (int i = 0; i < n_; ++i) {
      const auto base = reinterpret_cast<uintptr_t>(entries_[i].dev);
      if (x >= base && x < base + static_cast<uintptr_t>(entries_[i].bytes))
        return static_cast<char*>(entries_[i].host.data()) + (x - base);
    }
    return const_cast<void*>(p);
  }
  bool empty() const { return n_ == 0; }
  // Outputs back to the device; once.
  void finish() {
    for (int i = 0; i < n_; ++i) {
      Entry& e = entries_[i];
      if (e.out_bytes > 0)
        cuda_comm_hooks()->staging.to_device(e.dev, e.host.data(), e.out_bytes, e.device);
      e.out_bytes = 0;
    }
  }
  // Keep the host copies allocated forever (a transfer abandoned while an exception unwinds may
  // still write them).
  void leak() {
    for (int i = 0; i < n_; ++i) entries_[i].host.leak();
  }

 private:
  struct Entry {
    void* dev = nullptr;
    int64_t bytes = 0, out_bytes = 0;
    Device device;
    StagingBuffer host;
  };
  std::array<Entry, 2> entries_;  // at most a send and a receive buffer per call
  int n_ = 0;
};

// A non-blocking transfer on staged buffers: the MPI transfer, then the copy back to the device
// when it is seen complete. join_compute() is wait(): the host does the copy.
class StagedTransfer final : public Transfer {
 public:
  StagedTransfer(std::unique_ptr<Transfer> inner, Stage stage)
      : inner_(std::move(inner)), stage_(std::move(stage)) {}
  ~StagedTransfer() override {
    if (done_) return;
    if (std::uncaught_exceptions() > 0) {  // as MpiTransfer: the job is about to abort
      stage_.leak();
      return;
    }
    try {
      wait();
    } catch (const std::exception& e) {
      abort_job(e.what());
    }
  }
  bool test() override {
    if (done_) return true;
    if (!complete([&] { return inner_->test(); })) return false;
    return true;
  }
  void wait() override {
    if (done_) return;
    complete([&] {
      inner_->wait();
      return true;
    });
  }

 private:
  // Runs `poll`; once it reports completion, copies the outputs back. An MPI error completes the
  // transfer too (the buffers are MPI's no longer) and propagates.
  template <typename F>
  bool complete(F&& poll) {
    bool finished = false;
    try {
      finished = poll();
    } catch (...) {
      done_ = true;
      throw;
    }
    if (!finished) return false;
    done_ = true;
    stage_.finish();
    return true;
  }

  std::unique_ptr<Transfer> inner_;
  Stage stage_;
  bool done_ = false;
};

std::unique_ptr<Transfer> staged(std::unique_ptr<Transfer> t, Stage&& stage) {
  if (stage.empty()) return t;  // host buffers: the MPI transfer itself
  return std::make_unique<StagedTransfer>(std::move(t), std::move(stage));
}

int64_t nbytes(int64_t count, DType dt) {
  return count * static_cast<int64_t>(dtype_size(dt));
}

// Sets MPI_ERRORS_RETURN on `comm` and returns its rank and size (for the base constructor).
struct CommPosition {
  int rank = 0, size = 1;
};
CommPosition prepare_comm(MPI_Comm comm) {
  check_mpi(MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN), "Comm_set_errhandler");
  CommPosition p;
  check_mpi(MPI_Comm_rank(comm, &p.rank), "Comm_rank");
  check_mpi(MPI_Comm_size(comm, &p.size), "Comm_size");
  return p;
}

// The hooks of the Communicator: arguments arrive validated and counted (communicator.cpp).
class MpiCommunicator final : public Communicator {
 public:
  // Takes ownership of `comm` (freed in the destructor).
  explicit MpiCommunicator(MPI_Comm comm) : MpiCommunicator(comm, prepare_comm(comm)) {}

  ~MpiCommunicator() override {
    stop_progress_thread();
    int finalized = 0;
    MPI_Finalized(&finalized);
    // MPI_Comm_free is collective-free and defers until pending operations complete.
    if (!finalized) MPI_Comm_free(&comm_);
  }

  void set_progress_thread(bool on) {
    if (!on) {
      stop_progress_thread();
      return;
    }
    if (progress_thread_.joinable()) return;
    TSP_CHECK(g_thread_level.load() >= MPI_THREAD_MULTIPLE,
              "a progress thread needs MPI_THREAD_MULTIPLE, but MPI granted thread level {}; use "
              "progress() between compute chunks instead",
              g_thread_level.load());
    {
      std::lock_guard lock(registry_->mutex);
      registry_->stop_thread = false;
    }
    progress_thread_ = std::thread([reg = registry_] { progress_loop(*reg); });
  }

  int64_t pending() const {
    std::lock_guard lock(registry_->mutex);
    return static_cast<int64_t>(registry_->live.size());
  }

 protected:
  std::unique_ptr<Communicator> do_split(int color, int key) override {
    MPI_Comm sub = MPI_COMM_NULL;
    check_mpi(MPI_Comm_split(comm_, color, key, &sub), "Comm_split");
    return std::make_unique<MpiCommunicator>(sub);
  }

  CountLimit count_limit() const override { return {INT_MAX, "INT_MAX (MPI counts are int)"}; }

  // ---- blocking: MPI's own blocking calls (device buffers staged: see Stage) ----

  void do_broadcast(void* buf, int64_t count, DType dt, int root) override {
    const int64_t b = nbytes(count, dt);
    Stage st;
    void* h = st.add(buf, b, /*copy_in=*/rank() == root, /*out_bytes=*/rank() == root ? 0 : b);
    check_mpi(MPI_Bcast(h, static_cast<int>(count), mpi_type(dt), root, comm_), "Bcast");
    st.finish();
  }

  void do_all_gather(const void* send, void* recv, int64_t count_per_rank, DType dt) override {
    Stage st;
    const auto [hsend, hrecv] = stage_all_gather(st, send, recv, count_per_rank, dt);
    const void* sbuf = all_gather_send(hsend, hrecv, count_per_rank, dt);
    const int n = static_cast<int>(count_per_rank);
    check_mpi(MPI_Allgather(sbuf, n, mpi_type(dt), hrecv, n, mpi_type(dt), comm_), "Allgather");
    st.finish();
  }

  void do_reduce_scatter(const void* send, void* recv, int64_t count_out, DType dt) override {
    Stage st;
    const auto [hsend, hrecv] = stage_reduce_scatter(st, send, recv, count_out, dt);
    std::vector<int> counts(size(), static_cast<int>(count_out));
    const void* sbuf = hsend == hrecv ? MPI_IN_PLACE : hsend;
    check_mpi(MPI_Reduce_scatter(sbuf, hrecv, counts.data(), mpi_type(dt), MPI_SUM, comm_),
              "Reduce_scatter");
    st.finish();
  }

  void do_all_reduce(void* buf, int64_t count, DType dt) override {
    const int64_t b = nbytes(count, dt);
    Stage st;
    void* h = st.add(buf, b, /*copy_in=*/true, /*out_bytes=*/b);
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, h, static_cast<int>(count), mpi_type(dt), MPI_SUM, comm_),
              "Allreduce");
    st.finish();
  }

  void do_reduce(const void* send, void* recv, int64_t count, DType dt, int root) override {
    Stage st;
    const auto [hsend, hrecv] = stage_reduce(st, send, recv, count, dt, root);
    const void* sbuf = (rank() == root && hsend == hrecv) ? MPI_IN_PLACE : hsend;
    check_mpi(MPI_Reduce(sbuf, hrecv, static_cast<int>(count), mpi_type(dt), MPI_SUM, root, comm_),
              "Reduce");
    st.finish();
  }

  void do_send(const void* buf, int64_t count, DType dt, int dst) override {
    Stage st;
    void* h = st.add(buf, nbytes(count, dt), /*copy_in=*/true, /*out_bytes=*/0);
    check_mpi(MPI_Send(h, static_cast<int>(count), mpi_type(dt), dst, kTag, comm_), "Send");
  }

  void do_recv(void* buf, int64_t count, DType dt, int src) override {
    const int64_t b = nbytes(count, dt);
    Stage st;
    void* h = st.add(buf, b, /*copy_in=*/false, /*out_bytes=*/b);
    PendingOp expect;
    expect.op = CommOp::Recv;
    expect.expect_count = count;
    expect.type = mpi_type(dt);
    expect.peer = src;
    MPI_Status status;
    const int rc = MPI_Recv(h, static_cast<int>(count), expect.type, src, kTag, comm_, &status);
    check_mpi(rc, fmt::format("Recv (from rank {}, {} elements)", src, count));
    complete_locked(expect, &status, MPI_SUCCESS);
    if (!expect.error.empty()) throw Error(expect.error);
    st.finish();
  }

  void do_barrier() override { check_mpi(MPI_Barrier(comm_), "Barrier"); }

  // ---- non-blocking (device buffers staged: inputs at start, outputs on completion) ----

  std::unique_ptr<Transfer> do_ibroadcast(void* buf, int64_t count, DType dt, int root) override {
    const int64_t b = nbytes(count, dt);
    Stage st;
    void* h = st.add(buf, b, /*copy_in=*/rank() == root, /*out_bytes=*/rank() == root ? 0 : b);
    auto t = start(CommOp::Broadcast, [&](PendingOp& p) {
      check_mpi(MPI_Ibcast(h, static_cast<int>(count), mpi_type(dt), root, comm_, &p.req),
                "Ibcast");
    });
    return staged(std::move(t), std::move(st));
  }

  std::unique_ptr<Transfer> do_iall_gather(const void* send, void* recv, int64_t count_per_rank,
                                           DType dt) override {
    Stage st;
    const auto [hsend, hrecv] = stage_all_gather(st, send, recv, count_per_rank, dt);
    const void* sbuf = all_gather_send(hsend, hrecv, count_per_rank, dt);
    const int n = static_cast<int>(count_per_rank);
    auto t = start(CommOp::AllGather, [&](PendingOp& p) {
      check_mpi(MPI_Iallgather(sbuf, n, mpi_type(dt), hrecv, n, mpi_type(dt), comm_, &p.req),
                "Iallgather");
    });
    return staged(std::move(t), std::move(st));
  }

  std::unique_ptr<Transfer> do_ireduce_scatter(const void* send, void* recv, int64_t count_out,
                                               DType dt) override {
    Stage st;
    const auto [hsend, hrecv] = stage_reduce_scatter(st, send, recv, count_out, dt);
    const void* sbuf = hsend == hrecv ? MPI_IN_PLACE : hsend;
    auto t = start(CommOp::ReduceScatter, [&](PendingOp& p) {
      p.counts.assign(size(), static_cast<int>(count_out));  // must live until completion
      check_mpi(
          MPI_Ireduce_scatter(sbuf, hrecv, p.counts.data(), mpi_type(dt), MPI_SUM, comm_, &p.req),
          "Ireduce_scatter");
    });
    return staged(std::move(t), std::move(st));
  }

  std::unique_ptr<Transfer> do_iall_reduce(void* buf, int64_t count, DType dt) override {
    const int64_t b = nbytes(count, dt);
    Stage st;
    void* h = st.add(buf, b, /*copy_in=*/true, /*out_bytes=*/b);
    auto t = start(CommOp::AllReduce, [&](PendingOp& p) {
      check_mpi(MPI_Iallreduce(MPI_IN_PLACE, h, static_cast<int>(count), mpi_type(dt), MPI_SUM,
                               comm_, &p.req),
                "Iallreduce");
    });
    return staged(std::move(t), std::move(st));
  }

  std::unique_ptr<Transfer> do_ireduce(const void* send, void* recv, int64_t count, DType dt,
                                       int root) override {
    Stage st;
    const auto [hsend, hrecv] = stage_reduce(st, send, recv, count, dt, root);
    const void* sbuf = (rank() == root && hsend == hrecv) ? MPI_IN_PLACE : hsend;
    auto t = start(CommOp::Reduce, [&](PendingOp& p) {
      check_mpi(MPI_Ireduce(sbuf, hrecv, static_cast<int>(count), mpi_type(dt), MPI_SUM, root,
                            comm_, &p.req),
                "Ireduce");
    });
    return staged(std::move(t), std::move(st));
  }

  std::unique_ptr<Transfer> do_isend(const void* buf, int64_t count, DType dt, int dst) override {
    Stage st;
    void* h = st.add(buf, nbytes(count, dt), /*copy_in=*/true, /*out_bytes=*/0);
    auto t = start(CommOp::Send, [&](PendingOp& p) {
      check_mpi(MPI_Isend(h, static_cast<int>(count), mpi_type(dt), dst, kTag, comm_, &p.req),
                "Isend");
    });
    return staged(std::move(t), std::move(st));
  }

  std::unique_ptr<Transfer> do_irecv(void* buf, int64_t count, DType dt, int src) override {
    const int64_t b = nbytes(count, dt);
    Stage st;
    void* h = st.add(buf, b, /*copy_in=*/false, /*out_bytes=*/b);
    auto t = start(CommOp::Recv, [&](PendingOp& p) {
      p.expect_count = count;
      p.type = mpi_type(dt);
      p.peer = src;
      check_mpi(MPI_Irecv(h, static_cast<int>(count), p.type, src, kTag, comm_, &p.req), "Irecv");
    });
    return staged(std::move(t), std::move(st));
  }

  std::unique_ptr<Transfer> do_isendrecv(const void* send, int64_t send_count, DType dt, int dst,
                                         void* recv, int64_t recv_count, int src) override {
    // The receive first, so a self-pair (dst == src == rank) finds its receive posted. Each half
    // stages its own buffer.
    std::unique_ptr<Transfer> r = do_irecv(recv, recv_count, dt, src);
    std::unique_ptr<Transfer> s = do_isend(send, send_count, dt, dst);
    return std::make_unique<PairTransfer>(std::move(s), std::move(r));
  }

  void do_progress() override {
    std::string error;
    {
      std::lock_guard lock(registry_->mutex);
      error = registry_->test_all_locked();
    }
    if (!error.empty()) throw Error(error);
  }

  // ---- control: host bytes. Blocking collectives on the same communicator: MPI orders them
  // with the data collectives by call order, which every rank shares (a GPU implementation would
  // run these over a host transport instead) ----

  void do_control_all_gather(const void* send, void* recv, int64_t bytes_per_rank) override {
    TSP_CHECK(bytes_per_rank <= INT_MAX, "control all_gather of {} bytes exceeds INT_MAX",
              bytes_per_rank);
    const int n = static_cast<int>(bytes_per_rank);
    check_mpi(MPI_Allgather(send, n, MPI_BYTE, recv, n, MPI_BYTE, comm_), "Allgather (control)");
  }

  void do_control_broadcast(void* buf, int64_t bytes, int root) override {
    TSP_CHECK(bytes <= INT_MAX, "control broadcast of {} bytes exceeds INT_MAX", bytes);
    check_mpi(MPI_Bcast(buf, static_cast<int>(bytes), MPI_BYTE, root, comm_), "Bcast (control)");
  }

 private:
  // Point-to-point messages carry no tag: pairs match in posting order (communicator.h).
  static constexpr int kTag = 0;

  MpiCommunicator(MPI_Comm comm, CommPosition pos)
      : Communicator(pos.rank, pos.size),
        comm_(comm),
        registry_(std::make_shared<RequestRegistry>()) {}

  // In place when the caller's send block already sits at its slot of recv.
  const void* all_gather_send(const void* send, void* recv, int64_t count, DType dt) const {
    const char* slot =
        static_cast<const char*>(recv) + rank() * count * static_cast<int64_t>(dtype_size(dt));
    return (count > 0 && send == slot) ? MPI_IN_PLACE : send;
  }

  // ---- staging of the buffers of the collectives with in-place forms; {send, recv} for MPI ----
  using Pair = std::pair<const void*, void*>;

  // In place (send is this rank's block of recv): recv comes in whole, send is its block there.
  Pair stage_all_gather(Stage& st, const void* send, void* recv, int64_t n, DType dt) const {
    const int64_t b = nbytes(n, dt), total = b * size();
    const char* slot = static_cast<const char*>(recv) + rank() * b;
    const bool in_place = n > 0 && send == slot;
    void* hrecv = st.add(recv, total, /*copy_in=*/in_place, /*out_bytes=*/total);
    const void* hsend = in_place ? st.alias(send) : st.add(send, b, true, 0);
    return {hsend, hrecv};
  }

  // In place (send == recv, holding size·n inputs): one buffer in, its first n elements out.
  Pair stage_reduce_scatter(Stage& st, const void* send, void* recv, int64_t n, DType dt) const {
    const int64_t b = nbytes(n, dt), total = b * size();
    if (send == recv) {
      void* h = st.add(recv, total, /*copy_in=*/true, /*out_bytes=*/b);
      return {h, h};
    }
    const void* hsend = st.add(send, total, true, 0);
    return {hsend, st.add(recv, b, false, b)};
  }

  // recv only matters on the root (elsewhere MPI ignores it and it may be null); in place there
  // when send == recv.
  Pair stage_reduce(Stage& st, const void* send, void* recv, int64_t n, DType dt, int root) const {
    const int64_t b = nbytes(n, dt);
    if (rank() != root) return {st.add(send, b, true, 0), recv};
    if (send == recv) {
      void* h = st.add(recv, b, /*copy_in=*/true, /*out_bytes=*/b);
      return {h, h};
    }
    const void* hsend = st.add(send, b, true, 0);
    return {hsend, st.add(recv, b, false, b)};
  }

  // Start a non-blocking op: `post` fills PendingOp::req; the op joins the registry.
  template <typename F>
  std::unique_ptr<Transfer> start(CommOp op, F&& post) {
    auto p = std::make_shared<PendingOp>();
    p->op = op;
    post(*p);
    {
      std::lock_guard lock(registry_->mutex);
      registry_->live.push_back(p);
    }
    registry_->wake.notify_one();
    return std::make_unique<MpiTransfer>(registry_, std::move(p));
  }

  static void progress_loop(RequestRegistry& reg) {
    std::unique_lock lock(reg.mutex);
    while (!reg.stop_thread) {
      if (reg.live.empty()) {
        reg.wake.wait(lock, [&] { return reg.stop_thread || !reg.live.empty(); });
        continue;
      }
      // Errors stay on their PendingOp; the owner's test()/wait() raises them on its thread.
      reg.test_all_locked();
      lock.unlock();
      std::this_thread::sleep_for(kProgressPollInterval);
      lock.lock();
    }
  }

  void stop_progress_thread() {
    if (!progress_thread_.joinable()) return;
    {
      std::lock_guard lock(registry_->mutex);
      registry_->stop_thread = true;
    }
    registry_->wake.notify_all();
    progress_thread_.join();
  }

  MPI_Comm comm_;
  std::shared_ptr<RequestRegistry> registry_;
  std::thread progress_thread_;
};

MpiCommunicator& as_mpi(Communicator& comm, std::string_view what) {
  auto* mpi = dynamic_cast<MpiCommunicator*>(&comm);
  TSP_CHECK(mpi != nullptr, "{} needs an MPI communicator (MpiRuntime::world() or a split of it)",
            what);
  return *mpi;
}

}  // namespace

// ---- process-level set-up ----

MpiRuntime::MpiRuntime(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  TSP_CHECK(!initialized, "MPI is already initialised: create exactly one MpiRuntime per process");
  int provided = MPI_THREAD_SINGLE;
  {
#ifdef TSP_LEAK_CHECK_BEFORE_FINALIZE
    // Sanitizer build: what OpenMPI allocates while it initialises (PMIx data, component names)
    // is its own business and partly never freed; it is not a tsp leak (docs/testing.md).
    __lsan::ScopedDisabler not_tsp_allocations;
#endif
    check_mpi(MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided), "Init_thread");
  }
  // A lower level is tolerated: everything works from one thread; only set_progress_thread
  // refuses (with an error naming the granted level).
  g_thread_level = provided;
  check_mpi(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN), "Comm_set_errhandler");
  int rank = 0;
  check_mpi(MPI_Comm_rank(MPI_COMM_WORLD, &rank), "Comm_rank");
  set_error_rank(rank);
  // The library works on its own duplicate of the world, so its traffic never matches messages
  // of other code using MPI_COMM_WORLD directly.
  MPI_Comm dup = MPI_COMM_NULL;
  check_mpi(MPI_Comm_dup(MPI_COMM_WORLD, &dup), "Comm_dup");
  world_ = std::make_unique<MpiCommunicator>(dup);
}

MpiRuntime::~MpiRuntime() {
  // Unwinding through the runtime means some rank failed outside run_mpi_main's handler; a
  // finalize now could wait forever for ranks stuck in a collective.
  if (std::uncaught_exceptions() > 0) {
    abort_job("an exception escaped while MPI was running; aborting the job so no rank hangs");
  }
  world_.reset();
#ifdef TSP_LEAK_CHECK_BEFORE_FINALIZE
  // Sanitizer build: look for leaks now, when everything tsp allocated is freed or reachable,
  // rather than at exit. MPI_Finalize unloads OpenMPI's components (dlclose), and what they
  // leave behind would show as leaks from "<unknown module>" that no suppression can name
  // (docs/testing.md). This replaces the check at exit.
  __lsan_do_leak_check();
#endif
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

Communicator& MpiRuntime::world() {
  return *world_;
}

void abort_job(const std::string& message, int exit_code) {
  static std::atomic<bool> printed{false};
  if (!printed.exchange(true)) {
    std::fflush(stdout);
    std::fprintf(stderr, "error: %s\n", message.c_str());
    std::fflush(stderr);
  }
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Abort(MPI_COMM_WORLD, exit_code);
  std::_Exit(exit_code);
}

int run_mpi_main(int argc, char** argv, int (*body)(Communicator& world, int argc, char** argv)) {
  std::unique_ptr<MpiRuntime> mpi;
  try {
    mpi = std::make_unique<MpiRuntime>(&argc, &argv);
  } catch (const std::exception& e) {
    abort_job(e.what());
  }
  int code = 0;
  try {
    code = body(mpi->world(), argc, argv);
  } catch (const Error& e) {
    abort_job(e.what());  // already "[rank N] message (file:line)"
  } catch (const std::exception& e) {
    abort_job(fmt::format("[rank {}] {}", mpi->world().rank(), e.what()));
  } catch (...) {
    abort_job(fmt::format("[rank {}] unknown exception", mpi->world().rank()));
  }
  return code;
}

void set_progress_thread(Communicator& comm, bool on) {
  as_mpi(comm, "set_progress_thread").set_progress_thread(on);
}

int64_t pending_requests(const Communicator& comm) {
  return as_mpi(const_cast<Communicator&>(comm), "pending_requests").pending();
}

}  // namespace tsp
