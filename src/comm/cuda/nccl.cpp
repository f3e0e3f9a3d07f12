// NcclCommunicator (include/tsp/comm/nccl.h) and the CUDA build's hooks for code compiled in every
// build: the pointer query of core/device.h, and device_comm.h's device count, GPU UUIDs, pinned
// staging for the MPI communicator and the NCCL factory, all registered from one static
// initialiser below.
#include "tsp/comm/nccl.h"

#include <cuda_runtime.h>
#include <fmt/format.h>
#include <nccl.h>

#include <array>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "backend/cuda/cuda_common.h"
#include "tsp/comm/device_comm.h"
#include "tsp/comm/mpi.h"  // abort_job
#include "tsp/core/error.h"

namespace tsp {
namespace {

// ---- errors ----

void check_nccl(ncclResult_t r, ncclComm_t comm, std::string_view what,
                std::source_location where = std::source_location::current()) {
  if (r == ncclSuccess) [[likely]]
    return;
  const char* last = ncclGetLastError(comm);
  throw Error(fmt::format("NCCL {} failed: {}{}{}", what, ncclGetErrorString(r),
                          last && *last ? ": " : "", last ? last : ""),
              where);
}

// A failure NCCL found after a call returned (a peer lost, a network error): ncclSuccess or
// ncclInProgress while the communicator is healthy. Throws, and the communicator is aborted as the
// exception unwinds it (~NcclCommunicator), so its kernels stop spinning.
void check_async_error(ncclComm_t comm) {
  ncclResult_t async = ncclSuccess;
  check_nccl(ncclCommGetAsyncError(comm, &async), comm, "CommGetAsyncError");
  if (async == ncclSuccess || async == ncclInProgress) [[likely]]
    return;
  const char* last = ncclGetLastError(comm);
  TSP_FAIL(
      "NCCL reports an asynchronous error: {}{}{}. A transfer of this job cannot finish (a peer "
      "rank died, or the network between ranks failed), so the job stops; resume from its last "
      "checkpoint (tsp train --resume DIR)",
      ncclGetErrorString(async), last && *last ? ": " : "", last ? last : "");
}

// TSP_NCCL_TIMEOUT: how long, in seconds, a transfer may stay unfinished while NCCL reports no
// error before the job stops (NcclCommunicator::check_stalled); 0: no limit. The default, ten
// minutes, is far beyond any one transfer's time and any wait for a peer's compute or
// checkpoint between collectives.
double nccl_timeout_seconds() {
  constexpr double kDefault = 600;
  const char* v = std::getenv("TSP_NCCL_TIMEOUT");
  if (v == nullptr || *v == '\0') return kDefault;
  char* end = nullptr;
  const double s = std::strtod(v, &end);
  TSP_CHECK(end != v && *end == '\0' && std::isfinite(s) && s >= 0,
            "TSP_NCCL_TIMEOUT='{}' is not a number of seconds (0: no limit; default {})", v,
            kDefault);
  return s;
}

// Reductions: the dtypes the base accepts (f32, i32, i64) and f64. Everything else moves as bytes.
ncclDataType_t nccl_sum_type(DType dt) {
  switch (dt) {
    case DType::F32:
      return ncclFloat32;
    case DType::I32:
      return ncclInt32;
    case DType::I64:
      return ncclInt64;
    case DType::F64:
      return ncclFloat64;
    case DType::BF16:
      return ncclBfloat16;
  }
  TSP_FAIL("unknown DType {}", static_cast<int>(dt));
}

size_t nbytes(int64_t count, DType dt) {
  return static_cast<size_t>(count) * dtype_size(dt);
}

// ---- pinned host buffers, cached by size class (the MPI communicator's staging and this file's
// host-buffer staging). cudaMallocHost costs milliseconds and synchronises the device, so freed
// buffers are kept (up to kPinnedCacheBytes) for the next transfer of the same size class. ----

constexpr size_t kPinnedCacheBytes = size_t{1} << 30;

size_t pinned_class(size_t bytes) {
  size_t c = 4096;
  while (c < bytes) c *= 2;
  return c;
}

struct PinnedCache {
  std::mutex mutex;
  std::map<size_t, std::vector<void*>> free;
  size_t cached = 0;
};
PinnedCache& pinned_cache() {
  static PinnedCache* c = new PinnedCache();  // never destroyed: used until the process ends
  return *c;
}

void* pinned_acquire(size_t bytes) {
  const size_t size = pinned_class(bytes);
  PinnedCache& c = pinned_cache();
  {
    std::lock_guard lock(c.mutex);
    auto it = c.free.find(size);
    if (it != c.free.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      c.cached -= size;
      return p;
    }
  }
  void* p = nullptr;
  const cudaError_t e = cudaMallocHost(&p, size);
  TSP_CHECK(e == cudaSuccess, "pinned host staging buffer of {} bytes: cudaMallocHost failed: {}",
            size, cudaGetErrorString(e));
  return p;
}

void pinned_release(void* p, size_t bytes) {
  const size_t size = pinned_class(bytes);
  PinnedCache& c = pinned_cache();
  {
    std::lock_guard lock(c.mutex);
    if (c.cached + size <= kPinnedCacheBytes) {
      c.free[size].push_back(p);
      c.cached += size;
      return;
    }
  }
  cudaFreeHost(p);  // a destructor's path: an error here has nobody to tell
}

// The MPI communicator's copies: ordered after the work queued on the compute stream (which made
// the device data), and complete on return (host waits poll: cuda_common.h).
void staging_to_host(void* host, const void* dev, size_t bytes, Device device) {
  cudaStream_t s = cuda::compute_stream(device.index);
  TSP_CUDA_CHECK(cudaMemcpyAsync(host, dev, bytes, cudaMemcpyDeviceToHost, s));
  cuda::wait_for_stream(s);
}
void staging_to_device(void* dev, const void* host, size_t bytes, Device device) {
  cudaStream_t s = cuda::compute_stream(device.index);
  TSP_CUDA_CHECK(cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, s));
  // The pinned buffer goes back to the cache on return, so the copy must be done.
  cuda::wait_for_stream(s);
}

// ---- device queries ----

std::array<int64_t, 2> device_uuid(int device) {
  const int n = cuda::device_count();
  TSP_CHECK(device >= 0 && device < n, "cuda:{} does not exist: {} CUDA device{} visible", device,
            n, n == 1 ? " is" : "s are");
  cudaDeviceProp prop{};
  TSP_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  std::array<int64_t, 2> out{};
  static_assert(sizeof(prop.uuid.bytes) == sizeof(out));
  std::memcpy(out.data(), prop.uuid.bytes, sizeof out);
  return out;
}

// ---- host buffers on the NCCL data path: staged through device memory ----

// The device stand-ins of the host buffers of one NCCL call. Inputs: host -> pinned (memcpy) ->
// device (async, on the communication stream). Outputs: device -> pinned (async, on the stream,
// after the NCCL call), then pinned -> host on the host once the transfer is seen complete.
// Device buffers pass through (checked to be on this communicator's device).
class HostStage {
 public:
  HostStage(cudaStream_t stream, int device) : stream_(stream), device_(device) {}
  // The moved-from stage owns nothing (its destructor must not free the device copies again).
  HostStage(HostStage&& o) noexcept
      : stream_(o.stream_),
        device_(o.device_),
        entries_(std::move(o.entries_)),
        n_(std::exchange(o.n_, 0)) {}
  HostStage& operator=(HostStage&&) = delete;
  ~HostStage() { release_device(); }

