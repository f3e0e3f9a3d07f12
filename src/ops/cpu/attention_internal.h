// Internals of the CPU attention kernels, shared by the fast path, the reference path and the
// tests (which use the reference as an oracle and call the fast path directly).
#pragma once

#include <cstdint>

#include "tsp/ops/attention.h"

namespace tsp::attn {

// Throws tsp::Error (with what to fix) for inconsistent shapes or missing buffers.
void validate(const AttentionParams& p, const char* who);
void validate_backward(const AttentionBackwardParams& p);
void validate(const AttentionBf16Params& p, const char* who);
void validate_backward(const AttentionBf16BackwardParams& p);

// Plain scalar reference: one query (and head) at a time, double accumulators, two passes over the
// keys it sees (max, then exp-sum). O(d) scratch. Readable first; the oracle of the fast path.
void forward_reference(const AttentionParams& p);
void backward_reference(const AttentionBackwardParams& p);

// Whether the blocked AVX-512 path can run: built with AVX-512F and head_dim % 16 == 0.
bool fast_path_available(int64_t head_dim);
// Blocked, register-tiled AVX-512 path (flash-attention 2 schedule). Requires fast_path_available.
void forward_fast(const AttentionParams& p);
void backward_fast(const AttentionBackwardParams& p);

// y[i] = 2^x[i] with the vectorised polynomial used by the fast path (exposed for its accuracy
// test). Inputs below -126 give exactly 0 (their terms are < 2^-126 of the row maximum's term).
void exp2_fast(const float* x, float* y, int64_t n);

// ---- bf16 (attention_bf16.cpp) ----
// Reference: widen q, k, v (and o) to fp32, run forward_reference / backward_reference, round o
// once. The oracle of the bf16 fast paths.
void forward_reference_bf16(const AttentionBf16Params& p);
void backward_reference_bf16(const AttentionBf16BackwardParams& p);
// Widened: widen to fp32 and run the fp32 fast path (or the reference where it is unavailable).
// The bf16 path of a CPU without AVX512_BF16; exact up to the fp32 path's error and o's rounding.
void forward_widened_bf16(const AttentionBf16Params& p);
void backward_widened_bf16(const AttentionBf16BackwardParams& p);
// Whether the native bf16 path can run: built with AVX512_BF16, the CPU has it (checked at run
// time), and head_dim % 32 == 0.
bool bf16_fast_path_available(int64_t head_dim);
// Blocked AVX512_BF16 path (vdpbf16ps products, fp32 statistics). Requires
// bf16_fast_path_available.
void forward_fast_bf16(const AttentionBf16Params& p);
void backward_fast_bf16(const AttentionBf16BackwardParams& p);

}  // namespace tsp::attn
