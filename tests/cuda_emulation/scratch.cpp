// Scratch (src/backend/cuda/scratch.h) in the CUDA emulation: a cudaMalloc of the emulated
// runtime instead of a Workspace tensor of the caching allocator (which needs a GPU). The
// kernels see the same thing: `bytes` rounded up to 8, holding NaN bytes when fresh.
#include "backend/cuda/scratch.h"

#include <new>

namespace tsp::cuda {

Scratch::Scratch(size_t bytes, cudaStream_t) {
  void* p = nullptr;
  if (cudaMalloc(&p, (bytes + 7) / 8 * 8) != cudaSuccess) throw std::bad_alloc();
  data_ = static_cast<char*>(p);
}

Scratch::~Scratch() {
  cudaFree(data_);
}

}  // namespace tsp::cuda
