#include "backend/cuda/cublaslt.h"

#include <string>

#include "tsp/core/error.h"

#if !TSP_CUDA_EMULATION
#include <dlfcn.h>
#endif

namespace tsp::cuda {

#if TSP_CUDA_EMULATION

const CublasLt& cublaslt() {
  static const CublasLt api = [] {
    CublasLt a;
#define TSP_CUBLASLT_STAND_IN(field, symbol) a.field = &symbol;
    TSP_CUBLASLT_ENTRY_POINTS(TSP_CUBLASLT_STAND_IN)
#undef TSP_CUBLASLT_STAND_IN
    return a;
  }();
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
    CublasLt a;
#define TSP_CUBLASLT_BIND(field, symbol) bind(lib, a.field, #symbol);
    TSP_CUBLASLT_ENTRY_POINTS(TSP_CUBLASLT_BIND)
#undef TSP_CUBLASLT_BIND
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
