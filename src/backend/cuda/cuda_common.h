// Shared plumbing of the CUDA backend (src/backend/cuda/) and the NCCL communicator
// (src/comm/cuda/): error checking, the compute stream and the host's waits for the device.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <functional>

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

// ---- the host waiting for the device ----
// Every wait of the host for device work goes through these, never through a blocking
// cudaStreamSynchronize. The reason is NCCL: when a peer process dies or the network fails, the
// operation's kernels wait for the peer for ever, so its stream, and every stream ordered after
// it (the compute stream after a join_compute), never drains; NCCL's proxy thread notices and
// sets the communicator's asynchronous error, and only ncclCommAbort ends the kernels. A
// blocking wait would hang the rank, and the job, for good. These poll the stream and, between
// polls, run the registered watches (each live NCCL communicator: its asynchronous error), which
// throw tsp::Error when the work can no longer finish.
//
// A copy to pageable host memory is synchronous on the host and starts only after the stream's
// earlier work, so it too waits for a lost peer for ever: wait_for_stream first, then the copy.

// Returns once `s` has run everything queued on it so far; throws the stream's error (a kernel's
// fault) or a watch's.
void wait_for_stream(cudaStream_t s);

// Returns once `device` has run everything queued on its compute stream and on the watched
// streams on it (before what waits for the whole device, as cudaFree does).
void wait_for_device(int device);

// A check that throws when queued device work can no longer finish, and the stream that work is
// on (waited for by wait_for_device). Registered by whoever queues such work; the returned id
// removes it. Thread-safe; the check runs under a lock, so it must not register or remove.
int64_t add_device_watch(int device, cudaStream_t s, std::function<void()> check);
void remove_device_watch(int64_t id);

// Every watch's check, once (what wait_for_stream runs between polls; for waits on an event).
void check_device_watches();

inline int blocks_for(int64_t n, int threads) {
  return static_cast<int>((n + threads - 1) / threads);
}

}  // namespace tsp::cuda
