// The runtime side of the CUDA emulation (README.md beside this file): device memory is host
// memory whose allocations are remembered (cp.async checks its sources against them, and
// cudaPointerGetAttributes answers from them); the launch errors a GPU reports through
// cudaGetLastError; the per-kernel dynamic shared memory limit of cudaFuncSetAttribute.
//
// Every allocation sits between two 256-byte guard zones holding a fixed pattern; after each
// kernel (and at cudaFree) the zones of every live allocation are compared with it, so a kernel
// that writes past either end of a buffer is an error naming the kernel's launch.
#include <cuda_runtime.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>

namespace tsp::emu {
namespace {

// Hopper's limits: 48 KiB of dynamic shared memory per block unless a kernel raises it, up to
// 227 KiB (cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_90).
constexpr size_t kDefaultDynamicShared = 48 * 1024;
constexpr size_t kMaxDynamicShared = 227 * 1024;
constexpr size_t kGuard = 256;
constexpr unsigned char kGuardByte = 0xa5;

// Never destroyed: static objects of the library (the caching allocator) free their blocks at
// exit, after this file's statics would be gone.
std::mutex& runtime_mutex() {
  static auto* m = new std::mutex;
  return *m;
}
std::map<uintptr_t, size_t>& allocations() {  // base -> bytes
  static auto* m = new std::map<uintptr_t, size_t>;
  return *m;
}
std::map<const void*, size_t>& shared_limits() {
  static auto* m = new std::map<const void*, size_t>;
  return *m;
}
cudaError_t last_error = cudaSuccess;

// Whether the guard zones of the allocation at `base` (`bytes` long) still hold the pattern. The
// zone after it starts at `bytes` exactly, so a write one element past the end shows.
bool guards_intact(uintptr_t base, size_t bytes) {
  const auto* p = reinterpret_cast<const unsigned char*>(base);
  for (size_t i = 1; i <= kGuard; ++i)
    if (p[-static_cast<ptrdiff_t>(i)] != kGuardByte) return false;
  for (size_t i = 0; i < kGuard; ++i)
    if (p[bytes + i] != kGuardByte) return false;
  return true;
}

}  // namespace

cudaError_t malloc_device(void** p, size_t bytes) {
  // 256-byte aligned like cudaMalloc, between two guard zones; fresh memory holds NaN bytes, as
  // the library's poisoned allocations in the tests (a kernel that reads what nobody wrote shows).
  const size_t body = (std::max<size_t>(bytes, 1) + 255) / 256 * 256;
  auto* block = static_cast<unsigned char*>(std::aligned_alloc(256, kGuard + body + kGuard));
  if (!block) return cudaErrorMemoryAllocation;
  std::memset(block, kGuardByte, kGuard + body + kGuard);
  std::memset(block + kGuard, 0xff, bytes);
  std::lock_guard<std::mutex> lock(runtime_mutex());
  allocations()[reinterpret_cast<uintptr_t>(block + kGuard)] = bytes;
  *p = block + kGuard;
  return cudaSuccess;
}

cudaError_t free_device(void* p) {
  if (!p) return cudaSuccess;
  std::lock_guard<std::mutex> lock(runtime_mutex());
  auto it = allocations().find(reinterpret_cast<uintptr_t>(p));
  if (it == allocations().end()) return cudaErrorInvalidValue;
  if (!guards_intact(it->first, it->second))
    throw std::runtime_error("CUDA emulation: a write outside the allocation of " +
                             std::to_string(it->second) + " bytes freed now");
  allocations().erase(it);
  std::free(static_cast<unsigned char*>(p) - kGuard);
  return cudaSuccess;
}

void check_guards(const char* after) {
  std::lock_guard<std::mutex> lock(runtime_mutex());
  for (const auto& [base, bytes] : allocations())
    if (!guards_intact(base, bytes))
      throw std::runtime_error(std::string("CUDA emulation: ") + after +
                               " wrote outside an allocation of " + std::to_string(bytes) +
                               " bytes");
}

bool is_device_range(const void* p, size_t bytes) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  std::lock_guard<std::mutex> lock(runtime_mutex());
  auto it = allocations().upper_bound(a);
  if (it == allocations().begin()) return false;
  --it;
  return a >= it->first && a + bytes <= it->first + it->second;
}

cudaError_t set_max_dynamic_shared(const void* kernel, int bytes) {
  if (bytes < 0 || static_cast<size_t>(bytes) > kMaxDynamicShared) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(runtime_mutex());
  shared_limits()[kernel] = static_cast<size_t>(bytes);
  return cudaSuccess;
}

size_t max_dynamic_shared(const void* kernel) {
  std::lock_guard<std::mutex> lock(runtime_mutex());
  auto it = shared_limits().find(kernel);
  return it == shared_limits().end() ? kDefaultDynamicShared : it->second;
}

void enqueue(cudaStream_t, std::function<void()> op) {
  op();
}

void set_launch_error(cudaError_t e) {
  last_error = e;
}

cudaError_t take_last_error() {
  const cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}

const char* error_name(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "cudaSuccess";
    case cudaErrorInvalidValue:
      return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation:
      return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration:
      return "cudaErrorInvalidConfiguration";
    case cudaErrorNoDevice:
      return "cudaErrorNoDevice";
    case cudaErrorNotReady:
      return "cudaErrorNotReady";
    case cudaErrorLaunchFailure:
      return "cudaErrorLaunchFailure";
  }
  return "cudaError (emulation: unknown code)";
}

}  // namespace tsp::emu
