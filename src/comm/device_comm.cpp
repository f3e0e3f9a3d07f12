// The data communicator factory, device resolution and the registry of the CUDA build's hooks
// (include/tsp/comm/device_comm.h). Compiled in every build: without the hooks a CUDA device
// simply finds no NCCL, and the CPU path returns before any of this runs.
#include "tsp/comm/device_comm.h"

#include <fmt/ranges.h>

#include <atomic>
#include <cstdlib>
#include <utility>
#include <vector>

#include "tsp/core/error.h"

namespace tsp {
namespace {

// Constant-initialised: the CUDA build registers from a static initialiser of the same library.
std::atomic<const CudaCommHooks*> g_hooks{nullptr};

std::string env_or_empty(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

CommChoice choice_from_environment() {
  const std::string v = env_or_empty("TSP_COMM");
  if (v.empty() || v == "auto") return CommChoice::Auto;
  if (v == "mpi") return CommChoice::Mpi;
  if (v == "nccl") return CommChoice::Nccl;
  TSP_FAIL(
      "TSP_COMM='{}' is not a communicator: use auto (NCCL where every rank has its own GPU, "
      "else MPI), mpi (device buffers staged through host memory) or nccl",
      v);
}

std::string_view choice_name(CommChoice c) {
  switch (c) {
    case CommChoice::Auto:
      return "auto";
    case CommChoice::Mpi:
      return "mpi";
    case CommChoice::Nccl:
      return "nccl";
  }
  return "?";
}

}  // namespace

void register_cuda_comm_hooks(const CudaCommHooks* hooks) {
  g_hooks.store(hooks, std::memory_order_release);
}

const CudaCommHooks* cuda_comm_hooks() {
  return g_hooks.load(std::memory_order_acquire);
}

// ---- which GPU each rank uses ----

int local_rank_from_environment() {
  // Open MPI, MPICH/Hydra, MVAPICH, Slurm's srun, PMI, Cray PALS.
  for (const char* name :
       {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK",
        "SLURM_LOCALID", "PMI_LOCAL_RANK", "PALS_LOCAL_RANKID"}) {
    const std::string v = env_or_empty(name);
    if (v.empty()) continue;
    char* end = nullptr;
    const long r = std::strtol(v.c_str(), &end, 10);
    if (end != v.c_str() && *end == '\0' && r >= 0) return static_cast<int>(r);
  }
  return -1;
}

Device resolve_device(std::string_view text) {
  const Device d = parse_device(text);
  if (d.is_cpu()) return d;
  const CudaCommHooks* hooks = cuda_comm_hooks();
  // A build without CUDA: unchanged, backend_for raises its "no CUDA backend" error.
  if (hooks == nullptr) return d;
  const int n = hooks->device_count();
  if (n <= 0) {
    const std::string visible = env_or_empty("CUDA_VISIBLE_DEVICES");
    TSP_FAIL(
        "no CUDA device: --device {} needs a GPU but the CUDA runtime sees none{}; check the "
        "driver (nvidia-smi) or use --device cpu",
        text, visible.empty() ? "" : fmt::format(" (CUDA_VISIBLE_DEVICES={})", visible));
  }
  if (text == "cuda") {
    const int local = local_rank_from_environment();
    return Device::cuda((local < 0 ? 0 : local) % n);
  }
  TSP_CHECK(d.index < n, "--device {}: only {} CUDA device{} visible (cuda:0 to cuda:{})", text, n,
            n == 1 ? " is" : "s are", n - 1);
  return d;
}

// ---- the factory ----

bool ranks_on_distinct_gpus(Communicator& group, Device device, std::string* why) {
  auto say = [&](std::string text) {
    if (why) *why = std::move(text);
    return false;
  };
  if (device.is_cpu()) return say("the device is the CPU");
  const CudaCommHooks* hooks = cuda_comm_hooks();
  if (hooks == nullptr || hooks->device_uuid == nullptr)
    return say("this build has no CUDA support");
  const std::array<int64_t, 2> uuid = hooks->device_uuid(device.index);
  const int64_t mine[3] = {uuid[0], uuid[1], device.index};
  const std::vector<int64_t> all = group.gather_host(std::span<const int64_t>(mine, 3));
  for (int a = 0; a < group.size(); ++a) {
    for (int b = a + 1; b < group.size(); ++b) {
      if (all[3 * a] == all[3 * b] && all[3 * a + 1] == all[3 * b + 1]) {
        return say(fmt::format("ranks {} and {} of the group share one GPU (cuda:{} on rank {})", a,
                               b, all[3 * a + 2], a));
      }
    }
  }
  return true;
}

MemoryPool memory_pool(Device device, Communicator& group) {
  if (device.is_cpu()) return host_memory_pool();
  const CudaCommHooks* hooks = cuda_comm_hooks();
  TSP_CHECK(hooks != nullptr && hooks->device_uuid != nullptr,
            "--device {}: this build has no CUDA support", device.str());
  MemoryPool pool;
  pool.bytes = allocator_for(device).capacity_bytes();
  pool.place = fmt::format("the GPU {}", device.str());
  const std::array<int64_t, 2> uuid = hooks->device_uuid(device.index);
  const std::vector<int64_t> all = group.gather_host(std::span<const int64_t>(uuid.data(), 2));
  pool.ranks = 0;
  for (int r = 0; r < group.size(); ++r)
    pool.ranks += all[2 * r] == uuid[0] && all[2 * r + 1] == uuid[1];
  return pool;
}

std::unique_ptr<Communicator> make_data_communicator(std::unique_ptr<Communicator> mpi_group,
                                                     Device device) {
  if (device.is_cpu()) return mpi_group;  // before reading the environment: CPU runs unchanged
  return make_data_communicator(std::move(mpi_group), device, choice_from_environment());
}

std::unique_ptr<Communicator> make_data_communicator(std::unique_ptr<Communicator> mpi_group,
                                                     Device device, CommChoice choice) {
  TSP_CHECK(mpi_group != nullptr, "make_data_communicator: no group communicator");
  if (device.is_cpu()) return mpi_group;
  // Ranks that disagree would go different ways and hang: one clear error instead.
  mpi_group->check_same(static_cast<int64_t>(choice), "the communicator choice (TSP_COMM)");
  if (choice == CommChoice::Mpi) return mpi_group;
  const CudaCommHooks* hooks = cuda_comm_hooks();
  if (hooks == nullptr || hooks->make_nccl == nullptr) {
    TSP_CHECK(choice != CommChoice::Nccl,
              "TSP_COMM=nccl, but this build has no NCCL (configure with -DTSP_WITH_CUDA=ON)");
    return mpi_group;
  }
  std::string why;
  if (!ranks_on_distinct_gpus(*mpi_group, device, &why)) {
    TSP_CHECK(choice != CommChoice::Nccl,
              "TSP_COMM={}: NCCL cannot run this group of {} ranks: {} (NCCL needs one GPU per "
              "rank); run at most one rank per GPU, or use TSP_COMM=mpi to stage device buffers "
              "through host memory",
              choice_name(choice), mpi_group->size(), why);
    return mpi_group;
  }
  return hooks->make_nccl(std::move(mpi_group), device.index);
}

std::string_view communicator_kind(const Communicator& comm) {
  const CudaCommHooks* hooks = cuda_comm_hooks();
  return hooks && hooks->is_nccl && hooks->is_nccl(comm) ? "nccl" : "mpi";
}

// ---- pinned staging buffers ----

StagingBuffer::StagingBuffer(size_t bytes) : bytes_(bytes) {
  const CudaCommHooks* hooks = cuda_comm_hooks();
  TSP_CHECK(hooks && hooks->staging.acquire,
            "a device buffer needs host staging, but this build registered none");
  p_ = hooks->staging.acquire(bytes);
}

StagingBuffer::~StagingBuffer() {
  if (p_ != nullptr) cuda_comm_hooks()->staging.release(p_, bytes_);
}

StagingBuffer::StagingBuffer(StagingBuffer&& other) noexcept
    : p_(std::exchange(other.p_, nullptr)), bytes_(other.bytes_) {}

StagingBuffer& StagingBuffer::operator=(StagingBuffer&& other) noexcept {
  if (this != &other) {
    if (p_ != nullptr) cuda_comm_hooks()->staging.release(p_, bytes_);
    p_ = std::exchange(other.p_, nullptr);
    bytes_ = other.bytes_;
  }
  return *this;
}

}  // namespace tsp
