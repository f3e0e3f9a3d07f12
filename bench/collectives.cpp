// Collective bandwidth of the MPI Communicator, printed like nccl-tests: a '#' header, then
// fixed columns  op  size_B  count  time_us  algbw_GB/s  busbw_GB/s  #wrong.
//
//   mpiexec -n 4 build/bench/bench_collectives [--sizes 1048576,16777216] [--iters 20] [--json]
//
// size_B is the largest buffer of the call (nccl-tests convention): the gathered output of
// all_gather, the full input of reduce_scatter, the buffer of the others; count = size_B / 4
// (f32). time_us is the median over iterations of the slowest rank's time. algbw = size_B / time;
// busbw = algbw x (2(n-1)/n for all_reduce, (n-1)/n for all_gather and reduce_scatter, 1 for
// broadcast, reduce and the sendrecv ring), comparable across world sizes. #wrong counts elements
// that differ from the exact expected result (integer-valued data), summed over all ranks, checked
// after the last iteration. Timings here are noisy (2-3x outliers): use the medians.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "tsp/comm/mpi.h"
#include "tsp/core/error.h"
#include "tsp/core/machine.h"

namespace tsp {
namespace {

struct Options {
  std::vector<int64_t> sizes = {1 << 20, 16 << 20};
  int iters = 20;
  int warmup = 3;
  bool json = false;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      TSP_CHECK(i + 1 < argc, "{} needs a value", a);
      return argv[++i];
    };
    if (a == "--json") {
      o.json = true;
    } else if (a == "--iters") {
      o.iters = std::atoi(next().c_str());
    } else if (a == "--warmup") {
      o.warmup = std::atoi(next().c_str());
    } else if (a == "--sizes") {
      o.sizes.clear();
      std::string list = next();
      size_t pos = 0;
      while (pos <= list.size()) {
        const size_t comma = std::min(list.find(',', pos), list.size());
        o.sizes.push_back(std::atoll(list.substr(pos, comma - pos).c_str()));
        pos = comma + 1;
      }
    } else {
      TSP_FAIL("unknown argument '{}'; use --sizes B1,B2,... --iters N --warmup N --json", a);
    }
  }
  TSP_CHECK(o.iters > 0, "--iters must be > 0");
  return o;
}

// Integer-valued data, exact in f32 sums over up to 64 ranks.
float value(int rank, int64_t i) {
  return static_cast<float>((rank * 7919 + i * 31) % 65521);
}

// One benchmarked operation: prepare() fills inputs (untimed), run() is timed, wrong() counts
// elements of this rank's result that differ from the exact answer.
struct Case {
  std::string op;
  double busbw_factor;
  std::function<void()> prepare;
  std::function<void()> run;
  std::function<int64_t()> wrong;
};

std::vector<Case> make_cases(Communicator& c, int64_t count, std::vector<float>& a,
                             std::vector<float>& b) {
  const int D = c.size(), me = c.rank();
  const double n = D;
  std::vector<Case> cases;
  // broadcast: count elements from root 0.
  cases.push_back({"broadcast", 1.0,
                   [&, count] {
                     for (int64_t i = 0; i < count; ++i) a[i] = me == 0 ? value(0, i) : -1.0f;
                   },
                   [&, count] { c.broadcast(a.data(), count, DType::F32, 0); },
                   [&, count] {
                     int64_t w = 0;
                     for (int64_t i = 0; i < count; ++i) w += a[i] != value(0, i);
                     return w;
                   }});
  // all_gather: count elements in total, count/D per rank.
  const int64_t per = count / D;
  cases.push_back({"all_gather", (n - 1) / n,
                   [&, per] {
                     for (int64_t i = 0; i < per; ++i) a[i] = value(me, i);
                   },
                   [&, per] { c.all_gather(a.data(), b.data(), per, DType::F32); },
                   [&, per, D] {
                     int64_t w = 0;
                     for (int64_t i = 0; i < per * D; ++i) w += b[i] != value(i / per, i % per);
                     return w;
                   }});
  // reduce_scatter: count elements in, count/D out.
  cases.push_back({"reduce_scatter", (n - 1) / n,
                   [&, per, D] {
                     for (int64_t i = 0; i < per * D; ++i) a[i] = value(me, i);
                   },
                   [&, per] { c.reduce_scatter(a.data(), b.data(), per, DType::F32); },
                   [&, per, D] {
                     int64_t w = 0;
                     for (int64_t i = 0; i < per; ++i) {
                       float sum = 0;
                       for (int q = 0; q < D; ++q) sum += value(q, me * per + i);
                       w += b[i] != sum;
                     }
                     return w;
                   }});
  cases.push_back({"all_reduce", 2 * (n - 1) / n,
                   [&, count] {
                     for (int64_t i = 0; i < count; ++i) a[i] = value(me, i);
                   },
                   [&, count] { c.all_reduce(a.data(), count, DType::F32); },
                   [&, count, D] {
                     int64_t w = 0;
                     for (int64_t i = 0; i < count; ++i) {
                       float sum = 0;
                       for (int q = 0; q < D; ++q) sum += value(q, i);
                       w += a[i] != sum;
                     }
                     return w;
                   }});
  cases.push_back({"reduce", 1.0,
                   [&, count] {
                     for (int64_t i = 0; i < count; ++i) a[i] = value(me, i);
                   },
                   [&, count] { c.reduce(a.data(), b.data(), count, DType::F32, 0); },
                   [&, count, D] {
                     if (me != 0) return int64_t{0};
                     int64_t w = 0;
                     for (int64_t i = 0; i < count; ++i) {
                       float sum = 0;
                       for (int q = 0; q < D; ++q) sum += value(q, i);
                       w += b[i] != sum;
                     }
                     return w;
                   }});
  // sendrecv ring: every rank sends count elements to rank+1 and receives from rank-1.
  cases.push_back({"sendrecv", 1.0,
                   [&, count] {
                     for (int64_t i = 0; i < count; ++i) a[i] = value(me, i);
                   },
                   [&, count, D] {
                     c.sendrecv(a.data(), count, DType::F32, (me + 1) % D, b.data(), count,
                                (me - 1 + D) % D);
                   },
                   [&, count, D] {
                     int64_t w = 0;
                     for (int64_t i = 0; i < count; ++i) w += b[i] != value((me - 1 + D) % D, i);
                     return w;
                   }});
  return cases;
}

