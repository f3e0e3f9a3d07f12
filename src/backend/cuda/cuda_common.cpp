// The compute streams and device queries of cuda_common.h.
#include "backend/cuda/cuda_common.h"

#include <array>
#include <atomic>
#include <mutex>

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

}  // namespace tsp::cuda
