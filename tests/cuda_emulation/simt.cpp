// The SIMT engine of the CUDA emulation (README.md beside this file): a grid runs block after
// block; a block's threads are fibers (Boost.Context) on the calling OS thread. A thread runs
// until it reaches an operation that needs other threads — a warp-wide instruction (shuffle,
// ballot, __syncwarp, ldmatrix, mma.sync) or the block barrier — and waits there until every
// thread that operation names has arrived; the last to arrive computes the results for all of
// them. Between those points the warps of a block run in a shuffled order (TSP_EMU_SEED), so a
// kernel that reads shared memory another warp writes without a barrier in between can see a
// different value from one seed to another, as on a GPU.
//
// What a GPU would fault on or leave undefined, and the engine sees, is an error (a
// std::runtime_error naming the block and thread): lanes of a warp at different warp-wide
// operations, or a mask naming an exited lane; __syncthreads after a thread of the block exited,
// or threads at different kinds of barrier; a deadlock; ldmatrix or cp.async outside the dynamic
// shared memory or misaligned; cp.async reading outside a cudaMalloc allocation.
#include <cuda_runtime.h>
#include <boost/context/fiber.hpp>
#include <boost/context/protected_fixedsize_stack.hpp>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "settings.h"

namespace tsp::emu {

thread_local Builtins current;

namespace {

namespace ctx = boost::context;

// ---- fiber stacks, reused from block to block -----------------------------------------------
// 256 KiB with a guard page below (an overflow faults instead of corrupting a neighbour).
constexpr size_t kStackBytes = 256 * 1024;
struct StackPool {
  ctx::protected_fixedsize_stack make{kStackBytes};
  std::vector<ctx::stack_context> free;
  ~StackPool() {
    for (auto& s : free) make.deallocate(s);
  }
};
StackPool& stack_pool() {
  static thread_local StackPool pool;  // each stream's thread runs its own blocks
  return pool;
}
struct PooledStack {
  ctx::stack_context allocate() {
    auto& p = stack_pool();
    if (p.free.empty()) return p.make.allocate();
    ctx::stack_context s = p.free.back();
    p.free.pop_back();
    return s;
  }
  void deallocate(ctx::stack_context& s) noexcept { stack_pool().free.push_back(s); }
};

// ---- block state -------------------------------------------------------------------------------
enum class State { Ready, AtWarp, AtBlock, Done };
enum class WarpOp { None, Shuffle, Ballot, Sync, Ldsm, LdsmTrans, Mma };
const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::None:
      return "none";
    case WarpOp::Shuffle:
      return "__shfl_*_sync";
    case WarpOp::Ballot:
      return "__ballot_sync";
    case WarpOp::Sync:
      return "__syncwarp";
    case WarpOp::Ldsm:
      return "ldmatrix.x4";
    case WarpOp::LdsmTrans:
      return "ldmatrix.x4.trans";
    case WarpOp::Mma:
      return "mma.sync.m16n8k16";
  }
  return "?";
}

struct AsyncCopy {
  unsigned char* dst;
  unsigned char data[16];
};

struct Thread {
  ctx::fiber fiber;  // the thread while it is suspended
  int id = 0;        // index in Block::threads
  uint3 idx;
  int warp = 0, lane = 0;
  State state = State::Ready;
  uint32_t out[4] = {};  // a warp-wide operation's result for this lane
  uint64_t out64 = 0;
  int block_result = 0;
  std::vector<AsyncCopy> open_group;              // cp.async not yet committed
  std::vector<std::vector<AsyncCopy>> committed;  // committed groups, oldest first (a few)
};

struct LaneInput {
  uint64_t value = 0;  // shuffle: the value; ballot: the predicate
  int param = 0;       // shuffle: source lane or xor mask
  bool is_xor = false;
  int width = 32;
  const unsigned char* address = nullptr;  // ldmatrix: this lane's row
  uint32_t a[4] = {}, b[2] = {};
  float c[4] = {};
};

struct Warp {
  WarpOp op = WarpOp::None;
  unsigned mask = 0, arrived = 0;
  unsigned exited = 0;  // lanes that have returned
  unsigned ready = 0;   // lanes whose state is Ready
  int size = 32;        // threads in this warp (the last one of a block may have fewer)
  LaneInput in[32];
};

