// Training checkpoints: a Hugging Face model directory that any layout and degree (and PyTorch)
// can load, plus the optimizer state and where training stands. The user-facing description (and
// what every error means) is docs/checkpoints.md.
//
//   <dir>/config.json                     the model (torch_dtype forced to float32: exact resume)
//   <dir>/model.safetensors               full fp32 weights, Hugging Face names
//   <dir>/optimizer.exp_avg.safetensors   AdamW first moment, full tensors, the same names
//   <dir>/optimizer.exp_avg_sq.safetensors  second moment, likewise
//   <dir>/trainer_state.json              step, data position, seed, batch shape, config hash,
//                                         layout, and the size and SHA-256 of every other file
//                                         (and of itself); written last: its presence marks a
//                                         complete checkpoint
//
// Full tensors (not per-rank shards) make a checkpoint independent of the layout and degree that
// wrote it: resuming under another layout re-shards on load.
//
// Atomicity: everything is written into <dir>.tmp-<pid> and fsynced; then an existing <dir> is
// renamed to <dir>.old, the new directory renamed to <dir>, and <dir>.old removed. A process
// killed at any instant leaves a complete checkpoint at <dir> or (only inside the two renames) at
// <dir>.old, and resolve_checkpoint() finds it.
//
// Integrity: nothing non-finite is ever saved (save_checkpoint checks the weights and moments of
// every rank first), and every file's SHA-256 is verified before a checkpoint is used, so a
// flipped byte, a truncated, swapped or zeroed file is an error naming the file, never a silently
// different model.
//
// Exclusion: one run at a time writes a checkpoint directory. CheckpointLock takes flock() on
// <dir>.lock for the whole run; only the holder removes stale <dir>.tmp-* directories.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "tsp/comm/communicator.h"
#include "tsp/model/config.h"
#include "tsp/parallel/layout.h"
#include "tsp/train/optimizer.h"

namespace tsp {

// Size and SHA-256 (lower-case hex, as `sha256sum` prints it) of one file of a checkpoint.
struct FileDigest {
  int64_t bytes = 0;
  std::string sha256;
  bool operator==(const FileDigest&) const = default;
};
// Reads the whole file; tsp::Error naming it when it cannot be read.
FileDigest digest_file(const std::string& path);

struct TrainerState {
  int64_t step = 0;     // optimizer steps done; the next step to run
  int64_t samples = 0;  // training windows consumed (the data position)
  uint64_t seed = 0;    // data and initialisation seed
  int64_t batch = 0, seq = 0, accum = 0;
  int64_t doc_sep = -1;     // document separator of the data (--doc-sep); -1: none
  std::string config_hash;  // of the model configuration (config_fingerprint)
  std::string layout;       // what wrote it (informational: any layout can resume)
  int tp = 1, dp = 1, world = 1;
  double last_loss = 0;
  double last_val_loss = -1;  // < 0: not evaluated yet
  // Every other file of the checkpoint by name. Empty in a checkpoint written before checksums
  // were recorded (format 1): such a checkpoint still loads, unverified, with a warning.
  std::map<std::string, FileDigest> files;
  int format = 2;  // 1: no checksums (older tsp)