  void* add(const void* p, size_t bytes, bool copy_in, size_t out_bytes) {
    if (p == nullptr || bytes == 0) return const_cast<void*>(p);
    const Device d = pointer_device(p);
    if (!d.is_cpu()) {
      TSP_CHECK(d.index == device_,
                "NCCL communicator on cuda:{} was given a buffer on cuda:{}; NCCL moves only "
                "memory of its own device",
                device_, d.index);
      return const_cast<void*>(p);
    }
    TSP_CHECK(n_ < static_cast<int>(entries_.size()), "NCCL staging: more than {} host buffers",
              entries_.size());
    Entry& e = entries_[n_++];
    e.host = const_cast<void*>(p);
    e.bytes = bytes;
    e.out_bytes = out_bytes;
    e.pinned = StagingBuffer(bytes);
    TSP_CUDA_CHECK(cudaMallocAsync(&e.dev, bytes, stream_));
    if (copy_in) {
      std::memcpy(e.pinned.data(), p, bytes);
      TSP_CUDA_CHECK(
          cudaMemcpyAsync(e.dev, e.pinned.data(), bytes, cudaMemcpyHostToDevice, stream_));
    }
    return e.dev;
  }
  // The stand-in of a pointer into a buffer added before (in-place forms); p when in none.
  void* alias(const void* p) const {
    const auto x = reinterpret_cast<uintptr_t>(p);
    for (int i = 0; i < n_; ++i) {
      const auto base = reinterpret_cast<uintptr_t>(entries_[i].host);
      if (x >= base && x < base + entries_[i].bytes)
        return static_cast<char*>(entries_[i].dev) + (x - base);
    }
    return const_cast<void*>(p);
  }
  bool empty() const { return n_ == 0; }

