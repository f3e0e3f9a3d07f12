// The dtype conversions of gemm.cpp (gemm_cast.cu): F32 GEMM inputs rounded to BF16, and a BF16
// y widened to F32 and rounded back around an accumulating forward (see linear_forward). Plain
// CUDA types only: this header is included by nvcc-compiled code, which cannot include the tsp
// headers (fmt 9's consteval format strings do not compile under nvcc).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace tsp::cuda {

// dst[i] = bf16(src[i]) for n elements, round to nearest even, NaN kept NaN: bitwise the host's
// tsp::bf16(float). Queued on `s`; returns the launch status (cudaSuccess for n <= 0).
cudaError_t launch_round_f32_to_bf16(const float* src, __nv_bfloat16* dst, int64_t n,
                                     cudaStream_t s);

// dst[i] = float(src[i]) for n elements: exact (the bf16 bits in the high half), NaN kept NaN.
// Queued on `s`; returns the launch status (cudaSuccess for n <= 0).
cudaError_t launch_widen_bf16_to_f32(const __nv_bfloat16* src, float* dst, int64_t n,
                                     cudaStream_t s);

}  // namespace tsp::cuda
