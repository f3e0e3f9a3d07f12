// Communicators for device buffers, and which device a rank computes on. Compiled in every build;
// the CUDA build fills in the GPU parts (NCCL, pinned staging, device queries) from a static
// initialiser in src/comm/cuda/nccl.cpp, so this header and mpi.cpp need no CUDA headers.
//
// The data communicator of a group of ranks is one of
//   "mpi"   the MPI communicator: host buffers as ever; device buffers are staged through pinned
//           host memory (copy in, MPI, copy out). Works with several ranks on one GPU (tests at
//           D = 2 and 4 on a single card) and wherever NCCL cannot be used.
//   "nccl"  NcclCommunicator (include/tsp/comm/nccl.h): device buffers moved by NCCL on a
//           communication stream ordered against the compute stream with events. Needs every rank
//           of the group on its own GPU (NCCL refuses two ranks on one device).
// Byte counts are the base class's, so they are identical whichever is chosen.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "tsp/comm/communicator.h"
#include "tsp/core/device.h"
#include "tsp/core/limits.h"

namespace tsp {

// How to move a group's device buffers. Auto reads the environment variable TSP_COMM: unset,
// "" or "auto" (NCCL where possible, else MPI staging), "mpi" or "nccl" (an error, on every rank,
// when NCCL cannot be used).
enum class CommChoice { Auto, Mpi, Nccl };

// The data communicator for `mpi_group` (an MPI communicator: MpiRuntime::world() or a split of
// it) computing on `device`. Collective over the group. CPU: mpi_group itself, untouched (no
// traffic, nothing printed). CUDA: NCCL when the build has it, the choice allows it and the ranks
// of the group are on distinct GPUs (agreed over the control API); else mpi_group (staging).
std::unique_ptr<Communicator> make_data_communicator(std::unique_ptr<Communicator> mpi_group,
                                                     Device device);
std::unique_ptr<Communicator> make_data_communicator(std::unique_ptr<Communicator> mpi_group,
                                                     Device device, CommChoice choice);

// "nccl" for an NcclCommunicator (or a split of one), else "mpi". For bench and --verbose output.
std::string_view communicator_kind(const Communicator& comm);

// Whether every rank of `group` computes on its own GPU (device UUIDs gathered over the control
// API; false for a CPU device or a build without CUDA). Collective. `why` (if given) receives the
// reason when false, e.g. "ranks 0,1 share the GPU cuda:0".
bool ranks_on_distinct_gpus(Communicator& group, Device device, std::string* why = nullptr);

// The CLI's --device text resolved for this process: "cpu"; "cuda:N" as given; "cuda" (no index)
// = cuda:(local rank % visible devices), the local rank being this process's rank among the ranks
// of its node, read from the launcher's environment (Open MPI, MPICH, Slurm, PMI; 0 when none
// says). Throws tsp::Error "no CUDA device: ..." when a CUDA device is asked for and none is
// visible (each rank checks its own node; the job's error handling aborts every rank), and names
// the count when cuda:N is out of range. Not collective: may be called any number of times.
Device resolve_device(std::string_view text);
int local_rank_from_environment();  // -1 when no launcher variable is set

// The memory a rank's tensors on `device` come from (core/limits.h, MemoryPool), for
// require_memory. The CPU: host_memory_pool(), with no communication. A GPU: its total memory
// (Allocator::capacity_bytes) and the ranks of `group` that compute on that very GPU, found by
// gathering the device UUIDs over the control API, so the count is right however the ranks were
// mapped to GPUs (--device cuda or cuda:N, one node or several). Collective over `group` for a
// GPU: every rank of the group must call it.
MemoryPool memory_pool(Device device, Communicator& group);

// ---- hooks the CUDA build registers (src/comm/cuda/nccl.cpp); none in a CPU build ----

// Host staging of device buffers for MPI (mpi.cpp): pinned buffers from a cache, and copies
// ordered after the work already queued on the device's compute stream. Both copies return when
// the data has arrived (the host then owns the staging buffer again).
struct HostStaging {
  void* (*acquire)(size_t bytes) = nullptr;  // pinned host memory of >= bytes
  void (*release)(void* p, size_t bytes) = nullptr;
  void (*to_host)(void* host, const void* dev, size_t bytes, Device device) = nullptr;
  void (*to_device)(void* dev, const void* host, size_t bytes, Device device) = nullptr;
};

struct CudaCommHooks {
  int (*device_count)() = nullptr;                              // 0 when no driver or device
  std::array<int64_t, 2> (*device_uuid)(int device) = nullptr;  // the GPU's 16-byte UUID
  std::unique_ptr<Communicator> (*make_nccl)(std::unique_ptr<Communicator> mpi_group,
                                             int device) = nullptr;
  bool (*is_nccl)(const Communicator& comm) = nullptr;
  HostStaging staging;
};
// `hooks` must outlive the program (a static object).
void register_cuda_comm_hooks(const CudaCommHooks* hooks);
const CudaCommHooks* cuda_comm_hooks();  // null in a CPU build

// A pinned host copy of a device buffer, from HostStaging's cache (RAII). For mpi.cpp.
class StagingBuffer {
 public:
  StagingBuffer() = default;
  explicit StagingBuffer(size_t bytes);
  ~StagingBuffer();
  StagingBuffer(StagingBuffer&& other) noexcept;
  StagingBuffer& operator=(StagingBuffer&& other) noexcept;
  void* data() const { return p_; }
  // Never give the memory back (an exception unwinds while a transfer may still write it).
  void leak() { p_ = nullptr; }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace tsp
