// GEMM throughput of tsp::gemm / tsp::gemm_bf16 (oneDNN matmul) at 1024³ and at the shapes of a
// transformer layer (N tokens × h × F·h). Prints a `#` header and fixed columns, or one JSON line
// per row with --json. Every row also checks sampled entries of C against a double reference.
//
//   OMP_NUM_THREADS=1 build/bench/bench_matmul [--threads N] [--repeats R] [--json] [--quick]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <oneapi/dnnl/dnnl.hpp>

#include "tsp/core/machine.h"
#include "tsp/core/tensor.h"
#include "tsp/ops/gemm.h"

namespace {

using tsp::Trans;

struct Shape3 {
  const char* what;
  Trans ta, tb;
  int64_t M, N, K;
};

// "AMD EPYC (family 26 model 2)": the family matters here (Zen 4 = 25 has half-width AVX-512
// FMA, Zen 5 = 26 full width, so fp32 peaks differ by 2x).
struct Result {
  double median_ms, min_ms, gflops, max_rel_err;
  bool ok;
};

// Times one problem: `repeats` timed calls after one warm-up (which creates the primitive).
template <typename T>
Result run(const Shape3& s, int repeats, std::mt19937& rng) {
  const int64_t a_rows = s.ta == Trans::N ? s.M : s.K, a_cols = s.ta == Trans::N ? s.K : s.M;
  const int64_t b_rows = s.tb == Trans::N ? s.K : s.N, b_cols = s.tb == Trans::N ? s.N : s.K;
  tsp::Tensor A({a_rows, a_cols}, tsp::dtype_of<T>(), tsp::MemCategory::Workspace);
  tsp::Tensor B({b_rows, b_cols}, tsp::dtype_of<T>(), tsp::MemCategory::Workspace);
  tsp::Tensor C = tsp::Tensor::f32({s.M, s.N}, tsp::MemCategory::Workspace);
  std::uniform_real_distribution<float> dist(-1.f, 1.f);
  auto fill = [&](tsp::Tensor& t) {
    T* p = t.data_as<T>();
    for (int64_t i = 0; i < t.numel(); ++i) p[i] = T(dist(rng));
  };
  fill(A);
  fill(B);
  auto call = [&] {
    if constexpr (std::is_same_v<T, float>) {
      tsp::gemm(s.ta, s.tb, s.M, s.N, s.K, 1.f, A.f32(), a_cols, B.f32(), b_cols, 0.f, C.f32(),
                s.N);
    } else {
      tsp::gemm_bf16(s.ta, s.tb, s.M, s.N, s.K, 1.f, A.data_as<T>(), a_cols, B.data_as<T>(), b_cols,
                     0.f, C.f32(), s.N);
    }
  };
  call();
  std::vector<double> ms;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    call();
    const auto t1 = std::chrono::steady_clock::now();
    ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  Result res{};
  res.median_ms = ms[ms.size() / 2];
  res.min_ms = ms.front();
  res.gflops = 2.0 * s.M * s.N * s.K / (res.median_ms * 1e6);

  // Correctness: 64 sampled entries against double. Bound (K+1)·u·Σ|a||b| (any fp32 summation
  // order; bf16 products are exact in fp32), reported relative to Σ|a||b|.
  const T* a = A.data_as<T>();
  const T* b = B.data_as<T>();
  res.ok = true;
  for (int t = 0; t < 64; ++t) {
    const int64_t i = rng() % s.M, j = rng() % s.N;
    double sum = 0, abs_sum = 0;
    for (int64_t k = 0; k < s.K; ++k) {
      const double av =
          static_cast<float>(s.ta == Trans::N ? a[i * a_cols + k] : a[k * a_cols + i]);
      const double bv =
          static_cast<float>(s.tb == Trans::N ? b[k * b_cols + j] : b[j * b_cols + k]);
      sum += av * bv;
      abs_sum += std::fabs(av * bv);
    }
    const double err = std::fabs(C.f32()[i * s.N + j] - sum) / std::max(abs_sum, 1e-30);
    res.max_rel_err = std::max(res.max_rel_err, err);
    if (err > (s.K + 1) * 0x1p-24) res.ok = false;
  }
  return res;
}

}  // namespace

