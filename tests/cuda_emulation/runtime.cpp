// The runtime side of the CUDA emulation (README.md beside this file): device memory is host
// memory whose allocations are remembered (cp.async checks its sources against them, and
// cudaPointerGetAttributes answers from them); pinned host memory likewise; the launch errors a GPU
// reports through cudaGetLastError; the per-kernel dynamic shared memory limit of
// cudaFuncSetAttribute; and streams and events.
//
// Every allocation sits between two 256-byte guard zones holding a fixed pattern; after each
// kernel (and at cudaFree) the zones of every live allocation are compared with it, so a kernel
// that writes past either end of a buffer is an error naming the kernel's launch.
//
// Streams. Each stream is an OS thread that runs what was queued on it in order, later than the
// host queued it and at the same time as the host and the other streams — as a GPU does. So a
// missing event between two streams, or a host that reads a result before waiting for it, reads
// stale or poisoned data here, as it can on a GPU (where it may also happen to work). Events
// count their records: a wait captures the newest record at the time of the call, as CUDA's
// does. The legacy default stream (nullptr) waits for the blocking streams' earlier work, and
// they for its (our library's streams are non-blocking and do neither). Copies and fills follow
// CUDA's documented host synchronisation ("API synchronization behavior"): from pageable host
// memory the data is taken at the call; to pageable host memory the call returns when the copy
// is done; pinned memory is read and written when the stream gets there.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "settings.h"

#if defined(__SANITIZE_ADDRESS__)  // a TSP_SANITIZE_EMULATION build (tests/CMakeLists.txt)
#include <sanitizer/asan_interface.h>
#define TSP_EMU_ASAN 1
#else
#define TSP_EMU_ASAN 0
#endif

