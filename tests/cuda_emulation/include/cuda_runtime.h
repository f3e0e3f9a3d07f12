// Stand-in for CUDA's <cuda_runtime.h> in the CUDA emulation (tests/cuda_emulation/README.md):
// the CUDA kernels of src/backend/cuda/ compiled as C++ and run on the CPU, every CUDA thread a
// fiber, the warp-wide instructions (shuffles, ballots, ldmatrix, mma.sync) and the block barrier
// executed once all the threads they name have arrived. This header is found before the real one
// only by the emulated test targets (tests/CMakeLists.txt); nothing in the library sees it.
//
// What it provides: the runtime calls the kernels' launchers, attention.cpp, cuda_common.cpp and
// the attention test use (memory is host memory; streams and events are no-ops, every call is
// synchronous); the kernel-side built-ins (threadIdx, ..., __syncthreads, __shfl_*_sync,
// __ballot_sync, atomics, the rounding intrinsics); TSP_LAUNCH and TSP_DYNAMIC_SHARED
// (src/backend/cuda/launch.cuh has their CUDA forms); and the PTX instructions the flash kernels
// wrap (attention_flash_common.cuh), as functions of namespace tsp::emu.
#pragma once

#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <tuple>
#include <type_traits>
#include <utility>

#include <unistd.h>

#include "tsp/core/bf16.h"  // the bf16 rounding, shared with the library

#define TSP_CUDA_EMULATION 1

// ---- qualifiers --------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Static shared variables: one copy for the whole grid, which is right because the emulation runs
// one block at a time (they are not cleared between blocks: CUDA leaves them undefined too).
#define __shared__ static

// ---- vector types ------------------------------------------------------------------------------
struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) int2 {
  int x, y;
};
inline float2 make_float2(float x, float y) {
  return {x, y};
}
inline float4 make_float4(float x, float y, float z, float w) {
  return {x, y, z, w};
}
inline uint2 make_uint2(unsigned x, unsigned y) {
  return {x, y};
}
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
  return {x, y, z, w};
}

// ---- runtime types -----------------------------------------------------------------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNoDevice = 100,
  cudaErrorNotReady = 600,
  cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
struct CUevent_st;
using cudaEvent_t = CUevent_st*;
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};
enum cudaMemoryType {
  cudaMemoryTypeUnregistered = 0,
  cudaMemoryTypeHost = 1,
  cudaMemoryTypeDevice = 2,
  cudaMemoryTypeManaged = 3,
};
struct cudaPointerAttributes {
  cudaMemoryType type = cudaMemoryTypeUnregistered;
  int device = 0;
  void* devicePointer = nullptr;
  void* hostPointer = nullptr;
};
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};
constexpr unsigned cudaStreamNonBlocking = 1;
constexpr unsigned cudaEventDisableTiming = 2;

namespace tsp::emu {

// ---- the runtime (runtime.cpp) -----------------------------------------------------------------
cudaError_t malloc_device(void** p, size_t bytes);
cudaError_t free_device(void* p);
bool is_device_range(const void* p, size_t bytes);  // inside one live cudaMalloc allocation
void check_guards(const char* after);  // throws when a write went past an allocation's ends
cudaError_t set_max_dynamic_shared(const void* kernel, int bytes);  // cudaFuncSetAttribute
size_t max_dynamic_shared(const void* kernel);  // 48 KiB unless raised (at most 227 KiB: sm_90)
// Runs `op` on `stream` after everything queued there before it (and, for the legacy default
// stream nullptr, after the blocking streams' work). Ops must own what they use (capture by
// value): they run later, on the stream's own thread. An exception thrown by an op is the
// device's error: it is raised again from the next call that waits for the device.
void enqueue(cudaStream_t stream, std::function<void()> op);
void set_launch_error(cudaError_t e);
cudaError_t take_last_error();
const char* error_name(cudaError_t e);

// ---- the SIMT engine (simt.cpp) ----------------------------------------------------------------
struct Builtins {
  uint3 threadIdx, blockIdx;
  dim3 blockDim, gridDim;
};
extern Builtins current;  // the running fiber's (set by the scheduler before each resume)

// Runs `thread_body` once per thread of the grid, block after block (a block's threads are fibers
// on this OS thread). Throws std::runtime_error, naming the block and thread, on anything the
// hardware would fault on or leave undefined that the engine can see (kernel/README.md).
void run_grid(const void* kernel, dim3 grid, dim3 block, size_t dynamic_shared,
              const std::function<void()>& thread_body);
unsigned char* dynamic_shared();

// Warp-wide and block-wide operations of the calling thread.
uint64_t shuffle(unsigned mask, uint64_t bits, int src_lane_or_xor, bool is_xor, int width);
unsigned ballot(unsigned mask, bool predicate);
void sync_warp(unsigned mask);
int sync_block(int predicate, int mode);  // mode 0: __syncthreads, 1: _or, 2: _and

// PTX stand-ins (attention_flash_common.cuh).
void cp_async16(void* shared_dst, const void* global_src, bool valid);
void cp_async_commit();
void cp_async_wait(int newest_groups_left_pending);
void ldmatrix_x4(uint32_t (&r)[4], const void* shared_row_address, bool transpose);
void mma_m16n8k16_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

// kernel<<<grid, block, shared, stream>>>(args...) as TSP_LAUNCH(grid, block, shared, stream,
// kernel)(args...): the arguments are converted to the kernel's parameter types once, as CUDA
// does, and each thread calls the kernel with them.
template <class... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t shared;
  template <class... A>
  void operator()(A&&... args) const {
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    run_grid(reinterpret_cast<const void*>(kernel), grid, block, shared,
             [&] { std::apply(kernel, params); });
  }
};
template <class... P>
Launch<P...> launch(dim3 grid, dim3 block, size_t shared, cudaStream_t, void (*kernel)(P...)) {
  return {kernel, grid, block, shared};
}

}  // namespace tsp::emu

