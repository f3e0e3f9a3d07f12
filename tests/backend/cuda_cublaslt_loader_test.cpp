// cuBLASLt is loaded when the CUDA backend first needs it, not linked (src/backend/cuda/
// cublaslt.h says why): in a CUDA build, a process that has not asked for it has not mapped the
// library, and asking loads the library of this build's major version with every entry point the
// backend calls. dlopen and cublasLtGetVersion need no GPU: this GPU test (built in CUDA builds
// only) runs on machines without one too.
#include <gtest/gtest.h>

#include <fstream>
#include <string>

#include "backend/cuda/cublaslt.h"

namespace tsp {
namespace {

bool library_mapped(const std::string& name) {
  std::ifstream maps("/proc/self/maps");
  for (std::string line; std::getline(maps, line);)
    if (line.find(name) != std::string::npos) return true;
  return false;
}

TEST(CublasLtLoader, LoadedOnFirstUseWithEveryEntryPoint) {
  const std::string soname = "libcublasLt.so." + std::to_string(CUBLAS_VER_MAJOR);
  EXPECT_FALSE(library_mapped(soname)) << soname << " is mapped before anything asked for it: "
                                       << "is it linked again (CMakeLists.txt)?";
  const cuda::CublasLt& lt = cuda::cublaslt();
  EXPECT_TRUE(library_mapped(soname)) << soname << " is not mapped after cublaslt()";
#define TSP_EXPECT_BOUND(field, symbol) \
  EXPECT_NE(reinterpret_cast<const void*>(lt.field), nullptr) << #symbol;
  TSP_CUBLASLT_ENTRY_POINTS(TSP_EXPECT_BOUND)
#undef TSP_EXPECT_BOUND
  EXPECT_EQ(static_cast<int>(lt.get_version() / 10000), CUBLAS_VER_MAJOR);
  // The loaded library answers with its own text (no GPU needed for it).
  EXPECT_STREQ(lt.get_status_name(CUBLAS_STATUS_NOT_SUPPORTED), "CUBLAS_STATUS_NOT_SUPPORTED");
  // Loaded once: the same table again.
  EXPECT_EQ(&cuda::cublaslt(), &lt);
}

}  // namespace
}  // namespace tsp
