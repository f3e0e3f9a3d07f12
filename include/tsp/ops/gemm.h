// GEMM on the CPU through oneDNN (primitives cached per shape). Row-major, BLAS-like:
//   C[M,N] = alpha · op(A)[M,K] · op(B)[K,N] + beta · C
// op(X) = X or Xᵀ. Leading dimensions are row strides in elements. beta is 0 or 1 (accumulate).
// Weights are stored [out, in] as in Hugging Face, so y = x·Wᵀ is gemm(N, T, ...).
#pragma once

#include <cstdint>

#include "tsp/core/bf16.h"

namespace tsp {

enum class Trans { N, T };

void gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// bf16 inputs, fp32 accumulation and output.
void gemm_bf16(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha, const bf16* A,
               int64_t lda, const bf16* B, int64_t ldb, float beta, float* C, int64_t ldc);

// bf16 inputs, fp32 accumulation, bf16 output: C = bf16(alpha · op(A) · op(B) + beta · C). With
// beta = 1 the old C is widened to fp32, added to the fp32 product and the sum rounded ONCE
// (oneDNN's sum post-op on a bf16 destination), so an accumulated result carries one bf16
// rounding, not two.
void gemm_bf16(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha, const bf16* A,
               int64_t lda, const bf16* B, int64_t ldb, float beta, bf16* C, int64_t ldc);

// Compute threads used by the GEMMs and vectorised loops of this process (default: 1 when
// OMP_NUM_THREADS is unset, which is right once ranks >= cores).
void set_compute_threads(int n);
int compute_threads();

}  // namespace tsp
