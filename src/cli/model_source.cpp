// Opening a model directory given on the command line (`--model`), the same way in every
// command: the interrupted-save fallback to <dir>.old, then the checksums a checkpoint records,
// then the weights.
#include <cstdio>
#include <filesystem>

#include "cli/command.h"
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
  world.broadcast(&verified, 1, DType::I64, 0);
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
