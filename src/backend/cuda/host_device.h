// TSP_HD: __host__ __device__ under nvcc, nothing in plain C++. For the headers whose rules the
// kernels use and the CPU tests check (attention_tile_rules.h, attention_cudnn_rules.h).
#pragma once

#ifdef __CUDACC__
#define TSP_HD __host__ __device__
#else
#define TSP_HD
#endif
