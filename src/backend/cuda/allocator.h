// The caching device allocator of the CUDA backend (allocator.cpp). Registered for each device by
// the backend's device initialiser; tensors reach it through allocator_for(Device::cuda(i)).
#pragma once

#include <cstddef>
#include <memory>

#include "tsp/core/device.h"

namespace tsp::cuda {

std::unique_ptr<Allocator> make_caching_allocator(int device);

// Diagnostics: bytes of `device` held in the allocator's cache (freed by tensors, kept for
// reuse), and bytes handed out to live tensors (rounded to the allocator's block sizes). 0 for a
// device without an allocator.
size_t cached_bytes(int device);
size_t allocated_bytes(int device);

// Returns the cached blocks of `device` to the driver (cudaFree). Tests and out-of-memory retries.
void release_cached_blocks(int device);

// The block size a request of `bytes` occupies: a multiple of 512 B below 1 MiB, of 2 MiB above.
size_t allocator_block_size(size_t bytes);

}  // namespace tsp::cuda