  // After the NCCL call, on the stream: outputs to their pinned buffers, then the device memory
  // goes back to the stream-ordered pool.
  void enqueue_copy_out() {
    for (int i = 0; i < n_; ++i) {
      Entry& e = entries_[i];
      if (e.out_bytes > 0)
        TSP_CUDA_CHECK(
            cudaMemcpyAsync(e.pinned.data(), e.dev, e.out_bytes, cudaMemcpyDeviceToHost, stream_));
    }
    release_device();
  }
  // On the host, once the stream passed the copies: pinned -> the caller's host buffers.
  void finish() {
    for (int i = 0; i < n_; ++i) {
      Entry& e = entries_[i];
      if (e.out_bytes > 0) std::memcpy(e.host, e.pinned.data(), e.out_bytes);
      e.out_bytes = 0;
    }
  }
  void leak() {
    for (int i = 0; i < n_; ++i) entries_[i].pinned.leak();
  }

 private:
  void release_device() {
    for (int i = 0; i < n_; ++i) {
      if (entries_[i].dev != nullptr) cudaFreeAsync(entries_[i].dev, stream_);
      entries_[i].dev = nullptr;
    }
  }
  struct Entry {
    void* host = nullptr;
    void* dev = nullptr;
    size_t bytes = 0, out_bytes = 0;
    StagingBuffer pinned;
  };
  cudaStream_t stream_;
  int device_;
  std::array<Entry, 2> entries_;
  int n_ = 0;
};

// ---- the transfer: an event on the communication stream ----

class NcclTransfer final : public Transfer {
 public:
  NcclTransfer(cudaEvent_t done, cudaStream_t compute, HostStage stage)
      : done_(done), compute_(compute), stage_(std::move(stage)) {}

  ~NcclTransfer() override {
    if (!complete_ && !joined_) {
      if (stage_.empty()) {
        // Device buffers only: order later compute work (which may reuse the buffers) after it.
        cudaStreamWaitEvent(compute_, done_, 0);
      } else if (std::uncaught_exceptions() > 0) {
        stage_.leak();  // the job is about to abort; the stream may still write the pinned copies
      } else {
        try {
          wait();
        } catch (const std::exception& e) {
          abort_job(e.what());  // a destructor cannot throw; a failed transfer must not pass
        }
      }
    }
    cudaEventDestroy(done_);  // released by the runtime once the event completed
  }

  bool test() override {
    if (complete_) return true;
    const cudaError_t e = cudaEventQuery(done_);
    if (e == cudaErrorNotReady) {
      cuda::check_device_watches();  // this and every communicator: errors, stalled transfers
      return false;
    }
    TSP_CHECK(e == cudaSuccess, "NCCL transfer failed on the device: {} ({})",
              cudaGetErrorString(e), cudaGetErrorName(e));
    finish();
    return true;
  }

  // Polls rather than cudaEventSynchronize: when a peer is lost, NCCL's kernels wait for it for
  // ever and the event never completes; the communicator's asynchronous error says so (NCCL's
  // "Asynchronous errors and error handling": poll ncclCommGetAsyncError while waiting), or,
  // when NCCL says nothing, the transfer's age (NcclCommunicator::check_stalled).
  void wait() override {
    while (!test()) std::this_thread::yield();
  }

  void join_compute() override {
    if (complete_ || joined_) return;
    if (!stage_.empty()) {  // host buffers are filled by the host
      wait();
      return;
    }
    TSP_CUDA_CHECK(cudaStreamWaitEvent(compute_, done_, 0));
    joined_ = true;
  }

