// The `tsp` command's subcommands register themselves here: each src/cli/cmd_<name>.cpp defines
// a static CommandRegistration, so adding a command touches no other file.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "tsp/backend/backend.h"
#include "tsp/comm/communicator.h"
#include "tsp/core/error.h"
#include "tsp/core/limits.h"
#include "tsp/model/params.h"
#include "tsp/plan/cost_model.h"

namespace tsp::cli {

struct Command {
  std::string name;
  std::string description;
  bool needs_mpi = true;  // false: runs without initialising MPI (e.g. plan)
  // Adds the subcommand's options to `sub`, returns the function to run once parsed.
  std::function<std::function<int(Communicator* world)>(CLI::App& sub)> setup;
};

std::vector<Command>& command_registry();

struct CommandRegistration {
  explicit CommandRegistration(Command c) { command_registry().push_back(std::move(c)); }
};

// For unsigned options (seeds): CLI11 converts "-1" to 2^64 - 1 without a word; refuse it.
inline const CLI::Validator kNotNegative(
    [](std::string& value) {
      return !value.empty() && value[0] == '-' ? "must be >= 0, got " + value : std::string();
    },
    "");

// --device and --dtype, the same on every command that computes (grad, train, bench, generate).
// The default dtype follows the device: bf16 mixed precision where its backend has native bf16
// arithmetic (AVX512-BF16 CPUs, GPUs), fp32 elsewhere (README, "Precision").
struct ComputeOptions {
  std::string device = "cpu";
  std::string dtype = "auto";
  void add_to(CLI::App& sub);
  Device parsed_device() const;  // tsp::Error naming --device for a bad value
  DType parsed_dtype() const;    // "auto" resolved for the device
  // "bf16 mixed precision on cpu" / "fp32 on cpu": for run headers.
  std::string describe() const;
};

// --doc-sep ID on grad, train and bench: packed documents, a token equal to ID ends its document
// (Batch::doc_sep; docs/layouts.md, "Documents"). -1, the default, means none.
inline constexpr const char* kDocSepHelp =
    "token id that ends a document (packed documents: attention stays within a document, RoPE "
    "positions restart, the label after a separator is not counted); -1: none";
// The id as a Batch carries it; tsp::Error naming the command and the option unless
// -1 <= id < vocab.
// --recompute on grad, train and bench (ParallelConfig::recompute; docs/layouts.md,
// "Recomputation").
inline constexpr const char* kRecomputeHelp =
    "activation recomputation: none keeps every activation the backward reads; selective keeps "
    "each layer's input, q, k, v, o, log-sum-exp and post-attention residual and recomputes the "
    "normed inputs and the MLP's gate/up/act; full keeps only each layer's input and replays the "
    "layer's forward (with its communication) in the backward; identical gradients";
// The mode; tsp::Error naming the command, the option and the modes.
inline plan::Recompute checked_recompute(const std::string& mode, const char* cmd) {
  TSP_CHECK(mode == "none" || mode == "selective" || mode == "full",
            "{}: --recompute {} is not a recomputation mode; use none, selective (the default) "
            "or full",
            cmd, mode);
  return plan::parse_recompute(mode);
}
// The end of a memory error's hint (require_memory): what each mode that recomputes more than
// `mode` would need per rank by `predict` (plan::predict_local_memory of the same step), e.g.
// ", or --recompute full (3.1 GB per rank predicted)": recomputation trades step time for
// activation memory. Empty under full.
inline std::string recompute_hint(plan::Recompute mode,
                                  const std::function<double(plan::Recompute)>& predict) {
  std::string out;
  for (const plan::Recompute m : {plan::Recompute::Selective, plan::Recompute::Full})
    if (static_cast<int>(m) > static_cast<int>(mode))
      out += fmt::format(", or --recompute {} ({} per rank predicted)", plan::recompute_name(m),
                         format_bytes(predict(m)));
  return out;
}
inline int32_t checked_doc_sep(int64_t id, int64_t vocab, const char* cmd) {
  TSP_CHECK(id == -1 || (0 <= id && id < vocab),
            "{}: --doc-sep {} is not a token id of the model (0 to {}), nor -1 for no documents",
            cmd, id, vocab - 1);
  return static_cast<int32_t>(id);
}

// For an output file written at the end of a long command (`--out`): throws tsp::Error now,
// naming the option, when it cannot be written there (a directory, or a missing or read-only
// parent directory). An existing device or pipe (/dev/stdout) is accepted: it is written in place.
void check_output_path(const std::string& path, const std::string& option);

// The directory a `--model DIR` names, or DIR.old when only that exists (a checkpoint save was
// interrupted between its renames, include/tsp/train/checkpoint.h), with a note on stderr when
// `say`.
std::string model_dir_or_old(const std::string& model, bool say);

// Collective: checks the files of a checkpoint against the checksums its trainer state records
// (verify_checkpoint_files; `only` limits it to those files, empty = all), before any rank reads
// them. Rank 0 reads each file once; on a mismatch it ends the job with the file's name while the
// other ranks wait, so theirs is not the message a user sees. Returns false when there was
// nothing to verify (a plain model directory, or a checkpoint written before checksums).
bool verify_on_rank0(Communicator& world, const std::string& dir,
                     const std::vector<std::string>& only);

// Collective: `--model DIR` as every command opens it: model_dir_or_old, the checkpoint's
// checksums of config.json and model.safetensors verified (when it records them), then
// open_model_dir.
ModelDir open_model_arg(const std::string& model, Communicator& world);

}  // namespace tsp::cli