  // The JSON object, with "sha256" of its own content (every key before it) as the last key.
  std::string to_json_string() const;
  // Parses and validates every value (tsp::Error naming `where` and the bad key); checks the
  // state's own checksum.
  static TrainerState from_json_string(const std::string& text, const std::string& where);
};

// A stable fingerprint of the model shape (every config.json key that changes the parameters or
// the function computed, max_position_embeddings included, not the storage dtype): hex FNV-1a 64.
std::string config_fingerprint(const LlamaConfig& config);
// The fingerprint tsp wrote before max_position_embeddings was part of it: trainer states of
// older checkpoints carry it, and are still accepted.
std::string legacy_config_fingerprint(const LlamaConfig& config);
// The keys whose values differ, with both values: "hidden_size 64 there, 128 here; vocab_size
// ..." (`there` is the checkpoint's). Empty when the two would compute the same function.
std::string config_differences(const LlamaConfig& there, const LlamaConfig& here);

// The directory to resume from: <dir> if complete, else <dir>.old if complete (a save was killed
// between its renames), else a tsp::Error saying what is missing.
std::string resolve_checkpoint(const std::string& dir);

// Checks the files of checkpoint `dir` against the sizes and SHA-256 sums its trainer_state.json
// records (after checking the state's own checksum): all of them, or only those named in `only`
// (e.g. {"config.json", "model.safetensors"} for a reader of the model alone). Throws a tsp::Error
// naming the first file that is missing, of another size or content. Returns false, checking
// nothing, when `dir` has no trainer_state.json (a plain Hugging Face model directory) or when the
// checkpoint predates checksums (format 1); true when every requested file was verified.
// Cost: one sequential read of each file checked.
bool verify_checkpoint_files(const std::string& dir, const std::vector<std::string>& only = {});

// An exclusive lock on a checkpoint directory for the life of the object: flock() on <dir>.lock
// (created beside it; left in place, harmless, when released). The kernel releases it when the
// process ends, however it ends. Constructing it when another process holds the lock throws a
// tsp::Error naming the holder (pid, host, since when, from the lock file) and what to do.
// Constructing it also proves the parent of <dir> is writable (creating it if needed): an
// unwritable --save fails here, before any training.
class CheckpointLock {
 public:
  explicit CheckpointLock(const std::string& dir);
  ~CheckpointLock();
  CheckpointLock(const CheckpointLock&) = delete;
  CheckpointLock& operator=(const CheckpointLock&) = delete;
  // Whether this process holds the lock of `dir` (through a live CheckpointLock).
  static bool held(const std::string& dir);

 private:
  std::string dir_;
  int fd_ = -1;
};

// Checks, on the calling process only, that a checkpoint can be written to `dir`: an existing
// <dir> must be a tsp checkpoint or empty (tsp::Error otherwise: it would be replaced), and the
// filesystem must have room for `bytes` more (the new checkpoint is written before the old one is
// removed). Call it with the lock held.
void check_checkpoint_target(const std::string& dir, int64_t bytes);
// The bytes of a checkpoint of `config` (three fp32 tensor sets plus small files), for the above.
int64_t checkpoint_bytes(const LlamaConfig& config);

// Values of the optimizer state that must never be saved or resumed from: non-finite weights and
// first moments, non-finite or negative second moments. Counted over the whole world, each value
// once (replicated copies counted on one rank), identical on every rank.
struct StateHealth {
  int64_t weights = 0, exp_avg = 0, exp_avg_sq = 0;
  bool ok() const { return weights == 0 && exp_avg == 0 && exp_avg_sq == 0; }
  // "3 non-finite weights, 12 non-finite or negative exp_avg_sq values"
  std::string describe() const;
};
// Collective over the world (every rank calls it; one small all-gather).
StateHealth check_state_health(const AdamW& opt, Layout& layout, Communicator& world);

// Collective over the world (every rank calls it): gathers weights and moments to world rank 0,
// which writes the checkpoint atomically as above. Rank 0 holds one full tensor set (weights, or
// one moment) at a time. The layout's gradient buffers are used as staging for the moments, so
// call it between steps (after the update, before the next zero_grads). Refuses (tsp::Error on
// every rank, nothing written) a state that is not healthy. When world rank 0 does not hold
// CheckpointLock(dir) it takes it for the duration of the save.
void save_checkpoint(const std::string& dir, Layout& layout, const AdamW& opt,
                     const TrainerState& state, Communicator& world);

// Reads <dir>/config.json and trainer_state.json (no layout needed): for choosing the model and
// validating options before anything is built. Neither verifies checksums of the other files.
LlamaConfig read_checkpoint_config(const std::string& dir);
TrainerState read_trainer_state(const std::string& dir);

// Collective: loads the weights and moments into this rank's shards (any layout, any degree) and
// the step count into the optimizer; returns the trainer state. Rejects a checkpoint of another
// model (naming the differing config keys) with a clear error. `dir` should come from
// resolve_checkpoint() and be verified (verify_checkpoint_files) first. Does not check values:
// call check_state_health() after it. The layout's gradients are used as staging and left zeroed.
TrainerState load_checkpoint(const std::string& dir, Layout& layout, AdamW& opt);

}  // namespace tsp
