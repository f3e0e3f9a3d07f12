// Device scratch for the launchers of .cu files (attention_flash_v2.cu), which do not include the
// project's C++ headers (fmt's consteval format strings do not compile under nvcc): a
// MemCategory::Workspace tensor of the device's caching allocator behind an nvcc-safe face, so
// the scratch is counted by the MemoryTracker like every other transient (issue 10; the memory
// model's "On a GPU" table, docs/cost-model.md).
//
// Stream order: the caching allocator hands a freed block to the next request without an event
// (allocator.cpp), which is safe for work queued on the device's compute stream: the backend's
// calls (cuda_backend.cpp) pass it, as for gemm.cpp's Workspace tensors, and then a Scratch costs
// nothing beyond the allocation and the launcher frees it as soon as its kernels are queued (the
// next user of the block is queued after them). Any other stream (the kernel tests call the
// launchers on the legacy default stream) is ordered explicitly: it waits for the compute stream
// before using the block (earlier users, the allocator's poison fill), and the destructor waits
// for it before giving the block back.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace tsp::cuda {

class Scratch {
 public:
  // `bytes` (rounded up to 8, the element size of the I64 tensor that holds them) on the
  // current device, for work queued on `s`. Throws tsp::Error when the device is out of memory
  // (the allocator's message names the sizes).
  Scratch(size_t bytes, cudaStream_t s);
  ~Scratch();
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  char* data() const { return data_; }

 private:
  void* tensor_ = nullptr;  // a tsp::Tensor, opaque here
  char* data_ = nullptr;
  cudaStream_t foreign_ = nullptr;  // `s` when it is not the compute stream
  bool on_compute_ = true;
};

}  // namespace tsp::cuda