struct Block {
  dim3 dim, grid;
  uint3 idx;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  int live = 0;
  const Thread* exited = nullptr;  // the first thread that returned
  int at_barrier = 0, barrier_mode = -1, barrier_or = 0, barrier_and = 1;
  Thread* running = nullptr;
  ctx::fiber scheduler;   // run_grid's loop while a thread runs
  int switched_from = 0;  // who handed over last (an id, or kScheduler)
  std::string error;
  std::vector<unsigned char> shared;
  KernelCounts counts;  // this block's (the numbers only)
};
thread_local Block* block = nullptr;  // the block this OS thread runs

std::string where(const Thread& t) {
  std::ostringstream s;
  s << "block (" << block->idx.x << "," << block->idx.y << "," << block->idx.z << ") thread ("
    << t.idx.x << "," << t.idx.y << "," << t.idx.z << ")";
  return s.str();
}

[[noreturn]] void fail(const std::string& what) {
  throw std::runtime_error(what);
}

void set_state(Thread& t, State state) {
  t.state = state;
  unsigned& ready = block->warps[t.warp].ready;
  if (state == State::Ready)
    ready |= 1u << t.lane;
  else
    ready &= ~(1u << t.lane);
}

Thread& me() {
  if (!block || !block->running) fail("a device function called outside a kernel launch");
  return *block->running;
}

// Context switches. Threads hand over to each other directly (a waiting lane to the next lane
// of its warp that can run, so a warp goes through its warp-wide operations without a detour
// through the scheduler); each side stores the continuation of the one that handed over to it.
constexpr int kScheduler = -1;
ctx::fiber& slot(int id) {
  return id == kScheduler ? block->scheduler : block->threads[id].fiber;
}
void arrive_as(int id) {  // after a switch: who runs now
  block->running = id == kScheduler ? nullptr : &block->threads[id];
  if (id != kScheduler) {
    const Thread& t = block->threads[id];
    current = {t.idx, block->idx, block->dim, block->grid};
  }
}
void switch_to(int self, int target) {
  block->switched_from = self;
  ctx::fiber from = std::move(slot(target)).resume();
  slot(block->switched_from) = std::move(from);
  arrive_as(self);
}
// The next thread to run after `t` stops: a ready lane of its own warp, else the scheduler.
int next_after(const Thread& t) {
  const unsigned ready = block->warps[t.warp].ready;
  if (!ready) return kScheduler;
  // The first ready lane above t.lane, cyclically.
  const unsigned above = t.lane == 31 ? 0u : ready & (~0u << (t.lane + 1));
  return t.warp * 32 + __builtin_ctz(above ? above : ready);
}
void yield(Thread& t) {
  switch_to(t.id, next_after(t));
}

bool in_shared(const void* p, size_t bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  return c >= block->shared.data() && c + bytes <= block->shared.data() + block->shared.size();
}