  bool host_staged() const { return !stage_.empty(); }

 private:
  void finish() {
    complete_ = true;
    stage_.finish();
  }

  cudaEvent_t done_;
  cudaStream_t compute_;
  HostStage stage_;
  bool complete_ = false, joined_ = false;
};

// ---- the communicator ----

class NcclCommunicator final : public Communicator {
 public:
  // comm: an NCCL communicator already made for these ranks (a split), or null to bootstrap one
  // over `mpi` (collective).
  NcclCommunicator(std::unique_ptr<Communicator> mpi, int device, ncclComm_t comm = nullptr)
      : Communicator(mpi->rank(), mpi->size()), mpi_(std::move(mpi)), device_(device), comm_(comm) {
    timeout_s_ = nccl_timeout_seconds();       // first: a bad value fails before NCCL is set up
    compute_ = cuda::compute_stream(device_);  // also makes device_ current
    if (comm_ == nullptr) bootstrap();
    int least = 0, greatest = 0;
    TSP_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    // High priority: transfer kernels start promptly next to long GEMMs, so prefetches overlap.
    TSP_CUDA_CHECK(cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, greatest));
    TSP_CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
    // Every host wait for the device (cuda::wait_for_stream) asks this communicator whether its
    // operations can still finish: a lost peer ends the wait with NCCL's error, a peer that
    // stopped with the timeout's (check_stalled), never a hang.
    watch_ = cuda::add_device_watch(device_, stream_, [this] {
      check_async_error(comm_);
      check_stalled();
    });
  }

  ~NcclCommunicator() override {
    cudaSetDevice(device_);
    if (comm_ != nullptr) {
      std::string failure;  // why this communicator's last operations cannot finish
      if (std::uncaught_exceptions() == 0) {
        try {
          cuda::wait_for_stream(stream_);
        } catch (const std::exception& e) {
          failure = e.what();
        }
      }
      cuda::remove_device_watch(watch_);
      if (std::uncaught_exceptions() == 0 && failure.empty()) {
        ncclCommDestroy(comm_);
      } else {
        ncclCommAbort(comm_);  // peers may never come: do not wait for them
        // Not unwinding an error: this one is the job's, and nothing may exit as if it passed.
        if (!failure.empty()) abort_job(failure);
      }
    }
    for (const InFlight& f : in_flight_) cudaEventDestroy(f.marker);
    for (cudaEvent_t e : spare_markers_) cudaEventDestroy(e);
    if (ready_) cudaEventDestroy(ready_);
    if (stream_) cudaStreamDestroy(stream_);
  }

 protected:
  std::unique_ptr<Communicator> do_split(int color, int key) override {
    std::unique_ptr<Communicator> sub = mpi_->split(color, key);
    cuda::set_device(device_);
    ncclComm_t c = nullptr;
    check_nccl(ncclCommSplit(comm_, color, key, &c, nullptr), comm_, "CommSplit");
    int r = -1;
    check_nccl(ncclCommUserRank(c, &r), c, "CommUserRank");
    TSP_CHECK(r == sub->rank(),
              "ncclCommSplit ordered the ranks unlike MPI_Comm_split: NCCL rank {}, MPI rank {} "
              "(color {}, key {})",
              r, sub->rank(), color, key);
    return std::make_unique<NcclCommunicator>(std::move(sub), device_, c);
  }

  // ---- blocking: launch, then order the compute stream after it (host buffers: wait) ----

  void do_broadcast(void* buf, int64_t count, DType dt, int root) override {
    settle(do_ibroadcast(buf, count, dt, root));
  }
  void do_all_gather(const void* send, void* recv, int64_t n, DType dt) override {
    settle(do_iall_gather(send, recv, n, dt));
  }
  void do_reduce_scatter(const void* send, void* recv, int64_t n, DType dt) override {
    settle(do_ireduce_scatter(send, recv, n, dt));
  }
  void do_all_reduce(void* buf, int64_t count, DType dt) override {
    settle(do_iall_reduce(buf, count, dt));
  }
  void do_reduce(const void* send, void* recv, int64_t count, DType dt, int root) override {
    settle(do_ireduce(send, recv, count, dt, root));
  }
  void do_send(const void* buf, int64_t count, DType dt, int dst) override {
    settle(do_isend(buf, count, dt, dst));
  }
  void do_recv(void* buf, int64_t count, DType dt, int src) override {
    settle(do_irecv(buf, count, dt, src));
  }
  void do_sendrecv(const void* send, int64_t send_count, DType dt, int dst, void* recv,
                   int64_t recv_count, int src) override {
    settle(do_isendrecv(send, send_count, dt, dst, recv, recv_count, src));
  }
  // A host barrier: device work is ordered by events, not by barriers.
  void do_barrier() override { mpi_->barrier(); }