namespace tsp::emu {
namespace {

// Hopper's limits: 48 KiB of dynamic shared memory per block unless a kernel raises it, up to
// 227 KiB (cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_90).
constexpr size_t kDefaultDynamicShared = 48 * 1024;
constexpr size_t kMaxDynamicShared = 227 * 1024;
constexpr size_t kGuard = 256;
constexpr unsigned char kGuardByte = 0xa5;

// Never destroyed: static objects of the library (the caching allocator) free their blocks at
// exit, after this file's statics would be gone.
std::mutex& runtime_mutex() {
  static auto* m = new std::mutex;
  return *m;
}
std::map<uintptr_t, size_t>& allocations() {  // base -> bytes
  static auto* m = new std::map<uintptr_t, size_t>;
  return *m;
}
std::map<uintptr_t, size_t>& pinned() {  // base -> bytes
  static auto* m = new std::map<uintptr_t, size_t>;
  return *m;
}
std::map<const void*, size_t>& shared_limits() {
  static auto* m = new std::map<const void*, size_t>;
  return *m;
}
thread_local cudaError_t last_error = cudaSuccess;  // per host thread, as CUDA's

// An allocation of `bytes` is `kGuard` guard bytes, the body (bytes rounded up to 256, as
// cudaMalloc aligns) and `kGuard` more.
size_t body_bytes(size_t bytes) {
  return (std::max<size_t>(bytes, 1) + 255) / 256 * 256;
}

// Under AddressSanitizer (a TSP_SANITIZE_EMULATION build) the guard zones of an allocation are
// poisoned as well: an instrumented access to them is reported where it happens, reads included;
// guards_intact still sees the writes of uninstrumented code (the test files are compiled plain).
void poison_guards(uintptr_t base, size_t bytes, bool poisoned) {
#if TSP_EMU_ASAN
  auto* p = reinterpret_cast<unsigned char*>(base);
  const size_t after = body_bytes(bytes) - bytes + kGuard;  // from the end to the block's end
  if (poisoned) {
    ASAN_POISON_MEMORY_REGION(p - kGuard, kGuard);
    ASAN_POISON_MEMORY_REGION(p + bytes, after);
  } else {
    ASAN_UNPOISON_MEMORY_REGION(p - kGuard, kGuard);
    ASAN_UNPOISON_MEMORY_REGION(p + bytes, after);
  }
#else
  (void)base, (void)bytes, (void)poisoned;
#endif
}

// Whether the guard zones of the allocation at `base` (`bytes` long) still hold the pattern. The
// zone after it starts at `bytes` exactly, so a write one element past the end shows.
bool guards_intact(uintptr_t base, size_t bytes) {
  poison_guards(base, bytes, false);
  const auto* p = reinterpret_cast<const unsigned char*>(base);
  bool intact = true;
  for (size_t i = 1; i <= kGuard; ++i) intact &= p[-static_cast<ptrdiff_t>(i)] == kGuardByte;
  for (size_t i = 0; i < kGuard; ++i) intact &= p[bytes + i] == kGuardByte;
  poison_guards(base, bytes, true);
  return intact;
}

}  // namespace

cudaError_t malloc_device(void** p, size_t bytes) {
  // 256-byte aligned like cudaMalloc, between two guard zones; fresh memory holds NaN bytes, as
  // the library's poisoned allocations in the tests (a kernel that reads what nobody wrote shows).
  // More than the device has fails as on a GPU (and never reaches the host allocator, which
  // under AddressSanitizer would abort on a request of petabytes instead of returning null).
  if (bytes > cudaDeviceProp{}.totalGlobalMem) return cudaErrorMemoryAllocation;
  const size_t body = body_bytes(bytes);
  auto* block = static_cast<unsigned char*>(std::aligned_alloc(256, kGuard + body + kGuard));
  if (!block) return cudaErrorMemoryAllocation;
  std::memset(block, kGuardByte, kGuard + body + kGuard);
  std::memset(block + kGuard, 0xff, bytes);
  poison_guards(reinterpret_cast<uintptr_t>(block + kGuard), bytes, true);
  std::lock_guard<std::mutex> lock(runtime_mutex());
  allocations()[reinterpret_cast<uintptr_t>(block + kGuard)] = bytes;
  *p = block + kGuard;
  return cudaSuccess;
}

namespace {
cudaError_t free_now(void* p) {
  if (!p) return cudaSuccess;
  std::lock_guard<std::mutex> lock(runtime_mutex());
  auto it = allocations().find(reinterpret_cast<uintptr_t>(p));
  if (it == allocations().end()) return cudaErrorInvalidValue;
  if (!guards_intact(it->first, it->second))
    throw std::runtime_error("CUDA emulation: a write outside the allocation of " +
                             std::to_string(it->second) + " bytes freed now");
  allocations().erase(it);
  std::free(static_cast<unsigned char*>(p) - kGuard);
  return cudaSuccess;
}
}  // namespace

void check_guards(const char* after) {
  std::lock_guard<std::mutex> lock(runtime_mutex());
  for (const auto& [base, bytes] : allocations())
    if (!guards_intact(base, bytes))
      throw std::runtime_error(std::string("CUDA emulation: ") + after +
                               " wrote outside an allocation of " + std::to_string(bytes) +
                               " bytes");
}

namespace {
bool in_one(const std::map<uintptr_t, size_t>& m, const void* p, size_t bytes) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  auto it = m.upper_bound(a);
  if (it == m.begin()) return false;
  --it;
  return a >= it->first && a + bytes <= it->first + it->second;
}
}  // namespace

bool is_device_range(const void* p, size_t bytes) {
  std::lock_guard<std::mutex> lock(runtime_mutex());
  return in_one(allocations(), p, bytes);
}

bool is_pinned_range(const void* p, size_t bytes) {
  std::lock_guard<std::mutex> lock(runtime_mutex());
  return in_one(pinned(), p, bytes);
}

cudaError_t malloc_pinned(void** p, size_t bytes) {
  *p = std::malloc(std::max<size_t>(bytes, 1));
  if (!*p) return cudaErrorMemoryAllocation;
  std::lock_guard<std::mutex> lock(runtime_mutex());
  pinned()[reinterpret_cast<uintptr_t>(*p)] = std::max<size_t>(bytes, 1);
  return cudaSuccess;
}

// ---- streams and events ------------------------------------------------------------------------

