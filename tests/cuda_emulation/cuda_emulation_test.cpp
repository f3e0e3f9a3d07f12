// The CUDA emulation's own semantics (README.md beside this file), checked where a GPU is
// deterministic: work queued on a stream runs later than the call, in order, and only after the
// events it waits for; the host waits exactly where CUDA documents that it does; a device fault is
// sticky and says what happened. Each case holds a stream at a gate (an op that blocks until the
// test opens it), so "has not run yet" is certain, not a matter of timing.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace {

// Holds a stream until open() (or the end of the case).
class Gate {
 public:
  explicit Gate(cudaStream_t s) {
    auto f = open_.get_future().share();
    tsp::emu::enqueue(s, [f] { f.wait(); });
  }
  ~Gate() { open(); }
  void open() {
    if (!opened_) open_.set_value();
    opened_ = true;
  }

 private:
  std::promise<void> open_;
  bool opened_ = false;
};

struct DeviceBytes {
  unsigned char* p = nullptr;
  size_t n;
  explicit DeviceBytes(size_t bytes) : n(bytes) {
    EXPECT_EQ(cudaMalloc(reinterpret_cast<void**>(&p), n), cudaSuccess);
  }
  ~DeviceBytes() { cudaFree(p); }
  // Device memory is host memory here: the test may look without a copy (no GPU allows that).
  bool all(unsigned char v) const {
    for (size_t i = 0; i < n; ++i)
      if (p[i] != v) return false;
    return true;
  }
};

cudaStream_t make_stream(unsigned flags = cudaStreamNonBlocking) {
  cudaStream_t s = nullptr;
  EXPECT_EQ(cudaStreamCreateWithFlags(&s, flags), cudaSuccess);
  return s;
}

__global__ void fill(unsigned char* p, int n, unsigned char v) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) p[i] = v;
}

// Fresh device memory holds 0xff bytes (runtime.cpp).
constexpr unsigned char kFresh = 0xff;

TEST(CudaEmulation, QueuedWorkRunsAfterTheCallInOrder) {
  cudaStream_t s = make_stream();
  DeviceBytes x(100);
  {
    Gate gate(s);
    TSP_LAUNCH(1, 128, 0, s, fill)(x.p, 100, 1);
    TSP_LAUNCH(1, 128, 0, s, fill)(x.p, 100, 2);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    EXPECT_TRUE(x.all(kFresh)) << "a kernel ran before the work queued ahead of it";
    EXPECT_EQ(cudaStreamQuery(s), cudaErrorNotReady);
  }
  ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
  EXPECT_TRUE(x.all(2)) << "the stream's kernels ran out of order";
  EXPECT_EQ(cudaStreamQuery(s), cudaSuccess);
  EXPECT_EQ(cudaStreamDestroy(s), cudaSuccess);
}

TEST(CudaEmulation, StreamsAreUnorderedWithoutAnEvent) {
  cudaStream_t a = make_stream(), b = make_stream();
  DeviceBytes x(64), y(64);
  Gate gate(a);
  ASSERT_EQ(cudaMemsetAsync(x.p, 1, 64, a), cudaSuccess);
  ASSERT_EQ(cudaMemcpyAsync(y.p, x.p, 64, cudaMemcpyDeviceToDevice, b), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(b), cudaSuccess);  // b does not wait for the held stream a
  EXPECT_TRUE(y.all(kFresh));
  gate.open();
  ASSERT_EQ(cudaStreamSynchronize(a), cudaSuccess);
  EXPECT_TRUE(x.all(1));
  cudaStreamDestroy(a);
  cudaStreamDestroy(b);
}

