// Stand-in for CUDA's <cuda_runtime.h> in the CUDA emulation (tests/cuda_emulation/README.md):
// the CUDA kernels of src/backend/cuda/ compiled as C++ and run on the CPU, every CUDA thread a
// fiber, the warp-wide instructions (shuffles, ballots, ldmatrix, mma.sync) and the block barrier
// executed once all the threads they name have arrived. This header is found before the real one
// only by the emulated test targets (tests/CMakeLists.txt); nothing in the library sees it.
//
// What it provides: the runtime calls the kernels' launchers, attention.cpp, cuda_common.cpp and
// the attention test use (memory is host memory; each stream is a thread of its own that runs its
// work in order, later than the host queued it, concurrently with the host and the other streams:
// runtime.cpp); the kernel-side built-ins (threadIdx, ..., __syncthreads, __shfl_*_sync,
// __ballot_sync, atomics, the rounding intrinsics); TSP_LAUNCH and TSP_DYNAMIC_SHARED
// (src/backend/cuda/launch.cuh has their CUDA forms); and the PTX instructions the flash kernels
// wrap (attention_flash_common.cuh), as functions of namespace tsp::emu.
#pragma once

#include <math.h>

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

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
// Static shared variables: one copy for a grid, which is right because the emulation runs one
// block of a grid at a time (they are not cleared between blocks: CUDA leaves them undefined too);
// one per OS thread, because kernels on different streams run at the same time.
#define __shared__ static thread_local

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
  cudaErrorInvalidResourceHandle = 400,
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
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
constexpr unsigned cudaStreamNonBlocking = 1;
constexpr unsigned cudaEventDisableTiming = 2;

namespace tsp::emu {

// ---- the runtime (runtime.cpp) -----------------------------------------------------------------
cudaError_t malloc_device(void** p, size_t bytes);
cudaError_t free_device(void* p);                        // cudaFree: waits for the device first
cudaError_t free_device_async(void* p, cudaStream_t s);  // cudaFreeAsync: in stream order
cudaError_t malloc_pinned(void** p, size_t bytes);
cudaError_t free_pinned(void* p);
bool is_device_range(const void* p, size_t bytes);  // inside one live cudaMalloc allocation
bool is_pinned_range(const void* p, size_t bytes);  // inside one live cudaMallocHost allocation

// Streams and events. The error a device op raised (a kernel's fault) is sticky, as on a GPU:
// every later synchronising call returns cudaErrorLaunchFailure, whose string is the fault.
cudaError_t stream_create(cudaStream_t* s, unsigned flags);
cudaError_t stream_destroy(cudaStream_t s);
cudaError_t stream_synchronize(cudaStream_t s);
cudaError_t stream_query(cudaStream_t s);
cudaError_t device_synchronize();
cudaError_t event_create(cudaEvent_t* e);
cudaError_t event_destroy(cudaEvent_t e);
cudaError_t event_record(cudaEvent_t e, cudaStream_t s);
cudaError_t stream_wait_event(cudaStream_t s, cudaEvent_t e);
cudaError_t event_synchronize(cudaEvent_t e);
cudaError_t event_query(cudaEvent_t e);
// Copies and fills with CUDA's documented host synchronisation for each kind of memory.
cudaError_t memcpy_2d(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                      size_t height, cudaMemcpyKind kind, cudaStream_t s, bool async);
cudaError_t memset_device(void* p, int value, size_t bytes, cudaStream_t s);
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
cudaError_t peek_last_error();
const char* error_name(cudaError_t e);
const char* error_string(cudaError_t e);

// ---- the SIMT engine (simt.cpp) ----------------------------------------------------------------
struct Builtins {
  uint3 threadIdx, blockIdx;
  dim3 blockDim, gridDim;
};
extern thread_local Builtins
    current;  // the running fiber's (set by the scheduler before each resume)

// Runs `thread_body` once per thread of the grid, block after block (a block's threads are fibers
// on this OS thread). Throws std::runtime_error, naming the block and thread, on anything the
// hardware would fault on or leave undefined that the engine can see (kernel/README.md).
// `name` is the kernel as the launch wrote it (counts below).
void run_grid(const void* kernel, const char* name, dim3 grid, dim3 block, size_t dynamic_shared,
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

// What the kernels executed, counted per kernel over its launches since reset_kernel_counts()
// (README.md, "Counting"): the figures that decide a kernel's speed on a GPU and that the
// emulation sees exactly, whatever its own speed. Warp instructions count once per warp.
struct KernelCounts {
  std::string name;  // the kernel as TSP_LAUNCH wrote it (template arguments as in the source)
  dim3 block{0, 0, 0};
  size_t dynamic_shared = 0;  // bytes, of the last launch
  uint64_t launches = 0, blocks = 0;
  uint64_t mma = 0;       // mma.sync.m16n8k16 bf16: 4,096 FLOPs each
  uint64_t ldmatrix = 0;  // ldmatrix.x4: 512 bytes of shared memory each
  // Shared-memory wavefronts the ldmatrix took: each of its 4 phases reads eight 16-byte rows
  // in one wavefront when they fall in 8 different groups of 4 banks, else in as many as the
  // most-used group holds distinct rows. Conflict-free: 4 per ldmatrix.
  uint64_t ldmatrix_wavefronts = 0;
  uint64_t cp_async_bytes = 0;  // 16-byte global -> shared copies (zero-fills included)
  uint64_t barriers = 0;        // __syncthreads completed (once per block each)
  uint64_t shuffles = 0, ballots = 0;
  uint64_t atomics = 0;  // atomicAdd/Max/Min on memory, per thread (a float2 counts once)
};
std::vector<KernelCounts> kernel_counts();  // in order of first launch
void reset_kernel_counts();
void count_atomic();  // by the atomics below

// kernel<<<grid, block, shared, stream>>>(args...) as TSP_LAUNCH(grid, block, shared, stream,
// kernel)(args...): the arguments are converted to the kernel's parameter types once, as CUDA
// does, and each thread calls the kernel with them.
// The launch is checked at once (a bad configuration is the launch's error, as on a GPU); the grid
// runs in stream order, with the parameters copied at the launch.
bool launch_config_ok(const void* kernel, dim3 grid, dim3 block, size_t dynamic_shared);
template <class... P>
struct Launch {
  void (*kernel)(P...);
  const char* name;
  dim3 grid, block;
  size_t shared;
  cudaStream_t stream;
  template <class... A>
  void operator()(A&&... args) const {
    const void* k = reinterpret_cast<const void*>(kernel);
    if (!launch_config_ok(k, grid, block, shared)) return;
    enqueue(stream, [k, n = name, f = kernel, g = grid, b = block, sh = shared,
                     params = std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)] {
      run_grid(k, n, g, b, sh, [&] { std::apply(f, params); });
    });
  }
};
template <class... P>
Launch<P...> launch(dim3 grid, dim3 block, size_t shared, cudaStream_t stream, void (*kernel)(P...),
                    const char* name) {
  return {kernel, name, grid, block, shared, stream};
}

}  // namespace tsp::emu

