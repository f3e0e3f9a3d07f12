// cuBLASLt's entry points, loaded at run time on first use (dlopen of libcublasLt.so.<major>)
// instead of linked: the library's static initialisers cost every process that links it about
// 0.1 s and 25,000 page faults at start, GPU or not, so a CUDA build's `tsp --help`, each rank
// of a CPU run, and every test process paid them. Now only a process that creates the CUDA
// backend loads it. (NCCL and the CUDA runtime stay linked: they start in ~2 ms.)
//
// Call through the table: cublaslt().matmul(...). Under the CUDA emulation (TSP_CUDA_EMULATION)
// the table holds the emulation's stand-ins.
#pragma once

#include <cublasLt.h>

namespace tsp::cuda {

struct CublasLt {
  decltype(&cublasLtGetVersion) get_version;
  decltype(&cublasLtGetStatusName) get_status_name;
  decltype(&cublasLtGetStatusString) get_status_string;
  decltype(&cublasLtCreate) create;
  decltype(&cublasLtMatmulDescCreate) matmul_desc_create;
  decltype(&cublasLtMatmulDescDestroy) matmul_desc_destroy;
  decltype(&cublasLtMatmulDescSetAttribute) matmul_desc_set_attribute;
  decltype(&cublasLtMatrixLayoutCreate) matrix_layout_create;
  decltype(&cublasLtMatrixLayoutDestroy) matrix_layout_destroy;
  decltype(&cublasLtMatmulPreferenceCreate) matmul_preference_create;
  decltype(&cublasLtMatmulPreferenceDestroy) matmul_preference_destroy;
  decltype(&cublasLtMatmulPreferenceSetAttribute) matmul_preference_set_attribute;
  decltype(&cublasLtMatmulAlgoGetHeuristic) matmul_algo_get_heuristic;
  decltype(&cublasLtMatmul) matmul;
};

// The loaded library's entry points (loaded on the first call, by one thread; never unloaded).
// Throws tsp::Error naming the library and what to install when it cannot be loaded, lacks an
// entry point, or is of another major version than this build's headers.
const CublasLt& cublaslt();

}  // namespace tsp::cuda
