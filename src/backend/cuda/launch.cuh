// How the .cu files launch kernels and declare dynamic shared memory:
//   TSP_LAUNCH(grid, block, shared_bytes, stream, kernel)(args...)
//       is kernel<<<grid, block, shared_bytes, stream>>>(args...);
//   TSP_DYNAMIC_SHARED(name);
//       declares the block's dynamic shared memory as `unsigned char name[]`, 16-byte aligned.
// Macros so that the CUDA emulation (tests/cuda_emulation/: the same kernels run on the CPU, one
// fiber per CUDA thread, in the CPU-only CI) can give both its own meaning; its <cuda_runtime.h>
// defines them and TSP_CUDA_EMULATION before this header is read.
#pragma once

#include <cuda_runtime.h>

#ifndef TSP_CUDA_EMULATION
#define TSP_LAUNCH(grid, block, shared_bytes, stream, ...) \
  __VA_ARGS__<<<grid, block, shared_bytes, stream>>>
#define TSP_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif
