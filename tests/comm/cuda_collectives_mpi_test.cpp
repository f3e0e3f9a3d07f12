// tsp-test-ranks: 1 2 4
//
// Every data op of the Communicator on device buffers, on the two data paths of a GPU build
// (comm/device_comm.h):
//   (a) MPI staging through pinned host memory (works with several ranks on one GPU);
//   (b) NCCL, when every rank has its own GPU (else skipped with the reason: NCCL refuses two
//       ranks on one device).
// Blocking calls, and the non-blocking ones finished by wait() and by join_compute(); the in-place
// forms (all_gather, reduce_scatter, reduce on the root); a sendrecv ring in bf16; an i64 sum;
// a split; and, on NCCL, host buffers (staged through device memory). Values are small integers,
// so every comparison is exact; a failure names the path, mode, op, rank and first bad element.
// The byte counts of each run must equal those of the same ops on host buffers over plain MPI.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "backend/cuda/cuda_common.h"
#include "mpi_test_util.h"
#include "tsp/comm/device_comm.h"
#include "tsp/comm/mpi.h"
#include "tsp/comm/nccl.h"

namespace tsp {
namespace {

using test::world;

#define CUDA_OK(call)                                                                 \
  do {                                                                                \
    cudaError_t e_ = (call);                                                          \
    if (e_ != cudaSuccess)                                                            \
      throw std::runtime_error(fmt::format("{}: {}", #call, cudaGetErrorString(e_))); \
  } while (0)

// Small integers: sums over 4 ranks stay exact in f32 (and in bf16 bit patterns nothing is summed).
int64_t val(int r, int64_t i, int salt) {
  return ((r + 1) * 131 + i * 7 + salt * 17) % 1009;
}

template <typename T>
std::vector<T> pattern(int r, int64_t n, int salt) {
  std::vector<T> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = static_cast<T>(val(r, i, salt));
  return v;
}

// A buffer on this rank's device or on the host.
class Mem {
 public:
  Mem(bool on_device, int device, size_t bytes) : device_(device), bytes_(bytes) {
    if (on_device) {
      cuda::set_device(device_);
      CUDA_OK(cudaMalloc(&dev_, bytes_ + 1));
    } else {
      host_.assign(bytes_ + 1, 0);  // +1: never null
    }
    poison();
  }
  ~Mem() {
    if (dev_) {
      cudaStreamSynchronize(cuda::compute_stream(device_));
      cudaFree(dev_);
    }
  }
  Mem(const Mem&) = delete;
  Mem& operator=(const Mem&) = delete;

  void* data() { return dev_ ? dev_ : host_.data(); }
  template <typename T>
  T* at(int64_t i) {
    return reinterpret_cast<T*>(static_cast<char*>(data()) + i * sizeof(T));
  }
  // Ordered on the compute stream (what transfers wait for) and complete on return.
  void poison() {
    if (!dev_) {
      std::memset(host_.data(), 0xFF, host_.size());
      return;
    }
    cudaStream_t s = cuda::compute_stream(device_);
    CUDA_OK(cudaMemsetAsync(dev_, 0xFF, bytes_ + 1, s));
    CUDA_OK(cudaStreamSynchronize(s));
  }
  template <typename T>
  void put(const std::vector<T>& v, int64_t offset = 0) {
    const size_t b = v.size() * sizeof(T);
    if (!dev_) {
      std::memcpy(host_.data() + offset * sizeof(T), v.data(), b);
      return;
    }
    cudaStream_t s = cuda::compute_stream(device_);
    CUDA_OK(cudaMemcpyAsync(static_cast<char*>(dev_) + offset * sizeof(T), v.data(), b,
                            cudaMemcpyHostToDevice, s));
    CUDA_OK(cudaStreamSynchronize(s));
  }
  // After the compute stream's work (join_compute() orders transfers there).
  template <typename T>
  std::vector<T> get(int64_t n, int64_t offset = 0) {
    std::vector<T> v(n);
    if (!dev_) {
      std::memcpy(v.data(), host_.data() + offset * sizeof(T), n * sizeof(T));
      return v;
    }
    cudaStream_t s = cuda::compute_stream(device_);
    CUDA_OK(cudaMemcpyAsync(v.data(), static_cast<char*>(dev_) + offset * sizeof(T), n * sizeof(T),
                            cudaMemcpyDeviceToHost, s));
    CUDA_OK(cudaStreamSynchronize(s));
    return v;
  }

 private:
  int device_;
  size_t bytes_;
  void* dev_ = nullptr;
  std::vector<unsigned char> host_;
};

enum class Mode { Blocking, Wait, JoinCompute };
const char* mode_name(Mode m) {
  return m == Mode::Blocking ? "blocking" : m == Mode::Wait ? "wait()" : "join_compute()";
}

template <typename T>
void expect_same(const std::vector<T>& got, const std::vector<T>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (got[i] != want[i]) {
      if (bad == 0) first = i;
      ++bad;
    }
  }
  if (bad > 0) {
    ADD_FAILURE() << what << ": " << bad << " of " << want.size()
                  << " elements differ; first at index " << first << ": got "
                  << static_cast<double>(got[first]) << ", expected "
                  << static_cast<double>(want[first]);
  }
}

// Every op once, on buffers on the device (or the host), finished per `mode`. Collective.
void run_ops(Communicator& c, bool on_device, int device, Mode mode, const std::string& label) {
  const int D = c.size(), r = c.rank();
  const int64_t n = 37;  // odd: no accidental alignment
  auto what = [&](const char* op) {
    return fmt::format("[{} {} rank {} of {}] {}", label, mode_name(mode), r, D, op);
  };
  auto finish = [&](RequestPtr req) {
    if (mode == Mode::Wait)
      req->wait();
    else
      req->join_compute();
  };
  auto mem = [&](size_t bytes) { return std::make_unique<Mem>(on_device, device, bytes); };
  const bool blocking = mode == Mode::Blocking;

  {  // broadcast from the last rank
    const int root = D - 1;
    auto b = mem(n * 4);
    if (r == root) b->put(pattern<float>(root, n, 1));
    if (blocking)
      c.broadcast(b->data(), n, DType::F32, root);
    else
      finish(c.ibroadcast(b->data(), n, DType::F32, root));
    expect_same(b->get<float>(n), pattern<float>(root, n, 1), what("broadcast"));
  }
  {  // all_gather, separate buffers and in place
    std::vector<float> want;
    for (int q = 0; q < D; ++q) {
      auto p = pattern<float>(q, n, 2);
      want.insert(want.end(), p.begin(), p.end());
    }
    auto s = mem(n * 4), g = mem(D * n * 4);
    s->put(pattern<float>(r, n, 2));
    if (blocking)
      c.all_gather(s->data(), g->data(), n, DType::F32);
    else
      finish(c.iall_gather(s->data(), g->data(), n, DType::F32));
    expect_same(g->get<float>(D * n), want, what("all_gather"));

    auto ip = mem(D * n * 4);
    ip->put(pattern<float>(r, n, 2), r * n);
    if (blocking)
      c.all_gather(ip->at<float>(r * n), ip->data(), n, DType::F32);
    else
      finish(c.iall_gather(ip->at<float>(r * n), ip->data(), n, DType::F32));
    expect_same(ip->get<float>(D * n), want, what("all_gather in place"));
  }
  {  // reduce_scatter, separate buffers and in place (result at the start of the buffer)
    std::vector<float> want(n, 0);
    for (int q = 0; q < D; ++q) {
      const auto p = pattern<float>(q, D * n, 3);
      for (int64_t i = 0; i < n; ++i) want[i] += p[r * n + i];
    }
    auto s = mem(D * n * 4), o = mem(n * 4);
    s->put(pattern<float>(r, D * n, 3));
    if (blocking)
      c.reduce_scatter(s->data(), o->data(), n, DType::F32);
    else
      finish(c.ireduce_scatter(s->data(), o->data(), n, DType::F32));
    expect_same(o->get<float>(n), want, what("reduce_scatter"));

    auto ip = mem(D * n * 4);
    ip->put(pattern<float>(r, D * n, 3));
    if (blocking)
      c.reduce_scatter(ip->data(), ip->data(), n, DType::F32);
    else
      finish(c.ireduce_scatter(ip->data(), ip->data(), n, DType::F32));
    expect_same(ip->get<float>(n), want, what("reduce_scatter in place"));
  }
  {  // all_reduce, f32 and i64 (values in the high bits)
    std::vector<float> want(n, 0);
    std::vector<int64_t> want64(n, 0);
    for (int q = 0; q < D; ++q) {
      const auto p = pattern<float>(q, n, 4);
      for (int64_t i = 0; i < n; ++i) {
        want[i] += p[i];
        want64[i] += (static_cast<int64_t>(p[i]) << 40) - 3;
      }
    }
    auto b = mem(n * 4), b64 = mem(n * 8);
    b->put(pattern<float>(r, n, 4));
    std::vector<int64_t> mine64(n);
    const auto p = pattern<float>(r, n, 4);
    for (int64_t i = 0; i < n; ++i) mine64[i] = (static_cast<int64_t>(p[i]) << 40) - 3;
    b64->put(mine64);
    if (blocking) {
      c.all_reduce(b->data(), n, DType::F32);
      c.all_reduce(b64->data(), n, DType::I64);
    } else {
      finish(c.iall_reduce(b->data(), n, DType::F32));
      finish(c.iall_reduce(b64->data(), n, DType::I64));
    }
    expect_same(b->get<float>(n), want, what("all_reduce f32"));
    expect_same(b64->get<int64_t>(n), want64, what("all_reduce i64"));
  }
  {  // reduce to rank 0 (recv null elsewhere), and in place on the last rank
    std::vector<float> want(n, 0);
    for (int q = 0; q < D; ++q) {
      const auto p = pattern<float>(q, n, 5);
      for (int64_t i = 0; i < n; ++i) want[i] += p[i];
    }
    auto s = mem(n * 4), o = mem(n * 4);
    s->put(pattern<float>(r, n, 5));
    void* recv = r == 0 ? o->data() : nullptr;
    if (blocking)
      c.reduce(s->data(), recv, n, DType::F32, 0);
    else
      finish(c.ireduce(s->data(), recv, n, DType::F32, 0));
    if (r == 0) expect_same(o->get<float>(n), want, what("reduce to rank 0"));

    const int root = D - 1;
    auto ip = mem(n * 4);
    ip->put(pattern<float>(r, n, 5));
    void* ip_recv = r == root ? ip->data() : nullptr;
    if (blocking)
      c.reduce(ip->data(), ip_recv, n, DType::F32, root);
    else
      finish(c.ireduce(ip->data(), ip_recv, n, DType::F32, root));
    if (r == root) expect_same(ip->get<float>(n), want, what("reduce in place on the root"));
  }
  {  // a sendrecv ring step in bf16 (raw 16-bit patterns; a self-pair at D = 1)
    const int next = (r + 1) % D, prev = (r + D - 1) % D;
    auto s = mem(n * 2), o = mem(n * 2);
    s->put(pattern<uint16_t>(r, n, 6));
    if (blocking)
      c.sendrecv(s->data(), n, DType::BF16, next, o->data(), n, prev);
    else
      finish(c.isendrecv(s->data(), n, DType::BF16, next, o->data(), n, prev));
    expect_same(o->get<uint16_t>(n), pattern<uint16_t>(prev, n, 6), what("sendrecv ring (bf16)"));
  }
  // send / recv pairs: even ranks send to the next odd rank (at an odd size the last rank has no
  // partner and sits out)
  if (D > 1 && !(r % 2 == 0 && r + 1 == D)) {
    auto b = mem(n * 4);
    const bool sender = r % 2 == 0;
    if (sender) b->put(pattern<float>(r, n, 7));
    const int peer = sender ? r + 1 : r - 1;
    if (blocking) {
      if (sender)
        c.send(b->data(), n, DType::F32, peer);
      else
        c.recv(b->data(), n, DType::F32, peer);
    } else {
      finish(sender ? c.isend(b->data(), n, DType::F32, peer)
                    : c.irecv(b->data(), n, DType::F32, peer));
    }
    if (!sender) expect_same(b->get<float>(n), pattern<float>(peer, n, 7), what("send/recv"));
  }
  {  // a split (parity), all_reduce inside it
    std::unique_ptr<Communicator> sub = c.split(r % 2, r);
    std::vector<float> want(n, 0);
    for (int q = r % 2; q < D; q += 2) {
      const auto p = pattern<float>(q, n, 8);
      for (int64_t i = 0; i < n; ++i) want[i] += p[i];
    }
    auto b = mem(n * 4);
    b->put(pattern<float>(r, n, 8));
    if (blocking)
      sub->all_reduce(b->data(), n, DType::F32);
    else
      finish(sub->iall_reduce(b->data(), n, DType::F32));
    expect_same(b->get<float>(n), want, what("all_reduce on a parity split"));
    EXPECT_EQ(communicator_kind(*sub), communicator_kind(c)) << what("split keeps the kind");
  }
}

// The per-op counts of a run, with names for the message.
void expect_same_counts(const CommStats& got, const CommStats& want, const std::string& label) {
  for (int i = 0; i < kNumCommOps; ++i) {
    const CommOp op = static_cast<CommOp>(i);
    EXPECT_EQ(got[op].calls, want[op].calls) << label << " " << comm_op_name(op) << " calls";
    EXPECT_EQ(got[op].bytes_sent, want[op].bytes_sent)
        << label << " " << comm_op_name(op) << " bytes sent";
    EXPECT_EQ(got[op].bytes_received, want[op].bytes_received)
        << label << " " << comm_op_name(op) << " bytes received";
  }
}

// Device buffers on `c` in every mode, byte counts against host buffers on plain MPI.
void run_all_modes(Communicator& c, int device, const std::string& label) {
  for (Mode mode : {Mode::Blocking, Mode::Wait, Mode::JoinCompute}) {
    std::unique_ptr<Communicator> host_mpi = world().split(0, world().rank());
    run_ops(*host_mpi, /*on_device=*/false, device, mode, "host/mpi");
    const CommStats before = c.stats();
    run_ops(c, /*on_device=*/true, device, mode, label);
    expect_same_counts(c.stats() - before, host_mpi->stats(),
                       fmt::format("[{} {}] byte counts vs host MPI:", label, mode_name(mode)));
  }
}

bool have_device() {
  return cuda::device_count() > 0;
}

TEST(CudaCollectives, MpiStagingOfDeviceBuffers) {
  if (!have_device()) GTEST_SKIP() << "no CUDA device";
  const Device dev = resolve_device("cuda");
  auto c = make_data_communicator(world().split(0, world().rank()), dev, CommChoice::Mpi);
  EXPECT_EQ(communicator_kind(*c), "mpi");
  {  // the pointer query the CUDA build registers, which staging relies on
    Mem d(true, dev.index, 64), h(false, dev.index, 64);
    EXPECT_EQ(pointer_device(d.data()), dev);
    EXPECT_EQ(pointer_device(h.data()), Device::cpu());
  }
  run_all_modes(*c, dev.index, "mpi staging");
}

// memory_pool of a GPU: its total memory, and every rank of the group that computes on it (on a
// one-GPU machine all of them, so the count is the group size; with a GPU per rank it is 1). The
// expected count comes from the devices' UUIDs read here with the CUDA runtime, not through the
// library's hook. The CPU's pool is the host's.
TEST(CudaCollectives, MemoryPoolCountsTheRanksOnEachGpu) {
  if (!have_device()) GTEST_SKIP() << "no CUDA device";
  const Device dev = resolve_device("cuda");
  Communicator& w = world();
  const MemoryPool pool = memory_pool(dev, w);
  size_t free_b = 0, total_b = 0;
  ASSERT_EQ(cudaSetDevice(dev.index), cudaSuccess);
  ASSERT_EQ(cudaMemGetInfo(&free_b, &total_b), cudaSuccess);
  EXPECT_EQ(pool.bytes, static_cast<int64_t>(total_b));
  EXPECT_EQ(pool.place, "the GPU " + dev.str());
  cudaDeviceProp prop{};
  ASSERT_EQ(cudaGetDeviceProperties(&prop, dev.index), cudaSuccess);
  int64_t mine[2] = {};
  static_assert(sizeof prop.uuid.bytes == sizeof mine);
  std::memcpy(mine, prop.uuid.bytes, sizeof mine);
  const std::vector<int64_t> all = w.gather_host(std::span<const int64_t>(mine, 2));
  int sharing = 0;
  for (int r = 0; r < w.size(); ++r) sharing += all[2 * r] == mine[0] && all[2 * r + 1] == mine[1];
  EXPECT_EQ(pool.ranks, sharing);
  const MemoryPool host = memory_pool(Device::cpu(), w);
  EXPECT_EQ(host.place, "this machine");
}

TEST(CudaCollectives, Nccl) {
  if (!have_device()) GTEST_SKIP() << "no CUDA device";
  const Device dev = resolve_device("cuda");
  std::string why;
  if (!ranks_on_distinct_gpus(world(), dev, &why)) {
    // TSP_COMM=nccl must then fail with the reason, on every rank; auto falls back to MPI.
    try {
      make_data_communicator(world().split(0, world().rank()), dev, CommChoice::Nccl);
      ADD_FAILURE() << "CommChoice::Nccl with ranks sharing a GPU did not throw";
    } catch (const Error& e) {
      EXPECT_NE(e.message().find("share one GPU"), std::string::npos) << e.message();
    }
    auto a = make_data_communicator(world().split(0, world().rank()), dev, CommChoice::Auto);
    EXPECT_EQ(communicator_kind(*a), "mpi");
    GTEST_SKIP() << "NCCL needs one GPU per rank: " << why;
  }
  auto c = make_data_communicator(world().split(0, world().rank()), dev, CommChoice::Auto);
  ASSERT_EQ(communicator_kind(*c), "nccl");
  run_all_modes(*c, dev.index, "nccl");

  // Host buffers on the NCCL data path (staged through device memory), blocking and wait().
  const int D = c->size(), r = c->rank();
  for (Mode mode : {Mode::Blocking, Mode::Wait}) {
    run_ops(*c, /*on_device=*/false, dev.index, mode, "nccl host buffers");
  }
  // A host send may meet a device receive: one NCCL order for both.
  if (D > 1 && !(r % 2 == 0 && r + 1 == D)) {  // pairs as in run_ops
    const int64_t n = 11;
    const bool sender = r % 2 == 0;
    const int peer = sender ? r + 1 : r - 1;
    Mem dbuf(true, dev.index, n * 4);
    std::vector<float> hbuf = pattern<float>(r, n, 9);
    if (sender)
      c->send(hbuf.data(), n, DType::F32, peer);
    else
      c->recv(dbuf.data(), n, DType::F32, peer);
    if (!sender)
      expect_same(dbuf.get<float>(n), pattern<float>(peer, n, 9), "host send, device recv");
  }
  // A lone send or receive to oneself cannot complete on NCCL (a send waits for its receive, and
  // NCCL refuses a self-send outside a group with it): refused before anything is queued, naming
  // the way out. (Last here: the refused calls were counted as traffic.)
  Mem self(true, dev.index, 16);
  for (bool send : {true, false}) {
    try {
      if (send)
        c->send(self.data(), 4, DType::F32, r);
      else
        c->recv(self.data(), 4, DType::F32, r);
      ADD_FAILURE() << (send ? "a send" : "a receive") << " to oneself on NCCL did not throw";
    } catch (const Error& e) {
      EXPECT_NE(e.message().find("use sendrecv"), std::string::npos) << e.message();
    }
  }
}

// Many transfers in flight at once on the NCCL stream, joined to compute in reverse order.
TEST(CudaCollectives, NcclOverlappingRequests) {
  if (!have_device()) GTEST_SKIP() << "no CUDA device";
  const Device dev = resolve_device("cuda");
  if (!ranks_on_distinct_gpus(world(), dev)) GTEST_SKIP() << "NCCL needs one GPU per rank";
  auto c = make_data_communicator(world().split(0, world().rank()), dev, CommChoice::Auto);
  const int D = c->size(), r = c->rank();
  const int64_t n = 1 << 20;  // 4 MiB each: above any eager threshold
  std::vector<std::unique_ptr<Mem>> bufs;
  std::vector<RequestPtr> reqs;
  for (int k = 0; k < 4; ++k) {
    bufs.push_back(std::make_unique<Mem>(true, dev.index, n * 4));
    bufs.back()->put(pattern<float>(r, n, 10 + k));
    reqs.push_back(c->iall_reduce(bufs.back()->data(), n, DType::F32));
  }
  for (int k = 3; k >= 0; --k) reqs[k]->join_compute();
  for (int k = 0; k < 4; ++k) {
    std::vector<float> want(n, 0);
    for (int q = 0; q < D; ++q) {
      const auto p = pattern<float>(q, n, 10 + k);
      for (int64_t i = 0; i < n; ++i) want[i] += p[i];
    }
    expect_same(bufs[k]->get<float>(n), want, fmt::format("overlapping all_reduce {}", k));
  }
}

}  // namespace
}  // namespace tsp
