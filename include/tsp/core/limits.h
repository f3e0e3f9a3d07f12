// Sizes a user can type are checked before anything is allocated: every product of sizes goes
// through checked_mul/checked_add (a 64-bit overflow is an error naming what was being sized,
// never a wrapped-around value), and what a run is about to hold is compared with the memory the
// machine has (require_memory), so an impossible --batch or --max-new fails at once with a message
// instead of growing until the kernel kills the job.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>

namespace tsp {

// a·b and a+b for non-negative sizes; throws tsp::Error("<what>: a × b does not fit in 64 bits")
// on overflow or on a negative operand.
int64_t checked_mul(int64_t a, int64_t b, std::string_view what);
int64_t checked_add(int64_t a, int64_t b, std::string_view what);
// Product of a list of sizes (a tensor's element count, a batch's token count), checked likewise.
int64_t checked_product(std::initializer_list<int64_t> sizes, std::string_view what);

// Physical memory of this machine in bytes (sysconf), or of the cgroup limit when one is lower.
int64_t physical_memory_bytes();

// Ranks of this job on this machine (OMPI_COMM_WORLD_LOCAL_SIZE, set by OpenMPI's launchers; 1
// without one).
int local_ranks();

// Where a rank's tensors live, for require_memory: how many bytes that memory has, how many ranks
// of the job draw on it (each holding as much as this one), and its name in messages. The host:
// this machine's physical memory shared by local_ranks() ranks ("this machine"). A GPU: its own
// memory shared by the ranks that compute on it (comm/device_comm.h, memory_pool; "the GPU cuda:0").
struct MemoryPool {
  int64_t bytes = 0;
  int ranks = 1;
  std::string place;
};
MemoryPool host_memory_pool();

// Throws tsp::Error when `bytes` (what this process is about to hold for `what` in `pool`), times
// the ranks that each hold as much in it, exceeds the pool's memory:
// "<what> needs 1.2 TB per rank, more than the 24.0 GB this machine has; <hint>" (with
// "..., 4.8 TB for the 4 ranks on this machine, ..." when several ranks share it).
void require_memory(int64_t bytes, std::string_view what, std::string_view hint,
                    const MemoryPool& pool);
// The same for host memory (host_memory_pool()).
void require_memory(int64_t bytes, std::string_view what, std::string_view hint);

// "1.2 TB", "24.0 GB", "512 kB": decimal units, for messages.
std::string format_bytes(double bytes);

}  // namespace tsp