namespace {

struct Stream;
struct Event;

// One lock and one condition for all streams and events: simple, and the ops it guards are long
// (whole kernels), so contention does not matter.
std::mutex& device_mutex() {
  static auto* m = new std::mutex;
  return *m;
}
std::condition_variable& device_changed() {
  static auto* c = new std::condition_variable;
  return *c;
}
std::string& device_error() {  // the first fault of a device op (guarded by device_mutex)
  static auto* e = new std::string;
  return *e;
}

struct Stream {
  uint32_t index = 0;     // in creation order: seeds its delays
  bool blocking = false;  // created without cudaStreamNonBlocking
  bool legacy = false;    // the default stream, nullptr
  bool closing = false;   // cudaStreamDestroy: the thread ends once the queue is empty
  struct Op {
    std::function<void()> run;
    bool came_to_idle;  // queued while the stream had nothing to do
  };
  std::deque<Op> queue;
  uint64_t queued = 0, done = 0;  // ops queued and completed, ever
};

// Delays that make a missing wait show. Work queued on an idle stream would run at once, before
// any slower work elsewhere: a consumer on another stream that forgot to wait for it still finds
// it done, and the bug hides. So such an op waits, with probability 1/2, a random time up to
// TSP_EMU_DELAY_US microseconds (default 2000; 0: none), drawn from TSP_EMU_SEED and the stream.
using settings::max_delay_us;
using settings::seed;
struct Event {
  uint64_t recorded = 0, reached = 0;  // records made, and the newest one its stream has passed
};

std::map<const void*, std::shared_ptr<Stream>>& streams() {  // guarded by device_mutex
  static auto* m = new std::map<const void*, std::shared_ptr<Stream>>;
  return *m;
}
std::map<const void*, std::shared_ptr<Event>>& events() {
  static auto* m = new std::map<const void*, std::shared_ptr<Event>>;
  return *m;
}

// Each stream's thread: the ops in order; after a fault the rest are skipped (the device is
// unusable, as after a GPU fault) but still counted, so nobody waits forever.
void run_stream(std::shared_ptr<Stream> s) {
  std::minstd_rand rng(seed() * 7919u + s->index);
  std::unique_lock lock(device_mutex());
  for (;;) {
    device_changed().wait(lock, [&] { return !s->queue.empty() || s->closing; });
    if (s->queue.empty()) return;
    Stream::Op op = std::move(s->queue.front());
    s->queue.pop_front();
    const bool faulted = !device_error().empty();
    lock.unlock();
    if (op.came_to_idle && max_delay_us() > 0 && rng() % 2 == 0)
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % max_delay_us()));
    std::string fault;
    if (!faulted) {
      try {
        op.run();
      } catch (const std::exception& e) {
        fault = e.what();
      } catch (...) {
        fault = "a device op threw something that is not a std::exception";
      }
    }
    op.run = nullptr;  // what it captured is released outside the lock
    lock.lock();
    if (!fault.empty() && device_error().empty()) device_error() = fault;
    ++s->done;
    device_changed().notify_all();
  }
}

std::shared_ptr<Stream> start_stream(bool blocking, bool legacy) {
  static std::atomic<uint32_t> count{0};
  auto s = std::make_shared<Stream>();
  s->index = count++;
  s->blocking = blocking;
  s->legacy = legacy;
  std::thread(run_stream, s).detach();  // streams outlive every static: the thread is never joined
  return s;
}

// The stream a handle names (nullptr: the legacy default stream), under device_mutex.
std::shared_ptr<Stream> find_stream(cudaStream_t handle) {
  static auto* legacy = new std::shared_ptr<Stream>(start_stream(true, true));
  if (handle == nullptr) return *legacy;
  auto it = streams().find(handle);
  return it == streams().end() ? nullptr : it->second;
}
std::shared_ptr<Event> find_event(cudaEvent_t handle) {
  auto it = events().find(handle);
  return it == events().end() ? nullptr : it->second;
}

