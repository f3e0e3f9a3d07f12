// The small kernels around the cuDNN attention path (attention_cudnn.cpp): the per-call run
// finder, the LSE layout change between ours ([nq, hq]) and cuDNN's softmax statistics ([hq, nq]),
// and the accumulation of cuDNN's bf16 gradients into ours. Launch statuses are returned (no
// tsp::Error under nvcc: attention_kernels.h).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "backend/cuda/attention_cudnn_rules.h"
#include "backend/cuda/attention_kernels.h"
#include "backend/cuda/launch.cuh"

namespace tsp::cuda::attn {
namespace {

constexpr int kThreads = 256;

int grid_for(int64_t n) {
  // Grid-stride loops below: a bounded grid serves any n.
  return static_cast<int>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, 4096));
}

// The rows of pos[n] where a run starts (row 0, and each row whose position is not the previous
// one's + 1) go to the next free slots of (rows, starts), counted in *count. One atomic per warp
// (its lanes' starts take consecutive slots), so a call with a start on every row (shuffled
// positions) costs n / 32 atomics, not n. i0 is the warp's first row: every lane of a warp runs the
// same iterations, as __ballot_sync needs.
__device__ __forceinline__ void record_starts(const int64_t* __restrict__ pos, int64_t n,
                                              int64_t i0, int lane, int32_t* count, int64_t* rows,
                                              int64_t* starts) {
  const int64_t i = i0 + lane;
  // Unsigned +1: no overflow at INT64_MAX (the host's runs_in_range refuses such runs).
  const bool start =
      i < n && (i == 0 || static_cast<uint64_t>(pos[i]) != static_cast<uint64_t>(pos[i - 1]) + 1);
  const unsigned mask = __ballot_sync(0xffffffffu, start);
  if (mask == 0) return;
  const int leader = __ffs(mask) - 1;
  int32_t first = 0;
  if (lane == leader) first = atomicAdd(count, __popc(mask));
  first = __shfl_sync(0xffffffffu, first, leader);
  const int32_t slot = first + __popc(mask & ((1u << lane) - 1u));
  if (start && slot < kMaxPositionRuns) {
    rows[slot] = i;
    starts[slot] = pos[i];
  }
}

// Grid-stride over max(nq, nk) rows, a warp at a time (blockDim and the stride are multiples of
// 32). The counts are 0 on entry (cudaMemsetAsync).
__global__ void find_runs_kernel(const int64_t* __restrict__ q_pos, int64_t nq,
                                 const int64_t* __restrict__ k_pos, int64_t nk, PositionRuns* out) {
  const int64_t n = nq > nk ? nq : nk;
  const int lane = threadIdx.x % 32;
  for (int64_t i0 = blockIdx.x * int64_t{blockDim.x} + (threadIdx.x - lane); i0 < n;
       i0 += int64_t{gridDim.x} * blockDim.x) {
    record_starts(q_pos, nq, i0, lane, &out->q_count, out->q_row, out->q_pos);
    record_starts(k_pos, nk, i0, lane, &out->k_count, out->k_row, out->k_pos);
  }
}

// dst[h·nq + i] = src[i·hq + h] (to_stats) or dst[i·hq + h] = src[h·nq + i]; one thread per
// destination element (coalesced stores; the tensors are small: nq·hq floats).
__global__ void lse_to_stats_kernel(const float* __restrict__ lse, float* __restrict__ stats,
                                    int64_t nq, int hq) {
  const int64_t n = nq * hq;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < n;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t h = e / nq, i = e % nq;
    stats[e] = lse[i * hq + h];
  }
}

__global__ void stats_to_lse_kernel(const float* __restrict__ stats, float* __restrict__ lse,
                                    int64_t nq, int hq) {
  const int64_t n = nq * hq;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < n;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t i = e / hq, h = e % hq;
    lse[e] = stats[h * nq + i];
  }
}

__global__ void add_bf16_kernel(const __nv_bfloat16* __restrict__ src, float* __restrict__ dst,
                                int64_t n) {
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < n;
       e += int64_t{gridDim.x} * blockDim.x)
    dst[e] += __bfloat162float(src[e]);
}

}  // namespace

cudaError_t cudnn_find_runs(const int64_t* q_pos, int64_t nq, const int64_t* k_pos, int64_t nk,
                            PositionRuns* out, cudaStream_t s) {
  if (nq < 1 || nk < 1) return cudaErrorInvalidValue;
  cudaError_t e = cudaMemsetAsync(out, 0, 2 * sizeof(int32_t), s);  // q_count, k_count
  if (e != cudaSuccess) return e;
  TSP_LAUNCH(grid_for(std::max(nq, nk)), kThreads, 0, s, find_runs_kernel)
  (q_pos, nq, k_pos, nk, out);
  return cudaGetLastError();
}

cudaError_t cudnn_lse_to_stats(const float* lse, float* stats, int64_t nq, int hq, cudaStream_t s) {
  if (nq * hq == 0) return cudaSuccess;
  TSP_LAUNCH(grid_for(nq * hq), kThreads, 0, s, lse_to_stats_kernel)(lse, stats, nq, hq);
  return cudaGetLastError();
}

cudaError_t cudnn_stats_to_lse(const float* stats, float* lse, int64_t nq, int hq, cudaStream_t s) {
  if (nq * hq == 0) return cudaSuccess;
  TSP_LAUNCH(grid_for(nq * hq), kThreads, 0, s, stats_to_lse_kernel)(stats, lse, nq, hq);
  return cudaGetLastError();
}

cudaError_t cudnn_add_bf16(const void* src, float* dst, int64_t n, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  TSP_LAUNCH(grid_for(n), kThreads, 0, s, add_bf16_kernel)
  (static_cast<const __nv_bfloat16*>(src), dst, n);
  return cudaGetLastError();
}

}  // namespace tsp::cuda::attn
