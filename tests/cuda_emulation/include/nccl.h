// Stand-in for <nccl.h> in the CUDA emulation (README.md of tests/cuda_emulation): the types and
// calls src/comm/cuda/nccl.cpp compiles against, so that file's other half — the MPI path's host
// staging of device buffers and the device queries, which every multi-rank GPU test uses — runs
// under emulation. NCCL itself is not emulated: every rank of an emulated job has the same one
// device, which nccl.cpp refuses before it calls NCCL (one GPU per rank); a call that still
// arrives here fails with ncclInvalidUsage and says why.
#pragma once

#include <cstddef>

#include "cuda_runtime.h"

enum ncclResult_t {
  ncclSuccess = 0,
  ncclUnhandledCudaError = 1,
  ncclSystemError = 2,
  ncclInternalError = 3,
  ncclInvalidArgument = 4,
  ncclInvalidUsage = 5,
  ncclRemoteError = 6,
  ncclInProgress = 7,
};
enum ncclDataType_t {
  ncclInt8 = 0,
  ncclUint8 = 1,
  ncclInt32 = 2,
  ncclUint32 = 3,
  ncclInt64 = 4,
  ncclUint64 = 5,
  ncclFloat16 = 6,
  ncclFloat32 = 7,
  ncclFloat64 = 8,
  ncclBfloat16 = 9,
};
constexpr ncclDataType_t ncclInt = ncclInt32, ncclFloat = ncclFloat32;
enum ncclRedOp_t { ncclSum = 0 };
struct ncclComm;
using ncclComm_t = ncclComm*;
struct ncclUniqueId {
  char internal[128];
};
struct ncclConfig_t;

namespace tsp::emu {
inline ncclResult_t nccl_not_emulated() {
  return ncclInvalidUsage;
}
}  // namespace tsp::emu

inline const char* ncclGetErrorString(ncclResult_t) {
  return "NCCL is not emulated (tests/cuda_emulation: one device for every rank)";
}
inline const char* ncclGetLastError(ncclComm_t) {
  return "";
}
inline ncclResult_t ncclGetUniqueId(ncclUniqueId*) {
  return tsp::emu::nccl_not_emulated();
}
inline ncclResult_t ncclCommInitRank(ncclComm_t*, int, ncclUniqueId, int) {
  return tsp::emu::nccl_not_emulated();
}
inline ncclResult_t ncclCommSplit(ncclComm_t, int, int, ncclComm_t*, ncclConfig_t*) {
  return tsp::emu::nccl_not_emulated();
}
inline ncclResult_t ncclCommUserRank(ncclComm_t, int*) {
  return tsp::emu::nccl_not_emulated();
}
inline ncclResult_t ncclCommAbort(ncclComm_t) {
  return tsp::emu::nccl_not_emulated();
}
inline ncclResult_t ncclCommDestroy(ncclComm_t) {
  return tsp::emu::nccl_not_emulated();
}
inline ncclResult_t ncclCommGetAsyncError(ncclComm_t, ncclResult_t*) {
  return tsp::emu::nccl_not_emulated();
}
inline ncclResult_t ncclGroupStart() {
  return tsp::emu::nccl_not_emulated();
}
inline ncclResult_t ncclGroupEnd() {
  return tsp::emu::nccl_not_emulated();
}
inline ncclResult_t ncclBroadcast(const void*, void*, size_t, ncclDataType_t, int, ncclComm_t,
                                  cudaStream_t) {
  return tsp::emu::nccl_not_emulated();
}
inline ncclResult_t ncclAllGather(const void*, void*, size_t, ncclDataType_t, ncclComm_t,
                                  cudaStream_t) {
  return tsp::emu::nccl_not_emulated();
}
inline ncclResult_t ncclReduceScatter(const void*, void*, size_t, ncclDataType_t, ncclRedOp_t,
                                      ncclComm_t, cudaStream_t) {
  return tsp::emu::nccl_not_emulated();
}
inline ncclResult_t ncclAllReduce(const void*, void*, size_t, ncclDataType_t, ncclRedOp_t,
                                  ncclComm_t, cudaStream_t) {
  return tsp::emu::nccl_not_emulated();
}
inline ncclResult_t ncclReduce(const void*, void*, size_t, ncclDataType_t, ncclRedOp_t, int,
                               ncclComm_t, cudaStream_t) {
  return tsp::emu::nccl_not_emulated();
}
inline ncclResult_t ncclSend(const void*, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t) {
  return tsp::emu::nccl_not_emulated();
}
inline ncclResult_t ncclRecv(void*, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t) {
  return tsp::emu::nccl_not_emulated();
}