// Under device_mutex: `op` after the stream's earlier work (and the legacy stream's ordering).
void push(const std::shared_ptr<Stream>& s, std::function<void()> op) {
  auto wait_for = [](std::shared_ptr<Stream> other, uint64_t n) {
    return [other, n] {
      std::unique_lock lock(device_mutex());
      device_changed().wait(lock, [&] { return other->done >= n; });
    };
  };
  const bool idle = s->done == s->queued;
  if (s->legacy) {
    for (const auto& [handle, other] : streams())
      if (other->blocking && other->done < other->queued) {
        s->queue.push_back({wait_for(other, other->queued), false});
        ++s->queued;
      }
  } else if (s->blocking) {
    const std::shared_ptr<Stream> legacy = find_stream(nullptr);
    if (legacy->done < legacy->queued) {
      s->queue.push_back({wait_for(legacy, legacy->queued), false});
      ++s->queued;
    }
  }
  s->queue.push_back({std::move(op), idle});
  ++s->queued;
  device_changed().notify_all();
}

// The host waits until `ready` holds (under device_mutex); then the sticky fault, if any.
template <class Ready>
cudaError_t host_wait(std::unique_lock<std::mutex>& lock, Ready ready) {
  device_changed().wait(lock, ready);
  return device_error().empty() ? cudaSuccess : cudaErrorLaunchFailure;
}

cudaError_t wait_stream(const std::shared_ptr<Stream>& s) {
  std::unique_lock lock(device_mutex());
  const uint64_t n = s->queued;
  return host_wait(lock, [&] { return s->done >= n; });
}

}  // namespace

void enqueue(cudaStream_t stream, std::function<void()> op) {
  std::lock_guard lock(device_mutex());
  const std::shared_ptr<Stream> s = find_stream(stream);
  if (!s)
    throw std::invalid_argument("CUDA emulation: work queued on a destroyed or unknown stream");
  push(s, std::move(op));
}

cudaError_t stream_create(cudaStream_t* handle, unsigned flags) {
  std::shared_ptr<Stream> s = start_stream((flags & cudaStreamNonBlocking) == 0, false);
  *handle = reinterpret_cast<cudaStream_t>(s.get());
  std::lock_guard lock(device_mutex());
  streams()[s.get()] = std::move(s);
  return cudaSuccess;
}

// CUDA: returns at once; the stream's resources go when its work is done.
cudaError_t stream_destroy(cudaStream_t handle) {
  std::lock_guard lock(device_mutex());
  auto it = streams().find(handle);
  if (handle == nullptr || it == streams().end()) return cudaErrorInvalidResourceHandle;
  it->second->closing = true;
  streams().erase(it);
  device_changed().notify_all();
  return cudaSuccess;
}

cudaError_t stream_synchronize(cudaStream_t handle) {
  std::shared_ptr<Stream> s;
  {
    std::lock_guard lock(device_mutex());
    s = find_stream(handle);
  }
  if (!s) return cudaErrorInvalidResourceHandle;
  return wait_stream(s);
}

cudaError_t stream_query(cudaStream_t handle) {
  std::lock_guard lock(device_mutex());
  const std::shared_ptr<Stream> s = find_stream(handle);
  if (!s) return cudaErrorInvalidResourceHandle;
  if (!device_error().empty()) return cudaErrorLaunchFailure;
  return s->done == s->queued ? cudaSuccess : cudaErrorNotReady;
}

cudaError_t device_synchronize() {
  std::unique_lock lock(device_mutex());
  std::vector<std::pair<std::shared_ptr<Stream>, uint64_t>> all{{find_stream(nullptr), 0}};
  for (const auto& [handle, s] : streams()) all.emplace_back(s, 0);
  for (auto& [s, n] : all) n = s->queued;
  return host_wait(lock, [&] {
    return std::all_of(all.begin(), all.end(),
                       [](const auto& p) { return p.first->done >= p.second; });
  });
}

cudaError_t event_create(cudaEvent_t* handle) {
  auto e = std::make_shared<Event>();
  *handle = reinterpret_cast<cudaEvent_t>(e.get());
  std::lock_guard lock(device_mutex());
  events()[e.get()] = std::move(e);
  return cudaSuccess;
}

// CUDA: returns at once; ops already queued that use the event still see it.
cudaError_t event_destroy(cudaEvent_t handle) {
  std::lock_guard lock(device_mutex());
  return events().erase(handle) ? cudaSuccess : cudaErrorInvalidResourceHandle;
}