  // ---- non-blocking ----

  std::unique_ptr<Transfer> do_ibroadcast(void* buf, int64_t count, DType dt, int root) override {
    const size_t b = nbytes(count, dt);
    return launch("broadcast", b, [&](HostStage& st) {
      void* d = st.add(buf, b, /*copy_in=*/rank() == root, /*out_bytes=*/rank() == root ? 0 : b);
      if (b > 0)
        check_nccl(ncclBroadcast(d, d, b, ncclUint8, root, comm_, stream_), comm_, "Broadcast");
    });
  }

  std::unique_ptr<Transfer> do_iall_gather(const void* send, void* recv, int64_t n,
                                           DType dt) override {
    const size_t b = nbytes(n, dt), total = b * size();
    return launch("all-gather", total, [&](HostStage& st) {
      // In place when send is this rank's block of recv: NCCL's in-place form too.
      const bool in_place = b > 0 && send == static_cast<const char*>(recv) + rank() * b;
      void* drecv = st.add(recv, total, /*copy_in=*/in_place, /*out_bytes=*/total);
      const void* dsend = in_place ? st.alias(send) : st.add(send, b, true, 0);
      if (b > 0)
        check_nccl(ncclAllGather(dsend, drecv, b, ncclUint8, comm_, stream_), comm_, "AllGather");
    });
  }

  std::unique_ptr<Transfer> do_ireduce_scatter(const void* send, void* recv, int64_t n,
                                               DType dt) override {
    const size_t b = nbytes(n, dt), total = b * size();
    const ncclDataType_t type = nccl_sum_type(dt);
    return launch("reduce-scatter", total, [&](HostStage& st) {
      if (send == recv) {
        // Ours: recv holds the size·n inputs and gets the result at its start. NCCL's in-place
        // form writes the result at recv + rank·n instead, so it is moved to the start after.
        char* d = static_cast<char*>(st.add(recv, total, /*copy_in=*/true, /*out_bytes=*/b));
        if (b == 0) return;
        char* mine = d + rank() * b;
        check_nccl(ncclReduceScatter(d, mine, n, type, ncclSum, comm_, stream_), comm_,
                   "ReduceScatter");
        if (rank() != 0)  // [0, b) and [rank·b, rank·b + b) are disjoint
          TSP_CUDA_CHECK(cudaMemcpyAsync(d, mine, b, cudaMemcpyDeviceToDevice, stream_));
        return;
      }
      const void* dsend = st.add(send, total, true, 0);
      void* drecv = st.add(recv, b, false, b);
      if (b > 0)
        check_nccl(ncclReduceScatter(dsend, drecv, n, type, ncclSum, comm_, stream_), comm_,
                   "ReduceScatter");
    });
  }

  std::unique_ptr<Transfer> do_iall_reduce(void* buf, int64_t count, DType dt) override {
    const size_t b = nbytes(count, dt);
    const ncclDataType_t type = nccl_sum_type(dt);
    return launch("all-reduce", b, [&](HostStage& st) {
      void* d = st.add(buf, b, /*copy_in=*/true, /*out_bytes=*/b);
      if (b > 0)
        check_nccl(ncclAllReduce(d, d, count, type, ncclSum, comm_, stream_), comm_, "AllReduce");
    });
  }

  std::unique_ptr<Transfer> do_ireduce(const void* send, void* recv, int64_t count, DType dt,
                                       int root) override {
    const size_t b = nbytes(count, dt);
    const ncclDataType_t type = nccl_sum_type(dt);
    return launch("reduce", b, [&](HostStage& st) {
      const void* dsend = nullptr;
      void* drecv = nullptr;  // NCCL reads recvbuff on the root only
      if (rank() == root && send == recv) {
        drecv = st.add(recv, b, /*copy_in=*/true, /*out_bytes=*/b);
        dsend = drecv;
      } else {
        dsend = st.add(send, b, true, 0);
        if (rank() == root) drecv = st.add(recv, b, false, b);
      }
      if (b > 0)
        check_nccl(ncclReduce(dsend, drecv, count, type, ncclSum, root, comm_, stream_), comm_,
                   "Reduce");
    });
  }

