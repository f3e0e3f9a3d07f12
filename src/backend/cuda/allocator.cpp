// The caching device allocator: cudaMalloc'd blocks are kept when freed and handed out again for
// a request of the same block size, because cudaMalloc and cudaFree are slow (cudaFree
// synchronises the device) and a training step allocates the same transient shapes every time.
//
// Stream order: every operation on tensor memory is queued on the device's one compute stream
// (cuda_common.h). A block freed by a tensor may still be read by queued work; the next user of
// the block is also work queued on the compute stream, after it, so it can only touch the memory
// once the earlier work is done. No event per block is needed. Memory used on another stream (NCCL
// transfers) must be ordered against the compute stream by its user before the tensor is freed
// (the communicator's join_compute / events).
//
// Sizes: requests are rounded to 512 B below 1 MiB and to 2 MiB above (the driver's own large
// page), and a cached block is reused only by a request of exactly its size. On out of memory the
// cache is returned to the driver and the allocation retried once; then tsp::Error names the
// request, the bytes in use and cached, and the device.
//
// Tracking by category is Tensor's (core/tensor.cpp), as on the CPU; this only hands out bytes.
#include "backend/cuda/allocator.h"

#include <array>
#include <atomic>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "backend/cuda/cuda_common.h"

namespace tsp::cuda {
namespace {

constexpr size_t kSmallLimit = size_t{1} << 20;
constexpr size_t kSmallGranule = 512;
constexpr size_t kLargeGranule = size_t{2} << 20;

double mib(size_t bytes) {
  return static_cast<double>(bytes) / (1 << 20);
}

class CachingAllocator;
constexpr int kMaxDevices = 64;
std::array<std::atomic<CachingAllocator*>, kMaxDevices>& instances() {
  static std::array<std::atomic<CachingAllocator*>, kMaxDevices> a{};
  return a;
}

class CachingAllocator final : public Allocator {
 public:
  explicit CachingAllocator(int device) : device_(device) {
    TSP_CHECK(device >= 0 && device < kMaxDevices, "CUDA device ordinal {} out of range", device);
    instances()[device].store(this);
  }
  ~CachingAllocator() override {
    instances()[device_].store(nullptr);
    // At exit the CUDA runtime may already be shutting down: errors are ignored here.
    if (cudaSetDevice(device_) == cudaSuccess)
      for (auto& [size, blocks] : free_)
        for (void* p : blocks) cudaFree(p);
    cudaGetLastError();
  }

  Device device() const override { return Device::cuda(device_); }

  // The GPU's total memory. The CUDA context, cuBLASLt's workspace and NCCL's buffers come out of
  // it too and are not tensors: require_memory's callers compare the project's model of the
  // tensors with this, so a prediction within a few hundred MB of it can still meet the
  // allocator's out-of-memory error (which then names every size).
  // A property of device_, read without making device_ the current device: cudaMemGetInfo would
  // answer for the current device only, and a const query must not change which device the
  // calling thread's later CUDA calls go to.
  int64_t capacity_bytes() const override {
    cudaDeviceProp prop{};
    TSP_CUDA_CHECK(cudaGetDeviceProperties(&prop, device_));
    return static_cast<int64_t>(prop.totalGlobalMem);
  }

  void* allocate(size_t bytes) override {
    const size_t size = allocator_block_size(bytes);
    {
      std::lock_guard lock(mutex_);
      auto it = free_.find(size);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        cached_ -= size;
        in_use_ += size;
        poison(p, size);
        return p;
      }
    }
    set_device(device_);
    void* p = nullptr;
    cudaError_t status = cudaMalloc(&p, size);
    if (status == cudaErrorMemoryAllocation) {
      cudaGetLastError();  // clear it, give the cache back to the driver, try once more
      release_cache();
      status = cudaMalloc(&p, size);
    }
    if (status != cudaSuccess) {
      cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      cudaMemGetInfo(&free_b, &total_b);
      cudaGetLastError();
      std::lock_guard lock(mutex_);
      TSP_FAIL(
          "cuda:{} is out of memory: {} bytes ({:.1f} MiB, block {:.1f} MiB) requested, {:.1f} MiB "
          "in use by tensors, {:.1f} MiB cached, {:.1f} of {:.1f} MiB free on the device ({})",
          device_, bytes, mib(bytes), mib(size), mib(in_use_), mib(cached_), mib(free_b),
          mib(total_b), cudaGetErrorString(status));
    }
    {
      std::lock_guard lock(mutex_);
      in_use_ += size;
    }
    poison(p, size);
    return p;
  }