cudaError_t event_record(cudaEvent_t handle, cudaStream_t stream) {
  std::lock_guard lock(device_mutex());
  const std::shared_ptr<Event> e = find_event(handle);
  const std::shared_ptr<Stream> s = find_stream(stream);
  if (!e || !s) return cudaErrorInvalidResourceHandle;
  const uint64_t n = ++e->recorded;
  push(s, [e, n] {
    std::lock_guard lock(device_mutex());
    e->reached = std::max(e->reached, n);
  });
  return cudaSuccess;
}

// The stream waits for the event's newest record at the time of this call (none: no wait).
cudaError_t stream_wait_event(cudaStream_t stream, cudaEvent_t handle) {
  std::lock_guard lock(device_mutex());
  const std::shared_ptr<Event> e = find_event(handle);
  const std::shared_ptr<Stream> s = find_stream(stream);
  if (!e || !s) return cudaErrorInvalidResourceHandle;
  const uint64_t n = e->recorded;
  if (n == 0) return cudaSuccess;
  push(s, [e, n] {
    std::unique_lock lock(device_mutex());
    device_changed().wait(lock, [&] { return e->reached >= n || !device_error().empty(); });
  });
  return cudaSuccess;
}

cudaError_t event_synchronize(cudaEvent_t handle) {
  std::unique_lock lock(device_mutex());
  const std::shared_ptr<Event> e = find_event(handle);
  if (!e) return cudaErrorInvalidResourceHandle;
  const uint64_t n = e->recorded;
  return host_wait(lock, [&] { return e->reached >= n || !device_error().empty(); });
}

cudaError_t event_query(cudaEvent_t handle) {
  std::lock_guard lock(device_mutex());
  const std::shared_ptr<Event> e = find_event(handle);
  if (!e) return cudaErrorInvalidResourceHandle;
  if (!device_error().empty()) return cudaErrorLaunchFailure;
  return e->reached >= e->recorded ? cudaSuccess : cudaErrorNotReady;
}

// ---- memory ------------------------------------------------------------------------------------

cudaError_t free_device(void* p) {  // cudaFree waits for the whole device first
  if (!p) return cudaSuccess;
  if (const cudaError_t e = device_synchronize(); e != cudaSuccess) return e;
  return free_now(p);
}

cudaError_t free_device_async(void* p, cudaStream_t stream) {
  if (!p) return cudaSuccess;
  if (!is_device_range(p, 1)) return cudaErrorInvalidValue;
  enqueue(stream, [p] {
    if (free_now(p) != cudaSuccess)
      throw std::runtime_error("CUDA emulation: cudaFreeAsync of memory that is not allocated");
  });
  return cudaSuccess;
}

cudaError_t free_pinned(void* p) {  // cudaFreeHost waits for the device, as documented
  if (!p) return cudaSuccess;
  if (const cudaError_t e = device_synchronize(); e != cudaSuccess) return e;
  std::lock_guard<std::mutex> lock(runtime_mutex());
  if (!pinned().erase(reinterpret_cast<uintptr_t>(p))) return cudaErrorInvalidValue;
  std::free(p);
  return cudaSuccess;
}

