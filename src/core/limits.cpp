#include "tsp/core/limits.h"

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <string>

#include "tsp/core/error.h"

namespace tsp {

int64_t checked_mul(int64_t a, int64_t b, std::string_view what) {
  TSP_CHECK(a >= 0 && b >= 0, "{}: negative size ({} × {})", what, a, b);
  int64_t r = 0;
  TSP_CHECK(!__builtin_mul_overflow(a, b, &r), "{}: {} × {} does not fit in 64 bits", what, a, b);
  return r;
}

int64_t checked_add(int64_t a, int64_t b, std::string_view what) {
  TSP_CHECK(a >= 0 && b >= 0, "{}: negative size ({} + {})", what, a, b);
  int64_t r = 0;
  TSP_CHECK(!__builtin_add_overflow(a, b, &r), "{}: {} + {} does not fit in 64 bits", what, a, b);
  return r;
}

int64_t checked_product(std::initializer_list<int64_t> sizes, std::string_view what) {
  int64_t r = 1;
  for (int64_t s : sizes) r = checked_mul(r, s, what);
  return r;
}

int64_t physical_memory_bytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
  int64_t bytes = pages > 0 && page > 0 ? static_cast<int64_t>(pages) * page
                                        : std::numeric_limits<int64_t>::max();
  // A container's memory limit (cgroup v2) is what the job can really use.
  std::ifstream cg("/sys/fs/cgroup/memory.max");
  std::string limit;
  if (cg >> limit && limit != "max") {
    try {
      const int64_t l = std::stoll(limit);
      if (l > 0 && l < bytes) bytes = l;
    } catch (...) {
    }
  }
  return bytes;
}

std::string format_bytes(double bytes) {
  const char* units[] = {"B", "kB", "MB", "GB", "TB", "PB", "EB"};
  int u = 0;
  while (bytes >= 1000 && u < 6) {
    bytes /= 1000;
    ++u;
  }
  return u == 0 ? fmt::format("{:.0f} B", bytes) : fmt::format("{:.1f} {}", bytes, units[u]);
}

int local_ranks() {
  // OpenMPI's launchers (mpirun, mpiexec, srun with PMIx) tell each process how many ranks share
  // its node; without them the process is alone.
  const char* n = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
  if (n == nullptr) return 1;
  try {
    return std::max(1, std::stoi(n));
  } catch (...) {
    return 1;
  }
}

MemoryPool host_memory_pool() {
  return {physical_memory_bytes(), local_ranks(), "this machine"};
}

void require_memory(int64_t bytes, std::string_view what, std::string_view hint,
                    const MemoryPool& pool) {
  const int64_t have = pool.bytes;
  const int ranks = std::max(1, pool.ranks);
  // Every rank drawing on the pool holds its own share, so the pool needs ranks × bytes.
  int64_t all = 0;
  const bool overflow = __builtin_mul_overflow(bytes, static_cast<int64_t>(ranks), &all);
  if (ranks == 1 || overflow) {
    TSP_CHECK(bytes <= have && !overflow, "{} needs {} per rank, more than the {} {} has; {}", what,
              format_bytes(static_cast<double>(bytes)), format_bytes(static_cast<double>(have)),
              pool.place, hint);
    return;
  }
  TSP_CHECK(all <= have,
            "{} needs {} per rank, {} for the {} ranks on {}, more than the {} it has; {}", what,
            format_bytes(static_cast<double>(bytes)), format_bytes(static_cast<double>(all)), ranks,
            pool.place, format_bytes(static_cast<double>(have)), hint);
}

void require_memory(int64_t bytes, std::string_view what, std::string_view hint) {
  require_memory(bytes, what, hint, host_memory_pool());
}

}  // namespace tsp
