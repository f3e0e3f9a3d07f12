// Causal GQA attention of the CUDA backend at explicit positions, with the LSE output and the LSE
// merge: exactly the semantics of Backend::attention_forward / attention_backward /
// attention_merge (include/tsp/backend/backend.h), which the CPU backend defines:
//   q [nq, hq, d] at q_pos I64 [nq]; k, v [nk, hkv, d] at k_pos I64 [nk]; query i sees key j iff
//   k_pos[j] <= q_pos[i] (positions are arbitrary: nothing assumes them sorted or contiguous);
//   query head h reads kv head h / (hq / hkv). o like q (=), lse F32 [nq, hq] (=; -inf and o = 0
//   for a query that sees no key). q, k, v, o share one dtype, F32 or BF16; statistics and
//   accumulation are fp32. Backward: dout F32 [nq, hq, d] -> dq F32 [nq, hq, d] (+=), dk, dv F32
//   [nk, hkv, d] (+=). Documents: q_doc_pos I64 [nq] (empty: none), query i sees key j iff
//   q_pos[i] - q_doc_pos[i] <= k_pos[j] <= q_pos[i].
//
// Paths (attention.cpp chooses):
//   * flash (attention_flash.cu): BF16 q/k/v/o with d = 64 or 128, with or without documents.
//     Tensor cores (mma.sync m16n8k16, bf16 inputs, fp32 accumulation), FlashAttention-2
//     schedule, key tiles that no query of a tile can see are skipped (decided from the positions
//     and, with documents, the document starts at run time: a key tile below every document start
//     of a query tile is skipped like one above every query; with documents the kernels are
//     separate template instances, so the calls without documents run the causal-only code).
//     These tile rules (skip, and "full": no element-wise mask) and the padding sentinels are in
//     attention_tile_rules.h, shared by v1 and v2 and checked against brute force over every pair
//     on the CPU (tests/backend/attention_tile_rules_test.cpp). The document bound in the flash
//     kernels (both versions) has NOT YET RUN ON A GPU: it waits for cuda_attention_test's
//     document cases (scripts/gpu_check.sh). Extra rounding against the reference: P is
//     rounded to bf16 before P·V and dP; dout is rounded to bf16 for the dV and dP products; dS
//     is rounded to bf16 for the dK and dQ products. dq is accumulated with fp32 atomics (its
//     summation order varies between runs); dk, dv do not.
//     Two versions of the flash kernels: v1 (attention_flash.cu, the default: the version that has
//     passed the tests on a GPU, an H200) and v2 (attention_flash_v2.cu, NOT YET RUN ON A GPU:
//     precomputed tile bounds, heaviest blocks first, 2 forward blocks per SM, a backward of 8
//     warps per (query head, 128 keys) with double-buffered query tiles; dk and dv also through
//     fp32 atomics; its scratch is a tracked Workspace tensor, scratch.h). v2
//     becomes the default once cuda_attention_test passes and bench_attention --flash both shows
//     it faster on a GPU. The environment variable TSP_CUDA_FLASH=v1 or
//     v2, read once per process (at the first call that needs it), selects one;
//     set_flash_version overrides it (bench_attention --flash, the tests). Shapes beyond v2's
//     limits (over 262144 queries or 524288 keys) take v1.
//   * cudnn (attention_cudnn.cpp, opt-in: TSP_CUDA_FLASH=cudnn or set_flash_version(Cudnn); NOT
//     YET RUN ON A GPU): cuDNN's fused attention (SDPA, through the header-only cuDNN frontend)
//     for the flash-served calls it covers exactly (attention_cudnn_rules.h and
//     attention_cudnn_pieces.h, checked on the CPU by tests/backend/attention_cudnn_*_test.cpp):
//     BF16, d = 64 or 128, no documents, nq >= 64, positions in at most 64 contiguous runs on
//     each side (the layouts' zigzag chunks, K/V gathered in rank order or a K/V round's chunks),
//     no two keys at one position, and every query seeing a key. Each run of queries becomes one
//     or a few cuDNN calls of one causal band. The positions are on the device: each call finds
//     their runs with a small kernel and one stream sync. Calls it does not cover, and shapes
//     cuDNN does not support (logged once), take v1. Extra rounding (beyond the flash path's):
//     each cuDNN call's dq, dk, dv pass through bf16 before they are added. libcudnn.so.9
//     is loaded at run time: without it TSP_CUDA_FLASH=cudnn fails naming what is missing, and
//     nothing else changes. Built when CMake finds the cuDNN and frontend headers
//     (TSP_WITH_CUDNN).
//   * reference (attention_reference.cu): everything else (F32, or any d up to 256, with or
//     without documents). One warp per (query, head), fp32 online softmax; deterministic.
// Every call is queued on stream `s` and returns without waiting; all tensors must be on the
// device that is current and `s` must belong to it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "tsp/core/tensor.h"