uint16_t half_of(uint32_t r, int hi) {
  return static_cast<uint16_t>(hi ? r >> 16 : r & 0xffffu);
}
uint32_t pack2(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
}
uint16_t load_b16(const unsigned char* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// Shared-memory wavefronts of one ldmatrix.x4 (KernelCounts::ldmatrix_wavefronts): phase m
// reads the rows of lanes 8m..8m+7; shared memory has 32 banks of 4 bytes, so a 16-byte row
// covers the 4 banks of group (offset / 16) % 8. Rows at one address are read once (broadcast);
// distinct rows in one group need a wavefront each.
int ldmatrix_wavefronts(const Warp& w) {
  int total = 0;
  for (int m = 0; m < 4; ++m) {
    int per_group[8] = {};
    for (int r = 0; r < 8; ++r) {
      const unsigned char* a = w.in[8 * m + r].address;
      bool seen = false;
      for (int q = 0; q < r; ++q) seen = seen || w.in[8 * m + q].address == a;
      if (!seen) ++per_group[(a - block->shared.data()) / 16 % 8];
    }
    total += *std::max_element(per_group, per_group + 8);
  }
  return total;
}

void add_counts(KernelCounts& into, const KernelCounts& c) {
  into.mma += c.mma;
  into.ldmatrix += c.ldmatrix;
  into.ldmatrix_wavefronts += c.ldmatrix_wavefronts;
  into.cp_async_bytes += c.cp_async_bytes;
  into.barriers += c.barriers;
  into.shuffles += c.shuffles;
  into.ballots += c.ballots;
  into.atomics += c.atomics;
}

// Every kernel's counts, in order of first launch; launches on different streams (OS threads)
// add theirs under the mutex.
struct CountRegistry {
  std::mutex mutex;
  std::map<const void*, size_t> index;  // kernel -> position in `all`
  std::vector<KernelCounts> all;
};
CountRegistry& count_registry() {
  static auto* r = new CountRegistry;
  return *r;
}

// The last lane of an operation computes every participating lane's result.
void complete(Warp& w, int warp_index) {
  const int base = warp_index * 32;
  auto& th = block->threads;
  KernelCounts& n = block->counts;
  switch (w.op) {
    case WarpOp::Shuffle:
      ++n.shuffles;
      for (int l = 0; l < 32; ++l) {
        if (!(w.mask >> l & 1u)) continue;
        const LaneInput& in = w.in[l];
        // width is a power of 2 (checked in shuffle()): masks, not divisions, on this hot path.
        const int width = in.width, group = l & ~(width - 1);
        int src = in.is_xor ? l ^ in.param : group + (in.param & (width - 1));
        if (in.is_xor && (src < group || src >= group + width)) src = l;
        if (!(w.mask >> src & 1u))
          fail("lane " + std::to_string(l) + " reads lane " + std::to_string(src) +
               " outside the mask of " + op_name(w.op));
        th[base + l].out64 = w.in[src].value;
      }
      break;
    case WarpOp::Ballot: {
      ++n.ballots;
      unsigned bits = 0;
      for (int l = 0; l < 32; ++l)
        if ((w.mask >> l & 1u) && w.in[l].value) bits |= 1u << l;
      for (int l = 0; l < 32; ++l)
        if (w.mask >> l & 1u) th[base + l].out64 = bits;
      break;
    }
    case WarpOp::Sync:
    case WarpOp::None:
      break;
    case WarpOp::Ldsm:
    case WarpOp::LdsmTrans:
      ++n.ldmatrix;
      n.ldmatrix_wavefronts += ldmatrix_wavefronts(w);
      // Matrix m's row r is the 8 b16 at lane (8m + r)'s address. Lane l = 4g + t receives, per
      // matrix, the elements (g, 2t) and (g, 2t+1), or with .trans (2t, g) and (2t+1, g).
      for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        for (int m = 0; m < 4; ++m) {
          uint16_t lo, hi;
          if (w.op == WarpOp::Ldsm) {
            const unsigned char* row = w.in[8 * m + g].address;
            lo = load_b16(row + 2 * (2 * t));
            hi = load_b16(row + 2 * (2 * t + 1));
          } else {
            lo = load_b16(w.in[8 * m + 2 * t].address + 2 * g);
            hi = load_b16(w.in[8 * m + 2 * t + 1].address + 2 * g);
          }
          th[base + l].out[m] = pack2(lo, hi);
        }
      }
      break;
    case WarpOp::Mma: {
      ++n.mma;
      // D[16×8] = A[16×16]·B[16×8] + C (g = lane/4, t = lane%4): a0 (g, 2t..2t+1), a1 (g+8, 2t..),
      // a2 (g, 2t+8..), a3 (g+8, 2t+8..); b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g); c0, c1
      // (g, 2t..2t+1), c2, c3 (g+8, 2t..2t+1). Products summed exactly (double), rounded once.
      float A[16][16], B[16][8], C[16][8];
      for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        const LaneInput& in = w.in[l];
        for (int h = 0; h < 2; ++h) {
          A[g][2 * t + h] = tsp::bf16::to_float(half_of(in.a[0], h));
          A[g + 8][2 * t + h] = tsp::bf16::to_float(half_of(in.a[1], h));
          A[g][2 * t + 8 + h] = tsp::bf16::to_float(half_of(in.a[2], h));
          A[g + 8][2 * t + 8 + h] = tsp::bf16::to_float(half_of(in.a[3], h));
          B[2 * t + h][g] = tsp::bf16::to_float(half_of(in.b[0], h));
          B[2 * t + 8 + h][g] = tsp::bf16::to_float(half_of(in.b[1], h));
          C[g][2 * t + h] = in.c[h];
          C[g + 8][2 * t + h] = in.c[2 + h];
        }
      }
      float D[16][8];
      for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 8; ++j) {
          double acc = C[i][j];
          for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[i][k]) * B[k][j];
          D[i][j] = static_cast<float>(acc);
        }
      for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        float r[4] = {D[g][2 * t], D[g][2 * t + 1], D[g + 8][2 * t], D[g + 8][2 * t + 1]};
        std::memcpy(th[base + l].out, r, 16);
      }
      break;
    }
  }
}

