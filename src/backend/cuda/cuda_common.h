// Shared plumbing of the CUDA backend (src/backend/cuda/) and the NCCL communicator
// (src/comm/cuda/): error checking and the compute stream. Included by .cu and .cpp files alike.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "tsp/core/device.h"
#include "tsp/core/error.h"
#include "tsp/core/tensor.h"

// CUDA_CHECK(call): throw tsp::Error naming the call, the CUDA error and where it happened.
#define TSP_CUDA_CHECK(call)                                                             \
  do {                                                                                   \
    cudaError_t tsp_cuda_status_ = (call);                                               \
    TSP_CHECK(tsp_cuda_status_ == cudaSuccess, "CUDA error in {}: {} ({})", #call,       \
              cudaGetErrorString(tsp_cuda_status_), cudaGetErrorName(tsp_cuda_status_)); \
  } while (0)

// After a kernel launch: a bad launch configuration surfaces here, at the launch site.
#define TSP_CUDA_CHECK_LAUNCH() TSP_CUDA_CHECK(cudaGetLastError())

namespace tsp::cuda {

// The compute stream of a device: every backend op, every allocator copy and every
// join_compute() of a transfer is ordered on it. Created on first use (non-blocking with respect
// to the legacy default stream); the calling thread's current device is set to `device`.
cudaStream_t compute_stream(int device);

// Make `device` current on this thread (cudaSetDevice, checked).
void set_device(int device);

// Number of CUDA devices visible (0 when no driver or no device: never throws).
int device_count();

// A pointer's device: Device::cuda(N) for device (or managed) memory, Device::cpu() for host
// memory, pageable or pinned. The MPI communicator stages device buffers through host memory.
Device pointer_device(const void* p);

inline int blocks_for(int64_t n, int threads) {
  return static_cast<int>((n + threads - 1) / threads);
}

}  // namespace tsp::cuda