  // A lone ncclSend / ncclRecv is a kernel that blocks until its peer's matching call runs (no
  // buffering, unlike MPI's eager sends), and NCCL refuses a send to oneself outside a group with
  // its receive: exchanges go through isendrecv (one group).
  std::unique_ptr<Transfer> do_isend(const void* buf, int64_t count, DType dt, int dst) override {
    TSP_CHECK(dst != rank(),
              "NCCL: a send to oneself (rank {}) outside a group cannot complete; use sendrecv",
              dst);
    const size_t b = nbytes(count, dt);
    return launch("send", b, [&](HostStage& st) {
      const void* d = st.add(buf, b, true, 0);
      if (b > 0) check_nccl(ncclSend(d, b, ncclUint8, dst, comm_, stream_), comm_, "Send");
    });
  }

  std::unique_ptr<Transfer> do_irecv(void* buf, int64_t count, DType dt, int src) override {
    TSP_CHECK(src != rank(),
              "NCCL: a receive from oneself (rank {}) outside a group cannot complete; use "
              "sendrecv",
              src);
    const size_t b = nbytes(count, dt);
    return launch("receive", b, [&](HostStage& st) {
      void* d = st.add(buf, b, false, b);
      if (b > 0) check_nccl(ncclRecv(d, b, ncclUint8, src, comm_, stream_), comm_, "Recv");
    });
  }

  std::unique_ptr<Transfer> do_isendrecv(const void* send, int64_t send_count, DType dt, int dst,
                                         void* recv, int64_t recv_count, int src) override {
    const size_t sb = nbytes(send_count, dt), rb = nbytes(recv_count, dt);
    return launch("send-receive", sb + rb, [&](HostStage& st) {
      const void* ds = st.add(send, sb, true, 0);
      void* dr = st.add(recv, rb, false, rb);
      // One group: both halves progress together (a ring step cannot deadlock), self-pairs too.
      check_nccl(ncclGroupStart(), comm_, "GroupStart");
      ncclResult_t r = ncclSuccess;
      if (sb > 0) r = ncclSend(ds, sb, ncclUint8, dst, comm_, stream_);
      if (r == ncclSuccess && rb > 0) r = ncclRecv(dr, rb, ncclUint8, src, comm_, stream_);
      const ncclResult_t end = ncclGroupEnd();  // always closes the group
      check_nccl(r, comm_, fmt::format("Send/Recv pair (to rank {}, from rank {})", dst, src));
      check_nccl(end, comm_, "GroupEnd (sendrecv pair)");
    });
  }

  // NCCL progresses by itself; this is where an asynchronous failure (a peer lost) surfaces.
  void do_progress() override { cuda::check_device_watches(); }

  void do_set_compute_queue(ComputeQueue q) override {
    compute_ = q.handle ? static_cast<cudaStream_t>(q.handle) : cuda::compute_stream(device_);
  }

  // ---- control: the wrapped MPI communicator, in 8-byte words ----

  void do_control_all_gather(const void* send, void* recv, int64_t bytes_per_rank) override {
    const size_t words = (static_cast<size_t>(bytes_per_rank) + 7) / 8;
    std::vector<int64_t> mine(words, 0);
    if (bytes_per_rank > 0) std::memcpy(mine.data(), send, bytes_per_rank);
    const std::vector<int64_t> all = mpi_->gather_host(std::span<const int64_t>(mine));
    for (int r = 0; r < size(); ++r) {
      if (bytes_per_rank > 0)
        std::memcpy(static_cast<char*>(recv) + r * bytes_per_rank, all.data() + r * words,
                    bytes_per_rank);
    }
  }