namespace tsp::cuda {

void attention_forward(TensorView q, TensorView k, TensorView v, TensorView q_pos, TensorView k_pos,
                       TensorView q_doc_pos, TensorView o, TensorView lse, float scale,
                       cudaStream_t s);
void attention_backward(TensorView q, TensorView k, TensorView v, TensorView q_pos,
                        TensorView k_pos, TensorView q_doc_pos, TensorView o, TensorView lse,
                        TensorView dout, TensorView dq, TensorView dk, TensorView dv, float scale,
                        cudaStream_t s);
// (o_a, lse_a) <- ((o_a·e^lse_a + o_b·e^lse_b) / (e^lse_a + e^lse_b), log of the sum); o_a, o_b
// [nq, hq, d] F32 or BF16 (each), lse F32 [nq, hq].
void attention_merge(TensorView o_a, TensorView lse_a, TensorView o_b, TensorView lse_b,
                     cudaStream_t s);

// The flash kernels' version (see above): TSP_CUDA_FLASH at the first call, else v1, until
// set_flash_version. Thread-safe; a change applies to the calls made after it. Cudnn: cuDNN for
// the calls it covers, v1 for the other flash-served calls.
enum class FlashVersion { V1 = 1, V2 = 2, Cudnn = 3 };
FlashVersion flash_version();
void set_flash_version(FlashVersion v);
const char* flash_version_name(FlashVersion v);  // "v1", "v2", "cudnn"

// Whether this build has the cuDNN path (CMake's TSP_WITH_CUDNN), and "" when it can run here
// (libcudnn.so.9 loads; tried once per process), else what is missing.
bool cudnn_attention_built();
std::string cudnn_attention_unavailable();
// Calls the cuDNN path has run in this process (the tests check which calls took it).
int64_t cudnn_attention_calls();
// The cuDNN frontend's own checks of the path's graph for one call, on the CPU (no GPU needed:
// attention_cudnn.h, cudnn_check_graph): nk_passed is nk', right_bound the band's or -1 (no
// mask), sm the SM version (e.g. 90). "" when they pass, else the frontend's message.
std::string cudnn_attention_check_graph(bool backward, int64_t nq, int64_t nk_passed, int hq,
                                        int hkv, int d, int64_t right_bound, float scale, int sm);

// Whether the flash path serves this head dim and dtype (BF16, d = 64 or 128).
bool attention_flash_supported(DType dtype, int64_t head_dim);

// The simple kernels, for any d up to 256 and F32 or BF16: the tests' baseline for the flash path.
namespace reference {
void attention_forward(TensorView q, TensorView k, TensorView v, TensorView q_pos, TensorView k_pos,
                       TensorView q_doc_pos, TensorView o, TensorView lse, float scale,
                       cudaStream_t s);
void attention_backward(TensorView q, TensorView k, TensorView v, TensorView q_pos,
                        TensorView k_pos, TensorView q_doc_pos, TensorView o, TensorView lse,
                        TensorView dout, TensorView dq, TensorView dk, TensorView dv, float scale,
                        cudaStream_t s);
void attention_merge(TensorView o_a, TensorView lse_a, TensorView o_b, TensorView lse_b,
                     cudaStream_t s);
}  // namespace reference

}  // namespace tsp::cuda
