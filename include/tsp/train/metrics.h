// What a training run reports: JSON-lines metrics (one object per step) and, on rank 0, a
// progress bar on a terminal or plain periodic lines otherwise.
#pragma once

#include <array>
#include <cstdint>
#include <cstdio>
#include <string>

#include "tsp/comm/communicator.h"
#include "tsp/core/memory.h"

namespace tsp {

struct StepMetrics {
  int64_t step = 0;  // 1-based: the number of optimizer steps done after this one
  double loss = 0;
  double lr = 0;
  double grad_norm = 0;  // before clipping
  double tokens_per_s = 0;
  double step_seconds = 0;
  double elapsed_s = 0;
  double val_loss = -1;  // < 0: not evaluated at this step
  // Training tokens read from the corpus by one rank in this step (inputs and labels of all its
  // micro-batches), the minimum and maximum over ranks; < 0: not reported.
  int64_t tokens_read_min = -1, tokens_read_max = -1;
  // Peak bytes per memory category, the maximum over ranks (MemoryTracker peaks).
  std::array<int64_t, kNumMemCategories> peak_bytes{};
  int64_t peak_total_bytes = 0;
};

// Collective: the per-category peaks of every rank, maximum over ranks (identical everywhere).
void max_memory_peaks(Communicator& world, StepMetrics& m);

// The JSON object of one step, on one line.
std::string metrics_json(const StepMetrics& m);

// Writes JSON lines to a file, flushed after every line so a killed run keeps its metrics. Every
// write and flush is checked: a failure (a full disk, /dev/full) is a tsp::Error naming the file,
// never metrics silently lost.
class MetricsWriter {
 public:
  // keep_up_to_step < 0: start a new file. Otherwise (resuming at that step) keep the existing
  // lines of steps <= keep_up_to_step and drop later ones, which a run killed after its last
  // checkpoint wrote and the resumed run is about to write again. The kept lines are written to a
  // temporary file renamed over a regular file, so a failure leaves the previous file whole.
  MetricsWriter(const std::string& path, int64_t keep_up_to_step);
  ~MetricsWriter();
  MetricsWriter(const MetricsWriter&) = delete;
  MetricsWriter& operator=(const MetricsWriter&) = delete;
  void write(const StepMetrics& m);
  // Closes the file, checking that everything reached it (the destructor closes silently).
  void close();

 private:
  void put(const std::string& text);
  std::string path_;
  std::FILE* f_ = nullptr;
};

// Rank 0's progress display: a one-line bar redrawn in place when stdout is a terminal, plain
// lines every `every` steps (and the last) otherwise.
class Progress {
 public:
  Progress(int64_t first_step, int64_t total_steps, int64_t every, bool tty);
  static bool stdout_is_tty();
  void update(const StepMetrics& m);
  // A message on its own line (validation results, checkpoints) without breaking the bar.
  void note(const std::string& line);
  void finish();
  // "12:34" / "1:02:03"
  static std::string format_duration(double seconds);

 private:
  int64_t first_, total_, every_;
  bool tty_;
  bool bar_drawn_ = false;
};

}  // namespace tsp
