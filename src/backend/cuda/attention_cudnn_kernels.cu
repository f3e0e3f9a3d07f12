// The small kernels around the cuDNN attention path (attention_cudnn.cpp): the per-call position
// check, the LSE layout change between ours ([nq, hq]) and cuDNN's softmax statistics ([hq, nq]),
// and the accumulation of cuDNN's bf16 gradients into ours. Launch statuses are returned (no
// tsp::Error under nvcc: attention_kernels.h).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "backend/cuda/attention_cudnn_rules.h"
#include "backend/cuda/attention_kernels.h"

namespace tsp::cuda::attn {
namespace {

constexpr int kThreads = 256;

int grid_for(int64_t n) {
  // Grid-stride loops below: a bounded grid serves any n.
  return static_cast<int>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, 4096));
}

// out->bad is 0 on entry (cudaMemsetAsync); any element off its run sets it (every writer stores
// the same value, so the race is benign). Thread 0 records the runs' starts.
__global__ void check_runs_kernel(const int64_t* __restrict__ q_pos, int64_t nq,
                                  const int64_t* __restrict__ k_pos, int64_t nk,
                                  PositionRuns* out) {
  const int64_t n = nq > nk ? nq : nk;
  bool ok = true;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    if (i < nq) ok = ok && cudnn::in_run(q_pos, i);
    if (i < nk) ok = ok && cudnn::in_run(k_pos, i);
  }
  if (!ok) out->bad = 1;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    out->q0 = q_pos[0];
    out->k0 = k_pos[0];
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

cudaError_t cudnn_check_positions(const int64_t* q_pos, int64_t nq, const int64_t* k_pos,
                                  int64_t nk, PositionRuns* out, cudaStream_t s) {
  if (nq < 1 || nk < 1) return cudaErrorInvalidValue;
  cudaError_t e = cudaMemsetAsync(&out->bad, 0, sizeof(out->bad), s);
  if (e != cudaSuccess) return e;
  check_runs_kernel<<<grid_for(std::max(nq, nk)), kThreads, 0, s>>>(q_pos, nq, k_pos, nk, out);
  return cudaGetLastError();
}

cudaError_t cudnn_lse_to_stats(const float* lse, float* stats, int64_t nq, int hq, cudaStream_t s) {
  if (nq * hq == 0) return cudaSuccess;
  lse_to_stats_kernel<<<grid_for(nq * hq), kThreads, 0, s>>>(lse, stats, nq, hq);
  return cudaGetLastError();
}

cudaError_t cudnn_stats_to_lse(const float* stats, float* lse, int64_t nq, int hq, cudaStream_t s) {
  if (nq * hq == 0) return cudaSuccess;
  stats_to_lse_kernel<<<grid_for(nq * hq), kThreads, 0, s>>>(stats, lse, nq, hq);
  return cudaGetLastError();
}

cudaError_t cudnn_add_bf16(const void* src, float* dst, int64_t n, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  add_bf16_kernel<<<grid_for(n), kThreads, 0, s>>>(static_cast<const __nv_bfloat16*>(src), dst, n);
  return cudaGetLastError();
}

}  // namespace tsp::cuda::attn
