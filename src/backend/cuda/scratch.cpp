// Scratch (scratch.h): a Workspace tensor on the current device; work on another stream than the
// compute stream is ordered against it explicitly.
#include "backend/cuda/scratch.h"

#include <memory>

#include "backend/cuda/cuda_common.h"
#include "tsp/comm/mpi.h"  // abort_job

namespace tsp::cuda {

Scratch::Scratch(size_t bytes, cudaStream_t s) {
  int device = -1;
  TSP_CUDA_CHECK(cudaGetDevice(&device));
  const cudaStream_t compute = compute_stream(device);
  const int64_t words = static_cast<int64_t>((bytes + 7) / 8);
  auto t = std::make_unique<Tensor>(Shape{words}, DType::I64, MemCategory::Workspace,
                                    Device::cuda(device));
  data_ = static_cast<char*>(t->data());
  on_compute_ = s == compute;
  if (on_compute_) {
    tensor_ = t.release();
    return;
  }
  // Another stream: it starts after everything the compute stream has queued so far (the block's
  // earlier users, the poison fill of a new block).
  foreign_ = s;
  cudaEvent_t ready = nullptr;
  TSP_CUDA_CHECK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
  TSP_CUDA_CHECK(cudaEventRecord(ready, compute));
  TSP_CUDA_CHECK(cudaStreamWaitEvent(s, ready, 0));
  TSP_CUDA_CHECK(cudaEventDestroy(ready));  // released once the wait has happened
  tensor_ = t.release();
}

Scratch::~Scratch() {
  // Another stream: its queued work must be done before the block can serve the compute stream.
  // A destructor does not throw: if that work can never finish (a lost NCCL peer), the rank
  // cannot go on, and the job ends with the reason rather than hang.
  if (!on_compute_) {
    try {
      wait_for_stream(foreign_);
    } catch (const std::exception& e) {
      abort_job(e.what());
    }
  }
  delete static_cast<Tensor*>(tensor_);
}

}  // namespace tsp::cuda
