// Training checkpoints: a Hugging Face model directory that any layout and degree (and PyTorch)
// can load, plus the optimizer state and where training stands.
//
//   <dir>/config.json                     the model (torch_dtype forced to float32: exact resume)
//   <dir>/model.safetensors               full fp32 weights, Hugging Face names
//   <dir>/optimizer.exp_avg.safetensors   AdamW first moment, full tensors, the same names
//   <dir>/optimizer.exp_avg_sq.safetensors  second moment, likewise
//   <dir>/trainer_state.json              step, data position, seed, batch shape, config hash,
//                                         layout; written last: its presence marks a complete
//                                         checkpoint
//
// Full tensors (not per-rank shards) make a checkpoint independent of the layout and degree that
// wrote it: resuming under another layout re-shards on load.
//
// Atomicity: everything is written into <dir>.tmp-<pid> and fsynced; then an existing <dir> is
// renamed to <dir>.old, the new directory renamed to <dir>, and <dir>.old removed. A process
// killed at any instant leaves a complete checkpoint at <dir> or (only inside the two renames) at
// <dir>.old, and resolve_checkpoint() finds it.
#pragma once

#include <cstdint>
#include <string>

#include "tsp/comm/communicator.h"
#include "tsp/model/config.h"
#include "tsp/parallel/layout.h"
#include "tsp/train/optimizer.h"

namespace tsp {

struct TrainerState {
  int64_t step = 0;     // optimizer steps done; the next step to run
  int64_t samples = 0;  // training windows consumed (the data position)
  uint64_t seed = 0;    // data and initialisation seed
  int64_t batch = 0, seq = 0, accum = 0;
  std::string config_hash;  // of the model configuration (config_fingerprint)
  std::string layout;       // what wrote it (informational: any layout can resume)
  int tp = 1, dp = 1, world = 1;
  double last_loss = 0;
  double last_val_loss = -1;  // < 0: not evaluated yet

  std::string to_json_string() const;
  static TrainerState from_json_string(const std::string& text, const std::string& where);
};

// A stable fingerprint of the model shape (every config.json key that changes the parameters or
// the function computed, not the storage dtype): hex FNV-1a 64.
std::string config_fingerprint(const LlamaConfig& config);

// The directory to resume from: <dir> if complete, else <dir>.old if complete (a save was killed
// between its renames), else a tsp::Error saying what is missing.
std::string resolve_checkpoint(const std::string& dir);

// Collective over the world (every rank calls it): gathers weights and moments to world rank 0,
// which writes the checkpoint atomically as above. Rank 0 holds one full tensor set (weights, or
// one moment) at a time. The layout's gradient buffers are used as staging for the moments, so
// call it between steps (after the update, before the next zero_grads).
void save_checkpoint(const std::string& dir, Layout& layout, const AdamW& opt,
                     const TrainerState& state, Communicator& world);

// Reads <dir>/config.json and trainer_state.json (no layout needed): for choosing the model and
// validating options before anything is built.
LlamaConfig read_checkpoint_config(const std::string& dir);
TrainerState read_trainer_state(const std::string& dir);

// Collective: loads the weights and moments into this rank's shards (any layout, any degree) and
// the step count into the optimizer; returns the trainer state. Rejects a checkpoint of another
// model (config fingerprint) with a clear error. `dir` should come from resolve_checkpoint().
// The layout's gradients are used as staging and left zeroed.
TrainerState load_checkpoint(const std::string& dir, Layout& layout, AdamW& opt);

}  // namespace tsp
