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

// The entry points the backend calls: the table's field and cuBLASLt's symbol, written once for
// the table, its loading and the test that checks it.
#define TSP_CUBLASLT_ENTRY_POINTS(X)                                       \
  X(get_version, cublasLtGetVersion)                                       \
  X(get_status_name, cublasLtGetStatusName)                                \
  X(get_status_string, cublasLtGetStatusString)                            \
  X(create, cublasLtCreate)                                                \
  X(matmul_desc_create, cublasLtMatmulDescCreate)                          \
  X(matmul_desc_destroy, cublasLtMatmulDescDestroy)                        \
  X(matmul_desc_set_attribute, cublasLtMatmulDescSetAttribute)             \
  X(matrix_layout_create, cublasLtMatrixLayoutCreate)                      \
  X(matrix_layout_destroy, cublasLtMatrixLayoutDestroy)                    \
  X(matmul_preference_create, cublasLtMatmulPreferenceCreate)              \
  X(matmul_preference_destroy, cublasLtMatmulPreferenceDestroy)            \
  X(matmul_preference_set_attribute, cublasLtMatmulPreferenceSetAttribute) \
  X(matmul_algo_get_heuristic, cublasLtMatmulAlgoGetHeuristic)             \
  X(matmul, cublasLtMatmul)

struct CublasLt {
#define TSP_CUBLASLT_FIELD(field, symbol) decltype(&symbol) field = nullptr;
  TSP_CUBLASLT_ENTRY_POINTS(TSP_CUBLASLT_FIELD)
#undef TSP_CUBLASLT_FIELD
};

// The loaded library's entry points (loaded on the first call, by one thread; never unloaded).
// Throws tsp::Error naming the library and what to install when it cannot be loaded, lacks an
// entry point, or is of another major version than this build's headers.
const CublasLt& cublaslt();

}  // namespace tsp::cuda