  void do_control_broadcast(void* buf, int64_t bytes, int root) override {
    const size_t words = (static_cast<size_t>(bytes) + 7) / 8;
    std::vector<int64_t> w(words, 0);
    if (rank() == root && bytes > 0) std::memcpy(w.data(), buf, bytes);
    mpi_->broadcast(w.data(), static_cast<int64_t>(words), DType::I64, root);  // host memory
    if (bytes > 0) std::memcpy(buf, w.data(), bytes);
  }

 private:
  void bootstrap() {
    // Blocking communicators: every call here treats ncclInProgress as a failure, and
    // NCCL_COMM_BLOCKING=0 would make NCCL's init, split and enqueues return it (it overrides the
    // communicator's config).
    const char* blocking = std::getenv("NCCL_COMM_BLOCKING");
    TSP_CHECK(blocking == nullptr || std::string_view(blocking) != "0",
              "NCCL_COMM_BLOCKING=0 is set: tsp uses NCCL's blocking communicators; unset it");
    // Several communicators per GPU (a layout's groups, the data-parallel replicas) run on their
    // own streams, concurrently: NCCL kernels block while they wait for their peers, so two ranks
    // that start two communicators' operations in different orders can deadlock. From NCCL 2.26
    // NCCL_LAUNCH_ORDER_IMPLICIT=1 orders them by the order the host issues them, the same on
    // every rank here (one thread, one program order). Set unless the user chose otherwise.
    setenv("NCCL_LAUNCH_ORDER_IMPLICIT", "1", 0);
    ncclUniqueId id{};
    std::string error;
    if (rank() == 0) {
      const ncclResult_t r = ncclGetUniqueId(&id);
      if (r != ncclSuccess)
        error = fmt::format("NCCL GetUniqueId failed: {}", ncclGetErrorString(r));
    }
    error = mpi_->broadcast_host(error, 0);  // every rank fails together, none hangs
    TSP_CHECK(error.empty(), "{}", error);
    static_assert(sizeof(id) % 8 == 0);
    mpi_->broadcast(&id, sizeof(id) / 8, DType::I64, 0);  // host memory: plain MPI
    // ncclCommInitRank blocks without calling MPI: an MPI whose broadcast completes lazily (HPC-X
    // with HCOLL) would leave a rank without the id while the others wait in the init. The
    // barrier completes the broadcast everywhere first.
    mpi_->barrier();
    cuda::set_device(device_);
    check_nccl(ncclCommInitRank(&comm_, size(), id, rank()), nullptr,
               fmt::format("CommInitRank (rank {} of {}, cuda:{})", rank(), size(), device_));
  }

  // One transfer: the communication stream waits for the compute stream's work so far (the
  // inputs), `body` stages host buffers and enqueues the NCCL calls, an event marks the end.
  // `op` and `bytes` (this rank's buffer) name it should it stall.
  template <typename F>
  std::unique_ptr<Transfer> launch(const char* op, size_t bytes, F&& body) {
    cuda::set_device(device_);
    TSP_CUDA_CHECK(cudaEventRecord(ready_, compute_));
    TSP_CUDA_CHECK(cudaStreamWaitEvent(stream_, ready_, 0));
    HostStage st(stream_, device_);
    body(st);
    st.enqueue_copy_out();
    track(op, bytes);  // before `done`, which nothing would destroy if this threw
    cudaEvent_t done = nullptr;
    TSP_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    const cudaError_t e = cudaEventRecord(done, stream_);
    if (e != cudaSuccess) cudaEventDestroy(done);
    TSP_CUDA_CHECK(e);
    return std::make_unique<NcclTransfer>(done, compute_, std::move(st));
  }

  // ---- stalled transfers ----
  // A peer that stops without NCCL noticing (stuck in its own code, waiting in an operation this
  // rank never issues, lost where NCCL's transports see no error) leaves a transfer unfinished
  // and NCCL silent: every rank would wait for ever. So each transfer is timed from its launch,
  // with an event of this communicator's own (the transfer's event belongs to its Transfer), and
  // this communicator's watch (every host wait for the device runs it) fails once the oldest
  // unfinished one is older than TSP_NCCL_TIMEOUT. Transfers on one stream finish in order, so
  // the oldest is the front.
  struct InFlight {
    cudaEvent_t marker;
    std::chrono::steady_clock::time_point launched;
    const char* op;
    size_t bytes;
  };

