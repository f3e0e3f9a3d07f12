// GEMM through oneDNN 2.6 `dnnl::matmul` (2.x API), one primitive per distinct problem, cached.
//
// Mapping of the BLAS-like call onto matmul:
//   - op(A) is the logical [M, K] source. Stored row-major with row stride lda, it has strides
//     {lda, 1}; stored transposed ([K, M] row-major), the same logical matrix has strides {1, lda}.
//     Likewise op(B) is the logical [K, N] weights tensor and C the [M, N] destination {ldc, 1}.
//     Transposes and leading dimensions therefore live entirely in memory-descriptor strides.
//   - alpha is an output scale (2.x `set_output_scales`); beta = 1 is a sum post-op, which adds
//     the previous C before the primitive writes it.
//
// Primitive creation costs 0.1-1.2 ms and a cache hit about 5 us (platform notes), so every
// distinct (dtype, shape, transposes, strides, alpha, beta, threads) gets one primitive, created
// once and shared by all threads (executing a oneDNN primitive is thread-safe). The thread count
// is part of the key because oneDNN's CPU kernels fix their work partition at creation time.
//
// Debian's libdnnl is built with DNNL_CPU_RUNTIME=OMP (libgomp), so the thread count of a GEMM is
// the OpenMP nthreads ICV of the calling thread; we set it from compute_threads() before every
// execute (the ICV is per thread, and a GEMM may be called from a thread we never configured).
//
// Pre-packed weights (format_tag::any plus a reorder) would gain 2-10% (platform notes) but need
// the caller to own a second, opaque copy of every weight; not done: plain layouts keep weights
// shardable and sendable as-is, which TSP relies on.
#include "tsp/ops/gemm.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <unordered_map>

#include <oneapi/dnnl/dnnl.hpp>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "tsp/core/error.h"

namespace tsp {
namespace {

// ---- Compute threads ---------------------------------------------------------------------------

int threads_from_environment() {
  // Default 1: with one rank per core (the usual layout here) more threads only oversubscribe.
  const char* env = std::getenv("OMP_NUM_THREADS");
  if (!env || !*env) return 1;
  char* end = nullptr;
  const long n = std::strtol(env, &end, 10);  // "4" or the first entry of a list "4,2"
  return (end != env && n >= 1 && n <= 4096) ? static_cast<int>(n) : 1;
}

std::atomic<int>& threads_setting() {
  static std::atomic<int> threads{threads_from_environment()};
  return threads;
}

// Makes the calling thread's OpenMP ICV match compute_threads() (oneDNN reads it at execute).
void apply_threads_to_this_thread(int n) {
#ifdef _OPENMP
  if (omp_get_max_threads() != n) omp_set_num_threads(n);
#endif
}

// ---- Primitive cache ---------------------------------------------------------------------------

struct GemmKey {
  dnnl::memory::data_type dtype;    // of A and B
  dnnl::memory::data_type c_dtype;  // of C: f32, or bf16 (accumulated in fp32, rounded once)
  Trans ta, tb;
  int64_t M, N, K, lda, ldb, ldc;
  uint32_t alpha_bits;  // alpha compared bitwise: -0.f and 0.f are different primitives, fine
  bool accumulate;
  int threads;
  bool operator==(const GemmKey&) const = default;
};

struct GemmKeyHash {
  size_t operator()(const GemmKey& k) const {
    // FNV-1a over the fields (not over the struct bytes: padding is indeterminate).
    uint64_t h = 1469598103934665603ull;
    auto mix = [&h](uint64_t v) {
      h ^= v;
      h *= 1099511628211ull;
    };
    mix(static_cast<uint64_t>(k.dtype));
    mix(static_cast<uint64_t>(k.c_dtype));
    mix(static_cast<uint64_t>(k.ta) * 2 + static_cast<uint64_t>(k.tb));
    for (int64_t v : {k.M, k.N, k.K, k.lda, k.ldb, k.ldc}) mix(static_cast<uint64_t>(v));
    mix(k.alpha_bits);
    mix(k.accumulate);
    mix(static_cast<uint64_t>(k.threads));
    return static_cast<size_t>(h);
  }
};

struct GemmPrimitive {
  dnnl::memory::desc a_md, b_md, c_md;
  dnnl::matmul prim;
};

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::stream& this_thread_stream() {
  // A CPU stream is cheap but not free to create; one per calling thread, never shared.
  thread_local dnnl::stream stream(cpu_engine());
  return stream;
}

class PrimitiveCache {
 public:
  // A training run uses a few dozen shapes; the cap only guards against a caller that sweeps
  // shapes forever (e.g. decode with a growing cache), at the price of recreating primitives.
  static constexpr size_t kCapacity = 4096;

