// Prints the number of CUDA devices this build can use (0 without a CUDA build, a driver or a
// device), for the GPU shell tests (tests/*/cuda_*_test.sh) to skip themselves with a reason.
#include <cstdio>

#if defined(TSP_WITH_CUDA) || defined(TSP_CUDA_EMULATION)  // a GPU build, or its emulation
#include "backend/cuda/cuda_common.h"
#endif

int main() {
#if defined(TSP_WITH_CUDA) || defined(TSP_CUDA_EMULATION)
  std::printf("%d\n", tsp::cuda::device_count());
#else
  std::printf("0\n");
#endif
  return 0;
}