  void track(const char* op, size_t bytes) {
    std::lock_guard lock(in_flight_mutex_);
    retire_finished();
    cudaEvent_t marker = nullptr;
    if (!spare_markers_.empty()) {
      marker = spare_markers_.back();
      spare_markers_.pop_back();
    } else {
      TSP_CUDA_CHECK(cudaEventCreateWithFlags(&marker, cudaEventDisableTiming));
    }
    const cudaError_t e = cudaEventRecord(marker, stream_);
    if (e != cudaSuccess) cudaEventDestroy(marker);
    TSP_CUDA_CHECK(e);
    in_flight_.push_back({marker, std::chrono::steady_clock::now(), op, bytes});
  }

  // Under in_flight_mutex_: the finished transfers leave the front; their markers are reused.
  void retire_finished() {
    while (!in_flight_.empty() && cudaEventQuery(in_flight_.front().marker) == cudaSuccess) {
      spare_markers_.push_back(in_flight_.front().marker);
      in_flight_.pop_front();
    }
  }

  void check_stalled() {
    std::lock_guard lock(in_flight_mutex_);
    retire_finished();
    if (in_flight_.empty() || timeout_s_ <= 0) return;
    const InFlight& oldest = in_flight_.front();
    const double age =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - oldest.launched).count();
    if (age <= timeout_s_) return;
    TSP_FAIL(
        "NCCL {} of {} bytes (rank {} of {} in its group, cuda:{}) launched {:.0f} s ago has not "
        "finished, and NCCL reports no error: a peer rank is stuck (or waits in another "
        "operation), or was lost without NCCL noticing. The job stops rather than wait for ever; "
        "TSP_NCCL_TIMEOUT sets the limit ({} s now; 0: none)",
        oldest.op, oldest.bytes, rank(), size(), device_, age, timeout_s_);
  }

  // A blocking call's end: device results ordered before later compute work; host results there.
  static void settle(std::unique_ptr<Transfer> t) {
    auto* n = static_cast<NcclTransfer*>(t.get());
    if (n->host_staged())
      n->wait();
    else
      n->join_compute();
  }

  std::unique_ptr<Communicator> mpi_;  // control API, splits, bootstrap
  int device_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;   // this communicator's transfers
  cudaStream_t compute_ = nullptr;  // what transfers wait for and join
  cudaEvent_t ready_ = nullptr;     // recorded on compute_ at each launch
  int64_t watch_ = 0;               // cuda::add_device_watch: async errors, stalled transfers
  double timeout_s_ = 0;            // TSP_NCCL_TIMEOUT
  std::mutex in_flight_mutex_;      // guards what follows (the watch may run on another thread)
  std::deque<InFlight> in_flight_;  // launched, maybe unfinished, oldest first
  std::vector<cudaEvent_t> spare_markers_;
};

// ---- hooks ----

std::unique_ptr<Communicator> make_nccl(std::unique_ptr<Communicator> mpi_group, int device) {
  return make_nccl_communicator(std::move(mpi_group), device);
}

int count_devices() {
  return cuda::device_count();
}

const CudaCommHooks kHooks = [] {
  CudaCommHooks h;
  h.device_count = &count_devices;
  h.device_uuid = &device_uuid;
  h.make_nccl = &make_nccl;
  h.is_nccl = &is_nccl_communicator;
  h.staging.acquire = &pinned_acquire;
  h.staging.release = &pinned_release;
  h.staging.to_host = &staging_to_host;
  h.staging.to_device = &staging_to_device;
  return h;
}();

// Load time: code compiled in every build learns about CUDA memory and the NCCL path.
const bool registered = [] {
  set_pointer_device_query(&cuda::pointer_device);
  register_cuda_comm_hooks(&kHooks);
  return true;
}();

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(std::unique_ptr<Communicator> mpi_group,
                                                     int device) {
  TSP_CHECK(mpi_group != nullptr, "make_nccl_communicator: no MPI group");
  const int n = cuda::device_count();
  TSP_CHECK(device >= 0 && device < n, "NCCL communicator on cuda:{}: {} CUDA device{} visible",
            device, n, n == 1 ? " is" : "s are");
  return std::make_unique<NcclCommunicator>(std::move(mpi_group), device);
}

bool is_nccl_communicator(const Communicator& comm) {
  return dynamic_cast<const NcclCommunicator*>(&comm) != nullptr;
}

}  // namespace tsp