// The calling lane's part of a warp-wide operation; returns once every lane of `mask` has
// given its part and the results are in the lanes' Thread::out / out64.
void warp_op(Thread& t, WarpOp op, unsigned mask) {
  Warp& w = block->warps[t.warp];
  const unsigned full = w.size == 32 ? 0xffffffffu : (1u << w.size) - 1u;
  if (!(mask >> t.lane & 1u))
    fail(where(t) + ": " + op_name(op) + " with a mask that leaves out the calling lane");
  if (mask & ~full)
    fail(where(t) + ": " + op_name(op) + " names lanes the warp does not have (" +
         std::to_string(w.size) + " threads)");
  if ((op == WarpOp::Ldsm || op == WarpOp::LdsmTrans || op == WarpOp::Mma) && mask != 0xffffffffu)
    fail(where(t) + ": " + op_name(op) + " needs all 32 lanes of a full warp");
  if (mask & w.exited)
    fail(where(t) + ": " + op_name(op) + " names lane " +
         std::to_string(__builtin_ctz(mask & w.exited)) + ", which has returned");
  if (w.arrived == 0) {
    w.op = op;
    w.mask = mask;
  } else if (w.op != op || w.mask != mask) {
    std::ostringstream s;
    s << where(t) << ": lanes of warp " << t.warp
      << " at different warp-wide operations: " << op_name(op) << " (mask " << std::hex << mask
      << ") and " << op_name(w.op) << " (mask " << w.mask << ")";
    fail(s.str());
  }
  w.arrived |= 1u << t.lane;
  if (w.arrived == w.mask) {
    complete(w, t.warp);
    for (int l = 0; l < 32; ++l)
      if (w.mask >> l & 1u) set_state(block->threads[t.warp * 32 + l], State::Ready);
    w.arrived = 0;
    w.op = WarpOp::None;
    return;
  }
  set_state(t, State::AtWarp);
  yield(t);
}

void check_exit(Thread& t) {
  set_state(t, State::Done);
  --block->live;
  if (!block->exited) block->exited = &t;
  Warp& w = block->warps[t.warp];
  w.exited |= 1u << t.lane;
  if (w.arrived && (w.mask >> t.lane & 1u))
    fail(where(t) + ": returned while other lanes wait for it at " + op_name(w.op));
  if (block->at_barrier > 0)
    fail(where(t) + ": returned while " + std::to_string(block->at_barrier) +
         " threads wait at __syncthreads");
}

using settings::seed;

}  // namespace

unsigned char* dynamic_shared() {
  me();
  return block->shared.data();
}

uint64_t shuffle(unsigned mask, uint64_t bits, int param, bool is_xor, int width) {
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail(where(me()) + ": shuffle width " + std::to_string(width) + " is not a power of 2 <= 32");
  Thread& t = me();
  LaneInput& in = block->warps[t.warp].in[t.lane];
  in.value = bits;
  in.param = param;
  in.is_xor = is_xor;
  in.width = width;
  warp_op(t, WarpOp::Shuffle, mask);
  return t.out64;
}

unsigned ballot(unsigned mask, bool predicate) {
  Thread& t = me();
  block->warps[t.warp].in[t.lane].value = predicate;
  warp_op(t, WarpOp::Ballot, mask);
  return static_cast<unsigned>(t.out64);
}

void sync_warp(unsigned mask) {
  warp_op(me(), WarpOp::Sync, mask);
}

int sync_block(int predicate, int mode) {
  Thread& t = me();
  if (block->exited)
    fail(where(t) + ": __syncthreads after " + where(*block->exited) +
         " returned (the barrier would wait for a thread that never comes)");
  if (block->at_barrier == 0) {
    block->barrier_mode = mode;
    block->barrier_or = 0;
    block->barrier_and = 1;
  } else if (block->barrier_mode != mode) {
    fail(where(t) + ": threads at different barriers (__syncthreads, _or, _and)");
  }
  ++block->at_barrier;
  block->barrier_or |= predicate != 0;
  block->barrier_and &= predicate != 0;
  set_state(t, State::AtBlock);
  if (block->at_barrier == block->live) {
    ++block->counts.barriers;
    const int result = mode == 1 ? block->barrier_or : mode == 2 ? block->barrier_and : 0;
    for (Thread& o : block->threads)
      if (o.state == State::AtBlock) {
        set_state(o, State::Ready);
        o.block_result = result;
      }
    block->at_barrier = 0;
    return result;
  }
  yield(t);
  return t.block_result;
}

