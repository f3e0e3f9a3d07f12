// Opening a model directory given on the command line (`--model`), the same way in every
// command: the interrupted-save fallback to <dir>.old, then the checksums a checkpoint records,
// then the weights.
#include <cstdio>
#include <filesystem>

#include "cli/command.h"
#include "tsp/comm/device_comm.h"
#include "tsp/core/error.h"
#include "tsp/train/checkpoint.h"

namespace tsp::cli {

std::string model_dir_or_old(const std::string& model, bool say) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const std::string old = model + ".old";
  if (fs::exists(model, ec) || !fs::is_directory(old, ec)) return model;
  if (say) {
    std::fprintf(stderr,
                 "note: %s does not exist but %s does (a checkpoint save was interrupted between "
                 "its renames); reading the model from %s\n",
                 model.c_str(), old.c_str(), old.c_str());
  }
  return old;
}

bool verify_on_rank0(Communicator& world, const std::string& dir,
                     const std::vector<std::string>& only) {
  int64_t verified = 1;  // 1: verified, 0: nothing to verify, -1: damaged
  std::string damage;
  if (world.rank() == 0) {
    try {
      verified = verify_checkpoint_files(dir, only) ? 1 : 0;
    } catch (const Error& e) {
      verified = -1;
      damage = e.message();
    }
  }
  verified = world.broadcast_host(verified, 0);  // control traffic
  if (verified < 0) {
    if (world.rank() == 0) throw Error(damage);
    world.barrier();  // never completes: rank 0's error ends the job
  }
  return verified > 0;
}

ModelDir open_model_arg(const std::string& model, Communicator& world) {
  const std::string dir = model_dir_or_old(model, world.rank() == 0);
  verify_on_rank0(world, dir, {"config.json", "model.safetensors"});
  return open_model_dir(dir);
}

}  // namespace tsp::cli

namespace tsp::cli {

void ComputeOptions::add_to(CLI::App& sub) {
  sub.add_option("--device", device,
                 "where to compute: cpu; with a CUDA build cuda (each rank on GPU local rank % "
                 "GPUs) or cuda:N")
      ->capture_default_str()
      ->check(CLI::Validator(
          [](std::string& v) {
            try {
              parse_device(v);
              return std::string();
            } catch (const Error&) {
              return "unknown device '" + v + "': use cpu, cuda or cuda:N";
            }
          },
          "DEVICE"));
  sub.add_option("--dtype", dtype,
                 "compute precision: bf16 (mixed: bf16 weights copies, activations and transfers; "
                 "fp32 master weights, gradients and optimizer), fp32, or auto (bf16 where the "
                 "device has native bf16 arithmetic)")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "bf16", "fp32"}));
}

Device ComputeOptions::parsed_device() const {
  // Validated when parsed. "cuda" without an index is this rank's GPU on its node (local rank %
  // visible devices; comm/device_comm.h); no visible GPU is an error naming --device.
  return resolve_device(device);
}

DType ComputeOptions::parsed_dtype() const {
  if (dtype == "auto") return default_compute_dtype(backend_for(parsed_device()));
  return parse_compute_dtype(dtype);  // validated when parsed
}

std::string ComputeOptions::describe() const {
  const DType t = parsed_dtype();
  return fmt::format("{} on {}", t == DType::BF16 ? "bf16 mixed precision" : "fp32",
                     parsed_device().str());
}

}  // namespace tsp::cli
