// Raw-pointer launchers of the CUDA attention kernels (attention_reference.cu,
// attention_flash.cu, and the helpers of the cuDNN path in attention_cudnn_kernels.cu). attention.cpp checks shapes, dtypes and devices and calls these; each
// returns the launch status because .cu files cannot build tsp::Error messages (fmt's consteval
// format strings do not compile under nvcc), so the caller wraps every call in TSP_CUDA_CHECK.
//
// Layouts (all contiguous, row-major): q, o [nq, hq, d]; k, v [nk, hkv, d]; lse F32 [nq, hq];
// q_pos I64 [nq], k_pos I64 [nk]; q_doc_pos I64 [nq] or null (documents: query i sees key j iff
// q_pos[i] - q_doc_pos[i] <= k_pos[j] <= q_pos[i]); dout, dq F32 [nq, hq, d]; dk, dv F32 [nk, hkv, d].
// Query head h reads kv head h / (hq / hkv) (the CPU's mapping, src/ops/cpu/attention_reference.cpp).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace tsp::cuda::attn {

struct Shape {
  int64_t nq = 0, nk = 0;
  int hq = 0, hkv = 0, d = 0;
};

struct Fwd {
  Shape sh;
  bool bf16 = false;  // q, k, v, o are __nv_bfloat16 (else float)
  const void *q = nullptr, *k = nullptr, *v = nullptr;
  const int64_t *q_pos = nullptr, *k_pos = nullptr;
  const int64_t* q_doc_pos = nullptr;  // [nq] position in its document; null: no documents
  void* o = nullptr;
  float* lse = nullptr;
  float scale = 1.f;
};

struct Bwd {
  Shape sh;
  bool bf16 = false;  // q, k, v, o are __nv_bfloat16 (else float)
  const void *q = nullptr, *k = nullptr, *v = nullptr, *o = nullptr;
  const int64_t *q_pos = nullptr, *k_pos = nullptr;
  const int64_t* q_doc_pos = nullptr;  // [nq] position in its document; null: no documents
  const float *lse = nullptr, *dout = nullptr;
  float *dq = nullptr, *dk = nullptr, *dv = nullptr;  // accumulated (+=)
  float scale = 1.f;
};

// ---- reference kernels (attention_reference.cu): any d in [1, 256], F32 or BF16 ----
// Forward: one warp per (query, head), online softmax in fp32. Backward: a dq pass (one warp per
// (query, head)) and a dk/dv pass (one warp per (key, kv head)); deterministic, no atomics.
constexpr int kReferenceMaxHeadDim = 256;
cudaError_t reference_forward(const Fwd& p, cudaStream_t s);
cudaError_t reference_backward(const Bwd& p, cudaStream_t s);

// Element-wise LSE merge (the same kernel serves both paths). o_a, o_b each F32 or BF16.
cudaError_t merge(void* o_a, bool a_bf16, float* lse_a, const void* o_b, bool b_bf16,
                  const float* lse_b, int64_t rows, int d, cudaStream_t s);

// ---- flash kernels (attention_flash.cu): BF16, d in {64, 128}, tensor cores, documents too ----
bool flash_supported(int d);
cudaError_t flash_forward(const Fwd& p, cudaStream_t s);
// dq accumulates through fp32 atomics (summation order varies from run to run); dk, dv are owned
// by one block each (deterministic).
cudaError_t flash_backward(const Bwd& p, cudaStream_t s);

// ---- flash kernels, version 2 (attention_flash_v2.cu): same inputs and rounding as above ----
// Whether v2's forward (backward = false) or backward serves this shape: d 64 or 128, and at most
// 8192 tiles in a block's bitmask — the forward's key tiles of 64 (up to 524288 keys), the
// backward's query tiles of 32 (up to 262144 queries) — and grids within 65535 (the forward's
// query tiles of 128, the backward's key tiles of 128); attention.cpp falls back to v1 otherwise.
bool flash_v2_supported(const Shape& sh, bool backward);
// dk, dv as well as dq accumulate through fp32 atomics (float2: dq, dk, dv must be 8-byte aligned).
// Both take their scratch from the device's caching allocator as a Workspace tensor (scratch.h),
// counted by the MemoryTracker (on another stream than the compute stream, at the cost of a wait).
cudaError_t flash_forward_v2(const Fwd& p, cudaStream_t s);
cudaError_t flash_backward_v2(const Bwd& p, cudaStream_t s);

// ---- around the cuDNN path (attention_cudnn_kernels.cu; attention_cudnn.cpp calls them) ----
// The runs of q_pos and of k_pos (attention_cudnn_pieces.h: rows holding consecutive positions):
// the row where each starts and its position, in the order the device found them; written on the
// device, read by the host after a copy. A count above kMaxPositionRuns means more runs than the
// slots hold (the first ones found are stored): the call is not covered.
constexpr int kMaxPositionRuns = 64;
struct PositionRuns {
  int32_t q_count = 0, k_count = 0;
  int64_t q_row[kMaxPositionRuns], q_pos[kMaxPositionRuns];
  int64_t k_row[kMaxPositionRuns], k_pos[kMaxPositionRuns];
};
// Clears the counts, then finds the runs (nq, nk >= 1); out is device memory.
cudaError_t cudnn_find_runs(const int64_t* q_pos, int64_t nq, const int64_t* k_pos, int64_t nk,
                            PositionRuns* out, cudaStream_t s);
// Ours lse F32 [nq, hq] <-> cuDNN's softmax statistics F32 [hq, nq] (its packed [b=1, h, s, 1]).
cudaError_t cudnn_lse_to_stats(const float* lse, float* stats, int64_t nq, int hq, cudaStream_t s);
cudaError_t cudnn_stats_to_lse(const float* stats, float* lse, int64_t nq, int hq, cudaStream_t s);
// dst[i] += src[i] (src bf16) for n elements.
cudaError_t cudnn_add_bf16(const void* src, float* dst, int64_t n, cudaStream_t s);

}  // namespace tsp::cuda::attn