void cp_async16(void* dst, const void* src, bool valid) {
  Thread& t = me();
  if (!in_shared(dst, 16) || reinterpret_cast<uintptr_t>(dst) % 16)
    fail(where(t) +
         ": cp.async destination outside the dynamic shared memory or not 16-byte "
         "aligned");
  block->counts.cp_async_bytes += 16;
  AsyncCopy c{static_cast<unsigned char*>(dst), {}};
  if (valid) {
    if (reinterpret_cast<uintptr_t>(src) % 16 || !is_device_range(src, 16))
      fail(where(t) + ": cp.async source not 16-byte aligned or outside every allocation");
    std::memcpy(c.data, src, 16);  // global memory does not change under a running kernel here
  }
  t.open_group.push_back(c);
}

void cp_async_commit() {
  Thread& t = me();
  t.committed.push_back(std::move(t.open_group));
  t.open_group.clear();
}

// The copies land in shared memory only here, when the thread waits for them: a read of a tile
// before its wait (or, by another thread, before the barrier after it) sees the old contents.
void cp_async_wait(int pending) {
  Thread& t = me();
  const int done = static_cast<int>(t.committed.size()) - pending;
  if (done <= 0) return;
  for (int g = 0; g < done; ++g)
    for (const AsyncCopy& c : t.committed[g]) std::memcpy(c.dst, c.data, 16);
  t.committed.erase(t.committed.begin(), t.committed.begin() + done);
}

void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool transpose) {
  Thread& t = me();
  if (!in_shared(row, 16) || reinterpret_cast<uintptr_t>(row) % 16)
    fail(where(t) +
         ": ldmatrix row address outside the dynamic shared memory or not 16-byte "
         "aligned");
  block->warps[t.warp].in[t.lane].address = static_cast<const unsigned char*>(row);
  warp_op(t, transpose ? WarpOp::LdsmTrans : WarpOp::Ldsm, 0xffffffffu);
  std::memcpy(r, t.out, 16);
}

void mma_m16n8k16_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Thread& t = me();
  LaneInput& in = block->warps[t.warp].in[t.lane];
  std::memcpy(in.a, a, 16);
  in.b[0] = b0;
  in.b[1] = b1;
  std::memcpy(in.c, c, 16);
  warp_op(t, WarpOp::Mma, 0xffffffffu);
  std::memcpy(c, t.out, 16);
}

bool launch_config_ok(const void* kernel, dim3 grid, dim3 dim, size_t dynamic_shared_bytes) {
  if (block) fail("CUDA emulation: a kernel launched from inside a kernel");
  const int64_t threads = int64_t{dim.x} * dim.y * dim.z;
  if (threads < 1 || threads > 1024 || grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 ||
      grid.z > 65535 || grid.x > 2147483647u) {
    set_launch_error(cudaErrorInvalidConfiguration);
    return false;
  }
  if (dynamic_shared_bytes > max_dynamic_shared(kernel)) {
    set_launch_error(cudaErrorInvalidValue);
    return false;
  }
  return true;
}

std::vector<KernelCounts> kernel_counts() {
  CountRegistry& r = count_registry();
  const std::lock_guard<std::mutex> lock(r.mutex);
  return r.all;
}

void reset_kernel_counts() {
  CountRegistry& r = count_registry();
  const std::lock_guard<std::mutex> lock(r.mutex);
  r.index.clear();
  r.all.clear();
}

void count_atomic() {
  if (block) ++block->counts.atomics;
}