// One copy of `height` rows of `width` bytes. Where each side lies decides how the host waits:
// - device to device: queued, no wait (cudaMemcpy too);
// - from pageable host memory: the source is read now (the driver stages it), the write queued;
//   cudaMemcpy first waits for the legacy stream;
// - to pageable host memory: the call returns when the copy is done;
// - pinned memory: read or written when the stream gets there; cudaMemcpy waits for it;
// - host to host: done now.
cudaError_t memcpy_2d(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                      size_t height, cudaMemcpyKind kind, cudaStream_t stream, bool async) {
  if (width == 0 || height == 0) return cudaSuccess;
  if (width > dpitch || width > spitch) return cudaErrorInvalidValue;
  const size_t dspan = (height - 1) * dpitch + width, sspan = (height - 1) * spitch + width;
  const bool dst_dev = is_device_range(dst, dspan), src_dev = is_device_range(src, sspan);
  const bool dst_pinned = !dst_dev && is_pinned_range(dst, dspan);
  const bool src_pinned = !src_dev && is_pinned_range(src, sspan);
  // The kind the caller named must be where the pointers are (a half-device range is an error).
  if ((dst_dev != is_device_range(dst, 1)) || (src_dev != is_device_range(src, 1)))
    return cudaErrorInvalidValue;
  const bool want_dst_dev = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  const bool want_src_dev = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  if (kind != cudaMemcpyDefault && (want_dst_dev != dst_dev || want_src_dev != src_dev))
    return cudaErrorInvalidValue;
  auto copy = [=](const void* from) {
    for (size_t r = 0; r < height; ++r)
      std::memmove(static_cast<char*>(dst) + r * dpitch,
                   static_cast<const char*>(from) + r * spitch, width);
  };
  if (!dst_dev && !src_dev) {
    copy(src);
    return cudaSuccess;
  }
  std::shared_ptr<Stream> s;
  {
    std::lock_guard lock(device_mutex());
    s = find_stream(stream);
  }
  if (!s) return cudaErrorInvalidResourceHandle;
  if (!src_dev && !src_pinned) {  // pageable source: staged now
    if (!async)
      if (const cudaError_t e = wait_stream(s); e != cudaSuccess) return e;
    auto staged = std::make_shared<std::vector<char>>(sspan);
    std::memcpy(staged->data(), src, sspan);
    enqueue(stream, [copy, staged] { copy(staged->data()); });
    return cudaSuccess;
  }
  enqueue(stream, [copy, src] { copy(src); });
  const bool host_waits = (!dst_dev && !dst_pinned) || (!async && !(dst_dev && src_dev));
  return host_waits ? wait_stream(s) : cudaSuccess;
}

cudaError_t memset_device(void* p, int value, size_t bytes, cudaStream_t stream) {
  if (bytes == 0) return cudaSuccess;
  if (!is_device_range(p, bytes)) return cudaErrorInvalidValue;
  enqueue(stream, [p, value, bytes] { std::memset(p, value, bytes); });
  return cudaSuccess;
}

cudaError_t set_max_dynamic_shared(const void* kernel, int bytes) {
  if (bytes < 0 || static_cast<size_t>(bytes) > kMaxDynamicShared) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(runtime_mutex());
  shared_limits()[kernel] = static_cast<size_t>(bytes);
  return cudaSuccess;
}

size_t max_dynamic_shared(const void* kernel) {
  std::lock_guard<std::mutex> lock(runtime_mutex());
  auto it = shared_limits().find(kernel);
  return it == shared_limits().end() ? kDefaultDynamicShared : it->second;
}

void set_launch_error(cudaError_t e) {
  last_error = e;
}

cudaError_t take_last_error() {
  const cudaError_t e = peek_last_error();
  last_error = cudaSuccess;
  return e;
}

cudaError_t peek_last_error() {  // a device fault is sticky: every later query returns it
  {
    std::lock_guard lock(device_mutex());
    if (!device_error().empty()) return cudaErrorLaunchFailure;
  }
  return last_error;
}

const char* error_name(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "cudaSuccess";
    case cudaErrorInvalidValue:
      return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation:
      return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration:
      return "cudaErrorInvalidConfiguration";
    case cudaErrorNoDevice:
      return "cudaErrorNoDevice";
    case cudaErrorNotReady:
      return "cudaErrorNotReady";
    case cudaErrorInvalidResourceHandle:
      return "cudaErrorInvalidResourceHandle";
    case cudaErrorLaunchFailure:
      return "cudaErrorLaunchFailure";
  }
  return "cudaError (emulation: unknown code)";
}

// cudaGetErrorString: the name, but for a fault, CUDA's text and the fault itself, so that the
// library's error message says what went wrong. Its own buffer: a message may take the name and
// the string of one error together.
const char* error_string(cudaError_t e) {
  if (e != cudaErrorLaunchFailure) return error_name(e);
  std::lock_guard lock(device_mutex());
  static thread_local std::string text;
  text = "unspecified launch failure (CUDA emulation: " +
         (device_error().empty() ? std::string("no fault recorded") : device_error()) + ")";
  return text.c_str();
}

}  // namespace tsp::emu