  std::shared_ptr<const GemmPrimitive> get(const GemmKey& key) {
    {
      std::lock_guard lock(mutex_);
      auto it = map_.find(key);
      if (it != map_.end()) return it->second;
    }
    // Create outside the lock: creation takes up to a millisecond and other threads' hits must
    // not wait for it. Two threads racing on one new key both create; the first insert wins.
    auto created = std::make_shared<const GemmPrimitive>(create(key));
    std::lock_guard lock(mutex_);
    if (map_.size() >= kCapacity) map_.clear();
    return map_.emplace(key, std::move(created)).first->second;
  }

 private:
  static GemmPrimitive create(const GemmKey& k) {
    using dims = dnnl::memory::dims;
    const dims a_strides = k.ta == Trans::N ? dims{k.lda, 1} : dims{1, k.lda};
    const dims b_strides = k.tb == Trans::N ? dims{k.ldb, 1} : dims{1, k.ldb};
    dnnl::memory::desc a_md({k.M, k.K}, k.dtype, a_strides);
    dnnl::memory::desc b_md({k.K, k.N}, k.dtype, b_strides);
    dnnl::memory::desc c_md({k.M, k.N}, k.c_dtype, dims{k.ldc, 1});
    dnnl::primitive_attr attr;
    float alpha;
    std::memcpy(&alpha, &k.alpha_bits, sizeof alpha);
    if (alpha != 1.f) attr.set_output_scales(0, {alpha});
    if (k.accumulate) {
      dnnl::post_ops ops;
      ops.append_sum(1.f);
      attr.set_post_ops(ops);
    }
    try {
      dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_md, c_md), attr, cpu_engine());
      return GemmPrimitive{a_md, b_md, c_md, dnnl::matmul(pd)};
    } catch (const dnnl::error& e) {
      TSP_FAIL("oneDNN could not create a matmul for M={} N={} K={} (lda={} ldb={} ldc={}): {}",
               k.M, k.N, k.K, k.lda, k.ldb, k.ldc, e.what());
    }
  }

  std::mutex mutex_;
  std::unordered_map<GemmKey, std::shared_ptr<const GemmPrimitive>, GemmKeyHash> map_;
};

PrimitiveCache& primitive_cache() {
  static PrimitiveCache cache;
  return cache;
}

// ---- The call ----------------------------------------------------------------------------------

const char* trans_name(Trans t) {
  return t == Trans::N ? "N" : "T";
}

void check_arguments(const char* name, Trans ta, Trans tb, int64_t M, int64_t N, int64_t K,
                     const void* A, int64_t lda, const void* B, int64_t ldb, float beta,
                     const void* C, int64_t ldc) {
  TSP_CHECK(M >= 0 && N >= 0 && K >= 0, "{}: sizes must be non-negative, got M={} N={} K={}", name,
            M, N, K);
  TSP_CHECK(beta == 0.f || beta == 1.f,
            "{}: beta must be 0 (overwrite C) or 1 (accumulate into C), got {}", name, beta);
  // Row-major: a stored row holds the second dimension of the stored matrix.
  const int64_t a_cols = ta == Trans::N ? K : M;
  const int64_t b_cols = tb == Trans::N ? N : K;
  TSP_CHECK(lda >= std::max<int64_t>(1, a_cols),
            "{}: lda={} is smaller than a row of A ({} elements; ta={}, M={}, K={})", name, lda,
            a_cols, trans_name(ta), M, K);
  TSP_CHECK(ldb >= std::max<int64_t>(1, b_cols),
            "{}: ldb={} is smaller than a row of B ({} elements; tb={}, K={}, N={})", name, ldb,
            b_cols, trans_name(tb), K, N);
  TSP_CHECK(ldc >= std::max<int64_t>(1, N), "{}: ldc={} is smaller than a row of C (N={})", name,
            ldc, N);
  TSP_CHECK(M == 0 || N == 0 || C, "{}: C is null for a {}x{} result", name, M, N);
  TSP_CHECK(M == 0 || N == 0 || K == 0 || (A && B), "{}: A or B is null (M={} N={} K={})", name, M,
            N, K);
}

