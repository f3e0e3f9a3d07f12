// The pointer query of core/device.h: a function pointer set once, at load time, by the CUDA
// build (src/comm/cuda/nccl.cpp); a CPU build never sets it and every pointer is host memory.
#include <atomic>

#include "tsp/core/device.h"

namespace tsp {
namespace {
// Constant-initialised, so a registration from another library's static initialiser cannot run
// before it.
std::atomic<PointerDeviceQuery> g_pointer_query{nullptr};
}  // namespace

void set_pointer_device_query(PointerDeviceQuery query) {
  g_pointer_query.store(query, std::memory_order_release);
}

Device pointer_device(const void* p) {
  const PointerDeviceQuery query = g_pointer_query.load(std::memory_order_acquire);
  if (query == nullptr || p == nullptr) return Device::cpu();
  return query(p);
}

}  // namespace tsp
