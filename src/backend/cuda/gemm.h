// Linear layers of the CUDA backend through cuBLASLt: exactly the semantics of
// Backend::linear_forward / linear_backward (include/tsp/backend/backend.h), including its dtype
// rules, which the CPU backend (src/backend/cpu/cpu_backend.cpp) defines:
//   * x, w, y (forward) and dy, x, w (backward) all F32 (and, forward, y F32): an fp32 GEMM
//     (CUBLAS_COMPUTE_32F, no TF32: results agree with the CPU's fp32 within fp32 rounding).
//   * any other combination of F32 / BF16: the F32 inputs are rounded to BF16 (nearest even) in a
//     Workspace tensor and a bf16 GEMM runs with fp32 accumulation; a BF16 output is rounded once,
//     after the fp32 accumulate: y += is bf16(fp32(x·wᵀ) + fp32(y_old)), computed in an F32
//     Workspace copy of y (gemm.cpp, "Precision", says why).
//   * dx and dw are F32 and accumulate (+=); either may be empty (skipped).
// Every call is queued on stream `s` and returns without waiting. `s` must be the stream the
// device allocator orders its frees on (the device's compute stream, cuda_common.h): the bf16
// copies of F32 inputs are Workspace tensors released when the call returns, while the GEMM that
// reads them may still be queued.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "tsp/core/tensor.h"

namespace tsp::cuda {

// x [N, in], w [out, in] (row-major, Hugging Face) -> y [N, out] = x·wᵀ (= or += per accumulate).
void linear_forward(TensorView x, TensorView w, TensorView y, bool accumulate, cudaStream_t s);
// dy [N, out] -> dx F32 [N, in] (+=) dy·w, dw F32 [out, in] (+=) dyᵀ·x. Either output may be
// empty.
void linear_backward(TensorView dy, TensorView x, TensorView w, TensorView dx, TensorView dw,
                     cudaStream_t s);

// Diagnostics (tests): how many GEMM plans (matmul descriptor, layouts and the heuristic's
// algorithm for one shape / dtype / alignment) are cached, all devices together. A steady-state
// training step adds none.
size_t gemm_plan_count();

}  // namespace tsp::cuda
