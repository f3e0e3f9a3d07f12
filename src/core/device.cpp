#include "tsp/core/device.h"
#include "tsp/core/limits.h"

#include <array>
#include <charconv>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "tsp/core/error.h"

namespace tsp {

std::string Device::str() const {
  return kind == DeviceKind::CPU ? std::string("cpu") : "cuda:" + std::to_string(index);
}

Device parse_device(std::string_view text) {
  if (text == "cpu") return Device::cpu();
  if (text == "cuda") return Device::cuda(0);
  if (text.starts_with("cuda:")) {
    std::string_view n = text.substr(5);
    int index = -1;
    auto [end, ec] = std::from_chars(n.data(), n.data() + n.size(), index);
    if (ec == std::errc() && end == n.data() + n.size() && index >= 0) return Device::cuda(index);
  }
  TSP_FAIL("unknown device '{}': use cpu, cuda or cuda:N", text);
}

namespace {

// Host memory: 64-byte aligned (one cache line, one AVX-512 vector) so kernels may use aligned
// loads on tensor starts.
//
// Freed blocks are kept for reuse, by size (rounded up to 4 KiB), up to kCacheBytes per process:
// the engine allocates the same transient shapes every step, and without a cache every block above
// glibc's mmap threshold goes back to the kernel when freed and is faulted in (and zeroed by the
// kernel) again on the next step, which cost 4-5% of a block's forward+backward here. This is
// what a GPU caching allocator does too. The MemoryTracker counts tensors, not the cache; the
// cache adds at most kCacheBytes of resident memory per process. Sanitizer builds keep no cache,
// so AddressSanitizer still sees every use after free.
class CpuAllocator final : public Allocator {
 public:
  ~CpuAllocator() override {
    for (auto& [bytes, blocks] : free_)
      for (void* p : blocks) std::free(p);
  }
  Device device() const override { return Device::cpu(); }
  void* allocate(size_t bytes) override {
    const size_t size = block_size(bytes);
    if (kCaching) {
      std::lock_guard lock(mutex_);
      auto it = free_.find(size);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        cached_ -= size;
        return p;
      }
    }
    void* p = std::aligned_alloc(64, size);
    if (!p) TSP_FAIL("the host allocator returned no memory for {} bytes", bytes);
    return p;
  }
  void deallocate(void* p, size_t bytes) override {
    const size_t size = block_size(bytes);
    if (kCaching) {
      std::lock_guard lock(mutex_);
      if (cached_ + size <= kCacheBytes) {
        free_[size].push_back(p);
        cached_ += size;
        return;
      }
    }
    std::free(p);
  }
  void zero(void* p, size_t bytes) override { std::memset(p, 0, bytes); }
  void copy(void* dst, const void* src, size_t bytes) override { std::memmove(dst, src, bytes); }
  int64_t capacity_bytes() const override { return physical_memory_bytes(); }
  void copy_from_host(void* dst, const void* host, size_t bytes) override {
    std::memmove(dst, host, bytes);
  }
  void copy_to_host(void* host, const void* src, size_t bytes) override {
    std::memmove(host, src, bytes);
  }

 private:
#if defined(__SANITIZE_ADDRESS__)
  static constexpr bool kCaching = false;
#else
  static constexpr bool kCaching = true;
#endif
  static constexpr size_t kCacheBytes = size_t{512} << 20;
  static size_t block_size(size_t bytes) {
    return (bytes + 4095) / 4096 * 4096;
  }
  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0;
};

struct Registry {
  std::mutex mutex;
  std::map<std::pair<int, int>, std::unique_ptr<Allocator>> devices;
};
Registry& registry() {
  static Registry r;
  return r;
}

}  // namespace

static Allocator* find_allocator(Device device) {
  Registry& r = registry();
  std::lock_guard lock(r.mutex);
  auto it = r.devices.find({static_cast<int>(device.kind), device.index});
  return it == r.devices.end() ? nullptr : it->second.get();
}

Allocator& allocator_for(Device device) {
  static CpuAllocator cpu;
  if (device.is_cpu()) return cpu;
  if (Allocator* a = find_allocator(device)) return *a;
  try {
    initialize_device(device);  // outside the registry's lock: it registers the allocator
  } catch (const Error& e) {
    TSP_FAIL("no allocator for device {}: {}", device.str(), e.message());
  }
  Allocator* a = find_allocator(device);
  TSP_CHECK(a, "no allocator for device {}: its backend registered none", device.str());
  return *a;
}

namespace {
struct Initializers {
  std::mutex mutex;
  std::map<int, DeviceInitializer> kinds;
};
Initializers& initializers() {
  static Initializers i;
  return i;
}
}  // namespace

void register_device_initializer(DeviceKind kind, DeviceInitializer init) {
  Initializers& i = initializers();
  std::lock_guard lock(i.mutex);
  i.kinds[static_cast<int>(kind)] = init;
}

void initialize_device(Device device) {
  if (device.is_cpu()) return;
  DeviceInitializer init = nullptr;
  {
    Initializers& i = initializers();
    std::lock_guard lock(i.mutex);
    auto it = i.kinds.find(static_cast<int>(device.kind));
    if (it != i.kinds.end()) init = it->second;
  }
  TSP_CHECK(
      init,
      "this build has no CUDA backend (configure with -DTSP_WITH_CUDA=ON, or use --device cpu)");
  init(device.index);  // idempotent; throws when the device is absent
}

void register_allocator(DeviceKind kind, int index, std::unique_ptr<Allocator> allocator) {
  TSP_CHECK(kind != DeviceKind::CPU, "the CPU allocator is built in");
  Registry& r = registry();
  std::lock_guard lock(r.mutex);
  r.devices[{static_cast<int>(kind), index}] = std::move(allocator);
}

bool poison_allocations() {
  static const bool on = [] {
    const char* v = std::getenv("TSP_POISON_ALLOCATIONS");
    return v && std::strcmp(v, "1") == 0;
  }();
  return on;
}

}  // namespace tsp
