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

void set_device(int device) {
  TSP_CHECK(device >= 0 && device < kMaxDevices, "CUDA device ordinal {} out of range", device);
  TSP_CUDA_CHECK(cudaSetDevice(device));
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
  if (!p || device_count() == 0) return Device::cpu();
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
