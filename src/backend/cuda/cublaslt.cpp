#include "backend/cuda/cublaslt.h"

#include <string>

#include "tsp/core/error.h"

#if !TSP_CUDA_EMULATION
#include <dlfcn.h>
#endif

namespace tsp::cuda {

#if TSP_CUDA_EMULATION

const CublasLt& cublaslt() {
  static const CublasLt api{&cublasLtGetVersion,
                            &cublasLtGetStatusName,
                            &cublasLtGetStatusString,
                            &cublasLtCreate,
                            &cublasLtMatmulDescCreate,
                            &cublasLtMatmulDescDestroy,
                            &cublasLtMatmulDescSetAttribute,
                            &cublasLtMatrixLayoutCreate,
                            &cublasLtMatrixLayoutDestroy,
                            &cublasLtMatmulPreferenceCreate,
                            &cublasLtMatmulPreferenceDestroy,
                            &cublasLtMatmulPreferenceSetAttribute,
                            &cublasLtMatmulAlgoGetHeuristic,
                            &cublasLtMatmul};
  return api;
}

#else

namespace {

// libcublasLt's ABI holds within a major version: the soname carries it (libcublasLt.so.13).
const std::string& library_name() {
  static const std::string name = fmt::format("libcublasLt.so.{}", CUBLAS_VER_MAJOR);
  return name;
}

// dlopen's search (LD_LIBRARY_PATH, the library's and the program's RUNPATH, ldconfig's cache),
// then the toolkit folder this build was configured with.
void* open_library() {
  void* h = dlopen(library_name().c_str(), RTLD_NOW | RTLD_LOCAL);
  if (h != nullptr) return h;
  const char* first = dlerror();
  const std::string first_error = first ? first : "no dlerror";
#ifdef TSP_CUBLASLT_DIR
  const std::string fallback = std::string(TSP_CUBLASLT_DIR) + "/" + library_name();
  h = dlopen(fallback.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (h != nullptr) return h;
#endif
  TSP_FAIL(
      "the CUDA backend needs cuBLASLt ({}), which could not be loaded: {}; put the folder "
      "holding it (the CUDA {} toolkit's lib64, or the pip wheel nvidia-cublas's lib) on "
      "LD_LIBRARY_PATH",
      library_name(), first_error, CUBLAS_VER_MAJOR);
}

template <typename F>
void bind(void* lib, F& fn, const char* symbol) {
  dlerror();
  void* p = dlsym(lib, symbol);
  const char* err = dlerror();
  TSP_CHECK(p != nullptr && err == nullptr,
            "{} lacks {} ({}): it is not the cuBLASLt this build needs", library_name(), symbol,
            err ? err : "a null address");
  fn = reinterpret_cast<F>(p);
}

}  // namespace

const CublasLt& cublaslt() {
  static const CublasLt api = [] {
    void* lib = open_library();  // never closed: the handles and plans made with it live on
    CublasLt a{};
    bind(lib, a.get_version, "cublasLtGetVersion");
    bind(lib, a.get_status_name, "cublasLtGetStatusName");
    bind(lib, a.get_status_string, "cublasLtGetStatusString");
    bind(lib, a.create, "cublasLtCreate");
    bind(lib, a.matmul_desc_create, "cublasLtMatmulDescCreate");
    bind(lib, a.matmul_desc_destroy, "cublasLtMatmulDescDestroy");
    bind(lib, a.matmul_desc_set_attribute, "cublasLtMatmulDescSetAttribute");
    bind(lib, a.matrix_layout_create, "cublasLtMatrixLayoutCreate");
    bind(lib, a.matrix_layout_destroy, "cublasLtMatrixLayoutDestroy");
    bind(lib, a.matmul_preference_create, "cublasLtMatmulPreferenceCreate");
    bind(lib, a.matmul_preference_destroy, "cublasLtMatmulPreferenceDestroy");
    bind(lib, a.matmul_preference_set_attribute, "cublasLtMatmulPreferenceSetAttribute");
    bind(lib, a.matmul_algo_get_heuristic, "cublasLtMatmulAlgoGetHeuristic");
    bind(lib, a.matmul, "cublasLtMatmul");
    const size_t version = a.get_version();  // e.g. 130000 for 13.0.0
    TSP_CHECK(static_cast<int>(version / 10000) == CUBLAS_VER_MAJOR,
              "{} is cuBLASLt {}.{}, but this build was compiled against cuBLASLt {}.{}: install "
              "the CUDA {} libraries (or put them first on LD_LIBRARY_PATH)",
              library_name(), version / 10000, version / 100 % 100, CUBLAS_VER_MAJOR,
              CUBLAS_VER_MINOR, CUBLAS_VER_MAJOR);
    return a;
  }();
  return api;
}

#endif

}  // namespace tsp::cuda