#define TSP_LAUNCH(grid, block, shared, stream, ...) \
  ::tsp::emu::launch(grid, block, shared, stream, &__VA_ARGS__, #__VA_ARGS__)
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

// Atomics: one block runs at a time per OS thread, but kernels on different streams run at once,
// so read-modify-writes are real atomics.
template <class T>
T atomicAdd(T* p, T v) {
  tsp::emu::count_atomic();
  return std::atomic_ref<T>(*p).fetch_add(v);
}
inline float2 atomicAdd(float2* p, float2 v) {  // sm_90's vector atomic (each half atomic)
  tsp::emu::count_atomic();
  if (reinterpret_cast<uintptr_t>(p) % 8 != 0)
    throw std::invalid_argument(
        "CUDA emulation: float2 atomicAdd at an address not 8-byte aligned");
  return {std::atomic_ref<float>(p->x).fetch_add(v.x), std::atomic_ref<float>(p->y).fetch_add(v.y)};
}
template <class T>
T atomicMax(T* p, T v) {
  tsp::emu::count_atomic();
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (v > old && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
template <class T>
T atomicMin(T* p, T v) {
  tsp::emu::count_atomic();
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (v < old && !a.compare_exchange_weak(old, v)) {
  }
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
  return tsp::emu::peek_last_error();
}
inline const char* cudaGetErrorName(cudaError_t e) {
  return tsp::emu::error_name(e);
}
inline const char* cudaGetErrorString(cudaError_t e) {
  return tsp::emu::error_string(e);
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
inline cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch,
                                     size_t width, size_t height, cudaMemcpyKind kind,
                                     cudaStream_t s = nullptr) {
  return tsp::emu::memcpy_2d(dst, dpitch, src, spitch, width, height, kind, s, true);
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                                   cudaStream_t s = nullptr) {
  return tsp::emu::memcpy_2d(dst, bytes, src, bytes, bytes, 1, kind, s, true);
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  return tsp::emu::memcpy_2d(dst, bytes, src, bytes, bytes, 1, kind, nullptr, false);
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t s = nullptr) {
  return tsp::emu::memset_device(p, value, bytes, s);
}
// Asynchronous for device memory too (on the legacy default stream), as CUDA documents.
inline cudaError_t cudaMemset(void* p, int value, size_t bytes) {
  return tsp::emu::memset_device(p, value, bytes, nullptr);
}
inline cudaError_t cudaDeviceSynchronize() {
  return tsp::emu::device_synchronize();
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  return tsp::emu::stream_synchronize(s);
}
inline cudaError_t cudaStreamQuery(cudaStream_t s) {
  return tsp::emu::stream_query(s);
}
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags) {
  return tsp::emu::stream_create(s, flags);
}
inline cudaError_t cudaStreamCreate(cudaStream_t* s) {
  return tsp::emu::stream_create(s, 0);
}
inline cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void* p) {
  *a = cudaPointerAttributes{};
  if (tsp::emu::is_device_range(p, 1)) {
    a->type = cudaMemoryTypeDevice;
    a->devicePointer = const_cast<void*>(p);
  } else if (tsp::emu::is_pinned_range(p, 1)) {
    a->type = cudaMemoryTypeHost;
    a->hostPointer = const_cast<void*>(p);
  }
  return cudaSuccess;
}
// The emulated device: an sm_90 part with the memory the host gives it (reported as 80 GiB). Every
// process sees one device of its own (a UUID holding the process id), as a job does that runs one
// rank per GPU; TSP_COMM=mpi makes the ranks stage through host memory instead, as ranks sharing a
// GPU do. TSP_EMU_SHARED_DEVICE=1 gives every process the same device (one UUID), as on a machine
// with one GPU for all the ranks.
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
  const char* shared = std::getenv("TSP_EMU_SHARED_DEVICE");
  const uint32_t id =
      shared && std::strcmp(shared, "1") == 0 ? 0u : static_cast<uint32_t>(getpid());
  std::memcpy(p->uuid.bytes + 12, &id, sizeof id);
  return cudaSuccess;
}
inline cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  *total_bytes = cudaDeviceProp{}.totalGlobalMem;
  *free_bytes = *total_bytes;
  return cudaSuccess;
}
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) {
  return tsp::emu::event_create(e);
}
inline cudaError_t cudaEventCreate(cudaEvent_t* e) {
  return tsp::emu::event_create(e);
}
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = nullptr) {
  return tsp::emu::event_record(e, s);
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  return tsp::emu::event_synchronize(e);
}
inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
  return tsp::emu::event_destroy(e);
}
inline cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned = 0) {
  return tsp::emu::stream_wait_event(s, e);
}
inline cudaError_t cudaEventQuery(cudaEvent_t e) {
  return tsp::emu::event_query(e);
}
inline cudaError_t cudaStreamCreateWithPriority(cudaStream_t* s, unsigned flags, int) {
  return cudaStreamCreateWithFlags(s, flags);
}
inline cudaError_t cudaStreamDestroy(cudaStream_t s) {
  return tsp::emu::stream_destroy(s);
}
inline cudaError_t cudaDeviceGetStreamPriorityRange(int* least, int* greatest) {
  *least = 0;
  *greatest = -5;
  return cudaSuccess;
}
// Pinned host memory is host memory the runtime knows (copies from and to it are truly
// asynchronous). Stream-ordered allocation allocates at once and frees in stream order.
inline cudaError_t cudaMallocHost(void** p, size_t bytes) {
  return tsp::emu::malloc_pinned(p, bytes);
}
inline cudaError_t cudaFreeHost(void* p) {
  return tsp::emu::free_pinned(p);
}
inline cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) {
  return tsp::emu::malloc_device(p, bytes);
}
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t s) {
  return tsp::emu::free_device_async(p, s);
}

enum cudaSharedCarveout {
  cudaSharedmemCarveoutDefault = -1,
  cudaSharedmemCarveoutMaxShared = 100,
  cudaSharedmemCarveoutMaxL1 = 0,
};

// The shared-memory carveout (a percentage of the SM's unified L1 / shared memory, or -1) is a
// hint for the hardware's occupancy: checked for range, otherwise nothing to emulate.
template <class T>
cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attribute, int value) {
  if (attribute == cudaFuncAttributePreferredSharedMemoryCarveout)
    return value >= -1 && value <= 100 ? cudaSuccess : cudaErrorInvalidValue;
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return tsp::emu::set_max_dynamic_shared(reinterpret_cast<const void*>(kernel), value);
}