int main(int argc, char** argv) {
  bool json = false, quick = false;
  int repeats = 7;
  int threads = tsp::compute_threads();
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--json") {
      json = true;
    } else if (arg == "--quick") {
      quick = true;
    } else if (arg == "--repeats" && i + 1 < argc) {
      repeats = std::max(1, std::atoi(argv[++i]));
    } else if (arg == "--threads" && i + 1 < argc) {
      threads = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr,
                   "usage: %s [--threads N] [--repeats R] [--json] [--quick]\n"
                   "  --threads N  compute threads (default: OMP_NUM_THREADS, else 1)\n"
                   "  --repeats R  timed calls per row, median reported (default 7)\n"
                   "  --quick      1024^3, 256^3 and the small-M shape only\n",
                   argv[0]);
      return 2;
    }
  }
  try {
    tsp::set_compute_threads(threads);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }

  // Transformer shapes at N = 4096 tokens, h = 1024, F·h = 4h; weights [out, in] so y = x·Wᵀ.
  std::vector<Shape3> shapes = {
      {"cube", Trans::N, Trans::N, 1024, 1024, 1024},
      // Fits in L2: the kernel's compute peak, independent of memory bandwidth and of cache
      // traffic from other processes.
      {"cube256", Trans::N, Trans::N, 256, 256, 256},
      {"small_m", Trans::N, Trans::T, 16, 1024, 1024},
  };
  if (!quick) {
    shapes.insert(shapes.end(), {
                                    {"qkvo_fwd", Trans::N, Trans::T, 4096, 1024, 1024},
                                    {"mlp_up_fwd", Trans::N, Trans::T, 4096, 4096, 1024},
                                    {"mlp_down_fwd", Trans::N, Trans::T, 4096, 1024, 4096},
                                    {"mlp_down_dx", Trans::N, Trans::N, 4096, 4096, 1024},
                                    {"mlp_up_dw", Trans::T, Trans::N, 4096, 1024, 4096},
                                });
  }

  const dnnl_version_t* v = dnnl_version();
  std::printf(
      "# tsp bench matmul  machine=\"%s\" hw_threads=%u  threads=%d  oneDNN=%d.%d.%d  "
      "repeats=%d (median)\n",
      tsp::cpu_description().c_str(), std::thread::hardware_concurrency(), threads, v->major,
      v->minor, v->patch, repeats);
  std::printf(
      "# C[M,N] = op(A)[M,K]·op(B)[K,N], fp32 output; bf16 = bf16 inputs, fp32 "
      "accumulation. max_rel_err over 64 sampled entries, relative to sum|a||b|\n");
  if (!json) {
    std::printf("# %-13s %-5s %2s %2s %6s %6s %6s %7s %9s %9s %9s %9s %3s\n", "shape", "dtype",
                "ta", "tb", "M", "N", "K", "threads", "ms", "min_ms", "GFLOP/s", "max_err", "ok");
  }
  std::mt19937 rng(42);
  bool all_ok = true;
  for (const char* dtype : {"f32", "bf16"}) {
    for (const Shape3& s : shapes) {
      const Result r = std::strcmp(dtype, "f32") == 0 ? run<float>(s, repeats, rng)
                                                      : run<tsp::bf16>(s, repeats, rng);
      all_ok = all_ok && r.ok;
      const char* ta = s.ta == Trans::N ? "N" : "T";
      const char* tb = s.tb == Trans::N ? "N" : "T";
      if (json) {
        std::printf(
            "{\"bench\":\"matmul\",\"shape\":\"%s\",\"dtype\":\"%s\",\"ta\":\"%s\",\"tb\":\"%s\","
            "\"M\":%lld,\"N\":%lld,\"K\":%lld,\"threads\":%d,\"ms\":%.4f,\"min_ms\":%.4f,"
            "\"gflops\":%.2f,\"max_rel_err\":%.3g,\"ok\":%s}\n",
            s.what, dtype, ta, tb, static_cast<long long>(s.M), static_cast<long long>(s.N),
            static_cast<long long>(s.K), threads, r.median_ms, r.min_ms, r.gflops, r.max_rel_err,
            r.ok ? "true" : "false");
      } else {
        std::printf("  %-13s %-5s %2s %2s %6lld %6lld %6lld %7d %9.3f %9.3f %9.1f %9.2e %3s\n",
                    s.what, dtype, ta, tb, static_cast<long long>(s.M), static_cast<long long>(s.N),
                    static_cast<long long>(s.K), threads, r.median_ms, r.min_ms, r.gflops,
                    r.max_rel_err, r.ok ? "yes" : "NO");
      }
      std::fflush(stdout);
    }
  }
  return all_ok ? 0 : 1;
}
