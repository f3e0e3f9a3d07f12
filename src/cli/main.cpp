// The `tsp` command line: subcommands (train, generate, grad, bench, plan, ...) register in
// command_registry(). A tsp::Error on any rank prints once with its rank and aborts the whole
// MPI job, so no rank is left hanging in a collective.
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <thread>

#include "cli/command.h"
#include "tsp/comm/mpi.h"
#include "tsp/core/error.h"
#include "tsp/ops/gemm.h"

namespace tsp::cli {
std::vector<Command>& command_registry() {
  static std::vector<Command> commands;
  return commands;
}

void check_output_path(const std::string& path, const std::string& option) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  TSP_CHECK(!fs::is_directory(st), "{} {} is a directory; give a file path", option, path);
  if (fs::exists(st) && !fs::is_regular_file(st)) return;  // a device or pipe
  fs::path dir = fs::path(path).parent_path();
  if (dir.empty()) dir = ".";
  TSP_CHECK(fs::is_directory(dir, ec) && ::access(dir.c_str(), W_OK) == 0,
            "{} {}: directory {} does not exist or is not writable; give a path in a writable "
            "directory",
            option, path, dir.string());
}
}  // namespace tsp::cli

namespace {
// Compute threads per rank when --threads is not given: OMP_NUM_THREADS if set, else the cores
// shared evenly by the ranks on this node (one thread per rank once ranks >= cores: more
// threads than cores lost 6-15% here).
int default_threads() {
  if (const char* env = std::getenv("OMP_NUM_THREADS"); env && std::atoi(env) > 0) {
    return std::atoi(env);
  }
  int local_ranks = 1;
  for (const char* var :
       {"OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", "MPI_LOCALNRANKS"}) {
    if (const char* env = std::getenv(var); env && std::atoi(env) > 0) {
      local_ranks = std::atoi(env);
      break;
    }
  }
  const int cores = static_cast<int>(std::thread::hardware_concurrency());
  return std::max(1, cores / std::max(1, local_ranks));
}

// What a command printed (a table, JSON lines, generated text) is its output: a full disk or a
// closed pipe behind stdout must fail the command, not exit 0 with a truncated result.
int checked_stdout(int rc) {
  if (std::fflush(stdout) != 0 || std::ferror(stdout)) {
    throw tsp::Error(fmt::format("writing to standard output failed: {}", std::strerror(errno)));
  }
  return rc;
}
}  // namespace

int main(int argc, char** argv) {
  using namespace tsp::cli;
  CLI::App app{
      "tsp: Tensor and Sequence Parallel training and serving of long-context transformers"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "tsp 0.1.0");
  // What the environment changes (read where it matters, checked there with a clear error).
  app.footer(
      "Environment:\n"
      "  OMP_NUM_THREADS=N           compute threads per rank when --threads is not given\n"
      "  TSP_COMM=auto|nccl|mpi      between ranks on GPUs: NCCL where every rank has its own GPU "
      "(auto, the default), or MPI with device buffers staged through pinned host memory\n"
      "  TSP_CUDA_FLASH=v1|v2|cudnn  the bf16 flash-attention kernels on GPUs (default v1; cudnn: "
      "cuDNN's fused attention for the calls it covers, libcudnn.so.9 loaded at run time)\n"
      "  TSP_NCCL_TIMEOUT=SECONDS    stop the job when an NCCL transfer stays unfinished this long "
      "while NCCL reports no error, a peer being stuck (default 600; 0: no limit)\n"
      "  TSP_POISON_ALLOCATIONS=1    fill every new tensor with NaN bytes, so reads of memory "
      "never written show (the test suite sets it)");
  int threads = 0;
  app.add_option("--threads", threads,
                 "compute threads per rank (GEMMs, attention); default: OMP_NUM_THREADS, else "
                 "cores / ranks on this node, at least 1")
      ->check(CLI::NonNegativeNumber);
  std::function<int(tsp::Communicator*)> run;
  bool needs_mpi = true;
  for (Command& c : command_registry()) {
    CLI::App* sub = app.add_subcommand(c.name, c.description);
    auto body = c.setup(*sub);
    sub->callback([&run, &needs_mpi, body, mpi = c.needs_mpi] {
      run = body;
      needs_mpi = mpi;
    });
  }
  CLI11_PARSE(app, argc, argv);
  tsp::set_compute_threads(threads > 0 ? threads : default_threads());

  if (!needs_mpi) {
    try {
      return checked_stdout(run(nullptr));
    } catch (const std::exception& e) {
      std::fprintf(stderr, "error: %s\n", e.what());
      return 1;
    }
  }
  tsp::MpiRuntime mpi(&argc, &argv);
  try {
    return checked_stdout(run(&mpi.world()));
  } catch (const std::exception& e) {
    tsp::abort_job(e.what());
  }
}