void run_grid(const void* kernel, const char* name, dim3 grid, dim3 dim,
              size_t dynamic_shared_bytes, const std::function<void()>& body) {
  // TSP_EMU_FAULT_KERNEL=n (settings.h): this process's n-th grid faults before it runs, as one
  // that touches an illegal address does on a GPU (a sticky fault: runtime.cpp).
  static std::atomic<uint32_t> grids_run{0};
  if (const uint32_t at = settings::fault_kernel_at(); at > 0 && ++grids_run == at)
    throw std::runtime_error(std::string("injected fault in kernel ") + name +
                             " (TSP_EMU_FAULT_KERNEL=" + std::to_string(at) + ")");
  // Checked at the launch (launch_config_ok); a grid that gets here is valid.
  const int64_t threads = int64_t{dim.x} * dim.y * dim.z;
  KernelCounts launch_counts;
  static thread_local std::minstd_rand rng(seed());
  const int n = static_cast<int>(threads), n_warps = (n + 31) / 32;
  std::vector<int> warp_order(n_warps);
  for (int i = 0; i < n_warps; ++i) warp_order[i] = i;

  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b;
        b.dim = dim;
        b.grid = grid;
        b.idx = {bx, by, bz};
        b.live = n;
        // Fresh shared memory holds NaN bytes: a read of what no thread wrote shows.
        b.shared.assign(dynamic_shared_bytes, 0xff);
        b.threads.resize(n);
        b.warps.resize((n + 31) / 32);
        for (size_t w = 0; w < b.warps.size(); ++w)
          b.warps[w].size = std::min(32, n - static_cast<int>(w) * 32);
        block = &b;
        struct Reset {
          ~Reset() {
            // Unwinds the fibers still suspended (after an error) while `block` is valid.
            for (Thread& t : block->threads) {
              block->switched_from = kScheduler;
              t.fiber = ctx::fiber();
            }
            block = nullptr;
          }
        } reset;
        for (int i = 0; i < n; ++i) {
          Thread& t = b.threads[i];
          t.idx = {static_cast<unsigned>(i % dim.x), static_cast<unsigned>(i / dim.x % dim.y),
                   static_cast<unsigned>(i / (dim.x * dim.y))};
          t.warp = i / 32;
          t.lane = i % 32;
          set_state(t, State::Ready);
          t.id = i;
          t.fiber = ctx::fiber(std::allocator_arg, PooledStack{}, [&t, &body](ctx::fiber&& from) {
            slot(block->switched_from) = std::move(from);
            arrive_as(t.id);
            int next = kScheduler;
            try {
              body();
              check_exit(t);
              next = next_after(t);
            } catch (const ctx::detail::forced_unwind&) {
              throw;
            } catch (const std::exception& e) {
              if (block->error.empty()) block->error = e.what();
              set_state(t, State::Done);
            }
            block->switched_from = t.id;
            return std::move(slot(next));
          });
        }
        while (b.live > 0) {
          bool ran = false;
          // Warps in a new random order each round (lanes in order within a warp).
          for (int i = n_warps - 1; i > 0; --i)
            std::swap(warp_order[i], warp_order[rng() % (i + 1)]);
          for (int w : warp_order)
            for (int i = w * 32, end = std::min(n, i + 32); i < end; ++i) {
              Thread& t = b.threads[i];
              if (t.state != State::Ready) continue;
              ran = true;
              switch_to(kScheduler, i);
              if (!b.error.empty()) fail("CUDA emulation: " + b.error);
            }
          if (!ran) {
            std::ostringstream s;
            s << "CUDA emulation: deadlock in block (" << bx << "," << by << "," << bz << "): ";
            int at_warp = 0, at_block = 0;
            for (const Thread& t : b.threads) {
              at_warp += t.state == State::AtWarp;
              at_block += t.state == State::AtBlock;
            }
            s << at_block << " threads at __syncthreads, " << at_warp << " at warp-wide operations";
            for (size_t w = 0; w < b.warps.size(); ++w)
              if (b.warps[w].arrived)
                s << "; warp " << w << " waits at " << op_name(b.warps[w].op) << " (lanes "
                  << std::hex << b.warps[w].arrived << " of " << b.warps[w].mask << std::dec << ")";
            fail(s.str());
          }
        }
        add_counts(launch_counts, b.counts);
      }
  check_guards("a kernel");

  CountRegistry& r = count_registry();
  const std::lock_guard<std::mutex> lock(r.mutex);
  auto [it, added] = r.index.emplace(kernel, r.all.size());
  if (added) r.all.push_back(KernelCounts{name});
  KernelCounts& k = r.all[it->second];
  add_counts(k, launch_counts);
  k.block = dim;
  k.dynamic_shared = dynamic_shared_bytes;
  ++k.launches;
  k.blocks += uint64_t{grid.x} * grid.y * grid.z;
}

}  // namespace tsp::emu