TEST(CudaEmulation, AnEventOrdersTwoStreams) {
  cudaStream_t a = make_stream(), b = make_stream();
  cudaEvent_t e = nullptr;
  ASSERT_EQ(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), cudaSuccess);
  DeviceBytes x(64), y(64);
  {
    Gate gate(a);
    ASSERT_EQ(cudaMemsetAsync(x.p, 1, 64, a), cudaSuccess);
    ASSERT_EQ(cudaEventRecord(e, a), cudaSuccess);
    ASSERT_EQ(cudaStreamWaitEvent(b, e, 0), cudaSuccess);
    // Destroyed right after the wait was queued: the wait still holds (CUDA releases it later).
    ASSERT_EQ(cudaEventDestroy(e), cudaSuccess);
    ASSERT_EQ(cudaMemcpyAsync(y.p, x.p, 64, cudaMemcpyDeviceToDevice, b), cudaSuccess);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    EXPECT_TRUE(y.all(kFresh)) << "stream b passed an event its stream a had not reached";
  }
  ASSERT_EQ(cudaStreamSynchronize(b), cudaSuccess);
  EXPECT_TRUE(y.all(1));
  cudaStreamDestroy(a);
  cudaStreamDestroy(b);
}

// A wait is for the newest record at the time of the call; a later record does not move it.
TEST(CudaEmulation, AWaitIsForTheNewestRecordAtTheCall) {
  cudaStream_t a = make_stream(), b = make_stream(), c = make_stream();
  cudaEvent_t e = nullptr;
  ASSERT_EQ(cudaEventCreate(&e), cudaSuccess);
  DeviceBytes x(64), y(64);
  ASSERT_EQ(cudaEventRecord(e, a), cudaSuccess);  // reached at once
  ASSERT_EQ(cudaStreamSynchronize(a), cudaSuccess);
  ASSERT_EQ(cudaStreamWaitEvent(b, e, 0), cudaSuccess);
  Gate gate(c);
  ASSERT_EQ(cudaEventRecord(e, c), cudaSuccess);  // held: not reached
  EXPECT_EQ(cudaEventQuery(e), cudaErrorNotReady);
  ASSERT_EQ(cudaMemsetAsync(y.p, 3, 64, b), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(b), cudaSuccess);  // waits for the first record only
  EXPECT_TRUE(y.all(3));
  gate.open();
  ASSERT_EQ(cudaEventSynchronize(e), cudaSuccess);
  EXPECT_EQ(cudaEventQuery(e), cudaSuccess);
  cudaEventDestroy(e);
  for (cudaStream_t s : {a, b, c}) cudaStreamDestroy(s);
}