#define TSP_LAUNCH(grid, block, shared, stream, ...) \
  ::tsp::emu::launch(grid, block, shared, stream, &__VA_ARGS__)
#define TSP_DYNAMIC_SHARED(name) unsigned char* name = ::tsp::emu::dynamic_shared()

// ---- kernel-side built-ins ---------------------------------------------------------------------
#define threadIdx (::tsp::emu::current.threadIdx)
#define blockIdx (::tsp::emu::current.blockIdx)
#define blockDim (::tsp::emu::current.blockDim)
#define gridDim (::tsp::emu::current.gridDim)
constexpr int warpSize = 32;

inline void __syncthreads() {
  tsp::emu::sync_block(1, 0);
}
inline int __syncthreads_or(int p) {
  return tsp::emu::sync_block(p, 1);
}
inline int __syncthreads_and(int p) {
  return tsp::emu::sync_block(p, 2);
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  tsp::emu::sync_warp(mask);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return tsp::emu::ballot(mask, predicate != 0);
}
template <class T>
T emu_shuffle(unsigned mask, T v, int lane_or_xor, bool is_xor, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = tsp::emu::shuffle(mask, bits, lane_or_xor, is_xor, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return emu_shuffle(mask, v, lane_mask, true, width);
}
template <class T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return emu_shuffle(mask, v, src_lane, false, width);
}

// Atomics: the emulation runs one thread at a time, so a read-modify-write is atomic as written.
template <class T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
inline float2 atomicAdd(float2* p, float2 v) {  // sm_90's vector atomic
  if (reinterpret_cast<uintptr_t>(p) % 8 != 0)
    throw std::invalid_argument(
        "CUDA emulation: float2 atomicAdd at an address not 8-byte aligned");
  const float2 old = *p;
  p->x += v.x;
  p->y += v.y;
  return old;
}
template <class T>
T atomicMax(T* p, T v) {
  const T old = *p;
  if (v > old) *p = v;
  return old;
}
template <class T>
T atomicMin(T* p, T v) {
  const T old = *p;
  if (v < old) *p = v;
  return old;
}

