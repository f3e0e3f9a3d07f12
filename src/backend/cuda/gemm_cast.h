// The rounding of F32 GEMM inputs to BF16 (gemm_cast.cu), for gemm.cpp. Plain CUDA types only:
// this header is included by nvcc-compiled code, which cannot include the tsp headers (fmt 9's
// consteval format strings do not compile under nvcc).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace tsp::cuda {

// dst[i] = bf16(src[i]) for n elements, round to nearest even, NaN kept NaN: bitwise the host's
// tsp::bf16(float). Queued on `s`; returns the launch status (cudaSuccess for n <= 0).
cudaError_t launch_round_f32_to_bf16(const float* src, __nv_bfloat16* dst, int64_t n,
                                     cudaStream_t s);

}  // namespace tsp::cuda
