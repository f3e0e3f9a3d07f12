// The cuDNN attention path of the CUDA backend (attention_cudnn.cpp; attention.h says when it
// runs): cuDNN's fused SDPA for the calls it covers exactly (attention_cudnn_rules.h,
// attention_cudnn_pieces.h). Only attention_cudnn.cpp includes the cuDNN frontend; this header is
// plain.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "backend/cuda/attention_kernels.h"

namespace tsp::cuda::attn {

// Whether this build has the path (CMake's TSP_WITH_CUDNN found the cuDNN and frontend headers).
bool cudnn_built();

// "" when the path can run: the build has it and libcudnn.so.9 loaded (once per process, at the
// first call); else what is missing, as a sentence.
std::string cudnn_unavailable_reason();

// The version of the loaded libcudnn (e.g. 91900 for 9.19.0); 0 when none is loaded.
int cudnn_loaded_version();

// Runs the call on cuDNN when the path covers it (the shape rules, then the positions' runs found
// on the device with one stream sync and cut into one-band pieces, then a plan cuDNN supports for
// every piece) and returns true; returns false when it does not (then nothing but the run finder
// was queued, and the caller takes the flash path). `device`: the tensors' device, current on this thread. Throws tsp::Error when
// cuDNN is unavailable (cudnn_unavailable_reason) or a cuDNN call fails.
bool cudnn_forward(const Fwd& p, int device, cudaStream_t s);
bool cudnn_backward(const Bwd& p, int device, cudaStream_t s);

// The cuDNN frontend's own checks of this path's graph for a call, without a GPU: builds the
// graph of a forward or backward call (sh.nk: the keys passed, nk'; right_bound: the band's, or
// cudnn::kNoMask) for SM version `sm` (e.g. 90), validates it and lowers it to cuDNN's operation
// graph; a forward both as the frontend chooses its implementation and as COMPOSITE (the two
// graphs a plan build tries). Choosing an engine needs the device, so this does not. "" when all
// pass, else the frontend's message. Throws tsp::Error when cuDNN is unavailable
// (cudnn_unavailable_reason).
// attention.h exports it (cudnn_attention_check_graph) for the CPU test
// tests/backend/cuda_attention_cudnn_graph_test.cpp.
std::string cudnn_check_graph(bool backward, const Shape& sh, int64_t right_bound, float scale,
                              int sm);

// The workspace of cuDNN's plan for one piece (a forward or backward call of sh.nq queries against
// the first sh.nk keys in position order, band right_bound or cudnn::kNoMask) on `device`, bytes,
// built and cached as a call of that piece would (so the memory model's question costs the run
// nothing more); -1 when cuDNN supports no plan for it (the call takes the flash kernels). Throws
// tsp::Error when cuDNN is unavailable (cudnn_unavailable_reason).
int64_t cudnn_plan_workspace(bool backward, const Shape& sh, int64_t right_bound, float scale,
                             int device);

// Calls cuDNN has run (forward and backward) in this process: the tests check with it that the
// calls they mean to be covered took the path and the others did not.
int64_t cudnn_calls_run();

}  // namespace tsp::cuda::attn