inline int __popc(unsigned x) {
  return __builtin_popcount(x);
}
inline int __ffs(int x) {
  return __builtin_ffs(x);
}
inline int __clz(int x) {
  return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x));
}
// The _rn intrinsics are single IEEE operations; the CPU build of the emulation is compiled
// without FP contraction (ISO C++ default in g++ -std=c++20), so these round once each too.
inline float __fmul_rn(float a, float b) {
  return a * b;
}
inline float __fadd_rn(float a, float b) {
  return a + b;
}
inline float __fsub_rn(float a, float b) {
  return a - b;
}
inline float __fdiv_rn(float a, float b) {
  return a / b;
}
inline float __fsqrt_rn(float x) {
  return std::sqrt(x);
}
inline float __frcp_rn(float x) {
  return 1.f / x;
}
inline float __fmaf_rn(float a, float b, float c) {
  return std::fma(a, b, c);
}
inline float __log2f(float x) {
  return std::log2(x);
}
inline float __expf(float x) {
  return std::exp(x);
}
inline float __fdividef(float a, float b) {
  return a / b;
}
inline float rsqrtf(float x) {
  return 1.f / std::sqrt(x);
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline int __float_as_int(float f) {
  int u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __int_as_float(int u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// CUDA's global max/min overloads.
inline float max(float a, float b) {
  return fmaxf(a, b);
}
inline float min(float a, float b) {
  return fminf(a, b);
}
inline double max(double a, double b) {
  return fmax(a, b);
}
inline double min(double a, double b) {
  return fmin(a, b);
}
inline int max(int a, int b) {
  return a > b ? a : b;
}
inline int min(int a, int b) {
  return a < b ? a : b;
}
inline unsigned max(unsigned a, unsigned b) {
  return a > b ? a : b;
}
inline unsigned min(unsigned a, unsigned b) {
  return a < b ? a : b;
}
inline long max(long a, long b) {
  return a > b ? a : b;
}
inline long min(long a, long b) {
  return a < b ? a : b;
}
inline long long max(long long a, long long b) {
  return a > b ? a : b;
}
inline long long min(long long a, long long b) {
  return a < b ? a : b;
}

// ---- the runtime API ---------------------------------------------------------------------------
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;  // the emulated device
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) {
  return d == 0 ? cudaSuccess : cudaErrorInvalidValue;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() {
  return tsp::emu::take_last_error();
}
inline cudaError_t cudaPeekAtLastError() {
  return cudaSuccess;
}
inline const char* cudaGetErrorName(cudaError_t e) {
  return tsp::emu::error_name(e);
}
inline const char* cudaGetErrorString(cudaError_t e) {
  return tsp::emu::error_name(e);
}
inline cudaError_t cudaMalloc(void** p, size_t bytes) {
  return tsp::emu::malloc_device(p, bytes);
}
template <class T>
cudaError_t cudaMalloc(T** p, size_t bytes) {
  return tsp::emu::malloc_device(reinterpret_cast<void**>(p), bytes);
}
inline cudaError_t cudaFree(void* p) {
  return tsp::emu::free_device(p);
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind k,
                                   cudaStream_t = nullptr) {
  return cudaMemcpy(dst, src, bytes, k);
}
inline cudaError_t cudaMemset(void* p, int value, size_t bytes) {
  if (bytes) std::memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t = nullptr) {
  return cudaMemset(p, value, bytes);
}
inline cudaError_t cudaDeviceSynchronize() {
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) {
  return cudaSuccess;
}
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) {
  static char stream_token;
  *s = reinterpret_cast<cudaStream_t>(&stream_token);
  return cudaSuccess;
}
inline cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void* p) {
  *a = cudaPointerAttributes{};
  if (tsp::emu::is_device_range(p, 1)) {
    a->type = cudaMemoryTypeDevice;
    a->devicePointer = const_cast<void*>(p);
  }
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch,
                                     size_t width, size_t height, cudaMemcpyKind,
                                     cudaStream_t = nullptr) {
  if (width > dpitch || width > spitch) return cudaErrorInvalidValue;
  for (size_t r = 0; r < height; ++r)
    std::memmove(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch,
                 width);
  return cudaSuccess;
}
// The emulated device: an sm_90 part with the memory the host gives it (reported as 80 GiB). Every
// process sees one device of its own (a UUID holding the process id), as a job does that runs one
// rank per GPU; TSP_COMM=mpi makes the ranks stage through host memory instead, as ranks sharing a
// GPU do.
struct cudaUUID_t {
  char bytes[16] = {'t', 's', 'p', '-', 'e', 'm', 'u', '-', 'g', 'p', 'u', '-', 0, 0, 0, 0};
};
struct cudaDeviceProp {
  char name[256] = "CUDA emulation (tests/cuda_emulation)";
  int major = 9, minor = 0;
  size_t totalGlobalMem = size_t{80} << 30;
  int multiProcessorCount = 132;
  cudaUUID_t uuid;
};
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  *p = cudaDeviceProp{};
  const uint32_t pid = static_cast<uint32_t>(getpid());
  std::memcpy(p->uuid.bytes + 12, &pid, sizeof pid);
  return cudaSuccess;
}
inline cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  *total_bytes = cudaDeviceProp{}.totalGlobalMem;
  *free_bytes = *total_bytes;
  return cudaSuccess;
}
// Events order streams; with every call synchronous there is nothing to order.
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) {
  static char event_token;
  *e = reinterpret_cast<cudaEvent_t>(&event_token);
  return cudaSuccess;
}
inline cudaError_t cudaEventCreate(cudaEvent_t* e) {
  return cudaEventCreateWithFlags(e, 0);
}
inline cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t = nullptr) {
  return cudaSuccess;
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t) {
  return cudaSuccess;
}
inline cudaError_t cudaEventDestroy(cudaEvent_t) {
  return cudaSuccess;
}
inline cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned = 0) {
  return cudaSuccess;
}
inline cudaError_t cudaEventQuery(cudaEvent_t) {
  return cudaSuccess;  // every call has completed when it returns
}
inline cudaError_t cudaStreamCreateWithPriority(cudaStream_t* s, unsigned flags, int) {
  return cudaStreamCreateWithFlags(s, flags);
}
inline cudaError_t cudaStreamDestroy(cudaStream_t) {
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetStreamPriorityRange(int* least, int* greatest) {
  *least = 0;
  *greatest = -5;
  return cudaSuccess;
}
// Pinned host memory is host memory; stream-ordered allocation is a plain one (every call is
// synchronous).
inline cudaError_t cudaMallocHost(void** p, size_t bytes) {
  *p = std::malloc(bytes ? bytes : 1);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
inline cudaError_t cudaFreeHost(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) {
  return tsp::emu::malloc_device(p, bytes);
}
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) {
  return tsp::emu::free_device(p);
}

template <class T>
cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return tsp::emu::set_max_dynamic_shared(reinterpret_cast<const void*>(kernel), value);
}