// cudaMemcpy and cudaMemset use the legacy default stream, which waits for blocking streams but
// not for the non-blocking ones our library creates.
TEST(CudaEmulation, TheLegacyStreamWaitsForBlockingStreamsOnly) {
  DeviceBytes x(64);
  std::vector<unsigned char> host(64, 0);
  {
    cudaStream_t nb = make_stream(cudaStreamNonBlocking);
    Gate gate(nb);
    ASSERT_EQ(cudaMemsetAsync(x.p, 5, 64, nb), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(host.data(), x.p, 64, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(host[0], kFresh) << "the legacy stream waited for a non-blocking stream";
    gate.open();
    ASSERT_EQ(cudaStreamSynchronize(nb), cudaSuccess);
    cudaStreamDestroy(nb);
  }
  {
    cudaStream_t blocking = make_stream(0);
    auto gate = std::make_unique<Gate>(blocking);
    ASSERT_EQ(cudaMemsetAsync(x.p, 6, 64, blocking), cudaSuccess);
    std::thread opener([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      gate->open();
    });
    ASSERT_EQ(cudaMemcpy(host.data(), x.p, 64, cudaMemcpyDeviceToHost), cudaSuccess);
    opener.join();
    EXPECT_EQ(host[0], 6) << "the legacy stream did not wait for a blocking stream";
    cudaStreamDestroy(blocking);
  }
}

// Pageable host memory: a source is read at the call, a destination is written before the call
// returns. Pinned memory: read and written when the stream gets there.
TEST(CudaEmulation, PageableAndPinnedCopies) {
  cudaStream_t s = make_stream();
  DeviceBytes x(64);
  unsigned char* pinned = nullptr;
  ASSERT_EQ(cudaMallocHost(reinterpret_cast<void**>(&pinned), 64), cudaSuccess);
  std::vector<unsigned char> pageable(64, 7);
  {
    Gate gate(s);
    ASSERT_EQ(cudaMemcpyAsync(x.p, pageable.data(), 64, cudaMemcpyHostToDevice, s), cudaSuccess);
    pageable.assign(64, 8);  // after the call: not what the device gets
    std::memset(pinned, 9, 64);
    ASSERT_EQ(cudaMemcpyAsync(pinned, x.p, 64, cudaMemcpyDeviceToHost, s), cudaSuccess);
    EXPECT_EQ(pinned[0], 9) << "an asynchronous copy to pinned memory finished at the call";
  }
  ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
  EXPECT_EQ(pinned[0], 7);
  {
    Gate gate(s);
    std::memset(pinned, 10, 64);
    ASSERT_EQ(cudaMemcpyAsync(x.p, pinned, 64, cudaMemcpyHostToDevice, s), cudaSuccess);
    std::memset(pinned, 11, 64);  // before the stream gets there: what the device gets
  }
  std::thread([&] {
    // Pageable destination: the call returns with the data there (it waits for the stream).
    ASSERT_EQ(cudaMemcpyAsync(pageable.data(), x.p, 64, cudaMemcpyDeviceToHost, s), cudaSuccess);
  }).join();
  EXPECT_EQ(pageable[0], 11);
  EXPECT_EQ(cudaFreeHost(pinned), cudaSuccess);
  cudaStreamDestroy(s);
}

TEST(CudaEmulation, FreeAsyncFreesInStreamOrder) {
  cudaStream_t s = make_stream();
  void* p = nullptr;
  ASSERT_EQ(cudaMallocAsync(&p, 256, s), cudaSuccess);
  {
    Gate gate(s);
    ASSERT_EQ(cudaFreeAsync(p, s), cudaSuccess);
    EXPECT_TRUE(tsp::emu::is_device_range(p, 256)) << "freed before the stream got there";
  }
  ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
  EXPECT_FALSE(tsp::emu::is_device_range(p, 256));
  cudaStreamDestroy(s);
}

TEST(CudaEmulation, ABadLaunchIsTheLaunchsError) {
  DeviceBytes x(64);
  TSP_LAUNCH(1, 2048, 0, nullptr, fill)(x.p, 64, 1);  // over 1024 threads a block
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_TRUE(x.all(kFresh));
}

// A kernel's fault surfaces at the next synchronising call, and stays: the device is unusable
// after it, as a GPU's context is. In a child process (a death test), so the rest keep a device.
TEST(CudaEmulationDeathTest, AFaultIsStickyAndNamed) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto fault = [] {
    DeviceBytes x(64);
    TSP_LAUNCH(1, 128, 0, nullptr, fill)(x.p, 65, 1);  // one byte past the allocation
    const cudaError_t first = cudaDeviceSynchronize();
    // Both texts held at once, as TSP_CUDA_CHECK's message holds them.
    const char* text = cudaGetErrorString(first);
    const char* name = cudaGetErrorName(first);
    std::fprintf(stderr, "%s | %s\n", text, name);
    const bool sticky = cudaStreamSynchronize(nullptr) == cudaErrorLaunchFailure &&
                        cudaGetLastError() == cudaErrorLaunchFailure;
    std::fprintf(stderr, "sticky=%d\n", sticky);
    std::exit(first == cudaErrorLaunchFailure && sticky ? 3 : 4);
  };
  EXPECT_EXIT(fault(), testing::ExitedWithCode(3),
              "unspecified launch failure \\(CUDA emulation: .*wrote outside an allocation of 64 "
              "bytes.*\\) \\| cudaErrorLaunchFailure\n.*sticky=1");
}

}  // namespace