int bench(Communicator& c, int argc, char** argv) {
  const Options o = parse(argc, argv);
  const int D = c.size(), me = c.rank();
  if (me == 0) {
    std::printf(
        "# tsp bench collectives  machine=%s, %u cores  world=%d  dtype=f32  iters=%d "
        "warmup=%d\n",
        tsp::cpu_description().c_str(), std::thread::hardware_concurrency(), D, o.iters, o.warmup);
    std::printf("# time = median over iters of the slowest rank; busbw as nccl-tests\n");
    if (!o.json) {
      std::printf("#%15s %10s %10s %10s %11s %11s %7s\n", "op", "size_B", "count", "time_us",
                  "algbw_GB/s", "busbw_GB/s", "#wrong");
    }
  }
  for (int64_t size : o.sizes) {
    const int64_t count = size / 4;
    TSP_CHECK(count % D == 0, "size {} B is not a multiple of 4*world={}", size, 4 * D);
    std::vector<float> a(count), b(count);
    for (Case& k : make_cases(c, count, a, b)) {
      std::vector<double> times;
      for (int it = 0; it < o.warmup + o.iters; ++it) {
        k.prepare();
        c.barrier();
        const auto t0 = std::chrono::steady_clock::now();
        k.run();
        double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        // The slowest rank defines the op's time (the Communicator only sums: gather, take max).
        const int64_t ns = static_cast<int64_t>(t * 1e9);
        std::vector<int64_t> all(D);
        c.all_gather(&ns, all.data(), 1, DType::I64);
        t = *std::max_element(all.begin(), all.end()) * 1e-9;
        if (it >= o.warmup) times.push_back(t);
      }
      int64_t wrong = k.wrong();
      c.all_reduce(&wrong, 1, DType::I64);
      std::sort(times.begin(), times.end());
      const double t = times[times.size() / 2];
      const double algbw = static_cast<double>(size) / t / 1e9;
      const double busbw = algbw * k.busbw_factor;
      if (me != 0) continue;
      if (o.json) {
        std::printf(
            "{\"op\":\"%s\",\"world\":%d,\"size_B\":%lld,\"count\":%lld,\"time_us\":%.1f,"
            "\"algbw_GBps\":%.3f,\"busbw_GBps\":%.3f,\"wrong\":%lld}\n",
            k.op.c_str(), D, static_cast<long long>(size), static_cast<long long>(count), t * 1e6,
            algbw, busbw, static_cast<long long>(wrong));
      } else {
        std::printf(" %15s %10lld %10lld %10.1f %11.3f %11.3f %7lld\n", k.op.c_str(),
                    static_cast<long long>(size), static_cast<long long>(count), t * 1e6, algbw,
                    busbw, static_cast<long long>(wrong));
      }
      std::fflush(stdout);
    }
  }
  return 0;
}

}  // namespace
}  // namespace tsp

int main(int argc, char** argv) {
  return tsp::run_mpi_main(argc, argv, tsp::bench);
}
