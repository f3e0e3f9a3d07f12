// Where memory lives and where operations run: the host (CPU) or a CUDA device. Tensors carry a
// Device beside their dtype and shape; every allocation goes through the Allocator of its device,
// so a GPU caching allocator (issue 8's CUDA backend) slots in without touching the engine, and
// every byte is still accounted by category in the MemoryTracker.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

namespace tsp {

enum class DeviceKind : int { CPU, CUDA };

struct Device {
  DeviceKind kind = DeviceKind::CPU;
  int index = 0;  // CUDA device ordinal; 0 for the CPU

  static Device cpu() { return {}; }
  static Device cuda(int index) { return {DeviceKind::CUDA, index}; }
  bool is_cpu() const { return kind == DeviceKind::CPU; }
  bool operator==(const Device&) const = default;
  std::string str() const;  // "cpu", "cuda:0"
};

// "cpu", "cuda" (device 0) or "cuda:N"; throws tsp::Error naming what is accepted.
Device parse_device(std::string_view text);

// Raw memory of one device. Implementations only hand out and take back bytes (64-byte aligned at
// least) and move them; tracking by category is done once, by Tensor.
class Allocator {
 public:
  virtual ~Allocator() = default;
  virtual Device device() const = 0;
  // Throws tsp::Error when the device is out of memory. bytes > 0.
  virtual void* allocate(size_t bytes) = 0;
  virtual void deallocate(void* p, size_t bytes) = 0;
  // Memory movement the Tensor class itself needs (zero, clone, host transfers). On a GPU these
  // are ordered on the device's current compute queue.
  virtual void zero(void* p, size_t bytes) = 0;
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;  // both on this device
  virtual void copy_from_host(void* dst, const void* host, size_t bytes) = 0;
  virtual void copy_to_host(void* host, const void* src, size_t bytes) = 0;  // synchronises
  // The memory this device has, in bytes: the machine's physical memory (or its cgroup limit) for
  // the CPU, the GPU's total memory for a CUDA device. What require_memory compares with.
  virtual int64_t capacity_bytes() const = 0;
};

// The allocator of a device. The CPU's always exists; another device's exists once its backend
// registered one (register_allocator), else tsp::Error says the build or the device lacks it.
Allocator& allocator_for(Device device);
void register_allocator(DeviceKind kind, int index, std::unique_ptr<Allocator> allocator);

// Devices other than the CPU are set up lazily: a backend built into this binary (the CUDA one,
// at load time) registers an initialiser for its kind, which allocator_for and backend_for call
// the first time they meet a device of that kind; it registers the device's allocator and backend
// or throws tsp::Error saying why it cannot (no such device). initialize_device throws "this
// build has no CUDA backend" when no initialiser is registered for the kind.
using DeviceInitializer = void (*)(int index);
void register_device_initializer(DeviceKind kind, DeviceInitializer init);
void initialize_device(Device device);

// Where a pointer's memory lives: Device::cuda(N) for device memory, Device::cpu() for host memory
// (pageable or pinned). Code compiled in every build asks this (the MPI communicator stages device
// buffers through host memory); the CUDA build registers its query at load time
// (src/comm/cuda/nccl.cpp). Without one every pointer is host memory, at the cost of one load.
using PointerDeviceQuery = Device (*)(const void* p);
void set_pointer_device_query(PointerDeviceQuery query);
Device pointer_device(const void* p);

// Debug aid: when the environment has TSP_POISON_ALLOCATIONS=1 (the test suite sets it), every new
// host tensor is filled with 0xFF bytes (NaN for floats, -1 for integers), so code that relies on
// fresh memory being zero fails loudly instead of passing by luck. Tensors are never zeroed
// implicitly: zero them explicitly (Tensor::zeros, Tensor::zero, Backend::zero) where it matters.
bool poison_allocations();

}  // namespace tsp
