// The compute streams and device queries of cuda_common.h.
#include "backend/cuda/cuda_common.h"

#include <array>
#include <atomic>
#include <mutex>
#include <thread>
#include <vector>

namespace tsp::cuda {
namespace {

// Ordinals above this are refused (more GPUs than any node has; the table stays a fixed array so
// the hot path, an existing stream, is one atomic load).
constexpr int kMaxDevices = 64;

struct Streams {
  std::mutex mutex;  // serialises creation only
  std::array<std::atomic<cudaStream_t>, kMaxDevices> stream{};
};
Streams& streams() {
  // Never destroyed: streams live until the process ends (destroying them at exit would race the
  // CUDA runtime's own teardown).
  static Streams* s = new Streams();
  return *s;
}

}  // namespace

// Set once this process selects a device (every device allocation, op and stream goes through
// set_device): see pointer_device.
static std::atomic<bool> g_device_in_use{false};

void set_device(int device) {
  TSP_CHECK(device >= 0 && device < kMaxDevices, "CUDA device ordinal {} out of range", device);
  TSP_CUDA_CHECK(cudaSetDevice(device));
  g_device_in_use.store(true, std::memory_order_release);
}

cudaStream_t compute_stream(int device) {
  set_device(device);
  Streams& s = streams();
  cudaStream_t st = s.stream[device].load(std::memory_order_acquire);
  if (st) return st;
  std::lock_guard lock(s.mutex);
  st = s.stream[device].load(std::memory_order_relaxed);
  if (!st) {
    // Non-blocking: the legacy default stream (which other libraries may use) does not
    // serialise against our work.
    TSP_CUDA_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    s.stream[device].store(st, std::memory_order_release);
  }
  return st;
}

int device_count() {
  static const int count = [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();  // no driver or no device: clear the error, report none
      return 0;
    }
    return n;
  }();
  return count;
}

Device pointer_device(const void* p) {
  // Until this process has used a device (every device allocation and op goes through a compute
  // stream), no pointer can be device memory: answer without touching the CUDA runtime, so a
  // --device cpu run of a CUDA build creates no CUDA context on a GPU machine.
  if (!p || !g_device_in_use.load(std::memory_order_acquire)) return Device::cpu();
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    cudaGetLastError();  // an unregistered host pointer may leave an error behind: clear it
    return Device::cpu();
  }
  if (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged)
    return Device::cuda(attr.device);
  return Device::cpu();  // pinned (cudaMemoryTypeHost) or pageable (cudaMemoryTypeUnregistered)
}

// ---- the host waiting for the device ----

namespace {

struct Watch {
  int64_t id;
  int device;
  cudaStream_t stream;
  std::function<void()> check;
};

struct Watches {
  std::mutex mutex;
  std::vector<Watch> list;
  int64_t next_id = 1;
};
Watches& watches() {
  static Watches* w = new Watches();  // never destroyed: communicators may outlive statics
  return *w;
}

}  // namespace

// Each watch's check, once; the first to throw ends the wait with its error.
void check_device_watches() {
  Watches& w = watches();
  std::lock_guard lock(w.mutex);
  for (const Watch& watch : w.list) watch.check();
}

int64_t add_device_watch(int device, cudaStream_t s, std::function<void()> check) {
  Watches& w = watches();
  std::lock_guard lock(w.mutex);
  const int64_t id = w.next_id++;
  w.list.push_back({id, device, s, std::move(check)});
  return id;
}

void remove_device_watch(int64_t id) {
  Watches& w = watches();
  std::lock_guard lock(w.mutex);
  std::erase_if(w.list, [id](const Watch& watch) { return watch.id == id; });
}

void wait_for_stream(cudaStream_t s) {
  // The common case, a stream already drained or about to be, costs one query; then polls with
  // the watches between them (NCCL's documented way to wait while checking its errors).
  for (;;) {
    const cudaError_t e = cudaStreamQuery(s);
    if (e != cudaErrorNotReady) {
      TSP_CHECK(e == cudaSuccess, "CUDA error while waiting for the device: {} ({})",
                cudaGetErrorString(e), cudaGetErrorName(e));
      return;
    }
    check_device_watches();
    std::this_thread::yield();
  }
}

void wait_for_device(int device) {
  std::vector<cudaStream_t> on_device{compute_stream(device)};
  {
    Watches& w = watches();
    std::lock_guard lock(w.mutex);
    for (const Watch& watch : w.list)
      if (watch.device == device && watch.stream) on_device.push_back(watch.stream);
  }
  for (cudaStream_t s : on_device) wait_for_stream(s);
}

}  // namespace tsp::cuda