  void deallocate(void* p, size_t bytes) override {
    if (!p) return;
    const size_t size = allocator_block_size(bytes);
    std::lock_guard lock(mutex_);
    free_[size].push_back(p);
    cached_ += size;
    in_use_ -= size;
  }

  void zero(void* p, size_t bytes) override {
    if (bytes) TSP_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, compute_stream(device_)));
  }
  void copy(void* dst, const void* src, size_t bytes) override {
    if (bytes)
      TSP_CUDA_CHECK(
          cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, compute_stream(device_)));
  }
  void copy_from_host(void* dst, const void* host, size_t bytes) override {
    // From pageable memory the call returns once the host bytes are staged: `host` may be reused.
    if (bytes)
      TSP_CUDA_CHECK(
          cudaMemcpyAsync(dst, host, bytes, cudaMemcpyHostToDevice, compute_stream(device_)));
  }
  void copy_to_host(void* host, const void* src, size_t bytes) override {
    if (!bytes) return;
    cudaStream_t s = compute_stream(device_);
    wait_for_stream(s);  // first: a copy to pageable memory would wait unwatched (cuda_common.h)
    TSP_CUDA_CHECK(cudaMemcpyAsync(host, src, bytes, cudaMemcpyDeviceToHost, s));
    wait_for_stream(s);
  }

  size_t cached() {
    std::lock_guard lock(mutex_);
    return cached_;
  }
  size_t in_use() {
    std::lock_guard lock(mutex_);
    return in_use_;
  }

  // cudaFree waits for the device to be idle, so queued work that still reads a cached block
  // finishes first; wait_for_device first, so that a lost NCCL peer is an error, not a hang.
  void release_cache() {
    std::lock_guard lock(mutex_);
    set_device(device_);
    wait_for_device(device_);
    for (auto& [size, blocks] : free_)
      for (void* p : blocks) TSP_CUDA_CHECK(cudaFree(p));
    free_.clear();
    cached_ = 0;
  }

 private:
  // Under the test suite (TSP_POISON_ALLOCATIONS=1) new memory is 0xFF bytes (NaN, -1), as on
  // the host: code that relies on fresh memory being zero fails on the GPU too.
  void poison(void* p, size_t size) {
    if (poison_allocations())
      TSP_CUDA_CHECK(cudaMemsetAsync(p, 0xFF, size, compute_stream(device_)));
  }

  const int device_;
  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0, in_use_ = 0;
};

CachingAllocator* instance(int device) {
  if (device < 0 || device >= kMaxDevices) return nullptr;
  return instances()[device].load();
}

}  // namespace

size_t allocator_block_size(size_t bytes) {
  if (bytes == 0) bytes = 1;
  if (bytes < kSmallLimit) return (bytes + kSmallGranule - 1) / kSmallGranule * kSmallGranule;
  return (bytes + kLargeGranule - 1) / kLargeGranule * kLargeGranule;
}

std::unique_ptr<Allocator> make_caching_allocator(int device) {
  return std::make_unique<CachingAllocator>(device);
}

size_t cached_bytes(int device) {
  CachingAllocator* a = instance(device);
  return a ? a->cached() : 0;
}

size_t allocated_bytes(int device) {
  CachingAllocator* a = instance(device);
  return a ? a->in_use() : 0;
}

void release_cached_blocks(int device) {
  if (CachingAllocator* a = instance(device)) a->release_cache();
}

}  // namespace tsp::cuda