// C is float* for c_dtype f32 and bf16* for bf16.
void run_gemm(dnnl::memory::data_type dtype, dnnl::memory::data_type c_dtype, Trans ta, Trans tb,
              int64_t M, int64_t N, int64_t K, float alpha, const void* A, int64_t lda,
              const void* B, int64_t ldb, float beta, void* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    // An empty sum: C = beta·C. oneDNN rejects zero-sized reduction dimensions, so do it here.
    // (All-zero bits are +0 in fp32 and in bf16 alike.)
    if (beta == 0.f) {
      const size_t elem = c_dtype == dnnl::memory::data_type::bf16 ? 2 : 4;
      for (int64_t i = 0; i < M; ++i)
        std::memset(static_cast<char*>(C) + i * ldc * elem, 0, N * elem);
    }
    return;
  }
  const int threads = compute_threads();
  GemmKey key{dtype, c_dtype, ta, tb, M, N, K, lda, ldb, ldc, 0, beta == 1.f, threads};
  std::memcpy(&key.alpha_bits, &alpha, sizeof alpha);
  const std::shared_ptr<const GemmPrimitive> p = primitive_cache().get(key);

  apply_threads_to_this_thread(threads);
  dnnl::engine& eng = cpu_engine();
  // Memory objects wrap the caller's pointers (no copy); oneDNN wants non-const handles.
  dnnl::memory a_mem(p->a_md, eng, const_cast<void*>(A));
  dnnl::memory b_mem(p->b_md, eng, const_cast<void*>(B));
  dnnl::memory c_mem(p->c_md, eng, C);
  dnnl::stream& stream = this_thread_stream();
  p->prim.execute(stream,
                  {{DNNL_ARG_SRC, a_mem}, {DNNL_ARG_WEIGHTS, b_mem}, {DNNL_ARG_DST, c_mem}});
  stream.wait();
}

}  // namespace

void gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  check_arguments("gemm", ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
  run_gemm(dnnl::memory::data_type::f32, dnnl::memory::data_type::f32, ta, tb, M, N, K, alpha, A,
           lda, B, ldb, beta, C, ldc);
}

void gemm_bf16(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha, const bf16* A,
               int64_t lda, const bf16* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  check_arguments("gemm_bf16", ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
  run_gemm(dnnl::memory::data_type::bf16, dnnl::memory::data_type::f32, ta, tb, M, N, K, alpha, A,
           lda, B, ldb, beta, C, ldc);
}

void gemm_bf16(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha, const bf16* A,
               int64_t lda, const bf16* B, int64_t ldb, float beta, bf16* C, int64_t ldc) {
  check_arguments("gemm_bf16", ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
  run_gemm(dnnl::memory::data_type::bf16, dnnl::memory::data_type::bf16, ta, tb, M, N, K, alpha, A,
           lda, B, ldb, beta, C, ldc);
}

void set_compute_threads(int n) {
  TSP_CHECK(n >= 1, "set_compute_threads: need at least 1 thread, got {}", n);
  threads_setting().store(n);
  apply_threads_to_this_thread(n);
}

int compute_threads() {
  return threads_setting().load(std::memory_order_relaxed);
}

}  // namespace tsp
